"""The messages of secure aggregation, with a strict, length-checked binary encoding.

The node's session stream relays these bytes inside ``confide.v1.SecAggMessage`` (the
MaskedInput as the TRAIN task's upload); each message has ``to_bytes`` / ``from_bytes`` of its
own: never pickle. Layout: ``b"CSA" || version (1) || type (1)`` then the fields in order,
big-endian:

* integers: fixed width (``u8``/``u16``/``u32``/``u64``); a float is an IEEE-754 double;
* a string: ``u16`` length + UTF-8 (non-empty, at most :data:`MAX_ID_BYTES` bytes, strict);
* bytes: fixed length where the protocol fixes it (keys 32, seeds 32, shares 33, sealed shares
  :data:`SEALED_SHARE_BYTES`), else ``u16``/``u32`` length + data under a stated maximum;
* a list: ``u32`` count (at most :data:`MAX_LIST`) + items.

``from_bytes`` checks every length against what is left, every range (bits 32/64, share values
< p, kinds 0/1, no duplicate ids in a list), refuses trailing bytes, and raises only
:class:`~privacy.secagg.errors.SecAggMessageError`. Parsing knows nothing of the protocol state:
the state machines check the rest (job, round, phase, senders).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from confide.privacy.secagg.errors import SecAggMessageError
from confide.privacy.secagg.shamir import PRIME, SHARE_BYTES

__all__ = [
    "KEY_BYTES",
    "MAX_ID_BYTES",
    "MAX_LIST",
    "MAX_SIGNATURE_BYTES",
    "MAX_VECTOR_BYTES",
    "SEALED_SHARE_BYTES",
    "SHARE_KIND_MASK_KEY",
    "SHARE_KIND_SELF_SEED",
    "AdvertiseKeys",
    "ForwardedShares",
    "KeyBundle",
    "MaskedInput",
    "RevealedShare",
    "SealedShare",
    "Setup",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
]

MAGIC = b"CSA\x01"
KEY_BYTES = 32
SEED_BYTES = 32
MAX_ID_BYTES = 256
MAX_LIST = 100_000
MAX_SIGNATURE_BYTES = 1024
MAX_VECTOR_BYTES = 1 << 30
AEAD_TAG_BYTES = 16
SEALED_SHARE_BYTES = 2 * SHARE_BYTES + AEAD_TAG_BYTES
"""A sealed share: the shares of ``b_i`` and ``s_sk_i`` (33 bytes each) + the AEAD tag."""
SHARE_KIND_SELF_SEED = 0
SHARE_KIND_MASK_KEY = 1


class _Reader:
    def __init__(self, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SecAggMessageError("a message is bytes")
        self.data = bytes(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SecAggMessageError(f"truncated: {n} bytes wanted at {self.pos}, "
                                     f"{len(self.data) - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def f64(self) -> float:
        return struct.unpack(">d", self.take(8))[0]

    def text(self) -> str:
        n = self.uint(2)
        if not 0 < n <= MAX_ID_BYTES:
            raise SecAggMessageError(f"a string is 1..{MAX_ID_BYTES} bytes, got {n}")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SecAggMessageError("a string is not UTF-8") from e

    def blob(self, width: int, maximum: int) -> bytes:
        n = self.uint(width)
        if n > maximum:
            raise SecAggMessageError(f"{n} bytes where at most {maximum} are allowed")
        return self.take(n)

    def count(self) -> int:
        n = self.uint(4)
        if n > MAX_LIST:
            raise SecAggMessageError(f"a list of {n} items (at most {MAX_LIST})")
        return n

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SecAggMessageError(f"{len(self.data) - self.pos} trailing bytes")


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def uint(self, value: int, width: int) -> None:
        if not 0 <= value < 1 << (8 * width):
            raise SecAggMessageError(f"{value} does not fit an unsigned {8 * width}-bit field")
        self.parts.append(int(value).to_bytes(width, "big"))

    def f64(self, value: float) -> None:
        self.parts.append(struct.pack(">d", value))

    def text(self, value: str) -> None:
        raw = value.encode("utf-8")
        if not 0 < len(raw) <= MAX_ID_BYTES:
            raise SecAggMessageError(f"a string is 1..{MAX_ID_BYTES} bytes")
        self.uint(len(raw), 2)
        self.parts.append(raw)

    def fixed(self, value: bytes, n: int) -> None:
        if len(value) != n:
            raise SecAggMessageError(f"expected {n} bytes, got {len(value)}")
        self.parts.append(bytes(value))

    def blob(self, value: bytes, width: int, maximum: int) -> None:
        if len(value) > maximum:
            raise SecAggMessageError(f"{len(value)} bytes where at most {maximum} are allowed")
        self.uint(len(value), width)
        self.parts.append(bytes(value))

    def count(self, n: int) -> None:
        if n > MAX_LIST:
            raise SecAggMessageError(f"a list of {n} items (at most {MAX_LIST})")
        self.uint(n, 4)


def _unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise SecAggMessageError(f"{what} lists an id twice")


class _Message:
    TYPE: ClassVar[int]

    def _write(self, w: _Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _read(cls, r: _Reader) -> Self:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        w = _Writer()
        w.parts.append(MAGIC + bytes([self.TYPE]))
        self._write(w)
        return b"".join(w.parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        r = _Reader(data)
        if r.take(len(MAGIC)) != MAGIC:
            raise SecAggMessageError("not a secure-aggregation message (magic/version)")
        kind = r.uint(1)
        if kind != cls.TYPE:
            raise SecAggMessageError(f"message type {kind}, expected {cls.TYPE} "
                                     f"({cls.__name__})")
        message = cls._read(r)
        r.end()
        return message


@dataclass(frozen=True)
class Setup(_Message):
    """Server -> every selected node: who takes part and how (phase 0)."""

    TYPE: ClassVar[int] = 1
    job_id: str
    round: int
    participants: tuple[str, ...]
    threshold: int
    degree: int
    graph_seed: bytes
    dim: int
    bits: int
    frac_bits: int
    clip: float
    max_weight: int

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.count(len(self.participants))
        for p in self.participants:
            w.text(p)
        w.uint(self.threshold, 2)
        w.uint(self.degree, 2)
        w.fixed(self.graph_seed, SEED_BYTES)
        w.uint(self.dim, 4)
        w.uint(self.bits, 1)
        w.uint(self.frac_bits, 1)
        w.f64(self.clip)
        w.uint(self.max_weight, 8)

    @classmethod
    def _read(cls, r: _Reader) -> Setup:
        job_id, rnd = r.text(), r.uint(8)
        participants = tuple(r.text() for _ in range(r.count()))
        _unique(list(participants), "participants")
        threshold, degree, seed = r.uint(2), r.uint(2), r.take(SEED_BYTES)
        dim, bits, frac_bits, clip, max_weight = r.uint(4), r.uint(1), r.uint(1), r.f64(), r.uint(8)
        if bits not in (32, 64) or frac_bits >= bits:
            raise SecAggMessageError("bits is 32 or 64 and frac_bits below it")
        if not (math.isfinite(clip) and clip > 0):
            raise SecAggMessageError("clip is positive and finite")
        if not 1 <= threshold <= max(len(participants), 1) or degree >= max(len(participants), 1):
            raise SecAggMessageError("threshold or degree out of range for the participants")
        if dim < 1 or max_weight < 1:
            raise SecAggMessageError("dim and max_weight are >= 1")
        return cls(job_id, rnd, participants, threshold, degree, seed, dim, bits, frac_bits,
                   clip, max_weight)


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Node -> server (phase 1): two fresh X25519 public keys, signed by the node's key."""

    TYPE: ClassVar[int] = 2
    job_id: str
    round: int
    sender: str
    c_pk: bytes
    s_pk: bytes
    signature: bytes

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.text(self.sender)
        w.fixed(self.c_pk, KEY_BYTES)
        w.fixed(self.s_pk, KEY_BYTES)
        w.blob(self.signature, 2, MAX_SIGNATURE_BYTES)

    @classmethod
    def _read(cls, r: _Reader) -> AdvertiseKeys:
        return cls(r.text(), r.uint(8), r.text(), r.take(KEY_BYTES), r.take(KEY_BYTES),
                   r.blob(2, MAX_SIGNATURE_BYTES))


@dataclass(frozen=True)
class KeyBundle(_Message):
    """Server -> one node (end of phase 1): the advertisements of its neighbours."""

    TYPE: ClassVar[int] = 3
    job_id: str
    round: int
    receiver: str
    advertisements: tuple[AdvertiseKeys, ...]

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.text(self.receiver)
        w.count(len(self.advertisements))
        for a in self.advertisements:
            a._write(w)

    @classmethod
    def _read(cls, r: _Reader) -> KeyBundle:
        job_id, rnd, receiver = r.text(), r.uint(8), r.text()
        ads = tuple(AdvertiseKeys._read(r) for _ in range(r.count()))
        _unique([a.sender for a in ads], "key bundle")
        return cls(job_id, rnd, receiver, ads)


@dataclass(frozen=True)
class SealedShare:
    """One AEAD ciphertext of the two shares for one (sender, receiver) pair; ``peer`` is the
    receiver in :class:`ShareKeys` and the sender in :class:`ForwardedShares`."""

    peer: str
    ciphertext: bytes


def _write_sealed(w: _Writer, items: tuple[SealedShare, ...]) -> None:
    w.count(len(items))
    for s in items:
        w.text(s.peer)
        w.fixed(s.ciphertext, SEALED_SHARE_BYTES)


def _read_sealed(r: _Reader) -> tuple[SealedShare, ...]:
    items = tuple(SealedShare(r.text(), r.take(SEALED_SHARE_BYTES)) for _ in range(r.count()))
    _unique([s.peer for s in items], "sealed shares")
    return items


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Node -> server (phase 2): its sealed shares, one per neighbour."""

    TYPE: ClassVar[int] = 4
    job_id: str
    round: int
    sender: str
    shares: tuple[SealedShare, ...]

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.text(self.sender)
        _write_sealed(w, self.shares)

    @classmethod
    def _read(cls, r: _Reader) -> ShareKeys:
        return cls(r.text(), r.uint(8), r.text(), _read_sealed(r))


@dataclass(frozen=True)
class ForwardedShares(_Message):
    """Server -> one node (end of phase 2): the sealed shares addressed to it."""

    TYPE: ClassVar[int] = 5
    job_id: str
    round: int
    receiver: str
    shares: tuple[SealedShare, ...]

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.text(self.receiver)
        _write_sealed(w, self.shares)

    @classmethod
    def _read(cls, r: _Reader) -> ForwardedShares:
        return cls(r.text(), r.uint(8), r.text(), _read_sealed(r))


@dataclass(frozen=True)
class MaskedInput(_Message):
    """Node -> server (phase 3): the masked ring vector, little-endian ``bits``-bit words."""

    TYPE: ClassVar[int] = 6
    job_id: str
    round: int
    sender: str
    vector: bytes

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.text(self.sender)
        w.blob(self.vector, 4, MAX_VECTOR_BYTES)

    @classmethod
    def _read(cls, r: _Reader) -> MaskedInput:
        return cls(r.text(), r.uint(8), r.text(), r.blob(4, MAX_VECTOR_BYTES))


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Server -> every survivor (end of phase 3): who sent a masked input."""

    TYPE: ClassVar[int] = 7
    job_id: str
    round: int
    survivors: tuple[str, ...]

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.count(len(self.survivors))
        for s in self.survivors:
            w.text(s)

    @classmethod
    def _read(cls, r: _Reader) -> UnmaskRequest:
        job_id, rnd = r.text(), r.uint(8)
        survivors = tuple(r.text() for _ in range(r.count()))
        _unique(list(survivors), "survivors")
        return cls(job_id, rnd, survivors)


@dataclass(frozen=True)
class RevealedShare:
    """The share a node holds of ``owner``'s self-mask seed (kind 0) or mask key (kind 1)."""

    owner: str
    kind: int
    value: int


@dataclass(frozen=True)
class UnmaskResponse(_Message):
    """Node -> server (phase 4): one share per neighbour, of ``b_j`` or of ``s_sk_j``."""

    TYPE: ClassVar[int] = 8
    job_id: str
    round: int
    sender: str
    shares: tuple[RevealedShare, ...]

    def _write(self, w: _Writer) -> None:
        w.text(self.job_id)
        w.uint(self.round, 8)
        w.text(self.sender)
        w.count(len(self.shares))
        for s in self.shares:
            w.text(s.owner)
            w.uint(s.kind, 1)
            w.uint(s.value, SHARE_BYTES)

    @classmethod
    def _read(cls, r: _Reader) -> UnmaskResponse:
        job_id, rnd, sender = r.text(), r.uint(8), r.text()
        shares = []
        for _ in range(r.count()):
            owner, kind, value = r.text(), r.uint(1), r.uint(SHARE_BYTES)
            if kind not in (SHARE_KIND_SELF_SEED, SHARE_KIND_MASK_KEY) or value >= PRIME:
                raise SecAggMessageError("a revealed share has kind 0/1 and a value below p")
            shares.append(RevealedShare(owner, kind, value))
        _unique([s.owner for s in shares], "revealed shares")
        return cls(job_id, rnd, sender, tuple(shares))
