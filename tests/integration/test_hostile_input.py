"""Malformed and hostile input on every coordinator RPC: a clear status code, the daemon
keeps serving, stored state stays intact."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from confide.cluster.local import LocalCluster
from confide.protos.chunking import split_payload
from confide.protos.identity import NodeKey
from confide.protos.stream import stream_tensor_map
from confide.sdk.client import Client, ConfideError
from confide.v1 import common_pb2
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc
from tests.integration.helpers import events_until, tiny_spec, wait_for_nodes

BAD_SPECS = [
    (dict(rounds=0, min_nodes=1), None),  # rounds 0 means "default": accepted
    (dict(method="no-such-method"), "unknown method"),
    (dict(min_nodes=3, nodes_per_round=2), "nodes_per_round"),
    (dict(task="translation"), "model.task"),
    (dict(num_labels=1), "num_labels"),
    (dict(dataset="../../etc/passwd"), "train.dataset"),
    (dict(params={"nope": 1}), "has no parameter"),
    (dict(learning_rate=-1.0), "learning_rate"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.conftest import make_shards

    root = tmp_path_factory.mktemp("hostile")
    with LocalCluster(root / "cluster", make_shards(root / "data", 1), mqtt=False) as cluster:
        with Client(cluster.address) as client:
            wait_for_nodes(client, 1)
            job = client.submit_job(tiny_spec(rounds=1, min_nodes=1, max_steps=2))
            assert client.wait_job(job.job_id).state == pb.COMPLETED
            cluster.job_id = job.job_id
            cluster.model = client.fetch_global_model(job.job_id)
        yield cluster


def _assert_alive_and_intact(cluster) -> None:
    with grpc.insecure_channel(cluster.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="confide.v1.Coordinator"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with Client(cluster.address) as client:
        status = client.get_job(cluster.job_id)
        assert status.state == pb.COMPLETED and status.rounds_completed == 1
        model = client.fetch_global_model(cluster.job_id)
    assert model.keys() == cluster.model.keys()
    assert all((model[k] == cluster.model[k]).all() for k in model)


@pytest.mark.parametrize("overrides,error", BAD_SPECS)
def test_submit_job_validates_the_spec(cluster, overrides, error):
    with Client(cluster.address) as client:
        if error is None:
            job = client.submit_job(tiny_spec(**overrides, wait_for_nodes_s=0.5, max_steps=1))
            client.cancel_job(job.job_id)
            return
        with pytest.raises(ConfideError) as info:
            client.submit_job(tiny_spec(**overrides))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error in info.value.details
    _assert_alive_and_intact(cluster)


@pytest.mark.parametrize("job_id,code", [
    ("0123456789ab", grpc.StatusCode.NOT_FOUND),
    ("../../etc", grpc.StatusCode.INVALID_ARGUMENT),
    ("x" * 10_000, grpc.StatusCode.INVALID_ARGUMENT),
    ("", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_unknown_or_malformed_job_ids(cluster, job_id, code):
    with Client(cluster.address) as client:
        for call in (client.get_job, client.cancel_job, client.fetch_global_model,
                     lambda j: list(client.watch_job(j))):
            with pytest.raises(ConfideError) as info:
                call(job_id)
            assert info.value.code == code, call
    _assert_alive_and_intact(cluster)


def test_register_rejects_bad_keys_signatures_and_clocks(cluster):
    key = NodeKey.generate()
    ts, sig = key.sign_registration()
    _, other_sig = NodeKey.generate().sign_registration()
    cases = [
        (pb.RegisterRequest(public_key=b"short", timestamp_ms=ts, signature=sig),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.RegisterRequest(public_key=key.public_bytes, timestamp_ms=ts, signature=other_sig),
         grpc.StatusCode.UNAUTHENTICATED),
        (pb.RegisterRequest(public_key=key.public_bytes, timestamp_ms=ts + 1, signature=sig),
         grpc.StatusCode.UNAUTHENTICATED),
        (pb.RegisterRequest(public_key=key.public_bytes, timestamp_ms=0,
                            signature=key.sign_registration(0)[1]),
         grpc.StatusCode.UNAUTHENTICATED),
        (pb.RegisterRequest(public_key=key.public_bytes, timestamp_ms=ts, signature=sig,
                            info=pb.NodeInfo(name="n" * 1000)),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    with grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for request, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Register(request, timeout=5)
            assert info.value.code() == code
            assert info.value.details()
    _assert_alive_and_intact(cluster)


@pytest.mark.parametrize("method", [
    "/confide.v1.Coordinator/Register",
    "/confide.v1.Coordinator/SubmitJob",
    "/confide.v1.Coordinator/GetJob",
    "/confide.v1.Coordinator/WatchJob",
    "/confide.v1.Coordinator/FetchGlobalModel",
    "/confide.v1.Coordinator/Session",
])
def test_garbage_bytes_on_every_rpc(cluster, method):
    garbage = bytes(range(256)) * 4
    with grpc.insecure_channel(cluster.address) as channel:
        if method.endswith("Session"):
            call = channel.stream_stream(method)
            with pytest.raises(grpc.RpcError) as info:
                list(call(iter([garbage, garbage]), timeout=5))
        elif method.endswith(("WatchJob", "FetchGlobalModel")):
            call = channel.unary_stream(method)
            with pytest.raises(grpc.RpcError) as info:
                list(call(garbage, timeout=5))
        else:
            call = channel.unary_unary(method)
            with pytest.raises(grpc.RpcError) as info:
                call(garbage, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in info.value.details()
    _assert_alive_and_intact(cluster)


# ---------------------------------------------------------------- hostile node sessions


async def _hostile_session(address: str, key: NodeKey, respond) -> list[pb.CoordinatorMessage]:
    """Register, authenticate, then answer the first task with ``respond(task, payload)``."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        ts, sig = key.sign_registration()
        await stub.Register(pb.RegisterRequest(public_key=key.public_bytes, timestamp_ms=ts,
                                               signature=sig, info=pb.NodeInfo(name="hostile")))
        outbox: asyncio.Queue = asyncio.Queue()

        async def outgoing():
            while True:
                message = await outbox.get()
                if message is None:
                    return
                yield message

        call = stub.Session(outgoing())
        outbox.put_nowait(pb.NodeMessage(hello=pb.SessionHello(node_id=key.node_id)))
        challenge = await call.read()
        outbox.put_nowait(pb.NodeMessage(proof=pb.SessionProof(
            signature=key.sign_session(challenge.challenge.nonce))))
        received = [challenge, await call.read()]
        task = None
        while True:
            message = await asyncio.wait_for(call.read(), 60)
            received.append(message)
            if message.WhichOneof("body") == "task" and message.task.kind == pb.TRAIN:
                task = message.task
            # answer once the global state is in: whole (its last chunk), or the seeded
            # state a node builds itself (the first round: no chunk comes)
            if task is not None and (
                    (message.WhichOneof("body") == "task" and task.global_from_seed)
                    or (message.WhichOneof("body") == "global_chunk"
                        and message.global_chunk.chunk.last)):
                for reply in respond(task):
                    outbox.put_nowait(reply)
                await asyncio.sleep(1.0)
                outbox.put_nowait(None)
                call.cancel()
                return received


def _wrong_shapes(task):
    payload = {"not.a.lora.weight": __import__("torch").zeros(3)}
    for chunk in stream_tensor_map(payload, task.task_id):
        yield pb.NodeMessage(update_chunk=pb.TaskChunk(task_id=task.task_id, chunk=chunk))
    yield pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id, num_examples=10**9))


def _oversized_stream(task):
    chunk = common_pb2.Chunk(transfer_id=task.task_id, index=0, data=b"x" * 1000,
                             total_bytes=1 << 40)
    yield pb.NodeMessage(update_chunk=pb.TaskChunk(task_id=task.task_id, chunk=chunk))
    yield pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id, num_examples=1))


def _truncated_stream(task):
    payload = {"y": __import__("torch").zeros(3 << 18)}
    chunks = list(stream_tensor_map(payload, task.task_id))
    for chunk in chunks[:-1]:  # the last chunk never comes
        yield pb.NodeMessage(update_chunk=pb.TaskChunk(task_id=task.task_id, chunk=chunk))
    yield pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id, num_examples=1))


def _hostile_header(task):
    # a header that would allocate 128 MiB in a transfer that announces 1000 bytes
    header = common_pb2.TensorHeader(name="w", dtype=common_pb2.FLOAT32,
                                      shape=[1 << 15, 1 << 10], byte_length=1 << 27)
    chunk = common_pb2.Chunk(transfer_id=task.task_id, index=0, header=header,
                             total_bytes=1000)
    yield pb.NodeMessage(update_chunk=pb.TaskChunk(task_id=task.task_id, chunk=chunk))
    yield pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id, num_examples=1))


def _not_a_tensor_map(task):
    for chunk in split_payload(b"\xff\xfe garbage", task.task_id):
        yield pb.NodeMessage(update_chunk=pb.TaskChunk(task_id=task.task_id, chunk=chunk))
    yield pb.NodeMessage(result=pb.TaskResult(task_id=task.task_id, num_examples=1))


@pytest.mark.parametrize("respond,reason", [
    (_wrong_shapes, "invalid update: update does not match the global state"),
    (_oversized_stream, "exceeds the limit"),
    (_truncated_stream, "result arrived before the complete update"),
    (_hostile_header, "more than the announced 1000"),
    (_not_a_tensor_map, "invalid update"),
])
def test_a_hostile_node_is_dropped_and_the_round_goes_on(cluster, respond, reason):
    key = NodeKey.generate()
    with Client(cluster.address) as client:
        job = client.submit_job(tiny_spec(rounds=1, min_nodes=2, nodes_per_round=2,
                                          max_steps=2, wait_for_nodes_s=60))
        # the honest node builds the initial state first: the hostile one only answers TRAIN
        events_until(client, job.job_id, "job.initialized", timeout=60)
        received = asyncio.run(_hostile_session(cluster.address, key, respond))
        deadline = time.monotonic() + 120
        while client.get_job(job.job_id).state in (pb.PENDING, pb.RUNNING):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        final = client.get_job(job.job_id)
    assert any(m.WhichOneof("body") == "task" for m in received)
    # min_nodes=2 with one honest node: the round cannot count, and says exactly why
    assert final.state == pb.FAILED
    assert key.node_id in final.rounds[0].dropped
    assert reason in final.rounds[0].dropped[key.node_id]
    _assert_alive_and_intact(cluster)


def test_session_requires_registration_and_a_valid_proof(cluster):
    async def attempt(register: bool, sign_with: NodeKey | None) -> grpc.StatusCode:
        key = NodeKey.generate()
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            if register:
                ts, sig = key.sign_registration()
                await stub.Register(pb.RegisterRequest(public_key=key.public_bytes,
                                                       timestamp_ms=ts, signature=sig))
            outbox: asyncio.Queue = asyncio.Queue()

            async def outgoing():
                while (message := await outbox.get()) is not None:
                    yield message

            call = stub.Session(outgoing())
            outbox.put_nowait(pb.NodeMessage(hello=pb.SessionHello(node_id=key.node_id)))
            try:
                challenge = await call.read()
                signer = sign_with or key
                outbox.put_nowait(pb.NodeMessage(proof=pb.SessionProof(
                    signature=signer.sign_session(challenge.challenge.nonce))))
                await call.read()
                await call.read()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            finally:
                outbox.put_nowait(None)
            return grpc.StatusCode.OK

    assert asyncio.run(attempt(False, None)) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(attempt(True, NodeKey.generate())) == grpc.StatusCode.UNAUTHENTICATED
    _assert_alive_and_intact(cluster)
