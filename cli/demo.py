"""The main job: a local multi-node demo on embedded defaults (no broker, database or model
hub to install). A coordinator and N node daemons start as separate processes on 127.0.0.1;
each node holds a private non-IID shard of BBC News; they fine-tune all-MiniLM-L6-v2 with
LoRA for a few federated rounds; a table reports accuracy before/after on a held-out set the
nodes never saw, bytes up and down per round, and time per round."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import time
from pathlib import Path

# torch and transformers load inside run_demo: `confide --help` stays fast


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="node daemons (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default: %(default)s)")
    p.add_argument("--method", default="fedavg-lora", help="learning method (default: %(default)s)")
    p.add_argument("--params", default="", help="method parameters as JSON")
    p.add_argument("--base", default="minilm", help="base model (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet label skew of the shards (default: %(default)s)")
    p.add_argument("--max-per-node", type=int, default=240,
                   help="training articles per node, 0 = all (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per article")
    p.add_argument("--max-steps", type=int, default=0, help="cap on local steps per round")
    p.add_argument("--lr", type=float, default=2e-3, help="local learning rate")
    p.add_argument("--test-size", type=int, default=300,
                   help="held-out articles evaluated before/after, 0 = all")
    p.add_argument("--workdir", default="runs/demo", help="logs, data and state go here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: the coordinator sees only masked vectors and each round's sum")
    p.add_argument("--dashboard", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="the coordinator's web dashboard, to watch the run live; a taken port "
                        "falls back to a free one; 'none' turns it off (default: %(default)s)")
    p.add_argument("--keep-open", action="store_true",
                   help="after the run, keep the coordinator and its dashboard up until Ctrl-C")


def dashboard_bind(wanted: str) -> str:
    """``wanted`` if its port is free, else the same host on a free port ("" for none)."""
    import socket

    from confide.coordinator.broker import free_port

    if wanted in ("", "none"):
        return ""
    host, _, port = wanted.rpartition(":")
    with socket.socket() as probe:
        try:
            probe.bind((host, int(port)))
        except (OSError, ValueError):
            return f"{host}:{free_port()}"
    return wanted


def dp_lora_defaults(params: dict | None, rounds: int) -> dict:
    """The demo's example-level DP-LoRA unless told otherwise: epsilon 8 (delta 1e-5) over the
    demo's rounds, Poisson batches of 64 expected examples, 15 DP-SGD steps per round."""
    params = dict(params or {})
    if params.get("unit", "example") != "example":
        return params
    if not (params.get("target_epsilon") or params.get("noise_multiplier")
            or params.get("no_noise")):
        params["target_epsilon"] = 8.0
    params.setdefault("rounds", rounds)
    params.setdefault("local_steps", 15)
    params.setdefault("expected_batch_size", 64)
    return params


def run_demo(args: argparse.Namespace) -> int:
    from confide.node.methods import get_method
    from confide.sdk.client import job_spec

    started = time.monotonic()
    secure = bool(getattr(args, "secure_aggregation", False))
    try:  # a typo in the method or its parameters fails here, before anything starts
        params = json.loads(args.params) if args.params else None
        if args.method == "dp-lora":
            params = dp_lora_defaults(params, args.rounds)
            print(f"dp-lora parameters: {json.dumps(params)}")
        get_method(args.method).parse_config(params)
    except ValueError as exc:  # json.JSONDecodeError included
        print(f"error: {exc}")
        return 2
    # checked first: these import the training stack (PEFT, transformers: seconds)
    from confide.cluster.experiment import run_experiment, shard_dirs
    from confide.cluster.local import ClusterError, LocalCluster
    from confide.node.data import load_jsonl, prepare_bbc_shards

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    data_root = workdir / "data"
    print(f"preparing {args.nodes} non-IID BBC News shards (alpha={args.alpha}) in {data_root}")
    prepare_bbc_shards(data_root, nodes=args.nodes, alpha=args.alpha, seed=args.seed,
                       max_train_per_node=args.max_per_node or None)
    labels = json.loads((data_root / "labels.json").read_text())
    test = load_jsonl(data_root / "test.jsonl")
    if args.test_size:
        test = test[: args.test_size]
    for i, shard in enumerate(shard_dirs(data_root, args.nodes)):
        counts = [0] * len(labels)
        for example in load_jsonl(shard / "train.jsonl"):
            counts[example.label] += 1
        print(f"  node{i}: " + ", ".join(f"{name} {n}" for name, n in zip(labels, counts,
                                                                          strict=True)))
    spec = job_spec(
        args.method,
        name="demo",
        rounds=args.rounds,
        # a round counts with one node missing; a decentralized job fixes its members (the
        # topology) when it starts, so it waits for all of them
        min_nodes=args.nodes if get_method(args.method).decentralized
        else max(2 if secure else 1, args.nodes - 1),
        base=args.base,
        num_labels=len(labels),
        max_length=args.max_length,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        seed=args.seed,
        params=params,
        secure_aggregation=secure,
    )
    # split learning (SFPrompt) pairs the nodes with a split-server node holding the body
    split = get_method(args.method).needs_split_server
    dashboard = dashboard_bind(getattr(args, "dashboard", "none"))
    cluster = LocalCluster(workdir, shard_dirs(data_root, args.nodes), split_server=split,
                           coordinator_args=("--dashboard", dashboard) if dashboard else ())
    try:
        cluster.start()
        print(f"coordinator on {cluster.address}, MQTT events on {cluster.mqtt_url}, "
              f"{args.nodes} node daemons" + (" + 1 split-server" if split else "")
              + f"; logs in {workdir / 'logs'}")
        if dashboard:
            print(f"dashboard: http://{dashboard}/ (live while the demo runs"
                  + ("" if args.keep_open else "; --keep-open keeps it up afterwards") + ")")
        result = run_experiment(cluster, spec, test, evaluate_rounds=True)
        if dashboard and args.keep_open:
            _report(args, result, test, secure, started)
            print(f"the dashboard stays up at http://{dashboard}/ ; Ctrl-C stops it")
            _interrupt_on(signal.SIGINT, signal.SIGTERM)  # either stops the cluster below
            with contextlib.suppress(KeyboardInterrupt):
                while cluster.coordinator is not None and cluster.coordinator.poll() is None:
                    time.sleep(1)
            return 0 if result.ok else 1
    except ClusterError as exc:
        print(f"error: {exc}")
        return 1
    finally:
        cluster.stop()
    return _report(args, result, test, secure, started)


def _interrupt_on(*signals: int) -> None:
    """Turn these signals into KeyboardInterrupt (SIGTERM's default would leave the cluster's
    processes running; a shell may have set SIGINT to be ignored in a background job)."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in signals:
        signal.signal(sig, interrupt)


def _report(args: argparse.Namespace, result, test: list, secure: bool, started: float) -> int:
    """The demo's table: accuracy before and after each round, bytes and seconds."""
    print()
    print(f"job {result.job_id} ({result.method}): {result.state} {result.reason}")
    print(f"{'round':>5} {'nodes':>5} {'train loss':>10} {'accuracy':>9} {'up (KB)':>10} "
          f"{'down (KB)':>10} {'seconds':>8}")
    if result.before:
        print(f"{0:>5} {'-':>5} {'-':>10} {result.before['accuracy']:>9.3f} {'-':>10} {'-':>10} "
              f"{'-':>8}")
    for r in result.rounds:
        loss = r["metrics"].get("loss_last", float("nan"))  # none under secure aggregation
        acc = r["eval"].get("accuracy", float("nan"))
        epsilon = r["metrics"].get("epsilon")
        print(f"{r['round']:>5} {r['participants']:>5} {loss:>10.4f} {acc:>9.3f} "
              f"{r['bytes_up'] / 1e3:>10.1f} {r['bytes_down'] / 1e3:>10.1f} {r['seconds']:>8.1f}"
              + (f"  epsilon {epsilon:.2f}" if epsilon is not None else ""))
    if secure:
        print("securely aggregated: the coordinator saw masked vectors and each round's sum "
              "only (no per-node loss); `confide job status` lists the survivors per round")
    if result.before:
        after = result.after.get("accuracy", float("nan"))
        print(f"held-out accuracy ({len(test)} articles): before "
              f"{result.before['accuracy']:.3f}, after {after:.3f}")
    print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0 if result.ok else 1
