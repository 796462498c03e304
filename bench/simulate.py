"""``confide bench simulate``: many virtual nodes (``confide simulate``) at several sizes.

For each size N in ``--sizes`` one simulation runs (a fresh coordinator and host pool each):
``--fraction`` of the nodes sampled per round, ``--rounds`` rounds of ``--method`` on
Dirichlet-skewed BBC News with ``--base``. Measured: the time to bring the nodes up, wall
seconds per round (the coordinator's selection-to-commit time), seconds per node trained,
the peak summed RSS of every process (coordinator, Ray, hosts) and the largest host's, and
the held-out accuracy. ``--goal`` adds the issue's run: 200 MiniLM LoRA nodes, 20 per round,
5 rounds, under 15 minutes. The node-level DP curve of the issue is recorded as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from confide.bench.common import goal_record, hardware, pyplot, save_figure

GOAL_NODES, GOAL_PER_ROUND, GOAL_ROUNDS, GOAL_MINUTES = 200, 20, 5, 15.0
#: the most seconds per trained node at the largest size may cost, relative to the smallest
GOAL_LINEAR_RATIO = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="10,50,200", help="node counts (default: %(default)s)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="nodes sampled per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per size (default: "
                   "%(default)s)")
    p.add_argument("--base", default="tiny-bert", help="model of the sizes' runs")
    p.add_argument("--max-steps", type=int, default=4,
                   help="local steps per node and round (default: %(default)s)")
    p.add_argument("--backend", choices=["ray", "local"], default="ray")
    p.add_argument("--goal", action="store_true",
                   help="also run the goal: 200 MiniLM nodes, 20 per round, 5 rounds")
    p.add_argument("--goal-max-steps", type=int, default=4,
                   help="local steps per node in the goal run (default: %(default)s)")
    p.add_argument("--workdir", default="runs/bench-simulate")
    p.add_argument("--out", default="bench/results")


def _row(result, per_round: int, wall_s: float) -> dict:
    exp = result.experiment
    done = [r for r in exp.rounds if r["state"] == "completed"]
    seconds = [r["seconds"] for r in done]
    trained = sum(r["participants"] for r in done)
    return {
        "nodes": result.config["nodes"], "per_round": per_round, "base": result.config["base"],
        "hosts": result.hosts, "state": exp.state, "reason": exp.reason,
        "rounds_completed": len(done), "startup_s": result.startup_s,
        "round_s_mean": sum(seconds) / len(seconds) if seconds else None,
        "s_per_trained_node": sum(seconds) / trained if trained else None,
        "wall_s": wall_s, "job_s": exp.seconds,
        "accuracy_before": exp.before.get("accuracy"), "accuracy_after": exp.after.get("accuracy"),
        "shard_sizes": result.shard_sizes,
        "total_rss_peak_mb": result.memory["total_rss_peak_mb"],
        "host_rss_peak_mb": result.memory["host_rss_peak_mb"],
        "listeners": result.listeners,
    }


def _simulate(args: argparse.Namespace, nodes: int, per_round: int, rounds: int, base: str,
              max_steps: int) -> dict:
    from confide.cluster.simulate import SimulationConfig, run_simulation

    cfg = SimulationConfig(nodes=nodes, rounds=rounds, per_round=per_round, base=base,
                           max_steps=max_steps, backend=args.backend, test_size=200,
                           workdir=Path(args.workdir) / f"{base}-{nodes}", quiet=True)
    started = time.monotonic()
    result = run_simulation(cfg)
    row = _row(result, per_round, time.monotonic() - started)
    print(f"  {nodes} nodes ({per_round}/round, {base}): {row['state']}, round "
          f"{_fmt(row['round_s_mean'])} s, peak {row['total_rss_peak_mb']:.0f} MB, "
          f"wall {row['wall_s']:.0f} s", flush=True)
    return row


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_benchmark(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    for n in sizes:
        rows.append(_simulate(args, n, max(1, round(n * args.fraction)), args.rounds,
                              args.base, args.max_steps))
    goal_row = None
    if args.goal:
        goal_row = _simulate(args, GOAL_NODES, GOAL_PER_ROUND, GOAL_ROUNDS, "minilm",
                             args.goal_max_steps)
    goals = _goals(rows, goal_row)
    report = {"benchmark": "simulate", "hardware": hardware() | {
                  "load_average": round(os.getloadavg()[0], 1)},
              "args": vars(args) | {"func": None}, "results": rows, "goal_run": goal_row,
              "goals": goals,
              "note": "timings on a 2-core machine shared with other jobs (inflated by load)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(report, indent=1, default=str))
    _plot(rows, out / "simulate.png")
    print(f"\n{'nodes':>6}{'/round':>7}{'hosts':>6}{'up s':>7}{'round s':>9}{'s/node':>8}"
          f"{'peak MB':>9}{'host MB':>9}{'acc':>7}  state")
    for r in rows + ([goal_row] if goal_row else []):
        acc = r["accuracy_after"]
        print(f"{r['nodes']:>6}{r['per_round']:>7}{r['hosts']:>6}{r['startup_s']:>7.0f}"
              f"{_fmt(r['round_s_mean']):>9}{_fmt(r['s_per_trained_node']):>8}"
              f"{r['total_rss_peak_mb']:>9.0f}{r['host_rss_peak_mb']:>9.0f}"
              f"{'-' if acc is None else f'{acc:.3f}':>7}  {r['state']} ({r['base']})")
    for goal in goals:
        print("goal: " + goal["text"])
    print(f"wrote {out / 'simulate.json'} and {out / 'simulate.png'}")
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


def _goals(rows: list[dict], goal_row: dict | None) -> list[dict]:
    goals = []
    name = (f"{GOAL_NODES} MiniLM LoRA nodes, {GOAL_PER_ROUND} per round, {GOAL_ROUNDS} "
            f"rounds, in under {GOAL_MINUTES:.0f} minutes on this machine")
    if goal_row is None:
        goals.append(goal_record(name, GOAL_MINUTES, None, None,
                                 f"{name}: not run (pass --goal)"))
    else:
        minutes = goal_row["wall_s"] / 60
        met = goal_row["state"] == "COMPLETED" and minutes < GOAL_MINUTES
        goals.append(goal_record(name, GOAL_MINUTES, minutes, met,
                                 f"{name}: {minutes:.1f} min wall ({goal_row['state']}, "
                                 f"startup included) -> {'met' if met else 'MISSED'}"))
    name = ("per-round cost grows with the nodes trained, not the nodes registered: seconds "
            f"per trained node at the largest size within {GOAL_LINEAR_RATIO:g}x the smallest's")
    costs = [r for r in rows if r["s_per_trained_node"]]
    if len(costs) < 2:
        goals.append(goal_record(name, GOAL_LINEAR_RATIO, None, None,
                                 f"{name}: not measured (needs two sizes)"))
    else:
        ratio = costs[-1]["s_per_trained_node"] / costs[0]["s_per_trained_node"]
        met = ratio <= GOAL_LINEAR_RATIO
        goals.append(goal_record(name, GOAL_LINEAR_RATIO, ratio, met,
                                 f"{name}: {costs[0]['nodes']} -> {costs[-1]['nodes']} nodes: "
                                 f"x{ratio:.2f} -> {'met' if met else 'MISSED'}"))
    name = "node-level DP curve: accuracy vs nodes per round (10, 50, 200) at epsilon 8"
    goals.append(goal_record(name, 8.0, None, None, f"{name}: not run in this slice"))
    name = "1,000 tiny-model nodes"
    big = [r for r in rows if r["nodes"] >= 1000]
    goals.append(goal_record(name, 1000, big[0]["nodes"] if big else None,
                             (big[0]["state"] == "COMPLETED") if big else None,
                             f"{name}: " + (big[0]["state"] if big else "not run")))
    return goals


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    nodes = [r["nodes"] for r in rows]
    left.plot(nodes, [r["round_s_mean"] or 0 for r in rows], marker="o", label="round (s)")
    left.plot(nodes, [r["s_per_trained_node"] or 0 for r in rows], marker="s",
              label="per trained node (s)")
    left.set_xlabel("virtual nodes registered")
    left.set_ylabel("seconds")
    left.legend(fontsize="small")
    left.set_title("wall time per round (loaded 2-core machine)")
    right.plot(nodes, [r["total_rss_peak_mb"] for r in rows], marker="o",
               label="every process (summed RSS)")
    right.plot(nodes, [r["host_rss_peak_mb"] for r in rows], marker="s", label="largest host")
    right.set_xlabel("virtual nodes registered")
    right.set_ylabel("peak MB")
    right.legend(fontsize="small")
    right.set_title("memory")
    save_figure(fig, path)
