"""The node's Agora agent: what answers ``NodePeer.AgentMessage``.

A node offers other agents a few capabilities: handlers its operator registered, each with the
JSON Schemas of its input and output (``agents.agora.Capability``). Messages under a protocol
the node has a routine for are answered by the handler with no model call; unknown protocols
are fetched from the coordinator's registry and adopted when a capability fits them; natural
language, and protocols the node cannot serve, are answered by the node's local model
(SmolLM2-135M-Instruct by default, loaded on first use). The private data a handler reads
(here, the demo's weather table and calendar) stays in this process: only answers leave it.

The built-in demo capabilities (``demo_capabilities``) are what ``confide bench agora`` and
the tests exercise: ``weather.lookup`` over a fixed table, ``calendar.free_slots`` over a fixed
weekly schedule, ``math.add``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from confide.agents.agora import Agent, Capability, ClientRegistry, Peer, Registry, RoutineError
from confide.agents.backends import LazyChat
from confide.agents.model import ChatModel
from confide.node.anonymous import AgentMessageVerifier
from confide.protos.tls import channel as tls_channel
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2
from confide.v1 import node_pb2_grpc as node_grpc

log = logging.getLogger(__name__)

__all__ = [
    "LoopClientRegistry",
    "NodeAgentService",
    "demo_capabilities",
    "grpc_peer",
]

# ---------------------------------------------------------------------------------------------
# Demo capabilities: private data behind a schema

WEATHER = {
    "paris": ("light rain", 14.0), "london": ("overcast", 12.5), "berlin": ("sunny", 18.0),
    "madrid": ("sunny", 27.5), "rome": ("partly cloudy", 22.0), "tokyo": ("humid", 26.0),
    "new york": ("windy", 16.5), "nairobi": ("thunderstorms", 21.0), "sydney": ("clear", 19.5),
    "lima": ("fog", 17.0),
}

# Busy blocks per weekday (Monday = 0) inside working hours 09:00-17:00.
BUSY = {
    0: [("09:00", "10:30"), ("13:00", "14:00")],
    1: [("11:00", "12:00"), ("15:30", "17:00")],
    2: [("09:00", "12:00")],
    3: [("10:00", "11:00"), ("14:00", "15:00"), ("16:00", "16:30")],
    4: [("13:00", "17:00")],
    5: [("09:00", "17:00")],
    6: [("09:00", "17:00")],
}

WEATHER_INPUT = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 64}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_OUTPUT = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "forecast": {"type": "string"},
                   "temperature_c": {"type": "number"}},
    "required": ["city", "forecast", "temperature_c"],
    "additionalProperties": False,
}
CALENDAR_INPUT = {
    "type": "object",
    "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                   "duration_minutes": {"type": "integer", "minimum": 15, "maximum": 480}},
    "required": ["date", "duration_minutes"],
    "additionalProperties": False,
}
CALENDAR_OUTPUT = {
    "type": "object",
    "properties": {
        "date": {"type": "string"},
        "slots": {"type": "array", "items": {
            "type": "object",
            "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
            "required": ["start", "end"]}},
    },
    "required": ["date", "slots"],
    "additionalProperties": False,
}
ADD_INPUT = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
ADD_OUTPUT = {
    "type": "object",
    "properties": {"sum": {"type": "number"}},
    "required": ["sum"],
    "additionalProperties": False,
}


def weather_lookup(body: dict[str, Any]) -> dict[str, Any]:
    city = body["city"].strip()
    found = WEATHER.get(city.lower())
    if found is None:
        raise RoutineError(f"no forecast for {city!r}; known: {', '.join(sorted(WEATHER))}")
    return {"city": city, "forecast": found[0], "temperature_c": found[1]}


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def calendar_free_slots(body: dict[str, Any]) -> dict[str, Any]:
    try:
        day = dt.date.fromisoformat(body["date"])
    except ValueError:
        raise RoutineError(f"not a date: {body['date']!r} (use YYYY-MM-DD)") from None
    need = int(body["duration_minutes"])
    slots, cursor = [], _minutes("09:00")
    for start, end in [*BUSY[day.weekday()], ("17:00", "17:00")]:
        if _minutes(start) - cursor >= need:
            slots.append({"start": _hhmm(cursor), "end": _hhmm(_minutes(start))})
        cursor = max(cursor, _minutes(end))
    return {"date": day.isoformat(), "slots": slots}


def math_add(body: dict[str, Any]) -> dict[str, Any]:
    return {"sum": body["a"] + body["b"]}


def demo_capabilities(published: Iterable[str] = ("weather.lookup", "math.add")
                      ) -> list[Capability]:
    """The demo's three capabilities; those in ``published`` get a registered PD (a routine
    from the start), the others are reached by negotiation."""
    published = set(published)
    specs = [
        ("weather.lookup", WEATHER_INPUT, WEATHER_OUTPUT, weather_lookup,
         "today's weather forecast for a city"),
        ("calendar.free_slots", CALENDAR_INPUT, CALENDAR_OUTPUT, calendar_free_slots,
         "free time slots on a date in working hours"),
        ("math.add", ADD_INPUT, ADD_OUTPUT, math_add, "adding two numbers"),
    ]
    return [Capability(kind, inp, out, handler, description, publish=kind in published)
            for kind, inp, out, handler, description in specs]


# ---------------------------------------------------------------------------------------------
# Registry and transport


class LoopClientRegistry(ClientRegistry):
    """The coordinator's registry for an agent running in worker threads of a daemon whose
    gRPC client (``sdk.client.AsyncClient``, async) lives on the daemon's event loop."""

    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop,
                 timeout: float = 30.0) -> None:
        super().__init__(self)
        self._async = client
        self._loop = loop
        self._timeout = timeout

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout)

    # the blocking client interface ClientRegistry expects
    def register_protocol(self, document: pb.ProtocolDocument) -> pb.ProtocolDocument:
        return self._run(self._async.register_protocol(document))

    def get_protocol(self, hash_: str) -> pb.ProtocolDocument:
        return self._run(self._async.get_protocol(hash_))

    def list_protocols(self, task_kind: str = "") -> list[pb.ProtocolDocument]:
        return self._run(self._async.list_protocols(task_kind))

    def record_protocol_use(self, hash_: str, count: int = 1) -> pb.ProtocolDocument:
        return self._run(self._async.record_protocol_use(hash_, count))


def grpc_peer(name: str, address: str, *, timeout: float = 120.0,
              credentials: grpc.ChannelCredentials | None = None) -> Peer:
    """Another node's agent, reached through its peer service (``NodePeer.AgentMessage``)."""
    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else tls_channel(address))  # the node's --tls, if any
    stub = node_grpc.NodePeerStub(channel)

    def send(envelope: node_pb2.AgentEnvelope) -> node_pb2.AgentEnvelope:
        return stub.AgentMessage(envelope, timeout=timeout)

    peer = Peer(name, send)
    peer.channel = channel  # type: ignore[attr-defined]  # so callers can close it
    return peer


# ---------------------------------------------------------------------------------------------
# The service


class NodeAgentService:
    """The node side of ``NodePeer.AgentMessage``: hands each envelope to the node's ``Agent``
    in a worker thread (routines are quick, the model is not), at most ``concurrency`` at a
    time, so a burst of natural-language requests cannot starve the daemon's event loop."""

    def __init__(self, agent: Agent, *, concurrency: int = 4, client: Any = None) -> None:
        self.agent = agent
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._client = client
        self._verifier: AgentMessageVerifier | None = None

    @classmethod
    async def for_node(cls, name: str, *, coordinator: str = "", model: str = "smollm2",
                       device: str = "auto", capabilities: Iterable[Capability] | None = None,
                       chat: ChatModel | None = None, **agent_options: Any
                       ) -> NodeAgentService:
        """The agent of a running node daemon (call inside its event loop): the model is
        loaded on first use, the registry is the coordinator at ``coordinator`` ("" = none),
        the capabilities default to the demo's."""
        client, registry = None, None
        if coordinator:
            from confide.sdk.client import AsyncClient

            client = AsyncClient(coordinator)
            registry = LoopClientRegistry(client, asyncio.get_running_loop())
        agent = Agent(name, chat or LazyChat(model, device=device), registry=registry,
                      **agent_options)
        service = cls(agent, client=client)
        for capability in (demo_capabilities() if capabilities is None else capabilities):
            await asyncio.to_thread(service.publish, capability)
        return service

    def publish(self, capability: Capability) -> None:
        """Serve ``capability``; publish its routine at the registry when it can be reached
        (unpublished routines still answer peers that know their document)."""
        try:
            self.agent.add_capability(capability)
        except Exception as exc:  # registry unreachable: serve it locally, register later
            log.warning("agent %s: could not register %s (%s); it is served unpublished",
                        self.agent.name, capability.task_kind, exc)
            self.agent.add_capability(Capability(
                capability.task_kind, capability.input_schema, capability.output_schema,
                capability.handler, capability.description, publish=False))

    @classmethod
    def for_agent(cls, name: str, model: ChatModel | None, *, registry: Registry | None = None,
                  capabilities: Iterable[Capability] | None = None,
                  **agent_options: Any) -> NodeAgentService:
        """An in-process service (tests, benchmarks): no coordinator client of its own."""
        agent = Agent(name, model, registry=registry, **agent_options)
        for capability in (demo_capabilities() if capabilities is None else capabilities):
            agent.add_capability(capability)
        return cls(agent)

    async def handle(self, envelope: node_pb2.AgentEnvelope) -> node_pb2.AgentEnvelope:
        async with self._semaphore:  # checks of anonymous messages count against it too
            if envelope.anonymous:
                refused = await self._check_anonymous(envelope)
                if refused:
                    return node_pb2.AgentEnvelope(task_kind=envelope.task_kind,
                                                  handled_by="error",
                                                  error=f"UNAUTHENTICATED: {refused}")
            return await asyncio.to_thread(self.agent.handle, envelope)

    async def _check_anonymous(self, envelope: node_pb2.AgentEnvelope) -> str | None:
        """Verify an anonymous message's ring signature against the coordinator's registry
        ring (``node.anonymous.AgentMessageVerifier``)."""
        if self._client is None:
            return "this node knows no coordinator, so no ring to check anonymous messages"
        if self._verifier is None:
            loop = asyncio.get_running_loop()

            def fetch_ring() -> pb.Ring:
                future = asyncio.run_coroutine_threadsafe(self._client.get_ring(""), loop)
                return future.result(timeout=30)

            self._verifier = AgentMessageVerifier(fetch_ring)
        try:
            return await asyncio.to_thread(self._verifier.check, envelope)
        except Exception as exc:  # the coordinator unreachable, ...
            return f"cannot check the ring signature now: {exc}"

    async def close(self) -> None:
        await asyncio.to_thread(self.agent.flush_usage)
        if self._client is not None:
            await self._client.close()
