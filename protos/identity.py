"""Node identity on the wire: Ed25519 keys, node ids and the exact bytes that get signed.

The byte strings are part of the wire contract (a client generated from the .proto files in
another language must build the same ones), so they are spelled out here and in the .proto
comments: a domain-separation prefix, then fixed-width or length-implied fields.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REGISTER_DOMAIN = b"confide/v1/register\x00"
SESSION_DOMAIN = b"confide/v1/session\x00"
ANONYMOUS_UPDATE_DOMAIN = b"confide/v2/anonymous-update\x00"  # v2: signed over a set
AGENT_MESSAGE_DOMAIN = b"confide/v1/agent-message\x00"


def node_id_for(public_key: bytes) -> str:
    """Hex of the first 16 bytes of SHA-256 of the raw public key."""
    return hashlib.sha256(public_key).digest()[:16].hex()


def register_message(public_key: bytes, timestamp_ms: int) -> bytes:
    return REGISTER_DOMAIN + public_key + int(timestamp_ms).to_bytes(8, "big", signed=True)


def session_message(nonce: bytes, node_id: str) -> bytes:
    return SESSION_DOMAIN + nonce + node_id.encode()


def _prefixed(text: str) -> bytes:
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError("field too long to sign")
    return len(data).to_bytes(2, "big") + data


def anonymous_update_message(nonce: bytes, job_id: str, round_number: int, epoch_id: str,
                             set_index: int, num_examples: int, payload_sha256: bytes) -> bytes:
    """The bytes a node ring-signs to submit an update anonymously (see coordinator.proto):
    over the keys of anonymity set ``set_index`` of the round ring ``epoch_id``."""
    return (ANONYMOUS_UPDATE_DOMAIN + nonce + _prefixed(job_id)
            + int(round_number).to_bytes(4, "big") + _prefixed(epoch_id)
            + int(set_index).to_bytes(4, "big")
            + int(num_examples).to_bytes(8, "big") + payload_sha256)


def anonymous_scope(job_id: str, round_number: int) -> bytes:
    """The link-tag scope of a round: one key signs at most once per (job, round)."""
    return f"{job_id}/{round_number}".encode()


def agent_message_bytes(nonce: bytes, epoch_id: str, task_kind: str, protocol_hash: str,
                        body: str, text: str) -> bytes:
    """The bytes a node ring-signs to send an agent message anonymously (node.proto)."""
    return (AGENT_MESSAGE_DOMAIN + nonce + _prefixed(epoch_id) + _prefixed(task_kind)
            + _prefixed(protocol_hash) + hashlib.sha256(body.encode()).digest()
            + hashlib.sha256(text.encode()).digest())


def agent_message_scope(nonce: bytes) -> bytes:
    """A fresh link-tag scope per message: anonymous messages of one node never link."""
    return b"agent/" + nonce


def ring_epoch_id(public_keys: list[bytes]) -> str:
    return hashlib.sha256(b"".join(public_keys)).hexdigest()


#: NodeInfo.features entry of a node whose ring key is a ristretto255 element (ring
#: signature format v2); a key registered without it is a v1 ed25519 key
RING_KEY_FEATURE = "ring-ristretto255"


def ring_key_of(info) -> bytes | None:
    """The ring key a node registered (``NodeInfo``), if it can sign in a v2 ring: 32 bytes and
    announced with :data:`RING_KEY_FEATURE`. A node of an older version (an ed25519 key) gets
    None: it is left out of anonymous rings until it is upgraded (its seed file is kept, and
    the same seed gives its v2 key)."""
    key = bytes(info.ring_public_key)
    return key if len(key) == 32 and RING_KEY_FEATURE in info.features else None


class NodeKey:
    """A node's long-term Ed25519 key, kept as a PEM file readable only by its owner."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        path = Path(path)
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key)
        node_key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = node_key._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return node_key

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_bytes)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def sign_registration(self, timestamp_ms: int | None = None) -> tuple[int, bytes]:
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        return ts, self.sign(register_message(self.public_bytes, ts))

    def sign_session(self, nonce: bytes) -> bytes:
        return self.sign(session_message(nonce, self.node_id))
