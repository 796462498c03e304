"""The hidden units of a model on a node's own data, and their correlations between two
models: what DIMAT matches units on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.func import functional_call

from confide.node.merging.permutation import PermGroup, PermutationSpec
from confide.node.methods.base import State

__all__ = ["Batch", "CorrelationStats", "collect_activations", "each_batch"]

Batch = Mapping[str, Any] | torch.Tensor
"""One batch of a node's own data: keyword inputs of the model (``input_ids``,
``attention_mask``, ...) or a single input tensor."""


def each_batch(batches: Batch | Iterable[Batch] | None) -> Iterator[Batch]:
    """One batch or an iterable of them, as batches; ValueError for none."""
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
