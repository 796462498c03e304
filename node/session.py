"""The node's end of its session with the coordinator.

The node dials out (so it works behind NAT), registers its key, proves possession of it on a
fresh challenge, then keeps the stream open: heartbeats up, tasks down. When the coordinator
goes away the node reconnects with exponential backoff plus jitter and rejoins; a task that was
running is abandoned (the coordinator already counted it as dropped).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from confide.node.anonymous import AnonymityError, fetch_ring, submit_anonymously
from confide.node.policy import AdmissionGate, NodePolicy, Refused, TaskRequest, task_role
from confide.node.privacy_guard import TaskRefused
from confide.node.secagg import NodeSecureAggregation
from confide.node.worker import NeedsFullState, TaskCancelled, TaskWorker
from confide.privacy.ringsig import RingKeyPair
from confide.protos.chunking import ChunkError, split_payload
from confide.protos.codec import WireTensor
from confide.protos.events import EventPublisher, node_presence_topic, presence_payload
from confide.protos.identity import NodeKey
from confide.protos.stream import TensorMapReceiver, stream_tensor_map
from confide.protos.tls import PROCESS as TLS_PROCESS
from confide.protos.tls import aio_channel
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: the most an anonymous upload waits after the session's "done" (uniform random delay)
ANONYMOUS_JITTER_S = 2.0
_JITTER = random.SystemRandom()

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class LinkState:
    """What the node knows about its link, for logs, tests and `GetInfo`."""

    connected: bool = False
    sessions: int = 0
    last_error: str = ""
    tasks_done: int = 0
    tasks_failed: int = 0
    history: list[str] = field(default_factory=list)


class CoordinatorLink:
    def __init__(
        self,
        coordinator: str,
        key: NodeKey,
        info: pb.NodeInfo,
        worker: TaskWorker,
        *,
        mqtt_override: str = "",
        max_backoff_s: float = 30.0,
        ring_key: RingKeyPair | None = None,
        cost: float = 0.0,
        gate: AdmissionGate | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.key = key
        self.info = info
        self.worker = worker
        self.mqtt_override = mqtt_override
        self.max_backoff_s = max_backoff_s
        self.ring_key = ring_key
        self.cost = cost
        #: the node owner's policy, checked before any task starts (node/policy.py)
        self.gate = gate or AdmissionGate(NodePolicy())
        self.state = LinkState()
        self.publisher: EventPublisher | None = None
        self._busy = False
        #: protos.tls: the channel's TLS (default: the process's --tls) and the coordinator's
        #: anonymous port for ring-signed uploads ("" = the coordinator address)
        self.tls = TLS_PROCESS
        self.anonymous_coordinator = ""
        self._stub: pb_grpc.CoordinatorStub | None = None
        self._refresh: asyncio.Task | None = None
        self.refresh_privacy(register=False)

    async def run(self) -> None:
        """Stay connected forever (until cancelled)."""
        delay = 0.5
        while True:
            try:
                async with aio_channel(self.coordinator, CHANNEL_OPTIONS,
                                       tls=self.tls) as channel:
                    await self._session(channel)
                self.state.last_error = "session ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                self.state.last_error = f"{exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    log.error("coordinator refused this node: %s", exc.details())
            except Exception as exc:
                self.state.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("session failed")
            if self.state.connected:
                delay = 0.5  # we had a working session: start backoff afresh
            self.state.connected = False
            wait = delay * random.uniform(0.8, 1.2)
            log.warning("coordinator link down (%s); reconnecting in %.1fs",
                        self.state.last_error, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.max_backoff_s)

    def refresh_privacy(self, register: bool = True) -> None:
        """Put the ledger's figures in this node's info and, in a session, register again so
        the coordinator (``confide status``, the SDK) shows what this node has spent."""
        guard = self.worker.guard
        if guard is None:
            return
        del self.info.privacy[:]
        self.info.privacy.extend(guard.report())
        if register and self._stub is not None:
            self._refresh = asyncio.create_task(self._quiet_register(self._stub))

    async def _quiet_register(self, stub: pb_grpc.CoordinatorStub) -> None:
        try:
            await self._register(stub)
        except grpc.aio.AioRpcError as exc:  # the next session registers again anyway
            log.warning("could not report the privacy ledger: %s", exc.details())

    async def _register(self, stub: pb_grpc.CoordinatorStub) -> pb.RegisterResponse:
        timestamp, signature = self.key.sign_registration()
        request = pb.RegisterRequest(public_key=self.key.public_bytes, info=self.info,
                                     timestamp_ms=timestamp, signature=signature)
        return await stub.Register(request, timeout=30)

    def _start_events(self, mqtt_url: str) -> None:
        url = self.mqtt_override or mqtt_url
        if not url or url == "none" or self.publisher is not None:
            return
        node_id = self.key.node_id
        try:
            self.publisher = EventPublisher(
                url,
                client_id=f"confide-node-{node_id}",
                will=(node_presence_topic(node_id), presence_payload(node_id, "offline")),
            )
        except ValueError as exc:
            log.warning("events off: %s", exc)
            return
        self.publisher.start()

    def _presence(self, status: str) -> None:
        if self.publisher is not None:
            node_id = self.key.node_id
            self.publisher.publish(node_presence_topic(node_id),
                                   presence_payload(node_id, status), retain=True)

    async def _session(self, channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.CoordinatorStub(channel)
        registration = await self._register(stub)
        self._stub = stub
        self._start_events(registration.mqtt_url)
        #: messages, streams of them (an update, made chunk by chunk as it is written), None
        outbox: asyncio.Queue[pb.NodeMessage | Iterator[pb.NodeMessage] | None] = \
            asyncio.Queue()

        async def outgoing() -> AsyncIterator[pb.NodeMessage]:
            while True:
                message = await outbox.get()
                if message is None:
                    return
                if isinstance(message, pb.NodeMessage):
                    yield message
                else:
                    for streamed in message:
                        yield streamed

        call = stub.Session(outgoing())
        outbox.put_nowait(pb.NodeMessage(hello=pb.SessionHello(node_id=self.key.node_id)))
        challenge = await call.read()
        if challenge is grpc.aio.EOF or challenge.WhichOneof("body") != "challenge":
            raise ConnectionError("coordinator did not send a challenge")
        signature = self.key.sign_session(challenge.challenge.nonce)
        outbox.put_nowait(pb.NodeMessage(proof=pb.SessionProof(signature=signature)))
        welcome = await call.read()
        if welcome is grpc.aio.EOF or welcome.WhichOneof("body") != "welcome":
            raise ConnectionError("coordinator did not welcome the session")
        self.state.connected = True
        self.state.sessions += 1
        self._presence("online")
        log.info("connected to coordinator %s as node %s", self.coordinator, self.key.node_id)
        runner = _TaskRunner(self, outbox)
        beat = asyncio.create_task(self._heartbeat(outbox, welcome.welcome.heartbeat_interval_s))
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                runner.handle(message)
        finally:
            beat.cancel()
            self._stub = None
            runner.abandon()
            outbox.put_nowait(None)
            call.cancel()

    async def _heartbeat(self, outbox: asyncio.Queue, interval: float) -> None:
        seq = 0
        while True:
            seq += 1
            outbox.put_nowait(pb.NodeMessage(heartbeat=pb.Heartbeat(seq=seq, busy=self._busy)))
            await asyncio.sleep(max(interval, 0.2))

    async def close(self) -> None:
        self._presence("offline")
        if self.publisher is not None:
            await self.publisher.close()


class _TaskRunner:
    """One task at a time: gathers the global state chunks, trains in a thread, uploads."""

    def __init__(self, link: CoordinatorLink, outbox: asyncio.Queue) -> None:
        self.link = link
        self.outbox = outbox
        self.task: pb.Task | None = None
        self.assembler: TensorMapReceiver | None = None
        self.cancelled = threading.Event()
        self.job: asyncio.Task | None = None
        #: secure aggregation's protocol state for the rounds this node is in (node/secagg.py)
        self.secagg = NodeSecureAggregation(link.key.node_id, link.key.sign, self.send)

    def send(self, message: pb.NodeMessage) -> None:
        self.outbox.put_nowait(message)

    def fail(self, task_id: str, reason: str, needs_full_state: bool = False,
             refused: bool = False) -> None:
        self.link.state.tasks_failed += 1
        self.send(pb.NodeMessage(failure=pb.TaskFailure(
            task_id=task_id, reason=reason, needs_full_state=needs_full_state,
            refused=refused)))

    def refuse(self, task_id: str, reason: str) -> None:
        """The node's policy refuses the task: the reason goes back to the submitter."""
        log.warning("task %s refused: %s", task_id[:8], reason)
        self.fail(task_id, reason, refused=True)

    def _admit(self, task: pb.Task) -> None:
        """The node's policy on a task from the coordinator (Refused says why not)."""
        worker = self.link.worker
        dataset = worker.data.datasets().get(task.spec.train.dataset or "train", 0)
        self.link.gate.admit(TaskRequest(
            role=task_role(task), job_id=task.job_id,
            # a Minions question is no training job: its role and payload are what to check
            spec=None if task.kind == pb.MINION else task.spec,
            dataset="docs" if task.kind == pb.MINION else None,
            dataset_size=dataset if task.kind == pb.TRAIN else None,
            payload_bytes=len(task.instructions), peers=tuple(task.peers)))

    def handle(self, message: pb.CoordinatorMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "task":
            task = message.task
            if self.task is not None:
                self.fail(task.task_id, "node is busy with another task")
                return
            try:
                self._admit(task)
            except Refused as exc:
                self.refuse(task.task_id, str(exc))
                return
            self.task = task
            self.cancelled.clear()
            self.link._busy = True
            if task.has_global:
                # the policy's payload cap bounds what the stream's headers may allocate
                self.assembler = TensorMapReceiver(
                    transfer_id=task.task_id, max_bytes=self.link.gate.policy.caps.payload_bytes)
            else:
                self._start(None)
        elif kind == "global_chunk":
            chunk = message.global_chunk
            if self.task is None or self.assembler is None or chunk.task_id != self.task.task_id:
                return
            cap = self.link.gate.policy.caps.payload_bytes
            if chunk.chunk.total_bytes > cap:
                self._finish()
                self.refuse(chunk.task_id, f"the global state is {chunk.chunk.total_bytes} "
                                           f"bytes, over this node's cap of {cap} "
                                           "(caps.payload_bytes)")
                return
            try:
                payload = self.assembler.add(chunk.chunk)
            except ChunkError as exc:
                self._finish()
                self.fail(chunk.task_id, f"bad global state stream: {exc}")
                return
            if payload is not None:
                self.assembler = None
                self._start(payload)
        elif kind == "secagg":
            self.secagg.handle(message.secagg)
        elif kind == "job_ended":  # it no longer counts towards caps.concurrent_jobs
            self.link.gate.finished(message.job_ended.job_id)
        elif kind == "cost_query":
            self.send(pb.NodeMessage(cost_report=pb.CostReport(
                query_id=message.cost_query.query_id, cost=self.link.cost)))
        elif (kind == "cancel" and self.task is not None
              and message.cancel.task_id == self.task.task_id):
            log.warning("task %s cancelled: %s", message.cancel.task_id, message.cancel.reason)
            self.cancelled.set()

    def _job_over(self, task: pb.Task) -> None:
        """The node's part in the job ends with its last round's TRAIN (federated) or MERGE
        (decentralized) task: it no longer counts towards the concurrent-jobs cap."""
        if task.round < task.spec.rounds or task.kind not in (pb.TRAIN, pb.MERGE):
            return
        if task.kind == pb.MERGE or task_role(task) == "trainer":
            self.link.gate.finished(task.job_id)

    def _start(self, payload: dict[str, WireTensor] | None) -> None:
        assert self.task is not None
        self.job = asyncio.create_task(self._execute(self.task, payload))

    def _finish(self) -> None:
        self.task = None
        self.assembler = None
        self.link._busy = False

    async def _execute(self, task: pb.Task, payload: dict[str, WireTensor] | None) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        last_report = [0.0]
        # the policy's cap on seconds per task: past it the task is stopped and refused
        cap_s = self.link.gate.policy.caps.seconds_per_task
        overtime = threading.Event()

        def stop_overtime() -> None:
            overtime.set()
            self.cancelled.set()

        timer = loop.call_later(cap_s, stop_overtime)

        def progress(step: int, total: int, loss: float) -> None:
            if task.anonymous or task.spec.secure_aggregation:
                return  # steps and totals would tell the node's data size apart
            now = time.monotonic()
            if now - last_report[0] >= 1.0 or step == total:
                last_report[0] = now
                message = pb.NodeMessage(progress=pb.TaskProgress(
                    task_id=task.task_id, step=step, total_steps=total, loss=loss))
                loop.call_soon_threadsafe(self.outbox.put_nowait, message)

        try:
            if task.kind == pb.INIT:
                update = await asyncio.to_thread(self.link.worker.initial_state, task)
                num_examples, metrics = 0, {}
            elif task.kind == pb.TRAIN:
                update, num_examples, metrics = await asyncio.to_thread(
                    self.link.worker.train, task, payload or {}, progress, self.cancelled)
                if task.spec.secure_aggregation:  # the masked input replaces the update
                    update, num_examples, metrics = await self._masked(task, update,
                                                                       num_examples)
            elif task.kind == pb.MERGE:
                update, num_examples, metrics = await asyncio.to_thread(
                    self.link.worker.merge, task, progress, self.cancelled)
            elif task.kind == pb.MINION:
                update, num_examples, metrics = await asyncio.to_thread(
                    self.link.worker.minion, task, progress, self.cancelled)
            else:
                raise ValueError(f"unknown task kind {task.kind}")
        except TaskCancelled:
            self._finish()
            if overtime.is_set():
                self.refuse(task.task_id, f"the task ran past this node's cap of {cap_s:g}s "
                                          "per task (caps.seconds_per_task) and was stopped")
            return
        except TaskRefused as exc:  # the owner's budget or policy says no
            log.warning("task %s refused: %s", task.task_id[:8], exc)
            self._finish()
            self.fail(task.task_id, str(exc), refused=True)
            self.link.refresh_privacy()
            return
        except NeedsFullState as exc:  # the coordinator resends the whole state
            log.info("task %s: %s; asking for the whole global state", task.task_id[:8], exc)
            self._finish()
            self.fail(task.task_id, str(exc), needs_full_state=True)
            return
        except Exception as exc:  # report, never crash the node
            log.exception("task %s failed", task.task_id)
            self._finish()
            self.fail(task.task_id, f"{type(exc).__name__}: {exc}")
            return
        finally:
            timer.cancel()
            self._job_over(task)
        self._finish()
        if overtime.is_set():
            self.refuse(task.task_id, f"the task ran past this node's cap of {cap_s:g}s per "
                                      "task (caps.seconds_per_task) and was stopped")
            return
        if self.cancelled.is_set():
            return
        if task.anonymous:
            await self._submit_anonymously(task, update, num_examples, started)
            return
        # raw bytes (a Minions reply, a masked input) or a tensor map streamed from its tensors
        try:
            chunks = (split_payload(update, task.task_id) if isinstance(update, bytes)
                      else stream_tensor_map(update, task.task_id))
        except (TypeError, ValueError) as exc:  # a value the wire cannot carry
            self.fail(task.task_id, f"the update cannot be sent: {exc}")
            return
        self.outbox.put_nowait(pb.NodeMessage(update_chunk=pb.TaskChunk(
            task_id=task.task_id, chunk=chunk)) for chunk in chunks)
        metrics = dict(metrics)
        metrics["seconds"] = time.monotonic() - started
        self.send(pb.NodeMessage(result=pb.TaskResult(
            task_id=task.task_id, num_examples=num_examples, metrics=metrics)))
        self.link.state.tasks_done += 1
        if task.kind == pb.TRAIN:
            self.link.refresh_privacy()
        log.info("task %s (%s, round %d) done in %.1fs", task.task_id[:8],
                 pb.TaskKind.Name(task.kind), task.round, metrics["seconds"])

    async def _masked(self, task: pb.Task, update: dict[str, WireTensor],
                      num_examples: int) -> tuple[bytes, int, dict[str, float]]:
        """Secure aggregation: the MaskedInput instead of the update; the example count is
        inside it (weight), so none is reported, and no training metrics either."""
        global_state = self.link.worker.models.load(task.job_id, "global")
        if global_state is None:
            raise ValueError("the round's global state was not kept")
        masked, clipped = await self.secagg.masked_input(
            task, update, num_examples, global_state, timeout=max(task.deadline_s, 1.0))
        if clipped:
            log.warning("task %s: %d update entries clipped to secure aggregation's bound",
                        task.task_id[:8], clipped)
        return masked, 0, {}

    async def _submit_anonymously(self, task: pb.Task, update: dict[str, WireTensor],
                                  num_examples: int,
                                  started: float) -> None:
        """The update goes on its own ring-signed call; the session only hears "done", with
        no example count and no metrics that could tell the updates apart. "done" goes
        first and the upload follows after a random delay, so neither the order of arrival
        nor a fixed gap pairs a session with its upload (the network address still can:
        see the README's threat model). The ring is checked before "done": a node that
        could not sign fails its task at once instead of leaving the round waiting."""
        coordinator = self.link.anonymous_coordinator or self.link.coordinator
        options = dict(tls=self.link.tls, dedicated_port=bool(self.link.anonymous_coordinator))
        try:
            ring = await fetch_ring(coordinator, self.link.ring_key, task.job_id, task.round,
                                    CHANNEL_OPTIONS, anonymity_set=task.spec.anonymity_set,
                                    **options)
        except (grpc.aio.AioRpcError, AnonymityError) as exc:
            reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self.fail(task.task_id, f"cannot submit anonymously: {reason}")
            return
        self.send(pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id)))
        self.link.state.tasks_done += 1
        await asyncio.sleep(_JITTER.uniform(0.0, ANONYMOUS_JITTER_S))
        try:
            await submit_anonymously(coordinator, self.link.ring_key, task, update,
                                     num_examples, CHANNEL_OPTIONS, ring=ring, **options)
        except (grpc.aio.AioRpcError, AnonymityError) as exc:
            reason = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            # the session already said "done": the coordinator sees one update fewer
            log.error("task %s: anonymous submission failed: %s", task.task_id[:8], reason)
            self.link.state.tasks_failed += 1
            return
        log.info("task %s (round %d) submitted anonymously in %.1fs", task.task_id[:8],
                 task.round, time.monotonic() - started)

    def abandon(self) -> None:
        """The session ended: stop the running task (its result has nowhere to go)."""
        self.cancelled.set()
        if self.task is not None:
            self._finish()

