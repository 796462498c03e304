"""The round engine: one ``JobRunner`` per running job.

For each round it waits until ``min_nodes`` nodes are online, selects the round's nodes,
sends each the task and the global state, gathers their updates under the round deadline,
hands the valid ones to the method's pure ``aggregate`` and commits the new global state.
Everything it commits goes through the ``Store``, so a restarted coordinator resumes a job at
the first round that was not committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.anonymous import AnonymousInbox, AnonymousUpdate
from coordinator.events import EventLog
from coordinator.incentives import Bid, proportional_share
from coordinator.sessions import NodeSession, SessionRegistry, TaskOutcome
from coordinator.store import RoundRecord, Store
from node.methods import ClientUpdate, Method, get_method, method_params
from node.methods.dimat import mixing_weights, neighbours
from protos.codec import CodecError, tensor_map_from_bytes, tensor_map_to_bytes, to_dense
from protos.confide.v1 import coordinator_pb2 as pb
from protos.state import STATE_DIGEST_FEATURE, state_digest

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job cannot go on; the message says why, for the user."""


class JobStopped(Exception):
    """The method ended the job cleanly before a round (e.g. its privacy budget is spent)."""


def weighted_metrics(outcomes: Sequence[TaskOutcome]) -> dict[str, float]:
    """Example-weighted means of the nodes' metrics (each node reports its own)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for outcome in outcomes:
        w = float(max(outcome.num_examples, 1))
        for key, value in outcome.metrics.items():
            totals[key] = totals.get(key, 0.0) + w * value
            weights[key] = weights.get(key, 0.0) + w
    return {key: totals[key] / weights[key] for key in totals}


@dataclass(frozen=True)
class CompactBroadcast:
    """The last aggregation in a method's compact form: applied by a node to the global state
    with digest ``base``, it gives the state with digest ``digest``."""

    base: bytes
    digest: bytes
    payload: bytes


class JobRunner:
    def __init__(
        self,
        job_id: str,
        store: Store,
        sessions: SessionRegistry,
        events: EventLog,
        inbox: AnonymousInbox | None = None,
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.sessions = sessions
        self.events = events
        self.inbox = inbox if inbox is not None else AnonymousInbox()
        status = store.job(job_id)
        if status is None:
            raise KeyError(job_id)
        self.spec = status.spec
        self.method: Method = get_method(self.spec.method)
        self.config = self.method.parse_config(method_params(self.spec))
        self.task: asyncio.Task | None = None
        #: kept in memory only: after a restart every node gets the whole state once
        self.broadcast: CompactBroadcast | None = None
        #: digest of the job's seeded initial state, which every node can build itself
        self.seeded_digest = b""

    def start(self) -> asyncio.Task:
        self.task = asyncio.create_task(self.run(), name=f"job-{self.job_id}")
        return self.task

    async def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.inbox.forget(self.job_id)
        self.store.set_job_state(self.job_id, pb.CANCELLED, reason)
        self.events.emit(self.job_id, "job.cancelled", message=reason, state=pb.CANCELLED)

    # ------------------------------------------------------------------ the job

    async def run(self) -> None:
        status = self.store.job(self.job_id)
        assert status is not None
        resumed = status.rounds_completed > 0 or status.state == pb.RUNNING
        self.store.set_job_state(self.job_id, pb.RUNNING)
        self.events.emit(
            self.job_id,
            "job.started",
            message=f"resumed after round {status.rounds_completed}" if resumed else "",
            state=pb.RUNNING,
        )
        try:
            if self.method.decentralized:
                for round_number in range(status.rounds_completed + 1, self.spec.rounds + 1):
                    await self._run_peer_round(round_number)
                self._complete()
                return
            if self.spec.anonymous:
                self._fix_ring()
            latest = self.store.latest_global(self.job_id)
            if latest is None:
                state = await self._initial_state()
                self.store.save_global(self.job_id, 0, state)
                first_round = 1
            else:
                first_round, state = latest[0] + 1, latest[1]
            if first_round == 1:
                self.seeded_digest = state_digest(state)
            for round_number in range(first_round, self.spec.rounds + 1):
                state = await self._run_round(round_number, state)
            self._complete()
        except JobFailed as exc:
            self.inbox.forget(self.job_id)
            self.store.set_job_state(self.job_id, pb.FAILED, str(exc))
            self.events.emit(self.job_id, "job.failed", message=str(exc), state=pb.FAILED)
            return
        except JobStopped as exc:
            self.store.set_job_state(self.job_id, pb.COMPLETED, str(exc))
            self.events.emit(self.job_id, "job.completed", message=str(exc),
                             state=pb.COMPLETED)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail the job visibly, not hang it
            log.exception("job %s crashed", self.job_id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self.store.set_job_state(self.job_id, pb.FAILED, reason)
            self.events.emit(self.job_id, "job.failed", message=reason, state=pb.FAILED)
            return
        finally:  # the sessions need not remember the states of a job that is over
            for session in self.sessions.online():
                session.held_states.pop(self.job_id, None)

    def _complete(self) -> None:
        self.inbox.forget(self.job_id)
        self.store.set_job_state(self.job_id, pb.COMPLETED)
        self.events.emit(
            self.job_id, "job.completed", round_number=self.spec.rounds, state=pb.COMPLETED
        )

    def _fix_ring(self) -> None:
        """The ring is every registered node's ring key when the job starts (sorted)."""
        if self.store.ring(self.job_id):
            return
        keys = sorted({n.info.ring_public_key for n in self.store.nodes()
                       if len(n.info.ring_public_key) == 32})
        if len(keys) < max(2, self.spec.min_nodes):
            raise JobFailed(f"an anonymous job needs a ring of at least "
                            f"{max(2, self.spec.min_nodes)} registered nodes with ring keys; "
                            f"{len(keys)} registered")
        self.store.save_ring(self.job_id, keys)
        self.events.emit(self.job_id, "job.ring", message=f"ring of {len(keys)} keys fixed")

    def _fix_round_ring(self, round_number: int, selected: Sequence[NodeSession],
                        infos: dict[str, pb.NodeInfo]) -> None:
        """An update of this round is signed over the ring keys of the nodes selected for it:
        a member that was not asked cannot file one in a selected node's place, and the
        anonymity set loses nothing by it (who was asked is no secret)."""
        keys = sorted({infos[s.node_id].ring_public_key for s in selected
                       if s.node_id in infos and len(infos[s.node_id].ring_public_key) == 32})
        if len(keys) < 2:
            raise JobFailed(f"round {round_number}: {len(keys)} selected node(s) with a ring "
                            "key; an anonymous round needs at least 2 (a ring of one hides "
                            "nobody)")
        self.store.save_round_ring(self.job_id, round_number, keys)
        self.events.emit(self.job_id, "round.ring", round_number=round_number,
                         message=f"updates of this round are signed over a ring of "
                                 f"{len(keys)} keys (the selected nodes')")

    def _node_infos(self) -> dict[str, pb.NodeInfo]:
        return {n.node_id: n.info for n in self.store.nodes()}

    @staticmethod
    def _has_role(info: pb.NodeInfo | None, role: str) -> bool:
        """Nodes that declare no role are trainers (the default role)."""
        roles = list(info.roles) if info is not None else []
        return role in roles or (role == "trainer" and not roles)

    async def _wait_for_nodes(self, count: int) -> list[NodeSession]:
        """Idle online nodes with the trainer role, at least ``count`` of them; for an
        anonymous job only members of its ring (another node could not sign its upload)."""
        deadline = time.monotonic() + self.spec.wait_for_nodes_s
        ring = set(self.store.ring(self.job_id)) if self.spec.anonymous else None
        while True:
            infos = self._node_infos()
            online = [s for s in self.sessions.online()
                      if not s.busy and self._has_role(infos.get(s.node_id), "trainer")
                      and (ring is None or (s.node_id in infos
                                            and infos[s.node_id].ring_public_key in ring))]
            if len(online) >= count:
                return online
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = (" (an anonymous round needs at least 2: its ring is its nodes, and a "
                       "ring of one hides nobody)" if self.spec.anonymous else "")
                raise JobFailed(
                    f"only {len(online)} idle trainer node(s) online, the job needs {count}"
                    f"{why} (waited {self.spec.wait_for_nodes_s:.0f}s); start more nodes or "
                    "lower min_nodes"
                )
            self.sessions.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sessions.changed.wait(), min(remaining, 1.0))

    def _new_task(self, kind: int, round_number: int, has_global: bool) -> pb.Task:
        return pb.Task(
            task_id=uuid.uuid4().hex,
            job_id=self.job_id,
            round=round_number,
            kind=kind,
            spec=self.spec,
            has_global=has_global,
            deadline_s=self.spec.round_timeout_s,
        )

    async def _initial_state(self) -> dict:
        """Ask one node to build the model from the spec and upload its initial trainable
        state (as Flower does), so the coordinator never needs the model itself."""
        reasons = []
        for _attempt in range(3):
            (session,) = random.sample(await self._wait_for_nodes(1), 1)
            task = self._new_task(pb.INIT, 0, has_global=False)
            outcome = await session.run_task(task, None, self.spec.round_timeout_s)
            if outcome.ok:
                try:
                    state = {k: to_dense(v) for k, v in tensor_map_from_bytes(outcome.payload)
                             .items()}
                except CodecError as exc:
                    reasons.append(f"{outcome.node_id}: invalid initial state: {exc}")
                    continue
                self.events.emit(
                    self.job_id,
                    "job.initialized",
                    node_id=outcome.node_id,
                    message=f"{len(state)} trainable tensors, "
                    f"{sum(t.numel() for t in state.values()):,} parameters",
                    bytes_up=outcome.bytes_up,
                    bytes_down=outcome.bytes_down,
                )
                return state
            reasons.append(f"{outcome.node_id}: {outcome.reason}")
        raise JobFailed("could not initialize the model: " + "; ".join(reasons))

    def _select(self, online: list[NodeSession], round_number: int) -> list[NodeSession]:
        online = sorted(online, key=lambda s: s.node_id)
        count = self.spec.nodes_per_round or len(online)
        rng = random.Random(f"{self.spec.seed}/{round_number}")
        return rng.sample(online, min(count, len(online)))

    async def _choose(self, round_number: int
                      ) -> tuple[list[NodeSession], list[pb.Payment], int]:
        """This round's nodes: a seeded sample, or, with a budget, the winners of the
        truthful budget-feasible auction (and what each will be paid); and the population
        they were drawn from, for privacy accounting (the nodes that could have been
        selected: an auction's choice is deterministic, so its population is the winners)."""
        # an anonymous round's ring is its selected nodes: one alone would hide nobody
        least = max(2, self.spec.min_nodes) if self.spec.anonymous else self.spec.min_nodes
        online = await self._wait_for_nodes(least)
        if self.spec.budget <= 0:
            return self._select(online, round_number), [], len(online)
        infos = self._node_infos()
        bids = await asyncio.gather(*(self._ask_cost(s, round_number, infos) for s in online))
        valid = [b for b in bids if b is not None]
        allocation = proportional_share(valid, self.spec.budget)
        by_id = {s.node_id: s for s in online}
        winners = [by_id[node_id] for node_id in allocation.winners]
        payments = [pb.Payment(job_id=self.job_id, round=round_number, node_id=b.node_id,
                               reported_cost=b.cost, value=b.value,
                               payment=allocation.payments[b.node_id])
                    for b in valid if b.node_id in allocation.payments]
        self.events.emit(self.job_id, "round.auction", round_number=round_number,
                         message=f"{len(winners)} of {len(valid)} bidder(s) selected under a "
                                 f"budget of {self.spec.budget:g}",
                         metrics={"payments": sum(p.payment for p in payments),
                                  "bidders": len(valid)})
        if len(winners) < self.spec.min_nodes:
            raise JobFailed(f"round {round_number}: the budget of {self.spec.budget:g} selects "
                            f"{len(winners)} node(s) at the reported costs, min_nodes is "
                            f"{self.spec.min_nodes}; raise the budget or lower min_nodes")
        return winners, payments, len(winners)

    def _pay(self, round_number: int, payments: list[pb.Payment], delivered: set[str],
             used: set[str]) -> None:
        """Record the payments of winners whose update was aggregated. In an anonymous job
        the coordinator cannot tell whose update it used: it pays the winners that said
        "done" only if at least as many valid anonymous updates arrived (else nobody: one
        winner claimed work it did not upload), and says so."""
        if self.spec.anonymous:
            paid = delivered if len(used) >= len(delivered) else set()
            if not paid and delivered:
                self.events.emit(self.job_id, "round.unpaid", round_number=round_number,
                                 message=f"{len(delivered)} winner(s) said done but {len(used)} "
                                         "valid anonymous update(s) arrived: no payment")
        else:
            paid = used
        self.store.record_payments(self.job_id, round_number,
                                   [p for p in payments if p.node_id in paid])

    async def _ask_cost(self, session: NodeSession, round_number: int,
                        infos: dict[str, pb.NodeInfo]) -> Bid | None:
        cost = await session.ask_cost(self.job_id, round_number, timeout=10.0)
        if cost is None:
            return None
        info = infos.get(session.node_id)
        value = float(info.datasets.get(self.spec.train.dataset, 0)) if info else 0.0
        if value <= 0:
            return None  # nothing to contribute to this job's dataset
        return Bid(session.node_id, cost, value)

    async def _run_round(self, round_number: int, state: dict) -> dict:
        started = time.monotonic()
        selected, payments, population = await self._choose(round_number)
        reason = self.method.before_round(self.config, round_number, population, len(selected))
        if reason:
            self.events.emit(self.job_id, "job.stopped", round_number=round_number,
                             message=reason)
            raise JobStopped(f"stopped before round {round_number}: {reason}")
        infos = self._node_infos()  # once per round: the registry can hold thousands
        if self.spec.anonymous:
            self._fix_round_ring(round_number, selected, infos)
        record = RoundRecord(round=round_number, state="running",
                             selected=[s.node_id for s in selected])
        self.store.save_round(self.job_id, record)
        if self.spec.anonymous:  # uploads are accepted for this round only, at most one each
            self.inbox.open_round(self.job_id, round_number, len(selected))
        self.events.emit(
            self.job_id,
            "round.started",
            round_number=round_number,
            message=f"{len(selected)} node(s): " + ", ".join(record.selected),
        )
        payload = tensor_map_to_bytes(state)
        digest = state_digest(state)
        peers = [await self._split_server()] if self.method.needs_split_server else []
        builders = {node_id for node_id, info in infos.items()
                    if STATE_DIGEST_FEATURE in info.features}
        outcomes = await asyncio.gather(
            *(
                self._train_on(session, round_number, payload, peers, digest,
                               session.node_id in builders)
                for session in selected
            )
        )
        for outcome in outcomes:
            record.bytes_up += outcome.bytes_up
            record.bytes_down += outcome.bytes_down
        delivered = {o.node_id for o in outcomes if o.ok}
        if self.spec.anonymous:
            # the sessions only said "done"; the updates came through the anonymous call
            for outcome in outcomes:
                if not outcome.ok:
                    record.dropped[outcome.node_id] = outcome.reason
            remaining = self.spec.round_timeout_s - (time.monotonic() - started)
            await self.inbox.wait_for(self.job_id, round_number, len(delivered), remaining)
            outcomes = [self._anonymous_outcome(u, round_number)
                        for u in self.inbox.take(self.job_id, round_number)]
            for outcome in outcomes:
                record.bytes_up += outcome.bytes_up
        updates: list[ClientUpdate] = []
        accepted: list[TaskOutcome] = []
        caps = self._example_caps(round_number, infos)
        for outcome in outcomes:
            update = self._accept(outcome, state, round_number, record, caps)
            if update is not None:
                updates.append(update)
                accepted.append(outcome)
        if payments:  # pay the winners whose work was used, at their critical values
            self._pay(round_number, payments, delivered, {u.node_id for u in updates})
        record.participants = [u.node_id for u in updates]
        record.metrics = weighted_metrics(accepted)
        record.seconds = time.monotonic() - started
        if len(updates) < self.spec.min_nodes:
            record.state = "failed"
            self.store.save_round(self.job_id, record)
            why = "; ".join(f"{node}: {reason}" for node, reason in record.dropped.items())
            message = (
                f"round {round_number}: {len(updates)} of {len(selected)} node(s) returned a "
                f"valid update, min_nodes is {self.spec.min_nodes}" + (f" ({why})" if why else "")
            )
            self.events.emit(self.job_id, "round.failed", round_number=round_number,
                             message=message, bytes_up=record.bytes_up,
                             bytes_down=record.bytes_down)
            raise JobFailed(message)
        new_state, compact = self.method.aggregate_compact(self.config, state, updates,
                                                           round_number)
        self.broadcast = None
        if compact is not None:
            self.broadcast = CompactBroadcast(base=digest, digest=state_digest(new_state),
                                              payload=tensor_map_to_bytes(compact))
        record.metrics.update(
            self.method.round_metrics(self.config, round_number, population, len(selected)))
        self.store.save_global(self.job_id, round_number, new_state)
        record.state = "completed"
        self.store.save_round(self.job_id, record)
        self.events.emit(
            self.job_id,
            "round.completed",
            round_number=round_number,
            message=f"{len(updates)} update(s) aggregated in {record.seconds:.1f}s",
            metrics=record.metrics,
            bytes_up=record.bytes_up,
            bytes_down=record.bytes_down,
        )
        return new_state

    async def _split_server(self) -> pb.Peer:
        """SFPrompt pairs its devices with a split-server: an online node with that role and
        a reachable peer service (the first by node id, so a job keeps the same one)."""
        deadline = time.monotonic() + self.spec.wait_for_nodes_s
        while True:
            infos = self._node_infos()
            online = {s.node_id for s in self.sessions.online()}
            servers = sorted(node_id for node_id, info in infos.items()
                             if node_id in online and info.peer_address
                             and self._has_role(info, "split-server"))
            if servers:
                return pb.Peer(node_id=servers[0], address=infos[servers[0]].peer_address,
                               role="split-server")
            if time.monotonic() > deadline:
                raise JobFailed(f"method {self.spec.method!r} needs an online node with the "
                                "split-server role and a peer address (start one with "
                                "`confide node serve --role split-server`); none came within "
                                f"{self.spec.wait_for_nodes_s:.0f}s")
            self.sessions.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sessions.changed.wait(), 1.0)

    async def _train_on(self, session: NodeSession, round_number: int, payload: bytes,
                        peers: Sequence[pb.Peer], digest: bytes, builds: bool) -> TaskOutcome:
        """One node's TRAIN task. The global state goes down whole, or not at all when it is
        the job's seeded initial state (the node builds it as INIT does), or, when the method
        has a compact broadcast and the node kept the state it builds on, in that compact
        form (Ferret: the mean scalars); ``builds``: the node speaks that part of the wire
        (``STATE_DIGEST_FEATURE``). A node that cannot get the same bits (its digest differs)
        gets the whole state in the time left."""
        timeout = self.spec.round_timeout_s

        def task() -> pb.Task:
            t = self._new_task(pb.TRAIN, round_number, has_global=True)
            t.peers.extend(peers)
            t.anonymous = self.spec.anonymous
            t.global_digest = digest
            return t

        cheap: tuple[pb.Task, bytes | None] | None = None
        compact = self.broadcast
        if builds and digest == self.seeded_digest:
            first = task()
            first.has_global = False
            first.global_from_seed = True
            cheap = (first, None)
        elif (builds and compact is not None and compact.digest == digest
                and session.held_states.get(self.job_id) == compact.base):
            first = task()
            first.global_base_digest = compact.base
            cheap = (first, compact.payload)
        spent: TaskOutcome | None = None
        if cheap is not None:
            spent = await session.run_task(*cheap, timeout,
                                           expects_payload=not self.spec.anonymous)
            if spent.ok or not spent.needs_full_state:
                self._held(session, spent, digest)
                return spent
            log.info("job %s round %d: %s could not build the global state itself (%s); "
                     "sending the whole state", self.job_id, round_number, session.node_id,
                     spent.reason)
            timeout = max(1.0, timeout - spent.seconds)
        outcome = await session.run_task(task(), payload, timeout,
                                         expects_payload=not self.spec.anonymous)
        if spent is not None:
            outcome.bytes_down += spent.bytes_down
            outcome.bytes_up += spent.bytes_up
            outcome.seconds += spent.seconds
        self._held(session, outcome, digest)
        return outcome

    def _held(self, session: NodeSession, outcome: TaskOutcome, digest: bytes) -> None:
        """A node that trained from the state keeps it: the base of the next broadcast."""
        if outcome.ok:
            session.held_states[self.job_id] = digest
        else:
            session.held_states.pop(self.job_id, None)

    @staticmethod
    def _anonymous_outcome(update: AnonymousUpdate, round_number: int) -> TaskOutcome:
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
        if self.spec.anonymous:
            ring = set(self.store.ring(self.job_id, round_number))
            caps[""] = max((int(i.datasets.get(dataset, 0)) for i in infos.values()
                            if i.ring_public_key in ring), default=0)
        return caps

    @staticmethod
    def _capped(outcome: TaskOutcome, caps: dict[str, int]) -> int:
        """The example count an update is weighted by: what the node claims, at most its
        cap (0 for a node that registered no example of the job's dataset)."""
        cap = caps.get(outcome.node_id, caps.get("", 0))
        return min(int(outcome.num_examples), cap)

    def _accept(self, outcome: TaskOutcome, state: dict, round_number: int,
                record: RoundRecord, caps: dict[str, int]) -> ClientUpdate | None:
        """Decode and check one node's update; a bad one is dropped, never aggregated."""
        reason = outcome.reason
        update = None
        if outcome.ok:
            try:
                decoded = tensor_map_from_bytes(outcome.payload or b"")
                self.method.check_update(self.config, state, decoded)
                update = ClientUpdate(outcome.node_id, decoded, self._capped(outcome, caps))
            except (CodecError, ValueError) as exc:
                reason = f"invalid update: {exc}"
        if update is None:
            record.dropped[outcome.node_id] = reason
            self.events.emit(self.job_id, "node.dropped", round_number=round_number,
                             node_id=outcome.node_id, message=reason,
                             bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down)
            return None
        self.events.emit(
            self.job_id,
            "node.done",
            round_number=round_number,
            node_id=outcome.node_id,
            message=f"{outcome.num_examples} examples in {outcome.seconds:.1f}s",
            metrics=outcome.metrics,
            bytes_up=outcome.bytes_up,
            bytes_down=outcome.bytes_down,
        )
        return update

    # ------------------------------------------------------------ decentralized rounds

    async def _members(self) -> list[str]:
        """A decentralized job's nodes, fixed by its first round (the topology is over
        them): the idle trainers online with a reachable peer service."""
        first = next((r for r in self.store.rounds(self.job_id) if r.round == 1), None)
        if first is not None:
            return list(first.selected)
        online = await self._wait_for_nodes(self.spec.min_nodes)
        infos = self._node_infos()
        members = sorted(s.node_id for s in online if infos[s.node_id].peer_address)
        if len(members) < max(2, self.spec.min_nodes):
            raise JobFailed(f"method {self.spec.method!r} merges models peer to peer: it needs "
                            f"at least {max(2, self.spec.min_nodes)} nodes with a peer service "
                            f"(--listen), {len(members)} online")
        return members

    async def _member_sessions(self, members: list[str]) -> list[NodeSession]:
        """The members' sessions once all are online and idle, or, at the deadline, those
        that are (if at least min_nodes)."""
        deadline = time.monotonic() + self.spec.wait_for_nodes_s
        while True:
            ready = [s for s in (self.sessions.get(m) for m in members)
                     if s is not None and not s.closed and not s.busy]
            if len(ready) == len(members):
                return ready
            if time.monotonic() > deadline:
                if len(ready) >= self.spec.min_nodes:
                    return ready
                raise JobFailed(f"{len(ready)} of the job's {len(members)} nodes are online, "
                                f"min_nodes is {self.spec.min_nodes}")
            self.sessions.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sessions.changed.wait(), 1.0)

    async def _peer_phase(self, sessions: Sequence[NodeSession], kind: int, round_number: int,
                          peers: dict[str, tuple[list[pb.Peer], float]] | None = None,
                          ) -> list[TaskOutcome]:
        async def one(session: NodeSession) -> TaskOutcome:
            task = self._new_task(kind, round_number, has_global=False)
            if peers is not None:
                neighbours, self_weight = peers[session.node_id]
                task.peers.extend(neighbours)
                task.self_weight = self_weight
            return await session.run_task(task, None, self.spec.round_timeout_s,
                                          expects_payload=False)

        return list(await asyncio.gather(*(one(s) for s in sessions)))

    async def _run_peer_round(self, round_number: int) -> None:
        """One round of a decentralized method: every member trains its own model (TRAIN),
        then, once all have, merges with its neighbours (MERGE) peer to peer. The coordinator
        is the barrier between the phases and publishes the topology; it receives metrics,
        never a weight."""
        started = time.monotonic()
        members = await self._members()
        sessions = await self._member_sessions(members)
        record = RoundRecord(round=round_number, state="running", selected=members)
        self.store.save_round(self.job_id, record)
        self.events.emit(self.job_id, "round.started", round_number=round_number,
                         message=f"{len(sessions)} of {len(members)} node(s) train, then merge")
        trained = await self._peer_phase(sessions, pb.TRAIN, round_number)
        ok = {o.node_id for o in trained if o.ok}
        infos = self._node_infos()
        adjacency = neighbours(self.config, members)
        peers: dict[str, tuple[list[pb.Peer], float]] = {}
        for node in ok:
            self_weight, row = mixing_weights(adjacency, node)
            # a neighbour that did not train gets no address: the node treats it as
            # unreachable, by the job's policy
            peers[node] = ([pb.Peer(node_id=j, role="neighbour", weight=w,
                                    address=infos[j].peer_address if j in ok else "")
                            for j, w in sorted(row.items())], self_weight)
        merging = [s for s in sessions if s.node_id in ok]
        merged = await self._peer_phase(merging, pb.MERGE, round_number, peers)
        for outcome in [*trained, *merged]:
            record.bytes_up += outcome.bytes_up
            record.bytes_down += outcome.bytes_down
            if not outcome.ok:
                record.dropped[outcome.node_id] = outcome.reason
                self.events.emit(self.job_id, "node.dropped", round_number=round_number,
                                 node_id=outcome.node_id, message=outcome.reason)
        accepted = [o for o in trained if o.ok]
        for outcome in accepted:
            self.events.emit(self.job_id, "node.done", round_number=round_number,
                             node_id=outcome.node_id, metrics=outcome.metrics,
                             message=f"{outcome.num_examples} examples trained",
                             bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down)
        done = [o for o in merged if o.ok]
        record.participants = sorted(o.node_id for o in done)
        record.metrics = weighted_metrics(accepted)
        if done:
            # what travelled between peers (the coordinator saw none of it)
            record.metrics["peer_bytes_down_per_node"] = sum(
                o.metrics.get("peer_bytes_down", 0.0) for o in done) / len(done)
            record.metrics["neighbours_merged"] = sum(
                o.metrics.get("neighbours_merged", 0.0) for o in done) / len(done)
        record.seconds = time.monotonic() - started
        if len(done) < self.spec.min_nodes:
            record.state = "failed"
            self.store.save_round(self.job_id, record)
            why = "; ".join(f"{node}: {reason}" for node, reason in record.dropped.items())
            message = (f"round {round_number}: {len(done)} of {len(members)} node(s) trained "
                       f"and merged, min_nodes is {self.spec.min_nodes}"
                       + (f" ({why})" if why else ""))
            self.events.emit(self.job_id, "round.failed", round_number=round_number,
                             message=message, bytes_up=record.bytes_up,
                             bytes_down=record.bytes_down)
            raise JobFailed(message)
        record.state = "completed"
        self.store.save_round(self.job_id, record)
        self.events.emit(self.job_id, "round.completed", round_number=round_number,
                         message=f"{len(done)} node(s) merged with their neighbours in "
                                 f"{record.seconds:.1f}s",
                         metrics=record.metrics, bytes_up=record.bytes_up,
                         bytes_down=record.bytes_down)
