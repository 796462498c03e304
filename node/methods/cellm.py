"""CELLM: federated LoRA with a sparse, error-compensated uplink.

Raje, "Communication-Efficient LLM Training for Federated Learning" (CMU M.S. thesis
CMU-CS-24-123, 2024; posted as "CELLM: An Efficient Communication in Large Language Models
Training for Federated Learning", arXiv 2407.20557), which grows out of FLASC (Kuo, Raje,
Rajesh, Smith, "Federated LoRA with Sparse Communication", arXiv 2406.05233): train dense LoRA
locally, communicate sparse. The error feedback is the top-k lineage's: Aji & Heafield,
"Sparse Communication for Distributed Gradient Descent" (EMNLP 2017) and Stich, Cordonnier &
Jaggi, "Sparsified SGD with Memory" (NeurIPS 2018). As this module runs it:

    Job parameters: rho = density in (0, 1], scope ("global" or "tensor"), error_feedback,
    value_dtype ("float32", "float16" or "bfloat16").
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
measures the ratio. The downlink stays the dense global adapter (none in the first round:
each node builds the seeded one).

Exactness. At rho = 1 (and float32 values) every tensor goes dense with D = w_i - w_{r-1} (the
residual is all zero and is not added), so the payload, and the aggregate, are bit-identical
to FedAvg-LoRA's.

What we take from the paper and what not. We do what CELLM and FLASC share: dense local LoRA
training, top-k sparsification of the communicated adapter update by magnitude, and
FedAvg-style aggregation of the densified updates. We do not sparsify the download (FLASC lets
the broadcast of the global adapter be sparse with its own density; here it stays dense), nor
search rank x density configurations (the job chooses both). Error feedback is added from the
lineage above at the issue's request; we do not claim the paper keeps a residual.

Caveats. The residual is updated when the update is sent: if the coordinator then drops the
update (a timeout, a failed round), the sent entries are lost, as a dropped FedAvg-LoRA update
would be, while the residual survives. A node that sits out rounds keeps its residual and adds
it to its next delta, which is then measured from a newer global state (the usual error
feedback with partial participation). Positions of the largest changes are visible on the
wire, which is no more than a dense update reveals; this method adds no privacy of its own.
"""

from __future__ import annotations

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
    """

    density: float = 0.1
    scope: str = "global"
    error_feedback: bool = True
    value_dtype: str = "float32"
    selection: str = "topk"


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
