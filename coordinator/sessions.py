"""Live node sessions: the coordinator's end of each node's long-lived bidirectional stream.

A node dials out and keeps one ``Session`` stream open, so it needs no open port. Down the
stream go tasks and the global state (a tensor-map stream, ``protos.stream``); up it come
heartbeats, the update (streamed the same way) and the result. ``NodeSession.run_task``
turns that message exchange into one awaitable with a deadline, counting every byte that
crosses in each direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from confide.protos.chunking import ChunkAssembler, ChunkError, ChunkFraming, wire_bytes
from confide.protos.codec import WireTensor
from confide.protos.stream import TensorMapReceiver, stream_tensor_map
from confide.v1 import coordinator_pb2 as pb
from confide.v1.common_pb2 import Chunk

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class TaskOutcome:
    """What came back for one task: an update payload, or the reason there is none."""

    node_id: str
    task_id: str
    ok: bool
    reason: str = ""
    #: a tensor map (an update), or raw bytes for a task whose answer is (``raw_update``)
    payload: dict[str, WireTensor] | bytes | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    #: the node could not rebuild the global state from a compact broadcast
    needs_full_state: bool = False
    #: the node's owner refused the task (its policy or privacy budget); reason says why
    refused: bool = False


@dataclass
class _PendingTask:
    task: pb.Task
    assembler: ChunkFraming
    future: asyncio.Future
    started: float
    bytes_up: int = 0
    bytes_down: int = 0
    #: the node's answer: a tensor map (an update), or raw bytes (see raw_update)
    payload: dict[str, WireTensor] | bytes | None = None
    expects_payload: bool = True

    def outcome(self, node_id: str, ok: bool, reason: str = "", **extra) -> TaskOutcome:
        return TaskOutcome(
            node_id=node_id,
            task_id=self.task.task_id,
            ok=ok,
            reason=reason,
            payload=self.payload,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            seconds=time.monotonic() - self.started,
            **extra,
        )

    def settle(self, outcome: TaskOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


def raw_update(task: pb.Task) -> bool:
    """Whether a task's answer is raw bytes (a Minions reply, a secure-aggregation masked
    input) rather than a streamed tensor map."""
    return task.kind == pb.MINION or (task.kind == pb.TRAIN and task.spec.secure_aggregation)


class NodeSession:
    """One connected node: an outbox the stream drains, and the tasks in flight."""

    def __init__(self, node_id: str, max_update_bytes: int = 1 << 31) -> None:
        self.node_id = node_id
        self.max_update_bytes = max_update_bytes
        #: what the session's stream writes: messages, streams of them (send_stream), None ends it
        self.outbox: asyncio.Queue[pb.CoordinatorMessage | Iterator[pb.CoordinatorMessage]
                                   | None] = asyncio.Queue()
        self.last_seen = time.monotonic()
        self.busy = False
        self.closed = False
        self.close_reason = ""
        #: called with (task, step, total_steps, loss) as the node reports training progress
        self.on_progress: Callable[[pb.Task, int, int, float], None] | None = None
        self._pending: dict[str, _PendingTask] = {}
        #: job id -> digest of the global state this node took its last task of the job
        #: from (it keeps that state): the base a compact broadcast can build on
        self.held_states: dict[str, bytes] = {}
        #: jobs this node was given a task of (told when each ends: node/policy.py's
        #: concurrent-jobs cap counts a job until then)
        self.jobs_taken_part: set[str] = set()
        self._cost_queries: dict[str, asyncio.Future] = {}
        #: the secure-aggregation round in progress with this node (coordinator.secure_rounds)
        #: gets its messages: (node id, message, wire bytes)
        self.on_secagg: Callable[[str, pb.SecAggMessage, int], None] | None = None

    # ------------------------------------------------------------- sending

    def send(self, message: pb.CoordinatorMessage) -> int:
        if self.closed:
            raise ConnectionError(f"node {self.node_id} is disconnected ({self.close_reason})")
        self.outbox.put_nowait(message)
        return wire_bytes(message)

    def send_stream(self, messages: Iterator[pb.CoordinatorMessage]) -> None:
        """Queue messages the session's stream takes one at a time as it writes them (a
        streamed state is then read from its tensors chunk by chunk, never all queued)."""
        if self.closed:
            raise ConnectionError(f"node {self.node_id} is disconnected ({self.close_reason})")
        self.outbox.put_nowait(messages)

    async def run_task(
        self, task: pb.Task, global_state: Mapping[str, WireTensor] | None, timeout: float,
        expects_payload: bool = True,
    ) -> TaskOutcome:
        """Send ``task`` (and the global state, streamed), wait for the node's answer or the
        deadline. ``expects_payload`` False: the update goes elsewhere (anonymous); "done"
        suffices."""
        loop = asyncio.get_running_loop()
        limit = self.max_update_bytes
        assembler: ChunkFraming = (
            ChunkAssembler(transfer_id=task.task_id, max_bytes=limit) if raw_update(task)
            else TensorMapReceiver(transfer_id=task.task_id, max_bytes=limit))
        pending = _PendingTask(
            task=task,
            assembler=assembler,
            future=loop.create_future(),
            started=time.monotonic(),
            expects_payload=expects_payload,
        )
        self._pending[task.task_id] = pending
        try:
            try:
                pending.bytes_down += self.send(pb.CoordinatorMessage(task=task))
                self.jobs_taken_part.add(task.job_id)
                self.busy = True  # until its answer (or a heartbeat) says otherwise
                if global_state is not None:
                    # headers built (a value the wire cannot carry refused) here, at once
                    chunks = stream_tensor_map(global_state, task.task_id)
                    self.send_stream(self._global_messages(task, chunks, pending))
            except (ConnectionError, TypeError, ValueError) as exc:
                return pending.outcome(self.node_id, False, str(exc))
            try:
                return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
            except TimeoutError:
                reason = f"no result within the round deadline of {timeout:.0f}s"
                self._cancel(task.task_id, reason)
                return pending.outcome(self.node_id, False, reason)
            except asyncio.CancelledError:  # the job was cancelled: free the node now
                self._cancel(task.task_id, "job cancelled")
                raise
        finally:
            self._pending.pop(task.task_id, None)

    @staticmethod
    def _global_messages(task: pb.Task, chunks: Iterator[Chunk],
                         pending: _PendingTask) -> Iterator[pb.CoordinatorMessage]:
        for chunk in chunks:
            message = pb.CoordinatorMessage(
                global_chunk=pb.TaskChunk(task_id=task.task_id, chunk=chunk))
            pending.bytes_down += wire_bytes(message)  # counted as the stream writes it
            yield message

    async def ask_cost(self, job_id: str, round_number: int, timeout: float) -> float | None:
        """Ask the node its participation cost for a round; None if it does not answer in
        time or answers nonsense (it then simply does not bid)."""
        query_id = uuid.uuid4().hex
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._cost_queries[query_id] = future
        try:
            self.send(pb.CoordinatorMessage(cost_query=pb.CostQuery(
                query_id=query_id, job_id=job_id, round=round_number)))
            cost = await asyncio.wait_for(future, timeout)
        except (TimeoutError, ConnectionError):
            return None
        finally:
            self._cost_queries.pop(query_id, None)
        return cost if math.isfinite(cost) and cost >= 0 else None

    def _cancel(self, task_id: str, reason: str) -> None:
        with contextlib.suppress(ConnectionError):
            self.send(pb.CoordinatorMessage(cancel=pb.CancelTask(task_id=task_id, reason=reason)))

    # ------------------------------------------------------------- receiving

    def handle(self, message: pb.NodeMessage) -> pb.CoordinatorMessage | None:
        """Process one message from the node; returns a direct reply, if any."""
        self.last_seen = time.monotonic()
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            # a heartbeat sent before our last task reached the node may still say "idle"
            self.busy = message.heartbeat.busy or bool(self._pending_unsettled())
            return pb.CoordinatorMessage(heartbeat_ack=pb.HeartbeatAck(seq=message.heartbeat.seq))
        if kind == "update_chunk":
            self._on_update_chunk(message)
        elif kind == "result":
            self._on_result(message)
            # the node answers once its task is over: free it now, not at its next heartbeat
            self.busy = bool(self._pending_unsettled())
        elif kind == "failure":
            pending = self._pending.get(message.failure.task_id)
            if pending is not None:
                reason = message.failure.reason[:2000] or "node reported a failure"
                refused = message.failure.refused
                pending.bytes_up += wire_bytes(message)
                pending.settle(pending.outcome(
                    self.node_id, False, f"node {'refused' if refused else 'failed'}: {reason}",
                    needs_full_state=message.failure.needs_full_state, refused=refused))
                # only the failure of a task we were waiting for frees the node (a refusal
                # "busy with another task" does not)
                self.busy = bool(self._pending_unsettled())
        elif kind == "cost_report":
            future = self._cost_queries.get(message.cost_report.query_id)
            if future is not None and not future.done():
                future.set_result(message.cost_report.cost)
        elif kind == "secagg":
            if self.on_secagg is not None:
                self.on_secagg(self.node_id, message.secagg, wire_bytes(message))
        elif kind == "progress":
            p = message.progress
            pending = self._pending.get(p.task_id)
            if pending is not None and self.on_progress is not None:
                self.on_progress(pending.task, p.step, p.total_steps, p.loss)
        else:
            log.warning("node %s sent an unexpected %s message; ignored", self.node_id, kind)
        return None

    def _pending_unsettled(self) -> list[_PendingTask]:
        return [p for p in self._pending.values() if not p.future.done()]

    def _on_update_chunk(self, message: pb.NodeMessage) -> None:
        pending = self._pending.get(message.update_chunk.task_id)
        if pending is None or pending.future.done():
            return  # late chunk of a task that already ended: ignore
        pending.bytes_up += wire_bytes(message)
        try:
            payload = pending.assembler.add(message.update_chunk.chunk)
        except ChunkError as exc:
            pending.settle(pending.outcome(self.node_id, False, f"invalid update stream: {exc}"))
            return
        if payload is not None:
            pending.payload = payload

    def _on_result(self, message: pb.NodeMessage) -> None:
        result = message.result
        pending = self._pending.get(result.task_id)
        if pending is None or pending.future.done():
            return
        pending.bytes_up += wire_bytes(message)
        if pending.payload is None and pending.expects_payload:
            got = pending.assembler.received_bytes
            reason = f"result arrived before the complete update ({got} bytes received)"
            pending.settle(pending.outcome(self.node_id, False, reason))
            return
        pending.settle(
            pending.outcome(
                self.node_id,
                True,
                num_examples=int(result.num_examples),
                metrics=dict(result.metrics),
            )
        )

    def close(self, reason: str) -> None:
        """The stream ended: every task in flight fails now rather than at its deadline."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for pending in list(self._pending.values()):
            pending.settle(pending.outcome(self.node_id, False, f"node disconnected: {reason}"))
        self.outbox.put_nowait(None)


class SessionRegistry:
    """The sessions currently open, by node id (a reconnect replaces the old session)."""

    def __init__(self) -> None:
        self._sessions: dict[str, NodeSession] = {}
        self.changed = asyncio.Event()

    def add(self, session: NodeSession) -> None:
        old = self._sessions.get(session.node_id)
        if old is not None:
            old.close("replaced by a new session from the same node")
        self._sessions[session.node_id] = session
        self.changed.set()

    def remove(self, session: NodeSession) -> None:
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            self.changed.set()

    def get(self, node_id: str) -> NodeSession | None:
        return self._sessions.get(node_id)

    def online(self) -> list[NodeSession]:
        return [s for s in self._sessions.values() if not s.closed]

    async def wait_until(self, ready: Callable[[], T | None], timeout: float) -> T | None:
        """What ``ready`` returns once it is not None, or None after ``timeout`` seconds.
        ``ready`` is asked again whenever a session opens or closes, and at least every
        second (a node's busy flag changes with its heartbeats, which signal nothing)."""
        deadline = time.monotonic() + timeout
        while True:
            value = ready()
            if value is not None:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))

    def expire(self, max_silence_s: float) -> list[NodeSession]:
        """Close sessions silent for longer than ``max_silence_s`` (a dead peer, a partition)."""
        now = time.monotonic()
        expired = [s for s in self.online() if now - s.last_seen > max_silence_s]
        for session in expired:
            session.close(f"no heartbeat for {max_silence_s:.0f}s")
            self.remove(session)
        return expired
