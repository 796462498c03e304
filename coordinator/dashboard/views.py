"""What the dashboard shows, as JSON, built from the coordinator's own store and event log.

The same SQLite rows that ``GetJob``, ``ListNodes``, ``GetLedger`` and ``WatchJob`` read are
the only source: the page is a view of the coordinator, never a second copy of its state.
What leaves here is what node operators already share with the coordinator's users through
those RPCs, minus what a page has no business showing: no public or ring keys, no peer
addresses, no update values (the store holds none), and for an anonymous job nothing that ties
a node to its contribution (participants, per-node drops, per-node payments, node ids in the
job's events).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confide.coordinator.events import EventLog
from confide.coordinator.sessions import SessionRegistry
from confide.coordinator.store import Store
from confide.v1 import coordinator_pb2 as pb

#: the job ids the coordinator issues are 12 hex digits; anything else outside this is refused
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: round metrics drawn per round (first present wins): the coordinator's example-weighted means
ACCURACY_KEYS = ("accuracy", "eval_accuracy", "held_out_accuracy")
LOSS_KEYS = ("loss_last", "loss", "eval_loss")
EPSILON_KEYS = ("epsilon",)
#: event kinds that name one node's own contribution: anonymous jobs show them without it
NODE_KINDS_PREFIX = "node."


class NotFound(LookupError):
    """A job id that is well formed but unknown."""


@dataclass
class Source:
    """Where the views read: the coordinator's store and, in the daemon, its live sessions
    (online, busy, last heartbeat; without them every node shows its stored last seen) and
    its event log (live-only training progress; stored events come from the store)."""

    store: Store
    sessions: SessionRegistry | None = None
    events: EventLog | None = None


def check_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise ValueError("a job id is 1-64 letters, digits, '-' or '_'")
    return job_id


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: such a metric is shown as missing."""
    return value if math.isfinite(value) else None


def _first(metrics: dict[str, float], keys: Iterable[str]) -> float | None:
    for key in keys:
        if key in metrics:
            return _finite(float(metrics[key]))
    return None


def node_rows(source: Source) -> list[dict[str, Any]]:
    """Every registered node: identity as the operator chose to reveal it (name, device,
    datasets as its disclosure policy lets them through) and its own privacy ledger."""
    now_ms = time.time() * 1000
    now = time.monotonic()
    rows = []
    for status in source.store.nodes():
        info = status.info
        session = source.sessions.get(status.node_id) if source.sessions else None
        online = session is not None and not session.closed
        heartbeat = (now_ms - (now - session.last_seen) * 1000 if online and session
                     else status.last_seen_ms)
        rows.append({
            "id": status.node_id,
            "name": info.name,
            "device": info.device,
            "roles": list(info.roles),
            "datasets": dict(sorted((k, int(v)) for k, v in info.datasets.items())),
            "disclosure": info.dataset_disclosure or "exact",
            "online": online,
            "busy": bool(online and session and session.busy),
            "registered_ms": status.registered_ms,
            "last_heartbeat_ms": int(heartbeat),
            "privacy": [{"dataset": p.dataset, "epsilon_spent": _finite(p.epsilon_spent),
                         "epsilon_budget": _finite(p.epsilon_budget) or None,
                         "delta": p.delta, "private": p.private, "charges": p.charges}
                        for p in info.privacy],
            "epsilon_spent": max((p.epsilon_spent for p in info.privacy), default=0.0),
        })
    return rows


def _job_summary(status: pb.JobStatus) -> dict[str, Any]:
    spec = status.spec
    return {
        "id": status.job_id,
        "name": spec.name,
        "method": spec.method,
        "state": pb.JobState.Name(status.state),
        "reason": status.reason,
        "rounds_completed": status.rounds_completed,
        "rounds": spec.rounds,
        "anonymous": spec.anonymous,
        "secure_aggregation": spec.secure_aggregation,
        "budget": spec.budget,
        "created_ms": status.created_ms,
        "updated_ms": status.updated_ms,
    }


def job_rows(source: Source) -> list[dict[str, Any]]:
    """Every job, newest first, without its rounds (the list stays small at any size)."""
    store = source.store
    jobs = [store.job(job_id) for job_id in store.job_ids()]
    return [_job_summary(job) for job in reversed(jobs) if job is not None]


def _round_row(record: pb.RoundSummary, anonymous: bool) -> dict[str, Any]:
    metrics = dict(record.metrics)
    row: dict[str, Any] = {
        "round": record.round,
        "state": record.state,
        "selected": len(record.selected),
        "participants": len(record.participants),
        "bytes_up": record.bytes.up,
        "bytes_down": record.bytes.down,
        "seconds": _finite(record.seconds),
        "accuracy": _first(metrics, ACCURACY_KEYS),
        "loss": _first(metrics, LOSS_KEYS),
        "epsilon": _first(metrics, EPSILON_KEYS),
        "metrics": {k: _finite(float(v)) for k, v in sorted(metrics.items())},
        "secure_aggregation": record.secure_aggregation,
    }
    if anonymous:  # how many and why, never who
        row["dropped"] = [{"node": "", "reason": reason}
                          for reason in sorted(record.dropped.values())]
    else:
        row["dropped"] = [{"node": node, "reason": reason}
                          for node, reason in sorted(record.dropped.items())]
    return row


def job_detail(source: Source, job_id: str) -> dict[str, Any]:
    """One job with its rounds (the charts) and its incentive payments."""
    status = source.store.job(check_job_id(job_id))
    if status is None:
        raise NotFound(f"no job {job_id}")
    anonymous = status.spec.anonymous
    detail = _job_summary(status)
    detail["round_list"] = [_round_row(r, anonymous) for r in status.rounds]
    # the submitter's held-out figures (ReportEvaluation), the latest report per round
    evaluated = {e.round: dict(e.metrics) for e in source.store.events(job_id)
                 if e.kind == "round.evaluated"}
    for row in detail["round_list"]:
        held_out = evaluated.get(row["round"], {})
        if row["accuracy"] is None:
            row["accuracy"] = _first(held_out, ACCURACY_KEYS)
        if held_out:
            row["held_out"] = {k: _finite(float(v)) for k, v in sorted(held_out.items())}
    ledger = source.store.ledger(job_id)
    if anonymous:  # who was paid what would tie a node to its round: totals per round only
        per_round: dict[int, float] = {}
        for p in ledger.payments:
            per_round[p.round] = per_round.get(p.round, 0.0) + p.payment
        detail["payments"] = [{"round": r, "node": "", "payment": v}
                              for r, v in sorted(per_round.items())]
    else:
        detail["payments"] = [{"round": p.round, "node": p.node_id, "payment": p.payment,
                               "reported_cost": p.reported_cost, "value": p.value}
                              for p in ledger.payments]
    return detail


def event_row(event: pb.Event, anonymous: bool) -> dict[str, Any]:
    row = {
        "job": event.job_id,
        "seq": event.seq,
        "time_ms": event.timestamp_ms,
        "kind": event.kind,
        "round": event.round,
        "node": event.node_id,
        "message": event.message,
        "state": pb.JobState.Name(event.state) if event.state else "",
        "bytes_up": event.bytes.up,
        "bytes_down": event.bytes.down,
        "metrics": {k: _finite(float(v)) for k, v in sorted(event.metrics.items())},
    }
    if anonymous:
        row["node"] = ""
        if event.kind.startswith(NODE_KINDS_PREFIX):  # one node's figures: its contribution
            row["metrics"] = {}
            row["bytes_up"] = row["bytes_down"] = 0
    return row


class AnonymityCache:
    """Whether a job is anonymous, read once per job (a spec never changes)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, bool] = {}

    def __call__(self, job_id: str) -> bool:
        if job_id not in self._known:
            status = self.store.job(job_id)
            # an unknown job is treated as anonymous: show less, not more
            self._known[job_id] = True if status is None else status.spec.anonymous
        return self._known[job_id]


def progress_row(event: pb.Event) -> dict[str, Any] | None:
    """A node's training progress (a live-only event; anonymous jobs never emit one): its
    step count and loss, shown beside the node while the round runs."""
    if event.kind != "node.progress" or not event.node_id:
        return None
    metrics = event.metrics
    return {"job": event.job_id, "round": event.round, "node": event.node_id,
            "step": int(metrics.get("step", 0)), "total": int(metrics.get("total_steps", 0)),
            "loss": _finite(float(metrics.get("loss", math.nan)))}


def job_events(source: Source, job_id: str, after_seq: int = 0,
               limit: int = 1000) -> list[dict[str, Any]]:
    """A job's stored events after ``after_seq``: exactly what ``WatchJob`` replays."""
    status = source.store.job(check_job_id(job_id))
    if status is None:
        raise NotFound(f"no job {job_id}")
    events = source.store.events(job_id, after_seq)[:limit]
    return [event_row(e, status.spec.anonymous) for e in events]


def events_since(source: Source, cursor: int, anonymous: AnonymityCache,
                 limit: int = 500) -> tuple[int, list[dict[str, Any]]]:
    """Every job's events written after ``cursor``, and the cursor after them."""
    rows = []
    for rowid, event in source.store.events_since(cursor, limit):
        cursor = rowid
        rows.append(event_row(event, anonymous(event.job_id)))
    return cursor, rows


def recent_events(source: Source, anonymous: AnonymityCache,
                  count: int = 200) -> tuple[int, list[dict[str, Any]]]:
    """The last ``count`` events of every job (what a freshly opened page shows) and the
    cursor the live stream continues from."""
    last = source.store.last_event_cursor()
    _, rows = events_since(source, max(0, last - count), anonymous, limit=count)
    return last, rows
