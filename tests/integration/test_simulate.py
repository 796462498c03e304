"""``confide simulate`` end to end: virtual nodes (Ray actors, or hosts in this process)
against a real coordinator process, with dropout injection; every listener on loopback; and
the same nodes run as daemons on the same seed give the same global model."""

from __future__ import annotations

import importlib.util
import ipaddress

import pytest

from confide.cluster.experiment import run_experiment
from confide.cluster.local import LocalCluster
from confide.cluster.simulate import (
    Faults,
    SimulationConfig,
    prepare_data,
    run_simulation,
    simulation_spec,
)
from confide.node.data import load_jsonl
from confide.sdk.client import Client
from tests.integration.helpers import wait_for_nodes

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'confide[sim]'; "
                                      "scripts/setup.sh installs it)")


def _loopback(listener: str) -> bool:
    address = ipaddress.ip_address(listener.rsplit(":", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@needs_ray
@pytest.mark.timeout(900)
def test_twenty_virtual_nodes_on_ray_with_dropouts(tmp_path):
    cfg = SimulationConfig(nodes=20, rounds=2, per_round=10, base="tiny-bert", max_steps=2,
                           dropout=0.3, test_size=50, backend="ray", workdir=tmp_path,
                           quiet=True)
    result = run_simulation(cfg)
    exp = result.experiment
    assert exp.ok, exp.reason
    assert result.hosts >= 1 and all(h["nodes"] for h in result.host_stats)
    assert sum(h["nodes"] for h in result.host_stats) == 20
    assert all(h["models_held"] == 1 for h in result.host_stats)  # one model per host
    dropped_reasons = [why for r in exp.rounds for why in r["dropped"].values()]
    injected = sum(h["dropped"] for h in result.host_stats)
    assert injected >= 1 and len(dropped_reasons) == injected
    assert all("simulated dropout" in why for why in dropped_reasons)
    for r in exp.rounds:
        assert r["participants"] + len(r["dropped"]) == 10
    assert result.listeners, "no listener found (the coordinator's at least)"
    assert all(_loopback(address) for address in result.listeners), result.listeners
    assert result.shard_sizes["min"] >= 1 and result.shard_sizes["labels"] == 5


@pytest.mark.timeout(900)
def test_simulated_nodes_and_the_same_nodes_as_daemons_give_the_same_aggregate(tmp_path):
    cfg = SimulationConfig(nodes=4, rounds=2, per_round=3, base="tiny-bert", max_steps=3,
                           test_size=60, backend="local", workdir=tmp_path, quiet=True)
    simulated = run_simulation(cfg).experiment
    assert simulated.ok, simulated.reason

    folders, sizes = prepare_data(cfg)  # the same shards; each folder keeps its node key
    test = load_jsonl(tmp_path / "data" / "test.jsonl")[:cfg.test_size]
    with LocalCluster(tmp_path / "daemons", folders, mqtt=False) as cluster:  # the daemons
        with Client(cluster.address) as client:
            wait_for_nodes(client, cfg.nodes, timeout=180)
        daemons = run_experiment(cluster, simulation_spec(cfg, sizes["labels"]), test,
                                 quiet=True)
    assert daemons.ok, daemons.reason
    for sim_round, daemon_round in zip(simulated.rounds, daemons.rounds, strict=True):
        assert sim_round["participants"] == daemon_round["participants"] == 3
        assert sim_round["metrics"]["loss_last"] == pytest.approx(
            daemon_round["metrics"]["loss_last"], abs=1e-4)
    assert simulated.after["loss"] == pytest.approx(daemons.after["loss"], abs=1e-4)
    assert simulated.after["loss"] != pytest.approx(simulated.before["loss"], abs=1e-4)


@pytest.mark.timeout(600)
def test_stragglers_past_the_round_deadline_are_dropped_by_the_coordinator(tmp_path):
    cfg = SimulationConfig(nodes=4, rounds=1, base="tiny-bert", max_steps=2, test_size=20,
                           stragglers=0.5, delay_mean_s=1000.0, delay_max_s=60.0,
                           round_timeout_s=12.0, backend="local", workdir=tmp_path, quiet=True)
    faults = Faults(0.0, cfg.stragglers, cfg.delay_mean_s, cfg.delay_max_s, cfg.seed)
    delays = [faults.fate(f"sim{i}", 1)[1] for i in range(cfg.nodes)]
    # the seed draws delays far from the deadline either way: no timing-sensitive case
    assert all(d == 0 or d >= 40 for d in delays) and 0 < sum(d > 0 for d in delays) < 4
    result = run_simulation(cfg)
    (round_one,) = result.experiment.rounds
    late = sum(d > 0 for d in delays)
    assert result.experiment.ok, result.experiment.reason
    assert round_one["participants"] == cfg.nodes - late
    assert len(round_one["dropped"]) == late
    assert all("deadline" in why for why in round_one["dropped"].values())
    assert sum(h["delayed"] for h in result.host_stats) == late


@pytest.mark.timeout(300)
def test_a_causal_lm_trains_on_the_trivia_corpus_split_over_virtual_nodes(tmp_path):
    pytest.importorskip("chatterbot_corpus", reason="the trivia corpus is not installed: pip "
                        "install chatterbot-corpus==1.3.3 (requirements/pinned.txt)")
    cfg = SimulationConfig(nodes=6, rounds=2, dataset="trivia", base="tiny-llama",
                           max_steps=3, learning_rate=5e-3, test_size=52, alpha=0.3,
                           backend="local", workdir=tmp_path, quiet=True)
    result = run_simulation(cfg)
    exp = result.experiment
    assert exp.ok, exp.reason
    assert all(r["participants"] == 6 for r in exp.rounds)
    assert result.shard_sizes["total"] == 209 and result.shard_sizes["min"] >= 1
    # held-out perplexity on questions no node holds, and the federated model improves on it
    assert "accuracy" not in exp.after
    assert exp.after["perplexity"] < exp.before["perplexity"]
    assert "perplexity" in result.table()
