"""End to end: real coordinator and node processes run Ferret (full-parameter tuning, K
scalars per parameter group on the uplink) on the tiny BERT."""

from __future__ import annotations

import torch

from cli.cluster import LocalCluster
from cli.experiment import Evaluator
from node.data import synthetic_classification
from node.methods.ferret import group_parameters
from protos.codec import wire_size
from protos.confide.v1 import coordinator_pb2 as pb
from protos.sdk import SyncConfideClient
from tests.integration.helpers import tiny_spec, wait_for_nodes

K = 24


def test_ferret_rounds_through_the_daemons_with_a_tiny_uplink(tmp_path, shards):
    spec = tiny_spec(method="ferret", rounds=3, min_nodes=3, params={"k": K})
    with (
        LocalCluster(tmp_path / "cluster", shards(3, per_node=96), mqtt=False) as cluster,
        SyncConfideClient(cluster.address) as client,
    ):
        wait_for_nodes(client, 3)
        job = client.submit_job(spec)
        final = client.wait_job(job.job_id)
        assert final.state == pb.COMPLETED, final.reason
        initial = client.fetch_global_model(job.job_id, 0)
        trained = client.fetch_global_model(job.job_id)

    # the INIT node built the full-parameter model, not LoRA adapters
    assert "bert.embeddings.word_embeddings.weight" in initial
    assert not any("lora" in name for name in initial)
    state_bytes = wire_size(initial)
    scalars = sum(group.directions(K) for group in group_parameters(initial))
    assert final.rounds_completed == 3
    for summary in final.rounds:
        assert summary.state == "completed" and len(summary.participants) == 3
        up = summary.bytes.up / 3
        # K float32 scalars and a one-byte id per group, plus framing: a few kilobytes
        assert 5 * scalars < up < 5 * scalars + 4096, up
        assert summary.bytes.down / 3 > state_bytes  # the full global state goes down
    # every parameter moved through the seeds, the embedding matrix included
    assert not torch.equal(
        initial["bert.embeddings.word_embeddings.weight"],
        trained["bert.embeddings.word_embeddings.weight"],
    )

    held_out = synthetic_classification(128, 2, seed=999)
    evaluate = Evaluator(spec, held_out)
    before, after = evaluate(initial), evaluate(trained)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
