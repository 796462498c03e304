"""The remote side of Minions: the protocols, run by whoever holds the remote model (the
coordinator over MINION tasks, the benchmark in process).

MinionS (``run_minions``), the decomposition protocol::

    1. describe   every node: metadata of its documents; global ids D1.. map to (node, d0..)
    for round r = 1 .. max_rounds:
    2. plan       remote: question + metadata + scratchpad -> PLAN_SCHEMA jobs, repaired by
                  parse_plan; no usable plan -> the question itself on every chunk
    3. run        every node holding a selected document: the jobs on its chunks, in parallel
                  (worker.LocalWorker.run_jobs), findings after the node's citation policy
    4. aggregate  remote: question + findings (one line per distinct answer, grounded and most
                  supported first, at most MAX_FINDINGS) -> final answer, or "more" with
                  feedback into the scratchpad (another round, unless this was the last)
    answer: the remote model's, else the majority of the grounded findings

Minion (``run_minion``), the single-chat protocol: the question goes to each node's local
model, which reads its documents whole (or the most relevant parts that fit its context); the
remote model reads the replies and either asks a follow-up (sent to the local models, with the
conversation so far) or answers. ``local-only`` is the local model alone (no remote tokens);
``remote-only`` is the remote model reading the documents itself, the quality baseline: it
exists only in process (the benchmark), because it sends the documents to the remote side.

Privacy: the remote side receives the question, document metadata and the nodes' structured
outputs (after the citation policy, ``policy.py``), nothing else. ``RecordingModel`` keeps
every message the remote model was sent, so a test can check exactly that."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from confide.agents.constrained import token_bound
from confide.agents.minions.config import (
    DAEMON_MODES,
    DEFAULT_MAX_ROUNDS,
    LOCAL_CHAT_TOKENS,
    MAX_ANSWER_CHARS,
    MAX_FINDINGS,
    MAX_QUESTION_CHARS,
    MAX_REPLY_CHARS,
    MAX_ROUNDS_LIMIT,
    NO_ANSWER,
    REMOTE_DECISION_TOKENS,
    REMOTE_PLAN_TOKENS,
    AskCancelled,
)
from confide.agents.minions.schemas import (
    PlanError,
    decision_schema,
    default_plan,
    parse_decision,
    parse_plan,
    plan_schema,
)
from confide.agents.minions.text import is_abstention, normalized, trim_words
from confide.agents.model import (
    ChatModel,
    Completion,
    Message,
    Usage,
    forward_chat,
    supports_schema,
)

Executor = Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]
"""Runs one instruction per node (in parallel) and returns each node's reply; a node that
failed answers ``{"error": "reason"}``."""


class RecordingModel:
    """Wraps the remote model: counts its tokens and keeps every message it was sent, so a
    test (or an auditor) can inspect everything the remote side received."""

    def __init__(self, inner: ChatModel) -> None:
        self.inner = inner
        self.name = inner.name
        self.usage = Usage()
        self.calls = 0
        self.received: list[list[Message]] = []

    @property
    def structured_output(self) -> bool:
        return supports_schema(self.inner)

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0, schema: dict[str, Any] | None = None) -> Completion:
        self.received.append([dict(m) for m in messages])
        completion = forward_chat(self.inner, messages, max_tokens, temperature, schema)
        self.calls += 1
        self.usage = self.usage + completion.usage
        return completion

    def received_text(self) -> str:
        return "\n".join(m.get("content", "") for msgs in self.received for m in msgs)


@dataclass
class AskStep:
    """One event of a question's progress (the coordinator streams them as AskEvents).
    ``remote``/``local`` are the tokens spent so far."""

    kind: str  # plan | node.answered | round | answer | error
    message: str = ""
    node_id: str = ""
    answer: str = ""
    detail: Any = None
    remote: Usage = field(default_factory=Usage)
    local: Usage = field(default_factory=Usage)


@dataclass
class Structured:
    """How many structured (JSON) calls each side made and how many answered, as written,
    with JSON valid against the call's schema (no repair, no re-ask)."""

    remote_calls: int = 0
    remote_valid: int = 0
    local_calls: int = 0
    local_valid: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"remote_calls": self.remote_calls, "remote_valid": self.remote_valid,
                "local_calls": self.local_calls, "local_valid": self.local_valid}


@dataclass
class AskResult:
    mode: str
    answer: str
    rounds: int
    remote: Usage
    local: Usage
    steps: list[AskStep]
    citations: str = "allow"
    structured: Structured = field(default_factory=Structured)


class _Run:
    """State shared by the protocols: token meters, events, cancellation."""

    def __init__(self, mode: str, remote: ChatModel | None, execute: Executor | None,
                 on_event: Callable[[AskStep], None] | None,
                 should_stop: Callable[[], bool] | None, max_tokens: int = 0) -> None:
        self.mode = mode
        #: a cap on every generation (remote and local), 0 for the protocol's defaults
        self.max_tokens = max_tokens
        self.remote = RecordingModel(remote) if remote is not None else None
        self.execute_fn = execute
        self.local = Usage()
        self.steps: list[AskStep] = []
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.structured = Structured()

    def tokens(self, default: int) -> int:
        return min(default, self.max_tokens) if self.max_tokens else default

    def instruct(self, request: dict[str, Any]) -> dict[str, Any]:
        """A node instruction, with the generation cap when there is one."""
        return {**request, "max_tokens": self.max_tokens} if self.max_tokens else request

    @property
    def remote_usage(self) -> Usage:
        return self.remote.usage if self.remote is not None else Usage()

    def emit(self, kind: str, message: str = "", *, node_id: str = "", answer: str = "",
             detail: Any = None) -> None:
        step = AskStep(kind, message, node_id, answer, detail, self.remote_usage, self.local)
        self.steps.append(step)
        if self.on_event is not None:
            self.on_event(step)

    def check(self) -> None:
        if self.should_stop():
            raise AskCancelled("the question was withdrawn")

    def execute(self, requests: dict[str, dict[str, Any]], what: str) -> dict[str, dict]:
        """Send instructions to nodes; account for their local tokens; report each reply."""
        self.check()
        assert self.execute_fn is not None
        replies = self.execute_fn(requests)
        for node_id in requests:
            reply = replies.get(node_id) or {"error": "no reply"}
            if not isinstance(reply, dict):
                reply = {"error": "reply is not a JSON object"}
            replies[node_id] = reply
            usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
            self.local = self.local + Usage(_count(usage.get("prompt_tokens")),
                                            _count(usage.get("completion_tokens")))
            if "outputs" in reply:  # MinionS jobs: structured local calls
                self.structured.local_calls += _count(reply.get("calls"))
                self.structured.local_valid += _count(reply.get("valid"))
            if "error" in reply:
                self.emit("node.answered", f"{what}: failed: {str(reply['error'])[:300]}",
                          node_id=node_id, detail=reply)
            else:
                self.emit("node.answered", f"{what}: {_summary(reply)}", node_id=node_id,
                          detail=reply)
        self.check()
        return replies

    def result(self, answer: str, rounds: int, citations: str) -> AskResult:
        self.emit("answer", f"answered after {rounds} round(s)", answer=answer)
        return AskResult(self.mode, answer, rounds, self.remote_usage, self.local, self.steps,
                         citations, self.structured)

    def ask_remote(self, messages: list[Message], schema: dict[str, Any], max_tokens: int,
                   retries: int) -> Any:
        """The remote model's JSON reply for ``schema``, or None. Constrained to the schema
        when the remote model can be (a local model's grammar, a server's structured output):
        valid by construction. Otherwise, or if it still fails (cut off), the repaired JSON
        of its last answer, for ``parse_plan``/``parse_decision`` to repair further instead of
        spending remote tokens on re-asking (``retries`` re-asks first). A failing remote
        model (``ModelError``) propagates."""
        from confide.agents.jsonrepair import (
            AskJSONError,
            JSONRepairError,
            ask_json_reply,
            strictly_valid,
        )
        from confide.agents.jsonrepair import extract_json as repair

        assert self.remote is not None
        self.structured.remote_calls += 1
        # unconstrained: any JSON will do here (re-ask only when there is none at all)
        constrained = supports_schema(self.remote)
        try:
            reply = ask_json_reply(self.remote, messages, schema if constrained else _ANY_JSON,
                                   retries, max_tokens=max_tokens, instruct=False)
        except AskJSONError as exc:
            try:
                return repair(exc.last_text)
            except JSONRepairError:
                return None
        self.structured.remote_valid += reply.attempts == 1 and strictly_valid(
            reply.text, _validator(schema))
        return reply.value


def _count(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _summary(reply: Mapping[str, Any]) -> str:
    if "documents" in reply:
        docs = reply["documents"] if isinstance(reply["documents"], list) else []
        chars = sum(_count(d.get("chars")) for d in docs if isinstance(d, dict))
        return f"{len(docs)} document(s), {chars:,} characters"
    if "outputs" in reply:
        return (f"{len(reply['outputs'])} finding(s) from {_count(reply.get('calls'))} "
                f"local call(s), {_count(reply.get('abstained'))} abstained")
    if "reply" in reply:
        return f"replied ({len(str(reply['reply']))} characters)"
    if "answer" in reply:
        return "answered" if reply["answer"] else "found no answer"
    return "replied"


_ANY_JSON: dict[str, Any] = {"type": ["object", "array"]}
_VALIDATORS: dict[str, Draft202012Validator] = {}


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        _VALIDATORS[key] = Draft202012Validator(schema)
    return _VALIDATORS[key]


def majority_answer(answers: Iterable[tuple[str, bool]]) -> str:
    """The most frequent answer, grounded answers first; ties go to the first seen."""
    answers = [(a.strip(), g) for a, g in answers if isinstance(a, str) and a.strip()]
    for pool in ([a for a, g in answers if g], [a for a, _ in answers]):
        if pool:
            counts = Counter(normalized(a) for a in pool)
            best = max(counts.values())
            return next(a for a in pool if counts[normalized(a)] == best)
    return ""


def _describe(run: _Run, nodes: Sequence[str]) -> tuple[dict[str, tuple[str, str]],
                                                         dict[str, int], list[str]]:
    """Ask every node for its documents' metadata; global ids D1.. map to (node, local id)."""
    replies = run.execute({n: {"op": "describe"} for n in nodes}, "documents")
    mapping: dict[str, tuple[str, str]] = {}
    chunks: dict[str, int] = {}
    lines = []
    for position, node_id in enumerate(nodes, start=1):
        docs = replies[node_id].get("documents")
        for doc in docs if isinstance(docs, list) else []:
            if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
                continue
            gid = f"D{len(mapping) + 1}"
            mapping[gid] = (node_id, doc["id"][:16])
            chunks[gid] = _count(doc.get("chunks"))
            lines.append(f"{gid} (node {position}): {_count(doc.get('chars')):,} characters, "
                         f"{_count(doc.get('words')):,} words, {chunks[gid]} chunk(s) "
                         f"numbered 0-{max(chunks[gid] - 1, 0)}")
    return mapping, chunks, lines


PLAN_SYSTEM = (
    "You plan work for small worker models that read private documents you cannot see. "
    "Each job is a simple extraction task that a worker runs on every selected chunk of "
    "every selected document. Reply with JSON only, like "
    '{"jobs": [{"task": "Find the name of the company that ...", "documents": "all", '
    '"chunks": "all", "advice": "Look for ..."}]}'
)

AGGREGATE_SYSTEM = (
    "You answer a question using findings reported by worker models that read private "
    "documents you cannot see. Findings marked [in text] use words found in the document. "
    'Reply with JSON only: {"decision": "final", "answer": "the short answer"} or, when the '
    'findings are not enough, {"decision": "more", "feedback": "what to look for next"}.'
)

MINION_SYSTEM = (
    "You answer a question about private documents you cannot see. An assistant who reads "
    "them answers your questions. Reply with JSON only: "
    '{"decision": "final", "answer": "the short answer"} when you know the answer, or '
    '{"decision": "ask", "message": "one simple question for the assistant"}.'
)


def _findings_text(findings: Sequence[tuple[str, Mapping[str, Any]]], limit: int) -> str:
    """The findings as the remote model reads them: one line per distinct answer (with how
    many chunks gave it and where), grounded answers and the most supported first, one short
    citation and explanation each. Compact on purpose: these are remote tokens."""
    groups: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for gid, o in findings:
        groups.setdefault(normalized(str(o.get("answer") or "")), []).append((gid, o))
    ordered = sorted(groups.values(), key=lambda g: (not any(o.get("grounded") for _, o in g),
                                                      -len(g)))[:limit]
    lines = []
    for i, group in enumerate(ordered, start=1):
        gid, first = group[0]
        where = ", ".join(dict.fromkeys(f"{g} chunk {_count(o.get('chunk'))}"
                                        for g, o in group[:3]))
        line = (f"{i}. {json.dumps(str(first.get('answer'))[:MAX_ANSWER_CHARS])} from {where}"
                + (f" (+{len(group) - 3} more)" if len(group) > 3 else "")
                + (" [in text]" if any(o.get("grounded") for _, o in group) else ""))
        cited = next((str(o["citation"]) for _, o in group if o.get("citation")), "")
        if cited:
            line += f"; citation {json.dumps(trim_words(cited, 25, str(first.get('answer'))))}"
        why = next((str(o["explanation"]) for _, o in group if o.get("explanation")), "")
        if why:
            line += f"; why {json.dumps(why[:120])}"
        lines.append(line)
    return "\n".join(lines) if lines else "(no worker found anything)"


def run_minions(remote: ChatModel, execute: Executor, question: str, nodes: Sequence[str], *,
                citations: str = "allow", max_rounds: int = DEFAULT_MAX_ROUNDS,
                max_jobs: int = 3, retries: int = 1, max_tokens: int = 0,
                on_event: Callable[[AskStep], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> AskResult:
    """MinionS: plan jobs (remote) -> run them on chunks (nodes) -> aggregate (remote).
    ``max_tokens`` caps every generation, remote and local (0: the defaults)."""
    run = _Run("minions", remote, execute, on_event, should_stop, max_tokens)
    assert run.remote is not None
    mapping, chunks, doc_lines = _describe(run, nodes)
    if not mapping:
        run.emit("error", "no node has documents (a node reads <data dir>/docs/*.txt)")
        return run.result(NO_ANSWER, 0, citations)
    scratchpad: list[str] = []
    all_findings: list[tuple[str, dict]] = []
    answer = ""
    rounds = 0
    for rounds in range(1, max(1, max_rounds) + 1):
        # 1. plan
        prompt = (f"Question: {question}\nDocuments:\n" + "\n".join(doc_lines)
                  + (("\nEarlier rounds:\n" + "\n".join(scratchpad)) if scratchpad else "")
                  + f"\nWrite at most {max_jobs} jobs.")
        schema = plan_schema(list(mapping), max(chunks.values()), max_jobs)
        budget = min(token_bound(schema) or REMOTE_PLAN_TOKENS, REMOTE_PLAN_TOKENS)
        obj = run.ask_remote([{"role": "system", "content": PLAN_SYSTEM},
                              {"role": "user", "content": prompt}], schema,
                             run.tokens(budget), retries)
        try:
            if obj is None:
                raise PlanError("the remote model wrote no valid JSON plan")
            jobs, notes = parse_plan(obj, chunks, max_jobs=max_jobs)
        except PlanError as exc:
            jobs, notes = default_plan(question), [f"{exc}; using the default plan"]
        run.emit("plan", f"round {rounds}: {len(jobs)} job(s)"
                 + (f" ({'; '.join(notes[:3])})" if notes else ""),
                 detail={"round": rounds, "jobs": [j.to_dict() for j in jobs], "notes": notes})
        # 2. run on the nodes that hold selected documents
        requests: dict[str, dict[str, Any]] = {}
        for j, job in enumerate(jobs):
            selected = list(mapping) if job.documents == "all" else list(job.documents)
            for node_id in nodes:
                local = [mapping[g][1] for g in selected if mapping[g][0] == node_id]
                if not local:
                    continue
                request = requests.setdefault(node_id, run.instruct(
                    {"op": "jobs", "round": rounds, "citations": citations, "jobs": []}))
                request["jobs"].append({
                    "id": j, "task": job.task, "advice": job.advice,
                    "documents": "all" if job.documents == "all" else local,
                    "chunks": job.chunks if job.chunks == "all" else list(job.chunks)})
        replies = run.execute(requests, f"round {rounds}")
        reverse = {v: k for k, v in mapping.items()}
        findings = []
        for node_id, reply in replies.items():
            for o in reply.get("outputs", []) if isinstance(reply.get("outputs"), list) else []:
                if isinstance(o, dict) and o.get("answer"):
                    gid = reverse.get((node_id, str(o.get("doc"))), "D?")
                    findings.append((gid, o))
        all_findings.extend(findings)
        # 3. aggregate
        last = rounds >= max_rounds
        prompt = (f"Question: {question}\nFindings (round {rounds}):\n"
                  + _findings_text(findings, MAX_FINDINGS)
                  + ("\nThis is the last round: decide final." if last else ""))
        decision = parse_decision(run.ask_remote(
            [{"role": "system", "content": AGGREGATE_SYSTEM},
             {"role": "user", "content": prompt}], decision_schema("more"),
            run.tokens(REMOTE_DECISION_TOKENS), retries))
        verdict = decision["decision"]
        proposed = decision["answer"]
        if verdict == "more" and not last:
            feedback = (decision["feedback"] or decision["message"])[:500]
            scratchpad.append(f"round {rounds}: {len(findings)} finding(s)"
                              + (f"; best: {majority_answer(_pairs(findings))}" if findings
                                 else "") + (f"; missing: {feedback}" if feedback else ""))
            run.emit("round", f"round {rounds}: the remote model asks for another round"
                     + (f": {feedback}" if feedback else ""),
                     detail={"round": rounds, "decision": decision})
            continue
        answer = proposed if proposed and not is_abstention(proposed) else (
            majority_answer(_pairs(all_findings)))
        how = ("the remote model's answer" if answer == proposed else
               "no usable remote answer: majority of the findings")
        run.emit("round", f"round {rounds}: final ({how})",
                 detail={"round": rounds, "decision": decision})
        break
    return run.result(answer or NO_ANSWER, rounds, citations)


def _pairs(findings: Sequence[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, bool]]:
    return [(str(o.get("answer") or ""), bool(o.get("grounded"))) for _, o in findings]


def run_minion(remote: ChatModel, execute: Executor, question: str, nodes: Sequence[str], *,
               citations: str = "allow", max_rounds: int = DEFAULT_MAX_ROUNDS,
               retries: int = 1, max_tokens: int = 0,
               on_event: Callable[[AskStep], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> AskResult:
    """Minion: the local models read the documents and chat with the remote model, which asks
    follow-ups until it can answer. The question opens the chat (no remote tokens for it)."""
    run = _Run("minion", remote, execute, on_event, should_stop, max_tokens)
    assert run.remote is not None
    mapping, _, doc_lines = _describe(run, nodes)
    holders = [n for n in nodes if any(m[0] == n for m in mapping.values())]
    if not holders:
        run.emit("error", "no node has documents (a node reads <data dir>/docs/*.txt)")
        return run.result(NO_ANSWER, 0, citations)
    histories: dict[str, list[dict[str, str]]] = {n: [] for n in holders}
    conversation: list[Message] = [{"role": "system", "content": MINION_SYSTEM}]
    intro = (f"Question: {question}\nDocuments:\n" + "\n".join(doc_lines)
             + "\nThe assistant was asked the question. It replied:\n")
    message = question
    replies_seen: list[tuple[str, bool]] = []
    rounds = 0
    answer = ""
    for rounds in range(1, max(1, max_rounds) + 1):
        replies = run.execute({n: run.instruct({"op": "chat", "citations": citations,
                                                "message": message, "history": histories[n]})
                               for n in holders}, f"turn {rounds}")
        lines = []
        for position, node_id in enumerate(holders, start=1):
            text = str(replies[node_id].get("reply") or "")[:MAX_REPLY_CHARS]
            if "error" in replies[node_id] or not text:
                continue
            histories[node_id] += [{"role": "remote", "content": message},
                                   {"role": "local", "content": text}]
            lines.append(f"Assistant on node {position}: {text}")
            if not is_abstention(text):
                replies_seen.append((text, False))
        conversation.append({"role": "user", "content": (intro if rounds == 1 else "")
                             + ("\n".join(lines) or "(no reply)")})
        last = rounds >= max_rounds
        if last:
            conversation[-1]["content"] += "\nThis is the last turn: decide final."
        decision = parse_decision(run.ask_remote(conversation, decision_schema("ask"),
                                                 run.tokens(REMOTE_DECISION_TOKENS), retries))
        conversation.append({"role": "assistant", "content": json.dumps(
            {k: v for k, v in decision.items() if v})})
        follow_up = (decision["message"] or decision["feedback"]).strip()
        if decision["decision"] in ("ask", "more") and follow_up and not last:
            message = follow_up[:1000]
            run.emit("round", f"turn {rounds}: the remote model asks: {message}",
                     detail={"round": rounds, "decision": decision})
            continue
        proposed = decision["answer"]
        answer = proposed if proposed and not is_abstention(proposed) else (
            majority_answer(replies_seen))
        how = ("the remote model's answer" if answer == proposed else
               "no usable remote answer: the local replies")
        run.emit("round", f"turn {rounds}: final ({how})",
                 detail={"round": rounds, "decision": decision})
        break
    return run.result(answer or NO_ANSWER, rounds, citations)


def run_local_only(execute: Executor, question: str, nodes: Sequence[str], *,
                   citations: str = "allow", max_tokens: int = 0,
                   on_event: Callable[[AskStep], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, **_: Any) -> AskResult:
    """The local model alone: each node answers from its documents; the most frequent answer
    wins. No remote tokens."""
    run = _Run("local-only", None, execute, on_event, should_stop, max_tokens)
    replies = run.execute({n: run.instruct({"op": "answer", "citations": citations,
                                            "question": question}) for n in nodes}, "answer")
    answers = [(str(r.get("answer") or ""), False) for r in replies.values() if "error" not in r]
    return run.result(majority_answer(answers) or NO_ANSWER, 1, citations)


REMOTE_ONLY_SYSTEM = "Answer the question from the documents. Give a short answer."


def run_remote_only(remote: ChatModel, question: str, documents: Sequence[str], *,
                    max_tokens: int = LOCAL_CHAT_TOKENS,
                    on_event: Callable[[AskStep], None] | None = None) -> AskResult:
    """The baseline: the remote model reads the documents itself. In process only: it is
    exactly what Minions avoids (the documents leave their owners)."""
    run = _Run("remote-only", remote, None, on_event, None)
    assert run.remote is not None
    text = "\n\n".join(f"Document D{i}:\n{d}" for i, d in enumerate(documents, start=1))
    completion = run.remote.chat([{"role": "system", "content": REMOTE_ONLY_SYSTEM},
                                  {"role": "user", "content": f"{text}\n\nQuestion: {question}"}],
                                 max_tokens=max_tokens)
    return run.result(completion.text.strip() or NO_ANSWER, 1, "allow")


def validate_question(question: str) -> str:
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question has {len(question)} characters; at most "
                         f"{MAX_QUESTION_CHARS}")
    return question


def ask(mode: str, question: str, nodes: Sequence[str], *, remote: ChatModel | None,
        execute: Executor, citations: str = "allow", max_rounds: int = 0,
        on_event: Callable[[AskStep], None] | None = None,
        should_stop: Callable[[], bool] | None = None, **options: Any) -> AskResult:
    """Run ``question`` in ``mode`` (one of ``DAEMON_MODES``) over the ``nodes``."""
    question = validate_question(question)
    rounds = max_rounds or DEFAULT_MAX_ROUNDS
    if rounds > MAX_ROUNDS_LIMIT:
        raise ValueError(f"max_rounds is at most {MAX_ROUNDS_LIMIT}, got {max_rounds}")
    if mode == "local-only":
        return run_local_only(execute, question, nodes, citations=citations,
                              on_event=on_event, should_stop=should_stop, **options)
    if remote is None:
        raise ValueError(f"mode {mode} needs a remote model")
    if mode == "minions":
        return run_minions(remote, execute, question, nodes, citations=citations,
                           max_rounds=rounds, on_event=on_event, should_stop=should_stop,
                           **options)
    if mode == "minion":
        return run_minion(remote, execute, question, nodes, citations=citations,
                          max_rounds=rounds, on_event=on_event, should_stop=should_stop,
                          **options)
    raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(DAEMON_MODES)}")
