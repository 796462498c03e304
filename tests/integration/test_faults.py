"""Faults against real daemons on 127.0.0.1: garbage on every RPC of both services, hostile but
well-formed peer requests, oversized streams, slow-loris clients, the MQTT broker killed
mid-job, the coordinator killed mid-job. After each: the daemons still serve, and nothing
stored is lost or corrupted (SQLite integrity, jobs and rounds rows, every saved safetensors).

The network partition of a node is in test_netns.py (it needs network namespaces)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import aiomqtt
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open

from confide.cluster.local import LocalCluster
from confide.coordinator.broker import free_port
from confide.coordinator.jobs import normalize_spec
from confide.node.merging.fetch import fetch_neighbours
from confide.protos.events import BrokerAddress, event_from_json
from confide.protos.identity import NodeKey
from confide.sdk.client import Client, ConfideError
from confide.v1 import common_pb2, node_pb2
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2_grpc as node_grpc
from tests.integration.helpers import tiny_spec, wait_for_nodes

pytestmark = pytest.mark.integration

GARBAGE = bytes(range(256)) * 4  # field number 0: no protobuf message parses it
MiB = 1 << 20


# ---------------------------------------------------------------- what "intact" means


def check_coordinator_store(folder: Path, job_ids: set[str] | None = None) -> dict:
    """The coordinator's SQLite passes PRAGMA integrity_check; every job's rounds 1..N are
    committed rows with their global model on disk (rounds 0..N, each loadable, finite, with
    its round in the metadata); event numbers run without gaps; no temporary file is left."""
    db = sqlite3.connect(f"file:{folder / 'coordinator.sqlite'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        jobs = {job_id: (pb.JobSpec.FromString(spec), state, done) for job_id, spec, state, done
                in db.execute("SELECT job_id, spec, state, rounds_completed FROM jobs")}
        assert job_ids is None or job_ids <= set(jobs), job_ids - set(jobs)
        for job_id, (spec, state, done) in jobs.items():
            rounds = dict(db.execute("SELECT round, state FROM rounds WHERE job_id = ?",
                                     (job_id,)).fetchall())
            assert [r for r in range(1, done + 1) if rounds.get(r) != "completed"] == [], \
                (job_id, rounds)
            if state == pb.COMPLETED:
                assert done == len([s for s in rounds.values() if s == "completed"])
            seqs = [s for (s,) in db.execute(
                "SELECT seq FROM events WHERE job_id = ? ORDER BY seq", (job_id,))]
            assert seqs == list(range(1, len(seqs) + 1)), (job_id, seqs[:20])
            models = folder / "jobs" / job_id
            if spec.method == "dimat":  # decentralized: the coordinator keeps no model
                assert not models.exists()
                continue
            if done > 0 or state == pb.COMPLETED:  # committed: initial state + each round
                for r in range(done + 1):
                    _check_safetensors(models / f"global-r{r:05d}.safetensors", round_=r)
    finally:
        db.close()
    assert not list(folder.rglob("*.tmp")), list(folder.rglob("*.tmp"))
    return jobs


def _check_safetensors(path: Path, round_: int | None = None) -> None:
    assert path.exists(), path
    with safe_open(str(path), framework="pt") as handle:
        if round_ is not None:
            assert handle.metadata()["round"] == str(round_), path
        for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensor = handle.get_tensor(name)
            assert not tensor.is_floating_point() or bool(tensor.isfinite().all()), (path, name)


def check_node_models(folder: Path) -> int:
    """Every model a node saved loads, finite, and no temporary file is left."""
    files = list((folder / "models").rglob("*.safetensors"))
    for path in files:
        _check_safetensors(path)
    assert not list((folder / "models").rglob("*.tmp"))
    return len(files)


def _serving(address: str, service: str = "") -> float:
    """Seconds a health check takes; fails unless SERVING."""
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


# ---------------------------------------------------------------- the cluster


BROKER = """
import asyncio, sys
from confide.coordinator.broker import EmbeddedBroker
async def main():
    await EmbeddedBroker("127.0.0.1", int(sys.argv[1])).start()
    print("broker ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _start_broker(port: int) -> subprocess.Popen:
    """An MQTT broker in its own process (as Mosquitto would be): killable on its own."""
    process = subprocess.Popen([sys.executable, "-c", BROKER, str(port)],
                               cwd=Path(__file__).resolve().parents[2],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return process
        assert process.poll() is None and time.monotonic() < deadline, "broker did not start"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.conftest import make_shards

    root = tmp_path_factory.mktemp("faults")
    broker_port = free_port()
    broker = _start_broker(broker_port)
    cluster = LocalCluster(root / "cluster", make_shards(root / "data", 2), mqtt=False,
                           heartbeat_interval_s=1.0, split_server=True,
                           coordinator_args=("--mqtt", f"mqtt://127.0.0.1:{broker_port}"))
    cluster.broker = broker
    cluster.broker_port = broker_port
    try:
        # the nodes' agents and Minions use the 2-layer test model, not SmolLM2
        tiny = ("--local-model", "tiny")
        cluster.start(flags={i: tiny for i in range(len(cluster.node_data_dirs))},
                      split_server_flags=tiny)
        with Client(cluster.address) as client:
            nodes = {n.info.name: n for n in wait_for_nodes(client, 3)}
        cluster.peer = {name: n.info.peer_address for name, n in nodes.items()}
        cluster.node_ids = {name: n.node_id for name, n in nodes.items()}
        yield cluster
    finally:
        cluster.stop()
        if broker.poll() is None:
            broker.kill()
        broker.wait()


def _assert_all_serving(cluster) -> None:
    _serving(cluster.address, "confide.v1.Coordinator")
    for address in cluster.peer.values():
        _serving(address, "confide.v1.NodePeer")
    with Client(cluster.address) as client:
        online = {n.info.name for n in client.list_nodes() if n.online}
    assert online >= set(cluster.peer), online
    check_coordinator_store(cluster.root / "coordinator")
    for folder in cluster.node_data_dirs:
        check_node_models(folder)


def _running_job(client, round_timeout_s: float = 600.0) -> str:
    """A job that stays RUNNING (it waits for 9 nodes that never come), for RPCs that need
    one; cancel it afterwards."""
    job = client.submit_job(tiny_spec(rounds=1, min_nodes=9, wait_for_nodes_s=300,
                                      round_timeout_s=round_timeout_s))
    deadline = time.monotonic() + 30
    while client.get_job(job.job_id).state != pb.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job.job_id


# ---------------------------------------------------------------- garbage


def _call_with_garbage(channel, service, method) -> grpc.RpcError:
    path = f"/{service.full_name}/{method.name}"
    with pytest.raises(grpc.RpcError) as info:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter([GARBAGE, GARBAGE]), timeout=10))
        elif method.client_streaming:
            channel.stream_unary(path)(iter([GARBAGE]), timeout=10)
        elif method.server_streaming:
            list(channel.unary_stream(path)(GARBAGE, timeout=10))
        else:
            channel.unary_unary(path)(GARBAGE, timeout=10)
    return info.value


def test_garbage_on_every_rpc_of_both_services(cluster):
    """Every method the two services declare (read from the descriptors, so a new RPC is
    covered the day it is added): INVALID_ARGUMENT naming the problem, the daemon serves on."""
    targets = [(cluster.address, pb.DESCRIPTOR.services_by_name["Coordinator"])]
    peer = node_pb2.DESCRIPTOR.services_by_name["NodePeer"]
    targets += [(cluster.peer["split-server"], peer), (cluster.peer["node0"], peer)]
    tried = []
    for address, service in targets:
        with grpc.insecure_channel(address) as channel:
            for method in service.methods:
                error = _call_with_garbage(channel, service, method)
                if (method.name == "SplitSession" and address != cluster.peer["split-server"]
                        and error.code() == grpc.StatusCode.FAILED_PRECONDITION):
                    assert "not a split-server" in error.details()  # refused before reading
                    continue
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, error)
                assert "not a valid protobuf message" in error.details(), error.details()
                tried.append(method.name)
    assert {"SplitSession", "OpenPrivateInference", "AgentMessage", "FetchModel",
            "SubmitAnonymousUpdate", "Session", "Ask"} <= set(tried)
    _assert_all_serving(cluster)


def test_hostile_but_wellformed_peer_requests(cluster):
    server = cluster.peer["split-server"]
    cases = [
        # a split session that does not start with `open`, or asks for another method's body
        ("SplitSession", [node_pb2.SplitRequest(forward=node_pb2.SplitTensors(step=1))],
         {grpc.StatusCode.INVALID_ARGUMENT}),
        ("SplitSession", [node_pb2.SplitRequest(open=node_pb2.SplitOpen(
            job_id="x", spec=tiny_spec(method="fedavg-lora")))],
         {grpc.StatusCode.INVALID_ARGUMENT}),
        ("OpenPrivateInference", node_pb2.PrivateInferenceRequest(model="../../etc/passwd",
                                                                  seq_len=4),
         {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}),
        ("OpenPrivateInference", node_pb2.PrivateInferenceRequest(model="aero", seq_len=0,
                                                                  provider="nobody"),
         {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}),
        ("FetchModel", node_pb2.FetchModelRequest(job_id="../../etc", which="global"),
         {grpc.StatusCode.INVALID_ARGUMENT}),
        ("FetchModel", node_pb2.FetchModelRequest(job_id="abc", which="local"),
         {grpc.StatusCode.INVALID_ARGUMENT}),
        # refused or answered (an envelope with its error): either way the node stays up
        ("AgentMessage", node_pb2.AgentEnvelope(sender="x" * 100_000, task_kind="\x00",
                                                body="{" * 10_000), None),
        ("AgentMessage", node_pb2.AgentEnvelope(task_kind="weather.lookup",
                                                protocol_hash="ab" * 32, body="{" * 10_000),
         None),
        ("AgentMessage", node_pb2.AgentEnvelope(text="hello " * 100_000), None),
    ]
    with grpc.insecure_channel(server) as channel:
        stub = node_grpc.NodePeerStub(channel)
        for name, request, codes in cases:
            try:
                if name == "SplitSession":
                    list(stub.SplitSession(iter(request), timeout=30))
                    raise AssertionError("a bad split session was accepted")
                elif name == "FetchModel":
                    list(stub.FetchModel(request, timeout=10))
                    raise AssertionError("a bad model request was served")
                else:
                    getattr(stub, name)(request, timeout=10)
                    assert codes is None, f"{name} accepted {request}"
            except grpc.RpcError as exc:
                assert codes is None or exc.code() in codes, (name, exc.code(), exc.details())
                assert exc.details()
    _assert_all_serving(cluster)


# ---------------------------------------------------------------- oversized streams


def _sfprompt_open(round_timeout_s: float = 60.0) -> node_pb2.SplitRequest:
    # what a device sends: the job's spec as the coordinator normalized it
    spec = normalize_spec(tiny_spec(method="sfprompt", params={"tail_layers": 0},
                                    round_timeout_s=round_timeout_s))
    return node_pb2.SplitRequest(open=node_pb2.SplitOpen(job_id="faults", spec=spec, round=1))


class _Outbox:
    """A request iterator the test feeds (None ends it), for client-streaming calls."""

    def __init__(self) -> None:
        import queue

        self.queue = queue.Queue()

    def put(self, message) -> None:
        self.queue.put(message)

    def __iter__(self):
        return iter(self.queue.get, None)


def test_oversized_split_stream_is_refused(cluster):
    server = cluster.peer["split-server"]
    with grpc.insecure_channel(server) as channel:
        stub = node_grpc.NodePeerStub(channel)
        # announced size over the limit (MAX_STEP_BYTES): refused at the first chunk
        outbox = _Outbox()
        replies = stub.SplitSession(iter(outbox), timeout=60)
        outbox.put(_sfprompt_open())
        assert next(replies).WhichOneof("body") == "ready"
        outbox.put(node_pb2.SplitRequest(forward=node_pb2.SplitTensors(
            step=1, chunk=common_pb2.Chunk(transfer_id="forward-1", index=0, data=b"x" * 100,
                                           total_bytes=1 << 40))))
        with pytest.raises(grpc.RpcError) as info:
            next(replies)
        outbox.put(None)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the limit" in info.value.details()
        # one message over gRPC's receive limit: refused by gRPC itself
        with pytest.raises(grpc.RpcError) as info:
            list(stub.SplitSession(iter([_sfprompt_open(), node_pb2.SplitRequest(
                forward=node_pb2.SplitTensors(step=1, chunk=common_pb2.Chunk(
                    transfer_id="forward-1", data=b"x" * (9 * MiB), total_bytes=9 * MiB)))]),
                timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_all_serving(cluster)


def test_oversized_anonymous_update_is_refused(cluster):
    with Client(cluster.address) as client:
        job_id = _running_job(client)
        header = pb.AnonymousUpdateMessage(header=pb.AnonymousUpdateHeader(job_id=job_id,
                                                                           round=1))
        try:
            with grpc.insecure_channel(cluster.address) as channel:
                call = channel.stream_unary(
                    "/confide.v1.Coordinator/SubmitAnonymousUpdate",
                    request_serializer=pb.AnonymousUpdateMessage.SerializeToString,
                    response_deserializer=pb.AnonymousAck.FromString)
                chunk = pb.AnonymousUpdateMessage(chunk=common_pb2.Chunk(
                    transfer_id="u", data=b"x" * 1000, total_bytes=1 << 40))
                with pytest.raises(grpc.RpcError) as info:
                    call(iter([header, chunk]), timeout=30)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "exceeds the limit" in info.value.details()
                big = pb.AnonymousUpdateMessage(chunk=common_pb2.Chunk(
                    transfer_id="u", data=b"x" * (9 * MiB), total_bytes=9 * MiB))
                with pytest.raises(grpc.RpcError) as info:
                    call(iter([header, big]), timeout=30)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            client.cancel_job(job_id)
    _assert_all_serving(cluster)


class _HostilePeer(node_grpc.NodePeerServicer):
    """A neighbour that serves its "model" in the worst ways."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def FetchModel(self, request, context):
        if request.job_id == "announce-1tb":
            yield common_pb2.Chunk(transfer_id="t", index=0, data=b"x" * 1000,
                                   total_bytes=1 << 40)
        elif request.job_id == "one-huge-message":
            yield common_pb2.Chunk(transfer_id="t", index=0, data=b"x" * (9 * MiB),
                                   total_bytes=9 * MiB, last=True)
        elif request.job_id == "more-than-announced":  # a valid header, then endless data
            header = common_pb2.TensorHeader(name="w", dtype=common_pb2.FLOAT32,
                                             shape=[MiB // 2], byte_length=2 * MiB)
            yield common_pb2.Chunk(transfer_id="t", index=0, header=header,
                                   total_bytes=2 * MiB)
            for i in range(1, 101):
                yield common_pb2.Chunk(transfer_id="t", index=i, data=b"x" * MiB,
                                       total_bytes=2 * MiB)
        elif request.job_id == "stalls":  # a valid header, one byte, then nothing
            header = common_pb2.TensorHeader(name="w", dtype=common_pb2.UINT8, shape=[10],
                                             byte_length=10)
            yield common_pb2.Chunk(transfer_id="t", index=0, header=header, total_bytes=10)
            yield common_pb2.Chunk(transfer_id="t", index=1, data=b"x", total_bytes=10)
            self.release.wait(30)


def test_oversized_or_endless_model_streams_from_a_peer_are_skipped():
    """DIMAT's consumer of NodePeer.FetchModel against a hostile neighbour: each bad stream
    is a skipped neighbour with its reason, within the timeout; nothing is buffered past the
    limit; the merge goes on without it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    hostile = _HostilePeer()
    node_grpc.add_NodePeerServicer_to_server(hostile, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        results = {}
        for case in ("announce-1tb", "one-huge-message", "more-than-announced", "stalls"):
            task = pb.Task(task_id="t", job_id=case, round=1, kind=pb.MERGE, peers=[
                pb.Peer(node_id="hostile", role="neighbour", address=f"127.0.0.1:{port}",
                        weight=0.5)])
            started = time.monotonic()
            fetched = fetch_neighbours(task, timeout_s=3)
            results[case] = (fetched.failures.get("hostile", ""), time.monotonic() - started)
            assert not fetched.states and "hostile" in fetched.failures
    finally:
        hostile.release.set()
        server.stop(0)
    assert "exceeds the limit" in results["announce-1tb"][0]
    assert "RESOURCE_EXHAUSTED" in results["one-huge-message"][0]
    assert "more than the announced" in results["more-than-announced"][0]
    assert "DEADLINE_EXCEEDED" in results["stalls"][0]
    assert all(seconds < 10 for _, seconds in results.values()), results


# ---------------------------------------------------------------- the broker, the coordinator


async def _subscribe(url: str, topic: str, seen: list, stop: threading.Event,
                     ready: threading.Event) -> None:
    address = BrokerAddress.parse(url)
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client(address.host, address.port, timeout=5) as mqtt:
            await mqtt.subscribe(topic, qos=1)
            ready.set()
            async for message in mqtt.messages:
                if message.topic.matches(topic):
                    seen.append((time.monotonic(), event_from_json(message.payload)))
                if stop.is_set():
                    return
    ready.set()


def _subscriber(url: str, topic: str) -> tuple[list, threading.Event, threading.Thread]:
    seen: list = []
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(_subscribe(url, topic, seen, stop,
                                                                    ready)), daemon=True)
    thread.start()
    assert ready.wait(30)
    return seen, stop, thread


def test_broker_killed_mid_job_training_goes_on(cluster):
    """The external broker (a process of its own, as Mosquitto is) is SIGKILLed after round 1:
    rounds 2 and 3 complete at the same pace, every event is still stored and replayed by
    WatchJob; when a broker is back, the coordinator's queued events reach subscribers."""
    url = f"mqtt://127.0.0.1:{cluster.broker_port}"
    seen, stop, _ = _subscriber(url, "confide/jobs/+/events")
    killed_at = None
    with Client(cluster.address) as client:
        job = client.submit_job(tiny_spec(rounds=3, min_nodes=2, max_steps=2))
        for event in client.watch_job(job.job_id):
            if event.kind == "round.completed" and event.round == 1:
                # every event so far reached the subscriber first (the broker is alive)
                deadline = time.monotonic() + 10
                while not any(e.kind == "round.completed" for _, e in seen):
                    assert time.monotonic() < deadline, [e.kind for _, e in seen]
                    time.sleep(0.05)
                cluster.broker.kill()
                cluster.broker.wait()
                killed_at = time.monotonic()
        final = client.get_job(job.job_id)
        replayed = [e.kind for e in client.watch_job(job.job_id)]
        stop.set()
        assert killed_at is not None
        assert final.state == pb.COMPLETED, final.reason
        assert [r.state for r in final.rounds] == ["completed"] * 3
        assert replayed.count("round.completed") == 3 and replayed[-1] == "job.completed"
        assert not any(e.kind == "job.completed" for _, e in seen)  # the broker was dead
        seconds = [r.seconds for r in final.rounds]
        # a broker back on the same address: the coordinator's publisher reconnects by itself
        cluster.broker = _start_broker(cluster.broker_port)
        restarted = time.monotonic()
        seen2, stop2, _ = _subscriber(url, "confide/jobs/+/events")
        again = client.submit_job(tiny_spec(rounds=1, min_nodes=2, max_steps=1))
        deadline = time.monotonic() + 40
        while not any(e.kind == "job.completed" and e.job_id == again.job_id
                      for _, e in seen2):
            assert time.monotonic() < deadline, [e.kind for _, e in seen2]
            time.sleep(0.1)
        back_s = time.monotonic() - restarted
        stop2.set()
    print(f"\nbroker SIGKILLed after round 1: round seconds {[f'{s:.2f}' for s in seconds]}; "
          f"{len(replayed)} events stored and replayed; a broker restarted on the same port "
          f"carried a new job's events to a subscriber within {back_s:.1f}s")
    _assert_all_serving(cluster)


# ---------------------------------------------------------------- slow-loris clients


def _stall(name: str, outcome: dict, start, *, expect: set, within: float):
    """Run a call that stalls; record (status, seconds, expected, limit, details)."""
    started = time.monotonic()
    try:
        start()
        outcome[name] = ("OK", time.monotonic() - started, expect, within, "")
    except grpc.RpcError as exc:
        outcome[name] = (exc.code().name, time.monotonic() - started, expect, within,
                         exc.details())


@pytest.fixture(scope="module", autouse=True)
def stalls(cluster):
    """Slow-loris clients opened against both daemons at the start of the module: they hang
    while the other tests (placed before test_slow_loris_...) use the daemons; the test then
    checks how each one ended. Each is a call that sends nothing, or a first message and
    then nothing, or dribbles; plus raw TCP connections that never speak HTTP/2."""
    from confide.protos.interceptors import FIRST_MESSAGE_TIMEOUT_S as FIRST

    split = cluster.peer["split-server"]
    forever = threading.Event()

    def nothing():
        forever.wait()
        yield from ()

    key = NodeKey.generate()
    outcome: dict = {}
    client = Client(cluster.address)
    client.register_node(key)
    anon_job = _running_job(client, round_timeout_s=3)
    coordinator = grpc.insecure_channel(cluster.address)
    peer = grpc.insecure_channel(split)
    header = pb.AnonymousUpdateMessage(header=pb.AnonymousUpdateHeader(job_id=anon_job, round=1))

    def session_hello_then_silence():
        hello = pb.NodeMessage(hello=pb.SessionHello(node_id=key.node_id))

        def messages():
            yield hello.SerializeToString()
            forever.wait()

        list(coordinator.stream_stream("/confide.v1.Coordinator/Session")(messages()))

    def header_then_dribble():
        def messages():
            yield header.SerializeToString()
            # a valid tensor header, then 10 bytes a second of its announced 10,000
            tensor = common_pb2.TensorHeader(name="w", dtype=common_pb2.FLOAT32, shape=[2500],
                                             byte_length=10_000)
            yield pb.AnonymousUpdateMessage(chunk=common_pb2.Chunk(
                transfer_id="u", index=0, header=tensor,
                total_bytes=10_000)).SerializeToString()
            for i in range(1, 1001):
                if forever.wait(1.0):
                    return
                yield pb.AnonymousUpdateMessage(chunk=common_pb2.Chunk(
                    transfer_id="u", index=i, data=b"x" * 10,
                    total_bytes=10_000)).SerializeToString()

        coordinator.stream_unary("/confide.v1.Coordinator/SubmitAnonymousUpdate")(messages())

    def split_open_then_silence():
        def messages():
            yield _sfprompt_open(round_timeout_s=1).SerializeToString()
            forever.wait()

        list(peer.stream_stream("/confide.v1.NodePeer/SplitSession")(messages()))

    calls = {
        "Session: nothing": (lambda: list(coordinator.stream_stream(
            "/confide.v1.Coordinator/Session")(nothing())),
            {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED"}, FIRST + 5),
        "Session: hello, no proof": (session_hello_then_silence, {"UNAUTHENTICATED"},
                                     FIRST + 5),
        "SubmitAnonymousUpdate: nothing": (lambda: coordinator.stream_unary(
            "/confide.v1.Coordinator/SubmitAnonymousUpdate")(nothing()),
            {"DEADLINE_EXCEEDED"}, FIRST + 5),
        "SubmitAnonymousUpdate: dribbles": (header_then_dribble, {"DEADLINE_EXCEEDED"}, 3 + 5),
        "GetJob (unary): no request": (lambda: coordinator.stream_unary(
            "/confide.v1.Coordinator/GetJob")(nothing()), {"DEADLINE_EXCEEDED"}, FIRST + 5),
        "SplitSession: nothing": (lambda: list(peer.stream_stream(
            "/confide.v1.NodePeer/SplitSession")(nothing())), {"DEADLINE_EXCEEDED"}, FIRST + 5),
        # the device's own deadline is the round's, at least 30 s; the server adds 10 s
        "SplitSession: open, then silence": (split_open_then_silence, {"DEADLINE_EXCEEDED"},
                                             30 + 10 + 8),
        "GetInfo (unary): no request": (lambda: peer.stream_unary(
            "/confide.v1.NodePeer/GetInfo")(nothing()), {"DEADLINE_EXCEEDED"}, FIRST + 5),
    }
    threads = [threading.Thread(target=_stall, args=(name, outcome, start),
                                kwargs={"expect": expect, "within": within}, daemon=True)
               for name, (start, expect, within) in calls.items()]
    raw = [socket.create_connection(("127.0.0.1", int(a.rsplit(":", 1)[1])))
           for a in (cluster.address, split) for _ in range(2)]
    for sock in raw[1::2]:
        sock.send(b"P")  # the first byte of HTTP/2's "PRI * HTTP/2.0" preface, and no more
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        yield {"calls": calls, "threads": threads, "outcome": outcome, "started": started,
               "client": client, "split": split}
    finally:
        forever.set()
        with contextlib.suppress(ConfideError):
            client.cancel_job(anon_job)
        client.close()
        for sock in raw:
            sock.close()
        coordinator.close()
        peer.close()


def test_slow_loris_clients_are_timed_out_and_do_not_block_others(cluster, stalls):
    """Each stalled client is cut off by a deadline (the first request message: 30 s, on any
    RPC of either daemon; an anonymous upload: its round's deadline; a split session: its
    round's deadline, at least 30 s, + 10 s), while the daemons serve everyone else: the tests
    before this one ran while they hung, and a job runs to its end here."""
    client, split = stalls["client"], stalls["split"]
    health = [_serving(cluster.address), _serving(split)]
    job = client.submit_job(tiny_spec(rounds=2, min_nodes=2, max_steps=2))
    final = client.wait_job(job.job_id)
    health += [_serving(cluster.address), _serving(split)]
    for thread in stalls["threads"]:
        thread.join(max(0.0, 60 - (time.monotonic() - stalls["started"])))
    waited = time.monotonic() - stalls["started"]
    assert final.state == pb.COMPLETED, final.reason
    assert max(health) < 2.0, health
    outcome = stalls["outcome"]
    assert set(outcome) == set(stalls["calls"]), set(stalls["calls"]) - set(outcome)
    lines = []
    for name, (code, seconds, expect, within, details) in sorted(outcome.items()):
        lines.append(f"  {name:<34} {code:<18} after {seconds:5.1f}s  {details[:60]}")
        assert code in expect, (name, code, details)
        assert seconds <= within, (name, seconds)
    print(f"\nslow-loris: {len(outcome)} stalled calls and 4 raw TCP connections held for "
          f"{waited:.0f}s while the other tests ran; health checks {max(health) * 1000:.0f} ms "
          "at most\n" + "\n".join(lines))
    _assert_all_serving(cluster)


def test_coordinator_killed_mid_job_resumes_with_state_and_models_intact(cluster):
    """SIGKILL mid-round; restarted on the same folder it resumes the job at its first
    uncommitted round. Committed rounds, their model files (byte for byte) and the event log
    survive; the nodes come back by themselves."""
    folder = cluster.root / "coordinator"
    with Client(cluster.address) as client:
        job = client.submit_job(tiny_spec(rounds=3, min_nodes=2, epochs=6))
        for event in client.watch_job(job.job_id):
            if event.kind == "round.started" and event.round == 2:
                break
    committed = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (folder / "jobs" / job.job_id).glob("*.safetensors")}
    assert set(committed) == {"global-r00000.safetensors", "global-r00001.safetensors"}
    cluster.kill_coordinator()  # mid-round 2: no chance to flush anything
    check_coordinator_store(folder, {job.job_id})
    killed = time.monotonic()
    cluster.start_coordinator()
    figures = {"restarted_s": time.monotonic() - killed}
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client(cluster.address, timeout=2) as client:
                online = {n.info.name for n in client.list_nodes() if n.online}
                if online >= set(cluster.peer):
                    break
        except ConfideError:
            pass
        assert time.monotonic() < deadline, "nodes did not come back"
        time.sleep(0.2)
    figures["nodes_back_s"] = time.monotonic() - killed
    with Client(cluster.address) as client:
        final = client.wait_job(job.job_id)
        figures["job_done_s"] = time.monotonic() - killed
        events = list(client.watch_job(job.job_id))
        models = {r: client.fetch_global_model(job.job_id, r) for r in range(4)}
    assert final.state == pb.COMPLETED, final.reason
    assert final.rounds_completed == 3
    assert [r.round for r in final.rounds if r.state == "completed"] == [1, 2, 3]
    assert any(e.kind == "job.started" and "resumed" in e.message for e in events)
    for name, digest in committed.items():  # committed files were not rewritten
        assert hashlib.sha256((folder / "jobs" / job.job_id / name).read_bytes()).hexdigest() \
            == digest, name
    jobs = check_coordinator_store(folder, {job.job_id})
    assert jobs[job.job_id][1:] == (pb.COMPLETED, 3)
    assert all(math.isfinite(float(t.float().abs().sum())) for m in models.values()
               for t in m.values())
    print(f"\ncoordinator SIGKILLed mid-round 2: restarted (ready file) in "
          f"{figures['restarted_s']:.1f}s, all nodes back {figures['nodes_back_s']:.1f}s and "
          f"the job completed {figures['job_done_s']:.1f}s after the kill")
    _assert_all_serving(cluster)
