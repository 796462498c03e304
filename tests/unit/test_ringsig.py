"""Linkable ring signatures (privacy.ringsig): correctness over ring sizes and signer positions,
rejection of every kind of change, linkability within a scope and not across scopes, strict
decoding (lengths, points, canonical scalars) and fuzzing of decode and verify."""

from __future__ import annotations

import hashlib

import pytest
import rbcl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.privacy.ringsig import (
    RingKeyPair,
    RingSignature,
    RingSignatureError,
    ValidatedRing,
    encoded_size,
    link,
    sign,
    verify,
)

L = 2**252 + 27742317777372353535851937790883648493
"""Order of ristretto255 (RFC 9496), the order of ed25519's prime-order subgroup."""

IDENTITY = bytes(32)  # ristretto255's encoding of the neutral element
P = 2**255 - 19

NON_CANONICAL = (P + 2).to_bytes(32, "little")  # a field element >= p: never canonical
MESSAGE = b"update digest"
SCOPE = b"job-1/3"

KEYS = [RingKeyPair.from_seed(bytes([i]) * 32) for i in range(100)]
RING = [k.public for k in KEYS]


def _accepts(message: bytes, ring: list[bytes], data: bytes, scope: bytes) -> bool:
    """What the coordinator does with wire bytes: decode, then verify."""
    try:
        signature = RingSignature.decode(data, len(ring))
    except RingSignatureError:
        return False
    return verify(message, ring, signature, scope)


def _scalar(value: int) -> bytes:
    return value.to_bytes(32, "little")


# ---------------------------------------------------------------- keys


def test_from_seed_is_deterministic_and_pinned():
    seed = bytes(range(32))
    a, b = RingKeyPair.from_seed(seed), RingKeyPair.from_seed(seed)
    assert a.public == b.public
    # pinned: a node re-derives its registered ring key from its seed file after an upgrade
    assert a.public.hex() == "7410a4df908fb178665a426b7471205573687cd4908bf7bc3ac9973dc9794c2c"
    assert a.key_image(b"job/1").hex() == (
        "7c19db4277bafd4ade83b4f6aea971aed91855c449eb52af495192b28bfe657e")
    assert RingKeyPair.from_seed(bytes(31) + b"\x01").public != a.public


def test_public_keys_are_valid_distinct_points():
    keys = [RingKeyPair.generate() for _ in range(20)] + KEYS[:5]
    assert all(len(k.public) == 32 and rbcl.crypto_core_ristretto255_is_valid_point(k.public)
               for k in keys)
    assert len({k.public for k in keys}) == len(keys)
    assert "public=" in repr(keys[0]) and keys[0]._secret.hex() not in repr(keys[0])


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33), "x" * 32])
def test_from_seed_rejects_bad_seeds(seed):
    with pytest.raises(RingSignatureError):
        RingKeyPair.from_seed(seed)


@pytest.mark.parametrize("secret", [bytes(32), _scalar(L), b"\xff" * 32, bytes(31)])
def test_secret_must_be_a_nonzero_canonical_scalar(secret):
    with pytest.raises(RingSignatureError):
        RingKeyPair(secret)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 100])
def test_sign_verify_round_trip_at_every_kind_of_position(size):
    ring = RING[:size]
    for signer in sorted({0, size // 2, size - 1}):
        signature = sign(MESSAGE, ring, KEYS[signer], SCOPE)
        assert signature.ring_size == size
        data = signature.encode()
        assert len(data) == encoded_size(size) == 32 * (size + 2)
        assert RingSignature.decode(data, size) == signature
        assert verify(MESSAGE, ring, signature, SCOPE)
        assert _accepts(MESSAGE, ring, data, SCOPE)
        assert signature.key_image == KEYS[signer].key_image(SCOPE)


def test_signing_is_randomized_but_the_tag_is_not():
    a = sign(MESSAGE, RING[:4], KEYS[2], SCOPE)
    b = sign(MESSAGE, RING[:4], KEYS[2], SCOPE)
    assert a.encode() != b.encode()
    assert a.key_image == b.key_image


def test_accepts_bytearray_and_memoryview_inputs():
    signature = sign(bytearray(MESSAGE), RING[:3], KEYS[1], memoryview(SCOPE))
    assert verify(MESSAGE, RING[:3], signature, SCOPE)
    assert RingSignature.decode(bytearray(signature.encode()), 3) == signature


# ---------------------------------------------------------------- any change fails


@pytest.fixture(scope="module")
def signed() -> tuple[list[bytes], bytes]:
    ring = RING[:5]
    return ring, sign(MESSAGE, ring, KEYS[3], SCOPE).encode()


def test_changed_message_or_scope_fails(signed):
    ring, data = signed
    assert _accepts(MESSAGE, ring, data, SCOPE)
    assert not _accepts(MESSAGE + b"!", ring, data, SCOPE)
    assert not _accepts(b"", ring, data, SCOPE)
    assert not _accepts(b"Update digest", ring, data, SCOPE)
    assert not _accepts(MESSAGE, ring, data, b"job-1/4")
    assert not _accepts(MESSAGE, ring, data, b"")


@pytest.mark.parametrize("index", [0, 3, 4])
def test_a_replaced_ring_key_fails(signed, index):
    ring, data = signed
    changed = list(ring)
    changed[index] = RingKeyPair.generate().public
    assert not _accepts(MESSAGE, changed, data, SCOPE)


def test_ring_order_matters(signed):
    ring, data = signed
    assert not _accepts(MESSAGE, ring[::-1], data, SCOPE)
    assert not _accepts(MESSAGE, ring[1:] + ring[:1], data, SCOPE)
    assert not _accepts(MESSAGE, [ring[1], ring[0], *ring[2:]], data, SCOPE)
    two = sign(MESSAGE, RING[:2], KEYS[0], SCOPE)
    assert not verify(MESSAGE, RING[:2][::-1], two, SCOPE)


def test_ring_of_another_size_fails(signed):
    ring, data = signed
    signature = RingSignature.decode(data, 5)
    assert not verify(MESSAGE, ring[:4], signature, SCOPE)
    assert not verify(MESSAGE, [*ring, RING[50]], signature, SCOPE)
    assert not _accepts(MESSAGE, ring[:4], data, SCOPE)


@pytest.mark.parametrize("segment", ["c0", "s0", "s3", "s4", "image"])
@pytest.mark.parametrize("offset", [0, 13, 31])
@pytest.mark.parametrize("bit", [0, 7])
def test_flipping_any_signature_bit_fails(signed, segment, offset, bit):
    ring, data = signed
    start = {"c0": 0, "s0": 32, "s3": 128, "s4": 160, "image": 192}[segment]
    changed = bytearray(data)
    changed[start + offset] ^= 1 << bit
    assert not _accepts(MESSAGE, ring, bytes(changed), SCOPE)


def test_another_members_tag_cannot_be_substituted(signed):
    """Framing: a signature showing some other member's tag must not verify."""
    ring, data = signed
    signature = RingSignature.decode(data, 5)
    for other in (KEYS[0], KEYS[4]):
        framed = RingSignature(signature.c0, signature.s, other.key_image(SCOPE))
        assert not verify(MESSAGE, ring, framed, SCOPE)


def test_a_second_encoding_of_the_tag_is_refused(signed):
    """The CryptoNote key-image bug (v1 guarded it with a subgroup check): a tag must have
    exactly one accepted encoding. ristretto255 has no small-order points and one canonical
    encoding per element: the "negative" twin of an encoding (odd low bit) and encodings >= p
    are refused."""
    ring, data = signed
    signature = RingSignature.decode(data, 5)
    for twin in (bytes([signature.key_image[0] ^ 1]) + signature.key_image[1:],
                 (int.from_bytes(signature.key_image, "little") + P).to_bytes(33, "little")[:32]):
        if twin == signature.key_image:
            continue
        with pytest.raises(RingSignatureError):
            RingSignature.decode(data[:-32] + twin, 5)
        assert not verify(MESSAGE, ring, RingSignature(signature.c0, signature.s, twin), SCOPE)


def test_scalar_plus_l_is_refused(signed):
    """Malleability: s_i + L is the same residue but a second encoding; decode and verify
    refuse it."""
    ring, data = signed
    signature = RingSignature.decode(data, 5)
    s0 = int.from_bytes(signature.s[0], "little") + L
    if s0 < 2**256:
        bumped = RingSignature(signature.c0, (_scalar(s0), *signature.s[1:]),
                               signature.key_image)
        assert not verify(MESSAGE, ring, bumped, SCOPE)
        with pytest.raises(RingSignatureError, match="not canonical"):
            RingSignature.decode(bumped.encode(), 5)


def test_zero_scalars_are_invalid_not_errors(signed):
    ring, data = signed
    signature = RingSignature.decode(data, 5)
    for forged in (RingSignature(bytes(32), signature.s, signature.key_image),
                   RingSignature(signature.c0, (bytes(32),) * 5, signature.key_image)):
        assert verify(MESSAGE, ring, forged, SCOPE) is False


# ---------------------------------------------------------------- who can sign


def test_a_key_outside_the_ring_cannot_sign():
    outsider = RingKeyPair.generate()
    with pytest.raises(RingSignatureError, match="not in the ring"):
        sign(MESSAGE, RING[:5], outsider, SCOPE)
    with pytest.raises(ValueError):  # what callers catch
        sign(MESSAGE, RING[:5], outsider, SCOPE)


@pytest.mark.parametrize("ring", [
    [],
    [RING[0], RING[1], RING[0]],
    [RING[0], IDENTITY],
    [RING[0], NON_CANONICAL],
    [RING[0], b"\xff" * 32],
    [RING[0], RING[1][:31]],
    [RING[0], "not bytes"],
])
def test_bad_rings_are_refused_by_sign_and_verify(ring):
    with pytest.raises(RingSignatureError):
        sign(MESSAGE, ring, KEYS[0], SCOPE)
    signature = sign(MESSAGE, RING[:len(ring)] or RING[:1], KEYS[0], SCOPE)
    assert verify(MESSAGE, ring, signature, SCOPE) is False


def test_wrong_argument_types_are_programming_errors():
    signature = sign(MESSAGE, RING[:2], KEYS[0], SCOPE)
    with pytest.raises(TypeError):
        sign("text", RING[:2], KEYS[0], SCOPE)
    with pytest.raises(TypeError):
        verify(MESSAGE, RING[:2], signature.encode(), SCOPE)


# ---------------------------------------------------------------- linking


def test_one_key_in_one_scope_links_even_across_rings_and_messages():
    a = sign(b"first", RING[:5], KEYS[2], SCOPE)
    b = sign(b"second", RING[:17], KEYS[2], SCOPE)
    assert link(a, b)
    assert a.key_image == b.key_image


def test_one_key_in_two_scopes_does_not_link():
    a = sign(MESSAGE, RING[:5], KEYS[2], b"job-1/3")
    b = sign(MESSAGE, RING[:5], KEYS[2], b"job-1/4")
    assert not link(a, b)
    # no framing ambiguity between scopes either: length prefixes keep "a"+"b/c" != "a/b"+"c"
    assert KEYS[2].key_image(b"ab") != KEYS[2].key_image(b"a")


def test_different_keys_never_link():
    images = {sign(MESSAGE, RING[:17], key, SCOPE).key_image for key in KEYS[:17]}
    assert len(images) == 17


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("delta", [-33, -32, -1, 1, 32])
def test_decode_rejects_wrong_lengths(size, delta):
    data = sign(MESSAGE, RING[:size], KEYS[0], SCOPE).encode()
    changed = data + bytes(delta) if delta > 0 else data[:delta]
    with pytest.raises(RingSignatureError, match="bytes"):
        RingSignature.decode(changed, size)


def test_decode_rejects_a_length_meant_for_another_ring():
    data = sign(MESSAGE, RING[:3], KEYS[0], SCOPE).encode()
    for size in (2, 4):
        with pytest.raises(RingSignatureError):
            RingSignature.decode(data, size)


@pytest.mark.parametrize("size", [0, -1, True, 2.0, "3"])
def test_decode_rejects_bad_ring_sizes(size):
    with pytest.raises(RingSignatureError):
        RingSignature.decode(bytes(64), size)


def test_decode_rejects_non_bytes():
    with pytest.raises(RingSignatureError):
        RingSignature.decode("a" * 96, 1)


@pytest.mark.parametrize("image", [IDENTITY, NON_CANONICAL, b"\xff" * 32,
                                   P.to_bytes(32, "little")])
def test_decode_rejects_invalid_key_images(image):
    data = sign(MESSAGE, RING[:2], KEYS[1], SCOPE).encode()
    with pytest.raises(RingSignatureError, match="key image"):
        RingSignature.decode(data[:-32] + image, 2)


@pytest.mark.parametrize("scalar", [b"\xff" * 32, _scalar(L), _scalar(L + 1),
                                    _scalar(2**255 - 1)])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_decode_rejects_non_canonical_scalars(scalar, where):
    data = bytearray(sign(MESSAGE, RING[:2], KEYS[1], SCOPE).encode())
    data[32 * where:32 * where + 32] = scalar
    with pytest.raises(RingSignatureError, match="not canonical"):
        RingSignature.decode(bytes(data), 2)


def test_decode_accepts_the_largest_canonical_scalar():
    data = bytearray(sign(MESSAGE, RING[:2], KEYS[1], SCOPE).encode())
    data[32:64] = _scalar(L - 1)
    signature = RingSignature.decode(bytes(data), 2)
    assert not verify(MESSAGE, RING[:2], signature, SCOPE)


# ---------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
_VALID = {n: sign(MESSAGE, RING[:n], KEYS[n - 1], SCOPE).encode() for n in (1, 2, 3)}


@FUZZ
@given(data=st.binary(max_size=200), size=st.integers(1, 4))
def test_decode_of_arbitrary_bytes_raises_cleanly_or_never_verifies(data, size):
    try:
        signature = RingSignature.decode(data, size)
    except RingSignatureError:
        return
    assert verify(MESSAGE, RING[:size], signature, SCOPE) is False


@FUZZ
@given(seeds=st.lists(st.binary(min_size=64, max_size=64), min_size=3, max_size=5),
       point_seed=st.binary(min_size=32, max_size=32))
def test_well_formed_random_signatures_decode_but_do_not_verify(seeds, point_seed):
    """Canonical scalars and a valid point get past decode: only verify can say no."""
    scalars = [rbcl.crypto_core_ristretto255_scalar_reduce(s) for s in seeds]
    image = rbcl.crypto_core_ristretto255_from_hash(point_seed * 2)
    size = len(scalars) - 1
    data = b"".join(scalars) + image
    if image == IDENTITY:
        with pytest.raises(RingSignatureError):
            RingSignature.decode(data, size)
        return
    signature = RingSignature.decode(data, size)
    assert verify(MESSAGE, RING[:size], signature, SCOPE) is False


@FUZZ
@given(size=st.sampled_from([1, 2, 3]),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                      max_size=4))
def test_random_mutations_of_a_valid_signature_never_verify_or_raise(size, flips):
    data = bytearray(_VALID[size])
    for position, mask in flips:
        data[position % len(data)] ^= mask
    if bytes(data) == _VALID[size]:  # the flips cancelled out
        return
    assert _accepts(MESSAGE, RING[:size], bytes(data), SCOPE) is False


@FUZZ
@given(c0=st.binary(max_size=40), s=st.lists(st.binary(max_size=40), max_size=4),
       image=st.binary(max_size=40), as_list=st.booleans())
def test_verify_of_arbitrary_fields_returns_false(c0, s, image, as_list):
    """A RingSignature built by hand (bypassing decode) with junk in any field."""
    signature = RingSignature(c0, list(s) if as_list else tuple(s), image)
    assert verify(MESSAGE, RING[:max(len(s), 1)], signature, SCOPE) is False


# ---------------------------------------------------------------- the documented format


def _documented_verify(message: bytes, ring: list[bytes], data: bytes, scope: bytes) -> bool:
    """Verification written again from the module docstring, with libsodium directly: pins the
    hash layout (domains, length prefixes, what goes in the challenge) and the encoding."""
    n = len(ring)
    c0, s, image = data[:32], [data[32 * (i + 1):32 * (i + 2)] for i in range(n)], data[-32:]
    h = rbcl.crypto_core_ristretto255_from_hash(hashlib.sha512(
        b"confide/ringsig/v2/hash-to-point\x00" + len(scope).to_bytes(8, "big") + scope).digest())
    prefix = (b"confide/ringsig/v2/challenge\x00" + n.to_bytes(4, "big") + b"".join(ring)
              + len(scope).to_bytes(8, "big") + scope + image
              + len(message).to_bytes(8, "big") + message)
    c = c0
    for s_i, public in zip(s, ring, strict=True):
        left = rbcl.crypto_core_ristretto255_add(rbcl.crypto_scalarmult_ristretto255_base(s_i),
                                                 rbcl.crypto_scalarmult_ristretto255(c, public))
        right = rbcl.crypto_core_ristretto255_add(rbcl.crypto_scalarmult_ristretto255(s_i, h),
                                                  rbcl.crypto_scalarmult_ristretto255(c, image))
        c = rbcl.crypto_core_ristretto255_scalar_reduce(
            hashlib.sha512(prefix + left + right).digest())
    return c == c0


@pytest.mark.parametrize("size", [1, 4])
def test_signatures_follow_the_documented_algorithm(size):
    data = sign(MESSAGE, RING[:size], KEYS[size - 1], SCOPE).encode()
    assert _documented_verify(MESSAGE, RING[:size], data, SCOPE)
    assert not _documented_verify(MESSAGE + b".", RING[:size], data, SCOPE)


def test_signature_bytes_are_pinned(monkeypatch):
    """With the randomness fixed, one exact encoding: a change here is a wire-format change
    (nodes and coordinators of different versions would stop understanding each other)."""
    counter = iter(range(1, 100))
    monkeypatch.setattr("confide.privacy.ringsig._random_scalar",
                        lambda: rbcl.crypto_core_ristretto255_scalar_reduce(
                            bytes([next(counter)]) * 64))
    data = sign(MESSAGE, RING[:3], KEYS[1], SCOPE).encode()
    assert verify(MESSAGE, RING[:3], RingSignature.decode(data, 3), SCOPE)
    assert hashlib.sha256(data).hexdigest() == (
        "ea69903e868626ec3fec7a2e7f8c50a3723ae85b276ce1ab1f6eacd9311c2111")


# ---------------------------------------------------------------- validated rings, v1 keys


def _count_point_checks(monkeypatch) -> list[bytes]:
    checks: list[bytes] = []
    real = rbcl.crypto_core_ristretto255_is_valid_point
    monkeypatch.setattr(rbcl, "crypto_core_ristretto255_is_valid_point",
                        lambda p: checks.append(p) or real(p))
    return checks


def test_a_validated_ring_signs_and_verifies_like_a_list():
    ring = ValidatedRing(RING[:6])
    signature = sign(MESSAGE, ring, KEYS[4], SCOPE)
    assert verify(MESSAGE, ring, signature, SCOPE) and verify(MESSAGE, RING[:6], signature, SCOPE)
    assert not verify(MESSAGE, ValidatedRing(RING[1:7]), signature, SCOPE)
    with pytest.raises(RingSignatureError, match="twice"):
        ValidatedRing([RING[0], RING[0]])


def test_a_validated_ring_is_not_checked_again_per_signature(monkeypatch):
    ring = ValidatedRing(RING[:4])
    signature = sign(MESSAGE, ring, KEYS[0], SCOPE)
    checks = _count_point_checks(monkeypatch)
    assert verify(MESSAGE, ring, signature, SCOPE)
    assert checks == [signature.key_image]  # the image only, no ring key


def test_v1_ring_keys_are_not_v2_keys():
    """A seed keeps its scalar, but its v1 public key (an ed25519 encoding) is a different
    byte string from its v2 key, and v1 signatures do not verify: a ring may not mix them
    (the coordinator keeps nodes that did not announce v2 keys out of anonymous rings)."""
    v1_public = bytes.fromhex("44d8d0fe7329306c087fc0381195364b45ee7ba1e5cc270bf1958bab21ca1046")
    key = RingKeyPair.from_seed(bytes(range(32)))
    assert key.public != v1_public


# ---------------------------------------------------------------- the ring cache, sign's cost


def test_a_ring_passed_as_a_list_is_validated_once(monkeypatch):
    fresh = [RingKeyPair.generate() for _ in range(5)]  # keys no other test cached
    ring = [k.public for k in fresh]
    checks = _count_point_checks(monkeypatch)
    signatures = [sign(MESSAGE, list(ring), key, SCOPE) for key in fresh]
    assert all(verify(MESSAGE, list(ring), sig, SCOPE) for sig in signatures)
    ring_checks = [p for p in checks if p in ring]
    assert sorted(ring_checks) == sorted(ring)  # each key once, over 5 signs and 5 verifies


def test_the_ring_cache_never_answers_for_another_ring():
    """Equal bytes in the same order hit; anything else is checked (and verified) afresh."""
    ring = RING[20:26]
    signature = sign(MESSAGE, ring, KEYS[22], SCOPE)
    assert verify(MESSAGE, ring, signature, SCOPE)
    assert not verify(MESSAGE, [*ring[:3], RING[30], *ring[4:]], signature, SCOPE)
    assert not verify(MESSAGE, ring[::-1], signature, SCOPE)
    assert not verify(MESSAGE, [*ring[:5], RING[27]], signature, SCOPE)
    # the same bytes as bytearrays are no ring keys (keys are bytes): refused, not a cache hit
    assert verify(MESSAGE, [bytearray(k) for k in ring], signature, SCOPE) is False
    for bad in ([*ring[:5], ring[0]], [*ring[:5], IDENTITY], [*ring[:5], NON_CANONICAL]):
        with pytest.raises(RingSignatureError):
            sign(MESSAGE, bad, KEYS[22], SCOPE)
        assert verify(MESSAGE, bad, signature, SCOPE) is False
    assert verify(MESSAGE, ring, signature, SCOPE)  # the good entry is still good


@pytest.mark.parametrize("index", [0, 3, 7])
def test_a_tampered_signature_fails_over_a_cached_ring(index):
    ring = RING[40:48]
    data = sign(MESSAGE, ring, KEYS[44], SCOPE).encode()
    assert _accepts(MESSAGE, ring, data, SCOPE)  # the ring is cached now
    tampered = bytearray(data)
    tampered[32 * (index + 1)] ^= 1  # s_index
    assert not _accepts(MESSAGE, ring, bytes(tampered), SCOPE)
    assert not _accepts(MESSAGE + b"!", ring, data, SCOPE)
    assert not _accepts(MESSAGE, ring, data, SCOPE + b"!")


def test_signing_costs_three_multiplications_per_other_member(monkeypatch):
    """Structural, not timed: the signer folds ``s_i*H + c_i*I`` into ``(s_i + c_i*x)*H``."""
    from confide.privacy import ringsig

    counts = {"_mul": 0, "_mul_base": 0, "_add": 0}
    for attr in counts:
        real = getattr(ringsig, attr)

        def counted(*args, _real=real, _attr=attr):
            counts[_attr] += 1
            return _real(*args)
        monkeypatch.setattr(ringsig, attr, counted)
    n = 10
    signature = sign(MESSAGE, RING[:n], KEYS[3], SCOPE)
    # image x*H and a*H, then per other member c_i*P_i and (s_i + c_i*x)*H
    assert counts == {"_mul": 2 + 2 * (n - 1), "_mul_base": 1 + (n - 1), "_add": n - 1}
    assert verify(MESSAGE, RING[:n], signature, SCOPE)
