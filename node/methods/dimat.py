"""DIMAT: decentralized iterative merging-and-training, the pure part.

Saadati et al., "DIMAT: Decentralized Iterative Merging-And-Training for Deep Learning Models"
(CVPR 2024), as this module runs it:

    Job parameters: topology, degree, edges, merge, seed, match_examples, unreachable.
    Trainable state w_i of node i: every floating parameter of the model (``trainable = "full"``).
    No coordinator in the data path: models travel between neighbours only.

    Topology (fixed for a job; every node derives the same graph from the sorted node ids and the
    config, nothing to agree on at run time). Node k is the k-th id in sorted order.
        ring    i ~ i-1, i+1 (mod n)
        full    every pair
        random  a connected k-regular graph (k = ``degree``) drawn from ``seed``: the circulant
                k-regular graph, then 10|E| seeded double-edge swaps that keep it simple, k-regular
                and connected (Python's ``random.Random``, stable across versions and platforms,
                unlike a networkx generator whose algorithm may change between releases)
        edges   an explicit list "0-1,1-2,..." of positions in the sorted id list
    A topology that leaves the graph disconnected is a configuration error: the nodes could
    never reach consensus.

    Mixing matrix (Metropolis-Hastings, needs only the degrees of a node and its neighbours):
        w_ij = 1 / (1 + max(d_i, d_j)) for each edge ij,   w_ii = 1 - sum_j w_ij.
    Symmetric and doubly stochastic for every undirected graph; 1/3 everywhere on a ring.

    Node i, every round (the transport calls ``dimat_merge``):
        1. train locally from w_i for the round's period (the job's local epochs or steps)
        2. fetch w_j from every neighbour j; an unreachable neighbour is skipped for this merge
           and the row is re-weighted (``renormalized_weights``)
        3. merge == "dimat": run ``match_examples`` of i's own examples through its model with
           w_i and with w_j, recording the hidden units of every permutable group g (below);
              C_g = corr(units of w_i, units of w_j)                 (standardized, over tokens)
              P_g = argmax_P <C_g, P> over permutation matrices       (linear_sum_assignment)
           and permute w_j's units by P_g, in the layer that makes them (rows) and the layer that
           reads them (columns): a function-preserving change of w_j that lines its units up
           with w_i's.          merge == "gossip": no alignment.     merge == "none": keep w_i.
        4. w_i <- w_ii w_i + sum_j w_ij P(w_j)         (in float64, cast back to w_i's dtype)

What is permuted (the hidden units only: the residual stream, of width ``hidden_size``, is never
permuted, so every permutation stays inside one block and the groups are independent):

    BERT family (``*.intermediate.dense`` / ``*.output.dense``, ``attention.self.query|key|value``
    / ``attention.output.dense``):
        FFN units       rows of intermediate.dense (weight, bias), columns of output.dense
        attention heads as whole blocks of head_dim: rows of query, key and value (weights and
                        biases) and columns of attention.output.dense, all by the same head
                        permutation (Q and K of a head must move together; so must V and O)
    Llama family (Mistral, Qwen2, SmolLM2: ``mlp.gate_proj|up_proj|down_proj``,
    ``self_attn.q_proj|k_proj|v_proj|o_proj``):
        MLP units       rows of gate_proj and up_proj, columns of down_proj
        attention       key/value groups as blocks: kv head g together with the
                        num_heads/num_kv_heads query heads that read it (rows of q_proj in
                        blocks of (heads/kv) x head_dim, rows of k_proj and v_proj in blocks of
                        head_dim, columns of o_proj like q_proj). Without GQA a group is one head.
    Plain MLP (a ``torch.nn.Sequential`` of Linear layers and elementwise activations):
        the outputs of every Linear but the last: its rows (weight, bias) and the next Linear's
        columns.

    Matched on: the input of the layer that reads the units (after the activation; for heads,
    the attention output before the output projection; padding tokens dropped when the batch
    carries an ``attention_mask``). Heads are matched as blocks: the cost of head a against
    head b is the sum of the correlations of their dims d = 0..head_dim-1 pairwise.

Averaged plainly (no permutation is needed or possible for them here): embeddings (token,
position, token type), every LayerNorm / RMSNorm, the residual stream (all of hidden_size: the
inputs of query/key/value, intermediate.dense, gate/up_proj and the outputs of
attention.output.dense, output.dense, o_proj, down_proj), the BERT pooler, the classification or
LM head, rotary embeddings (no weights; RoPE frequency pairs inside a head are never separated),
biases of output projections, and everything in a model the spec does not recognise. Not
permuted either, though they could be: dims inside a head (V/O jointly, and Q/K jointly where
there is no RoPE) and the query heads inside one GQA group.

LoRA. Alignment permutes the weights that produce and read the units, so it needs them in the
state: it is meant for full-parameter training. A state holding a PEFT model's base weights *and*
its adapters (``model.state_dict()`` of a PeftModel) is supported: permuting the rows of W
(out x in) permutes the rows of lora_B, permuting its columns the columns of lora_A, which keeps
W + s B A consistent. An adapter-only state (frozen base, not exchanged) cannot be aligned: the
nodes share the frozen base, so their units are aligned already and "gossip" is the right merge;
``dimat_merge`` says so instead of guessing.

Unreachable neighbours. With ``unreachable = "renormalize"`` (the default) the reachable weights
and w_ii are scaled to sum to 1 again: the row stays stochastic, so the merge is still a convex
combination, but that round's mixing matrix is in general no longer doubly stochastic (nor
symmetric), so the network average of the models drifts a little. With ``"self"`` the missing
weight goes to w_ii: when a failure is symmetric (neither end reaches the other) the round's
matrix stays symmetric and doubly stochastic, which preserves the network average.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch.func import functional_call

from node.methods.base import (
    DecentralizedMethod,
    MethodConfig,
    State,
    UpdateError,
)

log = logging.getLogger(__name__)

TOPOLOGIES = ("ring", "full", "random", "edges")
MERGE_MODES = ("dimat", "gossip", "none")
UNREACHABLE_POLICIES = ("renormalize", "self")

Batch = Mapping[str, Any] | torch.Tensor
"""One batch of a node's own data: keyword inputs of the model (``input_ids``,
``attention_mask``, ...) or a single input tensor."""

_WEIGHT_TOLERANCE = 1e-6
_EDGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_ELEMENTWISE = (
    torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid,
    torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Softplus, torch.nn.Identity, torch.nn.Dropout,
)


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class DIMATConfig(MethodConfig):
    """DIMAT's job parameters (validated on construction).

    ``topology``: "ring", "full", "random" (k-regular) or "edges". ``degree``: k of the random
    topology. ``edges``: the explicit graph, "0-1,1-2" (positions in the sorted node ids; a list
    of "i-j" strings or [i, j] pairs is accepted too and stored as the canonical string).
    ``merge``: "dimat" (align, then average), "gossip" (plain average) or "none" (local only,
    the no-merging baseline). ``seed``: draws the random topology. ``match_examples``: how many
    of its own examples a node runs through both models to match units. ``unreachable``: what
    happens to an unreachable neighbour's weight ("renormalize" or "self", module docstring).
    """

    topology: str = "ring"
    degree: int = 2
    edges: str = ""
    merge: str = "dimat"
    seed: int = 0
    match_examples: int = 64
    unreachable: str = "renormalize"

    def __post_init__(self) -> None:
        if not isinstance(self.edges, str):
            edges = ",".join(f"{a}-{b}" for a, b in parse_edges(self.edges))
            object.__setattr__(self, "edges", edges)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError, naming the parameter, for values that make no sense."""
        if self.topology not in TOPOLOGIES:
            raise ValueError(
                f"dimat: topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}"
            )
        if not _is_int(self.degree) or self.degree < 1:
            raise ValueError(f"dimat: degree must be an integer >= 1, got {self.degree!r}")
        if self.topology == "edges":
            if not parse_edges(self.edges):
                raise ValueError('dimat: topology "edges" needs edges, e.g. edges="0-1,1-2,2-0"')
        elif self.edges:
            raise ValueError(
                f"dimat: edges are only read with topology 'edges' (topology is "
                f"{self.topology!r}); drop them or set topology='edges'"
            )
        if self.merge not in MERGE_MODES:
            raise ValueError(
                f"dimat: merge must be one of {', '.join(MERGE_MODES)}, got {self.merge!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 1 << 63:
            raise ValueError(f"dimat: seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not _is_int(self.match_examples) or self.match_examples < 1:
            raise ValueError(
                f"dimat: match_examples must be an integer >= 1, got {self.match_examples!r}"
            )
        if self.unreachable not in UNREACHABLE_POLICIES:
            raise ValueError(
                f"dimat: unreachable must be one of {', '.join(UNREACHABLE_POLICIES)}, "
                f"got {self.unreachable!r}"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DIMAT(DecentralizedMethod):
    """DIMAT's config for the job machinery (``parse_config`` validates job parameters).

    There is no coordinator-side aggregation: neighbours exchange full states peer to peer and
    each node merges with ``dimat_merge``; the coordinator only schedules train and merge
    phases and tells each node its neighbours and mixing weights (``neighbours``,
    ``mixing_weights``).
    """

    name = "dimat"
    config_class = DIMATConfig
    trainable = "full"

    def validate_config(self, config: MethodConfig) -> None:
        if not isinstance(config, DIMATConfig):
            raise ValueError(f"dimat: expected a DIMATConfig, got {type(config).__name__}")
        config.validate()


# --------------------------------------------------------------------------------------------
# Topology and mixing weights


def parse_edges(spec: str | Iterable[Any]) -> list[tuple[int, int]]:
    """Undirected edges (i < j, sorted, deduplicated) from "0-1,1-2" or a list of "i-j" strings
    or [i, j] pairs. Self-loops and malformed entries are a ValueError."""
    if isinstance(spec, str):
        items: list[Any] = [part for part in re.split(r"[,;\s]+", spec.strip()) if part]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(
                f"dimat: edges must be a string like '0-1,1-2', got {spec!r}"
            ) from None
    edges: set[tuple[int, int]] = set()
    for item in items:
        if isinstance(item, str):
            found = _EDGE.match(item)
            if not found:
                raise ValueError(f"dimat: edge {item!r} is not of the form 'i-j' (e.g. '0-1')")
            a, b = int(found.group(1)), int(found.group(2))
        else:
            try:
                a_raw, b_raw = item
            except (TypeError, ValueError):
                raise ValueError(f"dimat: edge {item!r} is not a pair [i, j]") from None
            if not all(_is_position(v) for v in (a_raw, b_raw)):
                raise ValueError(f"dimat: edge {item!r} must join two non-negative integers")
            a, b = int(a_raw), int(b_raw)
        if a == b:
            raise ValueError(f"dimat: edge {a}-{b} is a self-loop; a node always keeps itself")
        edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def _is_position(value: Any) -> bool:
    """A node position: a non-negative integer (job parameters arrive as floats, so 2.0 is
    fine, 2.5 is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0 and float(value).is_integer()


def neighbours(config: DIMATConfig, nodes: Sequence[str]) -> dict[str, list[str]]:
    """Every node's neighbours (sorted ids) in the job's topology over ``nodes``.

    Nodes are ordered by id, so every node computes the same graph from the same membership.
    ValueError when the topology does not fit the number of nodes or leaves it disconnected.
    """
    ids = sorted(nodes)
    if len(set(ids)) != len(ids):
        raise ValueError("dimat: node ids must be unique")
    n = len(ids)
    if n == 0:
        raise ValueError("dimat: a topology needs at least one node")
    if config.topology == "ring":
        edges = {(min(i, (i + 1) % n), max(i, (i + 1) % n)) for i in range(n) if n > 1}
    elif config.topology == "full":
        edges = {(i, j) for i in range(n) for j in range(i + 1, n)}
    elif config.topology == "random":
        edges = _random_regular(n, config.degree, config.seed)
    else:
        edges = set(parse_edges(config.edges))
        beyond = sorted({v for edge in edges for v in edge if v >= n})
        if beyond:
            raise ValueError(
                f"dimat: edges name node position(s) {beyond} but there are only {n} nodes "
                f"(positions 0..{n - 1} in sorted id order)"
            )
    adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        adjacency[a].add(b)
        adjacency[b].add(a)
    if not _connected(adjacency):
        raise ValueError(
            f"dimat: the {config.topology} topology over {n} nodes is disconnected, so the "
            "nodes could never agree; add edges"
        )
    return {ids[i]: sorted(ids[j] for j in adjacency[i]) for i in range(n)}


def _connected(adjacency: Mapping[int, Collection[int]]) -> bool:
    if not adjacency:
        return True
    start = next(iter(adjacency))
    seen = {start}
    frontier = [start]
    while frontier:
        for nxt in adjacency[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return len(seen) == len(adjacency)


def _random_regular(n: int, k: int, seed: int) -> set[tuple[int, int]]:
    """A connected k-regular graph on n nodes, a pure function of (n, k, seed).

    Start from the circulant graph (i ~ i +- 1..k/2, plus i ~ i + n/2 for odd k), which is
    k-regular and connected, then randomize it with double-edge swaps (ab, cd -> ad, cb) that
    keep it simple, k-regular and connected. Always succeeds; no rejection sampling.
    """
    if not 1 <= k < n:
        raise ValueError(f"dimat: a random {k}-regular topology needs 1 <= degree < nodes ({n})")
    if (n * k) % 2:
        raise ValueError(
            f"dimat: no {k}-regular graph on {n} nodes exists (nodes x degree must be even)"
        )
    if k == 1 and n > 2:
        raise ValueError(
            f"dimat: a 1-regular graph on {n} nodes is a set of disjoint pairs (disconnected); "
            "use degree >= 2"
        )
    adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
    for i in range(n):
        for step in range(1, k // 2 + 1):
            adjacency[i].add((i + step) % n)
            adjacency[(i + step) % n].add(i)
        if k % 2:
            adjacency[i].add((i + n // 2) % n)
            adjacency[(i + n // 2) % n].add(i)
    edges = sorted({(min(a, b), max(a, b)) for a in adjacency for b in adjacency[a]})
    rng = random.Random(seed)
    for _ in range(10 * len(edges)):
        i, j = rng.randrange(len(edges)), rng.randrange(len(edges))
        (a, b), (c, d) = edges[i], edges[j]
        if rng.random() < 0.5:
            c, d = d, c
        if len({a, b, c, d}) < 4 or d in adjacency[a] or b in adjacency[c]:
            continue
        for x, y in ((a, b), (c, d)):
            adjacency[x].discard(y)
            adjacency[y].discard(x)
        for x, y in ((a, d), (c, b)):
            adjacency[x].add(y)
            adjacency[y].add(x)
        if _connected(adjacency):
            edges[i], edges[j] = (min(a, d), max(a, d)), (min(c, b), max(c, b))
            continue
        for x, y in ((a, d), (c, b)):  # the swap cut the graph: undo it
            adjacency[x].discard(y)
            adjacency[y].discard(x)
        for x, y in ((a, b), (c, d)):
            adjacency[x].add(y)
            adjacency[y].add(x)
    return set(edges)


def _check_adjacency(adjacency: Mapping[str, Sequence[str]]) -> None:
    for node, nbrs in adjacency.items():
        for other in nbrs:
            if other == node:
                raise ValueError(f"dimat: node {node!r} lists itself as a neighbour")
            if other not in adjacency or node not in adjacency[other]:
                raise ValueError(
                    f"dimat: the topology is not undirected: {node!r} lists {other!r} but not "
                    "the other way round"
                )


def mixing_weights(
    adjacency: Mapping[str, Sequence[str]], node: str
) -> tuple[float, dict[str, float]]:
    """Node ``node``'s row of the Metropolis-Hastings mixing matrix: (w_ii, {j: w_ij}).

    w_ij = 1 / (1 + max(d_i, d_j)); w_ii = 1 - sum_j w_ij (> 0: at least 1 / (1 + d_i)).
    Needs only the degrees of the node and its neighbours.
    """
    _check_adjacency(adjacency)
    if node not in adjacency:
        raise ValueError(f"dimat: node {node!r} is not in the topology")
    degree = len(adjacency[node])
    row = {j: 1.0 / (1.0 + max(degree, len(adjacency[j]))) for j in sorted(adjacency[node])}
    return 1.0 - math.fsum(row.values()), row


def mixing_matrix(adjacency: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """The Metropolis-Hastings mixing matrix (float64, rows and columns in sorted id order):
    symmetric and doubly stochastic for any undirected graph."""
    ids = sorted(adjacency)
    index = {node: k for k, node in enumerate(ids)}
    matrix = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    for node in ids:
        self_weight, row = mixing_weights(adjacency, node)
        matrix[index[node], index[node]] = self_weight
        for other, weight in row.items():
            matrix[index[node], index[other]] = weight
    return matrix


def renormalized_weights(
    self_weight: float,
    neighbour_weights: Mapping[str, float],
    reachable: Collection[str],
    policy: str = "renormalize",
) -> tuple[float, dict[str, float]]:
    """This merge's row when only ``reachable`` neighbours answered: (w_ii, {j: w_ij}), summing
    to 1 over the node and its reachable neighbours.

    "renormalize": scale w_ii and the reachable w_ij by 1 / (their sum). The row stays
    stochastic, the round's matrix is no longer doubly stochastic in general. "self": add the
    unreachable weight to w_ii; symmetric failures keep the matrix doubly stochastic.
    """
    if policy not in UNREACHABLE_POLICIES:
        raise ValueError(
            f"dimat: unreachable must be one of {', '.join(UNREACHABLE_POLICIES)}, got {policy!r}"
        )
    strangers = sorted(set(reachable) - set(neighbour_weights))
    if strangers:
        raise ValueError(f"dimat: {strangers} are not neighbours of this node in the topology")
    _check_row(self_weight, neighbour_weights)
    kept = {j: float(w) for j, w in neighbour_weights.items() if j in reachable}
    if policy == "self":
        missing = math.fsum(w for j, w in neighbour_weights.items() if j not in reachable)
        return float(self_weight) + missing, kept
    total = float(self_weight) + math.fsum(kept.values())
    if total <= 0:
        raise ValueError("dimat: no weight left on this node or a reachable neighbour")
    return float(self_weight) / total, {j: w / total for j, w in kept.items()}


def _check_row(self_weight: float, weights: Mapping[str, float]) -> None:
    values = [float(self_weight), *map(float, weights.values())]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"dimat: mixing weights must be finite and >= 0, got {values}")
    if abs(math.fsum(values) - 1.0) > _WEIGHT_TOLERANCE:
        raise ValueError(
            f"dimat: a node's mixing weights must sum to 1 (self + neighbours), got "
            f"{math.fsum(values):.9f}"
        )


# --------------------------------------------------------------------------------------------
# Permutation specs: which tensors share a permutable hidden dimension


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


# --------------------------------------------------------------------------------------------
# Activations and matching


def _batches(batches: Batch | Iterable[Batch] | None) -> Iterator[Batch]:
    if batches is None:
        raise ValueError("dimat: alignment needs at least one batch of the node's own data")
    if isinstance(batches, torch.Tensor | Mapping):
        yield batches
        return
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise ValueError("dimat: alignment needs at least one batch of the node's own data")


def _device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _without_tied_aliases(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> State:
    """``state`` minus the second name of tied parameters (functional_call refuses two values
    for tied weights and ties them itself)."""
    first: dict[int, str] = {}
    drop = set()
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        owner = first.setdefault(id(tensor), name)
        if owner != name and owner in state:
            drop.add(name)
    return {name: value for name, value in state.items() if name not in drop}


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()  # no dropout: the same input must give the same units
    try:
        yield
    finally:
        model.train(was_training)


def collect_activations(
    model: torch.nn.Module,
    batch: Batch,
    spec: PermutationSpec,
    state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each group's units on one batch, as (samples or tokens, size x block) float32 tensors,
    with ``model`` run on ``state`` (its own weights when None; the model is left untouched).
    Padding tokens are dropped when the batch has an ``attention_mask``."""
    device = _device(model)
    modules = dict(model.named_modules())
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = inputs.get("attention_mask")
    else:
        inputs, mask = batch.to(device), None
    recorded: dict[str, torch.Tensor] = {}

    def recorder(group: PermGroup):
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if (isinstance(mask, torch.Tensor) and x.dim() == 3
                    and tuple(mask.shape) == tuple(x.shape[:2])):
                x = x[mask.bool()]
            recorded[group.name] = x.reshape(-1, x.shape[-1]).float()
        return hook

    handles = []
    try:
        for group in spec.groups:
            if group.probe not in modules:
                raise ValueError(f"dimat: the model has no module {group.probe!r}")
            handles.append(modules[group.probe].register_forward_pre_hook(recorder(group)))
        params = {} if state is None else {
            k: v.to(device) for k, v in _without_tied_aliases(model, state).items()
        }
        with torch.no_grad(), _evaluating(model):
            if isinstance(inputs, Mapping):
                functional_call(model, params, args=(), kwargs=dict(inputs), strict=False)
            else:
                functional_call(model, params, args=(inputs,), strict=False)
    finally:
        for handle in handles:
            handle.remove()
    for group in spec.groups:
        got = recorded.get(group.name)
        if got is None:
            raise ValueError(f"dimat: the forward pass never reached {group.probe!r}")
        if got.shape[-1] != group.size * group.block:
            raise ValueError(
                f"dimat: {group.probe!r} received {got.shape[-1]} features, group "
                f"{group.name} expects {group.size} x {group.block}"
            )
    return recorded


class CorrelationStats:
    """Running sums over samples for the correlation matrix between two sets of units
    (float64), so matching can use many batches without keeping their activations."""

    def __init__(self) -> None:
        self.count = 0
        self._sums: list[torch.Tensor] | None = None

    def update(self, acts_a: torch.Tensor, acts_b: torch.Tensor) -> None:
        if acts_a.dim() != 2 or acts_a.shape != acts_b.shape:
            raise ValueError(
                f"dimat: activations must be two (samples, units) matrices of one shape, got "
                f"{tuple(acts_a.shape)} and {tuple(acts_b.shape)}"
            )
        a, b = acts_a.to(torch.float64), acts_b.to(torch.float64)
        parts = [a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b]
        if self._sums is None:
            self._sums = parts
        else:
            for total, part in zip(self._sums, parts, strict=True):
                total += part
        self.count += a.shape[0]

    def correlation(self) -> torch.Tensor:
        """C[i, j] = Pearson correlation of unit i of A with unit j of B (0 for a constant
        unit)."""
        if self._sums is None or self.count < 2:
            raise ValueError("dimat: matching needs activations of at least 2 samples")
        n = self.count
        sum_a, sum_b, sq_a, sq_b, cross = self._sums
        mean_a, mean_b = sum_a / n, sum_b / n
        cov = cross / n - torch.outer(mean_a, mean_b)
        std_a = (sq_a / n - mean_a * mean_a).clamp_min(0).sqrt()
        std_b = (sq_b / n - mean_b * mean_b).clamp_min(0).sqrt()
        scale = torch.outer(std_a, std_b)
        return torch.where(scale > 1e-12, cov / scale.clamp_min(1e-12), torch.zeros_like(cov))


def assignment(correlation: torch.Tensor, block: int = 1) -> torch.Tensor:
    """The permutation (int64) maximizing the summed correlation, unit blocks of ``block``
    features matched as wholes: perm[i] = the unit of B that goes to position i of A."""
    features = correlation.shape[0]
    if correlation.shape != (features, features) or features % block:
        raise ValueError(f"dimat: bad correlation shape {tuple(correlation.shape)} for "
                         f"blocks of {block}")
    size = features // block
    cost = correlation.reshape(size, block, size, block).diagonal(dim1=1, dim2=3).sum(-1)
    rows, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    perm = torch.empty(size, dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def match_permutation(
    acts_a: torch.Tensor, acts_b: torch.Tensor, block: int = 1
) -> torch.Tensor:
    """Align B's units to A's from their activations on the same inputs, (samples, units x
    block) each: standardize, correlate, solve the linear assignment (maximize). Returns perm
    with perm[i] = B's unit for A's unit i, i.e. B[..., perm] lines up with A."""
    stats = CorrelationStats()
    stats.update(acts_a, acts_b)
    return assignment(stats.correlation(), block)


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


def align_all(
    model: torch.nn.Module,
    own_state: Mapping[str, torch.Tensor] | None,
    neighbour_states: Mapping[str, Mapping[str, torch.Tensor]],
    batches: Batch | Iterable[Batch],
    spec: PermutationSpec | None = None,
) -> dict[str, State]:
    """Every neighbour's state permuted to line its units up with the node's own.

    One pass over ``batches`` (the node's own data): per batch one forward with the own state
    (``own_state``, or the model's weights when None) and one per neighbour, accumulating the
    correlations; then one assignment per group and neighbour.
    """
    spec = permutation_spec(model) if spec is None else spec
    states = {node: dict(state) for node, state in neighbour_states.items()}
    if not spec.groups or not states:
        return states
    if own_state is not None:
        spec.check(own_state, "own state")
    for node, state in states.items():
        spec.check(state, f"state of neighbour {node!r}")
    stats = {node: {g.name: CorrelationStats() for g in spec.groups} for node in states}
    for batch in _batches(batches):
        own = collect_activations(model, batch, spec, own_state)
        for node, state in states.items():
            theirs = collect_activations(model, batch, spec, state)
            for group in spec.groups:
                stats[node][group.name].update(own[group.name], theirs[group.name])
    aligned = {}
    for node, state in states.items():
        perms = {g.name: assignment(stats[node][g.name].correlation(), g.block)
                 for g in spec.groups}
        aligned[node] = apply_permutation(state, spec, perms)
    return aligned


def align(
    model: torch.nn.Module,
    neighbour_state: Mapping[str, torch.Tensor],
    batches: Batch | Iterable[Batch],
    spec: PermutationSpec | None = None,
    *,
    own_state: Mapping[str, torch.Tensor] | None = None,
) -> State:
    """One neighbour's state aligned to the node's own (``own_state`` or ``model``'s weights)
    by activation matching on the node's ``batches``."""
    return align_all(model, own_state, {"neighbour": neighbour_state}, batches, spec)["neighbour"]


# --------------------------------------------------------------------------------------------
# Merging


def check_neighbour_state(
    own_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], node: str = ""
) -> None:
    """UpdateError unless a neighbour's state has the own state's names and shapes and finite
    floating values: one bad peer must not poison (or crash) the merge."""
    who = f"neighbour {node!r}" if node else "neighbour"
    missing = sorted(set(own_state) - set(state))
    extra = sorted(set(state) - set(own_state))
    if missing or extra:
        raise UpdateError(
            f"state of {who} does not match this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, value in state.items():
        if tuple(value.shape) != tuple(own_state[name].shape):
            raise UpdateError(f"{who}: tensor {name!r} has shape {tuple(value.shape)}, "
                              f"expected {tuple(own_state[name].shape)}")
        if own_state[name].dtype.is_floating_point:
            if not value.dtype.is_floating_point:
                raise UpdateError(f"{who}: tensor {name!r} must be floating point")
            if not torch.isfinite(value).all():
                raise UpdateError(f"{who}: tensor {name!r} contains NaN or infinity")


def merge(
    own_state: Mapping[str, torch.Tensor],
    neighbour_states: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, float],
    self_weight: float | None = None,
) -> State:
    """w_ii * own + sum_j w_ij * neighbour_j, per tensor in float64, cast back to the own
    tensor's dtype and device. ``weights`` covers exactly the given neighbours; ``self_weight``
    defaults to 1 - sum(weights). Non-floating tensors keep the own value."""
    if set(weights) != set(neighbour_states):
        raise ValueError(
            f"dimat: weights are for {sorted(weights)} but states came from "
            f"{sorted(neighbour_states)}"
        )
    if self_weight is None:
        self_weight = 1.0 - math.fsum(weights.values())
    _check_row(self_weight, weights)
    for node, state in neighbour_states.items():
        check_neighbour_state(own_state, state, node)
    merged: State = {}
    for name, own in own_state.items():
        if not own.dtype.is_floating_point:
            merged[name] = own
            continue
        acc = own.detach().to("cpu", torch.float64) * float(self_weight)
        for node, state in neighbour_states.items():
            acc += state[name].detach().to("cpu", torch.float64) * float(weights[node])
        merged[name] = acc.to(device=own.device, dtype=own.dtype)
    return merged


def dimat_merge(
    model: torch.nn.Module,
    own_state: Mapping[str, torch.Tensor],
    neighbour_states: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, float],
    batch: Batch | Iterable[Batch] | None,
    mode: str = "dimat",
    *,
    self_weight: float | None = None,
    unreachable: str = "renormalize",
    spec: PermutationSpec | None = None,
) -> State:
    """One merge of a node, what the transport calls after fetching its neighbours.

    ``weights``: the node's mixing row over *all* its topology neighbours (``mixing_weights``);
    ``self_weight`` is w_ii (default 1 - sum). ``neighbour_states``: the states that arrived;
    a neighbour missing from it is unreachable and its weight is handled by ``unreachable``.
    ``batch``: the node's own data for matching (one batch or an iterable of batches; unused
    unless ``mode`` is "dimat"). ``mode``: "dimat" aligns then averages, "gossip" averages,
    "none" returns the own state. ``model`` has the architecture the states belong to; its
    weights are not changed, but for the duration it is in eval mode with forward hooks on the
    probed layers, so do not train it concurrently. UpdateError for a neighbour state that does
    not fit (names, shapes, NaN), ValueError for an adapter-only state under "dimat".
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"dimat: merge must be one of {', '.join(MERGE_MODES)}, got {mode!r}")
    if self_weight is None:
        self_weight = 1.0 - math.fsum(weights.values())
    self_weight, row = renormalized_weights(self_weight, weights, set(neighbour_states),
                                            unreachable)
    if mode == "none" or not row:
        return dict(own_state)
    states = {node: neighbour_states[node] for node in row}
    if mode == "dimat":
        for node, state in states.items():  # before their weights reach the model
            check_neighbour_state(own_state, state, node)
        spec = permutation_spec(model) if spec is None else spec
        states = align_all(model, own_state, states, batch, spec)
    return merge(own_state, states, row, self_weight)  # checks the states again


__all__ = [
    "DIMAT",
    "MERGE_MODES",
    "TOPOLOGIES",
    "UNREACHABLE_POLICIES",
    "Axis",
    "Batch",
    "CorrelationStats",
    "DIMATConfig",
    "PermGroup",
    "PermutationSpec",
    "align",
    "align_all",
    "apply_permutation",
    "assignment",
    "check_neighbour_state",
    "collect_activations",
    "dimat_merge",
    "match_permutation",
    "merge",
    "mixing_matrix",
    "mixing_weights",
    "neighbours",
    "parse_edges",
    "permutation_spec",
    "renormalized_weights",
]
