"""Which tensors share a permutable hidden dimension (DIMAT's permutation specs), and
reordering a state's hidden units by them: a function-preserving change of the model.
See ``node.methods.dimat`` for what is permuted in each architecture, and why.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from confide.node.methods.base import State

log = logging.getLogger(__name__)

__all__ = ["Axis", "PermGroup", "PermutationSpec", "apply_permutation", "permutation_spec"]

_ELEMENTWISE = (
    torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid,
    torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Softplus, torch.nn.Identity, torch.nn.Dropout,
)


@dataclass(frozen=True)
class Axis:
    """One tensor's share of a group: its dimension ``dim`` holds the group's units as
    ``size`` consecutive blocks of ``block`` entries (0: rows / bias, 1: columns)."""

    name: str
    dim: int
    block: int = 1


@dataclass(frozen=True)
class PermGroup:
    """Hidden units that can be permuted together without changing the model's function.

    ``size`` units (or head blocks); ``axes``: every tensor entry that moves with them;
    ``probe``: the module whose input carries the units (``block`` features per unit), where
    their activations are recorded for matching; ``kind``: "mlp", "heads" or "kv-groups".
    """

    name: str
    kind: str
    size: int
    block: int
    probe: str
    axes: tuple[Axis, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """The permutable groups of one model architecture. Tensors named in no group are
    averaged plainly."""

    groups: tuple[PermGroup, ...] = field(default_factory=tuple)

    def tensor_names(self) -> set[str]:
        return {axis.name for group in self.groups for axis in group.axes}

    def check(self, state: Mapping[str, torch.Tensor], what: str = "state") -> None:
        """ValueError unless ``state`` holds every tensor the groups permute, shaped to fit."""
        missing = sorted(self.tensor_names() - set(state))
        if missing:
            raise ValueError(
                f"dimat: alignment permutes {len(missing)} tensor(s) the {what} lacks, e.g. "
                f"{missing[:3]}; it needs the full weights (trainable='full' or a PEFT model's "
                "whole state_dict). An adapter-only state shares its frozen base with the "
                "neighbours, so its units are aligned already: use merge='gossip'"
            )
        for group in self.groups:
            for axis in group.axes:
                shape = tuple(state[axis.name].shape)
                if len(shape) <= axis.dim or shape[axis.dim] != group.size * axis.block:
                    raise ValueError(
                        f"dimat: {axis.name} has shape {shape}; group {group.name} expects "
                        f"{group.size} x {axis.block} along dim {axis.dim}"
                    )


def _linear_axes(
    path: str, module: torch.nn.Module, keys: Collection[str], dim: int, block: int
) -> list[Axis]:
    """The entries of a (possibly PEFT LoRA-wrapped) linear layer that move when its output
    units (``dim`` 0) or input units (``dim`` 1) are permuted."""
    base = f"{path}.base_layer" if hasattr(module, "base_layer") else path
    axes = [Axis(f"{base}.weight", dim, block)]
    if dim == 0 and f"{base}.bias" in keys:
        axes.append(Axis(f"{base}.bias", 0, block))
    lora = getattr(module, "lora_B" if dim == 0 else "lora_A", None)
    if isinstance(lora, torch.nn.ModuleDict):
        side = "lora_B" if dim == 0 else "lora_A"
        axes.extend(Axis(f"{path}.{side}.{adapter}.weight", dim, block) for adapter in lora)
    return axes


def _as_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    base = getattr(module, "base_layer", module)
    return base if isinstance(base, torch.nn.Linear) else None


def _children(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(module.named_children())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bert_groups(path: str, module: torch.nn.Module, keys: Collection[str]) -> list[PermGroup]:
    children = _children(module)
    groups: list[PermGroup] = []
    inter, out = children.get("intermediate"), children.get("output")
    if inter is not None and out is not None:
        up, down = _children(inter).get("dense"), _children(out).get("dense")
        if up is not None and down is not None and _as_linear(up) and _as_linear(down):
            up_path, down_path = _join(path, "intermediate.dense"), _join(path, "output.dense")
            groups.append(PermGroup(
                name=f"{path}.ffn", kind="mlp", size=_as_linear(up).out_features, block=1,
                probe=down_path,
                axes=(*_linear_axes(up_path, up, keys, 0, 1),
                      *_linear_axes(down_path, down, keys, 1, 1)),
            ))
    attention = children.get("attention")
    if attention is not None:
        parts = _children(attention)
        selfattn, proj = parts.get("self"), parts.get("output")
        qkv = _children(selfattn) if selfattn is not None else {}
        dense = _children(proj).get("dense") if proj is not None else None
        if dense is not None and all(qkv.get(n) is not None for n in ("query", "key", "value")):
            heads = getattr(selfattn, "num_attention_heads", None)
            if heads is None:
                heads = selfattn.config.num_attention_heads
            width = _as_linear(qkv["query"]).out_features
            head_dim = width // heads
            base = _join(path, "attention")
            axes: list[Axis] = []
            for n in ("query", "key", "value"):
                axes += _linear_axes(f"{base}.self.{n}", qkv[n], keys, 0, head_dim)
            axes += _linear_axes(f"{base}.output.dense", dense, keys, 1, head_dim)
            groups.append(PermGroup(
                name=f"{path}.heads", kind="heads", size=heads, block=head_dim,
                probe=f"{base}.output.dense", axes=tuple(axes),
            ))
    return groups


def _llama_mlp_group(
    path: str, module: torch.nn.Module, keys: Collection[str]
) -> PermGroup | None:
    children = _children(module)
    up, down = children.get("up_proj"), children.get("down_proj")
    if up is None or down is None or not _as_linear(up) or not _as_linear(down):
        return None
    axes: list[Axis] = []
    for n in ("gate_proj", "up_proj"):
        if children.get(n) is not None:
            axes += _linear_axes(_join(path, n), children[n], keys, 0, 1)
    axes += _linear_axes(_join(path, "down_proj"), down, keys, 1, 1)
    return PermGroup(
        name=f"{path}.units", kind="mlp", size=_as_linear(up).out_features, block=1,
        probe=_join(path, "down_proj"), axes=tuple(axes),
    )


def _llama_attention_group(
    path: str, module: torch.nn.Module, keys: Collection[str]
) -> PermGroup | None:
    children = _children(module)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if any(children.get(n) is None or not _as_linear(children[n]) for n in names):
        return None
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if heads is None:
        log.warning("dimat: cannot tell the number of heads of %s; its heads are not permuted",
                     path)
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q_width = _as_linear(children["q_proj"]).out_features
    head_dim = getattr(module, "head_dim", None) or q_width // heads
    if q_width != heads * head_dim or heads % kv_heads:
        log.warning("dimat: unexpected head layout in %s; its heads are not permuted", path)
        return None
    per_group = heads // kv_heads
    q_block = per_group * head_dim
    axes = [
        *_linear_axes(_join(path, "q_proj"), children["q_proj"], keys, 0, q_block),
        *_linear_axes(_join(path, "k_proj"), children["k_proj"], keys, 0, head_dim),
        *_linear_axes(_join(path, "v_proj"), children["v_proj"], keys, 0, head_dim),
        *_linear_axes(_join(path, "o_proj"), children["o_proj"], keys, 1, q_block),
    ]
    return PermGroup(
        name=f"{path}.heads", kind="heads" if per_group == 1 else "kv-groups", size=kv_heads,
        block=q_block, probe=_join(path, "o_proj"), axes=tuple(axes),
    )


def _sequential_groups(
    path: str, module: torch.nn.Sequential, keys: Collection[str]
) -> list[PermGroup]:
    """A Sequential of Linear layers and elementwise activations: each Linear's outputs but the
    last one's, moved with the next Linear's inputs."""
    layers = list(module.named_children())
    linears = [(name, child) for name, child in layers if _as_linear(child) is not None]
    if len(linears) < 2:
        return []
    if any(_as_linear(child) is None and not isinstance(child, _ELEMENTWISE)
           for _, child in layers):
        return []  # a norm or a reshape in between: not a plain MLP
    groups = []
    for (name, layer), (next_name, next_layer) in itertools.pairwise(linears):
        groups.append(PermGroup(
            name=f"{_join(path, name)}.units", kind="mlp", size=_as_linear(layer).out_features,
            block=1, probe=_join(path, next_name),
            axes=(*_linear_axes(_join(path, name), layer, keys, 0, 1),
                  *_linear_axes(_join(path, next_name), next_layer, keys, 1, 1)),
        ))
    return groups


def permutation_spec(model: torch.nn.Module) -> PermutationSpec:
    """The permutable groups of ``model``, found by module structure: BERT-family layers,
    Llama-family MLPs and attention blocks, plain Sequential MLPs (module docstring). Names are
    the model's ``state_dict`` keys. An unrecognised model gets an empty spec (DIMAT then
    averages it plainly, like gossip)."""
    keys = set(model.state_dict())
    groups: list[PermGroup] = []
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            groups += _sequential_groups(path, module, keys)
            continue
        groups += _bert_groups(path, module, keys)
        mlp = _llama_mlp_group(path, module, keys)
        if mlp is not None:
            groups.append(mlp)
        attention = _llama_attention_group(path, module, keys)
        if attention is not None:
            groups.append(attention)
    seen: set[tuple[str, int]] = set()
    for group in groups:
        for axis in group.axes:
            if (axis.name, axis.dim) in seen:
                raise ValueError(f"dimat: {axis.name} dim {axis.dim} is in two groups")
            seen.add((axis.name, axis.dim))
    spec = PermutationSpec(tuple(groups))
    spec.check(model.state_dict(), "model")
    if not groups:
        log.warning("dimat: no permutable layers recognised in %s; merging averages plainly",
                    type(model).__name__)
    return spec


def apply_permutation(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
) -> State:
    """``state`` with each group's units reordered by ``perms[group.name]`` (unit i of the
    result is unit perm[i] of ``state``) in every tensor of the group. Groups without a
    permutation stay; tensors outside the spec are shared, not copied."""
    result: State = dict(state)
    for group in spec.groups:
        perm = perms.get(group.name)
        if perm is None:
            continue
        perm = torch.as_tensor(perm, dtype=torch.long)
        if tuple(perm.shape) != (group.size,) or not torch.equal(
            perm.sort().values, torch.arange(group.size)
        ):
            raise ValueError(f"dimat: the permutation for {group.name} is not a permutation "
                             f"of {group.size} units")
        for axis in group.axes:
            if axis.name not in result:
                raise ValueError(f"dimat: the state lacks {axis.name} (group {group.name})")
            tensor = result[axis.name]
            blocks = tensor.unflatten(axis.dim, (group.size, axis.block))
            moved = blocks.index_select(axis.dim, perm.to(tensor.device))
            result[axis.name] = moved.flatten(axis.dim, axis.dim + 1).contiguous()
    return result
