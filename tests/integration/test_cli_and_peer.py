"""The `confide` command against real daemons, and the node's peer service."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

from confide.cluster.local import LocalCluster
from confide.protos.chunking import ChunkError
from confide.protos.stream import TensorMapReceiver, receive_tensor_map
from confide.sdk.client import Client
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc
from tests.integration.helpers import wait_for_nodes


def confide(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "confide.cli.main", "--log-level", "WARNING",
                           *args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_command():
    result = confide("--help")
    assert result.returncode == 0
    for command in ("coordinator", "node", "job", "status", "data", "demo", "bench"):
        assert command in result.stdout
    result = confide("node", "serve", "--help")
    assert "--coordinator" in result.stdout and "never" in result.stdout


@pytest.mark.parametrize("args,message", [
    (("--method", "nope"), "unknown method 'nope'; known methods: fedavg-lora"),
    (("--method", "cellm", "--params", '{"densty": 1}'), "its parameters are: density"),
    (("--params", "{bad"), "Expecting property name"),
])
def test_demo_refuses_a_bad_method_before_starting_anything(tmp_path, args, message):
    result = confide("demo", "--workdir", str(tmp_path / "demo"), *args, timeout=60)
    assert result.returncode == 2 and message in result.stdout
    assert not (tmp_path / "demo").exists()


def test_cli_submits_watches_fetches_and_shows_status(tmp_path, shards):
    with LocalCluster(tmp_path / "cluster", shards(1), mqtt=False) as cluster:
        with Client(cluster.address) as client:
            (node,) = wait_for_nodes(client, 1)
        submitted = confide("job", "submit", "--coordinator", cluster.address, "--rounds", "1",
                            "--max-steps", "2", "--max-length", "32", "--wait")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split()[2]
        assert "job.completed" in submitted.stdout and "round.completed" in submitted.stdout

        status = confide("status", "--coordinator", cluster.address)
        assert status.returncode == 0
        assert node.node_id in status.stdout and "online" in status.stdout
        assert job_id in status.stdout and "COMPLETED" in status.stdout

        out = tmp_path / "adapter.safetensors"
        fetched = confide("job", "fetch", job_id, "--coordinator", cluster.address,
                          "--out", str(out))
        assert fetched.returncode == 0, fetched.stderr
        assert load_file(str(out))

        missing = confide("job", "show", "0123456789ab", "--coordinator", cluster.address)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

        bad = confide("job", "submit", "--coordinator", cluster.address, "--num-labels", "1")
        assert bad.returncode == 1 and "num_labels" in bad.stderr

        # the node's peer service: health, info, and the global model it received
        with grpc.insecure_channel(node.info.peer_address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="confide.v1.NodePeer"), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            peer = node_grpc.NodePeerStub(channel)
            assert peer.GetInfo(node_pb2.GetInfoRequest(), timeout=5).name == "node0"
            chunks = list(peer.FetchModel(node_pb2.FetchModelRequest(job_id=job_id), timeout=30))
            # node -> node transfers stream: each tensor's header, then its bytes
            assert chunks[0].WhichOneof("body") == "header"
            headers = [c.header.name for c in chunks if c.WhichOneof("body") == "header"]
            received = receive_tensor_map(chunks)
            assert headers == list(received) and received.keys() == load_file(str(out)).keys()
            # a receiver capped below the model refuses it at the first chunk
            with pytest.raises(ChunkError, match="exceeds the limit"):
                TensorMapReceiver(max_bytes=chunks[0].total_bytes - 1).add(chunks[0])
            for request, code in [
                (node_pb2.FetchModelRequest(job_id="../../etc"),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (node_pb2.FetchModelRequest(job_id="0123456789ab"), grpc.StatusCode.NOT_FOUND),
                # a federated job's local state (its update, in effect) is never served
                (node_pb2.FetchModelRequest(job_id=job_id, which="local"),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (node_pb2.FetchModelRequest(job_id=job_id, which="shared", round=1),
                 grpc.StatusCode.NOT_FOUND),
            ]:
                with pytest.raises(grpc.RpcError) as info:
                    list(peer.FetchModel(request, timeout=5))
                assert info.value.code() == code
            garbage = channel.unary_unary("/confide.v1.NodePeer/GetInfo")
            with pytest.raises(grpc.RpcError) as info:
                garbage(b"\xff" * 64, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert peer.GetInfo(node_pb2.GetInfoRequest(), timeout=5).name == "node0"

            # the node's Agora agent: its published routine answers a protocol message
            # (the registry learns the routine's document once the node reaches it)
            with Client(cluster.address) as client:
                deadline = time.monotonic() + 30
                while not (documents := client.list_protocols("weather.lookup")):
                    assert time.monotonic() < deadline, "the node published no routine"
                    time.sleep(0.3)
            reply = peer.AgentMessage(node_pb2.AgentEnvelope(
                sender="test", task_kind="weather.lookup", protocol_hash=documents[0].hash,
                body=json.dumps({"city": "paris"})), timeout=30)
            assert reply.handled_by == "routine", reply.error
            assert json.loads(reply.body)["city"] == "paris"
            assert reply.prompt_tokens == reply.completion_tokens == 0  # no model call
