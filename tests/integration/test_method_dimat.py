"""End to end: DIMAT between real node processes. The coordinator schedules the train and
merge phases and publishes the topology; the weights travel node to node only."""

from __future__ import annotations

import torch

from confide.cluster.local import LocalCluster
from confide.node.store import ModelStore
from confide.protos.codec import wire_size
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes


def _spec(**overrides) -> pb.JobSpec:
    options = dict(method="dimat", rounds=2, min_nodes=3, max_steps=6,
                   params={"topology": "ring", "match_examples": 16})
    options.update(overrides)
    return tiny_spec(**options)


def test_dimat_merges_peer_to_peer_and_no_weight_reaches_the_coordinator(tmp_path, shards):
    with LocalCluster(tmp_path / "cluster", shards(4, per_node=48), mqtt=False) as cluster, \
            Client(cluster.address) as client:
        nodes = wait_for_nodes(client, 4)
        job = client.submit_job(_spec(min_nodes=4))
        events: list[pb.Event] = []
        final = client.wait_job(job.job_id, on_event=events.append)
    assert final.state == pb.COMPLETED, final.reason
    node_ids = sorted(n.node_id for n in nodes)

    stores = [ModelStore(folder / "models") for folder in cluster.node_data_dirs]
    own = [store.load(job.job_id, "own") for store in stores]
    assert all(state is not None for state in own)
    model_bytes = wire_size(own[0])
    for summary in final.rounds:
        assert summary.state == "completed"
        assert sorted(summary.participants) == node_ids
        # each node fetched its two ring neighbours' full models, peer to peer ...
        assert summary.metrics["neighbours_merged"] == 2
        assert summary.metrics["peer_bytes_down_per_node"] > 2 * model_bytes
        # ... while the coordinator saw only tasks and metrics: a few KB, not a model
        assert summary.bytes.up < model_bytes / 20, (summary.bytes.up, model_bytes)
        assert summary.bytes.down < model_bytes / 20
    # the coordinator keeps no model of the job
    assert not list((tmp_path / "cluster" / "coordinator").rglob(f"*{job.job_id}*.safetensors"))
    # every node trained and merged: the models moved and stayed finite; neighbours that
    # merged with each other are close but not identical (each aligns to itself)
    for state in own:
        assert all(torch.isfinite(t).all() for t in state.values())
    assert any(not torch.equal(own[0][k], own[1][k]) for k in own[0])


def test_unreachable_neighbour_is_skipped_and_the_others_go_on(tmp_path, shards):
    spec = _spec(rounds=2, min_nodes=2, wait_for_nodes_s=5,
                 params={"topology": "full", "match_examples": 16, "merge": "gossip"})
    with LocalCluster(tmp_path / "cluster", shards(3, per_node=48), mqtt=False) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 3)
        job = client.submit_job(spec)
        killed = False
        for event in client.watch_job(job.job_id):
            if event.kind == "round.completed" and event.round == 1 and not killed:
                cluster.kill_node(2)
                killed = True
        final = client.get_job(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    second = final.rounds[1]
    assert len(second.participants) == 2
    assert second.metrics["neighbours_merged"] == 1  # the dead node was skipped
