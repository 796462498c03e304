"""How a method's update becomes one vector for secure aggregation, and the sum comes back.

Secure aggregation (``privacy.secagg``) sums fixed-length float vectors with integer weights;
the coordinator learns ``sum w_i x_i`` and ``sum w_i`` only. This module is the one place
where node and coordinator agree on that vector, as pure functions of the method, its config
and the round's global state (both sides hold the same, digest-checked state):

* ``secure_refusal``: why a job cannot be securely aggregated (checked at submission), or None;
* ``layout_for``: the entries in a fixed order, the per-entry bound ``clip`` and the weighting;
* ``flatten_update`` (node): the method's update as that vector, clipped to ``clip``;
* ``mean_update`` (coordinator): the weighted mean as one ``ClientUpdate`` that the method's
  own ``aggregate_compact`` turns into the next global state, exactly as it would the plain
  updates (each method below aggregates by a weighted mean, so one update carrying the mean
  with the total weight gives the same result).

Methods:

* ``fedavg-lora``, ``fedavg-full``, ``sfprompt`` (prompts and tail): the dense delta of every
  tensor of the state, sorted by name, weighted by the node's example count (at most the
  round's ``max_weight``, the largest dataset size the selected nodes registered).
* ``dp-lora`` (node unit), ``mode = "local"``: the same vector (clipped to L2 norm C and
  noised at the node already), weight 1 (DP-LoRA's unweighted mean). ``mode = "distributed"``:
  the clipped vector, which the node rounds and noises in the ring with its share of the noise
  (``privacy.secagg.distributed_dp``: the distributed discrete Gaussian, calibrated for the
  round's threshold), so the coordinator unmasks a sum that is already noised and adds none.
  ``mode = "central"`` is refused: there the coordinator adds the noise, so it would see the
  un-noised sum. Example-level dp-lora sends its plain delta (DP-SGD made it private).
* ``ferret``: each parameter group's scalars (either estimator), padded with zeros to the
  group's most directions (the plain aggregation averages missing coefficients as zeros too),
  and the exact groups' dense deltas (the head, small groups), weighted by example count; the
  round tag is rebuilt from the state's digest.
* ``cellm`` with ``selection = "shared-random"``: the values at the round's shared positions
  (drawn from the global state's digest: the same at every node, and data-independent), weighted
  by example count; the mean comes back as one sparse update. Top-k selection is refused (each
  node's own positions cannot ride in a masked sum), as are ``dimat`` (peer to peer: no
  coordinator sum) and anonymous jobs (secure aggregation names its participants and relays
  their signed keys; an anonymous upload has no session).

Per-entry bounds (the codec refuses, never clips, so the node clips here and counts it):
deltas of one round's training are far below :data:`DELTA_CLIP`; DP-LoRA's noised entries are
bounded by ``C + 8 sigma C`` (clipping DP output is post-processing); Ferret's scalars by
:data:`FERRET_CLIP`. The check the coordinator can still make is on the mean (``check_update``:
names, shapes, finite values): secure aggregation hides each input, so it cannot validate one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from confide.node.methods.base import ClientUpdate, Method, MethodConfig, State, UpdateError
from confide.protos.codec import SeedProjectedTensor, SparseTensor, WireTensor, to_dense

__all__ = [
    "DELTA_CLIP",
    "FERRET_CLIP",
    "SecureLayout",
    "flatten_update",
    "layout_for",
    "mean_update",
    "secure_refusal",
]

DELTA_CLIP = 4.0
"""|entry| bound of a dense delta (one round of LoRA or full fine-tuning moves entries by
~1e-2 at the learning rates used here); larger entries are clipped at the node."""
FERRET_CLIP = 1.0e7
"""|scalar| bound of a Ferret coefficient: the reference estimator scales an inner product by
about 3 d_g / n_g (up to ~1e6 per unit of update norm on MiniLM's 11.7M-entry embedding)."""
DP_TAIL_SIGMAS = 8.0
"""DP-LoRA local mode: entries are bounded by C (clipping) + this many noise std's."""


@dataclass(frozen=True)
class SecureLayout:
    """The vector of one method's update: ``(name, size)`` segments in order, the per-entry
    bound, and whether nodes weight by example count (else weight 1)."""

    kind: str  # "dense", "ferret" or "positions"
    segments: tuple[tuple[str, int], ...]
    clip: float
    weighted: bool
    #: dp-lora mode "distributed": (noise multiplier z, L2 clip C); each node adds its share
    #: of the noise in the ring (privacy.secagg.distributed_dp), weight 1
    distributed_noise: tuple[float, float] | None = None
    #: kind "positions" (cellm, shared-random selection): each tensor's flat positions, the
    #: same at every node; the vector holds the values there
    positions: Mapping[str, torch.Tensor] | None = None
    #: kind "ferret": the groups sent exactly (the head, small groups): their dense delta
    dense_segments: frozenset[str] = frozenset()

    @property
    def dim(self) -> int:
        return sum(size for _, size in self.segments)


def secure_refusal(method: Method, config: MethodConfig, *, anonymous: bool = False) -> str | None:
    """Why this job cannot be securely aggregated (a sentence for the user), or None."""
    name = method.name
    if anonymous:
        return ("secure aggregation does not compose with anonymous: it names the round's "
                "participants and relays their signed keys over their sessions, while an "
                "anonymous upload comes from an unnamed ring member; choose one")
    if method.decentralized:
        return (f"{name} is peer to peer: models travel between nodes and the coordinator "
                "computes no sum, so there is nothing to aggregate securely")
    if name == "cellm" and getattr(config, "selection", "topk") != "shared-random":
        return ("cellm's top-k selection sends each node's own positions, which a masked sum "
                "cannot carry: with secure aggregation use selection 'shared-random' (every "
                "node keeps the same random positions each round)")
    if (name == "dp-lora" and getattr(config, "unit", "node") == "node"
            and getattr(config, "mode", "local") == "central"):
        return ("dp-lora mode 'central' adds the noise at the coordinator, which would then see "
                "the un-noised sum; with secure aggregation use mode 'distributed' (the nodes "
                "split the noise among them: the distributed discrete Gaussian) or 'local' "
                "(each node adds all of it)")
    if name not in ("fedavg-lora", "fedavg-full", "sfprompt", "dp-lora", "ferret", "cellm"):
        return f"{name} has no secure-aggregation layout"
    return None


def layout_for(method: Method, config: MethodConfig, global_state: State) -> SecureLayout:
    """The agreed vector for this method and round (node and coordinator call it alike)."""
    reason = secure_refusal(method, config)
    if reason:
        raise UpdateError(reason)
    if method.name == "ferret":
        from confide.node.methods.ferret import group_parameters

        groups = group_parameters(global_state)
        segments = tuple((g.key, g.entries(config)) for g in groups)  # type: ignore[arg-type]
        exact = frozenset(g.key for g in groups if g.exact(config))  # type: ignore[arg-type]
        return SecureLayout("ferret", segments, FERRET_CLIP, weighted=True,
                            dense_segments=exact)
    if method.name == "cellm":
        from confide.node.methods.cellm import shared_positions

        positions = shared_positions(config, global_state)  # type: ignore[arg-type]
        segments = tuple((name, int(positions[name].numel())) for name in sorted(global_state))
        return SecureLayout("positions", segments, DELTA_CLIP, weighted=True,
                            positions=positions)
    segments = tuple((name, int(global_state[name].numel())) for name in sorted(global_state))
    if method.name == "dp-lora" and getattr(config, "unit", "node") == "example":
        # example-level DP-SGD made the training private: the node sends its plain delta,
        # averaged unweighted as dp-lora's aggregate does
        return SecureLayout("dense", segments, DELTA_CLIP, weighted=False)
    if method.name == "dp-lora":
        sigma = method.noise_multiplier(config)  # type: ignore[attr-defined]
        clip_norm = float(config.clip_norm)  # type: ignore[attr-defined]
        clip = clip_norm * (1.0 + DP_TAIL_SIGMAS * sigma)
        if getattr(config, "mode", "local") == "distributed":
            return SecureLayout("dense", segments, clip, weighted=False,
                                distributed_noise=(sigma, clip_norm))
        return SecureLayout("dense", segments, clip, weighted=False)
    return SecureLayout("dense", segments, DELTA_CLIP, weighted=True)


def flatten_update(layout: SecureLayout,
                   payload: Mapping[str, WireTensor]) -> tuple[np.ndarray, int]:
    """Node side: the update as the layout's float64 vector, clipped to ``layout.clip``, and
    how many entries the clip changed (reported, never silent)."""
    parts = []
    for name, size in layout.segments:
        value = payload.get(name)
        if value is None:
            raise UpdateError(f"the update has no {name!r}, which the layout needs")
        if layout.kind == "ferret" and name not in layout.dense_segments:
            if not isinstance(value, SeedProjectedTensor):
                raise UpdateError(f"{name} must be seed-projected")
            coefficients = np.zeros(size, dtype=np.float64)
            given = np.asarray(value.coefficients, dtype=np.float64)
            if given.size > size:
                raise UpdateError(f"{name} carries {given.size} coefficients, at most {size}")
            coefficients[:given.size] = given
            parts.append(coefficients)
        else:
            dense = to_dense(value).detach().to(torch.float64).reshape(-1)
            if layout.positions is not None:
                dense = dense[layout.positions[name]]
            dense = dense.numpy()
            if dense.size != size:
                raise UpdateError(f"{name} has {dense.size} entries, the layout {size}")
            parts.append(dense)
    vector = np.concatenate(parts) if parts else np.zeros(0)
    if not np.all(np.isfinite(vector)):
        raise UpdateError("the update holds NaN or infinity")
    clipped = int(np.count_nonzero(np.abs(vector) > layout.clip))
    return np.clip(vector, -layout.clip, layout.clip), clipped


def mean_update(method: Method, config: MethodConfig, layout: SecureLayout, global_state: State,
                mean: np.ndarray, weight_total: int,
                name: str = "secure-aggregate") -> ClientUpdate:
    """Coordinator side: the weighted mean as one update the method aggregates as usual."""
    if mean.shape != (layout.dim,):
        raise UpdateError(f"the mean has {mean.size} entries, the layout {layout.dim}")
    payload: dict[str, WireTensor] = {}
    offset = 0
    if layout.kind == "ferret":
        from confide.node.methods.ferret import GENERATOR, ROUND_KEY, round_tag, state_digest

        sizes = {g.key: g.size for g in _ferret_groups(global_state)}
        payload[ROUND_KEY] = round_tag(state_digest(global_state))
        for key, count in layout.segments:
            if key in layout.dense_segments:  # an exact group: its mean delta
                payload[key] = torch.from_numpy(mean[offset:offset + count].copy()).to(
                    torch.float32)
                offset += count
                continue
            payload[key] = SeedProjectedTensor(
                shape=(sizes[key],), dtype=torch.float32, seeds=tuple(range(count)),
                coefficients=tuple(float(c) for c in mean[offset:offset + count]),
                generator=GENERATOR)
            offset += count
    elif layout.positions is not None:
        for key, size in layout.segments:
            reference = global_state[key]
            payload[key] = SparseTensor(
                shape=tuple(reference.shape), indices=layout.positions[key],
                values=torch.from_numpy(mean[offset:offset + size].copy()).to(reference.dtype))
            offset += size
    else:
        for key, size in layout.segments:
            reference = global_state[key]
            payload[key] = torch.from_numpy(mean[offset:offset + size].copy()).reshape(
                reference.shape).to(reference.dtype)
            offset += size
    method_check = getattr(method, "check_update", None)
    if method_check is not None:
        method_check(config, global_state, payload)
    # weight 1 per node (dp-lora) or the total examples: either way one update with the mean
    return ClientUpdate(name, payload, max(int(weight_total), 1))


def _ferret_groups(global_state: State) -> list:
    from confide.node.methods.ferret import group_parameters

    return group_parameters(global_state)
