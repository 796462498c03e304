"""Agora: a scalable communication protocol for networks of language-model agents.

After Marro et al., "A Scalable Communication Protocol for Networks of Large Language Models"
(2024). Agents that talk often should not pay a language model for every message, and agents
that talk rarely should not need a standard agreed in advance. Agora lets both coexist:

- **Natural language** is the universal fallback: any agent can ask any other anything; the
  receiver's model reads the text and answers. When the receiver has a capability for the
  message's task kind, its model uses it as a tool first (extracts the handler's input as JSON,
  the handler runs, the result goes into the answering prompt), so the answer can rest on the
  node's own data. Flexible, and expensive: every message costs model calls and tokens.
- **Protocol documents (PDs)** describe one kind of exchange: its task kind, rules in plain
  words, and the JSON Schemas of the request and response bodies. A PD is identified by the
  SHA-256 of its canonical JSON, so a message need only carry the hash; the full document is
  shared once, through the coordinator's registry (``coordinator.protocols``).
- **Routines** implement a PD: here, a handler function the node's operator registered for a
  capability (``Capability``), bound to the PD. A message under a PD the receiver has a routine
  for is validated against the request schema, answered by the handler, and the answer is
  validated against the response schema: no model call at all. Routines are data plus
  registered Python callables; code written by a model is never executed.
- **Negotiation** fills the middle: when two agents have exchanged natural language about one
  task kind ``negotiate_after`` times (default 3), the requester proposes a protocol. The
  receiver's model drafts the PD's words (name, description, rules: JSON through
  ``agents.jsonrepair.ask_json_reply``, decoded under the schema's grammar when the model is
  local, so valid by construction); its schemas are the capability's own. When the draft is
  still unusable (a remote model without structured output), the receiver falls back to a
  deterministic draft made from the capability. Both sides check the PD (the receiver:
  compatibility with its capability; the requester: its own request bodies validate against
  the request schema), the receiver registers it, and later messages of that kind travel as
  hash + JSON body.

How a receiver answers a message (``Agent.handle``), and what ``handled_by`` says:

- ``routine``: the hash names a PD bound to a routine the node registered itself;
- ``protocol``: the hash was another agent's PD, fetched from the registry; the receiver has a
  capability compatible with it (rule below), bound it to a routine, and answered with it;
- ``negotiated``: the hash names a PD this agent negotiated with another agent;
- ``natural``: the receiver's model answered (a natural-language request, or a PD the receiver
  cannot serve: it then answers the body in natural language and the requester stops using
  that PD with it);
- ``error``: the request was invalid or the handler failed; ``error`` says why.

**Compatibility rule** (``compatibility``). A PD with request schema R and response schema S
is served by a capability with input schema I and output schema O when the task kinds are
equal, every property I requires is required by R (so every valid request carries what the
handler needs), every property R requires is a property I declares (so the handler knows what
each required field means), every property S requires is required by O (so every handler
answer supplies it), and every property the two sides both declare agrees in JSON type and,
where the capability lists an ``enum``, in values. At run time the body is still validated
against R and I, and the answer against O and S: the rule decides what to accept, validation
guards every message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from confide.agents.constrained import fit_budget
from confide.agents.jsonrepair import AskJSONError, ask_json_reply
from confide.agents.model import ChatModel, Message, ModelError, Usage
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2

__all__ = [
    "HANDLED_BY",
    "NEGOTIATE",
    "Agent",
    "AgoraCounters",
    "AgoraError",
    "Capability",
    "ClientRegistry",
    "Exchange",
    "MemoryRegistry",
    "Peer",
    "ProtocolDocument",
    "Registry",
    "Routine",
    "RoutineError",
    "compatibility",
    "document_for_capability",
    "wire_size",
]

log = logging.getLogger(__name__)

NEGOTIATE = "agora.negotiate"
"""The reserved ``protocol_hash`` of negotiation messages (never a SHA-256 hex digest)."""
HANDLED_BY = ("routine", "protocol", "negotiated", "natural", "error")

MAX_NAME = 128
MAX_DESCRIPTION = 2_000
MAX_RULES = 8_000
MAX_SCHEMA_BYTES = 32_768
MAX_DOCUMENT_BYTES = 96_000
MAX_BODY_BYTES = 65_536
MAX_TEXT = 16_384
TASK_KIND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
HASH = re.compile(r"^[0-9a-f]{64}$")

_DEFAULT_RULES = ("One round. The requester sends one JSON body that matches request_schema; "
                  "the server answers with one JSON body that matches response_schema, or "
                  "with an error saying why it cannot.")


class AgoraError(ValueError):
    """An invalid protocol document, envelope or body; the message says what to fix."""


class RoutineError(AgoraError):
    """A routine could not answer a body (it did not validate, or the handler refused)."""


def wire_size(envelope: node_pb2.AgentEnvelope) -> int:
    """Bytes the envelope costs on the wire: the protobuf message plus gRPC's 5-byte prefix."""
    return envelope.ByteSize() + 5


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _local_refs_only(schema: Any, path: str = "") -> None:
    """Reject ``$ref``s that leave the document: validation must never fetch anything."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("$ref", "$dynamicRef") and not (isinstance(value, str)
                                                         and value.startswith("#")):
                raise AgoraError(f"{path or 'schema'}: only local references ('#...') are "
                                 f"allowed, got {key}={value!r}")
            _local_refs_only(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            _local_refs_only(value, f"{path}/{index}")


def check_schema(schema: Any, what: str) -> None:
    """A JSON Schema (Draft 2020-12) object of bounded size, with local references only."""
    if not isinstance(schema, dict):
        raise AgoraError(f"{what} must be a JSON object (a JSON Schema), got "
                         f"{type(schema).__name__}")
    size = len(_canonical(schema).encode())
    if size > MAX_SCHEMA_BYTES:
        raise AgoraError(f"{what} is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    _local_refs_only(schema, what)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise AgoraError(f"{what} is not a valid JSON Schema (Draft 2020-12) at {where}: "
                         f"{exc.message}") from None


# --------------------------------------------------------------------------------------------
# Protocol documents


@dataclass(frozen=True)
class ProtocolDocument:
    """An Agora PD. Its identity is ``hash``: SHA-256 of the canonical JSON of every field but
    ``uses`` (schemas as their canonical JSON text, keys sorted, no whitespace, UTF-8), so
    the same document written with other whitespace or key order has the same hash."""

    name: str
    task_kind: str
    request_schema: dict[str, Any]
    response_schema: dict[str, Any]
    description: str = ""
    rules: str = ""
    multiround: bool = False
    uses: int = field(default=0, compare=False)

    def fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "task_kind": self.task_kind,
            "multiround": bool(self.multiround),
            "rules": self.rules,
            "request_schema": _canonical(self.request_schema),
            "response_schema": _canonical(self.response_schema),
        }

    def canonical(self) -> bytes:
        return _canonical(self.fields()).encode("utf-8")

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    def validate(self) -> ProtocolDocument:
        """Raise ``AgoraError`` unless this is a document an agent can act on; returns self."""
        for what, value, limit in (("name", self.name, MAX_NAME),
                                   ("description", self.description, MAX_DESCRIPTION),
                                   ("rules", self.rules, MAX_RULES)):
            if not isinstance(value, str):
                raise AgoraError(f"{what} must be text, got {type(value).__name__}")
            if len(value) > limit:
                raise AgoraError(f"{what} is {len(value)} characters; the limit is {limit}")
        if not self.name.strip():
            raise AgoraError("name must not be empty")
        if not isinstance(self.task_kind, str) or not TASK_KIND.match(self.task_kind):
            raise AgoraError(f"task_kind must be 1-128 characters of letters, digits and "
                             f"'_.:/-' starting with a letter or digit (e.g. 'weather.lookup'), "
                             f"got {self.task_kind!r}")
        check_schema(self.request_schema, "request_schema")
        check_schema(self.response_schema, "response_schema")
        size = len(self.canonical())
        if size > MAX_DOCUMENT_BYTES:
            raise AgoraError(f"the document is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}")
        return self

    # ---- conversions

    def to_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "name": self.name, "description": self.description,
                "task_kind": self.task_kind, "multiround": self.multiround,
                "rules": self.rules, "request_schema": self.request_schema,
                "response_schema": self.response_schema, "uses": self.uses}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, check_hash: bool = True) -> ProtocolDocument:
        """From ``to_dict``'s form (schemas as objects or as JSON text); validates, and checks
        a given ``hash`` against the content."""
        if not isinstance(data, Mapping):
            raise AgoraError(f"a protocol document is a JSON object, got {type(data).__name__}")
        try:
            doc = cls(
                name=data.get("name", ""),
                task_kind=data.get("task_kind", ""),
                request_schema=_schema_value(data.get("request_schema"), "request_schema"),
                response_schema=_schema_value(data.get("response_schema"), "response_schema"),
                description=data.get("description", "") or "",
                rules=data.get("rules", "") or "",
                multiround=bool(data.get("multiround", False)),
                uses=int(data.get("uses", 0) or 0),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, AgoraError):
                raise
            raise AgoraError(f"malformed protocol document: {exc}") from None
        doc.validate()
        claimed = data.get("hash") or ""
        if check_hash and claimed and claimed != doc.hash:
            raise AgoraError(f"hash {str(claimed)[:64]!r} does not match the document's content "
                             f"(SHA-256 of its canonical form is {doc.hash})")
        return doc

    def to_proto(self) -> pb.ProtocolDocument:
        return pb.ProtocolDocument(
            hash=self.hash, name=self.name, description=self.description,
            task_kind=self.task_kind, multiround=self.multiround, rules=self.rules,
            request_schema=_canonical(self.request_schema),
            response_schema=_canonical(self.response_schema), uses=self.uses)

    @classmethod
    def from_proto(cls, message: pb.ProtocolDocument, *,
                   check_hash: bool = True) -> ProtocolDocument:
        return cls.from_dict({
            "hash": message.hash, "name": message.name, "description": message.description,
            "task_kind": message.task_kind, "multiround": message.multiround,
            "rules": message.rules, "request_schema": message.request_schema,
            "response_schema": message.response_schema, "uses": message.uses,
        }, check_hash=check_hash)

    def with_uses(self, uses: int) -> ProtocolDocument:
        return ProtocolDocument(self.name, self.task_kind, self.request_schema,
                                self.response_schema, self.description, self.rules,
                                self.multiround, uses)


def _schema_value(value: Any, what: str) -> Any:
    if isinstance(value, str):
        if len(value) > MAX_SCHEMA_BYTES * 4:
            raise AgoraError(f"{what} is {len(value)} characters; the limit is "
                             f"{MAX_SCHEMA_BYTES}")
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise AgoraError(f"{what} is not JSON text") from None
    if value is None:
        raise AgoraError(f"{what} is missing")
    return value


# --------------------------------------------------------------------------------------------
# Capabilities, routines and compatibility


@dataclass(frozen=True)
class Capability:
    """Something a node can do for other agents without a model: a registered handler with
    the JSON Schemas of its input and output. ``publish`` registers a PD for it up front (a
    routine other agents can use at once); unpublished capabilities are reached through
    negotiation."""

    task_kind: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    handler: Callable[[dict[str, Any]], Any]
    description: str = ""
    publish: bool = True

    def __post_init__(self) -> None:
        if not TASK_KIND.match(self.task_kind or ""):
            raise AgoraError(f"invalid task kind {self.task_kind!r}")
        check_schema(self.input_schema, f"{self.task_kind} input schema")
        check_schema(self.output_schema, f"{self.task_kind} output schema")


def document_for_capability(capability: Capability) -> ProtocolDocument:
    """The deterministic PD of a capability: its own schemas, fixed rules. Two nodes with the
    same capability derive the same document (the same hash), so they converge on one PD."""
    return ProtocolDocument(
        name=capability.task_kind,
        task_kind=capability.task_kind,
        request_schema=capability.input_schema,
        response_schema=capability.output_schema,
        description=capability.description or f"Requests of kind {capability.task_kind}.",
        rules=_DEFAULT_RULES,
    ).validate()


def _types(schema: Any) -> set[str] | None:
    if not isinstance(schema, dict) or "type" not in schema:
        return None
    kind = schema["type"]
    names = set(kind) if isinstance(kind, list) else {kind}
    if "number" in names:
        names.add("integer")
    return names


def _agree(ours: Any, theirs: Any) -> str:
    """'' when two property schemas agree in type and enum values, else why not."""
    a, b = _types(ours), _types(theirs)
    if a is not None and b is not None and not (a & b):
        return f"type {sorted(b)} vs {sorted(a)}"
    if isinstance(ours, dict) and isinstance(theirs, dict) and "enum" in ours:
        extra = [v for v in theirs.get("enum", []) if v not in ours["enum"]]
        if "enum" in theirs and extra:
            return f"values {extra!r} are not among {ours['enum']!r}"
    return ""


def _props(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    props = schema.get("properties", {})
    required = schema.get("required", [])
    return (props if isinstance(props, dict) else {},
            {r for r in required if isinstance(r, str)} if isinstance(required, list) else set())


def compatibility(document: ProtocolDocument, capability: Capability) -> str:
    """'' when ``capability`` can serve ``document`` (the rule in the module docstring), else
    the first reason it cannot."""
    if document.task_kind != capability.task_kind:
        return f"task kind {document.task_kind!r} is not {capability.task_kind!r}"
    if _canonical(document.request_schema) == _canonical(capability.input_schema) and \
            _canonical(document.response_schema) == _canonical(capability.output_schema):
        return ""
    r_props, r_req = _props(document.request_schema)
    i_props, i_req = _props(capability.input_schema)
    if missing := sorted(i_req - r_req):
        return f"the request schema does not require {missing}, which the handler needs"
    if unknown := sorted(r_req - set(i_props)):
        return f"the request schema requires {unknown}, which the handler does not know"
    for name in sorted(set(r_props) & set(i_props)):
        if why := _agree(i_props[name], r_props[name]):
            return f"request field {name!r} disagrees: {why}"
    s_props, s_req = _props(document.response_schema)
    o_props, o_req = _props(capability.output_schema)
    if missing := sorted(s_req - o_req):
        return f"the response schema requires {missing}, which the handler does not promise"
    for name in sorted(set(s_props) & set(o_props)):
        if why := _agree(s_props[name], o_props[name]):
            return f"response field {name!r} disagrees: {why}"
    return ""


def _validate(validator: Draft202012Validator, value: Any, what: str) -> None:
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "top level"
        raise RoutineError(f"{what} is invalid at {where}: {errors[0].message}")


@dataclass
class Routine:
    """A capability bound to a PD: validate, project, call the handler, validate, project.

    ``origin`` is what ``handled_by`` reports: ``routine`` (registered by this node),
    ``protocol`` (another agent's PD this node adopted), ``negotiated``.
    """

    document: ProtocolDocument
    capability: Capability
    origin: str = "routine"

    def __post_init__(self) -> None:
        self._request = Draft202012Validator(self.document.request_schema)
        self._response = Draft202012Validator(self.document.response_schema)
        self._input = Draft202012Validator(self.capability.input_schema)
        self._output = Draft202012Validator(self.capability.output_schema)

    def run(self, body: Any) -> Any:
        _validate(self._request, body, "the request body")
        inputs = body
        i_props, _ = _props(self.capability.input_schema)
        if isinstance(body, dict) and i_props:
            inputs = {k: v for k, v in body.items() if k in i_props}
        _validate(self._input, inputs, "the request, as the handler reads it,")
        try:
            output = self.capability.handler(inputs)
        except RoutineError:
            raise
        except (KeyError, ValueError, TypeError, LookupError) as exc:
            raise RoutineError(f"{self.capability.task_kind}: {exc}") from None
        _validate(self._output, output, "the handler's answer")
        s_props, _ = _props(self.document.response_schema)
        if isinstance(output, dict) and s_props and \
                self.document.response_schema.get("additionalProperties") is False:
            output = {k: v for k, v in output.items() if k in s_props}
        _validate(self._response, output, "the response body")
        return output


# --------------------------------------------------------------------------------------------
# Registries


class Registry(Protocol):
    """Where PDs are shared: the coordinator's registry, or ``MemoryRegistry`` in a process."""

    def register(self, document: ProtocolDocument) -> ProtocolDocument: ...

    def get(self, hash_: str) -> ProtocolDocument | None: ...

    def list(self, task_kind: str = "") -> list[ProtocolDocument]: ...

    def record_use(self, hash_: str, count: int) -> None: ...


class MemoryRegistry:
    """An in-process registry with the coordinator's semantics (idempotent register, usage
    counts, most-used first), for tests and in-process benchmarks."""

    def __init__(self) -> None:
        self._docs: dict[str, ProtocolDocument] = {}
        self._order: list[str] = []
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()

    def register(self, document: ProtocolDocument) -> ProtocolDocument:
        document.validate()
        with self._lock:
            self.calls["register"] += 1
            if document.hash not in self._docs:
                self._docs[document.hash] = document.with_uses(0)
                self._order.append(document.hash)
            return self._docs[document.hash]

    def get(self, hash_: str) -> ProtocolDocument | None:
        with self._lock:
            self.calls["get"] += 1
            return self._docs.get(hash_)

    def list(self, task_kind: str = "") -> list[ProtocolDocument]:
        with self._lock:
            self.calls["list"] += 1
            docs = [self._docs[h] for h in self._order
                    if not task_kind or self._docs[h].task_kind == task_kind]
        return sorted(docs, key=lambda d: -d.uses)

    def record_use(self, hash_: str, count: int) -> None:
        with self._lock:
            self.calls["record_use"] += 1
            doc = self._docs.get(hash_)
            if doc is None:
                raise KeyError(f"no protocol {hash_}")
            self._docs[hash_] = doc.with_uses(doc.uses + count)


class ClientRegistry:
    """The coordinator's registry through a blocking client (``sdk.client.Client``
    or anything with its four protocol methods): the ``Registry`` an agent outside the
    coordinator uses."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def register(self, document: ProtocolDocument) -> ProtocolDocument:
        return ProtocolDocument.from_proto(self.client.register_protocol(document.to_proto()))

    def get(self, hash_: str) -> ProtocolDocument | None:
        import grpc

        try:
            return ProtocolDocument.from_proto(self.client.get_protocol(hash_))
        except Exception as exc:
            if getattr(exc, "code", None) == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def list(self, task_kind: str = "") -> list[ProtocolDocument]:
        return [ProtocolDocument.from_proto(d) for d in self.client.list_protocols(task_kind)]

    def record_use(self, hash_: str, count: int) -> None:
        self.client.record_protocol_use(hash_, count)


# --------------------------------------------------------------------------------------------
# Agents


@dataclass
class Peer:
    """Another agent as the sender sees it: a name and a way to deliver an envelope."""

    name: str
    send: Callable[[node_pb2.AgentEnvelope], node_pb2.AgentEnvelope]


@dataclass
class Exchange:
    """One request and its answer, from the requester's side."""

    task_kind: str
    mode: str                      # how it was sent: "protocol" or "natural"
    handled_by: str                # how the receiver handled it
    body: Any = None               # the structured answer, under a protocol
    text: str = ""                 # the natural-language answer
    error: str = ""
    protocol_hash: str = ""
    usage: Usage = field(default_factory=Usage)   # the receiver's model tokens
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class AgoraCounters:
    """What an agent did: messages it handled by kind, what it sent, model use, bytes."""

    handled: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    model_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    bytes_sent: int = 0
    bytes_received: int = 0
    fetches: int = 0
    negotiations: int = 0
    negotiations_failed: int = 0
    drafts: Counter[str] = field(default_factory=Counter)   # "model" / "fallback"
    #: model calls that had to answer JSON (tool arguments, drafts), and those whose first
    #: answer was, as written, valid against the schema
    structured_calls: int = 0
    structured_valid: int = 0

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.handled.values())
        return {
            "structured_calls": self.structured_calls,
            "structured_valid": self.structured_valid,
            "handled": dict(self.handled),
            "handled_share": {k: (self.handled[k] / total if total else 0.0)
                              for k in HANDLED_BY},
            "sent": dict(self.sent),
            "model_calls": self.model_calls,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "fetches": self.fetches,
            "negotiations": self.negotiations,
            "negotiations_failed": self.negotiations_failed,
            "drafts": dict(self.drafts),
        }


_DRAFT_SCHEMA = {
    "type": "object",
    "required": ["name", "description", "rules"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
        "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
        "rules": {"type": "string", "maxLength": MAX_RULES},
    },
}
"""What a model drafts of a PD: its words (bounded to the call's budget by ``fit_budget``)."""


class Agent:
    """One Agora agent: answers envelopes (``handle``) and sends requests (``ask``).

    ``model`` answers natural language and drafts PDs. The registry hooks are plain callables
    so an agent works in-process (``MemoryRegistry``) or against the coordinator:
    ``fetcher(hash) -> PD | None``, ``registrar(PD) -> PD``, ``lister(task_kind) -> [PD]``
    (lets a requester reuse PDs other agents negotiated) and ``reporter(hash, count)`` (usage
    counts, sent every ``report_every`` uses and on ``flush_usage``). Thread-safe.
    """

    def __init__(self, name: str, model: ChatModel | None, *,
                 fetcher: Callable[[str], ProtocolDocument | None] | None = None,
                 registrar: Callable[[ProtocolDocument], ProtocolDocument] | None = None,
                 lister: Callable[[str], list[ProtocolDocument]] | None = None,
                 reporter: Callable[[str, int], None] | None = None,
                 registry: Registry | None = None,
                 negotiate_after: int = 3, answer_tokens: int = 96, draft_tokens: int = 384,
                 draft_retries: int = 1, report_every: int = 10,
                 discover_ttl_s: float = 30.0, use_tools: bool = True,
                 extract_tokens: int = 64) -> None:
        if registry is not None:
            fetcher = fetcher or registry.get
            registrar = registrar or registry.register
            lister = lister or registry.list
            reporter = reporter or registry.record_use
        self.name = name
        self.model = model
        self.fetcher, self.registrar, self.lister, self.reporter = (
            fetcher, registrar, lister, reporter)
        self.negotiate_after = max(1, negotiate_after)
        self.answer_tokens = answer_tokens
        self.draft_tokens = draft_tokens
        self.draft_retries = draft_retries
        self.report_every = max(1, report_every)
        self.discover_ttl_s = discover_ttl_s
        self.use_tools = use_tools
        self.extract_tokens = extract_tokens
        self.counters = AgoraCounters()
        self.capabilities: dict[str, list[Capability]] = {}
        self.routines: dict[str, Routine] = {}
        self._documents: dict[str, ProtocolDocument] = {}    # every PD seen, by hash
        self._declined: dict[str, str] = {}                  # hash -> why this agent cannot
        self._missing: dict[str, float] = {}                 # hash -> when a fetch found none
        # requester side, keyed by (peer name, task kind)
        self._known: dict[tuple[str, str], ProtocolDocument] = {}
        self._refused: set[tuple[str, str]] = set()          # (peer, hash) the peer declined
        self._natural: Counter[tuple[str, str]] = Counter()
        self._examples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._listed: dict[str, tuple[float, list[ProtocolDocument]]] = {}
        self._pending_uses: Counter[str] = Counter()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ set-up

    def add_capability(self, capability: Capability) -> ProtocolDocument | None:
        """Register a handler. A published capability gets its deterministic PD, registered
        and bound as a ``routine``; returns that PD (None when unpublished)."""
        document = None
        if capability.publish:  # register first: a failure leaves the agent unchanged
            document = document_for_capability(capability)
            if self.registrar is not None:
                document = self.registrar(document)
        with self._lock:
            self.capabilities.setdefault(capability.task_kind, []).append(capability)
            if document is not None:
                self._documents[document.hash] = document
                self.routines[document.hash] = Routine(document, capability, "routine")
        return document

    def capability_for(self, document: ProtocolDocument) -> tuple[Capability | None, str]:
        """This agent's first capability compatible with ``document``, or the reason none is."""
        reasons = []
        for capability in self.capabilities.get(document.task_kind, []):
            why = compatibility(document, capability)
            if not why:
                return capability, ""
            reasons.append(why)
        return None, "; ".join(reasons) or f"no capability for task kind {document.task_kind!r}"

    # ------------------------------------------------------------------ receiving

    def handle(self, envelope: node_pb2.AgentEnvelope) -> node_pb2.AgentEnvelope:
        """Answer one envelope. Never raises: failures come back as ``handled_by="error"``."""
        with self._lock:
            self.counters.bytes_received += wire_size(envelope)
        try:
            if envelope.protocol_hash == NEGOTIATE:
                reply = self._on_negotiate(envelope)
            elif envelope.protocol_hash:
                reply = self._on_protocol(envelope)
            else:
                reply = self._on_natural(envelope)
        except AgoraError as exc:
            reply = _error(str(exc))
        except ModelError as exc:
            reply = _error(f"the model failed: {exc}")
        except Exception as exc:  # a bad request never takes the agent down
            log.exception("agent %s failed on a message", self.name)
            reply = _error(f"{type(exc).__name__}: {exc}")
        reply.sender = self.name
        reply.task_kind = envelope.task_kind
        with self._lock:
            if envelope.protocol_hash != NEGOTIATE:
                self.counters.handled[reply.handled_by] += 1
            self.counters.bytes_sent += wire_size(reply)
        return reply

    def _model_call(self, messages: list[Message], max_tokens: int) -> tuple[str, Usage]:
        if self.model is None:
            raise ModelError(f"agent {self.name} has no model for natural language")
        completion = self.model.chat(messages, max_tokens=max_tokens)
        self._count_model(1, completion.usage)
        return completion.text, completion.usage

    def _use_tool(self, capability: Capability, text: str) -> tuple[str, Usage]:
        """Natural language with tools: the model extracts the capability's input from the
        text (JSON, validated against the input schema), the handler runs on it. Returns a
        note with the result for the answering prompt ('' when extraction failed)."""
        assert self.model is not None
        messages = [{"role": "system", "content": "Extract the parameters of the request as "
                     "JSON. Use only values the request states."},
                    {"role": "user", "content": text[:MAX_TEXT]}]
        # a subset of the input schema that fits the budget: a constrained answer is whole
        schema, budget = fit_budget(capability.input_schema, self.extract_tokens)
        try:
            reply = ask_json_reply(self.model, messages, schema, 0, max_tokens=budget)
        except AskJSONError as exc:
            self._count_model(exc.attempts, exc.usage, False)
            return "", exc.usage
        self._count_model(reply.attempts, reply.usage, reply.valid)
        try:
            output = capability.handler(reply.value)
            _validate(Draft202012Validator(capability.output_schema), output, "tool output")
        except (RoutineError, KeyError, ValueError, TypeError, LookupError) as exc:
            return f"The {capability.task_kind} tool failed: {exc}", reply.usage
        return (f"Result of {capability.task_kind} for {_canonical(reply.value)}: "
                f"{_canonical(output)}", reply.usage)

    def _count_model(self, calls: int, usage: Usage, valid: bool | None = None) -> None:
        """``valid``: for a structured (JSON) exchange, whether its first answer was valid."""
        with self._lock:
            self.counters.model_calls += calls
            self.counters.usage = self.counters.usage + usage
            if valid is not None:
                self.counters.structured_calls += 1
                self.counters.structured_valid += valid

    def _answer_naturally(self, text: str, task_kind: str = "") -> node_pb2.AgentEnvelope:
        about = "; ".join(c.description or c.task_kind
                          for caps in self.capabilities.values() for c in caps)
        system = (f"You are {self.name}, an agent that helps other agents. "
                  + (f"You can help with: {about}. " if about else "")
                  + "Answer the request briefly, in one or two sentences.")
        spent = Usage()
        capabilities = self.capabilities.get(task_kind, [])
        if capabilities and self.use_tools and self.model is not None:
            note, spent = self._use_tool(capabilities[0], text)
            if note:
                system += f" {note}. Base your answer on it."
        answer, usage = self._model_call(
            [{"role": "system", "content": system}, {"role": "user", "content": text[:MAX_TEXT]}],
            self.answer_tokens)
        usage = usage + spent
        return node_pb2.AgentEnvelope(text=answer, handled_by="natural",
                                      prompt_tokens=usage.prompt_tokens,
                                      completion_tokens=usage.completion_tokens)

    def _on_natural(self, envelope: node_pb2.AgentEnvelope) -> node_pb2.AgentEnvelope:
        text = envelope.text.strip()
        if not text and envelope.body:
            text = f"Please handle this {envelope.task_kind or ''} request: {envelope.body}"
        if not text:
            raise AgoraError("empty message: give text (natural language) or protocol_hash "
                             "and body")
        return self._answer_naturally(text, envelope.task_kind)

    def _lookup(self, hash_: str) -> tuple[Routine | None, str]:
        """The routine for ``hash_``, adopting a fetched PD when compatible; or why not."""
        with self._lock:
            routine = self.routines.get(hash_)
            if routine is not None:
                return routine, ""
            if hash_ in self._declined:
                return None, self._declined[hash_]
            missing_since = self._missing.get(hash_)
        if missing_since is not None and time.monotonic() - missing_since < 60:
            return None, "unknown protocol"
        if self.fetcher is None:
            return None, "unknown protocol and no registry to fetch it from"
        with self._lock:
            self.counters.fetches += 1
        try:
            document = self.fetcher(hash_)
        except Exception as exc:  # registry down: answer in natural language instead
            log.warning("agent %s: fetching protocol %s failed: %s", self.name, hash_[:12], exc)
            return None, f"the registry could not be reached ({exc})"
        if document is None or document.hash != hash_:
            with self._lock:
                if len(self._missing) >= 4096:  # hashes anyone can invent: keep this bounded
                    self._missing.clear()
                self._missing[hash_] = time.monotonic()
            return None, "the registry has no such protocol"
        capability, why = self.capability_for(document)
        with self._lock:
            self._documents[hash_] = document
            if capability is None:
                self._declined[hash_] = why
                return None, why
            routine = self.routines.setdefault(hash_, Routine(document, capability, "protocol"))
        return routine, ""

    def _on_protocol(self, envelope: node_pb2.AgentEnvelope) -> node_pb2.AgentEnvelope:
        hash_ = envelope.protocol_hash
        if not HASH.match(hash_):
            raise AgoraError(f"protocol_hash must be 64 lowercase hex characters (SHA-256), got "
                             f"{hash_[:70]!r}")
        if len(envelope.body) > MAX_BODY_BYTES:
            raise AgoraError(f"body is {len(envelope.body)} bytes; the limit is "
                             f"{MAX_BODY_BYTES}")
        try:
            body = json.loads(envelope.body) if envelope.body else None
        except (ValueError, RecursionError):
            raise AgoraError("body is not JSON") from None
        routine, why = self._lookup(hash_)
        if routine is None:
            # Cannot serve this PD: answer the request in natural language; the requester
            # sees handled_by="natural" and stops using the PD with us.
            reply = self._answer_naturally(
                f"A request of kind {envelope.task_kind or 'unknown'} arrived under a protocol "
                f"I do not support ({why}). Request: {envelope.body[:4000]}"
                + (f"\n{envelope.text[:4000]}" if envelope.text else ""), envelope.task_kind)
            reply.protocol_hash = hash_
            return reply
        if envelope.task_kind and envelope.task_kind != routine.document.task_kind:
            raise AgoraError(f"protocol {hash_[:12]} is for {routine.document.task_kind!r}, "
                             f"not {envelope.task_kind!r}")
        answer = routine.run(body)
        self._count_use(hash_)
        return node_pb2.AgentEnvelope(protocol_hash=hash_, body=_canonical(answer),
                                      handled_by=routine.origin)

    def _on_negotiate(self, envelope: node_pb2.AgentEnvelope) -> node_pb2.AgentEnvelope:
        try:
            proposal = json.loads(envelope.body) if envelope.body else {}
        except (ValueError, RecursionError):
            raise AgoraError("negotiation body is not JSON") from None
        if not isinstance(proposal, dict) or len(envelope.body) > MAX_BODY_BYTES:
            raise AgoraError("a negotiation body is a JSON object of at most 64 KiB")
        kind = envelope.task_kind
        capabilities = self.capabilities.get(kind, [])
        if not capabilities:
            raise AgoraError(f"{self.name} has no capability for {kind!r}: nothing to "
                             "negotiate, keep to natural language")
        capability = capabilities[0]
        examples = proposal.get("examples") if isinstance(proposal.get("examples"), list) else []
        document, usage = self._draft(capability, examples[:5])
        if self.registrar is not None:
            document = self.registrar(document)
        with self._lock:
            self._documents[document.hash] = document
            existing = self.routines.get(document.hash)
            if existing is None or existing.origin == "protocol":
                self.routines[document.hash] = Routine(document, capability, "negotiated")
        return node_pb2.AgentEnvelope(
            protocol_hash=NEGOTIATE, handled_by="negotiated",
            body=_canonical({"protocol": document.to_dict()}),
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)

    def _draft(self, capability: Capability,
               examples: list[Any]) -> tuple[ProtocolDocument, Usage]:
        """A PD for ``capability``: the model's draft when it is valid and compatible, else the
        deterministic one (what small models end up with)."""
        usage, attempts, source = Usage(), 0, "fallback"
        document: ProtocolDocument | None = None
        valid: bool | None = None
        if self.model is not None:
            prompt = (
                f"Two software agents exchange requests of kind '{capability.task_kind}' "
                f"({capability.description or 'no description'}). Design a protocol for it.\n"
                f"The serving agent accepts input matching this JSON Schema: "
                f"{_canonical(capability.input_schema)}\n"
                f"and answers with output matching: {_canonical(capability.output_schema)}\n"
                f"Requests seen so far: {_canonical(examples)[:2000]}\n"
                "Write a protocol document for these schemas: a short name, a description "
                "and rules saying how one exchange goes.")
            messages = [{"role": "system", "content": "You design communication protocols "
                         "between software agents."}, {"role": "user", "content": prompt}]
            # the model writes the words; the schemas are the capability's (a draft with
            # other schemas would be rejected by compatibility() anyway)
            schema, budget = fit_budget(_DRAFT_SCHEMA, self.draft_tokens)
            try:
                reply = ask_json_reply(self.model, messages, schema, self.draft_retries,
                                       max_tokens=budget)
                usage, attempts, draft = reply.usage, reply.attempts, reply.value
                valid = reply.valid
                document = ProtocolDocument(
                    name=draft["name"], task_kind=capability.task_kind,
                    request_schema=capability.input_schema,
                    response_schema=capability.output_schema,
                    description=draft.get("description", ""),
                    rules=draft.get("rules", "") or _DEFAULT_RULES).validate()
                why = compatibility(document, capability)
                if why:
                    raise AgoraError(f"the draft does not fit the capability: {why}")
                source = "model"
            except AskJSONError as exc:
                usage, attempts, document, valid = exc.usage, exc.attempts, None, False
                log.info("agent %s: no usable model draft (%s); using the capability's "
                         "schemas", self.name, exc)
            except (AgoraError, ModelError) as exc:
                attempts, document = max(attempts, 1), None
                log.info("agent %s: model draft rejected (%s); using the capability's schemas",
                         self.name, exc)
        self._count_model(attempts, usage, valid)
        with self._lock:
            self.counters.drafts[source] += 1
        if document is not None:
            return document, usage
        return document_for_capability(capability), usage

    def _count_use(self, hash_: str) -> None:
        flush = 0
        with self._lock:
            self._pending_uses[hash_] += 1
            if self.reporter is not None and self._pending_uses[hash_] >= self.report_every:
                flush = self._pending_uses.pop(hash_)
        if flush:
            self._report(hash_, flush)

    def _report(self, hash_: str, count: int) -> None:
        try:
            self.reporter(hash_, count)  # type: ignore[misc]
        except Exception as exc:  # usage counts are best effort
            log.warning("agent %s: reporting use of %s failed: %s", self.name, hash_[:12], exc)

    def flush_usage(self) -> None:
        """Report every pending use count to the registry now."""
        if self.reporter is None:
            return
        with self._lock:
            pending, self._pending_uses = self._pending_uses, Counter()
        for hash_, count in pending.items():
            self._report(hash_, count)

    # ------------------------------------------------------------------ sending

    def _candidates(self, task_kind: str) -> list[ProtocolDocument]:
        if self.lister is None:
            return []
        now = time.monotonic()
        with self._lock:
            cached = self._listed.get(task_kind)
        if cached is not None and now - cached[0] < self.discover_ttl_s:
            return cached[1]
        try:
            docs = self.lister(task_kind)
        except Exception as exc:
            log.warning("agent %s: listing protocols failed: %s", self.name, exc)
            docs = []
        with self._lock:
            self._listed[task_kind] = (now, docs)
        return docs

    def protocol_for(self, peer: str, task_kind: str, body: Any) -> ProtocolDocument | None:
        """The PD to use for this request: one agreed with ``peer``, else the most used one in
        the registry that ``body`` fits and ``peer`` has not declined; None: natural language."""
        if body is None:
            return None
        with self._lock:
            known = self._known.get((peer, task_kind))
        candidates = ([known] if known else []) + self._candidates(task_kind)
        for document in candidates:
            with self._lock:
                if (peer, document.hash) in self._refused:
                    continue
            if not list(Draft202012Validator(document.request_schema).iter_errors(body)):
                return document
        return None

    def ask(self, peer: Peer, task_kind: str, body: Any = None, text: str = "") -> Exchange:
        """Send one request to ``peer``: under a PD when one fits, else in natural language
        (``text``, or the body rendered as text); negotiates a PD after ``negotiate_after``
        natural-language exchanges about ``task_kind`` with that peer."""
        document = self.protocol_for(peer.name, task_kind, body)
        if document is not None:
            envelope = node_pb2.AgentEnvelope(sender=self.name, task_kind=task_kind,
                                              protocol_hash=document.hash,
                                              body=_canonical(body))
            exchange = self._send(peer, envelope, "protocol")
            if exchange.handled_by == "natural":
                # The peer cannot serve this PD (it answered in natural language instead):
                # stop offering it to that peer. An "error" is about this request only.
                with self._lock:
                    self._refused.add((peer.name, document.hash))
                    if self._known.get((peer.name, task_kind)) == document:
                        del self._known[(peer.name, task_kind)]
            return exchange
        return self._ask_natural(peer, task_kind, body, text)

    def _ask_natural(self, peer: Peer, task_kind: str, body: Any, text: str) -> Exchange:
        if not text:
            text = f"Please handle this {task_kind} request: {_canonical(body)}"
        envelope = node_pb2.AgentEnvelope(sender=self.name, task_kind=task_kind, text=text)
        exchange = self._send(peer, envelope, "natural")
        key = (peer.name, task_kind)
        due = False
        with self._lock:
            if body is not None:
                self._natural[key] += 1
                examples = self._examples.setdefault(key, [])
                examples.append({"text": text[:500], "body": body})
                del examples[:-3]
                due = self._natural[key] >= self.negotiate_after
        if due:
            self.negotiate(peer, task_kind)
        return exchange

    def _send(self, peer: Peer, envelope: node_pb2.AgentEnvelope, mode: str) -> Exchange:
        sent = wire_size(envelope)
        try:
            reply = peer.send(envelope)
        except Exception as exc:
            reply = _error(f"cannot reach {peer.name}: {exc}")
        received = wire_size(reply)
        with self._lock:
            self.counters.sent[mode] += 1
            self.counters.bytes_sent += sent
            self.counters.bytes_received += received
        body = None
        if reply.body and reply.handled_by != "error":
            with contextlib.suppress(ValueError, RecursionError):
                body = json.loads(reply.body)
        return Exchange(task_kind=envelope.task_kind, mode=mode, handled_by=reply.handled_by,
                        body=body, text=reply.text, error=reply.error,
                        protocol_hash=reply.protocol_hash,
                        usage=Usage(reply.prompt_tokens, reply.completion_tokens),
                        bytes_sent=sent, bytes_received=received)

    def negotiate(self, peer: Peer, task_kind: str) -> ProtocolDocument | None:
        """Propose a protocol for ``task_kind`` to ``peer``; adopt what it answers if our own
        request bodies fit it. On failure, natural language continues and the next attempt
        comes after another ``negotiate_after`` exchanges."""
        key = (peer.name, task_kind)
        with self._lock:
            examples = list(self._examples.get(key, []))
            self._natural[key] = 0
        envelope = node_pb2.AgentEnvelope(sender=self.name, task_kind=task_kind,
                                          protocol_hash=NEGOTIATE,
                                          body=_canonical({"task_kind": task_kind,
                                                           "examples": examples}))
        exchange = self._send(peer, envelope, "negotiate")
        document, why = None, exchange.error or f"peer answered {exchange.handled_by!r}"
        if exchange.handled_by == "negotiated" and isinstance(exchange.body, dict):
            try:
                document = ProtocolDocument.from_dict(exchange.body.get("protocol") or {})
                if document.task_kind != task_kind:
                    raise AgoraError(f"the PD is for {document.task_kind!r}")
                validator = Draft202012Validator(document.request_schema)
                for example in examples:
                    errors = list(validator.iter_errors(example["body"]))
                    if errors:
                        raise AgoraError(f"our requests do not fit it: {errors[0].message}")
            except AgoraError as exc:
                document, why = None, str(exc)
        with self._lock:
            if document is None:
                self.counters.negotiations_failed += 1
                log.info("agent %s: negotiation with %s about %s failed: %s", self.name,
                         peer.name, task_kind, why)
                return None
            self.counters.negotiations += 1
            self._known[key] = document
            self._documents[document.hash] = document
            self._refused.discard((peer.name, document.hash))
        return document


def _error(message: str) -> node_pb2.AgentEnvelope:
    return node_pb2.AgentEnvelope(handled_by="error", error=message[:2000])
