"""A job's lifecycle: one ``JobRunner`` per running job.

It marks the job running, drives its rounds (``FederatedRounds`` or, for a decentralized
method, ``PeerRounds``, both drawing nodes from one ``NodePool``) and ends it in exactly one
state: completed, stopped by its method (completed, with the reason), failed (with the reason
the user reads) or cancelled. A restarted coordinator starts a runner again and the rounds
resume at the first one not committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from confide.coordinator.anonymous import AnonymousInbox
from confide.coordinator.events import EventLog
from confide.coordinator.federated_rounds import FederatedRounds
from confide.coordinator.job import JobFailed, JobStopped, RunningJob
from confide.coordinator.node_pool import NodePool
from confide.coordinator.peer_rounds import PeerRounds
from confide.coordinator.sessions import SessionRegistry
from confide.coordinator.store import Store
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        job_id: str,
        store: Store,
        sessions: SessionRegistry,
        events: EventLog,
        inbox: AnonymousInbox | None = None,
    ) -> None:
        self.job = RunningJob.load(job_id, store, sessions, events)
        self.job_id = job_id
        self.inbox = inbox if inbox is not None else AnonymousInbox()
        self.pool = NodePool(self.job)
        self.task: asyncio.Task | None = None

    def start(self) -> asyncio.Task:
        self.task = asyncio.create_task(self.run(), name=f"job-{self.job_id}")
        return self.task

    async def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.inbox.forget(self.job_id)
        self._end(pb.CANCELLED, "job.cancelled", reason)
        self._tell_nodes(pb.CANCELLED)

    async def run(self) -> None:
        job = self.job
        status = job.store.job(self.job_id)
        assert status is not None
        resumed = status.rounds_completed > 0 or status.state == pb.RUNNING
        job.store.set_job_state(self.job_id, pb.RUNNING)
        job.events.emit(
            self.job_id,
            "job.started",
            message=f"resumed after round {status.rounds_completed}" if resumed else "",
            state=pb.RUNNING,
        )
        try:
            if job.method.decentralized:
                await PeerRounds(job, self.pool).run(status.rounds_completed)
            else:
                await FederatedRounds(job, self.pool, self.inbox).run()
        except JobFailed as exc:
            self.inbox.forget(self.job_id)
            self._end(pb.FAILED, "job.failed", str(exc))
        except JobStopped as exc:
            self._end(pb.COMPLETED, "job.completed", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail the job visibly, not hang it
            log.exception("job %s crashed", self.job_id)
            self._end(pb.FAILED, "job.failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            self.inbox.forget(self.job_id)
            job.store.set_job_state(self.job_id, pb.COMPLETED)
            job.events.emit(self.job_id, "job.completed", round_number=job.spec.rounds,
                            state=pb.COMPLETED)
        finally:  # the sessions need not remember the states of a job that is over
            for session in job.sessions.online():
                session.held_states.pop(self.job_id, None)
            status = job.store.job(self.job_id)
            if status is not None and status.state in (pb.COMPLETED, pb.FAILED):
                self._tell_nodes(status.state)

    def _tell_nodes(self, state: int) -> None:
        """Every node that had a task of this job hears that it ended (their policy stops
        counting it as running)."""
        message = pb.CoordinatorMessage(job_ended=pb.JobEnded(job_id=self.job_id, state=state))
        for session in self.job.sessions.online():
            if self.job_id in session.jobs_taken_part:
                session.jobs_taken_part.discard(self.job_id)
                with contextlib.suppress(ConnectionError):
                    session.send(message)

    def _end(self, state: int, kind: str, reason: str) -> None:
        self.job.store.set_job_state(self.job_id, state, reason)
        self.job.events.emit(self.job_id, kind, message=reason, state=state)
