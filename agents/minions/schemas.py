"""What crosses between the roles: JSON data, validated (and repaired where it can be), never
code. The schemas live here and only here (a later grammar-constrained decoder reads them):

    PLAN_SCHEMA          remote -> coordinator: the jobs of one MinionS round
    DECISION_SCHEMA      remote -> coordinator: final | more (MinionS), final | ask (Minion)
    INSTRUCTIONS_SCHEMA  coordinator -> node: a MINION task (describe | jobs | chat | answer)

``parse_plan`` and ``parse_decision`` repair what a small remote model gets wrong instead of
spending remote tokens on re-asking; ``parse_instructions`` is strict, because the node trusts
nobody's JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from confide.agents.minions.config import MAX_JOBS, MAX_QUESTION_CHARS, MAX_ROUNDS_LIMIT
from confide.agents.minions.policy import CITATION_MODES
from confide.agents.minions.text import as_text


class PlanError(ValueError):
    """A plan that cannot be used even after repair."""


_SHORT_TEXT = {"type": "string", "maxLength": 500}

_SELECTOR_CHUNKS = {"oneOf": [{"const": "all"},
                              {"type": "array", "items": {"type": "integer", "minimum": 0},
                               "maxItems": 64}]}

_SELECTOR_DOCS = {"oneOf": [{"const": "all"},
                            {"type": "array", "items": {"type": "string", "maxLength": 16},
                             "maxItems": 64}]}

_PLAN_DOCS = {"oneOf": [{"const": "all"},
                        {"type": "array", "items": {"type": "string", "pattern": "^D[1-9][0-9]*$"},
                         "maxItems": 64}]}

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "jobs": {
            "type": "array", "minItems": 1, "maxItems": MAX_JOBS,
            "items": {
                "type": "object",
                "properties": {
                    "task": {"type": "string", "minLength": 1, "maxLength": 500},
                    "documents": _PLAN_DOCS,
                    "chunks": _SELECTOR_CHUNKS,
                    "advice": _SHORT_TEXT,
                },
                "required": ["task"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["jobs"],
    "additionalProperties": False,
}
"""The remote model's plan: a few jobs, each a task for the local model, the documents and
chunks it runs on ("all" or indices) and advice. Nothing in it is ever executed."""

DECISION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "decision": {"enum": ["final", "more", "ask"]},
        "answer": {"type": "string", "maxLength": 2000},
        "feedback": {"type": "string", "maxLength": 1000},
        "message": {"type": "string", "maxLength": 1000},
    },
    "required": ["decision"],
}
"""The remote model's verdict after reading findings (MinionS: final | more) or a local
reply (Minion: final | ask)."""

# ---- what a model is asked to write (constrained decoding compiles these into grammars):
# every string and array is bounded so that the longest valid answer fits the call's token
# budget (config.py; tests/unit/test_constrained.py checks it), so a constrained answer is
# never cut off. They are subsets of PLAN_SCHEMA / DECISION_SCHEMA above.

PLAN_TASK_CHARS = 80
PLAN_ADVICE_CHARS = 40
PLAN_MAX_CHUNKS = 4
DECISION_ANSWER_CHARS = 60
DECISION_TEXT_CHARS = 80
WORKER_ANSWER_CHARS = 48
WORKER_EXPLANATION_CHARS = 32


def plan_schema(doc_ids: list[str], chunks: int, max_jobs: int) -> dict[str, Any]:
    """The plan one MinionS round may have: at most ``max_jobs`` jobs over the known
    documents (``doc_ids``, an enum: an unknown id cannot be written) and chunks numbered
    below ``chunks``; short tasks and advice. Valid plans by construction, and
    ``PLAN_SCHEMA``-valid."""
    docs: dict[str, Any] = {"anyOf": [{"const": "all"},
                                      {"type": "array", "items": {"enum": list(doc_ids)},
                                       "minItems": 1, "maxItems": min(len(doc_ids), 4)}]}
    selector: dict[str, Any] = {"anyOf": [
        {"const": "all"},
        {"type": "array", "items": {"type": "integer", "minimum": 0,
                                    "maximum": max(chunks - 1, 0)},
         "minItems": 1, "maxItems": PLAN_MAX_CHUNKS}]}
    job = {"type": "object",
           "properties": {"task": {"type": "string", "minLength": 1,
                                   "maxLength": PLAN_TASK_CHARS},
                          "documents": docs, "chunks": selector,
                          "advice": {"type": "string", "maxLength": PLAN_ADVICE_CHARS}},
           "required": ["task", "documents", "chunks", "advice"],
           "additionalProperties": False}
    return {"type": "object",
            "properties": {"jobs": {"type": "array", "items": job, "minItems": 1,
                                    "maxItems": max(1, min(max_jobs, MAX_JOBS))}},
            "required": ["jobs"], "additionalProperties": False}


def decision_schema(follow_up: str) -> dict[str, Any]:
    """The remote model's verdict: ``{"decision": "final", "answer"}`` or, with
    ``follow_up`` "more" (MinionS) or "ask" (Minion), ``{"decision": "more", "feedback"}`` /
    ``{"decision": "ask", "message"}``."""
    field_name = {"more": "feedback", "ask": "message"}[follow_up]
    return {"anyOf": [
        {"type": "object",
         "properties": {"decision": {"const": "final"},
                        "answer": {"type": "string", "maxLength": DECISION_ANSWER_CHARS}},
         "required": ["decision", "answer"], "additionalProperties": False},
        {"type": "object",
         "properties": {"decision": {"const": follow_up},
                        field_name: {"type": "string", "minLength": 1,
                                     "maxLength": DECISION_TEXT_CHARS}},
         "required": ["decision", field_name], "additionalProperties": False}]}


WORKER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"anyOf": [{"type": "string", "minLength": 1,
                                         "maxLength": WORKER_ANSWER_CHARS},
                                        {"type": "null"}]},
                   "explanation": {"type": "string", "maxLength": WORKER_EXPLANATION_CHARS}},
    "required": ["answer", "explanation"],
    "additionalProperties": False,
}
"""A local model's finding on one chunk: a short answer copied from it, or null (its own
"no answer": such outputs stay on the node)."""

_JOB_INSTRUCTION = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "task": {"type": "string", "minLength": 1, "maxLength": 500},
        "advice": _SHORT_TEXT,
        "documents": _SELECTOR_DOCS,
        "chunks": _SELECTOR_CHUNKS,
    },
    "required": ["id", "task", "documents", "chunks"],
    "additionalProperties": False,
}

_CITATIONS = {"enum": list(CITATION_MODES)}
#: a cap on the local model's output per call (the coordinator may ask for shorter outputs)
_MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": 1024}

INSTRUCTIONS_SCHEMA: dict[str, Any] = {
    "oneOf": [
        {"type": "object", "properties": {"op": {"const": "describe"}},
         "required": ["op"], "additionalProperties": False},
        {"type": "object",
         "properties": {"op": {"const": "jobs"}, "round": {"type": "integer", "minimum": 0},
                        "citations": _CITATIONS, "max_tokens": _MAX_TOKENS,
                        "jobs": {"type": "array", "minItems": 1, "maxItems": MAX_JOBS,
                                 "items": _JOB_INSTRUCTION}},
         "required": ["op", "citations", "jobs"], "additionalProperties": False},
        {"type": "object",
         "properties": {"op": {"const": "chat"}, "citations": _CITATIONS,
                        "max_tokens": _MAX_TOKENS,
                        "message": {"type": "string", "minLength": 1, "maxLength": 4000},
                        "history": {"type": "array", "maxItems": 2 * MAX_ROUNDS_LIMIT + 2,
                                    "items": {"type": "object",
                                              "properties": {
                                                  "role": {"enum": ["remote", "local"]},
                                                  "content": {"type": "string",
                                                              "maxLength": 4000}},
                                              "required": ["role", "content"],
                                              "additionalProperties": False}}},
         "required": ["op", "citations", "message"], "additionalProperties": False},
        {"type": "object",
         "properties": {"op": {"const": "answer"}, "citations": _CITATIONS,
                        "max_tokens": _MAX_TOKENS,
                        "question": {"type": "string", "minLength": 1,
                                     "maxLength": MAX_QUESTION_CHARS}},
         "required": ["op", "citations", "question"], "additionalProperties": False},
    ],
}
"""What the coordinator may ask of a node in a MINION task (``Task.instructions``)."""

_INSTRUCTIONS_VALIDATOR = jsonschema.Draft202012Validator(INSTRUCTIONS_SCHEMA)
_PLAN_VALIDATOR = jsonschema.Draft202012Validator(PLAN_SCHEMA)


def parse_instructions(data: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
    """Decode and validate a MINION task's instructions; ValueError names what is wrong."""
    if isinstance(data, bytes | str):
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"MINION instructions are not JSON: {exc}") from None
    else:
        obj = dict(data)
    if not isinstance(obj, dict):
        raise ValueError("MINION instructions must be a JSON object")
    errors = sorted(_INSTRUCTIONS_VALIDATOR.iter_errors(obj), key=lambda e: e.path)
    if errors:
        op = obj.get("op")
        if op not in ("describe", "jobs", "chat", "answer"):
            raise ValueError(f"unknown MINION op {op!r}: expected describe, jobs, chat or answer")
        # name the failing field of the branch that matches the op
        branch = {"describe": 0, "jobs": 1, "chat": 2, "answer": 3}[op]
        sub = jsonschema.Draft202012Validator(INSTRUCTIONS_SCHEMA["oneOf"][branch])
        detail = next(iter(sub.iter_errors(obj)), errors[0])
        where = "/".join(str(p) for p in detail.absolute_path) or "(top)"
        raise ValueError(f"invalid MINION instructions at {where}: {detail.message[:200]}")
    return obj


@dataclass(frozen=True)
class DocumentInfo:
    """What the remote side may know about a document: never its name or its text."""

    doc_id: str
    chars: int
    words: int
    chunks: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.doc_id, "chars": self.chars, "words": self.words,
                "chunks": self.chunks}


@dataclass(frozen=True)
class Job:
    task: str
    advice: str = ""
    documents: str | tuple[str, ...] = "all"
    chunks: str | tuple[int, ...] = "all"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "advice": self.advice,
                "documents": self.documents if self.documents == "all" else list(self.documents),
                "chunks": self.chunks if self.chunks == "all" else list(self.chunks)}


def default_plan(question: str) -> list[Job]:
    """The fallback when the remote model writes no usable plan: the question itself, on every
    chunk of every document."""
    return [Job(task=question[:500], advice="Answer only from the excerpt.")]


def parse_plan(obj: Any, documents: Mapping[str, int], *,
               max_jobs: int = MAX_JOBS) -> tuple[list[Job], list[str]]:
    """Validate a remote model's plan against ``PLAN_SCHEMA`` and the known ``documents``
    (id -> chunk count), repairing what can be repaired: a bare job or a bare list of jobs,
    unknown keys (dropped), ``doc``/``chunk`` spellings, numbers as strings, unknown
    documents and out-of-range chunks (dropped), too many jobs (cut). Returns the jobs and
    notes on every repair; raises PlanError when no job survives. Nothing is executed: the
    fields are text the local model reads."""
    notes: list[str] = []
    if isinstance(obj, list):
        obj, _ = {"jobs": obj}, notes.append("plan was a bare list of jobs")
    elif isinstance(obj, dict) and "jobs" not in obj and "task" in obj:
        obj, _ = {"jobs": [obj]}, notes.append("plan was a single job")
    if not isinstance(obj, dict) or not isinstance(obj.get("jobs"), list):
        raise PlanError("a plan is a JSON object with a list of jobs")
    if not _PLAN_VALIDATOR.is_valid(obj):
        notes.append("plan did not match the schema; repaired")
    jobs: list[Job] = []
    for index, raw in enumerate(obj["jobs"]):
        if isinstance(raw, str):
            raw = {"task": raw}
        if not isinstance(raw, dict):
            notes.append(f"job {index}: not an object; dropped")
            continue
        task = as_text(raw.get("task") or raw.get("instruction") or raw.get("question"), 500)
        if not task:
            notes.append(f"job {index}: no task; dropped")
            continue
        unknown = set(raw) - {"task", "documents", "chunks", "advice", "document", "doc",
                              "docs", "chunk", "instruction", "question"}
        if unknown:
            notes.append(f"job {index}: ignored unknown field(s) {', '.join(sorted(unknown))}")
        docs = _select_docs(raw.get("documents", raw.get("docs", raw.get(
            "document", raw.get("doc", "all")))), documents, notes, index)
        if not docs:
            continue
        chunks = _select_chunks(raw.get("chunks", raw.get("chunk", "all")), documents, docs,
                                notes, index)
        if not chunks:
            continue
        jobs.append(Job(task=task, advice=as_text(raw.get("advice"), 500), documents=docs,
                        chunks=chunks))
    if len(jobs) > max_jobs:
        notes.append(f"{len(jobs)} jobs; kept the first {max_jobs}")
        jobs = jobs[:max_jobs]
    if not jobs:
        raise PlanError("no usable job in the plan: " + "; ".join(notes[-3:]))
    return jobs, notes


def _select_docs(value: Any, documents: Mapping[str, int], notes: list[str],
                 index: int) -> str | tuple[str, ...]:
    if value in ("all", None, "", "*") or (isinstance(value, list) and not value):
        return "all"
    values = value if isinstance(value, list) else [value]
    known = {d.lower(): d for d in documents}
    picked = []
    for v in values:
        key = str(v).strip().lower()
        if key.isdigit():  # "1" for D1
            key = f"d{key}"
        if key in known and known[key] not in picked:
            picked.append(known[key])
        else:
            notes.append(f"job {index}: unknown document {str(v)[:16]!r} dropped")
    if not picked:
        notes.append(f"job {index}: no known document; dropped")
        return ()
    return tuple(picked)


def _select_chunks(value: Any, documents: Mapping[str, int], docs: str | tuple[str, ...],
                   notes: list[str], index: int) -> str | tuple[int, ...]:
    if value in ("all", None, "", "*") or (isinstance(value, list) and not value):
        return "all"
    values = value if isinstance(value, list) else [value]
    most = max((documents[d] for d in (documents if docs == "all" else docs)), default=0)
    picked: list[int] = []
    for v in values:
        try:
            number = int(str(v).strip())
        except ValueError:
            notes.append(f"job {index}: chunk {str(v)[:16]!r} is not a number; dropped")
            continue
        if 0 <= number < most and number not in picked:
            picked.append(number)
        else:
            notes.append(f"job {index}: chunk {number} out of range; dropped")
    if not picked:
        notes.append(f"job {index}: no valid chunk; dropped")
        return ()
    return tuple(picked)


def parse_decision(obj: Any) -> dict[str, str]:
    """The remote model's verdict as {"decision": final|more|ask, "answer", "feedback",
    "message"}, from whatever JSON it wrote: a missing decision with an answer is final, one
    with feedback or a message asks for more; anything else is an empty final."""
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        obj = obj[0]
    if not isinstance(obj, dict):
        return {"decision": "final", "answer": "", "feedback": "", "message": ""}
    fields = {k: as_text(obj.get(k), 2000) for k in ("answer", "feedback", "message")}
    decision = str(obj.get("decision") or "").strip().lower()
    if decision not in ("final", "more", "ask"):
        decision = ("final" if fields["answer"] else
                    "ask" if fields["message"] else "more" if fields["feedback"] else "final")
    return {"decision": decision, **fields}
