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
    p.add_argument("--dataset", choices=["bbc", "trivia"], default="bbc",
                   help="bbc: BBC News classification (label skew); trivia: the trivia "
                        "questions for a causal LM (quantity skew; --base tiny-llama or "
                        "smollm2) (default: %(default)s)")
    p.add_argument("--base", default="tiny-bert",
                   help="base model: tiny-bert (tests) or minilm; tiny-llama or smollm2 for "
                        "--dataset trivia (default: %(default)s)")
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
    p.add_argument("--params", default="", type=_json_object,
                   help='the method\'s options as JSON, e.g. for dp-lora '
                        '\'{"unit": "node", "target_epsilon": 8}\'')
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: the coordinator learns only each round's sum")
    p.add_argument("--anonymous", action="store_true",
                   help="ring-signed uploads: the coordinator cannot tell which node sent which")
    p.add_argument("--anonymity-set", type=int, default=0,
                   help="the smallest ring of an anonymous upload (default: the coordinator's)")
    p.add_argument("--workdir", default="runs/simulate")
    p.add_argument("--json", default="", help="also write the result to this JSON file")


def _json_object(text: str) -> dict:
    """``--params``: a JSON object, or a clear error from argparse."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def config_from_args(args: argparse.Namespace):
    from confide.cluster.simulate import SimulationConfig

    return SimulationConfig(
        nodes=args.nodes, method=args.method, rounds=args.rounds, per_round=args.per_round,
        min_nodes=args.min_nodes, alpha=args.alpha, dataset=args.dataset, base=args.base,
        max_length=args.max_length, batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.learning_rate, round_timeout_s=args.round_timeout, seed=args.seed,
        test_size=args.test_size, dropout=args.dropout, stragglers=args.stragglers,
        delay_mean_s=args.delay_mean, delay_max_s=args.delay_max, backend=args.backend,
        address=args.address, cpus_per_node=args.cpus_per_node,
        gpus_per_node=args.gpus_per_node, max_concurrent_trainers=args.max_concurrent_trainers,
        params=args.params, secure_aggregation=args.secure_aggregation,
        anonymous=args.anonymous, anonymity_set=args.anonymity_set, workdir=Path(args.workdir))


def run_simulate(args: argparse.Namespace) -> int:
    from confide.cluster.simulate import SimulationError, run_simulation

    try:
        result = run_simulation(config_from_args(args))
    except (SimulationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1, default=str))
    return 0 if result.experiment.ok else 1
