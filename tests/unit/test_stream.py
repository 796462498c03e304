"""The streamed tensor-map wire (protos.stream): exact round trips, data cut from the tensors'
memory, one allocation per tensor, and hostile streams refused before any allocation."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.protos import stream as stream_module
from confide.protos.chunking import ChunkError
from confide.protos.codec import CodecError, SeedProjectedTensor, SparseTensor
from confide.protos.stream import (
    TensorMapReceiver,
    receive_tensor_map,
    stream_digest,
    stream_tensor_map,
)
from confide.v1 import common_pb2


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return a == b


MIXED = {
    "dense": torch.randn(3, 5),
    "bool": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3),
    "scalar": torch.tensor(3.0, dtype=torch.bfloat16),
    "half": torch.randn(7, dtype=torch.float16),
    "ints": torch.arange(-5, 5, dtype=torch.int64),
    "strided": torch.randn(4, 6).t(),  # not contiguous
    "sparse": SparseTensor((100,), torch.tensor([1, 5, 99]), torch.tensor([1.0, 2.0, 3.0])),
    "bitmap": SparseTensor((16,), torch.arange(0, 16, 2), torch.ones(8)),
    "projected": SeedProjectedTensor((4,), torch.float32, (1, 2), (0.5, 0.25), "g"),
}


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_every_variant_round_trips_bit_exactly_in_order(chunk_size):
    chunks = list(stream_tensor_map(MIXED, "t", chunk_size=chunk_size))
    assert all(c.ByteSize() <= chunk_size + 200 for c in chunks if c.WhichOneof("body") == "data")
    out = receive_tensor_map(chunks)
    assert list(out) == list(MIXED)
    assert all(_same(MIXED[k], out[k]) for k in MIXED)
    # the stream's digest, without building chunks (what an anonymous update signs)
    assert chunks[-1].sha256 == stream_digest(MIXED, chunk_size)
    # each tensor opens with its header; the data that follows is exactly its bytes
    headers = [c.header for c in chunks if c.WhichOneof("body") == "header"]
    assert [h.name for h in headers] == list(MIXED)
    assert sum(h.byte_length for h in headers) == chunks[0].total_bytes
    assert sum(len(c.data) for c in chunks) == chunks[0].total_bytes


def test_an_empty_map_is_one_last_chunk():
    (chunk,) = stream_tensor_map({}, "t")
    assert chunk.last and chunk.total_bytes == 0 and chunk.index == 0
    assert receive_tensor_map([chunk]) == {}


def test_data_is_read_from_the_tensor_itself_when_its_chunks_are_taken():
    # the sender holds views of the tensor, not a serialized copy: a change made before the
    # chunk is taken is what the chunk carries
    t = torch.zeros(8)
    chunks = stream_tensor_map({"t": t}, "x", chunk_size=16)
    header = next(chunks)
    assert header.WhichOneof("body") == "header"
    t[0] = 1.0
    first = next(chunks)
    assert torch.frombuffer(bytearray(first.data), dtype=torch.float32)[0] == 1.0


def test_the_receiver_allocates_each_tensor_once(monkeypatch):
    allocated: list[int] = []
    real = stream_module._allocate

    def counting(shape, dtype):
        allocated.append(math.prod(shape) * torch.tensor([], dtype=dtype).element_size())
        return real(shape, dtype)

    state = {"a": torch.randn(1000), "b": torch.randn(20, 30)}
    chunks = list(stream_tensor_map(state, "t", chunk_size=512))
    monkeypatch.setattr(stream_module, "_allocate", counting)
    out = receive_tensor_map(chunks)
    assert allocated == [4000, 2400]  # one buffer per tensor, of exactly its size
    assert out["a"].data_ptr() != state["a"].data_ptr()


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.pop(1), "out-of-order"),
    (lambda c: c.insert(1, c[0]), "duplicate"),
    (lambda c: c.__setitem__(2, _with(c[2], data=c[2].data + b"x")), "runs past the 256"),
    (lambda c: c.__setitem__(1, _with(c[1], data=bytes(len(c[1].data)))), "sha256 mismatch"),
    (lambda c: c.pop(), "truncated"),
])
def test_broken_streams_never_return_data(mutate, message):
    # header a, 100 + 100 + 56 bytes, header b, 12 bytes
    chunks = list(stream_tensor_map({"a": torch.randn(64), "b": torch.randn(3)}, "t",
                                    chunk_size=100))
    mutate(chunks)
    with pytest.raises(ChunkError, match=message):
        receive_tensor_map(chunks)


def _with(chunk: common_pb2.Chunk, **fields) -> common_pb2.Chunk:
    out = common_pb2.Chunk()
    out.CopyFrom(chunk)
    for key, value in fields.items():
        setattr(out, key, value)
    return out


def _header_chunk(total: int, **fields) -> common_pb2.Chunk:
    return common_pb2.Chunk(transfer_id="t", index=0, total_bytes=total,
                            header=common_pb2.TensorHeader(**fields))


@pytest.mark.parametrize("fields,total,message", [
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[1 << 15, 1 << 10], byte_length=1 << 27),
     1000, "more than the announced 1000"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[1 << 20, 1 << 20],
          byte_length=1 << 42), 1 << 42, "exceeds the limit"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[10], byte_length=41), 41,
     "needs 40 data bytes"),
    (dict(name="w", dtype=0, shape=[1], byte_length=4), 4, "DTYPE_UNSPECIFIED"),
    (dict(name="w", dtype=99, shape=[1], byte_length=4), 4, "unknown dtype"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[-1], byte_length=0), 0, "negative"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[1] * 65, byte_length=4), 4, "dimensions"),
    (dict(name="", dtype=common_pb2.FLOAT32, shape=[1], byte_length=4), 4, "empty name"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[1], encoding=9, byte_length=4), 4,
     "unknown encoding"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[10], encoding=common_pb2.TENSOR_SPARSE,
          index_dtype=common_pb2.INT32, index_count=3, value_count=11, byte_length=56), 56,
     "11 values for 10 elements"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[10], encoding=common_pb2.TENSOR_SPARSE,
          index_dtype=common_pb2.INT32, index_count=5, value_count=2, byte_length=28), 28,
     "needs 2"),
    (dict(name="w", dtype=common_pb2.FLOAT32, shape=[4],
          encoding=common_pb2.TENSOR_SEED_PROJECTED, seeds=[1], byte_length=0), 0,
     "1 seeds but 0 coefficients"),
])
def test_hostile_headers_are_refused_before_anything_is_allocated(monkeypatch, fields, total,
                                                                   message):
    def refuse(*_args, **_kwargs):
        raise AssertionError("allocated for a header that should have been refused")

    monkeypatch.setattr(stream_module, "_allocate", refuse)
    receiver = TensorMapReceiver(max_bytes=1 << 31)
    with pytest.raises((ChunkError, CodecError), match=message):
        receiver.add(_header_chunk(total, **fields))
    with pytest.raises(ChunkError, match="already failed"):  # and it stays failed
        receiver.add(_header_chunk(total, **fields))


def test_names_must_be_unique_and_headers_wait_for_their_bytes():
    one = list(stream_tensor_map({"a": torch.zeros(2)}, "t"))
    twice = [one[0], _with(one[1], last=False, sha256=b""), _with(one[0], index=2)]
    with pytest.raises(ChunkError, match="more than once"):
        receive_tensor_map(twice, max_bytes=1 << 20)
    early = [one[0], _with(one[0], index=1)]
    with pytest.raises(ChunkError, match="before tensor 'a' got its 8 bytes"):
        receive_tensor_map(early)
    with pytest.raises(ChunkError, match="outside any tensor"):
        receive_tensor_map([common_pb2.Chunk(transfer_id="t", data=b"xx", total_bytes=2)])


def test_limits_on_elements_and_tensors():
    chunks = list(stream_tensor_map({"a": torch.zeros(50), "b": torch.zeros(5)}, "t"))
    with pytest.raises(ChunkError, match="more than the limit of 49"):
        receive_tensor_map(chunks, max_elements=49)
    with pytest.raises(ChunkError, match="more than 1 tensors"):
        receive_tensor_map(chunks, max_tensors=1)
    bad_bool = list(stream_tensor_map({"b": torch.zeros(3, dtype=torch.uint8)}, "t"))
    bad_bool[0].header.dtype = common_pb2.BOOL
    bad_bool[-1] = _with(bad_bool[-1], data=b"\x00\x02\x00")
    digest = stream_module.hashlib.sha256()
    for c in bad_bool:
        stream_module._hash_piece(digest, c.header if c.WhichOneof("body") == "header"
                                  else memoryview(c.data))
    bad_bool[-1].sha256 = digest.digest()
    with pytest.raises(ChunkError, match="BOOL"):
        receive_tensor_map(bad_bool)


# ------------------------------------------------------------------ hypothesis: hostile headers

DTYPES = st.sampled_from([*common_pb2.DType.values(), 11, 1000])
dims = st.one_of(st.integers(0, 64), st.integers(-(1 << 40), 1 << 40))
ITEMSIZE = {common_pb2.FLOAT64: 8, common_pb2.INT64: 8, common_pb2.FLOAT32: 4,
            common_pb2.INT32: 4, common_pb2.FLOAT16: 2, common_pb2.BFLOAT16: 2,
            common_pb2.INT16: 2}


@st.composite
def hostile_headers(draw) -> common_pb2.TensorHeader:
    """Headers of every kind, often self-consistent (the byte length their dtype and shape
    need, so the receiver would allocate them) and often not."""
    header = common_pb2.TensorHeader(
        name=draw(st.text(max_size=8)), dtype=draw(DTYPES),
        shape=draw(st.lists(dims, max_size=4)), encoding=draw(st.sampled_from([0, 0, 1, 2, 7])),
        index_encoding=draw(st.sampled_from([0, 1, 2, 5])), index_dtype=draw(DTYPES),
        seeds=draw(st.lists(st.integers(0, (1 << 64) - 1), max_size=3)),
        coefficients=draw(st.lists(st.floats(width=32, allow_nan=False), max_size=3)),
        generator=draw(st.text(max_size=4)))
    numel = math.prod(header.shape)
    itemsize = ITEMSIZE.get(header.dtype, 1)
    header.value_count = draw(st.one_of(st.integers(0, 1 << 40),
                                        st.integers(0, max(0, min(numel, 1 << 20)))))
    header.index_count = draw(st.sampled_from([header.value_count, (max(numel, 0) + 7) // 8,
                                               draw(st.integers(0, 1 << 40))])) % (1 << 64)
    consistent = {
        0: max(numel, 0) * itemsize,
        1: header.index_count * ITEMSIZE.get(header.index_dtype, 1)
        + header.value_count * itemsize,
    }.get(header.encoding, 0)
    header.byte_length = draw(st.sampled_from([consistent, draw(st.integers(0, 1 << 50))])
                              ) % (1 << 64)
    return header


@contextlib.contextmanager
def _counted_allocations():
    allocated = [0]
    real = stream_module._allocate

    def counting(shape, dtype):
        allocated[0] += math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        return real(shape, dtype)

    stream_module._allocate = counting
    try:
        yield allocated
    finally:
        stream_module._allocate = real


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_headers(), min_size=1, max_size=4), st.integers(0, 1 << 16),
       st.integers(0, 1 << 17), st.binary(max_size=64))
def test_fuzz_hostile_headers_never_allocate_past_the_limit(headers, max_bytes, total, data):
    """Whatever the headers declare, the receiver allocates at most ``max_bytes`` in all and
    raises only ChunkError/CodecError (never a MemoryError, RuntimeError or overflow)."""
    receiver = TensorMapReceiver(max_bytes=max_bytes, max_elements=1 << 20)
    chunks = []
    for header in headers:
        chunks.append(common_pb2.Chunk(transfer_id="t", header=header))
        chunks.append(common_pb2.Chunk(transfer_id="t", data=data))
    chunks[-1].last = True
    with _counted_allocations() as allocated:
        for i, chunk in enumerate(chunks):
            chunk.index = i
            chunk.total_bytes = total
            try:
                receiver.add(chunk)
            except (ChunkError, CodecError):
                break
    assert allocated[0] <= max_bytes


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5),
                       st.builds(lambda n, d: torch.arange(n, dtype=d),
                                 st.integers(0, 40),
                                 st.sampled_from([torch.float32, torch.int16, torch.uint8])),
                       max_size=4),
       st.integers(1, 50), st.data())
def test_fuzz_tampered_streams_raise_and_clean_ones_round_trip(state, chunk_size, data):
    chunks = list(stream_tensor_map(state, "t", chunk_size=chunk_size))
    out = receive_tensor_map(chunks)
    assert list(out) == list(state) and all(_same(state[k], out[k]) for k in state)
    carrying = [i for i, c in enumerate(chunks) if c.WhichOneof("body") == "data" and c.data]
    if not carrying:
        return
    i = data.draw(st.sampled_from(carrying))
    at = data.draw(st.integers(0, len(chunks[i].data) - 1))
    flipped = bytearray(chunks[i].data)
    flipped[at] ^= 1 << data.draw(st.integers(0, 7))
    chunks[i] = _with(chunks[i], data=bytes(flipped))
    with pytest.raises((ChunkError, CodecError)):
        receive_tensor_map(chunks)
