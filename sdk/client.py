"""The Python client SDK: a typed face of the wire contract.

``AsyncClient`` is async (grpc.aio); ``Client`` wraps it for scripts and
notebooks (both are exported at the top: ``from confide import Client``). Errors from the
coordinator arrive as ``ConfideError`` with the gRPC status code and its message::

    from confide import Client, job_spec

    with Client("127.0.0.1:50051") as client:
        job = client.submit_job(job_spec("fedavg-lora", rounds=3, min_nodes=2, base="minilm",
                                         num_labels=5))
        for event in client.watch_job(job.job_id):
            print(event.kind, event.round, dict(event.metrics))
        adapter = client.fetch_global_model(job.job_id)   # dict[str, torch.Tensor]
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf import struct_pb2

from confide.protos.codec import to_dense
from confide.protos.identity import NodeKey
from confide.protos.stream import receive_tensor_map_async
from confide.protos.tls import PROCESS as TLS_PROCESS
from confide.protos.tls import TLSConfig, aio_channel
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc

T = TypeVar("T")

TERMINAL_STATES = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)
#: the environment variable a client token is read from when none is given
TOKEN_ENV = "CONFIDE_TOKEN"
#: where a coordinator keeps its client token (coordinator/auth.py)
TOKEN_FILE = "client_token"


def resolve_token(token: str | None = None,
                  coordinator_data: str | Path | None = None) -> str:
    """The client token to send: ``token`` if given, else $CONFIDE_TOKEN, else the one the
    coordinator keeps in ``coordinator_data`` (its --data folder, on this machine), else ""."""
    if token:
        return token
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if coordinator_data:
        try:
            return (Path(coordinator_data) / TOKEN_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            return ""
    return ""


class ConfideError(Exception):
    """An RPC failed; ``code`` is the gRPC status, the message is the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


def refusals(status: pb.JobStatus) -> dict[tuple[int, str], str]:
    """Every refusal of a job's tasks by a node's owner: (round, node id) -> the node's
    reason (its policy or privacy budget). A job every node refused fails, and its
    ``reason`` carries them all too."""
    prefix = "node refused: "
    return {(summary.round, node): reason.removeprefix(prefix)
            for summary in status.rounds for node, reason in summary.dropped.items()
            if reason.startswith(prefix)}


def _wrap(exc: grpc.aio.AioRpcError) -> ConfideError:
    return ConfideError(exc.code(), exc.details() or "")


def job_spec(
    method: str = "fedavg-lora",
    *,
    name: str = "",
    rounds: int = 3,
    min_nodes: int = 1,
    nodes_per_round: int = 0,
    task: str = "sequence-classification",
    base: str = "tiny-bert",
    num_labels: int = 2,
    max_length: int = 128,
    lora_r: int = 8,
    lora_alpha: float = 0.0,
    lora_dropout: float = 0.0,
    target_modules: tuple[str, ...] = (),
    epochs: int = 1,
    max_steps: int = 0,
    batch_size: int = 16,
    learning_rate: float = 5e-4,
    dataset: str = "train",
    round_timeout_s: float = 600.0,
    wait_for_nodes_s: float = 60.0,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    anonymous: bool = False,
    anonymity_set: int = 0,
    budget: float = 0.0,
    secure_aggregation: bool = False,
    optimizer: str = "",
    head_learning_rate: float = 0.0,
) -> pb.JobSpec:
    """Build a JobSpec with readable keyword arguments (0 means "coordinator default").
    ``secure_aggregation``: the coordinator learns only each round's sum (SecAgg+).
    ``optimizer``: the nodes' local optimizer ("adamw", the default, or "sgd");
    ``head_learning_rate``: the task head's own rate (0: ``learning_rate``)."""
    spec = pb.JobSpec(
        name=name,
        method=method,
        rounds=rounds,
        min_nodes=min_nodes,
        nodes_per_round=nodes_per_round,
        round_timeout_s=round_timeout_s,
        wait_for_nodes_s=wait_for_nodes_s,
        seed=seed,
        anonymous=anonymous,
        anonymity_set=anonymity_set,
        budget=budget,
        secure_aggregation=secure_aggregation,
        model=pb.ModelSpec(
            task=task,
            base=base,
            num_labels=num_labels if task == "sequence-classification" else 0,
            max_length=max_length,
            seed=seed,
            lora=pb.LoraSpec(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                             target_modules=list(target_modules)),
        ),
        train=pb.TrainSpec(local_epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                           learning_rate=learning_rate, dataset=dataset, optimizer=optimizer,
                           head_learning_rate=head_learning_rate),
    )
    if params:
        struct = struct_pb2.Struct()
        struct.update(dict(params))
        spec.method_params.CopyFrom(struct)
    return spec


class AsyncClient:
    """Async client of the coordinator."""

    def __init__(self, address: str, *, timeout: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 tls: TLSConfig | str | Path | EllipsisType | None = TLS_PROCESS,
                 tls_name: str = "", token: str | None = None,
                 coordinator_data: str | Path | None = None) -> None:
        """``tls``: a ``protos.tls.TLSConfig`` or a ``--tls`` folder (``ca.pem`` and, for
        a coordinator that requires client certificates, ``NAME.pem``/``NAME.key``); None is
        plaintext; by default the process's ``protos.tls.configure`` (plaintext if unset).
        ``credentials`` (raw gRPC channel credentials) wins over ``tls``.
        ``token``: the coordinator's client token, needed to submit (and, unless it runs
        with --open-reads, to read) when it listens beyond loopback without TLS; by default
        $CONFIDE_TOKEN, or the file in ``coordinator_data`` (the coordinator's --data)."""
        self.address = address
        self.timeout = timeout
        token = resolve_token(token, coordinator_data)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
        if isinstance(tls, str | Path):
            tls = TLSConfig.from_folder(tls, tls_name)
        if credentials is None:
            self._channel = aio_channel(address, options, tls=tls)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Callable, request) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _wrap(exc) from None

    async def register_node(self, key: NodeKey,
                            info: pb.NodeInfo | None = None) -> pb.RegisterResponse:
        timestamp, signature = key.sign_registration()
        request = pb.RegisterRequest(public_key=key.public_bytes, info=info or pb.NodeInfo(),
                                     timestamp_ms=timestamp, signature=signature)
        return await self._call(self._stub.Register, request)

    async def submit_job(self, spec: pb.JobSpec) -> pb.JobStatus:
        return await self._call(self._stub.SubmitJob, pb.SubmitJobRequest(spec=spec))

    async def get_job(self, job_id: str) -> pb.JobStatus:
        return await self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    async def cancel_job(self, job_id: str) -> pb.JobStatus:
        return await self._call(self._stub.CancelJob, pb.GetJobRequest(job_id=job_id))

    async def report_evaluation(self, job_id: str, round_number: int,
                                metrics: Mapping[str, float], dataset: str = "") -> pb.Event:
        """Record your own held-out metrics of a committed round (the data stays with you);
        the dashboard charts them."""
        request = pb.EvaluationReport(job_id=job_id, round=round_number, dataset=dataset)
        request.metrics.update({k: float(v) for k, v in metrics.items()})
        return await self._call(self._stub.ReportEvaluation, request)

    async def list_jobs(self) -> list[pb.JobStatus]:
        return list((await self._call(self._stub.ListJobs, pb.ListJobsRequest())).jobs)

    async def list_nodes(self) -> list[pb.NodeStatus]:
        return list((await self._call(self._stub.ListNodes, pb.ListNodesRequest())).nodes)

    async def get_ring(self, job_id: str = "", round_number: int = 0) -> pb.Ring:
        """The ring of one round of an anonymous job (the selected nodes' ring keys), the
        job's members (``round_number`` 0), or ("") every registered node's ring key."""
        return await self._call(self._stub.GetRing,
                                pb.GetRingRequest(job_id=job_id, round=round_number))

    async def get_ledger(self, job_id: str = "") -> pb.Ledger:
        """Incentive payments per node and round (one job, or all with "")."""
        return await self._call(self._stub.GetLedger, pb.GetLedgerRequest(job_id=job_id))

    async def register_protocol(self, document: pb.ProtocolDocument) -> pb.ProtocolDocument:
        """Store an Agora protocol document; the answer carries its hash (idempotent)."""
        return await self._call(self._stub.RegisterProtocol, document)

    async def get_protocol(self, hash_: str) -> pb.ProtocolDocument:
        """The protocol document with this hash (NOT_FOUND if none)."""
        return await self._call(self._stub.GetProtocol, pb.GetProtocolRequest(hash=hash_))

    async def list_protocols(self, task_kind: str = "") -> list[pb.ProtocolDocument]:
        """Protocol documents for ``task_kind`` ("" = all), most used first."""
        response = await self._call(self._stub.ListProtocols,
                                    pb.ListProtocolsRequest(task_kind=task_kind))
        return list(response.protocols)

    async def record_protocol_use(self, hash_: str, count: int = 1) -> pb.ProtocolDocument:
        """Add ``count`` uses to a protocol's counter."""
        return await self._call(self._stub.RecordProtocolUse,
                                pb.RecordProtocolUseRequest(hash=hash_, count=count))

    async def watch_job(self, job_id: str, after_seq: int = 0) -> AsyncIterator[pb.Event]:
        """Past events, then live ones, until the job ends."""
        call = self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_seq=after_seq),
                                   metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _wrap(exc) from None
        finally:
            call.cancel()

    async def wait_job(self, job_id: str,
                       on_event: Callable[[pb.Event], None] | None = None) -> pb.JobStatus:
        """Follow the job's events until it ends; return its final status."""
        async for event in self.watch_job(job_id):
            if on_event is not None:
                on_event(event)
        return await self.get_job(job_id)

    async def fetch_global_model(self, job_id: str, round_number: int | None = None
                                 ) -> dict[str, torch.Tensor]:
        """The global state after ``round_number`` (0: initial; None: the latest)."""
        request = pb.FetchGlobalModelRequest(job_id=job_id, round=round_number)
        call = self._stub.FetchGlobalModel(request, timeout=max(self.timeout, 300),
                                           metadata=self._metadata)
        try:
            received = await receive_tensor_map_async(call)
        except grpc.aio.AioRpcError as exc:
            raise _wrap(exc) from None
        return {name: to_dense(value) for name, value in received.items()}

    async def ask(self, question: str, *, mode: str = "minions", node_ids: Sequence[str] = (),
                  max_rounds: int = 0, citations: str = "", anonymous: bool = False,
                  timeout: float | None = None) -> AsyncIterator[pb.AskEvent]:
        """Ask a question over the nodes' private documents (Minions). Yields the AskEvents
        as they happen ("plan", "node.answered", "round"), the "answer" (or "error") last;
        token counts on each event are the totals so far. ``mode``: "minions", "minion" or
        "local-only"; ``citations``: "allow", "short", "none" ("" = the coordinator's
        default: allow, none when ``anonymous``); ``node_ids``: () = every online node."""
        request = pb.AskRequest(question=question, mode=mode, node_ids=list(node_ids),
                                max_rounds=max_rounds, citations=citations,
                                anonymous=anonymous)
        call = self._stub.Ask(request, timeout=timeout, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _wrap(exc) from None
        finally:
            call.cancel()


class Client:
    """Blocking wrapper: runs an ``AsyncClient`` on a private event loop thread."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="confide-sdk")
        self._thread.start()
        self._client: AsyncClient = self._run(self._make(address, kwargs))

    @staticmethod
    async def _make(address: str, kwargs: dict) -> AsyncClient:
        return AsyncClient(address, **kwargs)

    def _run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def register_node(self, key: NodeKey, info: pb.NodeInfo | None = None) -> pb.RegisterResponse:
        return self._run(self._client.register_node(key, info))

    def submit_job(self, spec: pb.JobSpec) -> pb.JobStatus:
        return self._run(self._client.submit_job(spec))

    def get_job(self, job_id: str) -> pb.JobStatus:
        return self._run(self._client.get_job(job_id))

    def cancel_job(self, job_id: str) -> pb.JobStatus:
        return self._run(self._client.cancel_job(job_id))

    def report_evaluation(self, job_id: str, round_number: int,
                          metrics: Mapping[str, float], dataset: str = "") -> pb.Event:
        return self._run(self._client.report_evaluation(job_id, round_number, metrics, dataset))

    def list_jobs(self) -> list[pb.JobStatus]:
        return self._run(self._client.list_jobs())

    def list_nodes(self) -> list[pb.NodeStatus]:
        return self._run(self._client.list_nodes())

    def get_ring(self, job_id: str = "", round_number: int = 0) -> pb.Ring:
        return self._run(self._client.get_ring(job_id, round_number))

    def get_ledger(self, job_id: str = "") -> pb.Ledger:
        return self._run(self._client.get_ledger(job_id))

    def register_protocol(self, document: pb.ProtocolDocument) -> pb.ProtocolDocument:
        return self._run(self._client.register_protocol(document))

    def get_protocol(self, hash_: str) -> pb.ProtocolDocument:
        return self._run(self._client.get_protocol(hash_))

    def list_protocols(self, task_kind: str = "") -> list[pb.ProtocolDocument]:
        return self._run(self._client.list_protocols(task_kind))

    def record_protocol_use(self, hash_: str, count: int = 1) -> pb.ProtocolDocument:
        return self._run(self._client.record_protocol_use(hash_, count))

    def fetch_global_model(self, job_id: str,
                           round_number: int | None = None) -> dict[str, torch.Tensor]:
        return self._run(self._client.fetch_global_model(job_id, round_number))

    def wait_job(self, job_id: str,
                 on_event: Callable[[pb.Event], None] | None = None) -> pb.JobStatus:
        return self._run(self._client.wait_job(job_id, on_event))

    def watch_job(self, job_id: str, after_seq: int = 0) -> Iterator[pb.Event]:
        return self._blocking(self._client.watch_job(job_id, after_seq))

    def ask(self, question: str, **kwargs: Any) -> Iterator[pb.AskEvent]:
        """``AsyncClient.ask``, blocking: iterate to follow the question to its answer."""
        return self._blocking(self._client.ask(question, **kwargs))

    def _blocking(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """An async stream of the private loop, iterated here; closed when left early."""
        try:
            while True:
                try:
                    yield self._run(anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():
                self._run(iterator.aclose())


#: names of the SDK before 0.2 (``protos.sdk``), kept one release for old code
DEPRECATED_NAMES = {"ConfideClient": "AsyncClient", "SyncConfideClient": "Client"}


def __getattr__(name: str) -> Any:
    """``SyncConfideClient``/``ConfideClient`` still work, with a DeprecationWarning."""
    if name in DEPRECATED_NAMES:
        import warnings

        new = DEPRECATED_NAMES[name]
        warnings.warn(f"{name} is deprecated: use confide.{new}", DeprecationWarning,
                      stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
