"""One secure-aggregation round in process, with real crypto: seconds and bytes per phase.

``simulate_round`` plays ``n`` lightweight nodes and the server through the four phases, every
message going through ``to_bytes`` / ``from_bytes`` (so the byte counts are the wire sizes of
this encoding; protobuf framing will add a few bytes per message), drops a fraction of the nodes
after a chosen phase, and checks the result against the plain sum. ``confide bench secagg``
(``bench/secagg.py``) calls it for 3/10/50/100 nodes and 0/10/30% dropout and prints the table.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.privacy.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyBundle,
    MaskedInput,
    Setup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.privacy.secagg.protocol import SecAggClient, SecAggServer, codec_of

__all__ = ["DROPOUT_PHASES", "PHASES", "RoundReport", "simulate_round"]

PHASES = ("advertise", "share_keys", "masked_input", "unmask")
DROPOUT_PHASES = ("after_advertise", "after_share_keys", "after_masked_input")
LORA_ADAPTER_ENTRIES = 75_653
"""Float32 entries of the MiniLM LoRA adapter (r=8 on q/v + the head) the jobs train."""


@dataclass
class RoundReport:
    """Per phase: node seconds (mean and max over the nodes that ran it), server seconds, and
    bytes per node up (node -> server) and down (server -> node, mean over receivers)."""

    n: int
    dim: int
    degree: int
    threshold: int
    dropout: float
    dropout_phase: str
    survivors: int
    exact: bool
    max_abs_error: float
    step: float
    plain_upload_bytes: int
    node_seconds_mean: dict[str, float] = field(default_factory=dict)
    node_seconds_max: dict[str, float] = field(default_factory=dict)
    server_seconds: dict[str, float] = field(default_factory=dict)
    bytes_up_per_node: dict[str, float] = field(default_factory=dict)
    bytes_down_per_node: dict[str, float] = field(default_factory=dict)
    node_key_agreements_max: int = 0
    node_prg_expansions_max: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def simulate_round(n: int, dim: int = LORA_ADAPTER_ENTRIES, dropout: float = 0.0,
                   dropout_phase: str = "after_masked_input", *, degree: int | None = None,
                   threshold: int | None = None, bits: int = 32, max_weight: int = 1000,
                   clip: float = 1.0, seed: int = 0) -> RoundReport:
    """Run one round of ``n`` nodes on random updates of ``dim`` entries; ``round(dropout*n)``
    nodes stop answering after ``dropout_phase``. Raises ``SecAggAbort`` when too few survive.

    ``after_share_keys``: the dropped nodes never send a masked input (not in the sum; the
    server reconstructs their mask keys). ``after_masked_input``: they sent it and vanish before
    unmasking (in the sum; fewer shares to unmask with). ``after_advertise``: they never share."""
    if dropout_phase not in DROPOUT_PHASES:
        raise ValueError(f"dropout_phase is one of {DROPOUT_PHASES}")
    rng = np.random.default_rng(seed)
    ids = [f"node-{i:03d}" for i in range(n)]
    keys = {i: Ed25519PrivateKey.generate() for i in ids}
    public = {i: k.public_key() for i, k in keys.items()}

    def verify(node_id: str, payload: bytes, signature: bytes) -> bool:
        try:
            public[node_id].verify(signature, payload)
        except (InvalidSignature, KeyError):
            return False
        return True

    updates = {i: np.clip(rng.normal(0, 0.05, dim), -clip, clip) for i in ids}
    weights = {i: int(rng.integers(1, max_weight + 1)) for i in ids}
    dropped = set(rng.choice(ids, size=round(dropout * n), replace=False).tolist())

    server = SecAggServer.new_round(job_id="bench", round_=1, participants=ids, dim=dim,
                                    clip=clip, max_weight=max_weight, verify=verify, bits=bits,
                                    degree=degree, threshold=threshold,
                                    expected_dropout=dropout)
    clients = {i: SecAggClient(i, keys[i].sign, verify) for i in ids}
    up: dict[str, list[int]] = {p: [] for p in PHASES}
    down: dict[str, list[int]] = {p: [] for p in PHASES}
    server_seconds = dict.fromkeys(PHASES, 0.0)

    def to_server(phase: str, message, parse, receive) -> None:
        data = message.to_bytes()
        up[phase].append(len(data))
        start = time.perf_counter()
        receive(parse(data))
        server_seconds[phase] += time.perf_counter() - start

    setup_bytes = server.setup.to_bytes()
    down["advertise"] += [len(setup_bytes)] * n
    for i in ids:
        to_server("advertise", clients[i].handle_setup(Setup.from_bytes(setup_bytes)),
                  AdvertiseKeys.from_bytes, server.receive_advertisement)
    bundles = server.close_advertising()
    for i, bundle in bundles.items():
        data = bundle.to_bytes()
        down["share_keys"].append(len(data))
        if dropout_phase == "after_advertise" and i in dropped:
            continue
        to_server("share_keys", clients[i].handle_key_bundle(KeyBundle.from_bytes(data)),
                  ShareKeys.from_bytes, server.receive_shares)
    forwarded = server.close_sharing()
    for i, message in forwarded.items():
        data = message.to_bytes()
        down["masked_input"].append(len(data))
        if dropout_phase == "after_share_keys" and i in dropped:
            continue
        masked = clients[i].handle_forwarded_shares(ForwardedShares.from_bytes(data),
                                                    updates[i], weights[i])
        to_server("masked_input", masked, MaskedInput.from_bytes, server.receive_masked_input)
    request = server.close_masking()
    data = request.to_bytes()
    for i in request.survivors:
        down["unmask"].append(len(data))
        if dropout_phase == "after_masked_input" and i in dropped:
            continue
        to_server("unmask", clients[i].handle_unmask_request(UnmaskRequest.from_bytes(data)),
                  UnmaskResponse.from_bytes, server.receive_unmask)
    result = server.finish()
    for phase in PHASES:
        server_seconds[phase] += server.counters.seconds.get(phase, 0.0)

    codec_step = 2.0**-server.setup.frac_bits
    expected = sum(weights[i] * updates[i] for i in result.survivors)
    codec = codec_of(server.setup)
    ring = np.zeros(dim + 1, dtype=codec.dtype)
    for i in result.survivors:
        ring += codec.encode(updates[i], weights[i])
    report = RoundReport(
        n=n, dim=dim, degree=server.setup.degree, threshold=server.setup.threshold,
        dropout=dropout, dropout_phase=dropout_phase, survivors=len(result.survivors),
        exact=bool(np.array_equal(ring, result.ring_sum)),
        max_abs_error=float(np.max(np.abs(result.weighted_sum - expected))),
        step=codec_step, plain_upload_bytes=dim * 4,
        server_seconds=server_seconds,
        bytes_up_per_node={p: _mean(v) for p, v in up.items()},
        bytes_down_per_node={p: _mean(v) for p, v in down.items()},
        node_key_agreements_max=max(c.counters.key_agreements for c in clients.values()),
        node_prg_expansions_max=max(c.counters.prg_expansions for c in clients.values()))
    for phase in PHASES:
        times = [c.counters.seconds[phase] for c in clients.values() if phase in c.counters.seconds]
        report.node_seconds_mean[phase] = _mean(times)
        report.node_seconds_max[phase] = max(times, default=0.0)
    return report
