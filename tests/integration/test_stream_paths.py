"""Coordinator <-> node transfers stream tensor maps (``protos.stream``), checked on the wire.

A node runs behind a capturing relay through a real job: the global state its tasks bring,
the initial state and the updates it sends up, and a client's FetchGlobalModel must all be
per-tensor headers followed by data chunks, never one serialized blob.
"""

from __future__ import annotations

import contextlib

import grpc
import torch
from google.protobuf.message import DecodeError

from confide.cluster.local import LocalCluster
from confide.node.data import synthetic_classification, write_jsonl
from confide.protos.stream import receive_tensor_map
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc
from tests.integration.helpers import tiny_spec, wait_for_nodes
from tests.integration.wire_capture import WireCapture, grpc_messages


def _parsed(kind, raw: list[bytes]) -> list:
    """The messages of ``kind`` among one direction's (other calls share the connection)."""
    out = []
    for data in raw:
        with contextlib.suppress(DecodeError):
            out.append(kind.FromString(data))
    return out


def _streams(messages: list, field: str) -> dict[str, list]:
    """The chunks of each task's transfer in one direction of the session, by task id."""
    out: dict[str, list] = {}
    for message in messages:
        if message.WhichOneof("body") == field:
            piece = getattr(message, field)
            out.setdefault(piece.task_id, []).append(piece.chunk)
    return out


def test_tasks_results_and_fetched_models_stream_per_tensor(tmp_path):
    folder = tmp_path / "node0"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", synthetic_classification(32, 2, seed=5))
    cluster = LocalCluster(tmp_path / "cluster", [folder], mqtt=False)
    host, port = cluster.address.rsplit(":", 1)
    with WireCapture(host, int(port)) as capture:
        try:
            cluster.start(dial={0: capture.address})  # the node behind the capturing relay
            with Client(cluster.address) as client:
                wait_for_nodes(client, 1)
                job = client.submit_job(tiny_spec(rounds=2, min_nodes=1, max_steps=2))
                final = client.wait_job(job.job_id)
                fetched = client.fetch_global_model(job.job_id)
            connections = [(bytes(up), bytes(down)) for up, down in capture.connections]
            with grpc.insecure_channel(cluster.address) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                raw = list(stub.FetchGlobalModel(
                    pb.FetchGlobalModelRequest(job_id=job.job_id), timeout=60))
        finally:
            cluster.stop()
    assert final.state == pb.COMPLETED, final.reason
    session = max(connections, key=lambda c: len(c[0]) + len(c[1]))
    up = _parsed(pb.NodeMessage, grpc_messages(session[0]))
    down = _parsed(pb.CoordinatorMessage, grpc_messages(session[1]))
    updates, globals_ = _streams(up, "update_chunk"), _streams(down, "global_chunk")
    assert len(updates) == 3  # the INIT state and two rounds' updates
    assert globals_  # round 2's task brought round 1's global state (round 1: seeded)
    for chunks in [*updates.values(), *globals_.values()]:
        kinds = [c.WhichOneof("body") for c in chunks]
        assert kinds[0] == "header" and chunks[-1].last and chunks[-1].sha256
        names = [c.header.name for c in chunks if c.WhichOneof("body") == "header"]
        assert names == list(receive_tensor_map(chunks))  # one header per tensor, decodable
    # FetchGlobalModel: the same format, and what the SDK decodes from it
    assert raw[0].WhichOneof("body") == "header"
    decoded = receive_tensor_map(raw)
    assert decoded.keys() == fetched.keys()
    assert all(torch.equal(decoded[k], fetched[k]) for k in fetched)
