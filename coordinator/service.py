"""The coordinator's gRPC servicer: every RPC validates its input and answers with a proper
status code and a message a person can act on; a bad request never kills the daemon."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide.coordinator.anonymous import AnonymousInbox, AnonymousRejected, ChallengeBook
from confide.coordinator.events import EventLog
from confide.coordinator.jobs import JOB_ID_PATTERN, normalize_spec
from confide.coordinator.minions import AskOrchestrator, AskRejected
from confide.coordinator.protocols import ProtocolRegistry, RegistryFull
from confide.coordinator.runner import JobRunner
from confide.coordinator.sessions import NodeSession, SessionRegistry
from confide.coordinator.store import TERMINAL_STATES, Store
from confide.privacy.ringsig import is_valid_public_key
from confide.protos.anonymity_sets import anonymity_sets, set_size
from confide.protos.chunking import ChunkError, wire_bytes
from confide.protos.identity import (
    REGISTER_DOMAIN,
    RING_KEY_FEATURE,
    SESSION_DOMAIN,
    node_id_for,
    register_message,
    ring_epoch_id,
    ring_key_of,
    session_message,
)
from confide.protos.stream import TensorMapReceiver, stream_tensor_map
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
MAX_ANONYMOUS_UPDATE_BYTES = 1 << 30


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def evaluation_problem(metrics: dict[str, float], dataset: str) -> str | None:
    """Why a ReportEvaluation is refused, or None."""
    if not 1 <= len(metrics) <= 16:
        return f"an evaluation carries 1 to 16 metrics, got {len(metrics)}"
    for name, value in metrics.items():
        if not METRIC_NAME.match(name):
            return f"metric name {name[:70]!r}: lowercase letters, digits and _, at most 64"
        if not math.isfinite(value):
            return f"metric {name} is not a finite number"
    if len(dataset) > 200:
        return "dataset: at most 200 characters"
    return None


def unary(handler):
    """Turn ``_Abort`` into a gRPC status, and any other exception into INTERNAL with the
    exception named, so one bad request never takes the daemon down."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except _Abort as exc:
            await context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"{handler.__name__} failed: {type(exc).__name__}: {exc}")

    return wrapper


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        store: Store,
        sessions: SessionRegistry,
        events: EventLog,
        *,
        mqtt_url: str = "",
        heartbeat_interval_s: float = 5.0,
    ) -> None:
        self.store = store
        self.sessions = sessions
        self.events = events
        self.mqtt_url = mqtt_url
        self.heartbeat_interval_s = heartbeat_interval_s
        self.runners: dict[str, JobRunner] = {}
        self.inbox = AnonymousInbox()
        self.challenges = ChallengeBook()
        self.protocols = ProtocolRegistry(store)

    # ------------------------------------------------------------------ jobs

    def start_job(self, job_id: str) -> None:
        runner = JobRunner(job_id, self.store, self.sessions, self.events, self.inbox)
        self.runners[job_id] = runner
        runner.start()

    def resume_jobs(self) -> list[str]:
        """Restart the runners of jobs that were pending or running when we stopped."""
        job_ids = self.store.job_ids((pb.PENDING, pb.RUNNING))
        for job_id in job_ids:
            self.start_job(job_id)
        return job_ids

    async def stop_jobs(self) -> None:
        for runner in self.runners.values():
            if runner.task is not None and not runner.task.done():
                runner.task.cancel()
        await asyncio.gather(
            *(r.task for r in self.runners.values() if r.task is not None),
            return_exceptions=True,
        )

    def _job_or_abort(self, job_id: str, context) -> pb.JobStatus:
        if not JOB_ID_PATTERN.match(job_id):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"job_id must be 12 lowercase hex characters, got {job_id[:40]!r}")
        status = self.store.job(job_id)
        if status is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"no job {job_id!r}; list jobs with `confide job list`")
        return status

    # ------------------------------------------------------------------ RPCs

    @unary
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        if len(request.public_key) != 32:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "public_key must be a raw 32-byte Ed25519 public key, got "
                         f"{len(request.public_key)} bytes")
        skew = abs(time.time() * 1000 - request.timestamp_ms)
        if skew > MAX_CLOCK_SKEW_MS:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                         f"timestamp is {skew / 1000:.0f}s away from the coordinator's "
                         "clock (limit 300s); fix the node's clock")
        _verify(request.public_key, request.signature,
                register_message(request.public_key, request.timestamp_ms), REGISTER_DOMAIN)
        info = request.info
        if len(info.name) > 128 or len(info.roles) > 16 or len(info.peer_address) > 256:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "node info too large: name <= 128 chars, <= 16 roles, "
                         "peer_address <= 256 chars")
        if len(info.datasets) > 256 or len(info.privacy) > 256:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 256 datasets per node")
        if RING_KEY_FEATURE in info.features and not is_valid_public_key(info.ring_public_key):
            # checked here, once: a bad key in a round's ring would stop its whole set
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "ring_public_key is not a valid ristretto255 element (32 bytes, "
                         "canonical, not the identity) although the node announces "
                         f"{RING_KEY_FEATURE!r}")
        node_id = node_id_for(request.public_key)
        self.store.upsert_node(node_id, request.public_key, info)
        log.info("registered node %s (%s)", node_id, info.name)
        return pb.RegisterResponse(node_id=node_id, mqtt_url=self.mqtt_url)

    async def Session(
        self, request_iterator: AsyncIterator[pb.NodeMessage], context
    ) -> AsyncIterator[pb.CoordinatorMessage]:
        try:
            hello = await asyncio.wait_for(anext(request_iterator), 30)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session must start with hello")
        if hello.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first session message must be `hello`")
        node_id = hello.hello.node_id
        public_key = self.store.node_key(node_id) if len(node_id) <= 64 else None
        if public_key is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"node {node_id[:64]!r} is not registered; call Register first")
        nonce = os.urandom(32)
        yield pb.CoordinatorMessage(challenge=pb.SessionChallenge(nonce=nonce))
        try:
            proof = await asyncio.wait_for(anext(request_iterator), 30)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no proof for the challenge")
        try:
            if proof.WhichOneof("body") != "proof":
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                             "the second session message must be `proof`")
            _verify(public_key, proof.proof.signature, session_message(nonce, node_id),
                    SESSION_DOMAIN)
        except _Abort as exc:
            await context.abort(exc.code, exc.message)

        session = NodeSession(node_id)
        session.on_progress = functools.partial(self._progress, node_id)
        self.sessions.add(session)
        self.store.touch_node(node_id)
        yield pb.CoordinatorMessage(welcome=pb.SessionWelcome(
            heartbeat_interval_s=self.heartbeat_interval_s, mqtt_url=self.mqtt_url))
        log.info("node %s connected", node_id)
        reader = asyncio.create_task(self._read_session(session, request_iterator))
        try:
            while True:
                message = await session.outbox.get()
                if message is None:
                    break
                if isinstance(message, pb.CoordinatorMessage):
                    yield message
                else:  # a streamed state: its chunks are made as they are written
                    for streamed in message:
                        if session.closed:
                            break
                        yield streamed
        finally:
            reader.cancel()
            session.close(session.close_reason or "stream ended")
            self.sessions.remove(session)
            self.store.touch_node(node_id)
            log.info("node %s disconnected: %s", node_id, session.close_reason)

    def _progress(self, node_id: str, task: pb.Task, step: int, total: int, loss: float) -> None:
        if task.anonymous:  # a node's step count would tell its update apart: never publish
            return
        self.events.emit_transient(task.job_id, "node.progress", round_number=task.round,
                                   node_id=node_id, metrics={"step": step, "total_steps": total,
                                                             "loss": loss})

    async def _read_session(self, session: NodeSession, request_iterator) -> None:
        try:
            async for message in request_iterator:
                reply = session.handle(message)
                if reply is not None and not session.closed:
                    session.outbox.put_nowait(reply)
            session.close("node closed the stream")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            session.close(f"stream error: {type(exc).__name__}")

    @unary
    async def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.JobStatus:
        try:
            spec = normalize_spec(request.spec)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid job spec: {exc}") from None
        job_id = uuid.uuid4().hex[:12]
        self.store.create_job(job_id, spec)
        self.events.emit(job_id, "job.submitted", message=spec.name or spec.method,
                         state=pb.PENDING)
        self.start_job(job_id)
        status = self.store.job(job_id)
        assert status is not None
        return status

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.JobStatus:
        return self._job_or_abort(request.job_id, context)

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs = [self.store.job(job_id) for job_id in self.store.job_ids()]
        return pb.ListJobsResponse(jobs=[j for j in jobs if j is not None])

    @unary
    async def CancelJob(self, request: pb.GetJobRequest, context) -> pb.JobStatus:
        status = self._job_or_abort(request.job_id, context)
        if status.state in TERMINAL_STATES:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"job {request.job_id} already ended "
                         f"({pb.JobState.Name(status.state)})")
        runner = self.runners.get(request.job_id)
        if runner is not None:
            await runner.cancel("cancelled by request")
        return self._job_or_abort(request.job_id, context)

    @unary
    async def ReportEvaluation(self, request: pb.EvaluationReport, context) -> pb.Event:
        """The submitter's held-out metrics of a committed round, as an event (validated:
        the coordinator stores them, it cannot check them)."""
        status = self._job_or_abort(request.job_id, context)
        if request.round > status.rounds_completed:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"round {request.round} of job {request.job_id} is not committed "
                         f"({status.rounds_completed} are)")
        metrics = dict(request.metrics)
        problem = evaluation_problem(metrics, request.dataset)
        if problem:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        where = f" on {request.dataset}" if request.dataset else ""
        return self.events.emit(request.job_id, "round.evaluated", round_number=request.round,
                                message=f"held-out evaluation by the submitter{where}",
                                metrics=metrics)

    async def WatchJob(self, request: pb.WatchJobRequest, context) -> AsyncIterator[pb.Event]:
        try:
            self._job_or_abort(request.job_id, context)
        except _Abort as exc:
            await context.abort(exc.code, exc.message)
        async for event in self.events.watch(request.job_id, request.after_seq):
            yield event

    @unary
    async def ListNodes(self, request: pb.ListNodesRequest, context) -> pb.ListNodesResponse:
        nodes = self.store.nodes()
        for node in nodes:
            session = self.sessions.get(node.node_id)
            node.online = session is not None and not session.closed
            node.busy = bool(session and session.busy)
        return pb.ListNodesResponse(nodes=nodes)

    # ------------------------------------------------------------------ trust layer

    @unary
    async def GetRing(self, request: pb.GetRingRequest, context) -> pb.Ring:
        if not request.job_id:  # the registry ring: anonymous agent messages
            keys = sorted({key for n in self.store.nodes()
                           if (key := ring_key_of(n.info)) is not None})
            if len(keys) < 2:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the registry ring has {len(keys)} key(s); anonymity needs "
                             "at least 2 registered nodes")
            return pb.Ring(job_id="", epoch_id=ring_epoch_id(keys), public_keys=keys)
        status = self._job_or_abort(request.job_id, context)
        if not status.spec.anonymous:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"job {request.job_id} is not anonymous: it has no ring")
        keys = self.store.ring(request.job_id, request.round)
        if not keys:
            what = f"round {request.round}'s ring" if request.round else "its ring"
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"job {request.job_id} has not fixed {what} yet (it is fixed when "
                         "the round starts); retry shortly")
        ring = pb.Ring(job_id=request.job_id, epoch_id=ring_epoch_id(keys), public_keys=keys,
                       round=request.round)
        if request.round:  # a round's updates are signed over its anonymity sets
            ring.anonymity_set = set_size(status.spec.anonymity_set)
            for members in anonymity_sets(keys, ring.anonymity_set, request.job_id,
                                          request.round):
                ring.sets.add(members=members)
        return ring

    @unary
    async def GetChallenge(self, request: pb.GetChallengeRequest, context) -> pb.Challenge:
        try:
            return self.challenges.issue()
        except AnonymousRejected as exc:
            raise _Abort(getattr(grpc.StatusCode, exc.code), str(exc)) from None

    @unary
    async def SubmitAnonymousUpdate(self, request_iterator, context) -> pb.AnonymousAck:
        request_iterator = aiter(request_iterator)
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "an anonymous update starts with its signed header")
        header = first.header
        size = wire_bytes(first)
        status = self._job_or_abort(header.job_id, context)
        runner = self.runners.get(header.job_id)
        if status.state != pb.RUNNING or runner is None:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"job {header.job_id} is not running")
        assembler = TensorMapReceiver(max_bytes=MAX_ANONYMOUS_UPDATE_BYTES)
        payload = None
        # an update cannot count after its round: the stream gets the round's deadline, so a
        # client that stalls or dribbles is cut off rather than waited for
        limit = status.spec.round_timeout_s
        deadline = time.monotonic() + limit
        try:
            while True:
                try:
                    message = await asyncio.wait_for(anext(request_iterator),
                                                     deadline - time.monotonic())
                except StopAsyncIteration:
                    break
                if message.WhichOneof("body") != "chunk" or payload is not None:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                 "after the header come the update's chunks, nothing else")
                size += wire_bytes(message)
                payload = assembler.add(message.chunk)
        except ChunkError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"update stream: {exc}") from None
        except TimeoutError:
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"the update did not arrive within the round's deadline of "
                         f"{limit:.0f}s ({assembler.received_bytes} bytes received)") from None
        if payload is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"truncated update stream ({assembler.received_bytes} bytes)")
        try:
            key_image = self.inbox.verify_and_file(header, payload,
                                                   self.store.ring(header.job_id,
                                                                   header.round),
                                                   self.challenges, size,
                                                   set_size=set_size(
                                                       status.spec.anonymity_set),
                                                   payload_sha256=assembler.sha256)
        except AnonymousRejected as exc:
            raise _Abort(getattr(grpc.StatusCode, exc.code), str(exc)) from None
        return pb.AnonymousAck(key_image=key_image)

    @unary
    async def GetLedger(self, request: pb.GetLedgerRequest, context) -> pb.Ledger:
        if request.job_id:
            self._job_or_abort(request.job_id, context)
        return self.store.ledger(request.job_id)

    # ------------------------------------------------------------------ Agora protocols

    @unary
    async def RegisterProtocol(self, request: pb.ProtocolDocument,
                               context) -> pb.ProtocolDocument:
        try:
            return self.protocols.register(request)
        except RegistryFull as exc:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    @unary
    async def GetProtocol(self, request: pb.GetProtocolRequest, context) -> pb.ProtocolDocument:
        try:
            found = self.protocols.get(request.hash)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if found is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"no protocol {request.hash}; list them with `confide protocols list`")
        return found

    @unary
    async def ListProtocols(self, request: pb.ListProtocolsRequest,
                            context) -> pb.ListProtocolsResponse:
        try:
            return pb.ListProtocolsResponse(protocols=self.protocols.list(request.task_kind))
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    @unary
    async def RecordProtocolUse(self, request: pb.RecordProtocolUseRequest,
                                context) -> pb.ProtocolDocument:
        try:
            found = self.protocols.record_use(request.hash, request.count)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if found is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"no protocol {request.hash}; register it first")
        return found

    async def FetchGlobalModel(self, request: pb.FetchGlobalModelRequest,
                               context) -> AsyncIterator[pb.Chunk]:
        try:
            status = self._job_or_abort(request.job_id, context)
            if request.HasField("round") and request.round > status.rounds_completed:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"job {request.job_id} has completed {status.rounds_completed} "
                             f"round(s); round {request.round} is not available yet")
            if request.HasField("round"):
                state = self.store.load_global(request.job_id, request.round)
            else:
                latest = self.store.latest_global(request.job_id)
                state = latest[1] if latest else None
            if state is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"job {request.job_id} has no global model yet; wait for its "
                             "first round")
        except _Abort as exc:
            await context.abort(exc.code, exc.message)
        for chunk in stream_tensor_map(state, f"{request.job_id}-global"):
            yield chunk

    # ------------------------------------------------------------------ agents: Minions

    #: the remote model of Minions (an agents.backends spec; the server sets it from
    #: --remote-model) and a cap on every generation of a question (0: the defaults)
    remote_model = "smollm2"
    minions_max_tokens = 0
    _asks: AskOrchestrator | None = None

    def ask_orchestrator(self) -> AskOrchestrator:
        if self._asks is None:
            self._asks = AskOrchestrator(self.sessions, self.remote_model,
                                         max_tokens=self.minions_max_tokens)
        return self._asks

    async def Ask(self, request: pb.AskRequest, context) -> AsyncIterator[pb.AskEvent]:
        """A question over the nodes' documents (coordinator/minions.py): validated first
        (INVALID_ARGUMENT / FAILED_PRECONDITION), then its events, the answer last."""
        orchestrator = self.ask_orchestrator()
        try:
            plan = orchestrator.validate(request)
        except AskRejected as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        async for event in orchestrator.run(plan):
            yield event


def _verify(public_key: bytes, signature: bytes, message: bytes, domain: bytes) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise _Abort(grpc.StatusCode.UNAUTHENTICATED,
                     f"invalid signature for {domain.decode(errors='replace').rstrip(chr(0))}; "
                     "the node must sign with the key it registered") from None

