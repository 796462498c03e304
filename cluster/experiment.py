"""One federated experiment on a local cluster of real processes: start the daemons, submit
the job through the SDK, show a progress bar per round, evaluate the global model before
and after on a held-out set the nodes never saw. The demo and the benchmarks are built on it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from confide.cluster.local import LocalCluster
from confide.coordinator.jobs import normalize_spec
from confide.node.data import Example
from confide.node.methods import get_method, method_params
from confide.node.methods.sfprompt import SFPROMPT_TRAINABLE
from confide.node.models import job_model_config
from confide.node.split.body import LocalBody
from confide.node.split.model import SplitConfig, build_split
from confide.node.split.trainer import SplitTrainer
from confide.node.store import ModelStore
from confide.node.training.lora import LoraTrainer
from confide.sdk.client import Client, ConfideError
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    job_id: str
    method: str
    state: str
    reason: str
    rounds: list[dict] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


class Evaluator:
    """Evaluates global states of one job spec on a held-out set (model built once).

    It builds what the job's nodes build: LoRA, the full model (Ferret), or for split
    learning (SFPrompt) all three parts in this process, the body run locally: the evaluator
    is the job's owner checking the result on its own held-out data."""

    def __init__(self, spec: pb.JobSpec, examples: list[Example], batch_size: int = 64) -> None:
        spec = normalize_spec(spec)  # the defaults the coordinator fills in
        method = get_method(spec.method)
        self.body: LocalBody | None = None
        if method.trainable == SFPROMPT_TRAINABLE:
            config = method.parse_config(method_params(spec))
            model_cfg = job_model_config(spec)
            parts = build_split(model_cfg, SplitConfig.from_method(config, model_cfg.seed))
            self.trainer: LoraTrainer | SplitTrainer = SplitTrainer(
                parts.head, parts.tail, parts.tokenizer, max_length=model_cfg.max_length)
            self.body = LocalBody(parts.body)
        else:
            self.trainer = LoraTrainer(job_model_config(spec), "cpu")
        self.initial = self.trainer.trainable_state()
        self.examples = examples
        self.batch_size = batch_size

    def __call__(self, state: dict | None) -> dict[str, float]:
        """``state`` None: the spec's seeded initial state, as every node builds it."""
        self.trainer.load_trainable_state(self.initial if state is None else state)
        if isinstance(self.trainer, SplitTrainer):
            return self.trainer.evaluate(self.examples, self.body, batch_size=self.batch_size)
        return self.trainer.evaluate(self.examples, batch_size=self.batch_size)


def watch_with_progress(client: Client, job_id: str, label: str = "",
                        quiet: bool = False,
                        on_event: Callable[[pb.Event], None] | None = None) -> None:
    """A progress bar per round: local training steps summed over the round's nodes.
    ``on_event`` sees every event as it arrives."""
    bar: tqdm | None = None
    steps: dict[str, tuple[int, int]] = {}
    done = 0

    def refresh() -> None:
        assert bar is not None
        bar.total = sum(total for _, total in steps.values()) or None
        bar.n = sum(step for step, _ in steps.values())
        bar.set_postfix_str(f"{done} node(s) done")

    for event in client.watch_job(job_id):
        if on_event is not None:
            on_event(event)
        if event.kind == "round.started":
            steps, done = {}, 0
            bar = tqdm(desc=f"{label}round {event.round}", unit="step", disable=quiet)
        elif bar is not None and event.kind == "node.progress":
            steps[event.node_id] = (int(event.metrics["step"]),
                                    int(event.metrics["total_steps"]))
            refresh()
        elif bar is not None and event.kind in ("node.done", "node.dropped"):
            done += 1
            if event.node_id in steps and event.kind == "node.done":
                steps[event.node_id] = (steps[event.node_id][1], steps[event.node_id][1])
            refresh()
        elif bar is not None and event.kind in ("round.completed", "round.failed"):
            refresh()
            loss = event.metrics.get("loss_last")
            bar.set_postfix_str((f"loss {loss:.3f}, " if loss is not None else "")
                                + f"up {event.bytes.up / 1e6:.2f} MB, "
                                f"down {event.bytes.down / 1e6:.2f} MB")
            bar.close()
            bar = None
        if event.kind in ("job.failed", "node.dropped") and not quiet:
            tqdm.write(f"{event.kind}: {event.message}")
    if bar is not None:
        bar.close()


def _report(client: Client, job_id: str, by_round: dict[int, dict[str, float]]) -> None:
    """Hand the held-out figures to the coordinator (ReportEvaluation); the test set stays
    here. A refusal is logged, never fatal: the figures are in the result either way."""
    for round_number, metrics in sorted(by_round.items()):
        numbers = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if not numbers:
            continue
        try:
            client.report_evaluation(job_id, round_number, numbers, dataset="held-out test")
        except ConfideError as exc:
            log.warning("could not report round %d's evaluation: %s", round_number, exc)


def run_experiment(cluster: LocalCluster, spec: pb.JobSpec, test: list[Example], *,
                   label: str = "", quiet: bool = False, evaluate_before: bool = True,
                   evaluate_rounds: bool = False) -> ExperimentResult:
    """Submit ``spec`` to a running cluster, follow it, evaluate the global model on ``test``
    before training, after the job and (``evaluate_rounds``) after every round.

    A decentralized job (DIMAT) has no global model: each node's merged model is read from
    the node's own folder as its round ends (this process runs every node of the cluster),
    and a round's figures are the mean over nodes ("accuracy") and the worst node
    ("accuracy_min")."""
    started = time.monotonic()
    evaluator = Evaluator(spec, test) if test else None
    before = evaluator(None) if evaluator and evaluate_before else {}
    accuracy_by_round: dict[int, dict[str, float]] = {}
    decentralized = get_method(spec.method).decentralized
    with Client(cluster.address) as client:
        job = client.submit_job(spec)
        node_metrics: dict[int, dict[str, dict[str, float]]] = {}
        node_states: dict[int, list[dict]] = {}

        def collect(event: pb.Event) -> None:
            if event.kind == "node.done":
                node_metrics.setdefault(event.round, {})[event.node_id] = dict(event.metrics)
            elif event.kind == "round.completed" and decentralized:
                # only models merged in this very round (a node whose merge failed, or a
                # replayed event, must not lend a stale or a later model to the round)
                stores = [ModelStore(folder / "models") for folder in cluster.node_data_dirs]
                node_states[event.round] = [
                    state for store in stores
                    if (store.metadata(job.job_id, "own") or {}).get("round") == str(event.round)
                    and (state := store.load(job.job_id, "own"))]

        watch_with_progress(client, job.job_id, label, quiet, on_event=collect)
        final = client.get_job(job.job_id)
        after = {}
        if evaluator is not None and final.rounds_completed:
            done = [r.round for r in final.rounds if r.state == "completed"]
            for round_number in done if evaluate_rounds else done[-1:]:
                if decentralized:
                    accuracy_by_round[round_number] = _mean_over_nodes(
                        [evaluator(state) for state in node_states.get(round_number, [])])
                else:
                    state = client.fetch_global_model(job.job_id, round_number)
                    accuracy_by_round[round_number] = evaluator(state)
            if final.state == pb.COMPLETED:
                after = accuracy_by_round[done[-1]]
            if not decentralized:  # the coordinator records them (the dashboard charts them)
                _report(client, job.job_id, accuracy_by_round)
    rounds = []
    for summary in final.rounds:
        participants = max(len(summary.participants), 1)
        rounds.append({
            "round": summary.round,
            "state": summary.state,
            "participants": len(summary.participants),
            "dropped": dict(summary.dropped),
            "bytes_up": summary.bytes.up,
            "bytes_down": summary.bytes.down,
            "bytes_up_per_node": summary.bytes.up / participants,
            "bytes_down_per_node": summary.bytes.down / participants,
            "seconds": summary.seconds,
            # who sent an update (anonymous rounds: round-scoped link tags, not node ids)
            "participant_ids": list(summary.participants),
            "secure_aggregation": summary.secure_aggregation,
            "secagg_survivors": summary.secagg_survivors,
            "metrics": dict(summary.metrics),
            "nodes": node_metrics.get(summary.round, {}),
            "eval": accuracy_by_round.get(summary.round, {}),
        })
    return ExperimentResult(
        job_id=final.job_id,
        method=final.spec.method,
        state=pb.JobState.Name(final.state),
        reason=final.reason,
        rounds=rounds,
        before=before,
        after=after,
        seconds=time.monotonic() - started,
    )


def _mean_over_nodes(results: list[dict[str, float]]) -> dict[str, float]:
    if not results:
        return {}
    out = {key: sum(r[key] for r in results) / len(results) for key in results[0]}
    if "accuracy" in out:
        out["accuracy_min"] = min(r["accuracy"] for r in results)
    return out


def shard_dirs(data_root: Path, nodes: int) -> list[Path]:
    return [Path(data_root) / f"node{i}" for i in range(nodes)]
