"""``confide bench split``: SFPrompt against federated full fine-tuning and FedAvg-LoRA.

Same non-IID BBC News split, same rounds, real daemons (devices + one split-server node).
Per row: held-out accuracy, bytes per device per round (coordinator link and, for SFPrompt,
the device <-> split-server link, as counted on the wire), and the device's compute: the
parameters it holds and trains, and its training FLOPs per round relative to federated full
fine-tuning of the same model on the same data; for SFPrompt rows also the relative rounding
error of what the device sent on the split link (0 in float32). SFPrompt runs plain, with
bfloat16 on the split link, with EL2N pruning (untrained and after a warm-up), with the random
pruning control, and with local-loss steps in place of half the split steps. The paper (Cao et
al. 2024) reports 53% less communication and 0.46% of the local compute of federated full
fine-tuning; the table says what we measure, and ``split.json`` records the issue's goals.

The device's compute share is also counted, without training, for MiniLM (6 layers) and for
SmolLM2-135M (30 layers; as the sequence classifier the bench trains, and as a causal LM, whose
49,152-word output head stays on the device) with one device layer (``compute_table``;
``--compute-only`` prints just that).

FLOPs are counted analytically (``node.split.model.split_costs``: linear maps and attention
matmuls per position, backward = input gradients + weight gradients where weights train), not
timed: full fine-tuning costs 3x the forward pass per position, FedAvg-LoRA about 2x (input
gradients through every frozen layer; its small adapters' weight gradients are left out), an
SFPrompt device its head and tail only (the body runs on the server), plus EL2N scoring (one
local forward over the node's data) in the first round.
"""

from __future__ import annotations

import argparse
import json
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
from confide.bench.federated import bbc_workload, label

_PRUNED = '"tail_layers": 0, "prune_gamma": 0.5'
_LOCAL = f'{_PRUNED}, "prune_warmup_steps": 10, "round_steps": 6, "local_loss_steps": 3'
DEFAULT_METHODS = (
    'fedavg-full;'
    'fedavg-lora;'
    'sfprompt:{"tail_layers": 0};'
    'sfprompt:{"tail_layers": 0, "activation_dtype": "bfloat16"};'
    f'sfprompt:{{{_PRUNED}}};'
    f'sfprompt:{{{_PRUNED}, "prune_warmup_steps": 10}};'
    f'sfprompt:{{{_PRUNED}, "prune_method": "random"}};'
    f'sfprompt:{{{_LOCAL}}};'
    f'sfprompt:{{{_LOCAL}, "activation_dtype": "bfloat16"}}'
)
"""The rows: the two references; SFPrompt plain and with bfloat16 on the split link; pruning
half of each device's examples by EL2N untrained, by EL2N after 10 local-loss warm-up steps,
and at random (the control); and the pruned job with 3 of its 6 steps per round local-loss
steps (the paper's communication saving), in float32 and bfloat16."""

COMPUTE_MODELS = (("minilm", "sequence-classification"), ("smollm2", "sequence-classification"),
                  ("smollm2", "causal-lm"))
"""The models whose device compute share ``compute_table`` counts (one device layer)."""

COMPUTE_GOAL = 0.05
"""The issue's target: an SFPrompt device does <= 5% of the model's compute on SmolLM2-135M."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="methods separated by ';', each NAME or NAME:JSON-params "
                        "(default: %(default)s)")
    p.add_argument("--nodes", type=int, default=2, help="device nodes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--base", default="minilm")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-per-node", type=int, default=160)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3,
                   help="learning rate of the LoRA and SFPrompt rows")
    p.add_argument("--full-lr", type=float, default=5e-5,
                   help="learning rate of federated full fine-tuning (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench-split")
    p.add_argument("--out", default="bench/results",
                   help="where split.json and split.png go (default: %(default)s)")
    p.add_argument("--compute-only", action="store_true",
                   help="only count the device's compute share on MiniLM and SmolLM2-135M "
                        "(one device layer; no training) and write split_compute.json")
    p.add_argument("--attack", action="store_true",
                   help="instead: the attack suite (what the split-server reads of the "
                        "devices' text) and the defences' recovery-vs-accuracy curve, in "
                        "process; writes split_attack.json and split_attack.png")
    from confide.bench.split_attack import add_arguments as attack_arguments

    attack_arguments(p.add_argument_group("--attack options"))


def _costs(args: argparse.Namespace, params: dict, num_labels: int) -> dict:
    """Parameters and FLOPs per position of the split this row uses (for every row: the
    whole model's forward FLOPs are the sum of the three parts)."""
    from confide.node.methods import get_method
    from confide.node.models import ModelConfig
    from confide.node.split.model import SplitConfig, build_split, split_costs

    config = get_method("sfprompt").parse_config(params)
    model_cfg = ModelConfig(base=args.base, num_labels=num_labels, max_length=args.max_length,
                            seed=args.seed)
    parts = build_split(model_cfg, SplitConfig.from_method(config, args.seed))
    positions = args.max_length + config.num_prompts
    costs = split_costs(parts.head, parts.body, parts.tail, positions)
    return {"costs": costs, "positions": positions,
            "trainable": costs.head.trainable_params + costs.tail.trainable_params}


def compute_table(args: argparse.Namespace, num_labels: int,
                  models: tuple[tuple[str, str], ...] = COMPUTE_MODELS) -> list[dict]:
    """The device's compute share per model, one device layer (``head_layers`` 1, no tail
    layers, 8 prompts), sequences of ``--max-length`` tokens + the prompts: FLOPs counted by
    ``split_costs`` on the real model (weights loaded, nothing trained)."""
    from confide.node.models import ModelConfig
    from confide.node.split.model import SplitConfig, build_split, split_costs

    split_cfg = SplitConfig(head_layers=1, tail_layers=0, num_prompts=8, prompt_seed=args.seed)
    positions = args.max_length + split_cfg.num_prompts
    table = []
    for base, task in models:
        parts = build_split(ModelConfig(base=base, task=task, num_labels=num_labels,
                                        max_length=args.max_length, seed=args.seed), split_cfg)
        assert parts.head is not None and parts.body is not None and parts.tail is not None
        costs = split_costs(parts.head, parts.body, parts.tail, positions)
        layers = sum(len(p.stack.layers) for p in (parts.head, parts.body, parts.tail))
        table.append({"base": base, "task": task, "layers": layers, "device_layers": 1,
                      "positions": positions, "device_param_share": costs.device_param_share,
                      "device_forward_flop_share": costs.device_flop_share,
                      "device_train_flop_share": costs.device_train_flop_share,
                      "device_vs_full_finetuning": costs.device_vs_full_finetuning})
    print(f"{'model':<34}{'layers':>7}{'params':>8}{'fwd':>8}{'train':>8}{'vs FT':>8}")
    for row in table:
        print(f"{row['base'] + ' ' + row['task']:<34}{row['layers']:>7}"
              f"{row['device_param_share']:>8.1%}{row['device_forward_flop_share']:>8.1%}"
              f"{row['device_train_flop_share']:>8.1%}{row['device_vs_full_finetuning']:>8.2%}")
    print("device shares, one device layer: params held; forward FLOPs; training FLOPs of an "
          "SFPrompt step (device vs device + server); 'vs FT': device training FLOPs vs full "
          "fine-tuning of the whole model (analytic)")
    return table


def compute_goal(table: list[dict]) -> dict:
    """The issue's compute goal, on SmolLM2-135M as the bench's task (sequence classifier):
    the device's share of an SFPrompt training step's FLOPs."""
    row = next((r for r in table if r["base"] == "smollm2"
                and r["task"] == "sequence-classification"), None)
    measured = None if row is None else row["device_train_flop_share"]
    lm = next((r for r in table if r["base"] == "smollm2" and r["task"] == "causal-lm"), None)
    return goal_record(
        "SFPrompt device compute <= 5% of the model's on SmolLM2-135M (one device layer)",
        COMPUTE_GOAL, measured, None if measured is None else measured <= COMPUTE_GOAL,
        "not counted" if row is None else
        f"sequence classifier: the device does {measured:.1%} of an SFPrompt step's FLOPs "
        f"({row['device_vs_full_finetuning']:.2%} of full fine-tuning)"
        + ("" if lm is None else f"; as a causal LM {lm['device_train_flop_share']:.1%} "
           "(its output head, 49,152 x 576, stays on the device)"))


def split_goals(rows: list[dict], compute: list[dict]) -> list[dict]:
    """The issue's SFPrompt goals, measured on this run's rows (None where a row is missing):
    >= 53% less communication than fedavg-full at <= 2 points lower accuracy; the compute
    share on SmolLM2; EL2N (after its warm-up, else untrained) against random pruning."""
    done = [r for r in rows if r["accuracy"] is not None]
    full = next((r for r in done if r["method"] == "fedavg-full"), None)
    cheap = [r for r in done if r["method"].startswith("sfprompt") and full is not None
             and r["bytes_per_device_per_round"] <= 0.47 * full["bytes_per_device_per_round"]]
    best = max(cheap, key=lambda r: r["accuracy"]) if cheap else None
    gap = None if best is None or full is None else full["accuracy"] - best["accuracy"]
    goals = [goal_record(
        "SFPrompt >= 53% less communication than fedavg-full at <= 2 points lower accuracy",
        0.02, gap, None if gap is None else gap <= 0.02,
        "not run" if best is None else
        f"{best['method']}: {best['bytes_vs_full']:.1%} of fedavg-full's bytes, accuracy gap "
        f"{gap:.3f}")]
    goals.append(compute_goal(compute))
    pruned = [r for r in done if "prune_gamma" in r["method"]]
    random_rows = [r for r in pruned if "prune_method=random" in r["method"]]
    el2n = [r for r in pruned if r not in random_rows and "local_loss_steps" not in r["method"]]
    warm = [r for r in el2n if "prune_warmup_steps" in r["method"]] or el2n
    margin = (warm[0]["accuracy"] - random_rows[0]["accuracy"]
              if warm and random_rows else None)
    goals.append(goal_record(
        "EL2N pruning beats random pruning (same fraction kept)", 0.0, margin,
        None if margin is None else margin > 0,
        "not run" if margin is None else
        f"{warm[0]['method']} {warm[0]['accuracy']:.3f} vs {random_rows[0]['method']} "
        f"{random_rows[0]['accuracy']:.3f}"))
    return goals


def run_compute_only(args: argparse.Namespace) -> int:
    """``--compute-only``: the compute table (BBC News's 5 labels) and its goal, no training."""
    table = compute_table(args, num_labels=5)
    goal = compute_goal(table)
    print(f"goal: {goal['text']} -> {'met' if goal['met'] else 'missed'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "split_compute.json"
    path.write_text(json.dumps({"benchmark": "split-compute",
                                "time": time.strftime("%Y%m%d-%H%M%S"),
                                "hardware": hardware(), "compute": table, "goals": [goal]},
                               indent=2))
    print(f"wrote {path}")
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    if getattr(args, "attack", False):
        from confide.bench.split_attack import run_attack_benchmark

        return run_attack_benchmark(args)
    if getattr(args, "compute_only", False):
        return run_compute_only(args)
    from confide.bench.federated import parse_methods
    from confide.cluster.experiment import run_experiment, shard_dirs
    from confide.cluster.local import LocalCluster
    from confide.sdk.client import job_spec

    workdir, data_root, labels, test = bbc_workload(args)
    methods = parse_methods(args.methods)
    results = []
    cluster = LocalCluster(workdir, shard_dirs(data_root, args.nodes), split_server=True)
    try:
        cluster.start()
        for index, (method, params) in enumerate(methods):
            lr = args.full_lr if method == "fedavg-full" else args.lr
            spec = job_spec(method, name=f"bench-{method}", rounds=args.rounds,
                            min_nodes=args.nodes, base=args.base, num_labels=len(labels),
                            max_length=args.max_length, batch_size=args.batch_size,
                            learning_rate=lr, seed=args.seed, params=params)
            results.append(run_experiment(cluster, spec, test, label=f"{label(method, params)} ",
                                          evaluate_before=index == 0, evaluate_rounds=True))
    finally:
        cluster.stop()

    reference = _costs(args, {"tail_layers": 0, "num_prompts": 0, "train_tail": True},
                       len(labels))["costs"]
    model_forward = (reference.head.forward_flops + reference.body.forward_flops
                     + reference.tail.forward_flops)
    total_params = reference.total_params
    rows = []
    for (method, params), result in zip(methods, results, strict=True):
        n = max(len(result.rounds), 1)
        link_up = sum(r["bytes_up_per_node"] for r in result.rounds) / n
        link_down = sum(r["bytes_down_per_node"] for r in result.rounds) / n
        per_node = [m for r in result.rounds for m in r["nodes"].values()]
        split_up = sum(m.get("split_bytes_up", 0.0) for m in per_node) / max(len(per_node), 1)
        split_down = sum(m.get("split_bytes_down", 0.0) for m in per_node) / max(len(per_node), 1)
        steps = sum(m.get("steps", 0.0) for m in per_node) / max(len(per_node), 1)
        examples = sum(m.get("num_examples", 0.0) for m in per_node) / max(len(per_node), 1)
        tokens_per_step = args.batch_size * args.max_length
        if method == "sfprompt":
            split = _costs(args, params, len(labels))
            costs = split["costs"]
            per_position = costs.head.train_flops + costs.tail.train_flops
            # pruning, in the first round only: EL2N scores one local forward per example
            # after the warm-up's local-loss steps (the random control does neither)
            el2n = (params.get("prune_gamma", 1.0) < 1
                    and params.get("prune_method", "el2n") == "el2n")
            scoring = ((costs.head.forward_flops + costs.tail.forward_flops) * examples
                       * split["positions"] / n if el2n else 0.0)
            warmup = (params.get("prune_warmup_steps", 0) * args.batch_size * split["positions"]
                      * per_position / n if el2n else 0.0)
            device_flops = (steps * args.batch_size * split["positions"] * per_position
                            + scoring + warmup)
            held, trained = costs.device_params, split["trainable"]
        else:
            factor = 3.0 if method == "fedavg-full" else 2.0
            device_flops = steps * tokens_per_step * factor * model_forward
            held = total_params
            trained = (total_params if method == "fedavg-full"
                       else _lora_trainable(args, len(labels)))
        rows.append({
            "method": label(method, params),
            "state": result.state,
            "accuracy": result.after.get("accuracy"),
            "coordinator_bytes_per_device_per_round": link_up + link_down,
            "split_bytes_per_device_per_round": split_up + split_down,
            "bytes_per_device_per_round": link_up + link_down + split_up + split_down,
            "steps_per_round": steps,
            "device_params": held,
            "device_trainable_params": trained,
            "device_flops_per_round": device_flops,
            # relative rounding error of what the device sent on the split link (0: float32)
            "activation_wire_rel_error": _mean(per_node, "activation_wire_rel_error"),
            "gradient_wire_rel_error": _mean(per_node, "gradient_wire_rel_error"),
            "rounds": result.rounds,
        })
    full = next((r for r in rows if r["method"] == "fedavg-full"), rows[0])
    print()
    print(f"workload: {args.base}, BBC News, {args.nodes} devices + 1 split-server, "
          f"{args.rounds} rounds, <= {args.max_per_node} articles per device, batch "
          f"{args.batch_size} x {args.max_length} tokens, {len(test)} held-out articles")
    print(f"{'method':<58}{'acc':>6}{'MB/dev/round':>13}{'vs full':>8}{'dev params':>11}"
          f"{'trained':>10}{'dev FLOPs':>10}{'wire err':>10}")
    for row in rows:
        acc = row["accuracy"]
        row["bytes_vs_full"] = row["bytes_per_device_per_round"] / max(
            full["bytes_per_device_per_round"], 1)
        row["flops_vs_full"] = row["device_flops_per_round"] / max(
            full["device_flops_per_round"], 1)
        print(f"{row['method']:<58}{(f'{acc:.3f}' if acc is not None else '-'):>6}"
              f"{row['bytes_per_device_per_round'] / 1e6:>13.2f}{row['bytes_vs_full']:>8.1%}"
              f"{row['device_params'] / 1e6:>10.1f}M{row['device_trainable_params'] / 1e3:>9.0f}k"
              f"{row['flops_vs_full']:>10.1%}"
              + (f"{row['activation_wire_rel_error']:>10.1e}"
                 if row["activation_wire_rel_error"] is not None else f"{'-':>10}"))
    print("MB/dev/round: coordinator link + device<->split-server link, up + down, per device; "
          "'vs full': against fedavg-full; dev FLOPs: device training FLOPs per round vs "
          "fedavg-full (analytic); wire err: ||cast(h) - h|| / ||h|| of the activations sent "
          "(gradients: in the JSON)")
    print("paper (SFPrompt vs federated full fine-tuning): 53% less communication, 0.46% of "
          "the local compute")
    info = hardware()
    print(f"hardware: {info['platform']}, {info['cpu_count']} CPU(s), torch {info['torch']}, "
          f"GPU {info['cuda'] or 'none'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "split.json"
    found = previous_results(path, lambda r: r["method"])
    if found is not None:
        _, previous = found
        for row in rows:
            old = previous.get(row["method"])
            if old and old.get("accuracy") is not None and row["accuracy"] is not None:
                print(f"  vs last run: {row['method']}: accuracy {old['accuracy']:.3f} -> "
                      f"{row['accuracy']:.3f}, MB/dev/round "
                      f"{old['bytes_per_device_per_round'] / 1e6:.2f} -> "
                      f"{row['bytes_per_device_per_round'] / 1e6:.2f}")
    print()
    compute = compute_table(args, len(labels))
    goals = split_goals(rows, compute)
    for goal in goals:
        verdict = {True: "met", False: "missed", None: "not measured"}[goal["met"]]
        print(f"goal: {goal['goal']}: {goal['text']} -> {verdict}")
    report = {"benchmark": "split", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"},
              "results": rows, "compute": compute, "goals": goals}
    path.write_text(json.dumps(report, indent=2))
    _plot(rows, out / "split.png")
    print(f"wrote {path} and {out / 'split.png'}")
    return 0 if all(r["state"] == "COMPLETED" for r in rows) else 1


def _mean(per_node: list[dict], key: str) -> float | None:
    """The mean of a metric over the nodes' rounds that report it (None: none does)."""
    values = [m[key] for m in per_node if key in m]
    return sum(values) / len(values) if values else None


def _lora_trainable(args: argparse.Namespace, num_labels: int) -> int:
    """Parameters FedAvg-LoRA trains (adapters + head), from the model the nodes build."""
    from confide.node.models import ModelConfig, build_lora_model

    model, _ = build_lora_model(ModelConfig(base=args.base, num_labels=num_labels,
                                            max_length=args.max_length, seed=args.seed))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(10, 4))
    for row in rows:
        ax.scatter(row["bytes_per_device_per_round"] / 1e6, row["accuracy"] or 0.0,
                   s=40 + 300 * row["flops_vs_full"], label=row["method"])
    ax.set_xscale("log")
    ax.set_xlabel("MB per device per round (log)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Split vs federated fine-tuning (marker size: device FLOPs)")
    legend_outside(ax, fontsize=7)
    save_figure(fig, path)
