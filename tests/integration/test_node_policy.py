"""The data owner decides what runs on its node, and job submission needs a credential: real
daemons on 127.0.0.1, driven through the SDK and the CLI only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from confide.cluster.local import LocalCluster
from confide.protos.identity import NodeKey
from confide.sdk.client import Client, ConfideError, refusals
from confide.v1 import coordinator_pb2 as pb
from tests.integration.helpers import events_until, tiny_spec, wait_for_nodes
from tests.unit.test_submission_auth import job_specs


def _save_tiny_model(folder) -> None:
    """A tiny BERT classifier saved as a user would: transformers' save_pretrained."""
    from confide.node.models import ModelConfig, base_model_and_tokenizer

    model, tokenizer = base_model_and_tokenizer(ModelConfig(base="tiny-bert", max_length=32),
                                                None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_node_refuses_what_its_owner_did_not_allow(tmp_path, shards):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    _save_tiny_model(allowed / "tiny")
    _save_tiny_model(outside / "tiny")
    (allowed / "escape").symlink_to(outside / "tiny")
    node_flags = ("--allow-model", str(allowed), "--methods", "fedavg-lora",
                  "--max-rounds", "2", "--max-local-steps", "3")
    cluster = LocalCluster(tmp_path / "cluster", shards(1, per_node=64), mqtt=False)
    try:
        cluster.start(flags={0: node_flags})
        with Client(cluster.address) as client:
            wait_for_nodes(client, 1)

            def run(**overrides) -> pb.JobStatus:
                spec = tiny_spec(min_nodes=1, rounds=overrides.pop("rounds", 1),
                                 max_steps=overrides.pop("max_steps", 3), **overrides)
                job = client.submit_job(spec)
                return client.wait_job(job.job_id)

            not_listed = run(base=str(outside / "tiny"))
            escaping = run(base=str(allowed / "escape"))
            method = run(method="fedavg-full")
            rounds = run(rounds=3)
            steps = run(max_steps=0)  # 64 examples / 16 per batch: 4 steps, over the cap of 3
            allowed_job = run(base=str(allowed / "tiny"))
            steps_events = [e for e in client.watch_job(steps.job_id)]
        cli = subprocess.run(
            [sys.executable, "-m", "confide.cli.main", "job", "status", method.job_id,
             "--coordinator", cluster.address], capture_output=True, text=True, timeout=120)
    finally:
        cluster.stop()

    for status, why in [
        (not_listed, "not in a folder this node's owner allowed"),
        (escaping, "resolves to"),
        (method, "does not run method 'fedavg-full'"),
        (rounds, "rounds_per_job"),
    ]:
        assert status.state == pb.FAILED, why
        assert "node refused" in status.reason and why in status.reason, status.reason
    # a refusal of a round's task: recorded per node, a node.refused event, and the job's
    # failure names it
    assert steps.state == pb.FAILED and "local_steps_per_round" in steps.reason
    assert any("local_steps_per_round" in reason for reason in refusals(steps).values())
    refused = [e for e in steps_events if e.kind == "node.refused"]
    assert refused and "local_steps_per_round" in refused[0].message
    # an allowed local model works end to end
    assert allowed_job.state == pb.COMPLETED, allowed_job.reason
    assert allowed_job.rounds_completed == 1 and allowed_job.spec.model.base.endswith("tiny")
    assert cli.returncode == 0, cli.stderr
    assert "does not run method 'fedavg-full'" in cli.stdout and "FAILED" in cli.stdout


@pytest.fixture(scope="module")
def open_port_coordinator(tmp_path_factory):
    """A coordinator listening on every interface (0.0.0.0) without TLS; everything dials
    127.0.0.1, so the traffic stays on loopback."""
    root = tmp_path_factory.mktemp("auth")
    cluster = LocalCluster(root, [], mqtt=False, listen_host="0.0.0.0")
    cluster.start_coordinator()
    yield cluster
    cluster.stop()


def test_submission_beyond_loopback_needs_the_token(open_port_coordinator, monkeypatch):
    monkeypatch.delenv("CONFIDE_TOKEN", raising=False)
    cluster = open_port_coordinator
    token_file = cluster.root / "coordinator" / "client_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    spec = tiny_spec(min_nodes=1, rounds=1, wait_for_nodes_s=1)
    for token in ("", "not-the-token"):
        with Client(cluster.address, token=token) as client:
            for call in (lambda c: c.submit_job(spec), lambda c: c.list_jobs(),
                         lambda c: list(c.watch_job("0123456789ab")),
                         lambda c: c.report_evaluation("0123456789ab", 0, {"accuracy": 1.0})):
                with pytest.raises(ConfideError) as refused:
                    call(client)
                assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert "client token" in refused.value.details
            # a node's own RPC is authenticated by its key, not the operator's token
            assert client.register_node(NodeKey.generate()).node_id
    with Client(cluster.address, coordinator_data=cluster.root / "coordinator") as client:
        job = client.submit_job(spec)
        assert client.get_job(job.job_id).job_id == job.job_id
    with Client(cluster.address, token=token_file.read_text().strip()) as client:
        assert any(j.job_id == job.job_id for j in client.list_jobs())
        # the submitter's held-out figures: recorded as an event, validated first
        event = client.report_evaluation(job.job_id, 0, {"accuracy": 0.5}, dataset="mine")
        assert event.kind == "round.evaluated" and event.metrics["accuracy"] == 0.5
        for args, code in [((job.job_id, 7, {"accuracy": 0.5}), "FAILED_PRECONDITION"),
                           ((job.job_id, 0, {}), "INVALID_ARGUMENT"),
                           ((job.job_id, 0, {"accuracy": float("nan")}), "INVALID_ARGUMENT"),
                           ((job.job_id, 0, {"Bad Name": 1.0}), "INVALID_ARGUMENT"),
                           (("0123456789ab", 0, {"accuracy": 1.0}), "NOT_FOUND")]:
            with pytest.raises(ConfideError) as refused:
                client.report_evaluation(*args)
            assert refused.value.code.name == code, (args, refused.value)
    # the CLI finds the token in the coordinator's --data folder
    cli = subprocess.run(
        [sys.executable, "-m", "confide.cli.main", "job", "list", "--coordinator",
         cluster.address, "--data", str(cluster.root / "coordinator")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "CONFIDE_TOKEN": ""})
    assert cli.returncode == 0 and job.job_id in cli.stdout, cli.stderr


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=job_specs())
def test_generated_specs_never_crash_a_real_coordinator(open_port_coordinator, spec):
    cluster = open_port_coordinator
    with Client(cluster.address, coordinator_data=cluster.root / "coordinator") as client:
        try:
            status = client.submit_job(spec)
        except ConfideError as exc:
            assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
        else:
            try:
                client.cancel_job(status.job_id)
            except ConfideError as exc:  # it may have ended already (no node came)
                assert exc.code == grpc.StatusCode.FAILED_PRECONDITION, exc
        assert client.list_nodes() is not None  # still serving
    assert cluster.coordinator is not None and cluster.coordinator.poll() is None


def _only_online(client: Client, name: str, timeout: float = 90.0) -> None:
    """Wait until ``name`` is the one node online (a replaced node has said goodbye)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = [n.info.name for n in client.list_nodes() if n.online]
        if online == [name]:
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} was not the only node online within {timeout}s")


def test_every_resource_cap_is_enforced_by_the_node(tmp_path, shards):
    """The caps the first test does not reach, each on a node started with only that cap: a
    task over it is refused (never truncated), and the submitter reads which cap through the
    SDK."""
    cluster = LocalCluster(tmp_path / "cluster", shards(3, per_node=64), mqtt=False)
    results: dict[str, pb.JobStatus] = {}
    try:
        cluster.start_coordinator()
        with Client(cluster.address) as client:

            def run(**overrides) -> pb.JobStatus:
                spec = tiny_spec(min_nodes=1, rounds=overrides.pop("rounds", 1),
                                 max_steps=overrides.pop("max_steps", 1), **overrides)
                return client.wait_job(client.submit_job(spec).job_id)

            def replace_node(index: int, *flags: str) -> None:
                for running in list(cluster.nodes):
                    cluster.nodes[running].terminate()
                    cluster.nodes.pop(running).wait(30)
                cluster.start_node(index, *flags)
                _only_online(client, f"node{index}")

            # examples: 2 steps x 16 per batch = 32 examples, over a cap of 20
            replace_node(0, "--max-examples", "20")
            results["examples"] = run(max_steps=2)
            results["examples_ok"] = run(max_steps=1)  # 16 examples: within the cap
            # payload: round 2 brings the aggregated state (kilobytes), over a cap of ~100 bytes
            replace_node(1, "--max-payload-mb", "0.0001")
            results["payload"] = run(rounds=2)  # round 1 builds its state from a seed
            # seconds: a task may run 0.05 s here; initialising or training takes longer
            replace_node(2, "--max-task-seconds", "0.05")
            results["seconds"] = run(max_steps=200, epochs=100)  # 200 steps, not 4
            # concurrent jobs: the node works for a job that waits for a second node (its
            # initial state came from this node); a second job is refused; once the first is
            # cancelled, the coordinator tells the node it ended and a third job runs
            replace_node(0, "--max-concurrent-jobs", "1")
            first = client.submit_job(tiny_spec(min_nodes=2, rounds=1, max_steps=1,
                                                wait_for_nodes_s=120))
            events_until(client, first.job_id, "job.initialized")
            results["concurrent"] = run(wait_for_nodes_s=5)
            client.cancel_job(first.job_id)
            results["after_cancel"] = run()
            still_serving = [n.info.name for n in client.list_nodes() if n.online]
    finally:
        cluster.stop()

    for name, cap in [("examples", "examples_per_round"), ("payload", "payload_bytes"),
                      ("seconds", "seconds_per_task"), ("concurrent", "concurrent_jobs")]:
        status = results[name]
        assert status.state == pb.FAILED, (name, status)
        assert f"caps.{cap}" in status.reason, (name, status.reason)
        if name != "concurrent":  # that one refused the initial state, before any round
            assert any(f"caps.{cap}" in why for why in refusals(status).values()), name
    assert results["examples_ok"].state == pb.COMPLETED, results["examples_ok"].reason
    assert results["after_cancel"].state == pb.COMPLETED, results["after_cancel"].reason
    assert still_serving == ["node0"]  # refusing never took a daemon down


def test_a_split_server_whose_owner_refuses_the_role_says_so(tmp_path, shards):
    """The policy is checked at the split-server's own entry point too: a split-server node
    whose owner does not take the role refuses the devices' sessions, and the submitter reads
    why (through the devices' failed tasks)."""
    cluster = LocalCluster(tmp_path / "cluster", shards(2, per_node=32), mqtt=False)
    try:
        cluster.start()
        cluster.start_split_server("--roles", "trainer")
        with Client(cluster.address) as client:
            wait_for_nodes(client, 3)
            spec = tiny_spec(method="sfprompt", rounds=1, min_nodes=2, max_steps=2,
                             params={"head_layers": 1, "tail_layers": 0, "num_prompts": 2})
            final = client.wait_job(client.submit_job(spec).job_id)
    finally:
        cluster.stop()
    assert final.state == pb.FAILED
    assert "split-server" in final.reason, final.reason
