"""A client generated from the .proto files alone (no SDK, no code of ours) can register a
node, submit a job and watch it finish: the .proto files are the whole contract.

The generated code is the protobuf package ``confide.v1``, the name our own package installs
it under, so the client runs in a fresh process whose path starts with the generated folder:
there ``confide`` is the generated namespace package and nothing of ours is imported."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys

from grpc_tools import protoc

from confide.cluster.local import LocalCluster
from confide.protos.generate import PROTO_ROOT, proto_files
from confide.sdk.client import Client
from tests.integration.helpers import wait_for_nodes

CLIENT = r'''
import json, sys, time
import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from confide.v1 import coordinator_pb2 as pb, coordinator_pb2_grpc as pb_grpc

address, generated = sys.argv[1], sys.argv[2]
assert pb.__file__.startswith(generated), pb.__file__
channel = grpc.insecure_channel(address)
stub = pb_grpc.CoordinatorStub(channel)
# register a node by following the documented signing rule
key = Ed25519PrivateKey.generate()
public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
timestamp = int(time.time() * 1000)
message = b"confide/v1/register\x00" + public + timestamp.to_bytes(8, "big", signed=True)
reply = stub.Register(pb.RegisterRequest(public_key=public, timestamp_ms=timestamp,
                                         signature=key.sign(message),
                                         info=pb.NodeInfo(name="generated")))
spec = pb.JobSpec(method="fedavg-lora", rounds=1, min_nodes=2,
                  model=pb.ModelSpec(base="tiny-bert", num_labels=2, max_length=32),
                  train=pb.TrainSpec(max_steps=2))
status = stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
kinds = [e.kind for e in stub.WatchJob(pb.WatchJobRequest(job_id=status.job_id), timeout=180)]
final = stub.GetJob(pb.GetJobRequest(job_id=status.job_id))
names = [n.info.name for n in stub.ListNodes(pb.ListNodesRequest()).nodes]
print(json.dumps({"node_id": reply.node_id, "kinds": kinds, "names": names,
                  "completed": final.state == pb.COMPLETED,
                  "ours": sorted(m for m in sys.modules if m.startswith("confide."))}))
'''


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
    (tmp_path / "client.py").write_text(CLIENT)
    with LocalCluster(tmp_path / "cluster", shards(2), mqtt=False) as cluster:
        with Client(cluster.address) as sdk:
            wait_for_nodes(sdk, 2)
        env = {**os.environ, "PYTHONPATH": str(out)}
        done = subprocess.run([sys.executable, str(tmp_path / "client.py"), cluster.address,
                               str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen["node_id"]) == 32
    assert seen["kinds"][-1] == "job.completed" and seen["completed"]
    assert "generated" in seen["names"]
    # only the generated modules were imported as confide.*: no code of ours
    assert seen["ours"] and all(m.startswith("confide.v1") for m in seen["ours"]), seen["ours"]
