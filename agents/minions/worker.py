"""The node's side of Minions (``LocalWorker``): what runs where the documents are.

    describe        document metadata only: local ids d0.., characters, words, chunk counts
    jobs (MinionS)  for each job, for each selected chunk (at most MAX_LOCAL_CALLS):
                        the local model reads the chunk and the task -> {answer, explanation}
                        answer checked against the chunk (grounded), citation = the chunk's
                        sentence that holds it; abstentions stay on the node
                    the citation policy applied to every finding that goes up
    chat (Minion)   the local model reads the documents (whole, or the chunks that share most
                    words with the conversation) and replies; the policy applied to the reply
    answer          local-only: one chat turn, the question itself

Pure: documents are given as text; the node daemon reads them from its private folder
(``node/minion_worker.py``) and sends the replies as a MINION task's update."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jsonschema import Draft202012Validator

from confide.agents.jsonrepair import strictly_valid
from confide.agents.minions.config import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_CONTEXT_CHARS,
    LOCAL_CHAT_TOKENS,
    LOCAL_JOB_TOKENS,
    MAX_ANSWER_CHARS,
    MAX_EXPLANATION_CHARS,
    MAX_LOCAL_CALLS,
    AskCancelled,
)
from confide.agents.minions.policy import (
    CitationPolicy,
    VerbatimGuard,
    apply_policy,
    apply_policy_text,
    citation_policy,
    stricter,
)
from confide.agents.minions.schemas import WORKER_SCHEMA, DocumentInfo, parse_instructions
from confide.agents.minions.text import (
    as_text,
    chunk_text,
    grounded,
    is_abstention,
    normalized,
    split_sentences,
)
from confide.agents.model import ChatModel, Message, Usage, chat_json

WORKER_SYSTEM = (
    "You read an excerpt of a private document and do one small task using only the "
    "excerpt: answer with a few words copied from it. Reply with JSON only: "
    '{"answer":"...","explanation":"a few words"}. If the excerpt does not say, the '
    "answer is null."
)

_EXAMPLE_EXCERPT = ("Shares in Acme rose 4% on Monday. The chief executive, Maria Delgado, said "
                    "sales in Spain had doubled.")

#: two worked examples (one answer, one abstention): small local models follow the format
#: far better when shown it; local tokens are the cheap ones
WORKER_EXAMPLES: list[Message] = [
    {"role": "user", "content": f"Excerpt:\n{_EXAMPLE_EXCERPT}\n\nTask: Who is the chief "
                                "executive of Acme?"},
    {"role": "assistant", "content": '{"answer":"Maria Delgado","explanation":"named as '
                                     'chief executive"}'},
    {"role": "user", "content": f"Excerpt:\n{_EXAMPLE_EXCERPT}\n\nTask: When was Acme "
                                "founded?"},
    {"role": "assistant", "content": '{"answer":null,"explanation":"not in the excerpt"}'},
]

_WORKER_VALIDATOR = Draft202012Validator(WORKER_SCHEMA)

CHAT_SYSTEM = (
    "You answer questions about a private document. Answer briefly and only from the "
    "document. If the document does not say, reply: not found."
)


def _supporting_sentence(answer: str, chunk: str) -> str | None:
    for sentence in split_sentences(chunk):
        if grounded(answer, sentence):
            return sentence
    return None


def _extract_json(text: str) -> Any:
    from confide.agents.jsonrepair import extract_json

    try:  # constrained output parses as is; repair is for models that cannot be constrained
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
        explanation = as_text(obj.get("explanation"), MAX_EXPLANATION_CHARS)
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

        def run(call: tuple[int, Mapping, int, int]) -> tuple[dict[str, Any], Usage, bool]:
            if stop():
                raise AskCancelled("cancelled")
            job_id, job, d, c = call
            chunk = self.chunks[d][c]
            prompt = f"Excerpt:\n{chunk}\n\nTask: {job['task']}"
            if job.get("advice"):
                prompt += f"\nAdvice: {job['advice']}"
            completion = chat_json(self.model, [{"role": "system", "content": WORKER_SYSTEM},
                                                *WORKER_EXAMPLES,
                                                {"role": "user", "content": prompt}],
                                   WORKER_SCHEMA, max_tokens=max_tokens)
            found = parse_worker_output(completion.text, chunk)
            valid = strictly_valid(completion.text, _WORKER_VALIDATOR)
            return ({"job": job_id, "doc": self.ids[d], "chunk": c, **found}, completion.usage,
                    valid)

        if self.workers > 1 and len(calls) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                results = list(pool.map(run, calls))
        else:
            results = [run(call) for call in calls]
        usage = sum((u for _, u, _ in results), Usage())
        # the local model's own "no answer" (null) stays on the node: only findings go up
        kept = [apply_policy(o, self.guard, policy) for o, _, _ in results
                if o["answer"] is not None]
        return {"outputs": kept, "calls": len(calls), "abstained": len(calls) - len(kept),
                "valid": sum(v for _, _, v in results), "skipped": skipped,
                "usage": _usage_dict(usage)}

    # ---- reading whole documents (Minion, local-only)

    def context(self, query: str) -> str:
        """The documents as the local model reads them: whole when they fit in
        ``context_chars``, else the chunks sharing most words with ``query``, in order."""
        labelled = [f"[{doc_id}]\n{text}" for doc_id, text in zip(self.ids, self.documents,
                                                                  strict=True)]
        whole = "\n\n".join(labelled)
        if len(whole) <= self.context_chars:
            return whole
        terms = {w for w in normalized(query).split() if len(w) > 3}
        scored = []
        for d, chunks in enumerate(self.chunks):
            for c, chunk in enumerate(chunks):
                overlap = len(terms & set(normalized(chunk).split()))
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
