"""``confide bench audit``: membership inference against the global models of real jobs.

The question the audit answers: given a job's global model, can an attacker tell the nodes'
training examples ("members") from held-out examples of the same distribution? Three jobs on
the federated benchmark's workload (MiniLM, non-IID BBC News shards, real daemons): a
non-private FedAvg-LoRA trained long enough to overfit (the attack must work there, or it
proves nothing), then example-level DP-LoRA at two epsilons. For each global model:
``privacy.audit``'s loss-threshold attack and its offline LiRA, calibrated by reference models
trained here, centrally, on held-out examples that are not candidates (they never saw a
candidate). Reported beside each job's accounted epsilon: AUC, TPR at 1% and 0.1% FPR, and the
empirical epsilon lower bound (95% Clopper-Pearson).

``audit_global_model`` is also what ``confide audit JOB`` runs for a data owner (who alone holds
the members).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from confide.bench.common import goal_record, hardware, pyplot, save_figure

DEFAULT_JOBS = (
    'fedavg-lora:{};'
    'dp-lora:{"target_epsilon": 8, "rounds": 3, "local_steps": 15, "expected_batch_size": 64};'
    'dp-lora:{"target_epsilon": 1, "rounds": 3, "local_steps": 15, "expected_batch_size": 64}'
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", default=DEFAULT_JOBS,
                   help="NAME:JSON items separated by ';' (default: non-private fedavg-lora, "
                        "dp-lora example-level at epsilon 8 and 1)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overfit-epochs", type=int, default=4,
                   help="local epochs per round of the non-private job (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--max-per-node", type=int, default=240)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--candidates", type=int, default=300,
                   help="members and as many non-members scored per job (default: %(default)s)")
    p.add_argument("--references", type=int, default=2,
                   help="reference models for the calibrated attack (default: %(default)s)")
    p.add_argument("--reference-size", type=int, default=240)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/bench-audit")
    p.add_argument("--out", default="bench/results")


def example_losses(spec, state: dict | None, examples: Sequence) -> list[float]:
    """Per-example losses of ``examples`` under the job's model with ``state``."""
    from confide.node.models import job_model_config
    from confide.node.training.lora import LoraTrainer

    trainer = LoraTrainer(job_model_config(spec), "cpu")
    if state is not None:
        trainer.load_trainable_state(state)
    return trainer.example_losses(examples)


def reference_losses(spec, pool: Sequence, candidates: Sequence, count: int, size: int,
                     epochs: int, learning_rate: float, seed: int) -> list[list[float]]:
    """``count`` reference models, each trained centrally from the job's seeded start on
    ``size`` examples of ``pool`` (never a candidate); their losses on ``candidates``."""
    from confide.node.models import job_model_config
    from confide.node.training.lora import LoraTrainer

    out = []
    for k in range(count):
        sample = random.Random(seed + k).sample(list(pool), min(size, len(pool)))
        trainer = LoraTrainer(job_model_config(spec), "cpu")
        trainer.train(sample, epochs=epochs, batch_size=16, learning_rate=learning_rate,
                      seed=seed + k)
        out.append(trainer.example_losses(candidates))
    return out


def unused_training_articles(members_pool: Sequence, seed: int) -> list:
    """The BBC training split's articles that no node holds (the per-node cap leaves most
    of each Dirichlet shard unused): the same distribution as the members, never trained on.
    The test split's articles beyond the accuracy set are too few (126) on their own."""
    from confide.node.data import bbc_news, split_train_test

    train, _ = split_train_test(bbc_news()[0], 0.2, seed)  # prepare_bbc_shards' split
    held = {ex.text for ex in members_pool}
    return [ex for ex in train if ex.text not in held]


def candidate_pools(members_pool: Sequence, outsiders: Sequence, candidates: int,
                    reference_size: int, seed: int) -> tuple[list, list, list]:
    """(members, non-members, reference pool). Non-members match the members' label counts:
    a label mix that differs between the two would let a loss attack score well on a model
    that never saw a member. The reference pool is what is left, never a candidate. Checked
    here, before any job runs: a pool too small is a clear error, not a lost hour."""
    rng = random.Random(seed)
    members = rng.sample(list(members_pool), min(candidates, len(members_pool)))
    by_label: dict = {}
    for ex in rng.sample(list(outsiders), len(outsiders)):
        by_label.setdefault(ex.label, []).append(ex)
    nonmembers = []
    for label, count in sorted(Counter(ex.label for ex in members).items()):
        pool = by_label.get(label, [])
        if len(pool) < count:
            raise ValueError(f"audit: {count} non-members of label {label} needed, only "
                             f"{len(pool)} unused articles have it: lower --candidates")
        nonmembers += pool[:count]
        by_label[label] = pool[count:]
    reference_pool = [ex for pool in by_label.values() for ex in pool]
    if reference_size > 0 and len(reference_pool) < reference_size:
        raise ValueError(f"audit: {len(reference_pool)} articles left for the reference "
                         f"models, --reference-size asks {reference_size}")
    return members, nonmembers, reference_pool


def audit_global_model(spec, state: dict, members: Sequence, nonmembers: Sequence,
                       references: list[list[float]], delta: float) -> list[dict]:
    """Both attacks on one global model: ``references[k]`` holds reference model k's losses on
    ``members + nonmembers`` (empty: the calibrated attack is skipped)."""
    from confide.privacy.audit import evaluate_attack, lira_offline_scores, loss_scores

    candidates = list(members) + list(nonmembers)
    losses = example_losses(spec, state, candidates)
    n = len(members)
    results = [evaluate_attack("loss threshold", loss_scores(losses[:n]),
                               loss_scores(losses[n:]), delta)]
    if references:
        scores = lira_offline_scores(losses, references)
        results.append(evaluate_attack("offline LiRA", scores[:n], scores[n:], delta))
    return [r.to_json() for r in results]


def run_benchmark(args: argparse.Namespace) -> int:
    from confide.bench.federated import bbc_workload, label, parse_methods
    from confide.cluster.experiment import run_experiment, shard_dirs
    from confide.cluster.local import LocalCluster
    from confide.node.data import load_jsonl
    from confide.sdk.client import Client, job_spec

    args.test_size = 300
    workdir, data_root, labels, test = bbc_workload(args)
    members_pool = [ex for d in shard_dirs(data_root, args.nodes)
                    for ex in load_jsonl(d / "train.jsonl")]
    unused = unused_training_articles(members_pool, args.seed)
    held_out = load_jsonl(data_root / "test.jsonl")[len(test):]
    members, nonmembers, reference_pool = candidate_pools(
        members_pool, unused + held_out, args.candidates, args.reference_size, args.seed)
    print(f"audit: {len(members)} members, {len(nonmembers)} non-members (label-matched), "
          f"{len(reference_pool)} articles for the reference models")
    jobs = parse_methods(args.jobs)
    rows = []
    cluster = LocalCluster(workdir, shard_dirs(data_root, args.nodes))
    specs = []
    try:
        cluster.start()
        for method, params in jobs:
            private = method == "dp-lora"
            spec = job_spec(method, name=f"audit-{method}", rounds=args.rounds,
                            min_nodes=args.nodes, base="minilm", num_labels=len(labels),
                            max_length=args.max_length, learning_rate=args.lr, seed=args.seed,
                            epochs=1 if private else args.overfit_epochs, params=params,
                            wait_for_nodes_s=600)  # nodes load MiniLM slowly on a busy box
            result = run_experiment(cluster, spec, test, label=f"{label(method, params)} ",
                                    evaluate_before=False)
            if not result.ok:
                print(f"{label(method, params)}: {result.state}: {result.reason}")
                continue
            with Client(cluster.address) as client:
                state = client.fetch_global_model(result.job_id)
                # the spec as the coordinator completed it (defaults filled in)
                specs.append(client.get_job(result.job_id).spec)
            last = result.rounds[-1]["metrics"] if result.rounds else {}
            rows.append({"job": label(method, params), "state": result.state,
                         "accuracy": result.after.get("accuracy"),
                         "accounted_epsilon": last.get("epsilon") if private else None,
                         "global_state": state})
    finally:
        cluster.stop()
    if not rows:
        print("no job completed: nothing to audit")
        return 1
    refs = reference_losses(specs[0], reference_pool, members + nonmembers, args.references,
                            args.reference_size, args.rounds * args.overfit_epochs, args.lr,
                            args.seed) if args.references else []
    for row, spec in zip(rows, specs, strict=True):
        row["attacks"] = audit_global_model(spec, row.pop("global_state"), members,
                                            nonmembers, refs, args.delta)
    _print(rows, args)
    goals = _goals(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "audit", "time": time.strftime("%Y%m%d-%H%M%S"),
              "hardware": hardware(), "workload": {k: v for k, v in vars(args).items()
                                                   if k != "func"},
              "members": len(members), "nonmembers": len(nonmembers), "results": rows,
              "goals": goals}
    (out / "audit.json").write_text(json.dumps(report, indent=2))
    _plot(rows, out / "audit.png")
    print(f"wrote {out / 'audit.json'} and {out / 'audit.png'}")
    return 0 if len(rows) == len(jobs) else 1


def _print(rows: list[dict], args: argparse.Namespace) -> None:
    print()
    print(f"{'job':<44}{'acc':>6}{'eps':>7}  {'attack':<15}{'AUC':>6}{'TPR@1%':>8}"
          f"{'TPR@.1%':>8}{'eps_lb':>8}")
    for row in rows:
        eps = row["accounted_epsilon"]
        for attack in row["attacks"]:
            print(f"{row['job'][:43]:<44}{(row['accuracy'] or 0):>6.3f}"
                  f"{(f'{eps:.2f}' if eps else 'inf'):>7}  {attack['attack']:<15}"
                  f"{attack['auc']:>6.3f}{attack['tpr_at_1pct_fpr']:>8.3f}"
                  f"{attack['tpr_at_0_1pct_fpr']:>8.3f}{attack['epsilon_lower_bound']:>8.2f}")


def _goals(rows: list[dict]) -> list[dict]:
    goals = []
    for row in rows:
        eps = row["accounted_epsilon"]
        if eps is None:
            continue
        worst_auc = max(a["auc"] for a in row["attacks"])
        worst_lb = max(a["epsilon_lower_bound"] for a in row["attacks"])
        if eps <= 8:
            goals.append(goal_record(f"audit AUC at epsilon {eps:.2g}", 0.55, worst_auc,
                                     worst_auc <= 0.55,
                                     f"{row['job']}: best attack's AUC <= 0.55"))
        goals.append(goal_record(f"empirical epsilon bound at epsilon {eps:.2g}", eps, worst_lb,
                                 worst_lb <= eps,
                                 f"{row['job']}: empirical lower bound <= accounted epsilon"))
    return goals


def _plot(rows: list[dict], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(8, 4))
    names = [f"{r['job'][:28]}\n(eps {r['accounted_epsilon'] or 'inf'})" for r in rows]
    width = 0.35
    for k, attack in enumerate(("loss threshold", "offline LiRA")):
        values = [next((a["auc"] for a in r["attacks"] if a["attack"] == attack), 0.0)
                  for r in rows]
        ax.bar([i + k * width for i in range(len(rows))], values, width, label=attack)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xticks([i + width / 2 for i in range(len(rows))], names, fontsize=7)
    ax.set_ylabel("membership inference AUC")
    ax.legend()
    save_figure(fig, path)
