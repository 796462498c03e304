"""The data owner's privacy budget, enforced where the data is.

The coordinator proposes a job; the node decides whether its data may take part. Before a TRAIN
task touches a dataset, :meth:`PrivacyGuard.admit`:

1. works out what the task spends on this node: for example-level ``dp-lora``, the node's own
   plan (q = min(1, B / N) from its own example count, sigma calibrated for that q over the
   whole planned job: ``DPLoRA.example_plan``); every other method (and node-level DP-FedAvg,
   whose noise this node cannot check in central mode, and the no-noise control) is
   non-private here;
2. asks the ledger (``privacy.budget.PrivacyLedger``, a 0600 JSON file in the node's folder,
   never reset) whether it may: a non-private task on a private dataset, or a DP job that would
   take the dataset past its budget, raises :class:`TaskRefused` with the reason;
3. charges the whole job before the first step (idempotent per job: every round of the job
   calls it and the first one charges), so a job is never refused halfway and a crash mid-job
   leaves its spending recorded.

The owner sets budgets with ``confide node serve --privacy-budget EPS [--delta D]
[--private-dataset NAME ...]``: the budget applies to every dataset of the node.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from confide.node.methods.base import Method, MethodConfig
from confide.node.methods.dp_lora import DPLoRAConfig, ExamplePlan
from confide.privacy.budget import BudgetExceeded, PrivacyLedger
from confide.v1 import coordinator_pb2 as pb

__all__ = ["LEDGER_FILE", "PrivacyGuard", "PrivacySettings", "TaskRefused"]

LEDGER_FILE = "privacy-ledger.json"


class TaskRefused(Exception):
    """The node's owner does not allow this task (privacy budget or a private dataset);
    ``str(exc)`` is the reason the coordinator and the user see."""


@dataclass
class PrivacySettings:
    """The owner's choices: a budget for every dataset (None: uncapped, spending still
    recorded), its delta, and the datasets only DP tasks may touch."""

    budget: float | None = None
    delta: float = 1e-5
    private_datasets: list[str] = field(default_factory=list)


class PrivacyGuard:
    """One node's ledger and the owner's settings; thread-safe (the worker runs in a thread)."""

    def __init__(self, ledger: PrivacyLedger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()

    @classmethod
    def open(cls, node_dir: Path, settings: PrivacySettings,
             datasets: list[str]) -> PrivacyGuard:
        """Open ``<node_dir>/privacy-ledger.json`` (``LedgerError`` if it is corrupt: the node
        must not start) and apply the owner's settings to ``datasets``. Past spending is kept
        whatever the settings say."""
        ledger = PrivacyLedger.open(Path(node_dir) / LEDGER_FILE)
        names = set(datasets) | set(settings.private_datasets) | set(ledger.datasets)
        for name in sorted(names):
            ledger.set_budget(name, settings.budget, settings.delta,
                              private=name in settings.private_datasets)
        return cls(ledger)

    def admit(self, task: pb.Task, method: Method, config: MethodConfig,
              n_examples: int) -> ExamplePlan | None:
        """Refuse (:class:`TaskRefused`) or charge the task; the DP-SGD plan to train with, or
        None for a non-private task."""
        dataset = task.spec.train.dataset
        plan = None
        if isinstance(config, DPLoRAConfig) and config.unit == "example":
            plan = method.example_plan(config, n_examples)  # type: ignore[attr-defined]
            if task.round > plan.rounds:
                raise TaskRefused(
                    f"round {task.round} is beyond the {plan.rounds} rounds this node's "
                    f"budget was charged for (dp-lora rounds)")
        event = plan.event if plan is not None else None
        with self._lock:
            if event is not None and self._charged(dataset, task.job_id):
                self.ledger.charge(dataset, *event, job=task.job_id)  # checks the same event
                return plan
            reason = self.ledger.refusal(dataset, event)
            if reason is not None:
                raise TaskRefused(reason)
            if event is not None:
                try:
                    self.ledger.charge(dataset, *event, job=task.job_id)
                except BudgetExceeded as exc:
                    raise TaskRefused(str(exc)) from None
        return plan

    def _charged(self, dataset: str, job_id: str) -> bool:
        entry = self.ledger.datasets.get(dataset)
        return bool(job_id) and entry is not None and any(c.job == job_id
                                                          for c in entry.charges)

    def report(self) -> list[pb.DatasetPrivacy]:
        """The ledger as NodeInfo reports it (``confide status``, the SDK)."""
        with self._lock:
            rows = self.ledger.report()
        return [pb.DatasetPrivacy(
            dataset=name, epsilon_budget=row["epsilon_budget"] or 0.0, delta=row["delta"],
            epsilon_spent=row["epsilon_spent"], private=row["private"], charges=row["charges"])
            for name, row in rows.items()]
