"""End to end: real coordinator and node processes run CELLM (top-k sparse LoRA updates with
error feedback at the node) and a FedAvg-LoRA job on the same cluster; CELLM's uplink is a
fraction of FedAvg-LoRA's and the residuals stay in the nodes' own folders."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from confide.cluster.local import LocalCluster
from confide.node.methods.cellm import RESIDUAL_PREFIX
from confide.node.store import ModelStore
from confide.protos.codec import wire_size
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes

NODES = 2
ROUNDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The nodes every job of this file runs on (the jobs are independent: each keeps its
    residuals and states under its own job id)."""
    from tests.conftest import make_shards

    root = tmp_path_factory.mktemp("cellm")
    data = make_shards(root / "data", NODES, per_node=64)
    with (
        LocalCluster(root / "cluster", data, mqtt=False) as cluster,
        Client(cluster.address) as client,
    ):
        wait_for_nodes(client, NODES)
        cluster.client = client
        yield cluster


def _run(client: Client, spec: pb.JobSpec) -> tuple[pb.JobStatus, dict, dict]:
    job = client.submit_job(spec)
    final = client.wait_job(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    return final, client.fetch_global_model(job.job_id, 0), client.fetch_global_model(job.job_id)


def test_cellm_sends_a_fraction_of_fedavg_lora_uplink(cluster):
    data, client = cluster.node_data_dirs, cluster.client
    options = dict(rounds=ROUNDS, min_nodes=NODES, max_steps=4)
    cellm_spec = tiny_spec(method="cellm", params={"density": 0.1}, **options)
    fedavg_spec = tiny_spec(method="fedavg-lora", **options)
    cellm, initial, trained = _run(client, cellm_spec)
    fedavg, _, _ = _run(client, fedavg_spec)

    assert cellm.rounds_completed == fedavg.rounds_completed == ROUNDS
    for sparse, dense in zip(cellm.rounds, fedavg.rounds, strict=True):
        assert sparse.state == dense.state == "completed"
        assert len(sparse.participants) == NODES
        # the same dense global adapter goes down (the task framing differs by a few bytes:
        # the method's name and parameters); the uplink is about 3 x density of the dense one
        assert abs(sparse.bytes.down - dense.bytes.down) < 64 * NODES
        assert 0 < sparse.bytes.up < 0.4 * dense.bytes.up, (sparse.bytes.up, dense.bytes.up)
        print(f"round {sparse.round}: up cellm {sparse.bytes.up} B, "
              f"fedavg-lora {dense.bytes.up} B ({dense.bytes.up / sparse.bytes.up:.1f}x)")

    # the sparse updates moved the adapter (LoRA B starts at zero) and kept it finite
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert any("lora_B" in k and bool(trained[k].any()) for k in trained)
    assert all(torch.isfinite(t).all() for t in trained.values())

    # each node kept what it did not send, in its own folder, for every tensor
    for folder in data:
        memory = load_file(str(folder / "models" / cellm.job_id / "memory.safetensors"))
        assert set(memory) == {RESIDUAL_PREFIX + name for name in initial}
        assert any(bool(residual.any()) for residual in memory.values())


def test_a_sparse_downlink_sends_each_node_the_largest_changes_since_its_state(cluster):
    """downlink_density 0.1: after the seeded first round each node's task carries about a
    tenth of the adapter (the largest changes since the state that node holds), the node
    rebuilds the state the coordinator computed for it (digest-checked: a mismatch would
    send the whole state, which the byte count would show), and the job trains."""
    rounds = 3
    data, client = cluster.node_data_dirs, cluster.client
    spec = tiny_spec(method="cellm", params={"density": 0.1, "downlink_density": 0.1},
                     rounds=rounds, min_nodes=NODES, max_steps=4)
    final, initial, trained = _run(client, spec)
    last_sent = client.fetch_global_model(final.job_id, rounds - 1)

    dense = wire_size(initial)
    assert final.rounds_completed == rounds
    for summary in final.rounds:
        assert summary.state == "completed" and len(summary.participants) == NODES
        down = summary.bytes.down / NODES
        print(f"round {summary.round}: down {down:.0f} B per node (dense state {dense} B)")
        if summary.round == 1:
            assert down < 4096  # the seeded state: only the task goes down
        else:  # ~3.1 KB of entries (the unit test) + the task and ten tensors' framing
            assert down < 0.4 * dense, (down, dense)
    # each node trained from its own sparse view of the round-2 state: close to it, not it
    for folder in data:
        kept = ModelStore(folder / "models").load(final.job_id, "global")
        assert kept is not None and kept.keys() == last_sent.keys()
        assert any(not torch.equal(kept[k], last_sent[k]) for k in kept)
        assert any(torch.equal(kept[k], last_sent[k]) or bool((kept[k] == last_sent[k]).any())
                   for k in kept)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert all(torch.isfinite(t).all() for t in trained.values())
