"""The data owner enforces its privacy budget (node/privacy_guard.py), end to end with real
daemons: example-level DP-LoRA runs and reports each node's epsilon; a second job that would
cross a node's budget is refused with the reason, and the spending survives a node restart
(the ledger is on the node's disk, the coordinator cannot reset it)."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Iterator

import pytest

from confide.cluster.local import LocalCluster
from confide.node.privacy_guard import LEDGER_FILE
from confide.privacy.dp import RdpAccountant
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes

PER_NODE, BATCH, SIGMA, ROUNDS, STEPS, DELTA = 32, 8, 1.0, 2, 2, 1e-5
PARAMS = {"noise_multiplier": SIGMA, "rounds": ROUNDS, "local_steps": STEPS,
          "expected_batch_size": BATCH}


@contextlib.contextmanager
def _cluster(tmp_path, dirs, *flags: str) -> Iterator[tuple[LocalCluster, Client]]:
    """A coordinator and one node per folder, every node started with ``flags``."""
    cluster = LocalCluster(tmp_path / "cluster", dirs, mqtt=False)
    try:
        cluster.start(flags={i: flags for i in range(len(dirs))})
        with Client(cluster.address) as client:
            wait_for_nodes(client, len(dirs))
            yield cluster, client
    finally:
        cluster.stop()


def _spec(name: str) -> pb.JobSpec:
    return tiny_spec(method="dp-lora", name=name, rounds=ROUNDS, min_nodes=2, params=PARAMS)


def test_a_node_refuses_the_job_that_would_cross_its_budget_even_after_a_restart(
        tmp_path, shards):
    accountant = RdpAccountant()
    q = BATCH / PER_NODE
    one_job = accountant.epsilon(SIGMA, q, ROUNDS * STEPS, DELTA)
    two_jobs = accountant.composed_epsilon([(SIGMA, q, ROUNDS * STEPS)] * 2, DELTA)
    budget = (one_job + two_jobs) / 2  # room for one job, not for two
    flags = ("--privacy-budget", f"{budget}", "--delta", f"{DELTA}")
    dirs = shards(2, per_node=PER_NODE)
    with _cluster(tmp_path, dirs, *flags) as (cluster, client):
        first = client.submit_job(_spec("first"))
        events: list[pb.Event] = []
        final = client.wait_job(first.job_id, on_event=events.append)
        assert final.state == pb.COMPLETED, final.reason
        completed = [e for e in events if e.kind == "round.completed"]
        # each node's epsilon after each round; the round reports the largest (equal q here)
        for event in completed:
            assert event.metrics["epsilon"] == pytest.approx(
                accountant.epsilon(SIGMA, q, event.round * STEPS, DELTA), rel=1e-6)
            assert event.metrics["sampling_rate"] == pytest.approx(q)
        # every node charged the whole job once, on its own disk, owner-only
        for folder in dirs:
            ledger = folder / LEDGER_FILE
            assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
        reported = {n.info.name: list(n.info.privacy) for n in client.list_nodes()}
        for rows in reported.values():
            train = [r for r in rows if r.dataset == "train"]
            assert train and train[0].charges == 1
            assert train[0].epsilon_spent == pytest.approx(one_job, rel=1e-6)
            assert train[0].epsilon_budget == pytest.approx(budget)

        # restart both nodes: the spending is still there
        for i in range(2):
            cluster.kill_node(i)
            cluster.start_node(i, *flags)
        wait_for_nodes(client, 2)
        second = client.submit_job(_spec("second"))
        final = client.wait_job(second.job_id)
        assert final.state == pb.FAILED
        assert "node refused" in final.reason and "privacy budget" in final.reason
        assert f"{budget:g}" in final.reason
        for folder in dirs:  # nothing charged for the refused job
            assert (folder / LEDGER_FILE).read_text().count('"job"') == 1


def test_a_private_dataset_refuses_a_non_private_task(tmp_path, shards):
    with _cluster(tmp_path, shards(2), "--private-dataset", "train") as (_, client):
        job = client.submit_job(tiny_spec(method="fedavg-lora", rounds=1, min_nodes=2))
        final = client.wait_job(job.job_id)
        assert final.state == pb.FAILED
        assert "node refused" in final.reason and "is private" in final.reason
