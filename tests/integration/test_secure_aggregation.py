"""Secure aggregation across real processes: a coordinator and node daemons on 127.0.0.1."""

from __future__ import annotations

import time

import torch

from confide.cluster.local import LocalCluster
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes


def test_a_secure_job_trains_like_the_plain_one(tmp_path, shards):
    data = shards(3, per_node=64)
    finals = {}
    for secure in (False, True):
        spec = tiny_spec(rounds=2, min_nodes=3, max_steps=4, secure_aggregation=secure)
        with LocalCluster(tmp_path / f"cluster-{secure}", data, mqtt=False) as cluster, \
                Client(cluster.address) as client:
            wait_for_nodes(client, 3)
            job = client.submit_job(spec)
            final = client.wait_job(job.job_id)
            assert final.state == pb.COMPLETED, final.reason
            finals[secure] = (final, client.fetch_global_model(job.job_id),
                              client.fetch_global_model(job.job_id, 0))
    status, secure_state, initial = finals[True]
    for summary in status.rounds:
        assert summary.secure_aggregation and summary.secagg_survivors == 3
        assert summary.secagg_threshold == 2
    plain_state = finals[False][1]
    for name, value in plain_state.items():
        # same seeds, same data: the same model up to the fixed-point step
        assert torch.allclose(value, secure_state[name], atol=1e-4), name
    assert any(not torch.equal(initial[n], secure_state[n]) for n in initial)


def test_a_node_killed_after_its_masked_input_leaves_the_round_to_the_survivors(tmp_path,
                                                                               shards):
    data = shards(3, per_node=64)
    # node0 trains on 8 examples, the others on 64 for many epochs: it uploads first
    train = data[0] / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:8]))
    spec = tiny_spec(rounds=2, min_nodes=2, epochs=30, secure_aggregation=True)
    with LocalCluster(tmp_path / "cluster", data, mqtt=False) as cluster, \
            Client(cluster.address) as client:
        online = wait_for_nodes(client, 3)
        victim = next(n.node_id for n in online if n.info.name == "node0")
        job = client.submit_job(spec)
        log = cluster.log("node0")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # its masked input is on its way up
            if log.exists() and "(TRAIN, round 1) done" in log.read_text(errors="replace"):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("node0 never finished its round-1 training")
        time.sleep(0.5)
        cluster.kill_node(0)
        final = client.wait_job(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    first = final.rounds[0]
    assert first.secure_aggregation
    assert first.secagg_survivors == 3  # its masked input is in the sum
    assert victim in first.participants
    assert victim not in final.rounds[1].selected
    assert final.rounds[1].secagg_survivors == 2
