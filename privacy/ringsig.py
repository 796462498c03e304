"""Linkable ring signatures (LSAG with a scoped key image) over the ristretto255 group.

A signer proves "one of the keys in this ring signed this message" without revealing which,
and attaches a *key image* (link tag) that is the same every time one key signs in the same
*scope* and unrelated across scopes. Confide scopes the tag to (job, round): a second update
from one ring member in a round is visible, who sent it is not, and the tag does not depend on
the ring, so two updates of one key over two different rings (anonymity sets) of one round
still link.

The scheme is the linkable spontaneous anonymous group signature of Liu, Wei and Wong (2004)
with the CryptoNote-style key image ``I = x * Hp(scope)``. Every group and scalar operation is
libsodium's ristretto255 (RFC 9496), through the ``rbcl`` binding; nothing here does field or
curve arithmetic.

Why ristretto255 (format v2; v1 used the ed25519 group through PyNaCl): ristretto255 is a
prime-order group, so every element a decoder accepts is usable as is: there is no cofactor,
no small-order point, no "on the curve but outside the subgroup". libsodium's ed25519
``scalarmult_noclamp`` re-checked subgroup membership on every call (a second scalar
multiplication, half the time of v1); here a point is checked when it is decoded (canonical
encoding, not the identity) once per ring, and each multiplication is only that. The
security argument is unchanged: LSAG needs a prime-order group where discrete log and DDH are
hard and a hash onto the group with unknown discrete logs, which ristretto255 and its
``from_hash`` map (RFC 9496's one-way map, two Elligator evaluations added) give directly.

Notation: ``G`` the ristretto255 generator, ``L`` the group order, ``H_s`` a hash to a scalar
(SHA-512 reduced mod L), ``Hp`` a hash to the group (SHA-512, then
``crypto_core_ristretto255_from_hash``). Every hash starts with its own domain string
(``_DOMAIN_*`` below); every variable-length field is preceded by its length.

Keygen
    ``x = H_s(KEYGEN || seed)`` for a 32-byte seed (``RingKeyPair.from_seed``; ``generate``
    draws the seed from ``os.urandom``), ``P = x * G``. ``P`` (32 bytes, the ristretto255
    encoding) is the public key. The scalar of a seed is the one v1 derived: a node keeps
    its seed file, only the encoding of its public key changed.

Sign ``(m, ring = [P_0 .. P_{n-1}], x with P_pi = x*G, scope)``
    ``H = Hp(scope)``, ``I = x * H``.
    ``prefix = CHALLENGE || n (4 bytes) || P_0 || .. || P_{n-1} || len || scope || I || len || m``.
    ``a`` random; ``c_{pi+1} = H_s(prefix || a*G || a*H)``.
    For ``i = pi+1, .., pi-1`` (mod n): ``s_i`` random;
    ``c_{i+1} = H_s(prefix || s_i*G + c_i*P_i || s_i*H + c_i*I)``.
    ``s_pi = a - c_pi * x``. The signature is ``(c_0, s_0 .. s_{n-1}, I)``.
    Random scalars are 64 bytes of ``os.urandom`` reduced mod L.
    The signer knows ``x``, so it computes ``s_i*H + c_i*I`` as ``(s_i + c_i*x)*H``: the same
    element (``I = x*H``) for one variable-base multiplication and no addition, not two and one.

Verify
    Every ring key and ``I`` must be a canonical ristretto255 encoding other than the
    identity, the ring free of duplicates, every scalar canonical (< L). Recompute
    ``c_{i+1} = H_s(prefix || s_i*G + c_i*P_i || s_i*H + c_i*I)`` for ``i = 0 .. n-1`` and
    accept iff ``c_n == c_0``: one fixed-base and three variable-base multiplications per
    ring member, so the cost is linear in the ring and nothing else. Anything malformed gives
    ``False``, never an exception. A ring checked once (:class:`ValidatedRing`) is not checked
    again by each signature verified against it; a ring passed as a list of keys is looked up
    in a small cache of validated rings keyed by the keys themselves (equal bytes, same
    order), so a verifier of many signatures over one ring checks its keys once either way.

Link
    Two valid signatures in the same scope come from the same key iff their key images are
    equal (:func:`link`), whatever rings they were made over.

Encoding
    ``c_0 (32) || s_0 (32) || .. || s_{n-1} (32) || I (32)``: ``32 * (n + 2)`` bytes, scalars
    little-endian, ``I`` a ristretto255 encoding. The ring size is not in the bytes: the
    verifier knows its ring (``RingSignature.decode(data, ring_size)``). Scalars must be
    canonical and ``I`` a canonical encoding, so one signature has exactly one encoding.

What it hides: which member of the ring signed (signer ambiguity: computational, under DDH in
the random-oracle model), and whether signatures in *different* scopes came from one key.

What it does not hide: the ring itself, the message and the scope (all public inputs); that one
key signed twice in one scope, also under different rings (by design); anything the transport
shows (address, timing, sizes). It gives no forward anonymity: whoever later learns a secret key
(or seed) computes its key image for any scope and so identifies every signature it made. A ring
is only as anonymous as its honest members: a ring padded with keys the verifier controls hides
nothing, and comparing who was in the ring across rounds can narrow the signer down. Timing:
libsodium's scalar multiplications are constant-time and the total work of signing does not
depend on the signer's position, but its order does, and finding the key in the ring is not
constant-time: a local observer timing the signing process finely could tell the position.

Security rests on the usual LSAG results in the random-oracle model: unforgeable under the
discrete-log assumption, linkable (one key cannot show two different tags in one scope), signer
ambiguous and unlinkable across scopes under DDH.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import rbcl

__all__ = [
    "POINT_BYTES",
    "SCALAR_BYTES",
    "RingKeyPair",
    "RingSignature",
    "RingSignatureError",
    "ValidatedRing",
    "encoded_size",
    "is_valid_public_key",
    "link",
    "sign",
    "verify",
]

POINT_BYTES = 32
SCALAR_BYTES = 32

_DOMAIN_KEYGEN = b"confide/ringsig/v1/keygen\x00"  # unchanged in v2: a seed keeps its scalar
_DOMAIN_HASH_TO_POINT = b"confide/ringsig/v2/hash-to-point\x00"
_DOMAIN_CHALLENGE = b"confide/ringsig/v2/challenge\x00"
_IDENTITY = bytes(POINT_BYTES)  # the ristretto255 encoding of the neutral element

# libsodium through rbcl, under short names (and one place to count group operations)
_reduce = rbcl.crypto_core_ristretto255_scalar_reduce
_scalar_mul = rbcl.crypto_core_ristretto255_scalar_mul
_scalar_sub = rbcl.crypto_core_ristretto255_scalar_sub
_scalar_add = rbcl.crypto_core_ristretto255_scalar_add
_add = rbcl.crypto_core_ristretto255_add
_mul = rbcl.crypto_scalarmult_ristretto255
_mul_base = rbcl.crypto_scalarmult_ristretto255_base


class RingSignatureError(ValueError):
    """A ring, key or signature encoding that cannot be used (a ValueError: bad input)."""


def encoded_size(ring_size: int) -> int:
    """Bytes of an encoded signature for a ring of ``ring_size`` keys."""
    return SCALAR_BYTES * (ring_size + 1) + POINT_BYTES


# ---------------------------------------------------------------- helpers (libsodium only)


def _prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _hash_to_scalar(*parts: bytes) -> bytes:
    return _reduce(hashlib.sha512(b"".join(parts)).digest())


def _random_scalar() -> bytes:
    return _reduce(os.urandom(64))


def _is_canonical_scalar(s: object) -> bool:
    """``s < L``: reducing it (padded to 64 bytes) changes nothing. Stops ``s + L`` malleability."""
    return (isinstance(s, bytes) and len(s) == SCALAR_BYTES
            and _reduce(s + bytes(32)) == s)


def is_valid_public_key(p: object) -> bool:
    """A canonical ristretto255 encoding of an element other than the identity: what a ring
    key and a key image must be (ristretto255 has prime order: nothing else to check)."""
    return (isinstance(p, bytes) and len(p) == POINT_BYTES and p != _IDENTITY
            and bool(rbcl.crypto_core_ristretto255_is_valid_point(p)))


@functools.lru_cache(maxsize=256)
def _hash_to_point(scope: bytes) -> bytes:
    """``Hp(scope)``: an element nobody knows the discrete log of, one per scope (cached: a
    coordinator verifies a whole round's updates under one scope)."""
    point = rbcl.crypto_core_ristretto255_from_hash(
        hashlib.sha512(_DOMAIN_HASH_TO_POINT + _prefixed(scope)).digest())
    if point == _IDENTITY:  # probability ~2^-252
        raise RingSignatureError("scope hashes to the identity; use another scope")
    return point


class ValidatedRing:
    """A ring whose keys were checked once (valid, distinct): sign and verify take it as
    is, so a verifier that checks many signatures against one ring (a coordinator and a
    round's anonymity sets) validates each key once, not once per signature. It also keeps
    the challenge hash over its keys, which every signature over it starts with."""

    __slots__ = ("_ring_hash", "keys")

    def __init__(self, ring: Sequence[bytes]) -> None:
        keys = tuple(ring)
        if not keys:
            raise RingSignatureError("the ring is empty")
        for index, key in enumerate(keys):
            if not is_valid_public_key(key):
                raise RingSignatureError(f"ring key {index} is not a valid ristretto255 "
                                         "element (canonical, not the identity)")
        if len(set(keys)) != len(keys):
            raise RingSignatureError("the ring holds a key twice")
        self.keys: tuple[bytes, ...] = keys
        ring_hash = hashlib.sha512(_DOMAIN_CHALLENGE)
        ring_hash.update(len(keys).to_bytes(4, "big"))
        ring_hash.update(b"".join(keys))
        self._ring_hash = ring_hash

    def __len__(self) -> int:
        return len(self.keys)


@functools.lru_cache(maxsize=256)
def _cached_ring(keys: tuple[bytes, ...]) -> ValidatedRing:
    """The validated ring of exactly these keys in this order. Keyed by the keys themselves
    (a hit compares every byte), and validity depends on nothing else, so an entry can never
    be stale or answer for another ring; an invalid ring raises and is not cached."""
    return ValidatedRing(keys)


def _validated(ring: Sequence[bytes] | ValidatedRing) -> ValidatedRing:
    if isinstance(ring, ValidatedRing):
        return ring
    keys = tuple(ring)
    # plain bytes only: a subclass could hash or compare by more than its bytes
    if not all(type(key) is bytes for key in keys):
        return ValidatedRing(keys)
    return _cached_ring(keys)


def _check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _challenge_state(ring: ValidatedRing, scope: bytes, image: bytes,
                     message: bytes) -> hashlib._Hash:
    """SHA-512 over everything the challenges share; each step copies it and adds (L_i, R_i),
    so a ring of n keys is hashed once rather than n times (and once per ring, not per
    signature: the part over its keys is the ring's)."""
    state = ring._ring_hash.copy()
    state.update(_prefixed(scope))
    state.update(image)
    state.update(_prefixed(message))
    return state


def _next_challenge(state: hashlib._Hash, left: bytes, right: bytes) -> bytes:
    step = state.copy()
    step.update(left)
    step.update(right)
    return _reduce(step.digest())


def _commitments(s: bytes, c: bytes, public: bytes, h: bytes, image: bytes) -> tuple[bytes, bytes]:
    """``(s*G + c*P, s*H + c*I)``: one fixed-base and three variable-base multiplications.
    libsodium raises on a zero scalar or an identity result, which no honest signature has."""
    return (_add(_mul_base(s), _mul(c, public)), _add(_mul(s, h), _mul(c, image)))


# ---------------------------------------------------------------- keys and signatures


class RingKeyPair:
    """A ring member's key: secret scalar ``x`` and public element ``x * G``.

    Prefer :meth:`from_seed` (what a node stores is its 32-byte seed) or :meth:`generate`.
    """

    __slots__ = ("_secret", "public")

    def __init__(self, secret: bytes) -> None:
        if not _is_canonical_scalar(secret) or secret == bytes(SCALAR_BYTES):
            raise RingSignatureError("a ring secret key is a nonzero canonical scalar (< L)")
        self._secret = secret
        self.public: bytes = _mul_base(secret)

    @classmethod
    def from_seed(cls, seed: bytes) -> RingKeyPair:
        """The key of a 32-byte seed, always the same one (nodes keep only the seed)."""
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise RingSignatureError("a ring key seed is 32 bytes")
        return cls(_hash_to_scalar(_DOMAIN_KEYGEN, seed))

    @classmethod
    def generate(cls) -> RingKeyPair:
        return cls.from_seed(os.urandom(32))

    def key_image(self, scope: bytes) -> bytes:
        """The link tag this key gives every signature in ``scope``."""
        return _mul(self._secret, _hash_to_point(_check_bytes("scope", scope)))

    def __repr__(self) -> str:
        return f"RingKeyPair(public={self.public.hex()})"


@dataclass(frozen=True)
class RingSignature:
    """``(c_0, s_0 .. s_{n-1}, I)``; ``key_image`` is the link tag ``I``."""

    c0: bytes
    s: tuple[bytes, ...]
    key_image: bytes

    @property
    def ring_size(self) -> int:
        return len(self.s)

    def encode(self) -> bytes:
        """``c_0 || s_0 || .. || s_{n-1} || I``, 32 bytes each."""
        return self.c0 + b"".join(self.s) + self.key_image

    @classmethod
    def decode(cls, data: bytes, ring_size: int) -> RingSignature:
        """Parse and check an encoding for a ring of ``ring_size`` keys (the verifier's ring
        says how many scalars to expect); raises :class:`RingSignatureError` if malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise RingSignatureError(f"a ring signature is bytes, got {type(data).__name__}")
        if isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1:
            raise RingSignatureError(f"ring size must be a positive integer, got {ring_size!r}")
        data = bytes(data)
        expected = encoded_size(ring_size)
        if len(data) != expected:
            raise RingSignatureError(f"a signature for a ring of {ring_size} is {expected} "
                                     f"bytes, got {len(data)}")
        scalars = [data[i:i + SCALAR_BYTES] for i in range(0, expected - POINT_BYTES,
                                                           SCALAR_BYTES)]
        for index, scalar in enumerate(scalars):
            if not _is_canonical_scalar(scalar):
                name = "c_0" if index == 0 else f"s_{index - 1}"
                raise RingSignatureError(f"scalar {name} is not canonical (>= L)")
        image = data[-POINT_BYTES:]
        if not is_valid_public_key(image):
            raise RingSignatureError("the key image is not a valid ristretto255 element "
                                     "(canonical, not the identity)")
        return cls(scalars[0], tuple(scalars[1:]), image)


def sign(message: bytes, ring: Sequence[bytes] | ValidatedRing, key: RingKeyPair,
         scope: bytes) -> RingSignature:
    """Ring-sign ``message`` as one of ``ring`` (order matters: the verifier must use the same
    list), with the link tag of ``scope``. Raises :class:`RingSignatureError` if the ring is
    empty, has an invalid or repeated key, or does not contain ``key.public``."""
    message, scope = _check_bytes("message", message), _check_bytes("scope", scope)
    validated = _validated(ring)
    keys = validated.keys
    try:
        signer = keys.index(key.public)
    except ValueError:
        raise RingSignatureError("the signing key is not in the ring") from None
    n = len(keys)
    x = key._secret
    h = _hash_to_point(scope)
    image = _mul(x, h)
    state = _challenge_state(validated, scope, image, message)

    c: list[bytes] = [b""] * n
    s: list[bytes] = [b""] * n
    alpha = _random_scalar()
    c[(signer + 1) % n] = _next_challenge(state, _mul_base(alpha), _mul(alpha, h))
    for step in range(1, n):
        i = (signer + step) % n
        s[i] = s_i = _random_scalar()
        c_i = c[i]
        left = _add(_mul_base(s_i), _mul(c_i, keys[i]))
        right = _mul(_scalar_add(s_i, _scalar_mul(c_i, x)), h)  # = s_i*H + c_i*I
        c[(i + 1) % n] = _next_challenge(state, left, right)
    s[signer] = _scalar_sub(alpha, _scalar_mul(c[signer], x))
    return RingSignature(c[0], tuple(s), image)


def verify(message: bytes, ring: Sequence[bytes] | ValidatedRing, signature: RingSignature,
           scope: bytes) -> bool:
    """Whether ``signature`` was made over ``message`` and ``scope`` by a key of ``ring`` (in
    this order). False for anything malformed (bad points, scalars, sizes, ring): a verifier
    facing untrusted input only needs the boolean. Pass a :class:`ValidatedRing` to skip
    re-checking its keys."""
    if not isinstance(signature, RingSignature):
        raise TypeError(f"expected a RingSignature, got {type(signature).__name__}")
    message, scope = _check_bytes("message", message), _check_bytes("scope", scope)
    try:
        validated = _validated(ring)
        keys = validated.keys
        if not isinstance(signature.s, tuple | list) or len(signature.s) != len(keys):
            return False
        if not all(_is_canonical_scalar(x) for x in (signature.c0, *signature.s)):
            return False
        if not is_valid_public_key(signature.key_image):
            return False
        h = _hash_to_point(scope)
        state = _challenge_state(validated, scope, signature.key_image, message)
        c = signature.c0
        for s_i, public in zip(signature.s, keys, strict=True):
            c = _next_challenge(state, *_commitments(s_i, c, public, h, signature.key_image))
    except RingSignatureError:
        return False
    except RuntimeError:
        # libsodium refused a zero scalar or an identity result, which an honest signature
        # never produces
        return False
    return c == signature.c0


def link(a: RingSignature, b: RingSignature) -> bool:
    """Whether two signatures *of one scope* come from the same key (equal key images). Only
    meaningful for signatures that verified; across scopes key images never match."""
    return a.key_image == b.key_image
