"""``confide simulate``: many virtual nodes against a real coordinator (cluster.simulate)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# torch and Ray load inside run_simulate: `confide --help` stays fast


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=20, help="virtual nodes (default: %(default)s)")
    p.add_argument("--method", default="fedavg-lora", help="federated method (default: "
                   "%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: %(default)s)")
    p.add_argument("--per-round", type=int, default=0,
                   help="nodes sampled per round (default: all)")
    p.add_argument("--min-nodes", type=int, default=1,
                   help="valid updates a round needs (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.3,
                   help="Dirichlet label-skew concentration (default: %(default)s)")
    p.add_argument("--base", default="tiny-bert",
                   help="base model: tiny-bert (tests) or minilm (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per article")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=0,
                   help="local optimizer steps per round, 0 = one epoch (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="the coordinator's round deadline, s (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=200, help="held-out articles evaluated")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="fraction of the selected nodes that drop out each round")
    p.add_argument("--stragglers", type=float, default=0.0,
                   help="fraction of the others that wait before training")
    p.add_argument("--delay-mean", type=float, default=5.0,
                   help="stragglers' mean delay, s (exponential; default: %(default)s)")
    p.add_argument("--delay-max", type=float, default=60.0,
                   help="stragglers' longest delay, s (default: %(default)s)")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: the hosts are Ray actors (the `sim` extra); local: in this "
                        "process (default: %(default)s)")
    p.add_argument("--address", default="",
                   help="an existing Ray cluster, ray://HOST:PORT (default: $RAY_ADDRESS, "
                        "else a local Ray on 127.0.0.1)")
    p.add_argument("--cpus-per-node", type=float, default=1.0,
                   help="CPUs reserved per training host (its torch threads) (default: "
                        "%(default)s)")
    p.add_argument("--gpus-per-node", type=float, default=0.0,
                   help="GPU share per training host (Ray) (default: %(default)s)")
    p.add_argument("--max-concurrent-trainers", type=int, default=0,
                   help="nodes training at once, i.e. hosts (default: the CPUs / "
                        "--cpus-per-node)")
    p.add_argument("--workdir", default="runs/simulate")
    p.add_argument("--json", default="", help="also write the result to this JSON file")


def config_from_args(args: argparse.Namespace):
    from confide.cluster.simulate import SimulationConfig

    return SimulationConfig(
        nodes=args.nodes, method=args.method, rounds=args.rounds, per_round=args.per_round,
        min_nodes=args.min_nodes, alpha=args.alpha, base=args.base,
        max_length=args.max_length, batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.learning_rate, round_timeout_s=args.round_timeout, seed=args.seed,
        test_size=args.test_size, dropout=args.dropout, stragglers=args.stragglers,
        delay_mean_s=args.delay_mean, delay_max_s=args.delay_max, backend=args.backend,
        address=args.address, cpus_per_node=args.cpus_per_node,
        gpus_per_node=args.gpus_per_node, max_concurrent_trainers=args.max_concurrent_trainers,
        workdir=Path(args.workdir))


def print_table(result) -> None:
    """The demo's table (cli.demo), with the simulation's own lines around it."""
    exp = result.experiment
    sizes = result.shard_sizes
    print(f"\n{result.config['nodes']} virtual nodes on {result.hosts} host(s) "
          f"({result.config['backend']}), shards min/median/max "
          f"{sizes['min']}/{sizes['median']:g}/{sizes['max']} articles; up in "
          f"{result.startup_s:.0f}s")
    print(f"job {exp.job_id} ({exp.method}): {exp.state} {exp.reason}")
    print(f"{'round':>5} {'nodes':>5} {'dropped':>7} {'train loss':>10} {'accuracy':>9} "
          f"{'up (KB)':>10} {'down (KB)':>10} {'seconds':>8}")
    if exp.before:
        print(f"{0:>5} {'-':>5} {'-':>7} {'-':>10} {exp.before['accuracy']:>9.3f}")
    for r in exp.rounds:
        loss = r["metrics"].get("loss_last", float("nan"))
        acc = r["eval"].get("accuracy", float("nan"))
        print(f"{r['round']:>5} {r['participants']:>5} {len(r['dropped']):>7} {loss:>10.4f} "
              f"{acc:>9.3f} {r['bytes_up'] / 1e3:>10.1f} {r['bytes_down'] / 1e3:>10.1f} "
              f"{r['seconds']:>8.1f}")
    injected = {k: sum(h[k] for h in result.host_stats) for k in ("dropped", "delayed")}
    print(f"injected: {injected['dropped']} dropout(s), {injected['delayed']} straggler(s); "
          f"memory: peak {result.memory['total_rss_peak_mb']:.0f} MB summed RSS of every "
          f"process, {result.memory['host_rss_peak_mb']:.0f} MB the largest host")
    print("listeners: " + ", ".join(result.listeners))


def run_simulate(args: argparse.Namespace) -> int:
    from confide.cluster.simulate import SimulationError, run_simulation

    try:
        result = run_simulation(config_from_args(args))
    except (SimulationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1, default=str))
    return 0 if result.experiment.ok else 1
