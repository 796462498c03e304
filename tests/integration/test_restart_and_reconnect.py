"""The coordinator restarted mid-job resumes from SQLite; nodes reconnect on their own."""

from __future__ import annotations

import time

from confide.cluster.local import LocalCluster
from confide.sdk.client import Client, ConfideError
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import events_until, tiny_spec, wait_for_nodes


def _wait_until_reachable(address: str, timeout: float = 30.0) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        client = Client(address, timeout=2)
        try:
            client.list_jobs()
            return client
        except ConfideError:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_coordinator_killed_mid_job_resumes_and_nodes_rejoin(tmp_path, shards):
    spec = tiny_spec(rounds=3, min_nodes=2, epochs=6)
    with LocalCluster(tmp_path / "cluster", shards(2), heartbeat_interval_s=1.0) as cluster:
        with Client(cluster.address) as client:
            wait_for_nodes(client, 2)
            job = client.submit_job(spec)
            events_until(client, job.job_id, "round.completed")
        cluster.kill_coordinator()  # SIGKILL: no chance to flush anything
        cluster.start_coordinator()
        client = _wait_until_reachable(cluster.address)
        try:
            status = client.get_job(job.job_id)
            assert status.rounds_completed >= 1  # what was committed survived
            # the nodes were never restarted: they must come back by themselves
            wait_for_nodes(client, 2, timeout=60)
            final = client.wait_job(job.job_id)
            events = list(client.watch_job(job.job_id))
        finally:
            client.close()
    assert final.state == pb.COMPLETED, final.reason
    assert final.rounds_completed == 3
    assert [r.round for r in final.rounds if r.state == "completed"] == [1, 2, 3]
    resumed = [e for e in events if e.kind == "job.started" and "resumed" in e.message]
    assert resumed, "the restarted coordinator did not say it resumed the job"
