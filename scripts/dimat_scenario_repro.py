#!/usr/bin/env python3
"""The Docker scenario's DIMAT step without Docker: the same job spec (docker/scenario.py's
``dimat_spec``) through a LocalCluster of three daemons on BBC shards made as the demo's
``prepare`` makes them (3 nodes, alpha 0.5, 240 per node), scored as docker/stack_check.py
scores node0 (the spec's Evaluator on 200 held-out articles), plus what tells a bad merge from a
bad local model: each node's model before and after its merge, node0's merge redone offline
with plain averaging, identity permutations and always-matching, and which classes each
model predicts. docker/README.md has the figures it gave.

    nice -n 10 python scripts/dimat_scenario_repro.py --root /tmp/dimat-repro \\
        [--dimat-lr 2e-3 --dimat-head-lr 0] [--max-steps 5 --max-length 64]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _scenario():
    spec = importlib.util.spec_from_file_location("docker_scenario", ROOT / "docker/scenario.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from confide.cluster.experiment import Evaluator
    from confide.cluster.local import LocalCluster
    from confide.node.data import load_jsonl, prepare_bbc_shards
    from confide.node.merging.merge import dimat_merge
    from confide.node.store import ModelStore
    from confide.sdk.client import Client
    from confide.v1 import coordinator_pb2 as pb

    scenario = _scenario()
    parser = scenario.build_parser()
    parser.add_argument("--root", required=True, help="scratch folder (data, daemons)")
    parser.add_argument("--examples", type=int, default=200, help="held-out articles")
    args = parser.parse_args()
    root = Path(args.root)
    data = root / "data"
    if not (data / "node0" / "train.jsonl").exists():
        print(prepare_bbc_shards(data, nodes=3, alpha=0.5, max_train_per_node=240))
    dirs = [data / f"node{i}" for i in range(3)]
    spec = scenario.dimat_spec(args, 3)

    started = time.monotonic()
    with LocalCluster(root / "cluster", dirs) as cluster, Client(cluster.address) as client:
        job_id = client.submit_job(spec).job_id
        final = client.wait_job(job_id, lambda event: None)
    print(f"job {job_id} {pb.JobState.Name(final.state)} in {time.monotonic() - started:.0f}s:",
          {k: round(v, 3) for k, v in final.rounds[-1].metrics.items()} if final.rounds else "")
    if final.state != pb.COMPLETED:
        return 1

    with tempfile.TemporaryDirectory() as tmp:  # stack_check.py's held-out articles
        prepare_bbc_shards(Path(tmp), nodes=1, max_train_per_node=1)
        held = load_jsonl(Path(tmp) / "test.jsonl")[: args.examples]
    evaluator = Evaluator(spec, held)
    stores = [ModelStore(folder / "models") for folder in dirs]
    shared = [store.load(job_id, "shared") for store in stores]  # trained, before the merge
    own = [store.load(job_id, "own") for store in stores]  # merged

    def predicted(state) -> Counter:
        evaluator.trainer.load_trainable_state(state)
        model = evaluator.trainer.model.eval()
        counts: Counter = Counter()
        with torch.no_grad():
            for start in range(0, len(held), 50):
                batch = dict(evaluator.trainer.batch(held[start:start + 50]))
                batch.pop("labels", None)
                counts.update(model(**batch).logits.argmax(-1).tolist())
        return counts

    print(f"untrained                      {evaluator(None)['accuracy']:.3f}")
    for i in range(3):
        print(f"node{i} trained, before merge   {evaluator(shared[i])['accuracy']:.3f}  "
              f"predicts {dict(predicted(shared[i]))}")
        print(f"node{i} merged                  {evaluator(own[i])['accuracy']:.3f}  "
              f"predicts {dict(predicted(own[i]))}")
    batch = evaluator.trainer.batch(load_jsonl(dirs[0] / "train.jsonl")[:16])
    neighbours = {"node1": shared[1], "node2": shared[2]}
    weights = {"node1": 1 / 3, "node2": 1 / 3}  # a ring of three: Metropolis-Hastings
    for label, mode, margin in (("gossip (plain average)", "gossip", 0.0),
                                ("dimat, identity margin 0.02", "dimat", 0.02),
                                ("dimat, always matching", "dimat", 0.0),
                                ("dimat, identity permutations", "dimat", 2.0)):
        merged = dimat_merge(evaluator.trainer.model, shared[0], neighbours, weights, batch,
                             mode, self_weight=1 / 3, identity_margin=margin)
        print(f"node0 merged offline, {label:<30} {evaluator(merged)['accuracy']:.3f}")
    for i in range(3):
        drift = sum(((shared[i][k] - evaluator.initial[k]).double() ** 2).sum()
                    for k in evaluator.initial) ** 0.5
        norm = sum((v.double() ** 2).sum() for v in evaluator.initial.values()) ** 0.5
        print(f"node{i} ||w - w0|| / ||w0|| = {float(drift / norm):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
