"""The simulation's parts: one shared trainer per host that leaks nothing between virtual
nodes, seeded failure injection, and how nodes are dealt to hosts."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

from confide.cluster.simulate import (
    SimulationConfig,
    SimulationError,
    host_specs,
    pool_size,
    require_ray,
    run_simulation,
)
from confide.cluster.simulate_host import Faults, SharedTrainers, SimulatedDropout, VirtualWorker
from confide.coordinator.jobs import normalize_spec
from confide.node.daemon import NodeConfig, NodeDaemon
from confide.node.data import synthetic_classification, write_jsonl
from confide.protos.codec import to_dense
from confide.sdk.client import job_spec
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


@pytest.mark.parametrize("bad", [dict(nodes=0), dict(per_round=30), dict(dropout=2.0),
                                 dict(backend="threads")])
def test_bad_settings_are_refused_before_anything_starts(tmp_path, bad):
    with pytest.raises(ValueError):
        run_simulation(SimulationConfig(**({"nodes": 20, "workdir": tmp_path} | bad)))
    assert not (tmp_path / "data").exists()
