"""Minions (Narayan et al. 2025, "Cost-efficient Collaboration Between On-device and Cloud
Language Models"): a remote model that never reads the documents works with local models that
do, so most of the tokens are read where the data lives.

The algorithm box, as this module runs it (MinionS, the decomposition protocol)::

    nodes describe their documents:  metadata only (opaque ids D1.., sizes, chunk counts)
    for round r = 1 .. max_rounds:
        remote: plan jobs             question + metadata + scratchpad -> JSON (PLAN_SCHEMA):
                                      [{task, documents, chunks, advice}]   (data, never code)
        nodes:  run every job on every selected chunk of their own documents with the local
                model, in parallel across nodes; each (job, chunk) gives
                {answer, explanation, citation} or abstains; abstentions are dropped, the
                citation policy is applied on the node, the rest goes up
        remote: aggregate             question + findings -> {"decision": "final", "answer"}
                                      or {"decision": "more", "feedback"} (another round)
    answer

Minion (the single-chat protocol): the question goes to each node's local model, which reads
its documents whole (or the most relevant parts that fit its context); the remote model reads
the replies and either asks a follow-up (sent to the local models, with the conversation so
far) or answers. ``local-only`` is the local model alone (no remote tokens); ``remote-only``
is the remote model reading the documents itself, the quality baseline: it exists only in
process (the benchmark), because it sends the documents to the remote side.

Privacy: the remote side receives the question, document metadata and the nodes' structured
outputs, nothing else. Those outputs are derived from the documents, so the node applies a
citation policy before anything leaves it (``CitationPolicy``): ``allow`` (citations up to
``ALLOW_CITATION_WORDS`` words), ``short`` (at most ``SHORT_CITATION_WORDS`` words, and no
longer verbatim run anywhere in the output) or ``none`` (no citations, and no run of more than
``NONE_MAX_COPIED_WORDS`` consecutive document words in any field). Anonymous questions default
to ``none``. The policy is enforced where the data is: a node never trusts the coordinator to
trim what it sends.

Everything here is pure logic over ``agents.model.ChatModel`` and an ``Executor`` callable
(node label -> instructions, returning node label -> reply): the benchmark runs it in process
with ``LocalWorker`` objects, the coordinator runs it over the wire with MINION tasks whose
node side (``node/minion_worker.py``) runs the same ``LocalWorker``.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from agents.model import ChatModel, Completion, Message, Usage

__all__ = [
    "CITATION_MODES",
    "DAEMON_MODES",
    "DECISION_SCHEMA",
    "INSTRUCTIONS_SCHEMA",
    "MODES",
    "PLAN_SCHEMA",
    "AskCancelled",
    "AskResult",
    "AskStep",
    "CitationPolicy",
    "DocumentInfo",
    "Job",
    "LocalWorker",
    "PlanError",
    "RecordingModel",
    "VerbatimGuard",
    "ask",
    "chunk_text",
    "citation_policy",
    "default_plan",
    "parse_decision",
    "parse_instructions",
    "parse_plan",
    "resolve_citations",
    "run_local_only",
    "run_minion",
    "run_minions",
    "run_remote_only",
    "stricter",
]

MODES = ("minions", "minion", "local-only", "remote-only")
#: what the daemons serve: remote-only would send the documents to the coordinator
DAEMON_MODES = ("minions", "minion", "local-only")
CITATION_MODES = ("allow", "short", "none")  # loosest to strictest

DEFAULT_MAX_ROUNDS = 2
MAX_ROUNDS_LIMIT = 5
DEFAULT_CHUNK_CHARS = 1500
DEFAULT_CONTEXT_CHARS = 8000
MAX_JOBS = 4
#: local model calls one node makes in one round, at most (jobs x chunks)
MAX_LOCAL_CALLS = 48
#: findings the remote model reads per aggregation, at most (grounded ones first)
MAX_FINDINGS = 8
MAX_QUESTION_CHARS = 4000

ALLOW_CITATION_WORDS = 60
SHORT_CITATION_WORDS = 8
NONE_MAX_COPIED_WORDS = 5
MAX_ANSWER_CHARS = 300
MAX_EXPLANATION_CHARS = 400
MAX_REPLY_CHARS = 1500

REMOTE_PLAN_TOKENS = 128
REMOTE_DECISION_TOKENS = 64
LOCAL_JOB_TOKENS = 48
LOCAL_CHAT_TOKENS = 64

NO_ANSWER = "I could not find the answer in the documents."


class AskCancelled(Exception):
    """The question was withdrawn (the client went away, the task was cancelled)."""


class PlanError(ValueError):
    """A plan that cannot be used even after repair."""


# --------------------------------------------------------------------------------------------
# Citation policy (applied on the node, to everything it sends)


@dataclass(frozen=True)
class CitationPolicy:
    """What verbatim text may leave a node.

    ``citation_words``: the longest citation (0: citations are removed). ``max_copied_words``:
    the longest run of consecutive document words any other field may repeat (None: no limit);
    longer runs are replaced by ``[...]``."""

    mode: str
    citation_words: int
    max_copied_words: int | None


_POLICIES = {
    "allow": CitationPolicy("allow", ALLOW_CITATION_WORDS, None),
    "short": CitationPolicy("short", SHORT_CITATION_WORDS, SHORT_CITATION_WORDS),
    "none": CitationPolicy("none", 0, NONE_MAX_COPIED_WORDS),
}


def citation_policy(mode: str) -> CitationPolicy:
    """The policy for ``mode``; an unknown mode fails closed (``none``)."""
    return _POLICIES.get(mode, _POLICIES["none"])


def resolve_citations(requested: str, anonymous: bool) -> str:
    """The mode a question runs with: as requested, else ``none`` for anonymous questions and
    ``allow`` for identified ones. Raises ValueError for an unknown mode."""
    if not requested:
        return "none" if anonymous else "allow"
    if requested not in CITATION_MODES:
        raise ValueError(f"citations must be one of {', '.join(CITATION_MODES)}, "
                         f"got {requested!r}")
    return requested


def stricter(a: str, b: str) -> str:
    """The stricter of two citation modes (unknown modes count as ``none``)."""
    rank = {m: i for i, m in enumerate(CITATION_MODES)}
    return max(a, b, key=lambda m: rank.get(m, len(CITATION_MODES)))


_WORD = re.compile(r"\w+")
_REDACTED = "[...]"


class VerbatimGuard:
    """Finds runs of consecutive document words in text that is about to leave the node.

    Words are compared lower-cased and without punctuation or spacing, so re-spacing or
    re-punctuating a copied passage does not slip it through."""

    def __init__(self, documents: Iterable[str]) -> None:
        self._docs = [[w.lower() for w in _WORD.findall(d)] for d in documents]
        self._grams: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def _ngrams(self, n: int) -> set[str]:
        with self._lock:
            grams = self._grams.get(n)
            if grams is None:
                grams = {" ".join(words[i:i + n]) for words in self._docs
                         for i in range(len(words) - n + 1)}
                self._grams[n] = grams
            return grams

    def longest_copied_run(self, text: str) -> int:
        """The most consecutive document words ``text`` repeats (0 if none)."""
        words = [w.lower() for w in _WORD.findall(text)]
        best = 0
        for n in range(1, len(words) + 1):
            grams = self._ngrams(n)
            if not any(" ".join(words[i:i + n]) in grams for i in range(len(words) - n + 1)):
                break
            best = n
        return best

    def scrub(self, text: str, max_words: int | None) -> str:
        """``text`` with every run of more than ``max_words`` consecutive document words
        replaced by ``[...]`` (None: unchanged)."""
        if max_words is None or not text:
            return text
        n = max_words + 1
        matches = list(_WORD.finditer(text))
        if len(matches) < n:
            return text
        words = [m.group().lower() for m in matches]
        grams = self._ngrams(n)
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            if " ".join(words[i:i + n]) in grams:
                for j in range(i, i + n):
                    covered[j] = True
        if not any(covered):
            return text
        out, at, i = [], 0, 0
        while i < len(words):
            if not covered[i]:
                i += 1
                continue
            start = i
            while i < len(words) and covered[i]:
                i += 1
            out.append(text[at:matches[start].start()])
            out.append(_REDACTED)
            at = matches[i - 1].end()
        out.append(text[at:])
        return "".join(out)


def _trim_words(text: str, limit: int, around: str = "") -> str:
    """At most ``limit`` words of ``text``, centred on ``around`` when it occurs."""
    matches = list(_WORD.finditer(text))
    if len(matches) <= limit:
        return text
    start = 0
    if around:
        at = text.lower().find(around.lower())
        if at >= 0:
            first = next((i for i, m in enumerate(matches) if m.end() > at), 0)
            start = max(0, min(first - limit // 3, len(matches) - limit))
    return text[matches[start].start():matches[start + limit - 1].end()]


def apply_policy(output: dict[str, Any], guard: VerbatimGuard,
                 policy: CitationPolicy) -> dict[str, Any]:
    """One finding as it may leave the node under ``policy``."""
    result = dict(output)
    answer = result.get("answer")
    if isinstance(answer, str):
        result["answer"] = guard.scrub(answer, policy.max_copied_words)[:MAX_ANSWER_CHARS]
    explanation = str(result.get("explanation") or "")
    result["explanation"] = guard.scrub(explanation,
                                        policy.max_copied_words)[:MAX_EXPLANATION_CHARS]
    citation = result.get("citation")
    if policy.citation_words == 0 or not isinstance(citation, str) or not citation.strip():
        result["citation"] = None
    else:
        trimmed = _trim_words(citation, policy.citation_words, around=str(answer or ""))
        result["citation"] = guard.scrub(trimmed, policy.max_copied_words)
    return result


def apply_policy_text(text: str, guard: VerbatimGuard, policy: CitationPolicy,
                      limit: int = MAX_REPLY_CHARS) -> str:
    """Free text (a Minion reply, a local-only answer) as it may leave the node."""
    return guard.scrub(text, policy.max_copied_words)[:limit]


# --------------------------------------------------------------------------------------------
# Chunking


_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE.split(text)) if s]


def _hard_split(text: str, max_chars: int) -> list[str]:
    pieces = []
    while len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        cut = cut if cut > 0 else max_chars
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        pieces.append(text)
    return pieces


def chunk_text(text: str, max_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Split a document into chunks of at most ``max_chars`` characters, on paragraph
    boundaries when they fit, else on sentence boundaries, else on spaces. Deterministic; no
    text is lost (only whitespace between pieces is normalized)."""
    if max_chars < 50:
        raise ValueError(f"chunk size must be >= 50 characters, got {max_chars}")
    pieces: list[tuple[str, str]] = []  # (separator before it, text)
    for paragraph in _PARAGRAPH.split(text.strip()):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph) <= max_chars:
            pieces.append(("\n\n", paragraph))
            continue
        first = True
        for sentence in split_sentences(paragraph):
            for part in _hard_split(sentence, max_chars):
                pieces.append(("\n\n" if first else " ", part))
                first = False
    chunks: list[str] = []
    current = ""
    for sep, piece in pieces:
        if current and len(current) + len(sep) + len(piece) <= max_chars:
            current += sep + piece
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


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


# --------------------------------------------------------------------------------------------
# Schemas: what crosses between the roles is data, validated, never code

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


# --------------------------------------------------------------------------------------------
# Plans: the remote model's jobs, validated and repaired


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


def _as_text(value: Any, limit: int) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.strip()[:limit]


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
        task = _as_text(raw.get("task") or raw.get("instruction") or raw.get("question"), 500)
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
        jobs.append(Job(task=task, advice=_as_text(raw.get("advice"), 500), documents=docs,
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


# --------------------------------------------------------------------------------------------
# The local role: what a node runs (in process for the bench, in node/minion_worker.py)

WORKER_SYSTEM = (
    "You read an excerpt of a private document and do one small task using only the "
    "excerpt: answer with a few words copied from it. Reply with JSON only: "
    '{"answer": "...", "explanation": "a few words"}. If the excerpt does not say, the '
    "answer is null."
)
_EXAMPLE_EXCERPT = ("Shares in Acme rose 4% on Monday. The chief executive, Maria Delgado, said "
                    "sales in Spain had doubled.")
#: two worked examples (one answer, one abstention): small local models follow the format
#: far better when shown it; local tokens are the cheap ones
WORKER_EXAMPLES: list[Message] = [
    {"role": "user", "content": f"Excerpt:\n{_EXAMPLE_EXCERPT}\n\nTask: Who is the chief "
                                "executive of Acme?"},
    {"role": "assistant", "content": '{"answer": "Maria Delgado", "explanation": "named as '
                                     'chief executive"}'},
    {"role": "user", "content": f"Excerpt:\n{_EXAMPLE_EXCERPT}\n\nTask: When was Acme "
                                "founded?"},
    {"role": "assistant", "content": '{"answer": null, "explanation": "not in the excerpt"}'},
]
CHAT_SYSTEM = (
    "You answer questions about a private document. Answer briefly and only from the "
    "document. If the document does not say, reply: not found."
)

_ABSTAIN = re.compile(
    r"^\s*(null|none|n/?a|unknown|not (found|mentioned|stated|given|specified|available)|"
    r"no answer|nothing|-)?\s*[.!]?\s*$|does not (say|mention|contain|state|specify)|"
    r"not (mentioned|found|stated|provided) in", re.IGNORECASE)


def is_abstention(answer: Any) -> bool:
    return answer is None or (isinstance(answer, str) and bool(_ABSTAIN.search(answer)))


def _norm(text: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(text))


def grounded(answer: str, text: str) -> bool:
    """Whether ``answer`` (its words, in order) occurs in ``text``."""
    words = _norm(answer)
    return bool(words) and f" {words} " in f" {_norm(text)} "


def _supporting_sentence(answer: str, chunk: str) -> str | None:
    for sentence in split_sentences(chunk):
        if grounded(answer, sentence):
            return sentence
    return None


def _extract_json(text: str) -> Any:
    from agents.jsonrepair import extract_json

    try:
        return extract_json(text)
    except ValueError:  # JSONRepairError
        return None


def parse_worker_output(text: str, chunk: str) -> dict[str, Any]:
    """The local model's reply to a job, as {answer, explanation, citation, grounded}:
    JSON when it wrote JSON (repaired), else its text as the answer. A citation that is not
    in the chunk is replaced by the chunk's sentence that contains the answer (if any);
    ``grounded`` says whether the answer's words occur in the chunk."""
    obj = _extract_json(text)
    if isinstance(obj, dict):
        answer = obj.get("answer")
        explanation = _as_text(obj.get("explanation"), MAX_EXPLANATION_CHARS)
        citation = obj.get("citation")
    else:
        first = text.strip().splitlines()[0] if text.strip() else ""
        answer, explanation, citation = first, "", None
    if answer is not None and not isinstance(answer, str):
        answer = json.dumps(answer) if not isinstance(answer, int | float) else str(answer)
    if isinstance(answer, str):
        answer = answer.strip()[:MAX_ANSWER_CHARS] or None
    if is_abstention(answer):
        answer = None
    citation = citation if isinstance(citation, str) and citation.strip() else None
    if citation is not None and not grounded(citation, chunk):
        citation = None
    is_grounded = answer is not None and grounded(answer, chunk)
    if citation is None and is_grounded:
        citation = _supporting_sentence(answer, chunk)
    return {"answer": answer, "explanation": explanation, "citation": citation,
            "grounded": is_grounded}


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


class LocalWorker:
    """The node's side of Minions over its own documents: describe them, run jobs on their
    chunks, chat about them, answer directly. Pure: documents are given as text; the node
    daemon reads them from its private folder (``node/minion_worker.py``).

    ``max_citations`` is the node owner's ceiling: a request never gets a looser policy.
    ``workers`` > 1 runs jobs on that many threads (useful with a server-backed local model;
    a local transformers model runs one call at a time anyway)."""

    def __init__(self, documents: Sequence[str], *, model: ChatModel | None = None,
                 load_model: Callable[[], ChatModel] | None = None,
                 chunk_chars: int = DEFAULT_CHUNK_CHARS,
                 context_chars: int = DEFAULT_CONTEXT_CHARS, max_citations: str = "allow",
                 workers: int = 1, job_tokens: int = LOCAL_JOB_TOKENS,
                 chat_tokens: int = LOCAL_CHAT_TOKENS) -> None:
        if model is None and load_model is None:
            raise ValueError("give a model or a way to load one")
        self.documents = [d for d in documents if d.strip()]
        self.ids = [f"d{i}" for i in range(len(self.documents))]
        self.chunks = [chunk_text(d, chunk_chars) for d in self.documents]
        self.chunk_chars = chunk_chars
        self.context_chars = context_chars
        self.max_citations = max_citations
        self.workers = max(1, workers)
        self.job_tokens = job_tokens
        self.chat_tokens = chat_tokens
        self.guard = VerbatimGuard(self.documents)
        self._model = model
        self._load_model = load_model
        self._model_lock = threading.Lock()

    @property
    def model(self) -> ChatModel:
        with self._model_lock:
            if self._model is None:
                assert self._load_model is not None
                self._model = self._load_model()
            return self._model

    def describe(self) -> list[DocumentInfo]:
        return [DocumentInfo(doc_id, len(text), len(text.split()), len(chunks))
                for doc_id, text, chunks in zip(self.ids, self.documents, self.chunks,
                                                strict=True)]

    def handle(self, instructions: Mapping[str, Any] | bytes | str,
               should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Run one MINION instruction (validated here: the node trusts nobody's JSON)."""
        request = parse_instructions(instructions)
        op = request["op"]
        if op == "describe":
            return {"documents": [d.to_dict() for d in self.describe()],
                    "chunk_chars": self.chunk_chars}
        policy = citation_policy(stricter(request["citations"], self.max_citations))
        stop = should_stop or (lambda: False)
        cap = request.get("max_tokens") or 1 << 20
        if op == "jobs":
            reply = self.run_jobs(request["jobs"], policy, stop, min(self.job_tokens, cap))
        elif op == "chat":
            reply = self.chat(request["message"], request.get("history", []), policy, stop,
                              min(self.chat_tokens, cap))
        else:
            reply = self.answer(request["question"], policy, stop, min(self.chat_tokens, cap))
        reply["citations"] = policy.mode
        reply["model"] = self.model.name
        return reply

    # ---- jobs (MinionS)

    def _calls(self, jobs: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping, int, int]]:
        calls = []
        for job in jobs:
            docs = (range(len(self.ids)) if job["documents"] == "all" else
                    [self.ids.index(d) for d in job["documents"] if d in self.ids])
            for d in docs:
                picked = (range(len(self.chunks[d])) if job["chunks"] == "all" else
                          [c for c in job["chunks"] if c < len(self.chunks[d])])
                calls.extend((job["id"], job, d, c) for c in picked)
        return calls

    def run_jobs(self, jobs: Sequence[Mapping[str, Any]], policy: CitationPolicy,
                 stop: Callable[[], bool], max_tokens: int = LOCAL_JOB_TOKENS
                 ) -> dict[str, Any]:
        calls = self._calls(jobs)
        skipped = max(0, len(calls) - MAX_LOCAL_CALLS)
        calls = calls[:MAX_LOCAL_CALLS]

        def run(call: tuple[int, Mapping, int, int]) -> tuple[dict[str, Any], Usage]:
            if stop():
                raise AskCancelled("cancelled")
            job_id, job, d, c = call
            chunk = self.chunks[d][c]
            prompt = f"Excerpt:\n{chunk}\n\nTask: {job['task']}"
            if job.get("advice"):
                prompt += f"\nAdvice: {job['advice']}"
            completion = self.model.chat([{"role": "system", "content": WORKER_SYSTEM},
                                          *WORKER_EXAMPLES,
                                          {"role": "user", "content": prompt}],
                                         max_tokens=max_tokens)
            found = parse_worker_output(completion.text, chunk)
            return {"job": job_id, "doc": self.ids[d], "chunk": c, **found}, completion.usage

        if self.workers > 1 and len(calls) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                results = list(pool.map(run, calls))
        else:
            results = [run(call) for call in calls]
        usage = sum((u for _, u in results), Usage())
        kept = [apply_policy(o, self.guard, policy) for o, _ in results if o["answer"] is not None]
        return {"outputs": kept, "calls": len(calls), "abstained": len(calls) - len(kept),
                "skipped": skipped, "usage": _usage_dict(usage)}

    # ---- reading whole documents (Minion, local-only)

    def context(self, query: str) -> str:
        """The documents as the local model reads them: whole when they fit in
        ``context_chars``, else the chunks sharing most words with ``query``, in order."""
        labelled = [f"[{doc_id}]\n{text}" for doc_id, text in zip(self.ids, self.documents,
                                                                  strict=True)]
        whole = "\n\n".join(labelled)
        if len(whole) <= self.context_chars:
            return whole
        terms = {w for w in _norm(query).split() if len(w) > 3}
        scored = []
        for d, chunks in enumerate(self.chunks):
            for c, chunk in enumerate(chunks):
                overlap = len(terms & set(_norm(chunk).split()))
                scored.append((-overlap, d, c))
        picked, used = [], 0
        for _, d, c in sorted(scored):
            size = len(self.chunks[d][c]) + 8
            if used + size > self.context_chars:
                continue
            picked.append((d, c))
            used += size
        return "\n\n".join(f"[{self.ids[d]}]\n{self.chunks[d][c]}" for d, c in sorted(picked))

    def chat(self, message: str, history: Sequence[Mapping[str, str]], policy: CitationPolicy,
             stop: Callable[[], bool], max_tokens: int = LOCAL_CHAT_TOKENS) -> dict[str, Any]:
        if stop():
            raise AskCancelled("cancelled")
        if not self.documents:
            return {"reply": "I have no documents.", "usage": _usage_dict(Usage())}
        query = " ".join([*(h["content"] for h in history if h["role"] == "remote"), message])
        turns: list[Message] = [{"role": "system", "content": CHAT_SYSTEM}]
        opening = f"Document:\n{self.context(query)}\n\n"
        for h in history:
            role = "user" if h["role"] == "remote" else "assistant"
            content = h["content"]
            if role == "user" and len(turns) == 1:
                content = opening + "Question: " + content
            turns.append({"role": role, "content": content})
        question = ("Question: " + message) if len(turns) > 1 else (
            opening + "Question: " + message)
        turns.append({"role": "user", "content": question})
        completion = self.model.chat(turns, max_tokens=max_tokens)
        reply = apply_policy_text(completion.text.strip(), self.guard, policy)
        return {"reply": reply, "usage": _usage_dict(completion.usage)}

    def answer(self, question: str, policy: CitationPolicy, stop: Callable[[], bool],
               max_tokens: int = LOCAL_CHAT_TOKENS) -> dict[str, Any]:
        reply = self.chat(question, [], policy, stop, max_tokens)
        text = reply["reply"]
        return {"answer": None if is_abstention(text) else text, "usage": reply["usage"]}


# --------------------------------------------------------------------------------------------
# The remote role and the protocols

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

    def chat(self, messages: list[Message], *, max_tokens: int = 256,
             temperature: float = 0.0) -> Completion:
        self.received.append([dict(m) for m in messages])
        completion = self.inner.chat(messages, max_tokens=max_tokens, temperature=temperature)
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
class AskResult:
    mode: str
    answer: str
    rounds: int
    remote: Usage
    local: Usage
    steps: list[AskStep]
    citations: str = "allow"


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
                         citations)


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


def _ask_remote(remote: ChatModel, messages: list[Message], max_tokens: int,
                retries: int) -> Any:
    """The remote model's JSON reply (repaired by ``agents.jsonrepair``; re-asked up to
    ``retries`` times when it holds no JSON at all), or None. The prompts show the expected
    shape by example; the strict schemas are applied afterwards by ``parse_plan`` and
    ``parse_decision``, which repair what they can instead of spending remote tokens on
    re-asking. A failing remote model (``ModelError``) propagates."""
    from agents.jsonrepair import JSONRepairError, ask_json_reply

    try:
        return ask_json_reply(remote, messages, _ANY_JSON, retries, max_tokens=max_tokens,
                              instruct=False).value
    except JSONRepairError:
        return None


def parse_decision(obj: Any) -> dict[str, str]:
    """The remote model's verdict as {"decision": final|more|ask, "answer", "feedback",
    "message"}, from whatever JSON it wrote: a missing decision with an answer is final, one
    with feedback or a message asks for more; anything else is an empty final."""
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        obj = obj[0]
    if not isinstance(obj, dict):
        return {"decision": "final", "answer": "", "feedback": "", "message": ""}
    fields = {k: _as_text(obj.get(k), 2000) for k in ("answer", "feedback", "message")}
    decision = str(obj.get("decision") or "").strip().lower()
    if decision not in ("final", "more", "ask"):
        decision = ("final" if fields["answer"] else
                    "ask" if fields["message"] else "more" if fields["feedback"] else "final")
    return {"decision": decision, **fields}


def _norm_answer(text: str) -> str:
    return _norm(text)


def majority_answer(answers: Iterable[tuple[str, bool]]) -> str:
    """The most frequent answer, grounded answers first; ties go to the first seen."""
    answers = [(a.strip(), g) for a, g in answers if isinstance(a, str) and a.strip()]
    for pool in ([a for a, g in answers if g], [a for a, _ in answers]):
        if pool:
            counts = Counter(_norm_answer(a) for a in pool)
            best = max(counts.values())
            return next(a for a in pool if counts[_norm_answer(a)] == best)
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
        groups.setdefault(_norm(str(o.get("answer") or "")), []).append((gid, o))
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
            line += f"; citation {json.dumps(_trim_words(cited, 25, str(first.get('answer'))))}"
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
        obj = _ask_remote(run.remote, [{"role": "system", "content": PLAN_SYSTEM},
                                       {"role": "user", "content": prompt}],
                          run.tokens(REMOTE_PLAN_TOKENS), retries)
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
        decision = parse_decision(_ask_remote(
            run.remote, [{"role": "system", "content": AGGREGATE_SYSTEM},
                         {"role": "user", "content": prompt}], run.tokens(REMOTE_DECISION_TOKENS),
            retries))
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
        decision = parse_decision(_ask_remote(run.remote, conversation,
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
