"""The simulation's parts: one shared trainer per host that leaks nothing between virtual
nodes, seeded failure injection, and how nodes are dealt to hosts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from confide.bench import simulate as bench_simulate
from confide.cluster.experiment import ExperimentResult
from confide.cluster.simulate import (
    SimulationConfig,
    SimulationError,
    SimulationResult,
    host_specs,
    pool_size,
    require_ray,
    run_simulation,
    simulation_spec,
)
from confide.cluster.simulate_host import Faults, SharedTrainers, SimulatedDropout, VirtualWorker
from confide.coordinator.jobs import normalize_spec
from confide.node.daemon import NodeConfig, NodeDaemon
from confide.node.data import synthetic_classification, write_jsonl
from confide.protos.codec import to_dense
from confide.sdk.client import job_spec
from confide.sdk.simulation import simulate, simulation_config
from confide.v1 import coordinator_pb2 as pb


def _worker(folder: Path, seed: int, shared: SharedTrainers, faults: Faults | None = None
            ) -> VirtualWorker:
    write_jsonl(folder / "train.jsonl", synthetic_classification(24, 2, seed=seed))
    daemon = NodeDaemon(NodeConfig(data_dir=folder, listen="", device="cpu", agent=False))
    return VirtualWorker(daemon, shared, faults or Faults(), folder.name)


def _update(worker: VirtualWorker, spec: pb.JobSpec, global_state: dict,
            round_number: int = 1) -> dict[str, torch.Tensor]:
    """One TRAIN task's update (the worker takes and returns tensor maps: the session streams
    them)."""
    task = pb.Task(task_id=f"t{round_number}", job_id="job", round=round_number,
                   kind=pb.TRAIN, spec=spec, has_global=True)
    payload, _, _ = worker.train(task, global_state, lambda *_: None, threading.Event())
    return {k: to_dense(v) for k, v in payload.items()}


def test_virtual_nodes_share_one_model_and_leak_nothing_through_it(tmp_path):
    spec = normalize_spec(job_spec("fedavg-lora", base="tiny-bert", num_labels=2,
                                   max_length=16, max_steps=3, batch_size=8,
                                   learning_rate=5e-2))
    shared = SharedTrainers()
    a = _worker(tmp_path / "a", 1, shared)
    b = _worker(tmp_path / "b", 2, shared)
    init = a.initial_state(pb.Task(task_id="i", job_id="job", kind=pb.INIT, spec=spec))
    _update(a, spec, init)
    b_after_a = _update(b, spec, init)
    assert len(shared.trainers) == 1  # one model for the host, not one per node
    # the same node alone on a fresh host: what it sends does not depend on who trained before
    alone = _update(_worker(tmp_path / "b2", 2, SharedTrainers()), spec, init)
    assert b_after_a.keys() == alone.keys()
    assert all(torch.allclose(b_after_a[k], alone[k], atol=1e-6) for k in alone)
    assert any(v.abs().sum() > 0 for v in alone.values())


def test_an_injected_dropout_fails_the_task_before_any_training(tmp_path):
    spec = normalize_spec(job_spec("fedavg-lora", base="tiny-bert", num_labels=2,
                                   max_length=16, max_steps=1))
    worker = _worker(tmp_path / "n", 1, SharedTrainers(), Faults(dropout=1.0))
    with pytest.raises(SimulatedDropout):
        _update(worker, spec, b"")
    assert worker.injected["dropped"] == 1
    assert not worker.models.load("job", "local")  # it never trained


def test_faults_are_seeded_and_near_their_rates():
    faults = Faults(dropout=0.2, straggler=0.5, delay_mean_s=3.0, delay_max_s=10.0, seed=7)
    fates = [faults.fate(f"sim{i}", r) for i in range(500) for r in range(1, 5)]
    assert fates == [faults.fate(f"sim{i}", r) for i in range(500) for r in range(1, 5)]
    dropped = sum(d for d, _ in fates) / len(fates)
    delays = [s for d, s in fates if not d and s > 0]
    assert 0.15 < dropped < 0.25
    assert 0.4 < len(delays) / (len(fates) * 0.8) < 0.6
    assert max(delays) <= 10.0
    assert Faults(seed=8, dropout=0.2).fate("sim1", 1) is not None
    with pytest.raises(ValueError):
        Faults(dropout=1.5)


def test_nodes_are_dealt_round_robin_to_a_pool_of_about_one_host_per_cpu():
    cfg = SimulationConfig(nodes=200, cpus_per_node=1.0)
    assert pool_size(cfg, 2.0) == 2
    assert pool_size(SimulationConfig(nodes=200, cpus_per_node=0.5), 2.0) == 4
    assert pool_size(SimulationConfig(nodes=200, max_concurrent_trainers=1), 16.0) == 1
    assert pool_size(SimulationConfig(nodes=3, cpus_per_node=0.25), 16.0) == 3
    folders = [Path(f"/n{i}") for i in range(200)]
    specs = host_specs(cfg, "127.0.0.1:1", folders, 2)
    indices = [i for spec in specs for i, _ in spec.nodes]
    assert sorted(indices) == list(range(200))
    assert [len(s.nodes) for s in specs] == [100, 100]
    assert specs[1].nodes[0] == (1, "/n1")
    with pytest.raises(ValueError):
        pool_size(SimulationConfig(cpus_per_node=0), 2.0)


def test_without_ray_the_ray_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SimulationError, match=r"confide\[sim\]"):
        require_ray()


@pytest.mark.parametrize("bad", [
    dict(nodes=0), dict(per_round=30), dict(dropout=2.0), dict(backend="threads"),
    dict(dataset="imdb"), dict(dataset="trivia"),  # tiny-bert cannot train a causal LM
    dict(secure_aggregation=True),  # min_nodes 1: the sum of one node is its update
    dict(anonymity_set=-1), dict(method="dp-lora", params={"unit": "galaxy"}),
])
def test_bad_settings_are_refused_before_anything_starts(tmp_path, bad):
    with pytest.raises(ValueError):
        run_simulation(SimulationConfig(**({"nodes": 20, "workdir": tmp_path} | bad)))
    assert not (tmp_path / "data").exists()


def test_the_sdk_face_builds_the_same_config_and_refuses_before_any_work(tmp_path):
    cfg = simulation_config(nodes=30, per_round=5, dataset="trivia", base="tiny-llama",
                            secure_aggregation=True, min_nodes=2, workdir=tmp_path)
    assert cfg == SimulationConfig(nodes=30, per_round=5, dataset="trivia", base="tiny-llama",
                                   secure_aggregation=True, min_nodes=2, workdir=tmp_path)
    spec = normalize_spec(simulation_spec(cfg, labels=0))
    assert spec.model.task == "causal-lm" and spec.secure_aggregation
    # options over a config keep the rest of it
    assert simulation_config(cfg, rounds=7) == dataclasses.replace(cfg, rounds=7)
    with pytest.raises(TypeError, match=r"unknown simulation option.*nodez"):
        simulate(nodez=3, workdir=tmp_path)
    with pytest.raises(ValueError, match="per_round"):
        simulate(nodes=3, per_round=4, workdir=tmp_path)
    assert not (tmp_path / "data").exists()


def test_the_table_shows_perplexity_for_a_causal_lm_and_accuracy_otherwise():
    experiment = ExperimentResult("j1", "fedavg-lora", "COMPLETED", "", rounds=[{
        "round": 1, "participants": 3, "dropped": {"n": "simulated dropout"},
        "metrics": {"loss_last": 2.5}, "eval": {"perplexity": 12.25, "accuracy": 0.5},
        "bytes_up": 3000, "bytes_down": 1000, "seconds": 1.5}],
        before={"perplexity": 40.0, "accuracy": 0.25})
    hosts = [{"dropped": 1, "delayed": 0, "rss_peak_mb": 10.0}]
    for dataset, shown, hidden in (("trivia", "12.250", "0.500"), ("bbc", "0.500", "12.250")):
        result = SimulationResult({"nodes": 4, "backend": "local", "dataset": dataset},
                                  {"min": 1, "median": 2, "max": 3}, 1, 2.0, experiment,
                                  hosts, {"total_rss_peak_mb": 1.0, "host_rss_peak_mb": 1.0},
                                  ["127.0.0.1:1"])
        table = result.table()
        assert shown in table and hidden not in table and result.ok
        assert ("perplexity" in table) == (dataset == "trivia")


def _bench_args(tmp_path, **changes) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_simulate.add_arguments(parser)
    args = parser.parse_args(["--sizes", "", "--out", str(tmp_path)])
    return argparse.Namespace(**(vars(args) | changes))


def test_bench_dp_params_are_checked_before_any_run(tmp_path):
    args = _bench_args(tmp_path, dp_curve=True)
    assert bench_simulate.dp_params(args) == bench_simulate.DP_PARAMS | {"rounds": 3}
    for bad, message in (('{"unit": "galaxy"}', "unit"), ("[1]", "JSON object"),
                         ("{bad", "not JSON")):
        with pytest.raises(ValueError, match=message):
            bench_simulate.dp_params(_bench_args(tmp_path, dp_curve=True, dp_params=bad))


def test_bench_keeps_what_it_did_not_run_and_records_the_dp_curve_goal(tmp_path):
    """A run of nothing new (no sizes, no --goal, no --dp-curve) rewrites the JSON from the
    previous one: the parts are carried over, said so, and the goals recomputed from them."""
    point = {"nodes_per_round": 10, "base": "minilm", "rounds": 3, "max_steps": 4,
             "accuracy_before": 0.2, "accuracy_dp": 0.3, "accuracy_reference": 0.6,
             "epsilon": 7.99, "noise_multiplier": 1.1,
             "states": {"fedavg-lora": "COMPLETED", "dp-lora": "COMPLETED"}}
    curve = [point, point | {"nodes_per_round": 50},
             point | {"nodes_per_round": 200, "accuracy_dp": 0.55}]
    goal_run = {"nodes": 200, "per_round": 20, "hosts": 2, "startup_s": 60.0, "wall_s": 600.0,
                "round_s_mean": 23.0, "s_per_trained_node": 1.2, "total_rss_peak_mb": 5e3,
                "host_rss_peak_mb": 2e3, "accuracy_after": 0.4, "state": "COMPLETED",
                "base": "minilm"}
    previous = {"args": {"dp_sizes": "200"}, "results": [], "goal_run": goal_run,
                "dp_curve": curve, "carried_over": {"goal_run": {"goal": True}}}
    (tmp_path / "simulate.json").write_text(json.dumps(previous))
    assert bench_simulate.run_benchmark(_bench_args(tmp_path)) == 0
    report = json.loads((tmp_path / "simulate.json").read_text())
    assert report["dp_curve"] == curve and report["goal_run"] == goal_run
    # the goal run was carried into the previous JSON: its origin stays the run that made it
    assert report["carried_over"] == {"goal_run": {"goal": True},
                                      "dp_curve": {"sizes": [10, 50, 200]}}
    assert report["goals"][0]["met"] is True and report["goals"][0]["measured"] == 10.0
    (dp_goal,) = [g for g in report["goals"] if g["goal"].startswith("node-level DP")]
    assert dp_goal["met"] is True and dp_goal["measured"] == 7.99
    assert "n=200: 0.550 vs 0.600" in dp_goal["text"]
    # a size run again replaces its old point, the others stay
    merged, kept = bench_simulate._merge_dp(previous, [point | {"nodes_per_round": 50,
                                                                "accuracy_dp": 0.4}])
    assert kept == [10, 200] and [r["accuracy_dp"] for r in merged] == [0.3, 0.4, 0.55]
    # an overspent point is a miss; a failed run or a missing size: not measured (yet)
    assert bench_simulate._dp_goal([point | {"epsilon": 9.0}])["met"] is False
    failed = point | {"states": {"fedavg-lora": "COMPLETED", "dp-lora": "ERROR"}}
    assert bench_simulate._dp_goal([failed])["met"] is None
    assert "a run failed" in bench_simulate._dp_goal([failed])["text"]
    partial = bench_simulate._dp_goal(curve[:2])
    assert partial["met"] is None and "n = 200 not run" in partial["text"]
    assert bench_simulate._dp_goal([])["met"] is None


class _SlowStartingRay:
    """Stands in for Ray (a third-party library) whose raylet misses its 30 s registration
    window a given number of times; records each call."""

    def __init__(self, timeouts: int) -> None:
        self.timeouts = timeouts
        self.inits = 0
        self.shutdowns = 0

    def init(self, **kwargs) -> None:
        self.inits += 1
        if self.inits <= self.timeouts:
            raise Exception("The current node timed out during startup. This could happen ...")

    def shutdown(self) -> None:
        self.shutdowns += 1


def _pool_with(ray) -> object:
    from confide.cluster.simulate import _RayPool

    pool = object.__new__(_RayPool)
    pool.ray = ray
    pool._temp = Path("/tmp") / "confide-ray-test-unused"
    return pool


def test_a_slow_ray_start_is_tried_again_and_then_refused_clearly():
    ray = _SlowStartingRay(timeouts=2)
    _pool_with(ray)._start_local_ray(attempts=3)
    assert (ray.inits, ray.shutdowns) == (3, 2)

    ray = _SlowStartingRay(timeouts=5)
    with pytest.raises(SimulationError, match=r"attempt 3 of 3.*--backend local"):
        _pool_with(ray)._start_local_ray(attempts=3)
    assert ray.inits == 3


def test_a_ray_start_error_other_than_the_timeout_is_not_retried():
    class BrokenRay(_SlowStartingRay):
        def init(self, **kwargs) -> None:
            self.inits += 1
            raise ValueError("bad argument")

    ray = BrokenRay(timeouts=0)
    with pytest.raises(SimulationError, match="attempt 1 of 3"):
        _pool_with(ray)._start_local_ray(attempts=3)
    assert ray.inits == 1
