"""End to end: real coordinator and node processes run Ferret (full-parameter tuning, K
scalars per parameter group on the uplink, the mean scalars on the downlink) on the tiny BERT."""

from __future__ import annotations

import time

import torch

from confide.cluster.experiment import Evaluator
from confide.cluster.local import LocalCluster
from confide.node.data import synthetic_classification
from confide.node.methods.ferret import FerretConfig, group_parameters
from confide.node.store import ModelStore
from confide.protos.codec import wire_size
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import completed_job, tiny_spec, wait_for_nodes

K = 24
HEADER = 256
"""Bytes of one tensor's stream header, at most (protos/stream.py: each tensor of a map travels
as a TensorHeader chunk, then its data)."""


def uplink_floor(state) -> tuple[int, int]:
    """What a node's update carries at least (5 bytes per projected scalar and its id, 4 per
    entry of an exact group, the task head) and how many tensors frame it."""
    config = FerretConfig(k=K)
    groups = group_parameters(state)
    size = sum(4 * g.size if g.exact(config) else 5 * g.directions(K) for g in groups)
    return size, len(groups) + 1  # + the round tag


def test_ferret_rounds_through_the_daemons_with_a_tiny_uplink(tmp_path, shards):
    spec = tiny_spec(method="ferret", rounds=3, min_nodes=3, params={"k": K})
    with (
        LocalCluster(tmp_path / "cluster", shards(3, per_node=96), mqtt=False) as cluster,
        Client(cluster.address) as client,
    ):
        job_id, final = completed_job(client, spec, 3)
        initial = client.fetch_global_model(job_id, 0)
        last_sent = client.fetch_global_model(job_id, 2)
        trained = client.fetch_global_model(job_id)
        kept = [ModelStore(d / "models").load(job_id, "global")
                for d in cluster.node_data_dirs]

    # the INIT node built the full-parameter model, not LoRA adapters
    assert "bert.embeddings.word_embeddings.weight" in initial
    assert not any("lora" in name for name in initial)
    state_bytes = wire_size(initial)
    floor, tensors = uplink_floor(initial)
    assert final.rounds_completed == 3
    for summary in final.rounds:
        assert summary.state == "completed" and len(summary.participants) == 3
        up = summary.bytes.up / 3
        # K float32 scalars and a one-byte id per group, the exact head, and framing
        assert floor < up < floor + HEADER * tensors + 4096, up
        down = summary.bytes.down / 3
        if summary.round == 1:  # the seeded state: each node builds it, only the task goes
            assert down < 4096 < state_bytes, down
        else:  # the last round's mean scalars, rebuilt at each node from the same seeds
            assert floor < down < floor + HEADER * tensors + 4096, down
    # no whole state ever went down, yet what each node rebuilt for round 3 is bit for bit
    # the coordinator's round-2 state
    for state in kept:
        assert state is not None and state.keys() == last_sent.keys()
        assert all(torch.equal(state[name], last_sent[name]) for name in state)
    # every parameter moved through the seeds, the embedding matrix included
    assert not torch.equal(
        initial["bert.embeddings.word_embeddings.weight"],
        trained["bert.embeddings.word_embeddings.weight"],
    )

    held_out = synthetic_classification(128, 2, seed=999)
    evaluate = Evaluator(spec, held_out)
    before, after = evaluate(initial), evaluate(trained)
    assert after["loss"] < before["loss"] - 0.1, (before, after)


def test_a_node_without_the_base_state_gets_the_whole_state(tmp_path, shards):
    """A node that lost the state a compact broadcast builds on asks for the whole state and
    the round goes on with it. node0 has one batch of data, node1 many: node0 is done with
    round 1 seconds before the round ends, and its kept state is deleted then."""
    spec = tiny_spec(method="ferret", rounds=2, min_nodes=2, params={"k": K})
    dirs = shards(2, per_node=1200)
    lines = (dirs[0] / "train.jsonl").read_text().splitlines()[:16]
    (dirs[0] / "train.jsonl").write_text("\n".join(lines) + "\n")
    with (
        LocalCluster(tmp_path / "cluster", dirs, mqtt=False) as cluster,
        Client(cluster.address) as client,
    ):
        wait_for_nodes(client, 2)
        job = client.submit_job(spec)
        stores = [ModelStore(d / "models") for d in dirs]
        deadline = time.monotonic() + 120
        while stores[0].metadata(job.job_id, "local") is None:  # node0 trained round 1
            assert time.monotonic() < deadline, "node0 never finished round 1"
            time.sleep(0.01)
        assert stores[1].metadata(job.job_id, "local") is None  # node1 still trains
        stores[0].path(job.job_id, "global").unlink()
        final = client.wait_job(job.job_id)
        assert final.state == pb.COMPLETED, final.reason
        round1 = client.fetch_global_model(job.job_id, 1)
        kept = [store.load(job.job_id, "global") for store in stores]
    state_bytes = wire_size(round1)
    first, second = final.rounds
    assert sorted(second.participants) == sorted(first.participants)
    # node1 got the scalars; node0 the scalars, then (it had no base) the whole state
    slack = 16_384 + HEADER * (len(round1) + len(group_parameters(round1)))
    assert state_bytes < second.bytes.down < state_bytes + slack, second.bytes.down
    for state in kept:
        assert all(torch.equal(state[name], round1[name]) for name in round1)


def test_a_node_that_sat_a_round_out_gets_the_whole_state(tmp_path, shards):
    """Two of three nodes per round: a node that did not take the previous round's state
    cannot build on the mean scalars, so the coordinator sends it the whole state."""
    spec = tiny_spec(method="ferret", rounds=4, min_nodes=2, nodes_per_round=2, max_steps=2,
                     params={"k": K})
    with (
        LocalCluster(tmp_path / "cluster", shards(3, per_node=32), mqtt=False) as cluster,
        Client(cluster.address) as client,
    ):
        job_id, final = completed_job(client, spec, 3)
        initial = client.fetch_global_model(job_id, 0)
    state_bytes = wire_size(initial)
    floor, tensors = uplink_floor(initial)
    newcomers_seen = 0
    for before, summary in zip(final.rounds, final.rounds[1:], strict=False):
        newcomers = len(set(summary.selected) - set(before.selected))
        newcomers_seen += newcomers
        # the newcomers get the whole state, the others the scalars (plus stream headers)
        low = newcomers * state_bytes + (2 - newcomers) * floor
        slack = 2 * 4096 + HEADER * (newcomers * len(initial) + (2 - newcomers) * tensors)
        assert low < summary.bytes.down < low + slack, (summary.round, newcomers)
    assert newcomers_seen, "the seeded selection never changed: pick another seed"
