"""The job event log: every event is stored (for ``WatchJob`` replay and restarts), handed
to live watchers, and published on MQTT when a broker is configured."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

from confide.coordinator.store import Store, now_ms
from confide.protos.events import EventPublisher, event_to_json, job_events_topic
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

FINAL_KINDS = {"job.completed", "job.failed", "job.cancelled"}


class EventLog:
    def __init__(self, store: Store, publisher: EventPublisher | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self._watchers: dict[str, set[asyncio.Queue[pb.Event]]] = defaultdict(set)
        self._seq: dict[str, int] = {}
        #: queues that get every job's live-only events (the dashboard's stream: stored
        #: events it reads from the store, these exist nowhere else)
        self.transient_listeners: set[asyncio.Queue[pb.Event]] = set()

    def emit(
        self,
        job_id: str,
        kind: str,
        *,
        round_number: int = 0,
        node_id: str = "",
        message: str = "",
        metrics: dict[str, float] | None = None,
        bytes_up: int = 0,
        bytes_down: int = 0,
        state: int = pb.JOB_STATE_UNSPECIFIED,
    ) -> pb.Event:
        seq = self._seq.get(job_id)
        if seq is None:
            seq = self.store.last_event_seq(job_id)
        seq += 1
        self._seq[job_id] = seq
        event = pb.Event(
            job_id=job_id,
            seq=seq,
            timestamp_ms=now_ms(),
            kind=kind,
            round=round_number,
            node_id=node_id,
            message=message,
            state=state,
        )
        event.metrics.update(metrics or {})
        event.bytes.up = bytes_up
        event.bytes.down = bytes_down
        self.store.append_event(event)
        for queue in list(self._watchers[job_id]):
            queue.put_nowait(event)
        if self.publisher is not None:
            self.publisher.publish(job_events_topic(job_id), event_to_json(event))
        log.info("job %s: %s %s", job_id, kind, message)
        return event

    def emit_transient(self, job_id: str, kind: str, *, round_number: int = 0,
                       node_id: str = "", metrics: dict[str, float] | None = None) -> None:
        """A live-only event (seq 0): training progress, too frequent to be worth storing.
        Watchers connected now and MQTT subscribers see it; replays do not."""
        event = pb.Event(job_id=job_id, seq=0, timestamp_ms=now_ms(), kind=kind,
                         round=round_number, node_id=node_id)
        event.metrics.update(metrics or {})
        for queue in list(self._watchers[job_id]) + list(self.transient_listeners):
            queue.put_nowait(event)
        if self.publisher is not None:
            self.publisher.publish(job_events_topic(job_id), event_to_json(event))

    async def watch(self, job_id: str, after_seq: int = 0) -> AsyncIterator[pb.Event]:
        """Past events after ``after_seq``, then live ones, until a final event."""
        queue: asyncio.Queue[pb.Event] = asyncio.Queue()
        self._watchers[job_id].add(queue)
        try:
            last = after_seq
            for event in self.store.events(job_id, after_seq):
                last = event.seq
                yield event
                if event.kind in FINAL_KINDS:
                    return
            while True:
                event = await queue.get()
                if event.seq == 0:  # transient (progress): pass through
                    yield event
                    continue
                if event.seq <= last:
                    continue
                last = event.seq
                yield event
                if event.kind in FINAL_KINDS:
                    return
        finally:
            self._watchers[job_id].discard(queue)
