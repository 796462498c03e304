"""Federated rounds: the coordinator holds the global state and aggregates.

Per round: choose the round's nodes (``NodePool``), send each the task and the global state,
gather their updates under the round deadline (``gather_updates``), validate each once with
the method's ``check_update`` (a rejected update is dropped with its reason: never counted,
never paid), aggregate the rest with the method's pure ``aggregate_compact`` and commit the
new global state. Everything committed goes through the ``Store``, so a restarted
coordinator resumes at the first round that was not committed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confide.coordinator.anonymous import AnonymousInbox, AnonymousUpdate
from confide.coordinator.job import JobFailed, JobStopped, RunningJob, weighted_metrics
from confide.coordinator.node_pool import NodePool
from confide.coordinator.secure_rounds import SecureRound
from confide.coordinator.sessions import NodeSession, TaskOutcome
from confide.coordinator.store import RoundRecord
from confide.node.methods import ClientUpdate, FederatedMethod
from confide.node.methods.base import State
from confide.protos.codec import CodecError, WireTensor, to_dense
from confide.protos.state import STATE_DIGEST_FEATURE, state_digest
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactBroadcast:
    """The last aggregation in a method's compact form: applied by a node to the global state
    with digest ``base``, it gives the state with digest ``digest``."""

    base: bytes
    digest: bytes
    payload: dict[str, WireTensor]


class FederatedRounds:
    def __init__(self, job: RunningJob, pool: NodePool, inbox: AnonymousInbox) -> None:
        assert isinstance(job.method, FederatedMethod)
        self.job = job
        self.spec = job.spec
        self.method: FederatedMethod = job.method
        self.pool = pool
        self.inbox = inbox
        #: kept in memory only: after a restart every node gets the whole state once
        self.broadcast: CompactBroadcast | None = None
        #: digest of the job's seeded initial state, which every node can build itself
        self.seeded_digest = b""
        #: node id -> the state that node trains from, when the method sends each node its
        #: own downlink (``keeps_node_states``); memory only, like ``broadcast``
        self.node_states: dict[str, State] = {}

    async def run(self) -> None:
        """Every round from the first one not committed to the job's last."""
        if self.spec.anonymous:
            self.pool.fix_ring()
        latest = self.job.store.latest_global(self.job.job_id)
        if latest is None:
            state = await self.initial_state()
            self.job.store.save_global(self.job.job_id, 0, state)
            first_round = 1
        else:
            first_round, state = latest[0] + 1, latest[1]
        if first_round == 1:
            self.seeded_digest = state_digest(state)
        for round_number in range(first_round, self.spec.rounds + 1):
            state = await self.run_round(round_number, state)

    async def initial_state(self) -> State:
        """Ask one node to build the model from the spec and upload its initial trainable
        state (as Flower does), so the coordinator never needs the model itself."""
        reasons = []
        refused: set[str] = set()  # a node whose owner refused is not asked again
        for _attempt in range(3):
            trainers = await self.pool.wait_for_trainers(1)
            (session,) = random.sample([s for s in trainers if s.node_id not in refused]
                                       or trainers, 1)
            task = self.job.new_task(pb.INIT, 0, has_global=False)
            outcome = await session.run_task(task, None, self.spec.round_timeout_s)
            if outcome.ok:
                try:
                    if not isinstance(outcome.payload, dict):
                        raise CodecError("the node sent no tensor map")
                    state = {k: to_dense(v) for k, v in outcome.payload.items()}
                except CodecError as exc:
                    reasons.append(f"{outcome.node_id}: invalid initial state: {exc}")
                    continue
                self.job.events.emit(
                    self.job.job_id,
                    "job.initialized",
                    node_id=outcome.node_id,
                    message=f"{len(state)} trainable tensors, "
                    f"{sum(t.numel() for t in state.values()):,} parameters",
                    bytes_up=outcome.bytes_up,
                    bytes_down=outcome.bytes_down,
                )
                return state
            reasons.append(f"{outcome.node_id}: {outcome.reason}")
            if outcome.refused:
                refused.add(outcome.node_id)
        raise JobFailed("could not initialize the model: " + "; ".join(reasons))

    # ------------------------------------------------------------------ one round

    async def run_round(self, round_number: int, state: State) -> State:
        job = self.job
        started = time.monotonic()
        selected, payments, population = await self.pool.choose(round_number)
        reason = self.method.before_round(job.config, round_number, population, len(selected))
        if reason:
            job.events.emit(job.job_id, "job.stopped", round_number=round_number,
                            message=reason)
            raise JobStopped(f"stopped before round {round_number}: {reason}")
        infos = self.pool.infos()  # once per round: the registry can hold thousands
        if self.spec.anonymous:
            self.pool.fix_round_ring(round_number, selected, infos)
        record = RoundRecord(round=round_number, state="running",
                             selected=[s.node_id for s in selected])
        job.store.save_round(job.job_id, record)
        if self.spec.anonymous:  # uploads are accepted for this round only, at most one each
            self.inbox.open_round(job.job_id, round_number, len(selected))
        job.events.emit(job.job_id, "round.started", round_number=round_number,
                        message=f"{len(selected)} node(s): " + ", ".join(record.selected))
        digest = state_digest(state)
        if self.spec.secure_aggregation:  # the masked inputs' sum replaces gather + validate
            updates, accepted, delivered = await SecureRound(self).run(
                record, state, digest, selected, infos, started)
        else:
            outcomes, delivered = await self.gather_updates(record, state, digest, selected,
                                                            infos, started)
            updates, accepted = self.validate(record, state, outcomes, infos)
            record.participants = [u.node_id for u in updates]
        if payments:  # pay the winners whose work was used, at their critical values
            self.pool.pay(round_number, payments, delivered, set(record.participants))
        record.metrics = weighted_metrics(accepted)
        record.seconds = time.monotonic() - started
        if len(record.participants) < self.spec.min_nodes:
            job.fail_round(record, f"{len(record.participants)} of {len(selected)} node(s) "
                                   "returned a valid update")
        return self.commit(record, state, digest, updates, population, len(selected))

    async def gather_updates(
        self, record: RoundRecord, state: State, digest: bytes,
        selected: Sequence[NodeSession], infos: dict[str, pb.NodeInfo], started: float,
    ) -> tuple[list[TaskOutcome], set[str]]:
        """Train the selected nodes from ``state`` and gather what they send under the round
        deadline: the outcomes whose payloads are then validated and aggregated, and the
        nodes that said "done" (a payment needs it). Every byte is counted on ``record``.
        The one place updates arrive: a protocol that changes how (secure aggregation's
        extra phases over the session stream) replaces this method."""
        round_number = record.round
        payload = state  # streamed to each node from the tensors themselves
        peers = [await self.pool.split_server()] if self.method.needs_split_server else []
        builders = {node_id for node_id, info in infos.items()
                    if STATE_DIGEST_FEATURE in info.features}
        outcomes = list(await asyncio.gather(
            *(self._train_on(session, round_number, payload, peers, digest,
                             session.node_id in builders)
              for session in selected)
        ))
        for outcome in outcomes:
            record.bytes_up += outcome.bytes_up
            record.bytes_down += outcome.bytes_down
        delivered = {o.node_id for o in outcomes if o.ok}
        if not self.spec.anonymous:
            return outcomes, delivered
        # the sessions only said "done"; the updates came through the anonymous call
        for outcome in outcomes:
            if not outcome.ok:
                record.dropped[outcome.node_id] = outcome.reason
        remaining = self.spec.round_timeout_s - (time.monotonic() - started)
        await self.inbox.wait_for(self.job.job_id, round_number, len(delivered), remaining)
        updates = self.inbox.take(self.job.job_id, round_number)
        self.job.events.emit(self.job.job_id, "round.anonymous", round_number=round_number,
                             message=f"{len(updates)} anonymous update(s) verified",
                             metrics={"updates": len(updates),
                                      "verify_s": sum(u.verify_s for u in updates),
                                      "verify_cpu_s": sum(u.verify_cpu_s for u in updates)})
        outcomes = [self._anonymous_outcome(u) for u in updates]
        for outcome in outcomes:
            record.bytes_up += outcome.bytes_up
        return outcomes, delivered

    def validate(self, record: RoundRecord, state: State, outcomes: Sequence[TaskOutcome],
                 infos: dict[str, pb.NodeInfo]) -> tuple[list[ClientUpdate], list[TaskOutcome]]:
        """The updates that count this round (and their outcomes): each decoded and checked
        once by the method's ``check_update``; a failed or bad one is dropped with its
        reason."""
        caps = self._example_caps(record.round, infos)
        updates: list[ClientUpdate] = []
        accepted: list[TaskOutcome] = []
        for outcome in outcomes:
            update = self._accept(outcome, state, record, caps)
            if update is not None:
                updates.append(update)
                accepted.append(outcome)
        return updates, accepted

    def commit(self, record: RoundRecord, state: State, digest: bytes,
               updates: Sequence[ClientUpdate], population: int, selected: int) -> State:
        """Aggregate, store the new global state and complete the round."""
        job, round_number = self.job, record.round
        new_state, compact = self.method.aggregate_compact(job.config, state, updates,
                                                           round_number)
        self.broadcast = None
        if compact is not None:
            self.broadcast = CompactBroadcast(base=digest, digest=state_digest(new_state),
                                              payload=dict(compact))
        record.metrics.update(
            self.method.round_metrics(job.config, round_number, population, selected))
        job.store.save_global(job.job_id, round_number, new_state)
        record.state = "completed"
        job.store.save_round(job.job_id, record)
        job.events.emit(
            job.job_id,
            "round.completed",
            round_number=round_number,
            message=f"{len(record.participants)} update(s) aggregated"
                    + (" securely" if record.secure_aggregation else "")
                    + f" in {record.seconds:.1f}s",
            metrics=record.metrics,
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
        )
        return new_state

    # ------------------------------------------------------------------ one node

    async def _train_on(self, session: NodeSession, round_number: int, payload: State,
                        peers: Sequence[pb.Peer], digest: bytes, builds: bool) -> TaskOutcome:
        """One node's TRAIN task. The global state goes down whole, or not at all when it is
        the job's seeded initial state (the node builds it as INIT does), or, when the method
        has a compact broadcast and the node kept the state it builds on, in that compact
        form (Ferret: the mean scalars), or, when the method sends each node its own
        downlink (``keeps_node_states``: CELLM's sparse downlink), as what that node's held
        state lacks; the node then trains from the state it rebuilds, whose digest the task
        carries; ``builds``: the node speaks that part of the wire
        (``STATE_DIGEST_FEATURE``). A node that cannot get the same bits (its digest differs)
        gets the whole state in the time left."""
        timeout = self.spec.round_timeout_s
        job_id = self.job.job_id

        def task() -> pb.Task:
            t = self.job.new_task(pb.TRAIN, round_number, has_global=True)
            t.peers.extend(peers)
            t.anonymous = self.spec.anonymous
            t.global_digest = digest
            return t

        cheap: tuple[pb.Task, dict[str, WireTensor] | None] | None = None
        holds = payload  # the state the node trains from, once its task succeeds
        compact = self.broadcast
        held = self.node_states.get(session.node_id)
        if builds and digest == self.seeded_digest:
            first = task()
            first.has_global = False
            first.global_from_seed = True
            cheap = (first, None)
        elif (builds and compact is not None and compact.digest == digest
                and session.held_states.get(job_id) == compact.base):
            first = task()
            first.global_base_digest = compact.base
            cheap = (first, compact.payload)
        elif (builds and held is not None
                and session.held_states.get(job_id) == state_digest(held)):
            own = self.method.node_downlink(self.job.config, payload, held)
            if own is not None:
                first = task()
                first.global_base_digest = session.held_states[job_id]
                first.global_digest = state_digest(own[1])
                cheap, holds = (first, own[0]), own[1]
        spent: TaskOutcome | None = None
        if cheap is not None:
            spent = await session.run_task(*cheap, timeout,
                                           expects_payload=not self.spec.anonymous)
            if spent.ok or not spent.needs_full_state:
                self._held(session, spent, cheap[0].global_digest, holds)
                return spent
            log.info("job %s round %d: %s could not build the global state itself (%s); "
                     "sending the whole state", job_id, round_number, session.node_id,
                     spent.reason)
            timeout = max(1.0, timeout - spent.seconds)
        outcome = await session.run_task(task(), payload, timeout,
                                         expects_payload=not self.spec.anonymous)
        if spent is not None:
            outcome.bytes_down += spent.bytes_down
            outcome.bytes_up += spent.bytes_up
            outcome.seconds += spent.seconds
        self._held(session, outcome, digest, payload)
        return outcome

    def _held(self, session: NodeSession, outcome: TaskOutcome, digest: bytes,
              state: State) -> None:
        """A node that trained from the state keeps it: the base of the next broadcast (and,
        when the method sends each node its own downlink, of that node's next one)."""
        if outcome.ok:
            session.held_states[self.job.job_id] = digest
            if self.method.keeps_node_states(self.job.config):
                self.node_states[session.node_id] = dict(state)
        else:
            session.held_states.pop(self.job.job_id, None)
            self.node_states.pop(session.node_id, None)

    @staticmethod
    def _anonymous_outcome(update: AnonymousUpdate) -> TaskOutcome:
        """An anonymous update, named by its link tag: the coordinator knows no more."""
        return TaskOutcome(node_id="anon-" + update.key_image.hex()[:16], task_id="",
                           ok=True, payload=update.payload, num_examples=update.num_examples,
                           bytes_up=update.bytes_up)

    def _example_caps(self, round_number: int,
                      infos: dict[str, pb.NodeInfo]) -> dict[str, int]:
        """A node's example count is self-reported and weights its update: the cap of each
        node is the dataset size it registered, and of an anonymous update ("" here) the
        largest registered by a member of the round's ring, so one node cannot claim the
        whole average."""
        dataset = self.spec.train.dataset
        caps = {node_id: int(info.datasets.get(dataset, 0)) for node_id, info in infos.items()}
        # a node whose policy hides its datasets registered no size: its cap is the largest
        # any visible node registered, or 1 (equal weights) when none did
        largest = max(caps.values(), default=0) or 1
        for node_id, info in infos.items():
            if info.dataset_disclosure == "hidden":
                caps[node_id] = largest
        if self.spec.anonymous:
            ring = set(self.job.store.ring(self.job.job_id, round_number))
            caps[""] = max((int(i.datasets.get(dataset, 0)) for i in infos.values()
                            if i.ring_public_key in ring), default=0)
        return caps

    @staticmethod
    def _capped(outcome: TaskOutcome, caps: dict[str, int]) -> int:
        """The example count an update is weighted by: what the node claims, at most its
        cap (0 for a node that registered no example of the job's dataset)."""
        cap = caps.get(outcome.node_id, caps.get("", 0))
        return min(int(outcome.num_examples), cap)

    def _accept(self, outcome: TaskOutcome, state: State, record: RoundRecord,
                caps: dict[str, int]) -> ClientUpdate | None:
        """Decode and check one node's update; a bad one is dropped, never aggregated."""
        reason = outcome.reason
        update = None
        if outcome.ok:
            try:
                decoded = outcome.payload or {}
                if not isinstance(decoded, dict):
                    raise CodecError("the node sent raw bytes, not a tensor map")
                self.method.check_update(self.job.config, state, decoded)
                update = ClientUpdate(outcome.node_id, decoded, self._capped(outcome, caps))
            except (CodecError, ValueError) as exc:
                reason = f"invalid update: {exc}"
        if update is None:
            self.job.drop(record, outcome.node_id, reason, bytes_up=outcome.bytes_up,
                          bytes_down=outcome.bytes_down, refused=outcome.refused)
            return None
        self.job.events.emit(
            self.job.job_id,
            "node.done",
            round_number=record.round,
            node_id=outcome.node_id,
            message=f"{outcome.num_examples} examples in {outcome.seconds:.1f}s",
            metrics=outcome.metrics,
            bytes_up=outcome.bytes_up,
            bytes_down=outcome.bytes_down,
        )
        return update
