"""Secure aggregation across real processes: a coordinator and node daemons on 127.0.0.1."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from confide.cluster.local import LocalCluster
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec, wait_for_nodes
from tests.integration.wire_capture import WireCapture


def test_a_secure_job_trains_like_the_plain_one(tmp_path, shards):
    data = shards(3, per_node=64)
    finals = {}
    with LocalCluster(tmp_path / "cluster", data, mqtt=False) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, 3)
        for secure in (False, True):  # one after the other on the same nodes
            spec = tiny_spec(rounds=2, min_nodes=3, max_steps=4, secure_aggregation=secure)
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
    # round 2 goes on without it (it may still be selected if its death was not yet seen,
    # then it is dropped before it could mask anything)
    assert victim not in final.rounds[1].participants
    assert final.rounds[1].secagg_survivors == 2


def test_distributed_dp_noises_the_sum_at_the_nodes(tmp_path, shards):
    """dp-lora at node level under secure aggregation: the nodes split the noise (the
    distributed discrete Gaussian), the coordinator adds none and sees only the noised sum;
    the global model moves by the calibrated noise: sigma C sqrt(n / t) / n per entry."""
    sigma, n = 0.5, 3
    spec = tiny_spec(method="dp-lora", rounds=1, min_nodes=n, max_steps=2,
                     secure_aggregation=True,
                     params={"unit": "node", "mode": "distributed", "noise_multiplier": sigma,
                             "clip_norm": 1.0})
    with LocalCluster(tmp_path / "cluster", shards(n, per_node=64), mqtt=False) as cluster, \
            Client(cluster.address) as client:
        wait_for_nodes(client, n)
        job = client.submit_job(spec)
        final = client.wait_job(job.job_id)
        assert final.state == pb.COMPLETED, final.reason
        state, initial = (client.fetch_global_model(job.job_id),
                          client.fetch_global_model(job.job_id, 0))
    (summary,) = final.rounds
    assert summary.secure_aggregation and summary.secagg_survivors == n
    t = summary.secagg_threshold
    assert summary.metrics["noise_multiplier"] == sigma and summary.metrics["epsilon"] > 0
    moved = torch.cat([(state[k] - initial[k]).flatten() for k in initial])
    expected = sigma * 1.0 * (n / t) ** 0.5 / n  # the update itself has L2 norm <= 1
    assert moved.std().item() == pytest.approx(expected, rel=0.15)


WINDOW = 16384


def _window_shares(stream: bytes) -> np.ndarray:
    """The share of the most frequent byte value in each 16 KiB window of the stream: ~1/256
    for uniform bytes (masked vectors), far more for float32 tensors (exponent bytes repeat)."""
    data = np.frombuffer(stream, dtype=np.uint8)
    return np.array([np.bincount(data[i:i + WINDOW], minlength=256).max() / WINDOW
                     for i in range(0, len(data) - WINDOW + 1, WINDOW)])


def _explained_by(stream: bytes, index: int, public: bytes) -> bool:
    """Whether window ``index`` of the stream is a piece of ``public``: some 48-byte probe of
    it (probes every 4 KiB, so one misses the wire's frame and chunk headers) occurs there."""
    start = index * WINDOW
    return any(stream[p:p + 48] in public for p in range(start + 64, start + WINDOW - 48, 4096))


def test_every_summable_method_runs_securely_and_the_wire_carries_only_masks(tmp_path, shards):
    """Each method whose aggregation is a sum runs under secure aggregation on real daemons;
    node0 dials through a relay that records its bytes: in the plain job the coordinator gets
    float32 deltas (a skewed byte histogram), under secure aggregation only masked ring
    vectors (bytes uniform up to framing)."""
    data = shards(3, per_node=64)
    cluster = LocalCluster(tmp_path / "cluster", data, mqtt=False)
    host, port = cluster.address.rsplit(":", 1)
    with WireCapture(host, int(port)) as capture:
        cluster.start(dial={0: capture.address})  # node0 dials through the recording relay
        try:
            with Client(cluster.address) as client:
                wait_for_nodes(client, 3)
                streams, finals, initial = {}, {}, {}
                for name, method, params, secure in [
                    ("plain-full", "fedavg-full", None, False),
                    ("fedavg-full", "fedavg-full", None, True),
                    ("ferret", "ferret", {"k": 8}, True),
                    ("dp-lora-local", "dp-lora",
                     {"unit": "node", "mode": "local", "noise_multiplier": 0.3}, True),
                    ("dp-lora-example", "dp-lora",
                     {"unit": "example", "noise_multiplier": 1.0, "expected_batch_size": 16,
                      "local_steps": 2, "rounds": 1}, True),
                ]:
                    start = len(capture.upstream)
                    job = client.submit_job(tiny_spec(method=method, rounds=1, min_nodes=3,
                                                      max_steps=2, secure_aggregation=secure,
                                                      params=params))
                    finals[name] = client.wait_job(job.job_id)
                    streams[name] = bytes(capture.upstream[start:])
                    initial[name] = client.fetch_global_model(job.job_id, 0)
        finally:
            cluster.stop()
    for name, final in finals.items():
        assert final.state == pb.COMPLETED, (name, final.reason)
        if name != "plain-full":
            assert final.rounds[0].secure_aggregation, name
            assert final.rounds[0].secagg_survivors == 3, name
    plain = _window_shares(streams["plain-full"])
    assert np.median(plain) > 0.02, plain  # float32 deltas: a few exponent bytes dominate
    # the secure job's upstream: masked ring vectors (uniform windows) as large as the model,
    # and every skewed window a piece of the job's public seeded initial state (a node may
    # upload it at the job's start, whichever finishes INIT first): no update in the clear
    stream, shares = streams["fedavg-full"], _window_shares(streams["fedavg-full"])
    state = b"".join(t.contiguous().numpy().tobytes() for t in initial["fedavg-full"].values())
    assert (shares < 0.01).sum() * WINDOW >= 0.9 * len(state), (len(stream), len(state))
    unexplained = [i for i in np.flatnonzero(shares >= 0.01)
                   if not _explained_by(stream, int(i), state)]
    # a few windows straddle framing and the end of a message
    assert len(unexplained) <= 4, (len(unexplained), len(shares))
