"""End to end: real coordinator and node processes run DP-LoRA, report the privacy spent in
every round and stop the job cleanly when its budget would be exceeded (node level, DP-FedAvg;
example level: test_privacy_budget.py)."""

from __future__ import annotations

import pytest
import torch

from confide.cluster.local import LocalCluster
from confide.privacy.dp import RdpAccountant
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes

SIGMA = 1.0
DELTA = 1e-5


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Two nodes for every job of this file (node-level DP charges no node's ledger, and
    these nodes set no budget: the jobs do not depend on one another)."""
    from tests.conftest import make_shards

    root = tmp_path_factory.mktemp("dp-lora")
    with (
        LocalCluster(root / "cluster", make_shards(root / "data", 2), mqtt=False) as cluster,
        Client(cluster.address) as client,
    ):
        wait_for_nodes(client, 2)
        yield client


def _run(client: Client, spec) -> tuple[pb.JobStatus, list[pb.Event], dict, dict]:
    events: list[pb.Event] = []
    job = client.submit_job(spec)
    final = client.wait_job(job.job_id, on_event=events.append)
    initial = client.fetch_global_model(job.job_id, 0)
    trained = client.fetch_global_model(job.job_id)
    return final, events, initial, trained


@pytest.mark.parametrize("mode", ["local", "central"])
def test_dp_job_reports_increasing_epsilon_every_round(client, mode):
    spec = tiny_spec(
        method="dp-lora",
        rounds=3,
        min_nodes=2,
        max_steps=3,
        params={"unit": "node", "noise_multiplier": SIGMA, "clip_norm": 1.0, "mode": mode},
    )
    final, events, initial, trained = _run(client, spec)

    assert final.state == pb.COMPLETED, final.reason
    assert final.rounds_completed == 3
    completed = [e for e in events if e.kind == "round.completed"]
    assert [e.round for e in completed] == [1, 2, 3]
    accountant = RdpAccountant()
    epsilons = [e.metrics["epsilon"] for e in completed]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3
    for event in completed:
        # every node in every round: q = 1, one step per round
        assert event.metrics["epsilon"] == pytest.approx(
            accountant.epsilon(SIGMA, 1.0, event.round, DELTA), rel=1e-9
        )
        assert event.metrics["noise_multiplier"] == SIGMA
        assert event.metrics["clip_norm"] == 1.0
        assert event.metrics["sampling_rate"] == 1.0
        assert ("epsilon_local" in event.metrics) == (mode == "local")
    # the final table carries the same figures
    assert [s.metrics["epsilon"] for s in final.rounds] == epsilons
    # the noised, clipped updates moved the adapter and kept it finite
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert all(torch.isfinite(t).all() for t in trained.values())


def test_job_stops_cleanly_when_the_budget_would_be_exceeded(client):
    accountant = RdpAccountant()
    after_two = accountant.epsilon(SIGMA, 1.0, 2, DELTA)
    after_three = accountant.epsilon(SIGMA, 1.0, 3, DELTA)
    target = (after_two + after_three) / 2  # enough for two rounds, not for three
    spec = tiny_spec(
        method="dp-lora",
        rounds=5,
        min_nodes=2,
        max_steps=2,
        params={"unit": "node", "noise_multiplier": SIGMA, "target_epsilon": target},
    )
    final, events, _initial, _trained = _run(client, spec)

    assert final.state == pb.COMPLETED, final.reason
    assert final.rounds_completed == 2 < 5
    assert "privacy budget" in final.reason and "after round 3" in final.reason
    kinds = [e.kind for e in events]
    stopped = [e for e in events if e.kind == "job.stopped"]
    assert len(stopped) == 1 and stopped[0].round == 3
    assert "privacy budget" in stopped[0].message
    assert f"epsilon={target:g} at delta={DELTA:g}" in stopped[0].message
    assert kinds.index("job.stopped") < kinds.index("job.completed")
    assert kinds.count("round.completed") == 2 and kinds.count("round.started") == 2
    spent = [e.metrics["epsilon"] for e in events if e.kind == "round.completed"]
    assert spent[-1] <= target
