"""What every part of a running job shares: its spec, its method and config, where it records
(store, event log) and the node sessions; plus the round bookkeeping federated and peer rounds
have in common (a task, a dropped node, a failed round), so each is written once."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from confide.coordinator.events import EventLog
from confide.coordinator.sessions import SessionRegistry, TaskOutcome
from confide.coordinator.store import RoundRecord, Store
from confide.node.methods import Method, MethodConfig, get_method, method_params
from confide.v1 import coordinator_pb2 as pb


class JobFailed(Exception):
    """The job cannot go on; the message says why, for the user."""


class JobStopped(Exception):
    """The method ended the job cleanly before a round (e.g. its privacy budget is spent)."""


MAX_OVER_NODES = ("epsilon", "epsilon_node_budget_spent")
"""Metrics whose round value is the largest node's, not a mean: example-level DP spends each
node's epsilon on its own examples (parallel composition), so the job's epsilon is the max."""


def weighted_metrics(outcomes: Sequence[TaskOutcome]) -> dict[str, float]:
    """Example-weighted means of the nodes' metrics (each node reports its own); the privacy
    figures in ``MAX_OVER_NODES`` are the maximum instead."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    largest: dict[str, float] = {}
    for outcome in outcomes:
        w = float(max(outcome.num_examples, 1))
        for key, value in outcome.metrics.items():
            if key in MAX_OVER_NODES:
                largest[key] = max(largest.get(key, value), value)
                continue
            totals[key] = totals.get(key, 0.0) + w * value
            weights[key] = weights.get(key, 0.0) + w
    return {**{key: totals[key] / weights[key] for key in totals}, **largest}


@dataclass
class RunningJob:
    job_id: str
    spec: pb.JobSpec
    method: Method
    config: MethodConfig
    store: Store
    sessions: SessionRegistry
    events: EventLog

    @classmethod
    def load(cls, job_id: str, store: Store, sessions: SessionRegistry,
             events: EventLog) -> RunningJob:
        """The stored job with its method and parsed config; KeyError for an unknown id."""
        status = store.job(job_id)
        if status is None:
            raise KeyError(job_id)
        method = get_method(status.spec.method)
        config = method.parse_config(method_params(status.spec))
        return cls(job_id, status.spec, method, config, store, sessions, events)

    def new_task(self, kind: int, round_number: int, has_global: bool) -> pb.Task:
        return pb.Task(
            task_id=uuid.uuid4().hex,
            job_id=self.job_id,
            round=round_number,
            kind=kind,
            spec=self.spec,
            has_global=has_global,
            deadline_s=self.spec.round_timeout_s,
        )

    def drop(self, record: RoundRecord, node_id: str, reason: str, *, bytes_up: int = 0,
             bytes_down: int = 0, refused: bool = False) -> None:
        """A node's work does not count this round: the record and the event log say why
        (a "node.refused" event when the node's owner refused the task)."""
        record.dropped[node_id] = reason
        self.events.emit(self.job_id, "node.refused" if refused else "node.dropped",
                         round_number=record.round,
                         node_id=node_id, message=reason, bytes_up=bytes_up,
                         bytes_down=bytes_down)

    def fail_round(self, record: RoundRecord, summary: str) -> NoReturn:
        """Too few nodes delivered (``summary`` says how many of how many): the round is
        recorded as failed with every dropped node's reason, and the job fails."""
        record.state = "failed"
        self.store.save_round(self.job_id, record)
        why = "; ".join(f"{node}: {reason}" for node, reason in record.dropped.items())
        message = (f"round {record.round}: {summary}, min_nodes is {self.spec.min_nodes}"
                   + (f" ({why})" if why else ""))
        self.events.emit(self.job_id, "round.failed", round_number=record.round,
                         message=message, bytes_up=record.bytes_up,
                         bytes_down=record.bytes_down)
        raise JobFailed(message)
