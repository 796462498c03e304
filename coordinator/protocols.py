"""The Agora protocol registry: where agents share protocol documents (PDs) by hash.

In Agora a message carries only the hash of the PD it follows; an agent that meets an unknown
hash fetches the document once and decides whether it can serve it. The coordinator keeps the
documents (SQLite, so they outlive restarts), lists them by task kind, most used first (how a
requester finds a PD that other agents already agreed on), and counts uses as agents report
them. The hash is always computed here from the content (``agents.agora.ProtocolDocument``):
a client's claimed hash is checked, never trusted, and registering the same document twice
is idempotent.
"""

from __future__ import annotations

import json

from confide.agents.agora import HASH, AgoraError, ProtocolDocument
from confide.coordinator.store import Store
from confide.v1 import coordinator_pb2 as pb

MAX_PROTOCOLS = 100_000
MAX_USE_COUNT = 1_000_000


class RegistryFull(RuntimeError):
    """The registry holds MAX_PROTOCOLS documents already."""


class ProtocolRegistry:
    """PDs on the coordinator's store. Invalid input raises ``ValueError`` (the service turns
    it into INVALID_ARGUMENT); an unknown hash is ``None``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _to_proto(document_json: str, uses: int) -> pb.ProtocolDocument:
        document = ProtocolDocument.from_dict(json.loads(document_json), check_hash=False)
        return document.with_uses(uses).to_proto()

    def register(self, message: pb.ProtocolDocument) -> pb.ProtocolDocument:
        """Validate, hash and store ``message``; returns the stored document with its uses."""
        try:
            document = ProtocolDocument.from_proto(message, check_hash=True)
        except AgoraError as exc:
            raise ValueError(f"invalid protocol document: {exc}") from None
        if self.store.protocol(document.hash) is None and \
                self.store.protocol_count() >= MAX_PROTOCOLS:
            raise RegistryFull(f"the registry holds {MAX_PROTOCOLS} documents; reuse one of "
                               "them (ListProtocols)")
        self.store.save_protocol(document.hash, document.task_kind,
                                 document.canonical().decode("utf-8"))
        found = self.get(document.hash)
        assert found is not None
        return found

    @staticmethod
    def check_hash(hash_: str) -> None:
        if not HASH.match(hash_ or ""):
            raise ValueError(f"hash must be 64 lowercase hex characters (SHA-256), got "
                             f"{(hash_ or '')[:70]!r}")

    def get(self, hash_: str) -> pb.ProtocolDocument | None:
        self.check_hash(hash_)
        row = self.store.protocol(hash_)
        return self._to_proto(*row) if row is not None else None

    def list(self, task_kind: str = "") -> list[pb.ProtocolDocument]:
        """Documents for ``task_kind`` ("" = all), most used first."""
        if len(task_kind) > 128:
            raise ValueError("task_kind is at most 128 characters")
        return [self._to_proto(text, uses) for text, uses in self.store.protocols(task_kind)]

    def record_use(self, hash_: str, count: int) -> pb.ProtocolDocument | None:
        self.check_hash(hash_)
        if not 1 <= count <= MAX_USE_COUNT:
            raise ValueError(f"count must be between 1 and {MAX_USE_COUNT}, got {count}")
        if not self.store.add_protocol_uses(hash_, count):
            return None
        return self.get(hash_)
