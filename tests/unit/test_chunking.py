"""Chunk framing: payloads of any size split and reassemble exactly, and every malformed stream
(wrong transfer, dropped, repeated, reordered or truncated chunks, wrong sizes or digest) raises
ChunkError instead of returning wrong data."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.protos.chunking import (
    DEFAULT_CHUNK_SIZE,
    ChunkAssembler,
    ChunkError,
    assemble,
    assemble_async,
    split_payload,
)
from confide.v1 import common_pb2

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunks_of(payload: bytes, size: int, tid: str = "t") -> list[common_pb2.Chunk]:
    return list(split_payload(payload, tid, size))


def copy(chunk: common_pb2.Chunk, **changes) -> common_pb2.Chunk:
    out = common_pb2.Chunk()
    out.CopyFrom(chunk)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def test_split_frames_every_chunk():
    payload = bytes(range(256)) * 10
    chunks = chunks_of(payload, 1000, "job-1")
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [len(c.data) for c in chunks] == [1000, 1000, 560]
    assert all(c.transfer_id == "job-1" and c.total_bytes == len(payload) for c in chunks)
    assert [c.last for c in chunks] == [False, False, True]
    assert [c.sha256 for c in chunks[:-1]] == [b"", b""]
    assert chunks[-1].sha256 == hashlib.sha256(payload).digest()
    assert assemble(chunks) == payload


def test_default_chunks_fit_well_under_grpc_limit():
    payload = b"\x07" * (5 * DEFAULT_CHUNK_SIZE + 3)
    chunks = list(split_payload(payload, "big"))
    assert len(chunks) == 6
    assert max(c.ByteSize() for c in chunks) < 2 * DEFAULT_CHUNK_SIZE < 4 << 20
    assert assemble(chunks) == payload


def test_empty_payload_is_one_last_chunk():
    (chunk,) = chunks_of(b"", 10)
    assert chunk.last and chunk.index == 0 and chunk.total_bytes == 0 and chunk.data == b""
    assert chunk.sha256 == hashlib.sha256(b"").digest()
    assert assemble([chunk]) == b""


def test_exact_multiple_has_no_trailing_empty_chunk():
    chunks = chunks_of(b"abcdef", 3)
    assert [c.data for c in chunks] == [b"abc", b"def"] and chunks[-1].last


def test_split_rejects_bad_chunk_size_eagerly():
    for size in (0, -1):
        with pytest.raises(ValueError, match="chunk_size"):
            split_payload(b"abc", "t", size)


def test_split_accepts_bytes_like():
    assert assemble(split_payload(bytearray(b"hello"), "t", 2)) == b"hello"
    assert assemble(split_payload(memoryview(b"hello"), "t", 2)) == b"hello"


def test_assembler_state():
    chunks = chunks_of(b"0123456789", 4)
    asm = ChunkAssembler()
    assert asm.add(chunks[0]) is None
    assert asm.transfer_id == "t" and asm.received_bytes == 4 and not asm.done
    assert asm.add(chunks[1]) is None
    assert asm.add(chunks[2]) == b"0123456789"
    assert asm.done and asm.received_bytes == 10 and asm.total_bytes == 10
    with pytest.raises(ChunkError, match="after the transfer completed"):
        asm.add(chunks[2])


def test_wrong_transfer_id():
    chunks = chunks_of(b"0123456789", 4, "a")
    with pytest.raises(ChunkError, match="transfer 'a', expected 'b'"):
        ChunkAssembler("b").add(chunks[0])
    asm = ChunkAssembler()
    asm.add(chunks[0])
    with pytest.raises(ChunkError, match="transfer 'x', expected 'a'"):
        asm.add(copy(chunks[1], transfer_id="x"))


@pytest.mark.parametrize(
    "order,message",
    [
        ([1], "out-of-order chunk index 1 .* expected 0"),
        ([0, 2], "out-of-order chunk index 2 .* expected 1"),
        ([0, 0], "duplicate chunk index 0 .* expected 1"),
        ([0, 1, 1], "duplicate chunk index 1 .* expected 2"),
    ],
)
def test_order_is_enforced(order, message):
    chunks = chunks_of(b"0123456789", 4)
    with pytest.raises(ChunkError, match=message):
        assemble([chunks[i] for i in order])


def test_total_bytes_changes_and_limits():
    chunks = chunks_of(b"0123456789", 4)
    with pytest.raises(
        ChunkError, match="announces total_bytes=11, but earlier chunks announced 10"
    ):
        assemble([chunks[0], copy(chunks[1], total_bytes=11)])
    with pytest.raises(ChunkError, match="payload of 10 bytes exceeds the limit of 9 bytes"):
        assemble(chunks, max_bytes=9)
    assert assemble(chunks, max_bytes=10) == b"0123456789"
    huge = common_pb2.Chunk(transfer_id="t", index=0, data=b"x", total_bytes=1 << 40)
    with pytest.raises(ChunkError, match=f"payload of {1 << 40} bytes exceeds the limit"):
        ChunkAssembler().add(huge)


def test_more_bytes_than_announced():
    chunks = chunks_of(b"0123456789", 4)
    with pytest.raises(ChunkError, match="more than the announced 10"):
        assemble([chunks[0], chunks[1], copy(chunks[2], data=b"89X")])


def test_last_chunk_too_early_or_bad_digest():
    chunks = chunks_of(b"0123456789", 4)
    with pytest.raises(ChunkError, match="last chunk arrived after 8 of 10 bytes"):
        assemble([chunks[0], copy(chunks[1], last=True, sha256=chunks[2].sha256)])
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        assemble([chunks[0], chunks[1], copy(chunks[2], data=b"8X")])
    with pytest.raises(ChunkError, match="sha256 mismatch"):
        assemble([chunks[0], chunks[1], copy(chunks[2], sha256=b"")])


def test_truncated_stream():
    chunks = chunks_of(b"0123456789", 4)
    with pytest.raises(ChunkError, match="truncated stream: got 8 of 10 bytes"):
        assemble(chunks[:-1])
    with pytest.raises(ChunkError, match="truncated stream: got 0 of an unknown number of bytes"):
        assemble([])


def test_chunks_after_the_last_are_an_error():
    chunks = chunks_of(b"0123456789", 4)
    with pytest.raises(ChunkError, match="after the transfer completed"):
        assemble([*chunks, chunks[-1]])


def test_failed_assembler_stays_failed():
    chunks = chunks_of(b"0123456789", 4)
    asm = ChunkAssembler()
    with pytest.raises(ChunkError):
        asm.add(chunks[1])
    with pytest.raises(ChunkError, match="already failed"):
        asm.add(chunks[0])


def test_assemble_async():
    payload = bytes(range(200))

    async def stream(chunks):
        for c in chunks:
            await asyncio.sleep(0)
            yield c

    chunks = chunks_of(payload, 33)
    assert asyncio.run(assemble_async(stream(chunks))) == payload
    with pytest.raises(ChunkError, match="truncated stream: got 198 of 200 bytes"):
        asyncio.run(assemble_async(stream(chunks[:-1])))
    with pytest.raises(ChunkError, match="expected 'other'"):
        asyncio.run(assemble_async(stream(chunks), transfer_id="other"))


# --------------------------------------------------------------------------- fuzzing


@given(st.binary(max_size=2000), st.integers(1, 300), st.text(max_size=8))
@FUZZ
def test_fuzz_split_assemble_round_trip(payload, chunk_size, tid):
    chunks = list(split_payload(payload, tid, chunk_size))
    assert len(chunks) == max(1, -(-len(payload) // chunk_size))
    assert all(0 < len(c.data) <= chunk_size for c in chunks) or payload == b""
    assert assemble(chunks, transfer_id=tid) == payload
    wire = [common_pb2.Chunk.FromString(c.SerializeToString()) for c in chunks]
    assert assemble(wire) == payload


@given(st.binary(min_size=1, max_size=600), st.integers(1, 64), st.data())
@FUZZ
def test_fuzz_tampered_streams_raise_chunk_error(payload, chunk_size, data):
    chunks = list(split_payload(payload, "t", chunk_size))
    n = len(chunks)
    op = data.draw(st.sampled_from(["drop", "duplicate", "swap", "truncate", "corrupt"]))
    tampered = list(chunks)
    if op == "drop":
        del tampered[data.draw(st.integers(0, n - 1))]
    elif op == "duplicate":
        i = data.draw(st.integers(0, n - 1))
        tampered.insert(data.draw(st.integers(0, n)), chunks[i])
    elif op == "swap":
        if n < 2:
            return
        i = data.draw(st.integers(0, n - 2))
        j = data.draw(st.integers(i + 1, n - 1))
        tampered[i], tampered[j] = tampered[j], tampered[i]
    elif op == "truncate":
        tampered = tampered[: data.draw(st.integers(0, n - 1))]
    else:
        i = data.draw(st.integers(0, n - 1))
        raw = bytearray(chunks[i].data)
        k = data.draw(st.integers(0, len(raw) - 1))
        raw[k] ^= 1 << data.draw(st.integers(0, 7))
        tampered[i] = copy(chunks[i], data=bytes(raw))
    with pytest.raises(ChunkError):
        assemble(tampered)
