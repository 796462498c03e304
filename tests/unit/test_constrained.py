"""Constrained decoding: every schema a model is asked to fill fits its call's token budget, a
local model decoding under the grammar writes valid JSON even when it is noise (the tiny
model), grammars compile once per process, and an OpenAI-compatible server is asked for
structured output and, when it refuses, asked again without."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from jsonschema import Draft202012Validator

from confide.agents.agora import _DRAFT_SCHEMA
from confide.agents.backends import OpenAIChat, backend_from_spec
from confide.agents.constrained import GrammarDeadEnd, _pattern_chars, fit_budget, token_bound
from confide.agents.jsonrepair import AskJSONError, ask_json_reply
from confide.agents.minions.config import (
    LOCAL_JOB_TOKENS,
    MAX_JOBS,
    REMOTE_DECISION_TOKENS,
    REMOTE_PLAN_TOKENS,
)
from confide.agents.minions.orchestrator import run_minion, run_minions
from confide.agents.minions.schemas import (
    DECISION_SCHEMA,
    PLAN_SCHEMA,
    WORKER_SCHEMA,
    decision_schema,
    plan_schema,
)
from confide.agents.minions.worker import LocalWorker
from confide.agents.model import Completion
from confide.node.agent_service import demo_capabilities

DOCUMENT = ("Acme Widgets reported record profits of 12.5 million pounds for the year. "
            "The chief executive, Maria Delgado, said demand in Europe had doubled.\n\n"
            "The company was founded in 1987 in Leeds and employs 340 people. " * 3)


@pytest.fixture(scope="module")
def tiny():
    return backend_from_spec("tiny", device="cpu")


def test_every_minions_schema_fits_its_budget():
    assert token_bound(WORKER_SCHEMA) <= LOCAL_JOB_TOKENS
    assert token_bound(decision_schema("more")) <= REMOTE_DECISION_TOKENS
    assert token_bound(decision_schema("ask")) <= REMOTE_DECISION_TOKENS
    for docs in (1, 4, 100):
        ids = [f"D{i}" for i in range(1, docs + 1)]
        for jobs in range(1, MAX_JOBS + 1):
            assert token_bound(plan_schema(ids, 64, jobs)) <= REMOTE_PLAN_TOKENS


def test_the_bounded_schemas_are_subsets_of_the_guards():
    plan = {"jobs": [{"task": "t" * 80, "documents": ["D1"], "chunks": [0, 3],
                      "advice": "a" * 40}]}
    assert Draft202012Validator(plan_schema(["D1"], 4, 2)).is_valid(plan)
    assert Draft202012Validator(PLAN_SCHEMA).is_valid(plan)
    assert not Draft202012Validator(plan_schema(["D1"], 4, 2)).is_valid(
        {"jobs": [{**plan["jobs"][0], "documents": ["D7"]}]})       # unknown document
    for verdict in ({"decision": "final", "answer": "x"}, {"decision": "more", "feedback": "y"}):
        assert Draft202012Validator(decision_schema("more")).is_valid(verdict)
        assert Draft202012Validator(DECISION_SCHEMA).is_valid(verdict)


def test_token_bound_refuses_what_it_cannot_bound():
    assert token_bound({"type": "string"}) is None
    assert token_bound({"type": "array", "items": {"type": "integer"}}) is None
    assert token_bound({"type": "object", "additionalProperties": True}) is None
    assert token_bound({"type": "string", "maxLength": 5}) == 7
    assert _pattern_chars(r"^\d{4}-\d{2}-\d{2}$") == 10
    assert _pattern_chars(r"^D[1-9][0-9]*$") is None


@pytest.mark.parametrize("budget", [8, 32, 96])
def test_fit_budget_makes_capability_inputs_and_drafts_fit(budget):
    schemas = [c.input_schema for c in demo_capabilities()] + [_DRAFT_SCHEMA]
    for schema in schemas:
        fitted, tokens = fit_budget(schema, budget)
        assert token_bound(fitted) is not None and token_bound(fitted) <= tokens
        assert tokens >= budget
        # the fitted schema is a subset: its longest strings still validate the original
        longest = {k: ("x" * v["maxLength"] if v.get("type") == "string"
                       and "pattern" not in v else None)
                   for k, v in fitted["properties"].items()}
        longest = {k: v for k, v in longest.items() if v is not None}
        assert not [e for e in Draft202012Validator(schema).iter_errors(longest)
                    if e.validator != "required"]


@pytest.mark.parametrize("schema", [WORKER_SCHEMA, decision_schema("more"),
                                    decision_schema("ask"), plan_schema(["d1", "d2"], 3, 2)],
                         ids=["worker", "decision-more", "decision-ask", "plan"])
def test_the_tiny_model_writes_valid_json_under_the_grammar(tiny, schema):
    """The tiny model's output is noise; under the grammar it is valid noise, whole. (Its
    vocabulary is MiniLM's, uncased: it has no "D", hence lowercase document ids here.)"""
    validator = Draft202012Validator(schema)
    budget = token_bound(schema)
    for question in ("Who runs Acme?", "When was it founded?"):
        completion = tiny.chat([{"role": "user", "content": question}], max_tokens=budget,
                               schema=schema)
        assert validator.is_valid(json.loads(completion.text)), completion.text
        assert completion.usage.completion_tokens <= budget


def test_a_grammar_is_compiled_once_per_process(tiny):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    tiny.chat([{"role": "user", "content": "a"}], max_tokens=12, schema=schema)
    compiled = tiny.grammars().compiled
    for _ in range(3):
        tiny.chat([{"role": "user", "content": "b"}], max_tokens=12, schema=schema)
    assert tiny.grammars().compiled == compiled


class PlansInLowercase:
    """The tiny model as the remote planner, writing document ids as its uncased vocabulary
    can (d1), read back as D1."""

    def __init__(self, inner):
        self.inner, self.name, self.structured_output = inner, inner.name, True

    def chat(self, messages, *, max_tokens=256, temperature=0.0, schema=None):
        text = json.dumps(schema).replace('"D', '"d') if schema else None
        completion = self.inner.chat(messages, max_tokens=max_tokens, temperature=temperature,
                                     schema=json.loads(text) if text else None)
        return Completion(re.sub(r'"d(\d+)"', r'"D\1"', completion.text), completion.usage)


def test_minions_with_tiny_models_is_valid_on_every_structured_call(tiny):
    """Remote planner, remote aggregator and local workers all tiny (noise): every plan,
    decision and worker output is valid JSON for its schema, as written."""
    worker = LocalWorker([DOCUMENT], model=tiny, chunk_chars=200)

    def execute(requests):
        return {n: worker.handle(json.dumps(r)) for n, r in requests.items()}

    remote = PlansInLowercase(tiny)
    result = run_minions(remote, execute, "Who runs Acme?", ["n1"], max_rounds=2,
                         max_jobs=2, retries=0)
    s = result.structured
    assert s.remote_calls >= 2 and s.remote_valid == s.remote_calls
    assert s.local_calls >= 1 and s.local_valid == s.local_calls
    plans = [step for step in result.steps if step.kind == "plan"]
    assert plans and not any("default plan" in step.message for step in plans)
    minion = run_minion(remote, execute, "Who runs Acme?", ["n1"], max_rounds=1, retries=0)
    assert minion.structured.remote_valid == minion.structured.remote_calls == 1


class _Server(BaseHTTPRequestHandler):
    accepts_schema = True
    payloads: ClassVar[list[dict]] = []

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).payloads.append(payload)
        if "response_format" in payload and not type(self).accepts_schema:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "response_format is not supported"}')
            return
        body = json.dumps({"choices": [{"message": {"content": '{"n": 3}'}}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 4}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("accepts", [True, False])
def test_openai_structured_output_and_fallback(accepts):
    handler = type("Handler", (_Server,), {"accepts_schema": accepts, "payloads": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = OpenAIChat(f"http://127.0.0.1:{server.server_port}/v1", "m")
        schema = {"type": "object", "properties": {"n": {"type": "integer"}},
                  "required": ["n"]}
        for _ in range(2):
            reply = ask_json_reply(model, [{"role": "user", "content": "n?"}], schema, 0)
            assert reply.value == {"n": 3}
        sent = handler.payloads
        assert sent[0]["response_format"]["json_schema"]["schema"] == schema
        if accepts:
            assert len(sent) == 2 and all("response_format" in p for p in sent)
            assert model.structured_output
        else:  # refused once, asked again without, never asked with it again
            assert len(sent) == 3 and [("response_format" in p) for p in sent] == [
                True, False, False]
            assert not model.structured_output
    finally:
        server.shutdown()
        server.server_close()


def test_a_vocabulary_that_cannot_write_the_schema_falls_back_to_repair(tiny):
    """The tiny model's uncased vocabulary has no "D": the grammar dead-ends, the call says so,
    and ask_json_reply asks again unconstrained (then fails validation, as noise does)."""
    schema = {"type": "object", "properties": {"id": {"const": "D1"}}, "required": ["id"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": "id?"}]
    with pytest.raises(GrammarDeadEnd):
        tiny.chat(messages, max_tokens=8, schema=schema)
    with pytest.raises(AskJSONError) as info:
        ask_json_reply(tiny, messages, schema, 0, max_tokens=8)
    assert info.value.attempts == 1
