"""A securely aggregated federated round: the coordinator relays SecAgg+ and learns only the sum.

Plugged into ``FederatedRounds`` where updates arrive (its ``gather_updates`` seam): for a job
with ``secure_aggregation``, ``SecureRound.run`` replaces gather + validate. Per round
(``privacy.secagg`` has the protocol and the threat model, ``node.methods.secure_layout`` the
vector of each method):

    0 setup      SecAggServer.new_round(job, round, selected, dim = the layout's size,
                 clip = its bound, max_weight = the largest registered dataset (or 1))
                 -> Setup + the participants' registered Ed25519 keys, to every selected node;
                 then the TRAIN tasks go out (phases 1-2 run while the nodes train)
    1 advertise  each node's signed keys (checked against its node key)  -> KeyBundles
    2 share keys each node's sealed shares                               -> ForwardedShares
    3 masked in. each TRAIN task's upload is the node's MaskedInput (the plain update never
                 leaves the node); the survivors are those whose masked input arrived
    4 unmask     UnmaskRequest to the survivors -> their shares -> finish(): the sum, then the
                 weighted mean as one update that the method's own aggregation applies

A phase closes when every node expected in it answered or its deadline passed (phases 1, 2
and 4: ``phase_timeout``; phase 3: the round deadline). A node that drops out at any phase
is recorded with its reason; ``SecAggAbort`` (fewer than ``t`` left, or a secret that cannot
be rebuilt) fails the round with the survivor count and nothing unmasked. What the store and
the event log keep of the round: the masked vectors are discarded after summing, the sum is
the new global state; the round record says it was securely aggregated, with the survivor
count and the threshold. Nodes report no example count (it is inside the masked vector) and
no training metrics beyond their seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from confide.coordinator.sessions import NodeSession, TaskOutcome
from confide.coordinator.store import RoundRecord
from confide.node.methods import ClientUpdate
from confide.node.methods.base import State, UpdateError
from confide.node.methods.secure_layout import SecureLayout, layout_for, mean_update
from confide.privacy.secagg import (
    FixedPointCodec,
    MaskingError,
    SecAggAbort,
    SecAggError,
    SecAggServer,
)
from confide.privacy.secagg.messages import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskResponse
from confide.protos.state import STATE_DIGEST_FEATURE
from confide.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from confide.coordinator.federated_rounds import FederatedRounds

log = logging.getLogger(__name__)

EXPECTED_DROPOUT = 0.1
"""The dropout rate the neighbour graph is sized for (``privacy.secagg.default_degree``):
rounds up to ~20 nodes use the complete graph either way."""
MIN_FINE_BITS = 16
"""A 32-bit ring is used when it leaves at least this many fractional bits, else 64 bits."""


def phase_timeout(round_timeout_s: float) -> float:
    """Deadline of the key and unmasking phases: nodes answer them at once, not after
    training, so a quarter of the round deadline, between 5 and 30 seconds."""
    return max(5.0, min(30.0, round_timeout_s / 4))


def ring_bits(max_nodes: int, max_weight: int, clip: float) -> int:
    """32 bits when the sum fits with a fine enough step, else 64 (twice the bytes)."""
    try:
        codec = FixedPointCodec.for_bounds(max_nodes=max_nodes, max_weight=max_weight,
                                           clip=clip, bits=32)
    except MaskingError:
        return 64
    return 32 if codec.frac_bits >= MIN_FINE_BITS else 64


class _PhaseInbox:
    """The messages of the phase in progress: each from an expected node, once, checked by the
    server as it arrives; a bad one counts as that node's answer with its reason."""

    def __init__(self, server: SecAggServer, record: RoundRecord) -> None:
        self.server = server
        self.record = record
        self.phase = ""
        self.expected: set[str] = set()
        self.answered: set[str] = set()
        self.rejected: dict[str, str] = {}
        self.done = asyncio.Event()
        self.bytes_up: dict[str, int] = {}

    def open(self, phase: str, expected: set[str]) -> None:
        self.phase, self.expected, self.answered = phase, set(expected), set()
        self.done.clear()
        if not self.expected:
            self.done.set()

    def receive(self, node_id: str, message: pb.SecAggMessage, size: int) -> None:
        self.record.bytes_up += size
        self.bytes_up[self.phase] = self.bytes_up.get(self.phase, 0) + size
        setup = self.server.setup
        if (message.job_id, message.round) != (setup.job_id, setup.round):
            return  # a late message of another round: it has no bearing here
        if node_id not in self.expected or node_id in self.answered:
            return
        self.answered.add(node_id)
        try:
            parsed = self._parse(bytes(message.payload))
            if parsed.sender != node_id:
                raise SecAggError(f"a message from session {node_id} names sender "
                                  f"{parsed.sender}")
            receive = {"advertise": self.server.receive_advertisement,
                       "share": self.server.receive_shares,
                       "unmask": self.server.receive_unmask}[self.phase]
            receive(parsed)
        except SecAggError as exc:
            self.rejected[node_id] = f"secure aggregation ({self.phase}): {exc}"
        if self.answered >= self.expected:
            self.done.set()

    def _parse(self, payload: bytes):
        kind = {"advertise": AdvertiseKeys, "share": ShareKeys,
                "unmask": UnmaskResponse}.get(self.phase)
        if kind is None:
            raise SecAggError(f"no message is expected in phase {self.phase!r}")
        return kind.from_bytes(payload)

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), timeout)


class SecureRound:
    """One securely aggregated round of ``rounds``' job (see the module docstring)."""

    def __init__(self, rounds: FederatedRounds) -> None:
        self.rounds = rounds
        self.job = rounds.job
        self.spec = rounds.spec

    def _server(self, record: RoundRecord, layout: SecureLayout, ids: list[str],
                infos: dict[str, pb.NodeInfo]) -> SecAggServer:
        store = self.job.store
        keys = {node_id: store.node_key(node_id) for node_id in ids}

        def verify(node_id: str, payload: bytes, signature: bytes) -> bool:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            raw = keys.get(node_id)
            if raw is None or len(raw) != 32:
                return False
            try:
                Ed25519PublicKey.from_public_bytes(raw).verify(signature, payload)
            except InvalidSignature:
                return False
            return True

        self.keys = {k: v for k, v in keys.items() if v is not None}
        dataset = self.spec.train.dataset
        max_weight = 1
        if layout.weighted:
            max_weight = max([int(infos[i].datasets.get(dataset, 0)) for i in ids if i in infos]
                             + [1])
        bits = ring_bits(len(ids), max_weight, layout.clip)
        return SecAggServer.new_round(job_id=self.job.job_id, round_=record.round,
                                      participants=ids, dim=layout.dim, clip=layout.clip,
                                      max_weight=max_weight, verify=verify, bits=bits,
                                      expected_dropout=EXPECTED_DROPOUT)

    def _send(self, record: RoundRecord, session: NodeSession, payload: bytes,
              with_keys: bool = False) -> None:
        message = pb.SecAggMessage(job_id=self.job.job_id, round=record.round, payload=payload)
        if with_keys:
            message.node_keys.update(self.keys)
        with contextlib.suppress(ConnectionError):  # it will not answer: the deadline drops it
            record.bytes_down += session.send(pb.CoordinatorMessage(secagg=message))

    async def run(self, record: RoundRecord, state: State, digest: bytes,
                  selected: Sequence[NodeSession], infos: dict[str, pb.NodeInfo],
                  started: float) -> tuple[list[ClientUpdate], list[TaskOutcome], set[str]]:
        """The round's one update (the weighted mean of the survivors, as the method's own
        update type), the survivors' outcomes (for metrics) and the nodes that delivered."""
        job, rounds = self.job, self.rounds
        layout = layout_for(job.method, job.config, state)
        sessions = {s.node_id: s for s in selected}
        ids = sorted(sessions)
        server = self._server(record, layout, ids, infos)
        inbox = _PhaseInbox(server, record)
        inbox.open("advertise", set(ids))
        for session in selected:
            session.on_secagg = lambda node_id, m, size: inbox.receive(node_id, m, size)
        setup_bytes = server.setup.to_bytes()
        for node_id in ids:
            self._send(record, sessions[node_id], setup_bytes, with_keys=True)
        payload = state  # streamed to each node from the tensors themselves
        peers = [await rounds.pool.split_server()] if rounds.method.needs_split_server else []
        builders = {node_id for node_id, info in infos.items()
                    if STATE_DIGEST_FEATURE in info.features}
        training = {node_id: asyncio.create_task(rounds._train_on(
            sessions[node_id], record.round, payload, peers, digest, node_id in builders))
            for node_id in ids}
        quick = phase_timeout(self.spec.round_timeout_s)
        try:
            await inbox.wait(quick)
            bundles = server.close_advertising()
            self._drop_missing(record, inbox, ids, "advertised no keys")
            inbox.open("share", set(bundles))
            for node_id, bundle in bundles.items():
                self._send(record, sessions[node_id], bundle.to_bytes())
            await inbox.wait(quick)
            forwarded = server.close_sharing()
            self._drop_missing(record, inbox, sorted(bundles), "shared no keys")
            inbox.open("mask", set())
            for node_id, message in forwarded.items():
                self._send(record, sessions[node_id], message.to_bytes())
            for node_id, task in training.items():
                if node_id not in forwarded:  # it cannot mask without the shares: stop it
                    task.cancel()
            outcomes = await self._masked_inputs(record, server, training, sorted(forwarded))
            request = server.close_masking()
            inbox.open("unmask", set(request.survivors))
            for node_id in request.survivors:
                self._send(record, sessions[node_id], request.to_bytes())
            await inbox.wait(quick)
            self._drop_missing(record, inbox, list(request.survivors),
                               "did not answer the unmask request (its input is still summed)",
                               drop=False)
            result = server.finish()
        except SecAggAbort as exc:
            await self._stop(training)
            record.secure_aggregation = True
            record.secagg_threshold = server.setup.threshold
            job.fail_round(record, f"secure aggregation aborted, nothing unmasked: {exc}")
        finally:
            for session in selected:
                session.on_secagg = None
        record.secure_aggregation = True
        record.secagg_survivors = len(result.survivors)
        record.secagg_threshold = server.setup.threshold
        try:
            update = mean_update(job.method, job.config, layout, state, result.mean(),
                                 result.weight_total)
        except (UpdateError, ValueError, SecAggError) as exc:
            job.fail_round(record, f"the securely aggregated mean is invalid: {exc}")
        survivors = set(result.survivors)
        accepted = [o for o in outcomes if o.node_id in survivors]
        for outcome in accepted:
            job.events.emit(job.job_id, "node.done", round_number=record.round,
                            node_id=outcome.node_id,
                            message=f"masked input summed ({outcome.seconds:.1f}s)",
                            bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down)
        job.events.emit(job.job_id, "round.secure_aggregation", round_number=record.round,
                        message=f"sum of {len(survivors)} masked input(s) unmasked (threshold "
                                f"{server.setup.threshold}, {server.setup.degree} neighbours, "
                                f"{server.setup.bits}-bit ring, step 2^-"
                                f"{server.setup.frac_bits})")
        record.participants = sorted(survivors)
        return [update], accepted, {o.node_id for o in outcomes if o.ok}

    async def _masked_inputs(self, record: RoundRecord, server: SecAggServer,
                             training: dict[str, asyncio.Task], expected: list[str]
                             ) -> list[TaskOutcome]:
        """Phase 3: each expected node's TRAIN upload, which must be its MaskedInput."""
        outcomes = []
        for node_id in expected:
            outcome: TaskOutcome = await training[node_id]
            record.bytes_up += outcome.bytes_up
            record.bytes_down += outcome.bytes_down
            outcomes.append(outcome)
            if not outcome.ok:
                self.job.drop(record, node_id, outcome.reason, bytes_up=outcome.bytes_up,
                              bytes_down=outcome.bytes_down)
                continue
            try:
                masked = MaskedInput.from_bytes(outcome.payload or b"")  # raw_update: bytes
                if masked.sender != node_id:
                    raise SecAggError(f"a masked input naming {masked.sender}")
                server.receive_masked_input(masked)
            except SecAggError as exc:
                outcome.ok = False
                self.job.drop(record, node_id, f"invalid masked input: {exc}",
                              bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down)
        await self._stop({k: v for k, v in training.items() if k not in expected})
        return outcomes

    def _drop_missing(self, record: RoundRecord, inbox: _PhaseInbox, expected: Sequence[str],
                      what: str, drop: bool = True) -> None:
        for node_id in expected:
            reason = inbox.rejected.get(node_id)
            if reason is None and node_id not in inbox.answered:
                reason = f"secure aggregation: {what} before the phase deadline"
            if reason is None:
                continue
            if drop:
                self.job.drop(record, node_id, reason)
            else:
                self.job.events.emit(self.job.job_id, "node.dropped", round_number=record.round,
                                     node_id=node_id, message=reason)

    @staticmethod
    async def _stop(training: dict[str, asyncio.Task]) -> None:
        for task in training.values():
            task.cancel()
        for task in training.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

