"""End to end: a real coordinator and real node processes on 127.0.0.1 run FedAvg-LoRA."""

from __future__ import annotations

import time

import pytest
import torch

from confide.cluster.experiment import Evaluator
from confide.cluster.local import LocalCluster
from confide.node.data import synthetic_classification
from confide.protos.codec import wire_size
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import events_until, tiny_spec, wait_for_nodes


def test_two_rounds_change_the_adapter_and_lower_the_loss(tmp_path, shards):
    spec = tiny_spec(rounds=2, min_nodes=3, epochs=2)
    with LocalCluster(tmp_path / "cluster", shards(3, per_node=96)) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 3)
        job = client.submit_job(spec)
        final = client.wait_job(job.job_id)
        assert final.state == pb.COMPLETED, final.reason
        assert final.rounds_completed == 2
        for summary in final.rounds:
            assert summary.state == "completed"
            assert len(summary.participants) == 3
            # every byte is counted, in both directions
            assert summary.bytes.up > 0 and summary.bytes.down > 0
        initial = client.fetch_global_model(job.job_id, 0)
        trained = client.fetch_global_model(job.job_id)
    # round 1 starts from the seeded state, which every node builds itself: only the task
    # goes down; round 2's state is sent whole
    first, second = final.rounds
    assert first.bytes.down < second.bytes.down - 3 * wire_size(initial) // 2
    assert initial.keys() == trained.keys()
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert changed, "the global adapter did not change"
    held_out = synthetic_classification(128, 2, seed=999)
    evaluate = Evaluator(spec, held_out)
    before, after = evaluate(initial), evaluate(trained)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > 0.6


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """One cluster for the tests below, in file order: the events of a round, then a node
    killed mid-round (two are left), then a second killed (too few)."""
    from tests.conftest import make_shards

    root = tmp_path_factory.mktemp("rounds")
    with LocalCluster(root / "cluster", make_shards(root / "data", 3), mqtt=False) as cluster, \
            Client(cluster.address) as client:
        online = wait_for_nodes(client, 3)
        cluster.node_ids = {n.info.name: n.node_id for n in online}
        yield cluster, client


def test_events_follow_the_round_structure(three_nodes):
    _, client = three_nodes
    job = client.submit_job(tiny_spec(rounds=1, max_steps=3))
    kinds = [e.kind for e in client.watch_job(job.job_id)]
    nodes = client.list_nodes()
    assert kinds[0] == "job.submitted"
    assert kinds[-1] == "job.completed"
    assert kinds.index("round.started") < kinds.index("node.done") < kinds.index(
        "round.completed")
    assert kinds.count("node.done") == 3
    assert all(n.online for n in nodes) and len(nodes) == 3
    assert all(n.info.datasets["train"] == 64 for n in nodes)


def test_node_killed_mid_round_the_round_completes_with_the_others(three_nodes):
    cluster, client = three_nodes
    # long enough local training that the kill lands mid-round
    spec = tiny_spec(rounds=2, min_nodes=2, epochs=40)
    victim_id = cluster.node_ids["node0"]
    job = client.submit_job(spec)
    events_until(client, job.job_id, "round.started")
    cluster.kill_node(0)
    final = client.wait_job(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    first = final.rounds[0]
    assert victim_id in first.dropped
    assert "disconnected" in first.dropped[victim_id]
    assert len(first.participants) == 2
    assert victim_id not in final.rounds[1].selected


def test_job_fails_with_a_clear_reason_when_too_few_nodes_answer(three_nodes):
    cluster, client = three_nodes
    if 0 in cluster.nodes:  # run alone: take node0 away first, two nodes are left
        cluster.kill_node(0)
    deadline = time.monotonic() + 60
    while {n.info.name for n in client.list_nodes() if n.online} != {"node1", "node2"}:
        assert time.monotonic() < deadline, "the coordinator never saw node0 go"
        time.sleep(0.2)
    spec = tiny_spec(rounds=2, min_nodes=2, epochs=40)
    job = client.submit_job(spec)
    events_until(client, job.job_id, "round.started")
    cluster.kill_node(1)
    final = client.wait_job(job.job_id)
    assert final.state == pb.FAILED
    assert "round 1: 1 of 2 node(s) returned a valid update, min_nodes is 2" in final.reason
    assert "disconnected" in final.reason


def test_causal_lm_lora_rounds_through_the_daemons(tmp_path):
    from confide.node.data import synthetic_text, write_jsonl

    folders = []
    for i in range(2):
        folder = tmp_path / f"node{i}"
        folder.mkdir()
        write_jsonl(folder / "text.jsonl", synthetic_text(48, seed=i))
        folders.append(folder)
    spec = tiny_spec(rounds=2, min_nodes=2, task="causal-lm", base="tiny-llama",
                     dataset="text", max_steps=6)
    with LocalCluster(tmp_path / "cluster", folders, mqtt=False) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 2)
        job = client.submit_job(spec)
        final = client.wait_job(job.job_id)
        initial = client.fetch_global_model(job.job_id, 0)
        trained = client.fetch_global_model(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    held_out = synthetic_text(32, seed=99)
    evaluate = Evaluator(spec, held_out)
    assert evaluate(trained)["loss"] < evaluate(initial)["loss"]
