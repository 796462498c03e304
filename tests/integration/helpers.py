"""Helpers for integration tests: they drive real daemons through the SDK only."""

from __future__ import annotations

import time

from confide.sdk.client import Client, job_spec
from confide.v1 import coordinator_pb2 as pb


def tiny_spec(**overrides) -> pb.JobSpec:
    """A job on a 2-layer, 64-wide random-init model: seconds per round on one core."""
    options = dict(rounds=2, min_nodes=2, base="tiny-bert", num_labels=2, max_length=32,
                   batch_size=16, learning_rate=1e-2, round_timeout_s=120,
                   wait_for_nodes_s=60)
    options.update(overrides)
    return job_spec(options.pop("method", "fedavg-lora"), **options)


def wait_for_nodes(client: Client, count: int, timeout: float = 90.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = [n for n in client.list_nodes() if n.online]
        if len(online) >= count:
            return online
        time.sleep(0.3)
    raise AssertionError(f"fewer than {count} nodes came online within {timeout}s")


def events_until(client: Client, job_id: str, kind: str, timeout: float = 120.0):
    """Follow the job's events until one of ``kind`` arrives; return all seen so far."""
    seen = []
    deadline = time.monotonic() + timeout
    for event in client.watch_job(job_id):
        seen.append(event)
        if event.kind == kind:
            return seen
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {kind} event; saw {[e.kind for e in seen]}")


def completed_job(client: Client, spec: pb.JobSpec,
                  nodes: int) -> tuple[str, pb.JobStatus]:
    """Wait for ``nodes`` nodes, run ``spec`` to the end and check it completed: (job id,
    final status)."""
    wait_for_nodes(client, nodes)
    job = client.submit_job(spec)
    final = client.wait_job(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    return job.job_id, final
