"""In-process fakes for unit tests of the round engine: a node without a process or a stream.

``FakeNode`` plays the node's end of a real ``NodeSession``: it reads what the coordinator put
in the session's outbox (tasks, global state chunks, cost queries) and answers through
``NodeSession.handle``, as the session stream would. So everything coordinator-side is real
(session deadlines and byte counts, store, event log, methods); only the node is scripted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import torch

from confide.coordinator.sessions import NodeSession, SessionRegistry
from confide.coordinator.store import Store
from confide.protos.chunking import split_payload
from confide.protos.codec import WireTensor
from confide.protos.stream import TensorMapReceiver, stream_tensor_map
from confide.v1 import coordinator_pb2 as pb


async def outbox_messages(session: NodeSession) -> AsyncIterator[pb.CoordinatorMessage]:
    """What the session's stream would write, in order: streamed states chunk by chunk."""
    while (message := await session.outbox.get()) is not None:
        if isinstance(message, pb.CoordinatorMessage):
            yield message
        else:
            for streamed in message:
                yield streamed


@dataclass
class Reply:
    """A node's answer to one task. ``update``: the tensors it sends (``raw``: bytes
    instead, e.g. garbage); ``failure``: it reports a failure; ``silent``: it never answers."""

    update: Mapping[str, WireTensor] | None = None
    raw: bytes | None = None
    num_examples: int = 10
    metrics: dict[str, float] = field(default_factory=dict)
    failure: str = ""
    silent: bool = False
    #: the failure is the node owner's refusal (TaskFailure.refused)
    refused: bool = False


#: (task, the global state it came with or None) -> the node's reply
Behaviour = Callable[[pb.Task, dict[str, torch.Tensor] | None], Reply]

INITIAL_STATE = {"w": torch.zeros(4)}


def honest(step: float = 1.0) -> Behaviour:
    """INIT: ``INITIAL_STATE``; TRAIN: the FedAvg delta ``step`` on every entry."""
    def behave(task: pb.Task, state: dict[str, torch.Tensor] | None) -> Reply:
        if task.kind == pb.INIT:
            return Reply(update=INITIAL_STATE)
        assert state is not None
        return Reply(update={k: torch.full_like(v, step) for k, v in state.items()})

    return behave


class FakeNode:
    def __init__(self, node_id: str, behaviour: Behaviour, *, cost: float | None = None,
                 examples: int = 100, roles: tuple[str, ...] = ()) -> None:
        self.node_id = node_id
        self.behaviour = behaviour
        self.cost = cost
        self.examples = examples
        self.roles = roles
        self.session = NodeSession(node_id)
        self.tasks: list[pb.Task] = []
        self._serving: asyncio.Task | None = None

    def join(self, store: Store, sessions: SessionRegistry) -> FakeNode:
        """Register (as the Register RPC would) and open the session (as Session would)."""
        info = pb.NodeInfo(name=self.node_id, roles=list(self.roles))
        if self.examples:
            info.datasets["train"] = self.examples
        store.upsert_node(self.node_id, self.node_id.encode().ljust(32, b"\0")[:32], info)
        sessions.add(self.session)
        self._serving = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def leave(self) -> None:
        self.session.close("test over")
        if self._serving is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving

    async def _serve(self) -> None:
        assemblers: dict[str, TensorMapReceiver] = {}
        async for message in outbox_messages(self.session):
            kind = message.WhichOneof("body")
            if kind == "task":
                task = message.task
                self.tasks.append(task)
                if task.has_global:
                    assemblers[task.task_id] = TensorMapReceiver(transfer_id=task.task_id)
                else:
                    self._answer(task, None)
            elif kind == "global_chunk":
                chunk = message.global_chunk
                payload = assemblers[chunk.task_id].add(chunk.chunk)
                if payload is not None:
                    task = next(t for t in self.tasks if t.task_id == chunk.task_id)
                    state = dict(payload)
                    self._answer(task, state)
            elif kind == "cost_query" and self.cost is not None:
                self.session.handle(pb.NodeMessage(cost_report=pb.CostReport(
                    query_id=message.cost_query.query_id, cost=self.cost)))

    def _answer(self, task: pb.Task, state: dict[str, torch.Tensor] | None) -> None:
        reply = self.behaviour(task, state)
        if reply.silent:
            return
        if reply.failure:
            self.session.handle(pb.NodeMessage(failure=pb.TaskFailure(
                task_id=task.task_id, reason=reply.failure, refused=reply.refused)))
            return
        chunks = (split_payload(reply.raw, task.task_id) if reply.raw is not None
                  else stream_tensor_map(reply.update or {}, task.task_id))
        for chunk in chunks:
            self.session.handle(pb.NodeMessage(update_chunk=pb.TaskChunk(
                task_id=task.task_id, chunk=chunk)))
        self.session.handle(pb.NodeMessage(result=pb.TaskResult(
            task_id=task.task_id, num_examples=reply.num_examples, metrics=reply.metrics)))


class SecureFakeNode(FakeNode):
    """A fake node that also speaks secure aggregation with the real node-side code
    (``node/secagg.py``) and a real Ed25519 key (its id is the key's hash, as registered).
    ``drop_after``: "" (honest), "advertise" (answers the Setup, then goes silent), "share"
    (shares keys, never uploads) or "masked" (uploads its masked input, then goes silent)."""

    def __init__(self, name: str, behaviour: Behaviour, *, drop_after: str = "",
                 examples: int = 100) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from confide.node.secagg import NodeSecureAggregation
        from confide.protos.identity import node_id_for

        self.key = Ed25519PrivateKey.generate()
        self.public_key = self.key.public_key().public_bytes_raw()
        super().__init__(node_id_for(self.public_key), behaviour, examples=examples)
        self.name = name
        self.drop_after = drop_after
        self.secagg = NodeSecureAggregation(self.node_id, self.key.sign, self._send_secagg)
        self.sent: list[pb.NodeMessage] = []
        self.uploads: list[bytes] = []
        self._stage = 0
        self._background: set[asyncio.Task] = set()

    def _send_secagg(self, message: pb.NodeMessage) -> None:
        self.sent.append(message)
        self.session.handle(message)

    def join(self, store: Store, sessions: SessionRegistry) -> FakeNode:
        info = pb.NodeInfo(name=self.name)
        info.datasets["train"] = self.examples
        store.upsert_node(self.node_id, self.public_key, info)
        sessions.add(self.session)
        self._serving = asyncio.get_running_loop().create_task(self._serve())
        return self

    async def _serve(self) -> None:
        assemblers: dict[str, TensorMapReceiver] = {}
        async for message in outbox_messages(self.session):
            kind = message.WhichOneof("body")
            if kind == "secagg":
                stage = {"advertise": 1, "share": 2, "masked": 3}.get(self.drop_after, 99)
                if self._stage >= stage:
                    continue  # gone
                self.secagg.handle(message.secagg)
                self._stage += 1 if self._stage < 2 else 0
            elif kind == "task":
                task = message.task
                self.tasks.append(task)
                if task.has_global:
                    assemblers[task.task_id] = TensorMapReceiver(transfer_id=task.task_id)
                else:
                    self._spawn(task, None)
            elif kind == "global_chunk":
                chunk = message.global_chunk
                payload = assemblers[chunk.task_id].add(chunk.chunk)
                if payload is not None:
                    task = next(t for t in self.tasks if t.task_id == chunk.task_id)
                    self._spawn(task, dict(payload))

    def _spawn(self, task: pb.Task, state: dict[str, torch.Tensor] | None) -> None:
        job = asyncio.get_running_loop().create_task(self._answer_secure(task, state))
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _answer_secure(self, task: pb.Task, state: dict[str, torch.Tensor] | None) -> None:
        if task.kind != pb.TRAIN or not task.spec.secure_aggregation:
            self._answer(task, state)
            return
        if self.drop_after in ("advertise", "share"):
            return  # never uploads
        reply = self.behaviour(task, state)
        assert state is not None and reply.update is not None
        masked, _clipped = await self.secagg.masked_input(
            task, reply.update, reply.num_examples, state, timeout=5.0)
        self.uploads.append(masked)
        for chunk in split_payload(masked, task.task_id):
            self.session.handle(pb.NodeMessage(update_chunk=pb.TaskChunk(
                task_id=task.task_id, chunk=chunk)))
        self.session.handle(pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id)))
        self._stage = 3
