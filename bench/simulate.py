"""``confide bench simulate``: many virtual nodes (``confide simulate``) at several sizes.

For each size N in ``--sizes`` one simulation runs (a fresh coordinator and host pool each):
``--fraction`` of the nodes sampled per round, ``--rounds`` rounds of ``--method`` on
Dirichlet-skewed BBC News with ``--base``. Measured: the time to bring the nodes up, wall
seconds per round (the coordinator's selection-to-commit time), seconds per node trained,
the peak summed RSS of every process (coordinator, Ray, hosts) and the largest host's, and
the held-out accuracy. ``--goal`` adds the issue's run: 200 MiniLM LoRA nodes, 20 per round,
5 rounds, under 15 minutes.

``--dp-curve`` adds the node-level DP curve that motivates many-node simulation: for each n in
``--dp-sizes`` (10, 50, 200), n virtual nodes all trained every round (q = 1, so the epsilon
holds with no sampling-amplification caveat) run dp-lora at node level (DP-FedAvg, central
noise: ``--dp-params``, epsilon 8 over ``--dp-rounds``) and fedavg-lora, the reference, on the
same shards and seed; the held-out accuracy of both is the curve (noise on the mean update
~ sigma C sqrt(d) / n). A run that leaves ``--sizes`` empty, or passes no ``--goal``, keeps
those parts of the previous JSON at ``--out`` (said in ``carried_over``), so the curve can be
measured on its own without erasing the sizes' table.
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
DP_EPSILON = 8.0
#: the nodes per round the issue's curve names
DP_SIZES = (10, 50, 200)
DP_REFERENCE = "fedavg-lora"
#: DP-FedAvg at node level, the coordinator adding the noise once (its clip as in
#: ``confide bench federated``'s node-level row); ``rounds`` is filled from --dp-rounds
DP_PARAMS = {"unit": "node", "target_epsilon": DP_EPSILON, "mode": "central", "clip_norm": 0.5}


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
    p.add_argument("--dp-curve", action="store_true",
                   help="also run the node-level DP curve: dp-lora at epsilon 8 vs fedavg-lora "
                        "at --dp-sizes nodes per round")
    p.add_argument("--dp-sizes", default=",".join(map(str, DP_SIZES)),
                   help="nodes per round of the DP curve, all trained each round (default: "
                        "%(default)s)")
    p.add_argument("--dp-base", default="minilm", help="model of the DP curve (default: "
                   "%(default)s)")
    p.add_argument("--dp-rounds", type=int, default=3,
                   help="rounds of each DP-curve run; epsilon is calibrated for them "
                        "(default: %(default)s)")
    p.add_argument("--dp-max-steps", type=int, default=4,
                   help="local steps per node and round in the DP curve (default: %(default)s)")
    p.add_argument("--dp-round-timeout", type=float, default=1800.0,
                   help="round deadline of the DP curve's runs, s: every node trains each "
                        "round, 200 of them take minutes on 2 cores (default: %(default)s)")
    p.add_argument("--dp-params", default=json.dumps(DP_PARAMS),
                   help="dp-lora's options in the DP curve (JSON; rounds is added) "
                        "(default: %(default)s)")
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
        # node-level DP: the epsilon spent and sigma, as the coordinator reports them
        "epsilon": done[-1]["metrics"].get("epsilon") if done else None,
        "noise_multiplier": done[-1]["metrics"].get("noise_multiplier") if done else None,
        "total_rss_peak_mb": result.memory["total_rss_peak_mb"],
        "host_rss_peak_mb": result.memory["host_rss_peak_mb"],
        "listeners": result.listeners,
    }


def _simulate(args: argparse.Namespace, nodes: int, per_round: int, rounds: int, base: str,
              max_steps: int, method: str = "fedavg-lora", params: dict | None = None,
              tag: str = "", round_timeout_s: float = 300.0) -> dict:
    from confide.sdk.simulation import simulate

    started = time.monotonic()
    result = simulate(nodes=nodes, rounds=rounds, per_round=per_round, base=base,
                      max_steps=max_steps, backend=args.backend, test_size=200,
                      method=method, params=params or {}, round_timeout_s=round_timeout_s,
                      workdir=Path(args.workdir) / f"{base}-{nodes}{tag}", quiet=True)
    row = _row(result, per_round, time.monotonic() - started) | {"method": method}
    print(f"  {nodes} nodes ({per_round}/round, {base}, {method}): {row['state']}, round "
          f"{_fmt(row['round_s_mean'])} s, peak {row['total_rss_peak_mb']:.0f} MB, "
          f"acc {_fmt(row['accuracy_after'], 3)}, wall {row['wall_s']:.0f} s", flush=True)
    return row


def _dp_point(args: argparse.Namespace, n: int, params: dict) -> dict:
    """One point of the DP curve: n nodes, all of them every round, dp-lora and the
    reference on the same shards (same seed, same workdir layout)."""
    runs = {}
    for method, options in ((DP_REFERENCE, None), ("dp-lora", params)):
        try:
            runs[method] = _simulate(args, n, n, args.dp_rounds, args.dp_base,
                                     args.dp_max_steps, method, options, tag=f"-{method}",
                                     round_timeout_s=args.dp_round_timeout)
        except Exception as exc:  # e.g. an actor killed for memory: the point says so
            print(f"  {n} nodes ({method}): ERROR {type(exc).__name__}: {exc}", flush=True)
            runs[method] = {"state": "ERROR", "reason": f"{type(exc).__name__}: {exc}",
                            "accuracy_before": None, "accuracy_after": None,
                            "epsilon": None, "noise_multiplier": None, "wall_s": None}
    dp = runs["dp-lora"]
    return {"nodes_per_round": n, "backend": args.backend, "base": args.dp_base,
            "rounds": args.dp_rounds,
            "max_steps": args.dp_max_steps, "params": params,
            "accuracy_before": dp["accuracy_before"],
            "accuracy_dp": dp["accuracy_after"],
            "accuracy_reference": runs[DP_REFERENCE]["accuracy_after"],
            "epsilon": dp["epsilon"], "noise_multiplier": dp["noise_multiplier"],
            "states": {m: r["state"] for m, r in runs.items()},
            "reasons": {m: r["reason"] for m, r in runs.items() if r["reason"]},
            "wall_s": {m: r["wall_s"] for m, r in runs.items()}}


def dp_params(args: argparse.Namespace) -> dict:
    """--dp-params with the rounds the target is calibrated for, checked as the coordinator
    will check the job (before the first run, not after the references have run)."""
    from confide.sdk.simulation import simulation_config

    try:
        params = json.loads(args.dp_params)
    except ValueError as exc:
        raise ValueError(f"--dp-params is not JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise ValueError("--dp-params must be a JSON object")
    params |= {"rounds": args.dp_rounds}
    simulation_config(method="dp-lora", params=params, rounds=args.dp_rounds,
                      base=args.dp_base, max_steps=args.dp_max_steps, backend=args.backend)
    return params


def _previous(out: Path) -> dict:
    path = out / "simulate.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _merge_dp(previous: dict, dp_rows: list[dict]) -> tuple[list[dict], list[int]]:
    """This run's DP points, and the previous JSON's points at the other sizes (a size run
    again replaces its old point); the sizes carried over."""
    ran = {r["nodes_per_round"] for r in dp_rows}
    kept = [r for r in previous.get("dp_curve") or [] if r["nodes_per_round"] not in ran]
    merged = sorted(kept + dp_rows, key=lambda r: r["nodes_per_round"])
    return merged, [r["nodes_per_round"] for r in kept]


def run_benchmark(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    dp_sizes = [int(s) for s in args.dp_sizes.split(",") if s.strip()] if args.dp_curve else []
    params = dp_params(args) if args.dp_curve else {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous(out)
    rows: list[dict] = []
    goal_row: dict | None = None
    dp_done: list[dict] = []

    def write() -> tuple[list[dict], dict | None, list[dict], list[dict]]:
        """The JSON as it stands; written after every DP point too, so a run killed part
        way (e.g. Ray's memory monitor on a shared machine) keeps the points it measured.
        What this invocation did not run is kept from the previous JSON, and said so."""
        carried: dict = {}
        # the arguments of the run that measured a part: the previous run's, or, when that
        # run carried it over too, the ones it recorded
        origin = previous.get("carried_over") or {}
        all_rows, goal = rows, goal_row
        if not sizes and previous.get("results"):
            all_rows = previous["results"]
            carried["results"] = origin.get("results", previous.get("args"))
        if goal is None and previous.get("goal_run"):
            goal = previous["goal_run"]
            carried["goal_run"] = origin.get("goal_run", previous.get("args"))
        dp_rows, kept = _merge_dp(previous, dp_done)
        if kept:  # each point records its own settings (base, rounds, steps, params)
            carried["dp_curve"] = {"sizes": kept}
        goals = _goals(all_rows, goal, dp_rows)
        report = {"benchmark": "simulate", "hardware": hardware() | {
                      "load_average": round(os.getloadavg()[0], 1)},
                  "args": vars(args) | {"func": None}, "results": all_rows, "goal_run": goal,
                  "dp_curve": dp_rows, "goals": goals, "carried_over": carried,
                  "note": "timings on a 2-core machine shared with other jobs (inflated by "
                          "load)"}
        (out / "simulate.json").write_text(json.dumps(report, indent=1, default=str))
        return all_rows, goal, dp_rows, goals

    for n in sizes:
        rows.append(_simulate(args, n, max(1, round(n * args.fraction)), args.rounds,
                              args.base, args.max_steps))
    if args.goal:
        goal_row = _simulate(args, GOAL_NODES, GOAL_PER_ROUND, GOAL_ROUNDS, "minilm",
                             args.goal_max_steps)
    for n in dp_sizes:
        dp_done.append(_dp_point(args, n, params))
        write()
    rows, goal_row, dp_rows, goals = write()
    _plot(rows, dp_rows, out / "simulate.png")
    print(f"\n{'nodes':>6}{'/round':>7}{'hosts':>6}{'up s':>7}{'round s':>9}{'s/node':>8}"
          f"{'peak MB':>9}{'host MB':>9}{'acc':>7}  state")
    for r in rows + ([goal_row] if goal_row else []):
        acc = r["accuracy_after"]
        print(f"{r['nodes']:>6}{r['per_round']:>7}{r['hosts']:>6}{r['startup_s']:>7.0f}"
              f"{_fmt(r['round_s_mean']):>9}{_fmt(r['s_per_trained_node']):>8}"
              f"{r['total_rss_peak_mb']:>9.0f}{r['host_rss_peak_mb']:>9.0f}"
              f"{'-' if acc is None else f'{acc:.3f}':>7}  {r['state']} ({r['base']})")
    if dp_rows:
        print(f"\nnode-level DP curve ({dp_rows[0]['base']}, {dp_rows[0]['rounds']} rounds, "
              f"{dp_rows[0]['max_steps']} local steps, every node every round):")
        print(f"{'n/round':>8}{'before':>8}{'dp-lora':>9}{DP_REFERENCE:>13}{'epsilon':>9}"
              f"{'sigma':>7}")
        for r in dp_rows:
            print(f"{r['nodes_per_round']:>8}{_fmt(r['accuracy_before'], 3):>8}"
                  f"{_fmt(r['accuracy_dp'], 3):>9}{_fmt(r['accuracy_reference'], 3):>13}"
                  f"{_fmt(r['epsilon'], 2):>9}{_fmt(r['noise_multiplier'], 2):>7}")
    for goal in goals:
        print("goal: " + goal["text"])
    print(f"wrote {out / 'simulate.json'} and {out / 'simulate.png'}")
    ran = ([r["state"] for r in rows] if sizes else []) + [
        state for r in dp_done for state in r["states"].values()]
    return 0 if all(state == "COMPLETED" for state in ran) else 1


def _dp_goal(dp_rows: list[dict]) -> dict:
    """The curve is measured when every point ran both methods to completion with the
    epsilon reported within the target; the accuracies are the figures, not a pass mark."""
    name = (f"node-level DP curve: accuracy vs nodes per round (10, 50, 200) at epsilon "
            f"{DP_EPSILON:g}, fedavg-lora the reference")
    if not dp_rows:
        return goal_record(name, DP_EPSILON, None, None, f"{name}: not run (pass --dp-curve)")
    points = ", ".join(f"n={r['nodes_per_round']}: {_fmt(r['accuracy_dp'], 3)} vs "
                       f"{_fmt(r['accuracy_reference'], 3)}" for r in dp_rows)
    epsilons = [r["epsilon"] for r in dp_rows]
    complete = all(s == "COMPLETED" for r in dp_rows for s in r["states"].values())
    spent = max((e for e in epsilons if e is not None), default=None)
    overspent = spent is not None and spent > DP_EPSILON + 1e-9
    missing = sorted(set(DP_SIZES) - {r["nodes_per_round"] for r in dp_rows})
    # an overspent point is a miss; a failed run (e.g. killed for memory) or a missing size
    # leaves the curve not measured yet
    met = (False if overspent else
           None if missing or not complete or None in epsilons else True)
    verdict = ("MISSED: epsilon over the target" if overspent else
               "NOT measured: a run failed (see the point's reasons)" if not complete else
               f"partial: n = {', '.join(map(str, missing))} not run" if missing else
               "measured")
    return goal_record(name, DP_EPSILON, spent, met,
                       f"{name}: held-out accuracy dp-lora vs fedavg-lora {points}; largest "
                       f"epsilon spent {_fmt(spent, 2)} -> {verdict}",
                       sizes=[r["nodes_per_round"] for r in dp_rows])


def _goals(rows: list[dict], goal_row: dict | None, dp_rows: list[dict]) -> list[dict]:
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
    goals.append(_dp_goal(dp_rows))
    name = "1,000 tiny-model nodes"
    big = [r for r in rows if r["nodes"] >= 1000]
    goals.append(goal_record(name, 1000, big[0]["nodes"] if big else None,
                             (big[0]["state"] == "COMPLETED") if big else None,
                             f"{name}: " + (big[0]["state"] if big else "not run")))
    return goals


def _plot(rows: list[dict], dp_rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if dp_rows else 2, figsize=(15 if dp_rows else 10, 4))
    left, right = axes[0], axes[1]
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
    if dp_rows:
        dp = axes[2]
        n = [r["nodes_per_round"] for r in dp_rows]
        dp.plot(n, [r["accuracy_reference"] or 0 for r in dp_rows], marker="s",
                label=DP_REFERENCE)
        dp.plot(n, [r["accuracy_dp"] or 0 for r in dp_rows], marker="o",
                label=f"dp-lora, node level, epsilon {DP_EPSILON:g}")
        dp.set_xscale("log")
        dp.set_xlabel("nodes per round (all registered nodes)")
        dp.set_ylabel("held-out accuracy")
        dp.legend(fontsize="small")
        dp.set_title(f"node-level DP ({dp_rows[0]['base']})")
    save_figure(fig, path)
