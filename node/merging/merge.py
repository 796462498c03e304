"""DIMAT's merge on a node: check the neighbours' states, align them (``mode="dimat"``) and
average them with the node's own by its mixing row (step 4 of ``node.methods.dimat``); and a
MERGE task end to end: fetch the neighbours' models of the round, merge, keep the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch

from confide.node.data import Example
from confide.node.merging.activations import Batch
from confide.node.merging.alignment import align_all
from confide.node.merging.fetch import fetch_neighbours
from confide.node.merging.permutation import PermutationSpec, permutation_spec
from confide.node.methods.base import MethodConfig, State, UpdateError
from confide.node.methods.dimat import MERGE_MODES, DIMATConfig
from confide.node.methods.topology import check_row, renormalized_weights
from confide.protos.chunking import DEFAULT_MAX_PAYLOAD
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["MergingTrainer", "check_neighbour_state", "dimat_merge", "merge", "merge_round"]


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
    check_row(self_weight, weights)
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
    identity_margin: float = 0.0,
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
        states = align_all(model, own_state, states, batch, spec, identity_margin)
    return merge(own_state, states, row, self_weight)  # checks the states again


class MergingTrainer(Protocol):
    """What a merge needs of the job's trainer: the model the states belong to, and its
    batching of this node's examples."""

    model: torch.nn.Module

    def batch(self, examples: Sequence[Example]) -> Batch: ...


def merge_round(task: pb.Task, config: MethodConfig, trainer: MergingTrainer, own: State,
                own_examples: Callable[[], Sequence[Example]],
                max_bytes: int = DEFAULT_MAX_PAYLOAD) -> tuple[State, dict[str, float]]:
    """A MERGE task: fetch the neighbours' models of this round peer to peer, align them to
    ``own`` (this node's model after the round's training) on its own examples (loaded by
    ``own_examples``) and average with the mixing weights the coordinator published. The
    merged state and the task's metrics; nothing crosses with ``merge="none"``. ``max_bytes``:
    the node policy's payload cap, applied to each neighbour's stream at its headers."""
    if not isinstance(config, DIMATConfig):
        raise TypeError(f"a merge needs a DIMAT config, got {type(config).__name__}")
    if config.merge == "none":  # local only: nothing to fetch, nothing crosses
        return dict(own), {"neighbours": 0.0, "neighbours_merged": 0.0,
                           "peer_bytes_down": 0.0, "peer_bytes_up": 0.0}
    # half the task's deadline for the fetches: the alignment needs the rest
    fetched = fetch_neighbours(task, timeout_s=max(task.deadline_s / 2, 15.0),
                               max_bytes=max_bytes)
    for node_id, state in list(fetched.states.items()):
        try:  # a neighbour whose model does not fit is skipped, like an unreachable one
            check_neighbour_state(own, state, node_id)
        except UpdateError as exc:
            fetched.failures[node_id] = f"unusable model: {exc}"
            del fetched.states[node_id]
            log.warning("merge of round %d skips neighbour %s: %s", task.round,
                        node_id[:12], exc)
    weights = {p.node_id: p.weight for p in task.peers if p.role == "neighbour"}
    examples = own_examples()[: config.match_examples]
    batch = trainer.batch(examples) if config.merge == "dimat" else None
    merged = dimat_merge(trainer.model, own, fetched.states, weights, batch, config.merge,
                         self_weight=task.self_weight, unreachable=config.unreachable,
                         identity_margin=config.identity_margin)
    return merged, {
        "neighbours": float(len(weights)),
        "neighbours_merged": float(len(fetched.states)),
        "peer_bytes_down": float(fetched.bytes_down),
        "peer_bytes_up": float(fetched.bytes_up),
    }
