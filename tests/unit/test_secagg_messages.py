"""The secure-aggregation messages (privacy.secagg.messages): round trips, strict refusals, and
fuzzing of every ``from_bytes`` (random bytes and mutated valid encodings never raise anything but
SecAggMessageError)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.privacy.secagg.errors import SecAggMessageError
from confide.privacy.secagg.messages import (
    SEALED_SHARE_BYTES,
    AdvertiseKeys,
    ForwardedShares,
    KeyBundle,
    MaskedInput,
    RevealedShare,
    SealedShare,
    Setup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.privacy.secagg.shamir import PRIME

ALL = [Setup, AdvertiseKeys, KeyBundle, ShareKeys, ForwardedShares, MaskedInput, UnmaskRequest,
       UnmaskResponse]

ids = st.text(min_size=1, max_size=12)
rounds = st.integers(0, 2**64 - 1)
key = st.binary(min_size=32, max_size=32)
advertisements = st.builds(AdvertiseKeys, ids, rounds, ids, key, key, st.binary(max_size=80))
sealed = st.lists(st.builds(SealedShare, ids, st.binary(min_size=SEALED_SHARE_BYTES,
                                                        max_size=SEALED_SHARE_BYTES)),
                  max_size=4, unique_by=lambda s: s.peer).map(tuple)


@st.composite
def setups(draw):
    participants = tuple(draw(st.lists(ids, min_size=2, max_size=6, unique=True)))
    n = len(participants)
    bits = draw(st.sampled_from([32, 64]))
    return Setup(draw(ids), draw(rounds), participants, draw(st.integers(1, n)),
                 draw(st.integers(0, n - 1)), draw(key), draw(st.integers(1, 2**32 - 1)), bits,
                 draw(st.integers(0, bits - 1)),
                 draw(st.floats(min_value=1e-9, max_value=1e9, allow_nan=False)),
                 draw(st.integers(1, 2**64 - 1)))


MESSAGES = st.one_of(
    setups(),
    advertisements,
    st.builds(KeyBundle, ids, rounds, ids,
              st.lists(advertisements, max_size=3, unique_by=lambda a: a.sender).map(tuple)),
    st.builds(ShareKeys, ids, rounds, ids, sealed),
    st.builds(ForwardedShares, ids, rounds, ids, sealed),
    st.builds(MaskedInput, ids, rounds, ids, st.binary(max_size=64)),
    st.builds(UnmaskRequest, ids, rounds,
              st.lists(ids, max_size=5, unique=True).map(tuple)),
    st.builds(UnmaskResponse, ids, rounds, ids,
              st.lists(st.builds(RevealedShare, ids, st.sampled_from([0, 1]),
                                 st.integers(0, PRIME - 1)),
                       max_size=4, unique_by=lambda s: s.owner).map(tuple)),
)


@settings(max_examples=150, deadline=None)
@given(MESSAGES)
def test_every_message_round_trips(message):
    assert type(message).from_bytes(message.to_bytes()) == message


def _parse_all(data: bytes) -> None:
    for cls in ALL:
        with contextlib.suppress(SecAggMessageError):
            cls.from_bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_the_message_error(data):
    _parse_all(data)
    _parse_all(b"CSA\x01" + data)
    for kind in range(1, 9):
        _parse_all(b"CSA\x01" + bytes([kind]) + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MESSAGES, st.data())
def test_mutated_encodings_raise_only_the_message_error(message, data):
    raw = bytearray(message.to_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "append", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if op == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del raw[pos:]
    elif op == "append":
        raw += data.draw(st.binary(min_size=1, max_size=8))
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    _parse_all(bytes(raw))
    if op in ("truncate", "append"):
        with pytest.raises(SecAggMessageError):
            type(message).from_bytes(bytes(raw))


def test_strict_refusals():
    ad = AdvertiseKeys("job", 1, "a", bytes(32), bytes(32), b"sig")
    raw = ad.to_bytes()
    with pytest.raises(SecAggMessageError, match="trailing"):
        AdvertiseKeys.from_bytes(raw + b"\x00")
    with pytest.raises(SecAggMessageError, match="type"):
        MaskedInput.from_bytes(raw)
    with pytest.raises(SecAggMessageError, match="magic"):
        AdvertiseKeys.from_bytes(b"XYZ" + raw[3:])
    with pytest.raises(SecAggMessageError):
        AdvertiseKeys.from_bytes("not bytes")  # type: ignore[arg-type]
    share = UnmaskResponse("job", 1, "a", (RevealedShare("b", 0, PRIME - 1),)).to_bytes()
    too_big = share[:-33] + (PRIME).to_bytes(33, "big")
    with pytest.raises(SecAggMessageError, match="below p"):
        UnmaskResponse.from_bytes(too_big)
    bad_kind = share[:-34] + b"\x02" + share[-33:]
    with pytest.raises(SecAggMessageError, match="kind"):
        UnmaskResponse.from_bytes(bad_kind)
    twice = UnmaskRequest("job", 1, ("a", "b")).to_bytes().replace(b"\x00\x01b", b"\x00\x01a")
    with pytest.raises(SecAggMessageError, match="twice"):
        UnmaskRequest.from_bytes(twice)
    setup = Setup("job", 1, ("a", "b"), 2, 1, bytes(32), 10, 32, 8, 1.0, 5)
    assert Setup.from_bytes(setup.to_bytes()) == setup
    for bad in (Setup("job", 1, ("a", "b"), 2, 1, bytes(32), 10, 48, 8, 1.0, 5),
                Setup("job", 1, ("a", "b"), 3, 1, bytes(32), 10, 32, 8, 1.0, 5),
                Setup("job", 1, ("a", "b"), 2, 1, bytes(32), 10, 32, 8, float("inf"), 5),
                Setup("job", 1, ("a", "b"), 2, 1, bytes(32), 0, 32, 8, 1.0, 5)):
        with pytest.raises(SecAggMessageError):
            Setup.from_bytes(bad.to_bytes())
    with pytest.raises(SecAggMessageError):
        AdvertiseKeys("job", 1, "a", bytes(31), bytes(32), b"").to_bytes()
    with pytest.raises(SecAggMessageError):
        AdvertiseKeys("", 1, "a", bytes(32), bytes(32), b"").to_bytes()
