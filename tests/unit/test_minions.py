"""Minions as pure logic: chunking, the job schema (plans are data, repaired or rejected, never
run), the citation policy the node enforces, aggregation, and the protocols in process, with
assertions on structure, token accounting and what the remote side received."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import jsonschema
import pytest

from confide.agents.minions.config import AskCancelled
from confide.agents.minions.orchestrator import (
    RecordingModel,
    ask,
    majority_answer,
    run_minion,
    run_minions,
    run_remote_only,
)
from confide.agents.minions.policy import (
    NONE_MAX_COPIED_WORDS,
    SHORT_CITATION_WORDS,
    VerbatimGuard,
    resolve_citations,
    stricter,
)
from confide.agents.minions.schemas import (
    INSTRUCTIONS_SCHEMA,
    PLAN_SCHEMA,
    PlanError,
    parse_decision,
    parse_instructions,
    parse_plan,
)
from confide.agents.minions.text import chunk_text
from confide.agents.minions.worker import LocalWorker, parse_worker_output
from confide.agents.model import Completion, Usage
from confide.node.minion_worker import MinionCancelled, MinionWorker

CANARY = "The violet heron counted forty seven lanterns beside the frozen canal at dawn."
DOCUMENT = (
    "Acme Widgets reported record profits of 12.5 million pounds for the year.\n\n"
    "The chief executive, Maria Delgado, said demand in Europe had doubled. "
    + CANARY + " Analysts expect further growth in the coming quarter.\n\n"
    "The company was founded in 1987 in Leeds and employs 340 people."
)
QUESTION = "Who runs Acme Widgets?"


class Scripted:
    """A model that answers from a list, with fixed token counts per call."""

    def __init__(self, replies: list[str], usage: Usage | None = None, name: str = "scripted"):
        self.replies = list(replies)
        self.usage = usage or Usage(10, 5)
        self.name = name
        self.seen: list[list[dict]] = []

    def chat(self, messages, *, max_tokens=256, temperature=0.0) -> Completion:
        self.seen.append(messages)
        text = self.replies.pop(0) if self.replies else "{}"
        return Completion(text, self.usage)


class Leaky:
    """A local model that copies the canary sentence into every field it writes."""

    name = "leaky"

    def chat(self, messages, *, max_tokens=256, temperature=0.0) -> Completion:
        text = json.dumps({"answer": CANARY, "explanation": "it says: " + CANARY,
                           "citation": CANARY})
        return Completion(text, Usage(7, 3))


def in_process(workers: dict[str, LocalWorker]):
    def execute(requests):
        return {n: workers[n].handle(json.dumps(r).encode()) for n, r in requests.items()}

    return execute


@pytest.fixture(scope="module")
def tiny():
    from confide.agents.backends import backend_from_spec

    return backend_from_spec("tiny")


# ------------------------------------------------------------------ chunking


def test_chunks_respect_the_size_and_lose_no_text():
    text = "\n\n".join(DOCUMENT for _ in range(6))
    chunks = chunk_text(text, 300)
    assert len(chunks) > 3
    assert all(len(c) <= 300 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert chunk_text(text, 300) == chunks  # deterministic


def test_chunking_prefers_paragraphs_then_sentences_then_spaces():
    paragraphs = ["alpha " * 20, "beta " * 20]
    chunks = chunk_text("\n\n".join(p.strip() for p in paragraphs), 150)
    assert chunks == [p.strip() for p in paragraphs]
    long_sentence = "word " * 100
    pieces = chunk_text(long_sentence, 120)
    assert all(len(p) <= 120 for p in pieces) and " ".join(pieces).split() == long_sentence.split()
    with pytest.raises(ValueError):
        chunk_text("x", 10)


# ------------------------------------------------------------------ plans are data


def test_a_valid_plan_parses():
    plan = {"jobs": [{"task": "Find the chief executive", "documents": ["D1"],
                      "chunks": [0, 1], "advice": "a person's name"}]}
    jsonschema.validate(plan, PLAN_SCHEMA)
    jobs, notes = parse_plan(plan, {"D1": 3, "D2": 1})
    assert notes == []
    assert jobs[0].task == "Find the chief executive"
    assert jobs[0].documents == ("D1",) and jobs[0].chunks == (0, 1)


@pytest.mark.parametrize("plan, expect_note", [
    ([{"task": "Find the CEO"}], "bare list"),
    ({"task": "Find the CEO", "chunks": "all"}, "single job"),
    ({"jobs": [{"task": "Find the CEO", "code": "import os; os.remove('/')"}]}, "unknown"),
    ({"jobs": [{"task": "Find the CEO", "chunks": [0, 9, "x"]}]}, "out of range"),
    ({"jobs": [{"task": "Find the CEO", "documents": ["D7", "a.txt", "D1"]}]},
     "unknown document"),
])
def test_invalid_plans_are_repaired_with_notes(plan, expect_note):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(plan, PLAN_SCHEMA)
    jobs, notes = parse_plan(plan, {"D1": 3})
    assert jobs and jobs[0].task == "Find the CEO"
    assert any(expect_note in n for n in notes), notes


@pytest.mark.parametrize("plan", [
    {"jobs": []}, {"jobs": [{"advice": "no task"}]}, "run rm -rf", 42,
    {"jobs": [{"task": "x", "documents": ["D9"]}]}, {"jobs": [{"task": "x", "chunks": [99]}]},
])
def test_unusable_plans_are_rejected(plan):
    with pytest.raises(PlanError):
        parse_plan(plan, {"D1": 3})


def test_too_many_jobs_are_cut():
    jobs, notes = parse_plan({"jobs": [{"task": f"t{i}"} for i in range(9)]}, {"D1": 1},
                             max_jobs=3)
    assert [j.task for j in jobs] == ["t0", "t1", "t2"] and notes


def test_a_plan_is_never_executed(tmp_path: Path):
    """Code in a plan is text the local model reads, nothing more."""
    sentinel = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(sentinel)!r}).write_text('x')"
    remote = Scripted([json.dumps({"jobs": [{"task": code, "advice": f"exec({code!r})"}]}),
                       json.dumps({"decision": "final", "answer": "nothing"})])
    local = Scripted(['{"answer": null}'] * 10)
    worker = LocalWorker([DOCUMENT], model=local)
    result = run_minions(remote, in_process({"n1": worker}), QUESTION, ["n1"], max_rounds=1)
    assert not sentinel.exists()
    assert result.steps[1].kind == "plan" and result.steps[1].detail["jobs"][0]["task"] == code
    assert any(code in m["content"] for call in local.seen for m in call)


def test_node_instructions_are_validated():
    assert parse_instructions(b'{"op": "describe"}') == {"op": "describe"}
    good = {"op": "jobs", "citations": "none", "jobs": [
        {"id": 0, "task": "t", "documents": "all", "chunks": [1]}]}
    assert parse_instructions(json.dumps(good))["jobs"][0]["chunks"] == [1]
    jsonschema.validate(good, INSTRUCTIONS_SCHEMA)
    bad = [b"not json", b"[]", b'{"op": "shell", "cmd": "ls"}',
           b'{"op": "describe", "extra": 1}',
           b'{"op": "chat", "citations": "everything", "message": "hi"}',
           json.dumps({**good, "jobs": [{"id": 0, "task": "t", "documents": "all",
                                         "chunks": "all", "code": "x"}]}).encode()]
    for raw in bad:
        with pytest.raises(ValueError):
            parse_instructions(raw)


# ------------------------------------------------------------------ citation policy


def test_citation_modes_resolve():
    assert resolve_citations("", anonymous=False) == "allow"
    assert resolve_citations("", anonymous=True) == "none"
    assert resolve_citations("short", anonymous=True) == "short"
    assert stricter("allow", "short") == "short" and stricter("none", "allow") == "none"
    with pytest.raises(ValueError):
        resolve_citations("some", anonymous=False)


def test_the_guard_finds_copied_runs_despite_case_and_punctuation():
    guard = VerbatimGuard([DOCUMENT])
    mangled = "Note:  the VIOLET heron, counted forty-seven lanterns beside the frozen canal"
    assert guard.longest_copied_run(mangled) >= 10
    scrubbed = guard.scrub(mangled, NONE_MAX_COPIED_WORDS)
    assert guard.longest_copied_run(scrubbed) <= NONE_MAX_COPIED_WORDS
    assert scrubbed.startswith("Note:") and "[...]" in scrubbed
    assert guard.scrub("Maria Delgado", NONE_MAX_COPIED_WORDS) == "Maria Delgado"


def _leaky_reply(mode: str, max_citations: str = "allow") -> tuple[dict, str]:
    worker = LocalWorker([DOCUMENT], model=Leaky(), max_citations=max_citations)
    reply = worker.handle({"op": "jobs", "citations": mode, "jobs": [
        {"id": 0, "task": "copy everything", "documents": "all", "chunks": "all"}]})
    return reply, json.dumps(reply)


def test_citations_none_remove_verbatim_text_on_the_node():
    reply, raw = _leaky_reply("none")
    assert reply["citations"] == "none" and reply["outputs"]
    assert CANARY not in raw and "lanterns beside the frozen" not in raw
    guard = VerbatimGuard([DOCUMENT])
    for output in reply["outputs"]:
        assert output["citation"] is None
        for text in (output["answer"], output["explanation"]):
            assert guard.longest_copied_run(text) <= NONE_MAX_COPIED_WORDS


def test_citations_short_keep_a_few_words():
    reply, raw = _leaky_reply("short")
    guard = VerbatimGuard([DOCUMENT])
    assert CANARY not in raw
    cited = [o["citation"] for o in reply["outputs"] if o["citation"]]
    assert cited and all(len(c.split()) <= SHORT_CITATION_WORDS for c in cited)
    for output in reply["outputs"]:
        for text in (output["answer"], output["explanation"], output["citation"] or ""):
            assert guard.longest_copied_run(text) <= SHORT_CITATION_WORDS


def test_citations_allow_pass_verbatim_text_and_the_node_ceiling_wins():
    reply, raw = _leaky_reply("allow")
    assert CANARY in raw and reply["outputs"][0]["citation"] == CANARY
    reply, raw = _leaky_reply("allow", max_citations="none")
    assert reply["citations"] == "none" and CANARY not in raw


def test_minion_chat_replies_are_scrubbed_too():
    worker = LocalWorker([DOCUMENT], model=Scripted([CANARY, CANARY]))
    reply = worker.handle({"op": "chat", "citations": "none", "message": "what?"})
    assert CANARY not in reply["reply"]
    reply = worker.handle({"op": "answer", "citations": "allow", "question": "what?"})
    assert reply["answer"] == CANARY


# ------------------------------------------------------------------ local outputs, aggregation


def test_worker_output_parsing_grounds_and_abstains():
    chunk = DOCUMENT
    found = parse_worker_output('```json\n{"answer": "Maria Delgado", "explanation": "named",'
                                ' "citation": "not in the text"}\n```', chunk)
    assert found["grounded"] and found["answer"] == "Maria Delgado"
    assert "Maria Delgado" in found["citation"]  # replaced by the supporting sentence
    assert parse_worker_output('{"answer": null}', chunk)["answer"] is None
    assert parse_worker_output("The excerpt does not mention it.", chunk)["answer"] is None
    loose = parse_worker_output("Bob Smith", chunk)
    assert loose["answer"] == "Bob Smith" and not loose["grounded"]


def test_majority_prefers_grounded_answers():
    assert majority_answer([("Bob", False), ("Bob", False), ("Maria", True)]) == "Maria"
    assert majority_answer([("bob", False), ("Bob.", False), ("Ann", False)]) == "bob"
    assert majority_answer([]) == ""


def test_decisions_are_read_leniently():
    assert parse_decision({"answer": "x"}) == {"decision": "final", "answer": "x",
                                               "feedback": "", "message": ""}
    assert parse_decision({"feedback": "look again"})["decision"] == "more"
    assert parse_decision([{"decision": "ask", "message": "who?"}])["decision"] == "ask"
    assert parse_decision(None)["decision"] == "final"


# ------------------------------------------------------------------ protocols in process


def test_minions_rounds_tokens_and_what_the_remote_saw():
    plan = json.dumps({"jobs": [{"task": "Find the chief executive's name",
                                 "chunks": "all"}]})
    remote = Scripted([plan, '{"decision": "more", "feedback": "check the other chunks"}',
                       plan, '{"decision": "final", "answer": "Maria Delgado"}'],
                      usage=Usage(100, 20))
    local = Scripted(['{"answer": "Maria Delgado", "citation": "Maria Delgado"}']
                     + ['{"answer": null}'] * 20, usage=Usage(50, 4))
    worker = LocalWorker([DOCUMENT], model=local, chunk_chars=120)
    events = []
    result = run_minions(remote, in_process({"n1": worker}), QUESTION, ["n1"],
                         citations="none", max_rounds=3, on_event=events.append)
    assert result.answer == "Maria Delgado" and result.rounds == 2
    kinds = [s.kind for s in result.steps]
    assert kinds == ["node.answered", "plan", "node.answered", "round", "plan",
                     "node.answered", "round", "answer"]
    assert [e.kind for e in events] == kinds
    assert result.remote == Usage(400, 80)  # four remote calls
    assert result.local == Usage(50 * len(local.seen), 4 * len(local.seen))
    assert events[-1].remote == result.remote and events[-1].local == result.local
    # the remote side saw the question, metadata and findings: no document text
    seen = "\n".join(m["content"] for call in remote.seen for m in call)
    assert QUESTION in seen and "D1 (node 1)" in seen and "Maria Delgado" in seen
    assert VerbatimGuard([DOCUMENT]).longest_copied_run(seen) <= NONE_MAX_COPIED_WORDS


def test_minions_falls_back_when_the_remote_writes_nonsense():
    remote = Scripted(["I think", "no idea", "hmm", "?"])
    local = Scripted(['{"answer": "1987", "citation": "founded in 1987"}'] * 3)
    result = run_minions(remote, in_process({"n1": LocalWorker([DOCUMENT], model=local)}),
                         "When was it founded?", ["n1"], max_rounds=1)
    assert "default plan" in result.steps[1].message
    assert result.answer == "1987"
    assert result.remote.total > 0  # the failed attempts still count


def test_minion_chat_turns():
    remote = Scripted(['{"decision": "ask", "message": "Which company?"}',
                       '{"decision": "final", "answer": "Maria Delgado"}'])
    local = Scripted(["Maria Delgado runs it.", "Acme Widgets."], usage=Usage(30, 6))
    workers = {"a": LocalWorker([DOCUMENT], model=local), "b": LocalWorker([], model=local)}
    result = run_minion(remote, in_process(workers), QUESTION, ["a", "b"], max_rounds=3)
    assert result.answer == "Maria Delgado" and result.rounds == 2
    assert result.local == Usage(60, 12)  # node b has no documents: not asked to chat
    second = local.seen[1]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert "Question: Which company?" in second[-1]["content"]


@pytest.mark.parametrize("mode", ["minions", "minion", "local-only"])
def test_protocols_with_the_tiny_backend(tiny, mode):
    """Real (noise-writing) models: every path runs, tokens are counted, and nothing the
    remote model received repeats the canary document (citations none, leaky local)."""
    remote = RecordingModel(tiny)
    workers = {"n1": LocalWorker([DOCUMENT], model=Leaky(), chunk_chars=200),
               "n2": LocalWorker(["Nothing to see here. Just a note."], model=tiny)}
    result = ask(mode, "What is counted?", ["n1", "n2"], remote=remote,
                 execute=in_process(workers), citations="none", max_tokens=8)
    assert result.steps[-1].kind == "answer" and result.answer
    assert result.local.total > 0
    if mode == "local-only":
        assert remote.calls == 0 and result.remote == Usage()
    else:
        assert remote.calls >= 2 and result.remote == remote.usage
        assert result.remote.prompt_tokens > 0
    seen = remote.received_text() + json.dumps([s.detail for s in result.steps])
    assert CANARY not in seen
    assert VerbatimGuard([DOCUMENT]).longest_copied_run(seen) <= NONE_MAX_COPIED_WORDS


def test_remote_only_reads_the_documents(tiny):
    """The baseline, for contrast: exactly what Minions avoids."""
    remote = RecordingModel(tiny)
    result = run_remote_only(remote, QUESTION, [DOCUMENT], max_tokens=4)
    assert CANARY in remote.received_text() and result.remote == remote.usage


def test_cancellation_stops_between_calls():
    worker = LocalWorker([DOCUMENT], model=Scripted([]))
    with pytest.raises(AskCancelled):
        worker.handle({"op": "answer", "citations": "none", "question": "q"},
                      should_stop=lambda: True)
    remote = Scripted([])
    with pytest.raises(AskCancelled):
        run_minions(remote, in_process({"n": worker}), QUESTION, ["n"],
                    should_stop=lambda: True)
    assert remote.seen == []


# ------------------------------------------------------------------ the node's worker


def test_node_worker_reads_docs_and_never_names_them(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "b_patient_john_smith.txt").write_text(DOCUMENT)
    (docs / "a_notes.txt").write_text("Short note.")
    (docs / "empty.txt").write_text("  ")
    (docs / "ignored.md").write_text("not a txt")
    worker = MinionWorker(tmp_path, "unused", model=Scripted(['{"answer": null}'] * 10))
    payload, _ = worker.handle(b'{"op": "describe"}')
    reply = json.loads(payload)
    assert [d["id"] for d in reply["documents"]] == ["d0", "d1"]
    assert reply["documents"][1]["chars"] == len(DOCUMENT)
    assert b"john" not in payload and b"notes" not in payload
    (docs / "c.txt").write_text("A third document.")
    assert len(json.loads(worker.handle(b'{"op": "describe"}')[0])["documents"]) == 3
    payload, metrics = worker.handle(json.dumps({"op": "jobs", "citations": "none", "jobs": [
        {"id": 0, "task": "t", "documents": ["d1"], "chunks": "all"}]}).encode())
    assert json.loads(payload)["calls"] == 1 and metrics["local_prompt_tokens"] == 10
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(MinionCancelled):
        worker.handle(b'{"op": "answer", "citations": "none", "question": "q"}', cancelled)
    with pytest.raises(ValueError):
        worker.handle(b'{"op": "exec", "code": "print(1)"}')


# ------------------------------------------------------------------ the coordinator's checks


class _Sessions:
    def __init__(self, ids):
        from confide.coordinator.sessions import NodeSession

        self._sessions = [NodeSession(i) for i in ids]

    def online(self):
        return self._sessions


@pytest.mark.parametrize("request_fields, code", [
    ({"question": "  "}, "INVALID_ARGUMENT"),
    ({"question": "q", "mode": "telepathy"}, "INVALID_ARGUMENT"),
    ({"question": "q", "mode": "remote-only"}, "INVALID_ARGUMENT"),
    ({"question": "q", "citations": "most"}, "INVALID_ARGUMENT"),
    ({"question": "q", "max_rounds": 99}, "INVALID_ARGUMENT"),
    ({"question": "q", "node_ids": ["nope"]}, "FAILED_PRECONDITION"),
])
def test_the_coordinator_rejects_bad_questions(request_fields, code):
    from confide.coordinator.minions import AskOrchestrator, AskRejected
    from confide.v1 import coordinator_pb2 as pb

    orchestrator = AskOrchestrator(_Sessions(["n1"]), "tiny")
    with pytest.raises(AskRejected) as info:
        orchestrator.validate(pb.AskRequest(**request_fields))
    assert info.value.code == code


def test_the_coordinator_defaults():
    from confide.coordinator.minions import AskOrchestrator, AskRejected
    from confide.v1 import coordinator_pb2 as pb

    plan = AskOrchestrator(_Sessions(["n2", "n1"]), "tiny").validate(
        pb.AskRequest(question=" q ", anonymous=True))
    assert (plan.question, plan.mode, plan.citations) == ("q", "minions", "none")
    assert [s.node_id for s in plan.sessions] == ["n1", "n2"]
    with pytest.raises(AskRejected) as info:
        AskOrchestrator(_Sessions([]), "tiny").validate(pb.AskRequest(question="q"))
    assert info.value.code == "FAILED_PRECONDITION"


# ------------------------------------------------------------------ the benchmark's workload


def test_bench_questions_have_verbatim_answers_and_are_deterministic():
    from confide.bench.minions import correct, make_questions, workload

    articles, items = workload(3, 4)
    assert len(articles) == 3 and len({a["label"] for a in articles}) == 3
    assert 6 <= len(items) <= 12
    for item in items:
        text = articles[item["doc"]]["text"]
        assert item["answer"] in text
        assert item["answer"].lower() not in item["question"].lower()
        assert "____" in item["question"]
    assert workload(3, 4) == (articles, items)
    assert make_questions("Title\nNothing to ask here.") == []
    assert correct("It was Maria DELGADO.", "Maria Delgado") and not correct("Maria", "Delgado")


class _FakeSession:
    """A node session whose tasks run a LocalWorker in process (or hang, to be cancelled)."""

    def __init__(self, node_id, worker=None, hang=False):
        self.node_id = node_id
        self.worker = worker
        self.hang = hang
        self.cancelled = False
        self.tasks = []

    async def run_task(self, task, global_payload, timeout, expects_payload=True):
        import asyncio

        from confide.coordinator.sessions import TaskOutcome

        self.tasks.append(task)
        if self.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        payload = json.dumps(self.worker.handle(task.instructions)).encode()
        return TaskOutcome(self.node_id, task.task_id, True, payload=payload)


def _orchestrator(sessions, remote):
    from confide.coordinator.minions import AskOrchestrator

    registry = type("R", (), {"online": lambda self: sessions})()
    return AskOrchestrator(registry, "scripted", load_model=lambda spec: remote)


def test_the_coordinator_streams_an_ask_over_node_sessions():
    import asyncio

    from confide.v1 import coordinator_pb2 as pb

    local = Scripted(['{"answer": "Maria Delgado"}'] * 4)
    sessions = [_FakeSession("a", LocalWorker([DOCUMENT], model=local)),
                _FakeSession("b", LocalWorker(["An unrelated note."], model=local))]
    remote = Scripted(['{"jobs": [{"task": "Find the chief executive"}]}',
                       '{"decision": "final", "answer": "Maria Delgado"}'])
    orchestrator = _orchestrator(sessions, remote)

    async def collect():
        plan = orchestrator.validate(pb.AskRequest(question=QUESTION, citations="none"))
        return [e async for e in orchestrator.run(plan)]

    events = asyncio.run(collect())
    assert [e.kind for e in events][-1] == "answer" and events[-1].answer == "Maria Delgado"
    assert events[-1].remote_prompt_tokens == 20 and events[-1].local_prompt_tokens > 0
    plan_event = next(e for e in events if e.kind == "plan")
    assert json.loads(plan_event.detail_json)["jobs"][0]["task"] == "Find the chief executive"
    task = sessions[0].tasks[-1]
    assert task.kind == pb.MINION and json.loads(task.instructions)["citations"] == "none"


def test_closing_the_ask_stream_cancels_the_node_tasks():
    import asyncio

    from confide.v1 import coordinator_pb2 as pb

    session = _FakeSession("a", hang=True)
    orchestrator = _orchestrator([session], Scripted([]))

    async def first_then_close():
        plan = orchestrator.validate(pb.AskRequest(question=QUESTION))
        stream = orchestrator.run(plan)
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.3)
        task.cancel()  # what grpc does when the caller goes away
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()
        await asyncio.sleep(0.1)
        return orchestrator._turn.locked()

    assert asyncio.run(asyncio.wait_for(first_then_close(), 20)) is False
    assert session.cancelled
