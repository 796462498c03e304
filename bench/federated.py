"""``confide bench federated``: federated methods side by side on the same non-IID BBC News
split, through real daemons. Prints a table and writes JSON and a PNG (accuracy vs cumulative
uplink bytes) so a run can be compared with the last one. Later methods add rows here."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from confide.bench.common import (
    goal_record,
    hardware,
    legend_outside,
    previous_results,
    pyplot,
    save_figure,
)

# torch and transformers load inside run_benchmark: `confide --help` stays fast


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="methods separated by ';', each NAME or NAME:JSON-params "
                        "(default: %(default)s)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--base", default="minilm")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-per-node", type=int, default=240)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds a round may take before its nodes are dropped; DP-SGD rows "
                        "on a busy CPU need more (default: %(default)s)")
    p.add_argument("--workdir", default="runs/bench-federated")
    p.add_argument("--out", default="bench/results",
                   help="where federated.json and federated.png go; the previous JSON there is "
                        "compared with this run (default: %(default)s)")
    p.add_argument("--merge", action="store_true",
                   help="add this run's rows to the federated.json at --out (same workload "
                        "required; a row of the same name is replaced) instead of starting a "
                        "new report; each invocation is listed under 'runs' with its command "
                        "and machine load, and the goals are judged over all rows")


_DP_SGD = '"rounds": 3, "local_steps": 15, "expected_batch_size": 64'
DP_METHODS = (
    f'dp-lora:{{"target_epsilon": 8, {_DP_SGD}}};'
    f'dp-lora:{{"target_epsilon": 3, {_DP_SGD}}};'
    f'dp-lora:{{"target_epsilon": 1, {_DP_SGD}}};'
    f'dp-lora:{{"no_noise": true, {_DP_SGD}}};'
    'dp-lora:{"unit": "node", "target_epsilon": 8, "rounds": 3, "clip_norm": 0.5}'
)
"""Example-level DP-LoRA (DP-SGD at every node: q = 64/N, 15 steps per round, 3 rounds,
C = 1) at epsilon 8, 3, 1 (delta 1e-5), the same optimizer without noise (the control), and
node-level DP-FedAvg at epsilon 8 for contrast."""

METHOD_ROWS = (
    'fedavg-full:{"learning_rate": 5e-5};'
    'ferret:{"estimator": "reference", "k": 24, "optimizer": "sgd", "learning_rate": 1e-4,'
    ' "head_learning_rate": 1e-2, "server_lr": 1.0};'
    'ferret:{"estimator": "reference", "k": 8, "optimizer": "sgd", "learning_rate": 1e-4,'
    ' "head_learning_rate": 1e-2};'
    'ferret:{"estimator": "projection", "k": 256, "optimizer": "sgd", "learning_rate": 1e-4,'
    ' "head_learning_rate": 1e-2};'
    'cellm:{"density": 0.1};'
    'cellm:{"density": 0.1, "value_dtype": "float16"};'
    'cellm:{"density": 0.2, "lora_r": 4};'
    'cellm:{"density": 0.05, "lora_r": 16};'
    'cellm:{"density": 0.1, "selection": "shared-random"};'
    'cellm:{"density": 0.1, "downlink_density": 0.1}'
)
"""The methods issue's rows (run with ``--rounds 10``): fedavg-full as Ferret's reference;
Ferret with the paper's estimator and SGD (body 1e-4, the exact head 1e-2) at k = 24 and at the
FedKSeed point (k = 8: about 18 KB per node per round with the 7.7 KB head), and the projection
estimator at k = 256; CELLM's rank x density at equal uplink (r 8 x 0.1 = r 4 x 0.2 = r 16 x
0.05), float16 values, shared random positions (the secure-aggregation form), and the sparse
downlink (FLASC: each node gets the largest tenth of the changes since the state it holds; the
table's "down r2+" column)."""

DEFAULT_METHODS = 'fedavg-lora;' + DP_METHODS + ';' + METHOD_ROWS
"""The issues' comparison: the baseline, DP-LoRA (above) and the methods' rows, every one on
the same split, rounds and seeds."""

DP_GOALS = {8.0: 0.88, 3.0: 0.83, 1.0: 0.70}
"""Accuracy goals of example-level DP-LoRA by target epsilon (delta 1e-5)."""


def label(method: str, params: dict) -> str:
    """A row's name: the method and its parameters, so two configs of one method differ."""
    if not params:
        return method
    return method + " " + ",".join(f"{k}={v}" for k, v in params.items())


SPEC_KEYS = ("optimizer", "head_learning_rate", "learning_rate", "lora_r", "max_steps",
             "epochs")
"""Row keys that set the job spec rather than the method (the local optimizer, the head's
rate, the LoRA rank...); the rest of a row's JSON are the method's parameters."""


def spec_overrides(params: dict) -> tuple[dict, dict]:
    """A row's JSON split into (method parameters, job_spec keyword overrides)."""
    method = {k: v for k, v in params.items() if k not in SPEC_KEYS}
    return method, {k: v for k, v in params.items() if k in SPEC_KEYS}


def parse_methods(text: str) -> list[tuple[str, dict]]:
    """``NAME`` or ``NAME:JSON`` items separated by ';' (or by ',' when no item has JSON
    parameters), checked: a known method and a JSON object of parameters it accepts (plus
    :data:`SPEC_KEYS`, which go to the job spec)."""
    from confide.node.methods import get_method

    separator = ";" if ";" in text or "{" in text else ","
    methods = []
    for item in filter(None, (s.strip() for s in text.split(separator))):
        name, _, raw = item.partition(":")
        name = name.strip()
        try:
            params = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise ValueError(f"--methods: parameters of {name!r} are not JSON ({exc}): "
                             f"{raw!r}") from None
        if not isinstance(params, dict):
            raise ValueError(f"--methods: parameters of {name!r} must be a JSON object, "
                             f"got {raw!r}")
        # unknown method or parameter: a clear error
        get_method(name).parse_config(spec_overrides(params)[0])
        methods.append((name, params))
    if not methods:
        raise ValueError("--methods: no method given")
    return methods


def bbc_workload(args: argparse.Namespace) -> tuple[Path, Path, list[str], list]:
    """A fresh work folder with non-IID BBC News shards for ``args.nodes`` nodes: (workdir,
    data root, label names, the first ``args.test_size`` held-out articles)."""
    from confide.node.data import load_jsonl, prepare_bbc_shards

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    data_root = workdir / "data"
    prepare_bbc_shards(data_root, nodes=args.nodes, alpha=args.alpha, seed=args.seed,
                       max_train_per_node=args.max_per_node or None)
    labels = json.loads((data_root / "labels.json").read_text())
    test = load_jsonl(data_root / "test.jsonl")[: args.test_size or None]
    return workdir, data_root, labels, test


def run_benchmark(args: argparse.Namespace) -> int:
    from confide.cluster.experiment import run_experiment, shard_dirs
    from confide.cluster.local import LocalCluster
    from confide.node.methods import get_method
    from confide.sdk.client import job_spec

    workdir, data_root, labels, test = bbc_workload(args)
    results = []
    methods = parse_methods(args.methods)
    split = any(get_method(method).needs_split_server for method, _ in methods)
    cluster = LocalCluster(workdir, shard_dirs(data_root, args.nodes), split_server=split)
    names = []
    load_at_start = os.getloadavg()[0]
    try:
        cluster.start()
        for index, (method, params) in enumerate(methods):
            method_params, overrides = spec_overrides(params)
            options = dict(name=f"bench-{method}", rounds=args.rounds, min_nodes=args.nodes,
                           base=args.base, num_labels=len(labels),
                           max_length=args.max_length, learning_rate=args.lr, seed=args.seed,
                           params=method_params, wait_for_nodes_s=600,
                           round_timeout_s=args.round_timeout)
            spec = job_spec(method, **{**options, **overrides})
            names.append(label(method, params))
            results.append(run_experiment(cluster, spec, test, label=f"{names[-1]} ",
                                          evaluate_before=index == 0, evaluate_rounds=True))
    finally:
        cluster.stop()
    before = results[0].before.get("accuracy", float("nan")) if results else float("nan")
    rows = []
    for name, result, (_, params) in zip(names, results, methods, strict=True):
        n = max(len(result.rounds), 1)
        rows.append({
            "method": name,
            "params": params,
            "state": result.state,
            "accuracy": result.after.get("accuracy"),
            "uplink_bytes_per_node_per_round": sum(r["bytes_up_per_node"]
                                                   for r in result.rounds) / n,
            "downlink_bytes_per_node_per_round": sum(r["bytes_down_per_node"]
                                                     for r in result.rounds) / n,
            # round 1's seeded state is built by the nodes; after it, a method with a compact
            # broadcast (Ferret) sends its mean scalars, the others the whole state
            "downlink_bytes_per_node_after_round_1": (
                sum(r["bytes_down_per_node"] for r in result.rounds[1:])
                / max(len(result.rounds) - 1, 1)),
            "seconds_per_round": sum(r["seconds"] for r in result.rounds) / n,
            "epsilon": result.rounds[-1]["metrics"].get("epsilon") if result.rounds else None,
            "rounds": result.rounds,
        })
    print()
    print(f"workload: {args.base} + LoRA, BBC News, {args.nodes} nodes (Dirichlet alpha "
          f"{args.alpha}, <= {args.max_per_node or 'all'} articles each), {args.rounds} rounds, "
          f"{len(test)} held-out articles; accuracy before training {before:.3f}")
    width = max(16, *(len(row["method"]) + 2 for row in rows))
    print(f"{'method':<{width}}{'state':<11}{'accuracy':>9}{'up/node/round':>15}"
          f"{'down/node/round':>17}{'down r2+':>14}{'s/round':>9}{'epsilon':>9}")
    for row in rows:
        acc = row["accuracy"]
        eps = row["epsilon"]
        print(f"{row['method']:<{width}}{row['state']:<11}"
              f"{(f'{acc:.3f}' if acc is not None else '-'):>9}"
              f"{row['uplink_bytes_per_node_per_round'] / 1e3:>12.1f} KB"
              f"{row['downlink_bytes_per_node_per_round'] / 1e3:>14.1f} KB"
              f"{row['downlink_bytes_per_node_after_round_1'] / 1e3:>11.1f} KB"
              f"{row['seconds_per_round']:>9.1f}{(f'{eps:.2f}' if eps else '-'):>9}")
    info = hardware()
    print(f"hardware: {info['platform']}, {info['cpu_count']} CPU(s), torch {info['torch']}, "
          f"GPU {info['cuda'] or 'none'}; baseline: fedavg-lora on the same split and rounds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _compare_with_previous(out / "federated.json", rows)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workload = {k: v for k, v in vars(args).items() if k not in ("func", "merge")}
    run = {"command": "confide bench federated " + shlex.join(sys.argv[3:] if
                                                              sys.argv[1:3] == ["bench",
                                                                                "federated"]
                                                              else sys.argv[1:]),
           "rows": [row["method"] for row in rows], "time": stamp,
           "load": f"1-minute load {load_at_start:.1f} at start, "
                   f"{os.getloadavg()[0]:.1f} at end ({os.cpu_count()} CPUs)"}
    report = {"benchmark": "federated", "time": stamp, "hardware": info, "workload": workload,
              "accuracy_before": before, "results": rows, "runs": [run]}
    if args.merge:
        report = merged_report(out / "federated.json", report)
        rows = report["results"]
    report["goals"] = dp_goals(rows) + method_goals(rows)
    (out / "federated.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "federated.png", before)
    print(f"wrote {out / 'federated.json'} and {out / 'federated.png'}")
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


MERGE_KEYS = ("nodes", "rounds", "base", "alpha", "max_per_node", "max_length", "lr",
              "test_size", "seed")
"""Workload settings two runs must share for their rows to sit in one table."""


def merged_report(path: Path, report: dict) -> dict:
    """``report``'s rows added to the report at ``path`` (a row of the same name replaced),
    its run appended to the list of invocations. Refuses a different workload: rows of two
    workloads in one table would compare what is not comparable."""
    if not path.exists():
        return report
    previous = json.loads(path.read_text())
    old, new = previous.get("workload", {}), report["workload"]
    differ = [k for k in MERGE_KEYS if old.get(k) != new.get(k)]
    if differ:
        raise SystemExit(f"--merge: {path} was run with another workload "
                         f"({', '.join(f'{k}: {old.get(k)!r} vs {new.get(k)!r}' for k in differ)})"
                         "; run without --merge or with the same settings")
    known = {label(m, p): p for m, p in parse_methods(old["methods"])} if old.get(
        "methods") else {}
    replaced = {row["method"] for row in report["results"]}
    kept = []
    for row in previous.get("results", []):
        if row["method"] not in replaced:
            row.setdefault("params", known.get(row["method"], {}))
            kept.append(row)
    runs = previous.get("runs") or [{"command": "(before runs were recorded)",
                                     "rows": [r["method"] for r in kept],
                                     "time": previous.get("time")}]
    return {**report, "results": kept + report["results"], "runs": runs + report["runs"],
            "accuracy_before": previous.get("accuracy_before", report["accuracy_before"])}


def dp_goals(rows: list[dict]) -> list[dict]:
    """One goal record per DP_GOALS epsilon: the best example-level DP-LoRA row run at that
    target (not measured when no such row ran)."""
    goals = []
    for epsilon, target in DP_GOALS.items():
        runs = [(row["accuracy"], row["method"]) for row in rows
                if row["method"].startswith("dp-lora")
                and row.get("params", {}).get("unit", "example") == "example"
                and float(row.get("params", {}).get("target_epsilon", 0)) == epsilon]
        done = [(acc, name) for acc, name in runs if acc is not None]
        best = max(done) if done else (None, "")
        goals.append(goal_record(
            f"example-level DP-LoRA accuracy at epsilon {epsilon:g}", target, best[0],
            None if best[0] is None else best[0] >= target,
            f"{best[1] or 'not run'}: held-out accuracy >= {target} at epsilon {epsilon:g}, "
            "delta 1e-5"))
    return goals


def _best(rows: list[dict], prefix: str) -> dict | None:
    """The most accurate completed row whose name starts with ``prefix``."""
    done = [r for r in rows if r["method"].startswith(prefix) and r["accuracy"] is not None]
    return max(done, key=lambda r: r["accuracy"]) if done else None


UPLINK = "uplink_bytes_per_node_per_round"


def _gap_goal(goal: str, rows: list[dict], prefix: str, reference: dict | None,
              reference_name: str, share: float, target: float) -> dict:
    """The accuracy gap between ``reference`` and the best ``prefix`` row that sends at most
    ``share`` of its uplink: met when the gap is <= ``target``, not measured when either
    side did not run."""
    cheap = [r for r in rows if reference and r[UPLINK] <= reference[UPLINK] * share]
    best = _best(cheap, prefix)
    gap = None if best is None or reference is None else reference["accuracy"] - best["accuracy"]
    return goal_record(goal, target, gap, None if gap is None else gap <= target,
                       f"{best['method'] if best else 'not run'} vs {reference_name}: accuracy "
                       f"gap {'-' if gap is None else f'{gap:.3f}'}")


def method_goals(rows: list[dict]) -> list[dict]:
    """The methods issue's goals against their references in the same run: Ferret within 5
    points of fedavg-full at <= 1/1000 of its uplink, and at the FedKSeed point (<= 18 KB per
    node per round); CELLM at <= 1/10 of FedAvg-LoRA's uplink, <= 2 points lower. A goal whose
    rows did not run is recorded as not measured."""
    full, lora = _best(rows, "fedavg-full"), _best(rows, "fedavg-lora")
    point = _best([r for r in rows if r[UPLINK] <= 18_000], "ferret")
    return [
        _gap_goal("Ferret within 5 points of fedavg-full at <= 1/1000 of its uplink", rows,
                  "ferret", full, "fedavg-full", 1 / 1000, 0.05),
        goal_record("Ferret's accuracy at the FedKSeed point (<= 18 KB per node per round)",
                    18_000, point["accuracy"] if point else None, None,
                    f"{point['method']}: {point[UPLINK] / 1e3:.1f} KB up" if point
                    else "not run", reported_not_judged=True),
        _gap_goal("CELLM <= 2 points below FedAvg-LoRA at <= 1/10 of its uplink", rows, "cellm",
                  lora, "fedavg-lora", 1 / 10, 0.02),
    ]


def _compare_with_previous(path: Path, rows: list[dict]) -> None:
    """Print how this run differs from the last one written to ``path``."""
    found = previous_results(path, lambda r: r["method"])
    if found is None:
        return
    _, previous = found
    for row in rows:
        old = previous.get(row["method"])
        if old is None or old.get("accuracy") is None or row["accuracy"] is None:
            continue
        print(f"  vs last run: {row['method']}: accuracy {old['accuracy']:.3f} -> "
              f"{row['accuracy']:.3f}, uplink/node/round "
              f"{old['uplink_bytes_per_node_per_round'] / 1e3:.1f} -> "
              f"{row['uplink_bytes_per_node_per_round'] / 1e3:.1f} KB")


def _plot(rows: list[dict], path: Path, before: float) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.axhline(before, color="grey", linestyle=":", label=f"before training (acc {before:.3f})")
    for row in rows:
        cumulative, x, y = 0.0, [], []
        for r in row["rounds"]:
            cumulative += r["bytes_up_per_node"]
            x.append(cumulative / 1e6)
            y.append(r["eval"].get("accuracy", float("nan")))
        ax.plot(x, y, marker="o", label=f"{row['method']} (acc {row['accuracy'] or 0:.3f})")
    ax.set_xscale("log")  # the methods' uplinks differ by orders of magnitude
    ax.set_xlabel("cumulative uplink per node (MB, log)")
    ax.set_ylabel("held-out accuracy of the global model")
    ax.set_title("Federated methods on non-IID BBC News")
    legend_outside(ax)
    save_figure(fig, path)
