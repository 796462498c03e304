"""``confide bench dimat``: DIMAT vs gossip averaging vs local-only training.

Two parts, one command, one JSON + PNG:

1. Through real daemons: N node processes hold label-skewed BBC News shards (Dirichlet alpha)
   and train MiniLM (all parameters) in rounds; after each round every node merges with its
   neighbours on a ring and on the full graph, peer to peer. Per merge round: the held-out
   accuracy of every node's model (mean and min over nodes) and the bytes each node fetched
   from its peers. The bench reads each node's merged model from its data folder after each
   round (it runs all the nodes: a real node owner evaluates its own), never from the
   coordinator, which holds none.
2. In process, where permutation symmetry matters most: small MLPs initialized separately
   (different seeds) on a label-skewed Gaussian-mixture task, merged with the same pure
   functions (``node.methods.dimat``) over the same topologies.

DIMAT aligns each neighbour's hidden units to the node's own by activation matching before
averaging; gossip averages weights as they are; local-only never merges.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from confide.bench.common import goal_record, hardware, legend_outside, pyplot, save_figure
from confide.bench.federated import bbc_workload

CONFIGS = (("ring", "dimat"), ("ring", "gossip"), ("full", "dimat"), ("full", "gossip"),
           ("ring", "none"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=4, help="node daemons (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="train + merge rounds")
    p.add_argument("--base", default="minilm")
    p.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew")
    p.add_argument("--max-per-node", type=int, default=80)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=10, help="local steps per round")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-daemons", action="store_true",
                   help="run only the in-process MLP part")
    p.add_argument("--mlp-nodes", type=int, default=6)
    p.add_argument("--mlp-rounds", type=int, default=8)
    p.add_argument("--workdir", default="runs/bench-dimat")
    p.add_argument("--out", default="bench/results")


# ------------------------------------------------------------------------- daemons


def _daemon_part(args: argparse.Namespace) -> list[dict]:
    from confide.cluster.experiment import run_experiment, shard_dirs
    from confide.cluster.local import LocalCluster
    from confide.sdk.client import job_spec

    workdir, data_root, labels, test = bbc_workload(args)
    rows = []
    with LocalCluster(workdir, shard_dirs(data_root, args.nodes)) as cluster:
        for index, (topology, merge) in enumerate(CONFIGS):
            spec = job_spec("dimat", name=f"bench-dimat-{topology}-{merge}",
                            rounds=args.rounds, min_nodes=args.nodes, base=args.base,
                            num_labels=len(labels), max_length=args.max_length,
                            max_steps=args.max_steps, learning_rate=args.lr, seed=args.seed,
                            params={"topology": topology, "merge": merge})
            result = run_experiment(cluster, spec, test, label=f"{topology}/{merge} ",
                                    evaluate_before=index == 0, evaluate_rounds=True)
            if index == 0:
                before = result.before.get("accuracy", float("nan"))
            rows.append({"topology": topology, "merge": merge, "state": result.state,
                         "accuracy_before": before, "rounds": [{
                             "round": r["round"],
                             "accuracy_mean": r["eval"].get("accuracy"),
                             "accuracy_min": r["eval"].get("accuracy_min"),
                             "peer_bytes_per_node": r["metrics"].get("peer_bytes_down_per_node",
                                                                     0.0),
                             "coordinator_bytes_per_node": r["bytes_up_per_node"]
                             + r["bytes_down_per_node"],
                             "seconds": r["seconds"],
                         } for r in result.rounds]})
    return rows


# ------------------------------------------------------------------------- in process


def _mlp_part(args: argparse.Namespace) -> list[dict]:
    """Separately initialized MLPs on label-skewed Gaussian clusters, merged in process."""
    import torch

    from confide.node.merging.merge import dimat_merge
    from confide.node.methods.dimat import DIMATConfig
    from confide.node.methods.topology import mixing_weights, neighbours

    classes, dim, hidden = 8, 16, 64
    g = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(classes, dim, generator=g) * 2.0

    def sample(n: int, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.multinomial(probs, n, replacement=True, generator=g)
        x = centres[y] + torch.randn(n, dim, generator=g)
        return x, y

    nodes = [f"node{i}" for i in range(args.mlp_nodes)]
    skew = torch.distributions.Dirichlet(torch.full((classes,), args.alpha))
    torch.manual_seed(args.seed)
    data = {n: sample(400, skew.sample()) for n in nodes}
    test = sample(2000, torch.full((classes,), 1.0 / classes))

    def model(seed: int) -> torch.nn.Sequential:
        torch.manual_seed(1000 + seed)
        return torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, classes))

    def accuracy(net: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((net(test[0]).argmax(-1) == test[1]).float().mean())

    rows = []
    for topology, merge in CONFIGS:
        nets = {n: model(i) for i, n in enumerate(nodes)}  # separately initialized
        config = DIMATConfig(topology=topology, merge=merge)
        adjacency = neighbours(config, nodes)
        curve = []
        for round_number in range(1, args.mlp_rounds + 1):
            for n, net in nets.items():
                opt = torch.optim.SGD(net.parameters(), lr=0.05)
                x, y = data[n]
                for _ in range(30):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(x), y).backward()
                    opt.step()
            states = {n: {k: v.detach().clone() for k, v in net.state_dict().items()}
                      for n, net in nets.items()}
            for n, net in nets.items():
                self_weight, row = mixing_weights(adjacency, n)
                merged = dimat_merge(net, states[n], {j: states[j] for j in row}, row,
                                     data[n][0], merge, self_weight=self_weight,
                                     identity_margin=config.identity_margin)
                net.load_state_dict(merged)
            accs = [accuracy(net) for net in nets.values()]
            curve.append({"round": round_number, "accuracy_mean": sum(accs) / len(accs),
                          "accuracy_min": min(accs)})
        rows.append({"topology": topology, "merge": merge, "rounds": curve})
    return rows


# ------------------------------------------------------------------------- report


def dimat_goals(daemons: list[dict], mlp: list[dict]) -> list[dict]:
    """The methods issue's goal, per part and topology: DIMAT's mean accuracy at or above
    gossip's at every round (the worst round's margin is what is measured; not measured when
    a part or a row did not run)."""
    goals = []
    for part, rows in (("separately initialized MLPs", mlp), ("MiniLM through daemons", daemons)):
        for topology in ("ring", "full"):
            curves = {r["merge"]: [x["accuracy_mean"] for x in r["rounds"]] for r in rows
                      if r["topology"] == topology and r.get("state", "COMPLETED") == "COMPLETED"}
            dimat, gossip = curves.get("dimat"), curves.get("gossip")
            margins = ([d - g for d, g in zip(dimat, gossip, strict=False)
                        if d is not None and g is not None] if dimat and gossip else [])
            worst = min(margins) if margins else None
            goals.append(goal_record(
                f"DIMAT at or above gossip at every round: {part}, {topology}", 0.0, worst,
                None if worst is None else worst >= 0.0,
                f"{part}, {topology} topology: worst per-round margin of DIMAT over gossip "
                + ("not measured" if worst is None else
                   f"{worst:+.3f} over {len(margins)} rounds ("
                   + ", ".join(f"{m:+.3f}" for m in margins) + ")")))
    return goals


def run_benchmark(args: argparse.Namespace) -> int:
    started = time.monotonic()
    daemons = [] if args.skip_daemons else _daemon_part(args)
    mlp = _mlp_part(args)
    if daemons:
        print()
        print(f"daemons: {args.base} (all parameters), BBC News, {args.nodes} nodes (Dirichlet "
              f"alpha {args.alpha}, <= {args.max_per_node} articles each), {args.rounds} rounds "
              f"of {args.max_steps} local steps; accuracy of each node's merged model on "
              f"{args.test_size} held-out articles (before training "
              f"{daemons[0]['accuracy_before']:.3f})")
        print(f"{'topology':<9}{'merge':<8}" + "".join(f"{'r' + str(r) + ' mean/min':>16}"
                                                   for r in range(1, args.rounds + 1))
              + f"{'MB/node/merge':>15}{'coord KB':>10}")
        for row in daemons:
            cells = "".join(
                f"{r['accuracy_mean']:>10.3f}/{r['accuracy_min']:.3f}"
                if r["accuracy_mean"] is not None else f"{'-':>16}" for r in row["rounds"])
            peer = sum(r["peer_bytes_per_node"] for r in row["rounds"]) / max(
                len(row["rounds"]), 1)
            coord = sum(r["coordinator_bytes_per_node"] for r in row["rounds"]) / max(
                len(row["rounds"]), 1)
            print(f"{row['topology']:<9}{row['merge']:<8}{cells}{peer / 1e6:>15.1f}"
                  f"{coord / 1e3:>10.1f}")
    print()
    print(f"in process: {args.mlp_nodes} MLPs (16-64-64-8) initialized separately, label-skewed "
          f"Gaussian clusters (alpha {args.alpha}), {args.mlp_rounds} rounds of 30 SGD steps")
    print(f"{'topology':<9}{'merge':<8}" + "".join(f"{'r' + str(r):>7}"
                                               for r in range(1, args.mlp_rounds + 1))
          + "  (mean accuracy over nodes)")
    for row in mlp:
        print(f"{row['topology']:<9}{row['merge']:<8}"
              + "".join(f"{r['accuracy_mean']:>7.3f}" for r in row["rounds"]))
    info = hardware()
    print(f"hardware: {info['platform']}, {info['cpu_count']} CPU(s), torch {info['torch']}, "
          f"GPU {info['cuda'] or 'none'}; baselines: gossip (no alignment) and local-only in "
          f"the same run; {time.monotonic() - started:.0f}s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dimat.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            for row, prev in zip(mlp, old.get("mlp", []), strict=False):
                print(f"  vs last run (MLP {row['topology']}/{row['merge']}): final accuracy "
                      f"{prev['rounds'][-1]['accuracy_mean']:.3f} -> "
                      f"{row['rounds'][-1]['accuracy_mean']:.3f}")
        except (ValueError, KeyError, IndexError):
            pass
    report = {"benchmark": "dimat", "time": time.strftime("%Y%m%d-%H%M%S"), "hardware": info,
              "workload": {k: v for k, v in vars(args).items() if k != "func"},
              "daemons": daemons, "mlp": mlp, "goals": dimat_goals(daemons, mlp)}
    for goal in report["goals"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        print(f"goal: {goal['text']} -> {verdict}")
    path.write_text(json.dumps(report, indent=2))
    _plot(daemons, mlp, out / "dimat.png")
    print(f"wrote {path} and {out / 'dimat.png'}")
    return 0 if all(r["state"] == "COMPLETED" for r in daemons) else 1


def _plot(daemons: list[dict], mlp: list[dict], path: Path) -> None:
    plt = pyplot()

    parts = [("MiniLM through the daemons", daemons)] if daemons else []
    parts.append(("separately initialized MLPs", mlp))
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], parts, strict=True):
        for row in rows:
            xs = [r["round"] for r in row["rounds"] if r["accuracy_mean"] is not None]
            ys = [r["accuracy_mean"] for r in row["rounds"] if r["accuracy_mean"] is not None]
            ax.plot(xs, ys, marker="o", label=f"{row['topology']}/{row['merge']}")
        ax.set_xlabel("merge round")
        ax.set_ylabel("mean held-out accuracy over nodes")
        ax.set_title(title)
        legend_outside(ax, fontsize=7)
    save_figure(fig, path)
