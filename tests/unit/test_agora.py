"""Agora: protocol documents (hash, validation), the compatibility rule, and agents choosing
between routines, fetched protocols, negotiation and natural language. Models are the real
tiny backend behind a counting wrapper, so "no model call" is counted, not assumed."""

from __future__ import annotations

import json

import pytest

from confide.agents.agora import (
    NEGOTIATE,
    Agent,
    AgoraError,
    Capability,
    MemoryRegistry,
    Peer,
    ProtocolDocument,
    compatibility,
    document_for_capability,
)
from confide.agents.backends import CountingChat, backend_from_spec
from confide.agents.model import Completion, Usage
from confide.node.agent_service import (
    ADD_INPUT,
    ADD_OUTPUT,
    CALENDAR_INPUT,
    WEATHER_INPUT,
    WEATHER_OUTPUT,
    demo_capabilities,
    weather_lookup,
)
from confide.v1 import node_pb2

CAL = {"date": "2024-05-06", "duration_minutes": 30}   # a Monday


@pytest.fixture(scope="module")
def tiny():
    return backend_from_spec("tiny", device="cpu")


def make_agent(name, model, registry, published=("weather.lookup", "math.add"), **options):
    options = {"answer_tokens": 4, "draft_tokens": 8, "draft_retries": 0, **options}
    agent = Agent(name, model, registry=registry, **options)
    for capability in demo_capabilities(published):
        agent.add_capability(capability)
    return agent


def doc(**overrides) -> ProtocolDocument:
    fields = {"name": "weather", "task_kind": "weather.lookup", "request_schema": WEATHER_INPUT,
              "response_schema": WEATHER_OUTPUT}
    return ProtocolDocument(**{**fields, **overrides})


# ------------------------------------------------------------------------ documents


def test_hash_is_the_canonical_form():
    a = doc()
    reordered = json.loads(json.dumps(WEATHER_INPUT, indent=4, sort_keys=False))
    b = ProtocolDocument.from_dict({**a.to_dict(), "request_schema": json.dumps(reordered,
                                                                                 indent=3)})
    assert a.hash == b.hash and len(a.hash) == 64
    assert a.hash != doc(rules="other rules").hash
    assert doc(uses=7).hash == a.hash  # uses are not content
    assert ProtocolDocument.from_proto(a.to_proto()) == a
    canonical = json.loads(a.canonical())
    assert set(canonical) == {"name", "description", "task_kind", "multiround", "rules",
                              "request_schema", "response_schema"}


@pytest.mark.parametrize(("overrides", "match"), [
    ({"name": "  "}, "name must not be empty"),
    ({"task_kind": ""}, "task_kind"),
    ({"task_kind": "has spaces"}, "task_kind"),
    ({"request_schema": {"type": "no-such-type"}}, "not a valid JSON Schema"),
    ({"request_schema": ["not", "an", "object"]}, "must be a JSON object"),
    ({"request_schema": {"$ref": "https://example.com/s.json"}}, "only local references"),
    ({"rules": "x" * 9000}, "limit"),
    ({"response_schema": {"enum": list(range(9000))}}, "limit"),
])
def test_invalid_documents_are_rejected(overrides, match):
    with pytest.raises(AgoraError, match=match):
        doc(**overrides).validate()


def test_a_claimed_hash_must_match():
    data = doc().to_dict()
    data["hash"] = "0" * 64
    with pytest.raises(AgoraError, match="does not match"):
        ProtocolDocument.from_dict(data)


# ------------------------------------------------------------------------ compatibility


def cap(input_schema=WEATHER_INPUT, output_schema=WEATHER_OUTPUT):
    return Capability("weather.lookup", input_schema, output_schema, weather_lookup)


def test_compatibility_rule():
    assert compatibility(document_for_capability(cap()), cap()) == ""
    extra = {**WEATHER_INPUT, "properties": {**WEATHER_INPUT["properties"],
                                             "units": {"type": "string"}}}
    extra.pop("additionalProperties")
    assert compatibility(doc(request_schema=extra), cap()) == ""          # optional extras
    smaller = {"type": "object", "properties": {"forecast": {"type": "string"}},
               "required": ["forecast"]}
    assert compatibility(doc(response_schema=smaller), cap()) == ""       # asks for less
    needs_zip = {"type": "object", "properties": {"zip": {"type": "string"}},
                 "required": ["zip"]}
    assert "does not require ['city']" in compatibility(doc(request_schema=needs_zip), cap())
    both = {"type": "object", "properties": {"city": {"type": "string"},
                                             "zip": {"type": "string"}},
            "required": ["city", "zip"]}
    assert "does not know" in compatibility(doc(request_schema=both), cap())
    typed = {"type": "object", "properties": {"city": {"type": "integer"}}, "required": ["city"]}
    assert "disagrees" in compatibility(doc(request_schema=typed), cap())
    more = {"type": "object", "properties": {"humidity": {"type": "number"}},
            "required": ["humidity"]}
    assert "does not promise" in compatibility(doc(response_schema=more), cap())
    assert "task kind" in compatibility(doc(task_kind="math.add"), cap())
    enum_cap = cap(input_schema={"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"]})
    wider = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
             "required": ["city"]}
    assert "values" in compatibility(doc(request_schema=wider), enum_cap)


# ------------------------------------------------------------------------ agents


def test_routine_path_makes_no_model_call(tiny):
    registry = MemoryRegistry()
    server_model = CountingChat(tiny)
    server = make_agent("server", server_model, registry)
    client = Agent("client", None, registry=registry)
    peer = Peer("server", server.handle)
    for city in ("Paris", "Tokyo", "Lima"):
        exchange = client.ask(peer, "weather.lookup", {"city": city}, f"Weather in {city}?")
        assert (exchange.mode, exchange.handled_by) == ("protocol", "routine")
        assert exchange.body["city"] == city and exchange.usage == Usage()
    assert client.ask(peer, "math.add", {"a": 2, "b": 3.5}).body == {"sum": 5.5}
    assert server_model.calls == 0 and server.counters.model_calls == 0
    assert server.counters.handled["routine"] == 4
    # the handler refuses one request: an error for it, still without a model, and the
    # protocol stays in use
    bad = client.ask(peer, "weather.lookup", {"city": "Atlantis"})
    assert bad.handled_by == "error" and "no forecast for 'Atlantis'" in bad.error
    assert client.ask(peer, "weather.lookup", {"city": "Rome"}).handled_by == "routine"
    assert server_model.calls == 0


def test_bad_envelopes_are_errors_not_crashes(tiny):
    server = make_agent("server", CountingChat(tiny), MemoryRegistry())
    weather = next(h for h, r in server.routines.items()
                   if r.document.task_kind == "weather.lookup")
    cases = [
        node_pb2.AgentEnvelope(protocol_hash="xyz", body="{}"),
        node_pb2.AgentEnvelope(protocol_hash=weather, body="{not json"),
        node_pb2.AgentEnvelope(protocol_hash=weather, body='{"town": "Paris"}'),
        node_pb2.AgentEnvelope(protocol_hash=weather, body='{"city": "Atlantis"}'),
        node_pb2.AgentEnvelope(protocol_hash=weather, task_kind="math.add",
                               body='{"city": "Paris"}'),
        node_pb2.AgentEnvelope(),
        node_pb2.AgentEnvelope(protocol_hash=NEGOTIATE, task_kind="poem.write", body="{}"),
        node_pb2.AgentEnvelope(protocol_hash=NEGOTIATE, task_kind="x", body="[1"),
    ]
    for envelope in cases:
        reply = server.handle(envelope)
        assert reply.handled_by == "error" and reply.error, envelope
    assert "required property" in server.handle(cases[2]).error
    assert "no forecast for 'Atlantis'" in server.handle(cases[3]).error


def test_unknown_hash_is_fetched_once_and_adopted_when_compatible(tiny):
    registry = MemoryRegistry()
    # another agent's PD for weather: an optional extra field, a smaller response
    extra = {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "units": {"type": "string", "enum": ["C", "F"]}}}
    theirs = registry.register(doc(name="weather v2", request_schema=extra,
                                   response_schema={"type": "object", "required": ["forecast"],
                                                    "properties": {"forecast": {"type": "string"}}
                                                    }))
    server_model = CountingChat(tiny)
    fetched = []
    server = make_agent("server", server_model, None, published=(),
                        fetcher=lambda h: fetched.append(h) or registry.get(h))
    client = Agent("client", None, registry=registry)
    peer = Peer("server", server.handle)
    for _ in range(3):
        exchange = client.ask(peer, "weather.lookup", {"city": "Rome", "units": "C"})
        assert (exchange.handled_by, exchange.protocol_hash) == ("protocol", theirs.hash)
        assert exchange.body == {"city": "Rome", "forecast": "partly cloudy",
                                 "temperature_c": 22.0}
    assert fetched == [theirs.hash] and server.counters.fetches == 1
    assert server_model.calls == 0


def test_incompatible_protocol_gets_natural_language_and_is_not_reused(tiny):
    registry = MemoryRegistry()
    needs_zip = {"type": "object", "properties": {"zip": {"type": "string"}},
                 "required": ["zip"]}
    foreign = registry.register(doc(name="weather by zip", request_schema=needs_zip))
    server_model = CountingChat(tiny)
    server = make_agent("server", server_model, registry, published=())
    client = Agent("client", None, registry=registry)
    peer = Peer("server", server.handle)
    first = client.ask(peer, "weather.lookup", {"zip": "75001"}, "Weather at 75001?")
    assert (first.mode, first.handled_by) == ("protocol", "natural")
    assert first.protocol_hash == foreign.hash and first.usage.completion_tokens > 0
    second = client.ask(peer, "weather.lookup", {"zip": "75001"}, "Weather at 75001?")
    assert second.mode == "natural"              # the declined PD is not offered again
    # each natural answer: one (failed) extraction of the tool's input, one answer
    assert server.counters.fetches == 1 and server_model.calls == 2 * 2


def test_negotiation_after_n_natural_exchanges_registers_a_protocol(tiny):
    registry = MemoryRegistry()
    server_model = CountingChat(tiny)
    server = make_agent("server", server_model, registry)   # calendar is unpublished
    client = Agent("client", None, registry=registry, negotiate_after=3)
    peer = Peer("server", server.handle)
    assert registry.list("calendar.free_slots") == []
    modes = []
    for _ in range(5):
        exchange = client.ask(peer, "calendar.free_slots", CAL, "When am I free on May 6?")
        modes.append((exchange.mode, exchange.handled_by))
    assert modes == [("natural", "natural")] * 3 + [("protocol", "negotiated")] * 2
    assert exchange.body == {"date": "2024-05-06", "slots": [
        {"start": "10:30", "end": "13:00"}, {"start": "14:00", "end": "17:00"}]}
    [registered] = registry.list("calendar.free_slots")
    assert registered.hash == exchange.protocol_hash
    # the tiny model writes noise, but under the draft schema's grammar it is a valid
    # draft: its words, the capability's own schemas
    assert server.counters.drafts == {"model": 1}
    assert registered.request_schema == CALENDAR_INPUT
    assert client.counters.negotiations == 1
    # three natural answers (a tool extraction and an answer each), one draft
    assert server_model.calls == 3 * 2 + 1
    # every JSON the model wrote (extractions, the draft) was valid as written
    assert server.counters.structured_valid == server.counters.structured_calls == 3 + 1
    # a third agent finds the negotiated PD in the registry: no natural language at all
    other = Agent("other", None, registry=registry)
    later = other.ask(peer, "calendar.free_slots", CAL)
    assert (later.mode, later.handled_by) == ("protocol", "negotiated")


class Drafter:
    """A model that drafts a good PD (what a larger model does) and answers otherwise."""

    name = "drafter"

    def __init__(self):
        self.seen = []

    def chat(self, messages, *, max_tokens=256, temperature=0.0):
        self.seen.append(messages)
        if messages[0]["content"].startswith("Extract the parameters"):
            return Completion('{"a": 2, "b": 3}', Usage(15, 8))
        if "Design a protocol" in messages[-1]["content"]:
            draft = {"name": "sum of two", "description": "adds", "rules": "a, b in; sum out",
                     "request_schema": ADD_INPUT, "response_schema": ADD_OUTPUT}
            return Completion("Here:\n```json\n" + json.dumps(draft) + "\n```", Usage(50, 40))
        return Completion("It is probably 5.", Usage(20, 5))


def test_a_models_draft_is_used_when_valid_and_compatible():
    registry = MemoryRegistry()
    drafter = Drafter()
    server = make_agent("server", drafter, registry, published=(), negotiate_after=1,
                        draft_tokens=128)   # room for its words: the draft schema fits 128
    client = Agent("client", None, registry=registry, negotiate_after=1)
    peer = Peer("server", server.handle)
    assert client.ask(peer, "math.add", {"a": 2, "b": 3}, "2 + 3?").mode == "natural"
    exchange = client.ask(peer, "math.add", {"a": 2, "b": 3})
    assert (exchange.handled_by, exchange.body) == ("negotiated", {"sum": 5})
    [registered] = registry.list("math.add")
    assert registered.name == "sum of two" and server.counters.drafts == {"model": 1}
    # natural language with tools: extraction, the handler's result in the answering prompt
    assert 'Result of math.add for {"a":2,"b":3}: {"sum":5}' in drafter.seen[1][0]["content"]
    assert server.counters.usage == Usage(15 + 20 + 50, 8 + 5 + 40)
    assert server.counters.model_calls == 3


def test_no_negotiation_without_a_capability_or_a_structured_body(tiny):
    registry = MemoryRegistry()
    server = make_agent("server", CountingChat(tiny), registry)
    client = Agent("client", None, registry=registry, negotiate_after=2)
    peer = Peer("server", server.handle)
    for _ in range(4):
        assert client.ask(peer, "poem.write", None, "A poem about the sea").mode == "natural"
        assert client.ask(peer, "trivia.ask", {"q": "capital of Peru"}).mode == "natural"
    assert client.counters.sent["negotiate"] == 2   # trivia: tried twice, refused twice
    assert client.counters.negotiations_failed == 2 and registry.list("trivia.ask") == []


def test_usage_counts_reach_the_registry(tiny):
    registry = MemoryRegistry()
    server = make_agent("server", None, registry, report_every=2)
    client = Agent("client", None, registry=registry)
    peer = Peer("server", server.handle)
    for _ in range(3):
        client.ask(peer, "math.add", {"a": 1, "b": 1})
    [add] = registry.list("math.add")
    assert add.uses == 2                    # reported every second use ...
    server.flush_usage()
    assert registry.list("math.add")[0].uses == 3   # ... and the rest on flush


def test_memory_registry_is_idempotent():
    registry = MemoryRegistry()
    a = registry.register(doc())
    b = registry.register(doc())
    assert a == b and len(registry.list()) == 1 and registry.get(a.hash) == a
    assert registry.get("f" * 64) is None
