"""A client generated from the .proto files alone (no SDK, no code of ours) can register a
node, submit a job and watch it finish: the .proto files are the whole contract."""

from __future__ import annotations

import importlib
import importlib.resources
import sys
import time

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_tools import protoc

from confide.cluster.local import LocalCluster
from confide.protos.generate import PROTO_ROOT, proto_files
from tests.integration.helpers import wait_for_nodes


def _generate(out) -> None:
    includes = str(importlib.resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{includes}", f"--python_out={out}",
            f"--grpc_python_out={out}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()]]
    assert protoc.main(args) == 0


def test_client_generated_from_protos_registers_submits_and_watches(tmp_path, shards):
    out = tmp_path / "generated"
    out.mkdir()
    _generate(out)
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("confide.v1.coordinator_pb2")
        pb_grpc = importlib.import_module("confide.v1.coordinator_pb2_grpc")
        assert pb.__file__.startswith(str(out))
        with LocalCluster(tmp_path / "cluster", shards(2), mqtt=False) as cluster:
            channel = grpc.insecure_channel(cluster.address)
            stub = pb_grpc.CoordinatorStub(channel)
            # register a node by following the documented signing rule
            key = Ed25519PrivateKey.generate()
            public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
            timestamp = int(time.time() * 1000)
            message = b"confide/v1/register\x00" + public + timestamp.to_bytes(8, "big",
                                                                              signed=True)
            reply = stub.Register(pb.RegisterRequest(public_key=public, timestamp_ms=timestamp,
                                                     signature=key.sign(message),
                                                     info=pb.NodeInfo(name="generated")))
            assert len(reply.node_id) == 32
            from confide.sdk.client import Client

            with Client(cluster.address) as sdk:
                wait_for_nodes(sdk, 2)
            spec = pb.JobSpec(method="fedavg-lora", rounds=1, min_nodes=2,
                              model=pb.ModelSpec(base="tiny-bert", num_labels=2, max_length=32),
                              train=pb.TrainSpec(max_steps=2))
            status = stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
            kinds = [e.kind for e in stub.WatchJob(pb.WatchJobRequest(job_id=status.job_id),
                                                     timeout=180)]
            final = stub.GetJob(pb.GetJobRequest(job_id=status.job_id))
            names = [n.info.name for n in stub.ListNodes(pb.ListNodesRequest()).nodes]
            channel.close()
        assert kinds[-1] == "job.completed"
        assert final.state == pb.COMPLETED
        assert "generated" in names
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == "confide" or m.startswith("confide.")]:
            del sys.modules[name]
