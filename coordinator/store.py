"""Coordinator state in SQLite (one file, WAL mode) plus global models as safetensors.

Everything a restarted coordinator needs to resume lives here: registered nodes, jobs and
their specs, finished rounds with their byte counts and metrics, the event log that
``WatchJob`` replays, and the global model after every completed round. A round is
committed by writing its model file first (atomically) and its row second, so a crash in
between leaves the previous round as the last complete one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from confide.v1 import coordinator_pb2 as pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    info BLOB NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec BLOB NOT NULL,
    state INTEGER NOT NULL,
    rounds_completed INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    selected TEXT NOT NULL,
    participants TEXT NOT NULL,
    dropped TEXT NOT NULL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    seconds REAL NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS secure_rounds (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    survivors INTEGER NOT NULL,
    threshold INTEGER NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS rings (
    job_id TEXT PRIMARY KEY,
    public_keys BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS round_rings (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    public_keys BLOB NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS payments (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    reported_cost REAL NOT NULL,
    value REAL NOT NULL,
    payment REAL NOT NULL,
    PRIMARY KEY (job_id, round, node_id)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS protocols (
    hash TEXT PRIMARY KEY,
    task_kind TEXT NOT NULL,
    document TEXT NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS protocols_by_kind ON protocols (task_kind, uses);
"""

TERMINAL_STATES = (pb.COMPLETED, pb.FAILED, pb.CANCELLED)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RoundRecord:
    round: int
    state: str
    selected: list[str] = field(default_factory=list)
    participants: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    #: securely aggregated (coordinator.secure_rounds): survivors summed, threshold t
    secure_aggregation: bool = False
    secagg_survivors: int = 0
    secagg_threshold: int = 0

    def to_proto(self) -> pb.RoundSummary:
        summary = pb.RoundSummary(
            round=self.round,
            state=self.state,
            selected=self.selected,
            participants=self.participants,
            seconds=self.seconds,
            secure_aggregation=self.secure_aggregation,
            secagg_survivors=self.secagg_survivors,
            secagg_threshold=self.secagg_threshold,
        )
        summary.dropped.update(self.dropped)
        summary.metrics.update(self.metrics)
        summary.bytes.up = self.bytes_up
        summary.bytes.down = self.bytes_down
        return summary


class Store:
    """Thread-safe access to the coordinator's SQLite file and model directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "coordinator.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ nodes

    def upsert_node(self, node_id: str, public_key: bytes, info: pb.NodeInfo) -> None:
        now = now_ms()
        self._execute(
            "INSERT INTO nodes VALUES (?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
            "info = excluded.info, last_seen_ms = excluded.last_seen_ms",
            (node_id, public_key, info.SerializeToString(), now, now),
        )

    def node_key(self, node_id: str) -> bytes | None:
        rows = self._execute("SELECT public_key FROM nodes WHERE node_id = ?", (node_id,))
        return rows[0][0] if rows else None

    def touch_node(self, node_id: str) -> None:
        self._execute("UPDATE nodes SET last_seen_ms = ? WHERE node_id = ?", (now_ms(), node_id))

    def nodes(self) -> list[pb.NodeStatus]:
        rows = self._execute(
            "SELECT node_id, info, registered_ms, last_seen_ms FROM nodes ORDER BY registered_ms"
        )
        result = []
        for node_id, info, registered, seen in rows:
            status = pb.NodeStatus(node_id=node_id, registered_ms=registered, last_seen_ms=seen)
            status.info.ParseFromString(info)
            result.append(status)
        return result

    # ------------------------------------------------------------------ jobs

    def create_job(self, job_id: str, spec: pb.JobSpec) -> None:
        now = now_ms()
        self._execute(
            "INSERT INTO jobs (job_id, spec, state, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
            (job_id, spec.SerializeToString(), pb.PENDING, now, now),
        )

    def set_job_state(self, job_id: str, state: int, reason: str = "") -> None:
        self._execute(
            "UPDATE jobs SET state = ?, reason = ?, updated_ms = ? WHERE job_id = ?",
            (state, reason, now_ms(), job_id),
        )

    def job(self, job_id: str) -> pb.JobStatus | None:
        rows = self._execute(
            "SELECT job_id, spec, state, rounds_completed, reason, created_ms, updated_ms "
            "FROM jobs WHERE job_id = ?",
            (job_id,),
        )
        if not rows:
            return None
        job_id, spec, state, done, reason, created, updated = rows[0]
        status = pb.JobStatus(
            job_id=job_id,
            state=state,
            rounds_completed=done,
            reason=reason,
            created_ms=created,
            updated_ms=updated,
        )
        status.spec.ParseFromString(spec)
        status.rounds.extend(r.to_proto() for r in self.rounds(job_id))
        return status

    def job_ids(self, states: tuple[int, ...] | None = None) -> list[str]:
        rows = self._execute("SELECT job_id, state FROM jobs ORDER BY created_ms")
        return [job_id for job_id, state in rows if states is None or state in states]

    # ------------------------------------------------------------------ rounds

    def rounds(self, job_id: str) -> list[RoundRecord]:
        rows = self._execute(
            "SELECT r.round, state, selected, participants, dropped, bytes_up, bytes_down, "
            "seconds, metrics, s.survivors, s.threshold FROM rounds r LEFT JOIN secure_rounds s "
            "ON s.job_id = r.job_id AND s.round = r.round WHERE r.job_id = ? ORDER BY r.round",
            (job_id,),
        )
        return [
            RoundRecord(
                round=r,
                state=state,
                selected=json.loads(selected),
                participants=json.loads(participants),
                dropped=json.loads(dropped),
                bytes_up=up,
                bytes_down=down,
                seconds=seconds,
                metrics=json.loads(metrics),
                secure_aggregation=survivors is not None,
                secagg_survivors=survivors or 0,
                secagg_threshold=threshold or 0,
            )
            for (r, state, selected, participants, dropped, up, down, seconds, metrics,
                 survivors, threshold) in rows
        ]

    def save_round(self, job_id: str, record: RoundRecord) -> None:
        """Record a round; a completed one also advances the job's ``rounds_completed``."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        record.round,
                        record.state,
                        json.dumps(record.selected),
                        json.dumps(record.participants),
                        json.dumps(record.dropped),
                        record.bytes_up,
                        record.bytes_down,
                        record.seconds,
                        json.dumps(record.metrics),
                    ),
                )
                if record.secure_aggregation:
                    self._db.execute(
                        "INSERT OR REPLACE INTO secure_rounds VALUES (?, ?, ?, ?)",
                        (job_id, record.round, record.secagg_survivors,
                         record.secagg_threshold),
                    )
                if record.state == "completed":
                    self._db.execute(
                        "UPDATE jobs SET rounds_completed = MAX(rounds_completed, ?), "
                        "updated_ms = ? WHERE job_id = ?",
                        (record.round, now_ms(), job_id),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ events

    def append_event(self, event: pb.Event) -> None:
        self._execute(
            "INSERT INTO events VALUES (?, ?, ?)",
            (event.job_id, event.seq, event.SerializeToString()),
        )

    def last_event_seq(self, job_id: str) -> int:
        rows = self._execute("SELECT MAX(seq) FROM events WHERE job_id = ?", (job_id,))
        return rows[0][0] or 0

    def events(self, job_id: str, after_seq: int = 0) -> list[pb.Event]:
        rows = self._execute(
            "SELECT event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, after_seq),
        )
        return [pb.Event.FromString(blob) for (blob,) in rows]

    def events_since(self, cursor: int = 0, limit: int = 500) -> list[tuple[int, pb.Event]]:
        """Stored events of every job in the order they were written, after ``cursor`` (the
        SQLite rowid of the last one seen): what the dashboard streams (coordinator/dashboard)."""
        rows = self._execute("SELECT rowid, event FROM events WHERE rowid > ? ORDER BY rowid "
                             "LIMIT ?", (cursor, limit))
        return [(rowid, pb.Event.FromString(blob)) for rowid, blob in rows]

    def last_event_cursor(self) -> int:
        """The rowid of the latest stored event (0: none): where a fresh page starts."""
        return self._execute("SELECT MAX(rowid) FROM events")[0][0] or 0

    # ------------------------------------------------------------------ trust layer

    def save_ring(self, job_id: str, public_keys: list[bytes]) -> None:
        """The job's ring is fixed when it starts: later registrations do not change it."""
        self._execute("INSERT OR IGNORE INTO rings VALUES (?, ?)",
                      (job_id, b"".join(public_keys)))

    def save_round_ring(self, job_id: str, round_number: int,
                        public_keys: list[bytes]) -> None:
        """The ring of one round (its selected nodes' keys), fixed before its tasks go out;
        a resumed round is fixed again for the nodes it selects then."""
        self._execute("INSERT OR REPLACE INTO round_rings VALUES (?, ?, ?)",
                      (job_id, round_number, b"".join(public_keys)))

    def ring(self, job_id: str, round_number: int = 0) -> list[bytes]:
        """The job's members (round 0), or the ring of one round; [] when not fixed."""
        if round_number:
            rows = self._execute("SELECT public_keys FROM round_rings WHERE job_id = ? AND "
                                 "round = ?", (job_id, round_number))
        else:
            rows = self._execute("SELECT public_keys FROM rings WHERE job_id = ?", (job_id,))
        if not rows:
            return []
        blob = rows[0][0]
        return [blob[i:i + 32] for i in range(0, len(blob), 32)]

    def record_payments(self, job_id: str, round_number: int,
                        payments: list[pb.Payment]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO payments VALUES (?, ?, ?, ?, ?, ?)",
                [(job_id, round_number, p.node_id, p.reported_cost, p.value, p.payment)
                 for p in payments],
            )

    def ledger(self, job_id: str = "") -> pb.Ledger:
        sql = ("SELECT job_id, round, node_id, reported_cost, value, payment FROM payments"
               + (" WHERE job_id = ?" if job_id else "") + " ORDER BY job_id, round, node_id")
        ledger = pb.Ledger()
        for job, round_number, node, cost, value, payment in self._execute(
                sql, (job_id,) if job_id else ()):
            ledger.payments.add(job_id=job, round=round_number, node_id=node,
                                reported_cost=cost, value=value, payment=payment)
            ledger.totals[node] = ledger.totals[node] + payment
        return ledger

    # ------------------------------------------------------------------ models

    def _model_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def save_global(self, job_id: str, round_number: int, state: dict[str, torch.Tensor]) -> Path:
        """Write the global state after ``round_number`` (0: initial) atomically. Every
        round is kept (adapters are small) so clients can evaluate the whole trajectory."""
        folder = self._model_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"global-r{round_number:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(tmp),
            metadata={"job_id": job_id, "round": str(round_number)},
        )
        os.replace(tmp, path)
        return path

    def load_global(self, job_id: str, round_number: int) -> dict[str, torch.Tensor] | None:
        path = self._model_dir(job_id) / f"global-r{round_number:05d}.safetensors"
        return load_file(str(path)) if path.exists() else None

    def latest_global(self, job_id: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The global state of the last round the database calls complete."""
        status = self.job(job_id)
        if status is None:
            return None
        state = self.load_global(job_id, status.rounds_completed)
        return (status.rounds_completed, state) if state is not None else None

    # ------------------------------------------------------------------ Agora protocols

    def save_protocol(self, hash_: str, task_kind: str, document: str) -> None:
        """Store a protocol document (its canonical JSON) once: a second save is a no-op."""
        self._execute("INSERT OR IGNORE INTO protocols VALUES (?, ?, ?, 0, ?)",
                      (hash_, task_kind, document, now_ms()))

    def protocol(self, hash_: str) -> tuple[str, int] | None:
        rows = self._execute("SELECT document, uses FROM protocols WHERE hash = ?", (hash_,))
        return (rows[0][0], rows[0][1]) if rows else None

    def protocols(self, task_kind: str = "") -> list[tuple[str, int]]:
        """(document, uses) for ``task_kind`` ("" = all), most used first, then oldest."""
        sql = ("SELECT document, uses FROM protocols"
               + (" WHERE task_kind = ?" if task_kind else "")
               + " ORDER BY uses DESC, created_ms, hash")
        return [(doc, uses) for doc, uses in
                self._execute(sql, (task_kind,) if task_kind else ())]

    def protocol_count(self) -> int:
        return self._execute("SELECT COUNT(*) FROM protocols")[0][0]

    def add_protocol_uses(self, hash_: str, count: int) -> bool:
        """Add ``count`` uses; False when no such protocol is stored."""
        with self._lock:
            cursor = self._db.execute("UPDATE protocols SET uses = uses + ? WHERE hash = ?",
                                      (count, hash_))
            return cursor.rowcount > 0
