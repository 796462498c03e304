"""The compose topology (docker/compose.yaml) without Docker: every service a real process in
its own network namespace with its own address, started by docker/netns_cluster.py through
the same entrypoint and CONFIDE_* variables as the containers (tiny models: QUICK). Runs the
demo scenario across the namespaces, then cuts one device node's link in the middle of a round.

Needs root and `ip netns` (skipped with the reason otherwise). Mosquitto is not installed here:
the coordinator's embedded amqtt broker stands in for it (see docker/netns_cluster.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import tiny_spec
from tests.integration.test_faults import check_coordinator_store, check_node_models

ROOT = Path(__file__).resolve().parents[2]


def _load_netns():
    spec = importlib.util.spec_from_file_location("docker_netns_cluster",
                                                  ROOT / "docker" / "netns_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


netns = _load_netns()
PROBLEM = netns.netns_available()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(bool(PROBLEM), reason=PROBLEM or "netns available")]
DEVICES = ("node0", "node1", "node2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    overrides = dict(netns.QUICK)
    overrides["scenario"] = {**netns.QUICK["scenario"],
                             "CONFIDE_SCENARIO_REPORT": "/out/report.json"}
    cluster = netns.NetnsCluster(tmp_path_factory.mktemp("netns"), overrides=overrides,
                                 verbose=False)
    try:
        started = time.monotonic()
        cluster.start(timeout=240)
        cluster.started_s = time.monotonic() - started
        cluster.coordinator = cluster.address("coordinator", 50051)
        yield cluster
    finally:
        cluster.stop()


def _online(client) -> dict[str, pb.NodeStatus]:
    return {n.info.name: n for n in client.list_nodes() if n.online}


def test_the_demo_scenario_runs_across_namespaces(cluster):
    code = cluster.run_oneshot("scenario", timeout=400)
    assert code == 0, cluster.tail("scenario")
    report = json.loads(Path(cluster.host_path("scenario", "/out/report.json")).read_text())
    steps = report["steps"]
    assert list(steps) == ["dp-lora", "dimat", "private", "minions"]
    assert all(step["ok"] for step in steps.values()), steps
    dp = steps["dp-lora"]
    assert dp["rounds"] == 2 and dp["participants"] == [3, 3]
    assert dp["epsilon"] == sorted(dp["epsilon"]) and dp["epsilon"][0] > 0
    assert steps["dimat"]["neighbours_merged"] == 2  # a ring of three: both neighbours
    # the models went node to node: the coordinator saw a few KB, each node megabytes
    assert steps["dimat"]["coordinator_bytes"] < steps["dimat"]["peer_bytes_down_per_node"] / 100
    assert steps["private"]["node"] == "split-server:7070" and steps["private"]["rounds"] > 0
    assert steps["minions"]["answer"] and steps["minions"]["local_tokens"] > 0
    print(f"\nnetns: services healthy in {cluster.started_s:.1f}s; scenario "
          + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in steps.items()))

    with Client(cluster.coordinator, token=cluster.token) as client:
        online = _online(client)
        jobs = client.list_jobs()
    # each node announced the name its peers dial (the compose service name), from its own
    # namespace; each device read only its own volume
    assert {name: n.info.peer_address for name, n in online.items()} == {
        name: f"{name}:7070" for name in ("split-server", *DEVICES)}
    sizes = {name: dict(online[name].info.datasets) for name in DEVICES}
    assert all(s == {"train": 32} for s in sizes.values()), sizes
    assert not online["split-server"].info.datasets
    check_coordinator_store(Path(cluster.volume("coordinator-state")),
                            {j.job_id for j in jobs})


def test_a_partitioned_node_is_dropped_mid_round_and_rejoins(cluster):
    """node2's link goes down while it trains: the coordinator drops it after the heartbeat
    limit (4 x 1 s), the round completes with the other two; the link comes back and node2
    reconnects by itself, then trains in the next job."""
    figures = {}
    with Client(cluster.coordinator, token=cluster.token) as client:
        online = _online(client)
        assert set(DEVICES) <= set(online)
        victim = online["node2"].node_id
        spec = tiny_spec(rounds=2, min_nodes=2, num_labels=5, epochs=20, max_steps=0,
                         wait_for_nodes_s=30)
        job = client.submit_job(spec)
        cut = healed = None
        for event in client.watch_job(job.job_id):
            if event.kind == "round.started" and event.round == 1 and cut is None:
                cluster.partition("node2")
                cut = time.monotonic()
            if event.kind == "node.dropped" and event.node_id == victim and healed is None:
                figures["detected_s"] = time.monotonic() - cut
                cluster.heal("node2")
                healed = time.monotonic()
        assert cut is not None and healed is not None, "node2 was never dropped"
        final = client.get_job(job.job_id)
        deadline = time.monotonic() + 90
        while "node2" not in _online(client):
            assert time.monotonic() < deadline, cluster.tail("node2")
            time.sleep(0.2)
        figures["rejoined_s"] = time.monotonic() - healed
        # node2 trains again: a job that needs all three devices
        again = client.submit_job(tiny_spec(rounds=1, min_nodes=3, num_labels=5, max_steps=2,
                                            wait_for_nodes_s=60))
        after = client.wait_job(again.job_id)
        jobs = {j.job_id for j in client.list_jobs()}
    assert final.state == pb.COMPLETED, final.reason
    first = final.rounds[0]
    assert first.state == "completed" and len(first.participants) == 2
    assert victim not in first.participants
    assert "no heartbeat" in first.dropped[victim] or "disconnected" in first.dropped[victim]
    assert after.state == pb.COMPLETED, after.reason
    assert victim in after.rounds[0].participants
    print(f"\nnetns partition: node2 dropped {figures['detected_s']:.1f}s after its link went "
          f"down (heartbeat 1 s, limit 4 missed); back online {figures['rejoined_s']:.1f}s "
          f"after the link came back; round 1 took {first.seconds:.1f}s with 2 of 3 nodes")
    check_coordinator_store(Path(cluster.volume("coordinator-state")), jobs)
    for device in DEVICES:
        check_node_models(Path(cluster.volume(f"{device}-data")))
