"""CELLM: federated LoRA with a sparse, error-compensated uplink.

Raje, "Communication-Efficient LLM Training for Federated Learning" (CMU M.S. thesis
CMU-CS-24-123, 2024; posted as "CELLM: An Efficient Communication in Large Language Models
Training for Federated Learning", arXiv 2407.20557), which grows out of FLASC (Kuo, Raje,
Rajesh, Smith, "Federated LoRA with Sparse Communication", arXiv 2406.05233): train dense LoRA
locally, communicate sparse. The error feedback is the top-k lineage's: Aji & Heafield,
"Sparse Communication for Distributed Gradient Descent" (EMNLP 2017) and Stich, Cordonnier &
Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018). As this module runs it:

    Job parameters: rho = density in (0, 1], scope ("global" or "tensor"), error_feedback,
    value_dtype ("float32", "float16" or "bfloat16"), selection, rho_down = downlink_density
    in (0, 1].
    Trainable state w: the LoRA A and B matrices and the task head (``trainable = "lora"``).

    Node i (client_update), after local training moved w_{r-1} to w_i:
        1. D = w_i - w_{r-1}          (per tensor, in the state's dtype: FedAvg-LoRA's delta)
        2. if error_feedback: D += e_i  (e_i: the residual this node kept last time, 0 at first)
        3. S = the positions of the k largest |D|:
              scope "global": K = clamp(round(rho * n), 1, n) over all n entries at once
              scope "tensor": k_t = clamp(round(rho * n_t), 1, n_t) in every tensor t
        4. send, per tensor, D restricted to S as SparseTensor(indices, values), the values
           rounded to ``value_dtype``; a tensor whose sparse encoding would cost at least as
           many bytes as the whole tensor goes dense instead (all of it is then in S)
        5. e_i = D - sent (the entries outside S, and the rounding of those in S), kept in
           the node's job memory (it never leaves the node); so sent + e_i == D exactly.

    Coordinator (check_update, aggregate):
        6. drop an update whose names or shapes differ from w_{r-1}, that is neither dense
           nor sparse, whose indices are out of range or repeated, or whose values are not
           finite floats (the codec already rejects bad indices on decode; this repeats the
           check for payloads that never crossed the wire)
        7. w_r = w_{r-1} + sum_i n_i dense(update_i) / sum_i n_i
           (n_i: node i's examples; FedAvg-LoRA's step, unchanged)

    Downlink (``downlink_density`` rho_down < 1; 1, the default, sends w_r whole). The
    coordinator keeps, per node i, the state h_i that node trained from last time (``node_
    downlink``; in memory: after a restart, or when i missed a round's task, i gets w_r whole
    once, and the first round costs nothing: every node builds the seeded state). Node i's
    next task then carries, instead of w_r:
        8. U = w_r - h_i: everything i has not received, this round's steps and every entry
           an earlier sparse downlink left out (the downlink's error feedback, with no
           residual to keep: h_i is known)
        9. S_down = the positions of the k largest |U| (rho_down, in the job's scope; only
           where U != 0), sent as w_r's *values* there (float32: the node copies them, so both
           sides hold the same bits); a tensor whose sparse form costs at least its dense
           bytes goes whole, as in step 4
       10. node i: h_i <- h_i with w_r's values at S_down (``apply_compact``), checked against
           the digest the coordinator computed for it; i trains from h_i and its delta (step
           1) is measured from h_i, so w_{r+1} = w_r + the mean of deltas each taken from what
           its node held (FLASC's rule: clients fine-tune from the sparse download and the
           server adds their updates to its dense adapter).
    Where this departs from FLASC (Kuo et al. 2024, arXiv 2406.05233), as we read it: FLASC
    sparsifies the global adapter itself for every client, stateless (cross-device clients
    come and go); here nodes stay in a job, so the downlink carries the largest *changes* since what
    the node holds, and what it leaves out is sent later instead of being lost. It cannot be
    used with ``selection = "shared-random"``: those positions are drawn from the digest of
    the state a node trains from, which must then be the same at every node.

Why global by default. Measured, not assumed: per-tensor top-k gives every tensor the same
share, but LoRA's tensors do not need the same share. B starts at zero, A from a random init,
and the new task head has the most to learn: a global threshold spends the budget where the
update is (early on, mostly the head), per-tensor starves it. On the tiny BERT (4 nodes with
2 of 4 labels each, 3 seeds, mean accuracy after 10 / 20 rounds): fedavg-lora 0.809 / 0.965;
density 0.1 tensor 0.809 / 0.970, global 0.846 / 0.982; density 1/30 tensor 0.357 / 0.853,
global 0.546 / 0.931. Global top-k is also the textbook form (Stich et al. select over the
whole vector). ``scope = "tensor"`` remains for when every tensor must move every round, or
the bytes per tensor must not depend on the data. (MiniLM figures: the README's
``confide bench federated`` table.)

Bytes. An entry costs its value plus its position. The codec sends the kept positions in the
smallest of its encodings (``protos.codec.encode_positions``): gaps between increasing
positions as one byte each when they are under 256 (density 0.1 leaves gaps of about 10), two
bytes under 2^15, or a bitmap of one bit per element when more than about 1 in 8 entries is
kept. A float32 entry thus costs about 5 bytes against 4 dense, and density rho sends about
1.25 rho of the dense bytes (0.1 -> ~1/8), plus framing. ``value_dtype`` float16 or bfloat16
halves the values (about 3 bytes per entry: 0.1 -> ~1/13); the rounding error is kept in the
residual like the unsent entries, so with error feedback it is sent in a later round. Step 4
compares the exact encoded sizes, so a tensor goes dense only where that costs no more. For
the tiny BERT of the tests (4,226 adapter entries in 10 tensors) ``tests/unit/test_cellm.py``
measures the ratio. The downlink is the dense global adapter (none in the first round: each
node builds the seeded one) unless ``downlink_density`` < 1 (steps 8-10): then about 1.25
rho_down of it per round, plus framing.

Exactness. At rho = 1 (and float32 values) every tensor goes dense with D = w_i - w_{r-1} (the
residual is all zero and is not added), so the payload, and the aggregate, are bit-identical
to FedAvg-LoRA's.

What we take from the paper and what not. We do what CELLM and FLASC share: dense local LoRA
training, top-k sparsification of the communicated adapter update by magnitude, and
FedAvg-style aggregation of the densified updates, and, with ``downlink_density`` < 1, a sparse
download with its own density (FLASC's d_down; our form: the largest changes since the node's
last state, see "Downlink"). We do not search rank x density configurations (the job chooses
both; ``confide bench federated`` sweeps them at equal bytes). Error feedback is added from the
lineage above at the issue's request; we do not claim the paper keeps a residual.

Caveats. The residual is updated when the update is sent: if the coordinator then drops the
update (a timeout, a failed round), the sent entries are lost, as a dropped FedAvg-LoRA update
would be, while the residual survives. A node that sits out rounds keeps its residual and adds
it to its next delta, which is then measured from a newer global state (the usual error
feedback with partial participation). Positions of the largest changes are visible on the
wire, which is no more than a dense update reveals; this method adds no privacy of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from confide.node.methods.base import (
    ClientUpdate,
    FederatedMethod,
    MethodConfig,
    State,
    UpdateError,
    weighted_mean_of_deltas,
)
from confide.protos.codec import SparseTensor, WireTensor, to_dense, wire_size
from confide.protos.state import state_digest

log = logging.getLogger(__name__)

SCOPES = ("global", "tensor")
#: "topk": each node its own largest entries; "shared-random": the same random positions at
#: every node, drawn from the round's global state (what secure aggregation can sum)
SELECTIONS = ("topk", "shared-random")

RESIDUAL_PREFIX = "residual/"
"""Memory key prefix of the error-feedback residual of one tensor (node side only)."""

_INT32_MAX = (1 << 31) - 1

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""What the kept values may travel as (``value_dtype``): the rounding goes to the residual."""


@dataclass(frozen=True)
class CELLMConfig(MethodConfig):
    """CELLM's job parameters.

    ``density`` rho in (0, 1]: the fraction of a tensor's entries (scope "tensor") or of the
    whole update's (scope "global") sent each round; 1 sends everything (FedAvg-LoRA).
    ``scope``: "global" (top-k over the whole update) or "tensor" (top-k in every tensor).
    ``error_feedback``: keep what was not sent at the node and add it to the next delta.
    ``value_dtype``: "float32" (exact), "float16" or "bfloat16": the sent values are rounded to
    it and the rounding error stays in the residual (with error feedback it is sent later).
    ``selection``: "topk" (each node its own largest entries: the thesis's method) or
    "shared-random" (random-k with memory: every node keeps the same positions, drawn from the
    digest of the round's global state; they reveal nothing about any node's data, and a
    masked sum can carry them, so this is the form secure aggregation takes).
    ``downlink_density`` in (0, 1]: the fraction of entries each node's task carries down,
    the largest changes since the state that node holds (1: the whole global state).
    """

    density: float = 0.1
    scope: str = "global"
    error_feedback: bool = True
    value_dtype: str = "float32"
    selection: str = "topk"
    downlink_density: float = 1.0


def keep_count(density: float, numel: int) -> int:
    """k = clamp(round(density * numel), 1, numel); 0 for an empty tensor."""
    if numel <= 0:
        return 0
    return min(numel, max(1, round(density * numel)))


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_MAX else torch.int64


def _topk_positions(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions (ascending, int64) of the ``k`` largest entries of a 1-D tensor."""
    if k >= magnitude.numel():
        return torch.arange(magnitude.numel(), dtype=torch.int64)
    positions = torch.topk(magnitude, k, sorted=False).indices
    return torch.sort(positions).values.to(torch.int64)


def _rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in the wire dtype, or as they are when that dtype cannot hold them (a
    float16 overflow): rounding may lose precision, never turn a value into infinity."""
    if dtype == values.dtype:
        return values
    narrow = values.to(dtype)
    return narrow if bool(torch.isfinite(narrow).all()) else values


def shared_positions(config: CELLMConfig, global_state: State) -> dict[str, torch.Tensor]:
    """``selection = "shared-random"``: per tensor, ascending flat positions drawn uniformly
    without replacement from the digest of the round's global state (node and coordinator
    hold the same, digest-checked state): as many as top-k would keep, in the same scope."""
    names = sorted(global_state)
    seed = int.from_bytes(state_digest(global_state, person=b"confide-cellm")[:8], "little")
    generator = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    sizes = [global_state[name].numel() for name in names]
    if config.scope == "tensor":
        return {name: torch.sort(torch.randperm(size, generator=generator)[
            :keep_count(config.density, size)]).values for name, size in zip(names, sizes,
                                                                             strict=True)}
    total = sum(sizes)
    chosen = torch.sort(torch.randperm(total, generator=generator)[
        :keep_count(config.density, total)]).values if total else torch.empty(0, dtype=torch.int64)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, size in zip(names, sizes, strict=True):
        out[name] = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
        offset += size
    return out


class CELLM(FederatedMethod):
    name = "cellm"
    config_class = CELLMConfig

    # ------------------------------------------------------------------ parameters

    def validate_config(self, config: MethodConfig) -> None:
        assert isinstance(config, CELLMConfig)
        rho = config.density
        if (
            isinstance(rho, bool)
            or not isinstance(rho, int | float)
            or not math.isfinite(rho)
            or not 0 < rho <= 1
        ):
            raise ValueError(
                f"cellm: density must be a number in (0, 1] (the fraction of entries sent), "
                f"got {rho!r}"
            )
        if config.scope not in SCOPES:
            raise ValueError(
                f"cellm: scope must be one of {', '.join(SCOPES)}, got {config.scope!r}"
            )
        if not isinstance(config.error_feedback, bool):
            raise ValueError(
                f"cellm: error_feedback must be true or false, got {config.error_feedback!r}"
            )
        if config.selection not in SELECTIONS:
            raise ValueError(
                f"cellm: selection must be one of {', '.join(SELECTIONS)}, got "
                f"{config.selection!r}"
            )
        down = config.downlink_density
        if (isinstance(down, bool) or not isinstance(down, int | float)
                or not math.isfinite(down) or not 0 < down <= 1):
            raise ValueError(
                f"cellm: downlink_density must be a number in (0, 1] (the fraction of entries "
                f"sent down; 1: the whole state), got {down!r}"
            )
        if down < 1 and config.selection == "shared-random":
            raise ValueError(
                "cellm: downlink_density < 1 needs selection 'topk': shared-random positions "
                "come from the digest of the state a node trains from, and with a sparse "
                "downlink the nodes hold different states"
            )
        if config.value_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"cellm: value_dtype must be one of {', '.join(VALUE_DTYPES)}, got "
                f"{config.value_dtype!r}"
            )

    # ------------------------------------------------------------------ node side

    def client_update(
        self,
        config: MethodConfig,
        global_state: State,
        local_state: State,
        memory: dict[str, torch.Tensor],
    ) -> dict[str, WireTensor]:
        assert isinstance(config, CELLMConfig)
        differ = sorted(set(global_state) - set(local_state))
        if differ:
            raise ValueError(f"the local state lacks tensors of the global state: {differ[:5]}")
        # 1.-2. the delta (FedAvg-LoRA's), plus what earlier rounds did not send
        delta: State = {}
        for name, start in global_state.items():
            d = local_state[name] - start
            if config.error_feedback:
                residual = self._residual(memory, name, d)
                if residual is not None and bool(residual.any()):
                    d = d + residual
            if not bool(torch.isfinite(d).all()):
                raise ValueError(
                    f"cellm: the update of {name!r} holds NaN or infinity (did local training "
                    "diverge? try a lower learning rate); nothing was sent or remembered"
                )
            delta[name] = d
        # 3. which entries go
        shared = config.selection == "shared-random"
        kept = shared_positions(config, global_state) if shared else self._selection(config,
                                                                                      delta)
        # 4.-5. encode, and keep the rest
        payload: dict[str, WireTensor] = {}
        wire_dtype = VALUE_DTYPES[config.value_dtype]
        for name, d in delta.items():
            cpu = d.detach().reshape(-1).cpu()
            positions = kept[name]
            sparse = SparseTensor(shape=tuple(d.shape),
                                  indices=positions.to(_index_dtype(cpu.numel())),
                                  values=_rounded(cpu[positions], wire_dtype))
            dense = _rounded(cpu, wire_dtype).reshape(d.shape)
            # everything, for no more bytes (shared positions: only they, unless they are all)
            if (positions.numel() == cpu.numel() if shared
                    else wire_size({name: dense}) <= wire_size({name: sparse})):
                payload[name] = dense
                sent = dense.reshape(-1).to(cpu.dtype)
                residual = cpu - sent
            else:
                payload[name] = sparse
                residual = cpu.clone()
                residual[positions] = cpu[positions] - sparse.values.to(cpu.dtype)
            residual = residual.reshape(d.shape)
            if config.error_feedback:
                memory[RESIDUAL_PREFIX + name] = residual.detach().cpu()
        return payload

    @staticmethod
    def _residual(memory: Mapping[str, torch.Tensor], name: str,
                  delta: torch.Tensor) -> torch.Tensor | None:
        residual = memory.get(RESIDUAL_PREFIX + name)
        if residual is None:
            return None
        if residual.shape != delta.shape or residual.dtype != delta.dtype:
            log.warning(
                "cellm: discarding the residual of %r: it is %s %s, the update %s %s",
                name, residual.dtype, tuple(residual.shape), delta.dtype, tuple(delta.shape),
            )
            return None
        return residual.to(delta.device)

    @staticmethod
    def _selection(config: CELLMConfig, delta: State) -> dict[str, torch.Tensor]:
        """Per tensor, the ascending flat positions of the entries to send (CPU int64)."""
        if config.scope == "tensor":
            return {
                name: _topk_positions(
                    d.detach().reshape(-1).abs().cpu(), keep_count(config.density, d.numel())
                )
                for name, d in delta.items()
            }
        names = list(delta)
        sizes = [delta[name].numel() for name in names]
        total = sum(sizes)
        if total == 0:
            return {name: torch.empty(0, dtype=torch.int64) for name in names}
        magnitude = torch.cat(
            [delta[name].detach().reshape(-1).abs().to("cpu", torch.float64) for name in names]
        )
        chosen = _topk_positions(magnitude, keep_count(config.density, total))
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, size in zip(names, sizes, strict=True):
            inside = chosen[(chosen >= offset) & (chosen < offset + size)]
            out[name] = inside - offset
            offset += size
        return out

    # ------------------------------------------------------------------ downlink

    def keeps_node_states(self, config: MethodConfig) -> bool:
        assert isinstance(config, CELLMConfig)
        return config.downlink_density < 1

    def node_downlink(
        self, config: MethodConfig, global_state: State, held: State
    ) -> tuple[dict[str, WireTensor], State] | None:
        """Steps 8-9: the largest changes since ``held``, as ``global_state``'s values there,
        and the state the node holds after copying them in (step 10)."""
        assert isinstance(config, CELLMConfig)
        if config.downlink_density >= 1 or set(held) != set(global_state) or any(
                held[n].shape != global_state[n].shape or held[n].dtype != global_state[n].dtype
                for n in global_state):
            return None
        change = {name: (global_state[name] - held[name]).detach().cpu()
                  for name in global_state}
        kept = self._selection(dataclasses.replace(config, density=config.downlink_density),
                               change)
        payload: dict[str, WireTensor] = {}
        for name, value in global_state.items():
            flat = value.detach().reshape(-1).cpu()
            positions = kept[name]
            positions = positions[change[name].reshape(-1)[positions] != 0]
            sparse = SparseTensor(shape=tuple(value.shape),
                                  indices=positions.to(_index_dtype(flat.numel())),
                                  values=flat[positions].clone())
            if positions.numel() and wire_size({name: value}) <= wire_size({name: sparse}):
                payload[name] = value.detach().cpu()
            else:
                payload[name] = sparse
        return payload, self.apply_compact(config, held, payload)

    def apply_compact(
        self, config: MethodConfig, global_state: State, payload: Mapping[str, WireTensor]
    ) -> State:
        """Step 10, at the node (and at the coordinator, to know what the node holds): the
        held state with the downlink's values copied in (a dense tensor replaces the whole
        tensor). Copies, no arithmetic: both sides get the same bits."""
        if set(payload) != set(global_state):
            raise UpdateError("the sparse downlink does not name the held state's tensors")
        result: State = {}
        for name, old in global_state.items():
            value = payload[name]
            if tuple(value.shape) != tuple(old.shape):
                raise UpdateError(f"downlink tensor {name!r} has shape {tuple(value.shape)}, "
                                  f"the held state {tuple(old.shape)}")
            if isinstance(value, torch.Tensor):
                result[name] = value.to(old.dtype).clone()
                continue
            if not isinstance(value, SparseTensor):
                raise UpdateError(f"downlink tensor {name!r} is {type(value).__name__}")
            indices = value.indices.to(torch.int64)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= old.numel()):
                raise UpdateError(f"downlink tensor {name!r} has an index out of range")
            flat = old.detach().reshape(-1).clone()
            flat[indices] = value.values.to(old.dtype)
            result[name] = flat.reshape(old.shape)
        return result

    # ------------------------------------------------------------------ coordinator side

    def check_update(
        self, config: MethodConfig, global_state: State, payload: Mapping[str, WireTensor]
    ) -> None:
        """Names, shapes and finite float values (the base checks), then: dense or sparse
        tensors only, sparse indices 1-D integers, in range and each used once."""
        super().check_update(config, global_state, payload)
        for name, value in payload.items():
            if isinstance(value, torch.Tensor):
                continue
            if not isinstance(value, SparseTensor):
                raise UpdateError(
                    f"tensor {name!r}: cellm sends dense or sparse tensors, got "
                    f"{type(value).__name__}"
                )
            indices = value.indices
            if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
                raise UpdateError(
                    f"tensor {name!r}: sparse indices must be a 1-D integer tensor, got "
                    f"{indices.dtype} {tuple(indices.shape)}"
                )
            if indices.numel() != value.values.numel():
                raise UpdateError(
                    f"tensor {name!r}: {indices.numel()} indices for {value.values.numel()} values"
                )
            if not indices.numel():
                continue
            numel = global_state[name].numel()
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= numel:
                bad = low if low < 0 else high
                raise UpdateError(
                    f"tensor {name!r}: sparse index {bad} outside [0, {numel}) for shape "
                    f"{list(value.shape)}"
                )
            if indices.numel() > 1 and bool((torch.sort(indices).values.diff() == 0).any()):
                raise UpdateError(
                    f"tensor {name!r}: a sparse index repeats; each position may appear once"
                )

    def aggregate(
        self,
        config: MethodConfig,
        global_state: State,
        updates: Sequence[ClientUpdate],
        round_number: int,
    ) -> State:
        assert isinstance(config, CELLMConfig)
        if not updates:
            raise UpdateError("cannot aggregate a round without updates")
        deltas = [
            ({name: to_dense(value) for name, value in update.payload.items()},
             float(update.num_examples))
            for update in updates
        ]
        return weighted_mean_of_deltas(global_state, deltas)
