"""SFPrompt over the wire: the device's ``RemoteBody`` and the split-server's ``SplitServer``.

``node.split.trainer`` trains through a ``Body`` seam (forward the head's activations, get
the body's output; backward the gradient of that output, get the gradient of the activations).
This module carries that seam over the ``NodePeer.SplitSession`` stream:

    device (RemoteBody)                                  split-server (SplitServer)
    open {job, spec, round}                       ->     build (or reuse) the body, frozen
                                                  <-     ready {layers, parameters}
    forward {step, train, chunks of               ->     LocalBody.forward (keeps the graph)
             {"hidden", "attention_mask"}}
                                                  <-     output {step, chunks of {"hidden"}}
    backward {step, chunks of {"grad"}}           ->     LocalBody.backward (frees the graph)
                                                  <-     input_grad {step, chunks of {"grad"}}
    close / end of stream                         ->     drop every graph of this stream

Tensors travel as the codec's raw little-endian bytes, chunked (activations of any size fit
under the message limit), never pickled. What crosses is only what the seam allows: floating
hidden states, a boolean mask and gradients, never token ids or labels. Every message is
counted (protobuf bytes plus gRPC framing) on both sides.

The device calls from its training thread, so ``RemoteBody`` is a blocking client; the server
runs the body in a worker thread (one lock per body: its devices are served one step at a time)
so its event loop keeps serving. A server that dies or stalls surfaces on the device as
``SplitServerError`` naming the server, the step and the gRPC status, within the task's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import torch

from confide.node.methods import get_method, method_params
from confide.node.methods.sfprompt import SFPromptConfig
from confide.node.models import model_config
from confide.node.policy import AdmissionGate, NodePolicy, Refused, TaskRequest
from confide.node.split.body import LocalBody
from confide.node.split.model import SplitConfig, build_split
from confide.protos.chunking import ChunkError, wire_bytes
from confide.protos.codec import CodecError, WireTensor, to_dense
from confide.protos.stream import TensorMapReceiver, stream_tensor_map
from confide.protos.tls import channel as tls_channel
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc

log = logging.getLogger(__name__)

#: the most one step's tensors may take on the wire (a batch of 64 x 2048 positions x 4096
#: floats is 2 GiB; far beyond what a device sends, far below what would exhaust a server)
MAX_STEP_BYTES = 1 << 30

#: a split session ends this long after the device's own deadline for it at the latest
SESSION_GRACE_S = 10.0
#: the longest a device may hold a split session, whatever deadline its job spec announces
MAX_SESSION_S = 3600.0

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
]


class SplitServerError(RuntimeError):
    """The split-server failed, refused or vanished; the message says which and why."""


def _encode(step: int, tensors: dict[str, torch.Tensor], kind: str,
            train: bool = False) -> Iterator[node_pb2.SplitTensors]:
    chunks = stream_tensor_map({k: v.detach().cpu() for k, v in tensors.items()},
                               f"{kind}-{step}")
    for chunk in chunks:
        yield node_pb2.SplitTensors(step=step, chunk=chunk, train=train)


def _decode(payload: dict[str, WireTensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    decoded = {k: to_dense(v) for k, v in payload.items()}
    if set(decoded) != set(names):
        raise CodecError(f"expected tensors {sorted(names)}, got {sorted(decoded)}")
    return decoded


# --------------------------------------------------------------------------------- device


class RemoteBody:
    """The ``Body`` of ``node.split.body`` on another node, reached over a stream.

    Blocking: each ``forward`` / ``backward`` sends one step's tensors and waits for the
    answer. ``bytes_up`` / ``bytes_down`` count every message of the stream. Use as a
    context manager (or call ``close``) so the server can drop this device's graphs.
    """

    def __init__(self, address: str, job_id: str, spec: pb.JobSpec, round_number: int,
                 timeout_s: float, server_id: str = "") -> None:
        self.address = address
        self.name = f"split-server {server_id[:12] or address} ({address})"
        self.bytes_up = 0
        self.bytes_down = 0
        self._requests: queue.Queue[node_pb2.SplitRequest | None] = queue.Queue()
        self._channel = tls_channel(address, CHANNEL_OPTIONS)  # the node's --tls, if any
        stub = node_grpc.NodePeerStub(self._channel)
        self._replies = stub.SplitSession(iter(self._requests.get, None), timeout=timeout_s)
        self._send(node_pb2.SplitRequest(open=node_pb2.SplitOpen(job_id=job_id, spec=spec,
                                                                 round=round_number)))
        try:
            ready = self._next("opening the session")
        except SplitServerError:
            self.close()  # the request thread and the channel must not outlive the failure
            raise
        if ready.WhichOneof("body") != "ready":
            self.close()
            raise SplitServerError(f"{self.name} answered the opening with "
                                   f"{ready.WhichOneof('body')!r}, not 'ready'")
        self.body_layers = ready.ready.body_layers
        self.body_parameters = ready.ready.body_parameters

    def _send(self, request: node_pb2.SplitRequest) -> None:
        self.bytes_up += wire_bytes(request)
        self._requests.put(request)

    def _next(self, what: str) -> node_pb2.SplitReply:
        try:
            reply = next(self._replies)
        except StopIteration:
            raise SplitServerError(f"{self.name} ended the stream while {what}") from None
        except grpc.RpcError as exc:
            raise SplitServerError(
                f"{self.name} failed while {what}: {exc.code().name}: {exc.details()}"
            ) from None
        self.bytes_down += wire_bytes(reply)
        return reply

    def _exchange(self, step: int, kind: str, tensors: dict[str, torch.Tensor],
                  answer: str, names: tuple[str, ...], train: bool = False) -> torch.Tensor:
        for piece in _encode(step, tensors, kind, train):
            self._send(node_pb2.SplitRequest(**{kind: piece}))
        what = f"step {step} ({kind})"
        assembler = TensorMapReceiver(transfer_id=f"{answer}-{step}", max_bytes=MAX_STEP_BYTES)
        while True:
            reply = self._next(what)
            if reply.WhichOneof("body") != answer or getattr(reply, answer).step != step:
                raise SplitServerError(f"{self.name} answered {what} out of protocol")
            try:
                payload = assembler.add(getattr(reply, answer).chunk)
                if payload is not None:
                    return _decode(payload, names)[names[0]]
            except (ChunkError, CodecError) as exc:
                raise SplitServerError(f"{self.name} sent a malformed answer to {what}: "
                                       f"{exc}") from None

    def forward(self, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor, *,
                train: bool = True) -> torch.Tensor:
        out = self._exchange(step, "forward", {"hidden": hidden,
                                               "attention_mask": attention_mask},
                             "output", ("hidden",), train)
        return out.to(hidden.device)

    def backward(self, step: int, grad_output: torch.Tensor) -> torch.Tensor:
        grad = self._exchange(step, "backward", {"grad": grad_output}, "input_grad", ("grad",))
        return grad.to(grad_output.device)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._send(node_pb2.SplitRequest(close=node_pb2.SplitClose()))
        self._requests.put(None)
        with contextlib.suppress(Exception):
            self._replies.cancel()
        self._channel.close()

    def __enter__(self) -> RemoteBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------- server


class SplitRequestError(ValueError):
    """A device's request cannot be served; sent back as INVALID_ARGUMENT."""


class _ServedBody:
    """One built body and the lock that serializes the steps run on it."""

    def __init__(self, module: torch.nn.Module, layers: int) -> None:
        self.module = module
        self.layers = layers
        self.parameters = sum(p.numel() for p in module.parameters())
        self.lock = threading.Lock()
        #: held for a whole session when the job trains the body (body_lr > 0)
        self.training = asyncio.Lock()


class SplitServer:
    """The split-server side of ``NodePeer.SplitSession``: builds the body a job asks for
    (seeded, so it matches what the devices cut away), keeps the last ``max_bodies`` built,
    and runs each stream's steps through its own ``LocalBody``."""

    def __init__(self, device: torch.device, cache_dir: Any = None, max_bodies: int = 2,
                 gate: AdmissionGate | None = None) -> None:
        self.device = device
        #: the node owner's policy: a session it refuses is PERMISSION_DENIED with the reason
        self.gate = gate or AdmissionGate(NodePolicy())
        self.cache_dir = cache_dir
        self.max_bodies = max_bodies
        self._bodies: OrderedDict[bytes, _ServedBody] = OrderedDict()
        self._build_lock = asyncio.Lock()
        self._streams = itertools.count()
        #: bytes received / sent over all streams (what the server saw on the wire)
        self.bytes_received = 0
        self.bytes_sent = 0

    def _configs(self, open_: node_pb2.SplitOpen) -> tuple[Any, SFPromptConfig]:
        spec = open_.spec
        if spec.method != "sfprompt":
            raise SplitRequestError(f"this split-server serves SFPrompt jobs, not "
                                    f"{spec.method!r}")
        try:
            config = get_method("sfprompt").parse_config(method_params(spec))
            model_cfg = model_config(spec.model)
            model_cfg.validate()
        except ValueError as exc:
            raise SplitRequestError(f"invalid job spec: {exc}") from None
        assert isinstance(config, SFPromptConfig)
        return model_cfg, config

    async def _body(self, open_: node_pb2.SplitOpen) -> tuple[_ServedBody, SFPromptConfig]:
        model_cfg, config = self._configs(open_)
        split = SplitConfig.from_method(config, model_cfg.seed)
        key = open_.spec.model.SerializeToString(deterministic=True) + repr(split).encode()
        async with self._build_lock:
            served = self._bodies.pop(key, None)
            if served is None:
                log.info("building the body of job %s (%s, head %d / tail %d layers)",
                         open_.job_id, model_cfg.base, split.head_layers, split.tail_layers)
                try:
                    parts = await asyncio.to_thread(build_split, model_cfg, split, "server",
                                                    self.cache_dir)
                except ValueError as exc:
                    raise SplitRequestError(f"cannot build the body: {exc}") from None
                assert parts.body is not None
                module = parts.body.to(self.device)
                served = _ServedBody(module, len(parts.body.stack.layers))
            self._bodies[key] = served
            while len(self._bodies) > self.max_bodies:
                self._bodies.popitem(last=False)
        return served, config

    async def session(self, requests: AsyncIterator[node_pb2.SplitRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.SplitReply]:
        stream = next(self._streams)
        requests = aiter(requests)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("body") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "a split session starts with `open` (job and spec)")
        self.bytes_received += wire_bytes(first)
        try:
            self.gate.admit(TaskRequest(role="split-server", spec=first.open.spec,
                                        job_id=first.open.job_id, dataset=""))
        except Refused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"the split-server's policy refuses the session: {exc}")
        try:
            served, config = await self._body(first.open)
        except SplitRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if config.body_lr > 0:
            # a trained body is shared by the job's devices: one device's optimizer step
            # would invalidate another's pending graph, so trained sessions take turns
            await served.training.acquire()
        body = LocalBody(served.module, lr=config.body_lr)
        # the device's own stream deadline (RemoteBody: the round's, at least 30 s) bounds the
        # session here too: a device that stalls or dribbles is cut off, not waited for; the
        # device's claim is capped, the server decides how long it lends its body
        limit = min(max(first.open.spec.round_timeout_s, 30.0), MAX_SESSION_S) + SESSION_GRACE_S
        deadline = time.monotonic() + limit
        log.info("split session %d for job %s round %d opened", stream, first.open.job_id,
                 first.open.round)
        reply = node_pb2.SplitReply(ready=node_pb2.SplitReady(
            body_layers=served.layers, body_parameters=served.parameters))
        self.bytes_sent += wire_bytes(reply)
        yield reply
        assembler: TensorMapReceiver | None = None
        # the node policy's payload cap bounds what one step's headers may allocate
        step_cap = min(MAX_STEP_BYTES, self.gate.policy.caps.payload_bytes)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(anext(requests),
                                                     deadline - time.monotonic())
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"split session exceeded the round's deadline of "
                                        f"{limit:.0f}s")
                self.bytes_received += wire_bytes(request)
                kind = request.WhichOneof("body")
                if kind == "close":
                    break
                if kind not in ("forward", "backward"):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"unexpected {kind!r} inside a split session")
                piece = getattr(request, kind)
                if assembler is None:
                    assembler = TensorMapReceiver(transfer_id=f"{kind}-{piece.step}",
                                                  max_bytes=step_cap)
                try:
                    payload = assembler.add(piece.chunk)
                    if payload is None:
                        continue
                    assembler = None
                    answer, tensors = await self._run(served, body, kind, piece, payload)
                except (ChunkError, CodecError, SplitRequestError) as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"step {piece.step} ({kind}): {exc}")
                for out in _encode(piece.step, tensors, answer):
                    reply = node_pb2.SplitReply(**{answer: out})
                    self.bytes_sent += wire_bytes(reply)
                    yield reply
        finally:
            body.reset()
            if config.body_lr > 0:
                served.training.release()
            log.info("split session %d closed", stream)

    async def _run(self, served: _ServedBody, body: LocalBody, kind: str,
                   piece: node_pb2.SplitTensors,
                   payload: dict[str, WireTensor]) -> tuple[str, dict[str, torch.Tensor]]:
        """Run one step in a worker thread; bad tensors become SplitRequestError."""
        if kind == "forward":
            tensors = _decode(payload, ("attention_mask", "hidden"))
            if tensors["attention_mask"].dtype != torch.bool:
                raise SplitRequestError("attention_mask must be a bool tensor")
            call = (body.forward, piece.step, tensors["hidden"], tensors["attention_mask"])
            kwargs = {"train": piece.train}
            answer, name = "output", "hidden"
        else:
            tensors = _decode(payload, ("grad",))
            call, kwargs = (body.backward, piece.step, tensors["grad"]), {}
            answer, name = "input_grad", "grad"

        def run() -> torch.Tensor:
            with served.lock:
                return call[0](*call[1:], **kwargs)

        try:
            out = await asyncio.to_thread(run)
        except (ValueError, RuntimeError) as exc:  # shapes that do not fit the body, etc.
            raise SplitRequestError(str(exc).splitlines()[0][:500]) from None
        return answer, {name: out}
