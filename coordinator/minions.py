"""The coordinator's side of Minions: the ``Ask`` RPC.

The coordinator holds the remote model (``--remote-model``: ``smollm2`` by default, or
``openai:URL#model`` for a real API; loaded on the first question that needs it). A question
runs the protocols of ``agents.minions`` in a worker thread (model calls block); each time the
protocol needs the nodes, this module sends every node concerned a MINION task down its
session (``NodeSession.run_task``, JSON instructions in ``Task.instructions``, the JSON reply
back as the update payload), in parallel, and hands the replies back. Progress streams to the
caller as ``AskEvent``s, the answer last.

What the daemons serve: ``minions`` (default), ``minion`` and ``local-only``. ``remote-only``
is refused: it means the remote model reads the documents, i.e. the documents leave their
nodes; it exists in process only, as the benchmark's quality baseline
(``confide bench minions``).

One question runs at a time (the remote model and each node's local model serve one call at a
time anyway); later ones wait their turn. A node busy with a training task answers "busy" and
the question goes on with the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from confide.agents.minions.config import DAEMON_MODES, MAX_ROUNDS_LIMIT, MODES, AskCancelled
from confide.agents.minions.orchestrator import AskStep, ask, validate_question
from confide.agents.minions.policy import CITATION_MODES, resolve_citations
from confide.agents.model import ChatModel
from confide.coordinator.sessions import NodeSession, SessionRegistry
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

#: seconds a node has for one MINION task (a round of jobs on all its chunks)
TASK_TIMEOUT_S = 900.0
#: a node's reply larger than this is dropped
MAX_REPLY_BYTES = 1 << 20


class AskRejected(ValueError):
    """A request the coordinator will not run; ``code`` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AskPlan:
    """A validated request."""

    question: str
    mode: str
    citations: str
    max_rounds: int
    sessions: tuple[NodeSession, ...]
    anonymous: bool


class AskOrchestrator:
    def __init__(self, sessions: SessionRegistry, remote_model: str = "smollm2", *,
                 task_timeout_s: float = TASK_TIMEOUT_S, max_tokens: int = 0,
                 load_model: Callable[[str], ChatModel] | None = None) -> None:
        self.sessions = sessions
        self.remote_model = remote_model
        self.task_timeout_s = task_timeout_s
        #: a cap on every generation of a question, remote and local (0: the defaults)
        self.max_tokens = max_tokens
        self._load_model = load_model
        self._remote: ChatModel | None = None
        self._load_lock = asyncio.Lock()
        self._turn = asyncio.Lock()

    # ------------------------------------------------------------------ validation

    def validate(self, request: pb.AskRequest) -> AskPlan:
        try:
            question = validate_question(request.question)
        except ValueError as exc:
            raise AskRejected("INVALID_ARGUMENT", f"question: {exc}") from None
        mode = request.mode or "minions"
        if mode == "remote-only":
            raise AskRejected(
                "INVALID_ARGUMENT",
                "mode remote-only would send the nodes' documents to the coordinator's model; "
                "the daemons do not offer it (it is the benchmark's baseline: confide bench "
                f"minions). Use one of {', '.join(DAEMON_MODES)}")
        if mode not in MODES:
            raise AskRejected("INVALID_ARGUMENT", f"unknown mode {mode[:40]!r}: use one of "
                              f"{', '.join(DAEMON_MODES)}")
        if request.citations and request.citations not in CITATION_MODES:
            raise AskRejected("INVALID_ARGUMENT",
                              f"citations must be one of {', '.join(CITATION_MODES)}, got "
                              f"{request.citations[:40]!r}")
        citations = resolve_citations(request.citations, request.anonymous)
        if request.max_rounds > MAX_ROUNDS_LIMIT:
            raise AskRejected("INVALID_ARGUMENT", f"max_rounds is at most {MAX_ROUNDS_LIMIT}, "
                              f"got {request.max_rounds}")
        online = {s.node_id: s for s in self.sessions.online()}
        if request.node_ids:
            if len(request.node_ids) > 256:
                raise AskRejected("INVALID_ARGUMENT", "at most 256 node ids")
            missing = [n[:40] for n in request.node_ids if n not in online]
            if missing:
                raise AskRejected("FAILED_PRECONDITION",
                                  f"node(s) not online: {', '.join(missing)}; see "
                                  "`confide status`")
            chosen = tuple(dict.fromkeys(online[n] for n in request.node_ids))
        else:
            chosen = tuple(sorted(online.values(), key=lambda s: s.node_id))
        if not chosen:
            raise AskRejected("FAILED_PRECONDITION",
                              "no node is online: start nodes with documents in "
                              "<data dir>/docs/*.txt (confide node serve)")
        return AskPlan(question, mode, citations, request.max_rounds, chosen,
                       request.anonymous)

    async def remote(self) -> ChatModel:
        """The remote model, loaded on first use (in a thread: it may take a while)."""
        async with self._load_lock:
            if self._remote is None:
                load = self._load_model
                if load is None:
                    from confide.agents.backends import backend_from_spec

                    load = backend_from_spec
                log.info("loading the remote model %s for Minions", self.remote_model)
                self._remote = await asyncio.to_thread(load, self.remote_model)
            return self._remote

    # ------------------------------------------------------------------ running

    async def run(self, plan: AskPlan) -> AsyncIterator[pb.AskEvent]:
        """Run a validated question; yields its events, the answer (or an error) last."""
        async with self._turn, contextlib.aclosing(self._run(plan)) as events:
            async for event in events:
                yield event

    async def _run(self, plan: AskPlan) -> AsyncIterator[pb.AskEvent]:
        ask_id = uuid.uuid4().hex[:12]
        loop = asyncio.get_running_loop()
        remote = None
        if plan.mode != "local-only":
            try:
                remote = await self.remote()
            except Exception as exc:
                log.exception("remote model %s failed to load", self.remote_model)
                yield pb.AskEvent(kind="error", message=f"the remote model "
                                  f"{self.remote_model!r} could not be loaded: {exc}")
                return
        log.info("ask %s: mode %s, %d node(s), citations %s, question of %d characters",
                 ask_id, plan.mode, len(plan.sessions), plan.citations, len(plan.question))
        queue: asyncio.Queue[pb.AskEvent | None] = asyncio.Queue()
        stop = threading.Event()
        by_id = {s.node_id: s for s in plan.sessions}
        round_counter = [0]
        active: set[concurrent.futures.Future] = set()

        def on_event(step: AskStep) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, _event(step))

        def execute(requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            round_counter[0] += 1
            if stop.is_set():
                raise AskCancelled("the caller went away")
            future = asyncio.run_coroutine_threadsafe(
                self._dispatch(ask_id, round_counter[0], by_id, requests), loop)
            active.add(future)
            try:
                return future.result()
            except concurrent.futures.CancelledError:
                raise AskCancelled("the caller went away") from None
            finally:
                active.discard(future)

        def work() -> None:
            try:
                ask(plan.mode, plan.question, [s.node_id for s in plan.sessions],
                    remote=remote, execute=execute, citations=plan.citations,
                    max_rounds=plan.max_rounds, on_event=on_event, should_stop=stop.is_set,
                    max_tokens=self.max_tokens)
            except AskCancelled:
                pass
            except Exception as exc:  # a model error, a bug: the caller hears it
                log.exception("ask %s failed", ask_id)
                on_event(AskStep("error", f"{type(exc).__name__}: {exc}"))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    break
                yield event
        finally:
            stop.set()  # the caller went away, or we are done: free the nodes now
            for future in list(active):
                future.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(worker)
        log.info("ask %s done", ask_id)

    async def _dispatch(self, ask_id: str, number: int, sessions: dict[str, NodeSession],
                        requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """One MINION task per node, in parallel; each reply decoded (or an error)."""

        async def one(node_id: str, request: dict[str, Any]) -> dict[str, Any]:
            session = sessions[node_id]
            task = pb.Task(task_id=uuid.uuid4().hex, job_id=ask_id, round=number,
                           kind=pb.MINION, deadline_s=self.task_timeout_s,
                           instructions=json.dumps(request).encode())
            outcome = await session.run_task(task, None, self.task_timeout_s,
                                             expects_payload=True)
            if not outcome.ok:
                return {"error": outcome.reason}
            payload = outcome.payload or b""
            if len(payload) > MAX_REPLY_BYTES:
                return {"error": f"reply of {len(payload)} bytes is too large"}
            try:
                reply = json.loads(payload)
            except ValueError:
                return {"error": "reply is not JSON"}
            return reply if isinstance(reply, dict) else {"error": "reply is not an object"}

        results = await asyncio.gather(*(one(n, r) for n, r in requests.items()))
        return dict(zip(requests, results, strict=True))


def _event(step: AskStep) -> pb.AskEvent:
    detail = "" if step.detail is None else json.dumps(step.detail, ensure_ascii=False)
    return pb.AskEvent(
        kind=step.kind, message=step.message, node_id=step.node_id, answer=step.answer,
        detail_json=detail[:200_000],
        remote_prompt_tokens=step.remote.prompt_tokens,
        remote_completion_tokens=step.remote.completion_tokens,
        local_prompt_tokens=step.local.prompt_tokens,
        local_completion_tokens=step.local.completion_tokens)
