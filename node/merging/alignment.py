"""Aligning a neighbour's model to this node's: correlate their hidden units on this node's
data, solve the linear assignment per permutable group, permute the neighbour's weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from scipy.optimize import linear_sum_assignment

from confide.node.merging.activations import (
    Batch,
    CorrelationStats,
    collect_activations,
    each_batch,
)
from confide.node.merging.permutation import PermutationSpec, apply_permutation, permutation_spec
from confide.node.methods.base import State

__all__ = ["align", "align_all", "assignment", "match_permutation"]


def assignment(correlation: torch.Tensor, block: int = 1,
               identity_margin: float = 0.0) -> torch.Tensor:
    """The permutation (int64) maximizing the summed correlation, unit blocks of ``block``
    features matched as wholes: perm[i] = the unit of B that goes to position i of A.

    ``identity_margin`` > 0 keeps the identity unless matching gains more than that much
    correlation per unit over it: models already aligned by earlier rounds have nearly tied
    units, and re-matching them on a few non-IID examples only reshuffles them."""
    features = correlation.shape[0]
    if correlation.shape != (features, features) or features % block:
        raise ValueError(f"dimat: bad correlation shape {tuple(correlation.shape)} for "
                         f"blocks of {block}")
    size = features // block
    cost = correlation.reshape(size, block, size, block).diagonal(dim1=1, dim2=3).sum(-1)
    matrix = cost.cpu().numpy()
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    if identity_margin > 0:
        gain = float(matrix[rows, cols].sum() - matrix.trace()) / (size * block)
        if gain <= identity_margin:
            return torch.arange(size, dtype=torch.long)
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


def align_all(
    model: torch.nn.Module,
    own_state: Mapping[str, torch.Tensor] | None,
    neighbour_states: Mapping[str, Mapping[str, torch.Tensor]],
    batches: Batch | Iterable[Batch],
    spec: PermutationSpec | None = None,
    identity_margin: float = 0.0,
) -> dict[str, State]:
    """Every neighbour's state permuted to line its units up with the node's own (a group
    stays unpermuted unless matching gains more than ``identity_margin``, see ``assignment``).

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
    for batch in each_batch(batches):
        own = collect_activations(model, batch, spec, own_state)
        for node, state in states.items():
            theirs = collect_activations(model, batch, spec, state)
            for group in spec.groups:
                stats[node][group.name].update(own[group.name], theirs[group.name])
    aligned = {}
    for node, state in states.items():
        perms = {g.name: assignment(stats[node][g.name].correlation(), g.block,
                                    identity_margin)
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
