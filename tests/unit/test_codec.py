"""The tensor codec: exact round trips, strict validation of wire data, and fuzzing that shows
hostile bytes only ever produce CodecError."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.protos.codec import (
    SUPPORTED_DTYPES,
    CodecError,
    SeedProjectedTensor,
    SparseTensor,
    decode_named,
    decode_tensor_map,
    encode_named,
    encode_tensor_map,
    tensor_from_proto,
    tensor_map_from_bytes,
    tensor_map_to_bytes,
    tensor_to_proto,
    to_dense,
    wire_size,
)
from confide.v1 import common_pb2

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact: same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if t.numel() >= 3:  # special values must survive bit-exactly
            flat = t.view(-1)
            flat[0], flat[1], flat[2] = float("nan"), float("-inf"), -0.0
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    msg = common_pb2.Tensor.FromString(tensor_to_proto(t).SerializeToString())
    return tensor_from_proto(msg)


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES), ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)], ids=str)
def test_dense_round_trip_is_bit_exact_for_every_dtype(dtype, shape):
    t = sample(dtype, shape)
    out = roundtrip(t)
    assert bits_equal(out, t)
    assert out.shape == t.shape


@pytest.mark.parametrize("dtype", list(SUPPORTED_DTYPES), ids=str)
def test_wire_bytes_are_little_endian_c_order(dtype):
    t = sample(dtype, (2, 3), seed=1)
    msg = tensor_to_proto(t)
    assert msg.dtype == SUPPORTED_DTYPES[dtype]
    assert list(msg.shape) == [2, 3]
    if dtype == torch.bfloat16:  # numpy has no bfloat16: compare via the int16 bit pattern
        expected = t.view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        expected = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
    assert msg.data == expected


def test_bfloat16_bytes_are_the_top_half_of_float32():
    t = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    f32 = t.to(torch.float32).numpy().astype("<f4").tobytes()
    assert tensor_to_proto(t).data == b"".join(f32[i + 2 : i + 4] for i in range(0, 12, 4))


def test_non_contiguous_and_grad_and_sparse_layout_inputs():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for view in (base.t(), base[:, ::2], base[1:3, 1:5], base.unsqueeze(0).expand(2, 4, 6)):
        assert not view.is_contiguous()
        assert bits_equal(roundtrip(view), view.contiguous())
    leaf = torch.randn(3, requires_grad=True)
    assert bits_equal(roundtrip(leaf), leaf.detach())
    coo = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    assert bits_equal(roundtrip(coo), coo.to_dense())


def test_decoded_tensor_is_writable_and_does_not_alias_the_message():
    t = torch.arange(6, dtype=torch.int32)
    msg = tensor_to_proto(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tensor_from_proto(msg)
    out += 1  # must not raise, must not touch the message
    assert msg.data == tensor_to_proto(t).data
    assert torch.equal(tensor_from_proto(msg), t)


def test_dense_rejects_unknown_and_unspecified_dtypes():
    msg = common_pb2.Tensor(dtype=common_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0")
    with pytest.raises(CodecError, match="DTYPE_UNSPECIFIED"):
        tensor_from_proto(msg)
    msg.dtype = 42
    with pytest.raises(CodecError, match="unknown dtype value 42"):
        tensor_from_proto(msg)


def test_dense_rejects_bad_shapes_and_sizes():
    with pytest.raises(CodecError, match="negative dimension -2"):
        tensor_from_proto(common_pb2.Tensor(dtype=common_pb2.UINT8, shape=[-2, -3], data=b""))
    with pytest.raises(CodecError, match="more than the limit of 10"):
        tensor_from_proto(common_pb2.Tensor(dtype=common_pb2.UINT8, shape=[11]), max_elements=10)
    msg = common_pb2.Tensor(dtype=common_pb2.FLOAT32, shape=[2, 3], data=b"\0" * 23)
    with pytest.raises(CodecError, match=r"needs 24 data bytes .* got 23"):
        tensor_from_proto(msg)
    with pytest.raises(CodecError, match="dimensions"):
        tensor_from_proto(common_pb2.Tensor(dtype=common_pb2.UINT8, shape=[1] * 65, data=b"\0"))
    huge = common_pb2.Tensor(dtype=common_pb2.UINT8, shape=[0, 2**62, 2**62], data=b"")
    with pytest.raises(CodecError):
        tensor_from_proto(huge)
    with pytest.raises(CodecError, match="bytes other than 0 and 1"):
        tensor_from_proto(common_pb2.Tensor(dtype=common_pb2.BOOL, shape=[2], data=b"\x01\x02"))


def test_unsupported_dtype_cannot_be_encoded():
    with pytest.raises(CodecError, match="cannot travel on the wire"):
        tensor_to_proto(torch.zeros(2, dtype=torch.complex64))


# --------------------------------------------------------------------------- sparse


def sparse_of(t: torch.Tensor, count: int) -> SparseTensor:
    """Every other entry of ``t``, at most ``count`` of them (which ones does not matter
    to the codec)."""
    flat = t.reshape(-1)
    indices = torch.arange(0, flat.numel(), 2, dtype=torch.int64)[:count]
    return SparseTensor(shape=tuple(t.shape), indices=indices, values=flat[indices].clone())


def test_sparse_densifies_to_its_entries():
    sparse = SparseTensor(shape=(2, 3), indices=torch.tensor([1, 3, 5]),
                          values=torch.tensor([-5.0, 3.0, 4.0]))
    assert sparse.dtype == torch.float32
    assert torch.equal(sparse.to_dense(), torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 4.0]]))
    assert torch.equal(to_dense(sparse), sparse.to_dense())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
def test_sparse_round_trip(dtype):
    dense = sample(dtype, (4, 5), seed=3)
    sparse = sparse_of(dense, 7)
    name, out = decode_named(encode_named("w", sparse))
    assert name == "w"
    assert isinstance(out, SparseTensor)
    assert out == sparse
    assert bits_equal(out.to_dense(), sparse.to_dense())


def _sparse_msg(**overrides) -> common_pb2.NamedTensor:
    fields = {
        "dtype": common_pb2.FLOAT32,
        "shape": [2, 3],
        "indices": tensor_to_proto(torch.tensor([0, 5])),
        "values": tensor_to_proto(torch.tensor([1.0, 2.0])),
    }
    fields.update(overrides)
    return common_pb2.NamedTensor(name="s", sparse=common_pb2.SparseTensor(**fields))


def test_sparse_accepts_int32_indices():
    _, out = decode_named(_sparse_msg(indices=tensor_to_proto(torch.tensor([1, 4]).int())))
    assert out.indices.dtype == torch.int64
    assert out.to_dense().reshape(-1).tolist() == [0.0, 1.0, 0.0, 0.0, 2.0, 0.0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"indices": tensor_to_proto(torch.tensor([0.0, 1.0]))}, "INT32 or INT64"),
        ({"indices": tensor_to_proto(torch.tensor([[0, 1]]))}, "1-D"),
        ({"values": tensor_to_proto(torch.tensor([1.0]))}, "2 indices but 1 values"),
        ({"indices": tensor_to_proto(torch.tensor([0, 6]))}, r"index 6 outside \[0, 6\)"),
        ({"indices": tensor_to_proto(torch.tensor([-1, 2]))}, "index -1 outside"),
        ({"indices": tensor_to_proto(torch.tensor([2, 2]))}, "repeats an index"),
        ({"values": tensor_to_proto(torch.tensor([1.0, 2.0]).double())}, "must match"),
        ({"dtype": common_pb2.DTYPE_UNSPECIFIED}, "DTYPE_UNSPECIFIED"),
        ({"shape": [2, -3]}, "negative dimension"),
    ],
)
def test_sparse_validation(overrides, message):
    with pytest.raises(CodecError, match=message):
        decode_named(_sparse_msg(**overrides))


@pytest.mark.parametrize(
    "numel,count,encoding,index_dtype",
    [
        (1000, 100, common_pb2.INDEX_GAPS, torch.uint8),  # gaps of ~10: one byte each
        (1000, 600, common_pb2.INDEX_BITMAP, torch.uint8),  # 125 bytes < 600 gaps
        (200_000, 20, common_pb2.INDEX_GAPS, torch.int16),  # gaps of ~10,000: 2 bytes
        (1 << 20, 2, common_pb2.INDEX_POSITIONS, torch.int32),  # gaps > 2^15: no better
        (10, 0, common_pb2.INDEX_POSITIONS, torch.int32),
    ],
)
def test_sparse_positions_travel_in_the_smallest_encoding(numel, count, encoding, index_dtype):
    g = torch.Generator().manual_seed(numel + count)
    positions = torch.sort(torch.randperm(numel, generator=g)[:count]).values
    sparse = SparseTensor((numel,), positions, torch.randn(count, generator=g))
    msg = encode_named("s", sparse).sparse
    assert msg.index_encoding == encoding
    assert tensor_from_proto(msg.indices).dtype == index_dtype
    _, out = decode_named(encode_named("s", sparse))
    assert out == sparse


def _compact_msg(encoding: int, indices: torch.Tensor, count: int, shape=(2, 6)):
    return _sparse_msg(shape=list(shape), indices=tensor_to_proto(indices),
                       values=tensor_to_proto(torch.ones(count)), index_encoding=encoding)


@pytest.mark.parametrize(
    "msg,message",
    [
        # gaps 3, 8 -> positions 3, 12: past the 12 elements
        (_compact_msg(common_pb2.INDEX_GAPS, torch.tensor([3, 8], dtype=torch.uint8), 2),
         r"index 12 outside \[0, 12\)"),
        (_compact_msg(common_pb2.INDEX_GAPS, torch.tensor([1, -2], dtype=torch.int16), 2),
         "negative gap"),
        (_compact_msg(common_pb2.INDEX_GAPS, torch.tensor([1, 2]), 2), "UINT8, INT16 or INT32"),
        (_compact_msg(common_pb2.INDEX_GAPS, torch.tensor([1, 2], dtype=torch.uint8), 3),
         "2 indices but 3 values"),
        (_compact_msg(common_pb2.INDEX_BITMAP, torch.tensor([1], dtype=torch.uint8), 1),
         "bitmap must be 2 UINT8 bytes"),
        # bits 12..15 of the second byte lie past the 12 elements
        (_compact_msg(common_pb2.INDEX_BITMAP, torch.tensor([1, 16], dtype=torch.uint8), 2),
         "padding bits"),
        (_compact_msg(common_pb2.INDEX_BITMAP, torch.tensor([3, 0], dtype=torch.uint8), 1),
         "2 indices but 1 values"),
        (_compact_msg(7, torch.tensor([1], dtype=torch.int32), 1), "unknown index encoding"),
    ],
)
def test_compact_positions_are_validated(msg, message):
    with pytest.raises(CodecError, match=message):
        decode_named(msg)


def test_sparse_without_indices_is_rejected():
    msg = common_pb2.NamedTensor(name="s", sparse=common_pb2.SparseTensor(dtype=1, shape=[2]))
    with pytest.raises(CodecError, match="both indices and values"):
        decode_named(msg)


def test_sparse_dense_shape_is_bounded():
    msg = _sparse_msg(shape=[1 << 20, 1 << 20])
    with pytest.raises(CodecError, match="more than the limit"):
        decode_named(msg, max_elements=1 << 31)


# --------------------------------------------------------------------------- projected


def test_projected_round_trip_and_validation():
    value = SeedProjectedTensor(
        shape=(3, 4),
        dtype=torch.bfloat16,
        seeds=(0, 2**64 - 1, 12345),
        coefficients=(0.5, -1.25, 0.1),
        generator="cpu-truncnormal-v1",
    )
    assert value.coefficients[2] == float(np.float32(0.1))  # rounded like the wire
    _, out = decode_named(encode_named("p", value))
    assert out == value
    with pytest.raises(CodecError, match="2 seeds but 1 coefficients"):
        SeedProjectedTensor((2,), torch.float32, (1, 2), (0.5,), "g")
    with pytest.raises(CodecError, match="unsigned 64-bit"):
        SeedProjectedTensor((2,), torch.float32, (-1,), (0.5,), "g")
    with pytest.raises(CodecError, match="overflows float32"):
        SeedProjectedTensor((2,), torch.float32, (1,), (1e39,), "g")
    with pytest.raises(CodecError, match="generator"):
        SeedProjectedTensor((2,), torch.float32, (1,), (1.0,), "")
    with pytest.raises(CodecError, match="direction generator"):
        to_dense(value)
    bad = encode_named("p", value)
    bad.projected.coefficients.append(1.0)
    with pytest.raises(CodecError, match="3 seeds but 4 coefficients"):
        decode_named(bad)
    bad = encode_named("p", value)
    bad.projected.shape[:] = [1 << 40]
    with pytest.raises(CodecError, match="more than the limit"):
        decode_named(bad)


# --------------------------------------------------------------------------- maps


def test_tensor_map_round_trip_preserves_order_and_variants():
    tensors = {
        "z.dense": torch.randn(3, 2),
        "a.sparse": sparse_of(torch.randn(10), 3),
        "m.projected": SeedProjectedTensor((5,), torch.float32, (7,), (0.25,), "g-v1"),
        "c.bf16": torch.randn(4).to(torch.bfloat16),
    }
    data = tensor_map_to_bytes(tensors)
    assert wire_size(tensors) == len(data)
    out = tensor_map_from_bytes(data)
    assert list(out) == list(tensors)
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            assert bits_equal(out[name], value)
        else:
            assert out[name] == value
    assert tensor_map_from_bytes(b"") == {}


def test_tensor_map_rejects_empty_and_duplicate_names_and_missing_values():
    dup = encode_tensor_map({"a": torch.zeros(1)})
    dup.tensors.append(encode_named("a", torch.ones(1)))
    with pytest.raises(CodecError, match="'a' appears more than once"):
        decode_tensor_map(dup)
    empty = common_pb2.TensorMap(tensors=[encode_named("", torch.zeros(1))])
    with pytest.raises(CodecError, match="empty name"):
        decode_tensor_map(empty)
    with pytest.raises(CodecError, match="non-empty"):
        encode_tensor_map({"": torch.zeros(1)})
    missing = common_pb2.TensorMap(tensors=[common_pb2.NamedTensor(name="x")])
    with pytest.raises(CodecError, match="'x' carries no value"):
        decode_tensor_map(missing)
    with pytest.raises(CodecError, match=r"not a serialized confide\.v1\.TensorMap"):
        tensor_map_from_bytes(b"\xff\xfe garbage")
    with pytest.raises(TypeError):
        encode_named("x", [1.0, 2.0])  # type: ignore[arg-type]


def test_max_elements_bounds_every_tensor_in_a_map():
    data = tensor_map_to_bytes({"a": torch.zeros(5), "b": torch.zeros(50)})
    assert len(tensor_map_from_bytes(data, max_elements=50)) == 2
    with pytest.raises(CodecError, match="'b'"):
        tensor_map_from_bytes(data, max_elements=49)


# --------------------------------------------------------------------------- fuzzing

dtypes = st.sampled_from(list(SUPPORTED_DTYPES))
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
names = st.text(min_size=1, max_size=12)


@st.composite
def dense_tensors(draw):
    dtype, shape = draw(dtypes), draw(shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


@st.composite
def wire_values(draw):
    kind = draw(st.sampled_from(["dense", "sparse", "projected"]))
    if kind == "dense":
        return draw(dense_tensors())
    if kind == "sparse":
        t = draw(dense_tensors())
        top = sparse_of(t, draw(st.integers(0, max(t.numel(), 0))))
        if draw(st.booleans()):  # any order: the positions travel as they are
            order = torch.tensor(draw(st.permutations(range(top.indices.numel()))),
                                 dtype=torch.int64)
            top = SparseTensor(top.shape, top.indices[order], top.values[order])
        return top
    k = draw(st.integers(0, 4))
    return SeedProjectedTensor(
        shape=draw(shapes),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64])),
        seeds=tuple(draw(st.lists(st.integers(0, 2**64 - 1), min_size=k, max_size=k))),
        coefficients=tuple(
            draw(st.lists(st.floats(width=32, allow_nan=False), min_size=k, max_size=k))
        ),
        generator=draw(st.text(min_size=1, max_size=8)),
    )


tensor_maps = st.dictionaries(names, wire_values(), max_size=5)


@given(tensor_maps)
@FUZZ
def test_fuzz_well_formed_maps_round_trip_exactly(tensors):
    out = tensor_map_from_bytes(tensor_map_to_bytes(tensors))
    assert list(out) == list(tensors)
    for name, value in tensors.items():
        got = out[name]
        assert type(got) is type(value)
        if isinstance(value, torch.Tensor):
            assert bits_equal(got, value)
        else:
            assert got == value


def _check_decoded(out):
    assert isinstance(out, dict)
    for name, value in out.items():
        assert isinstance(name, str) and name
        if isinstance(value, torch.Tensor | SparseTensor):
            assert isinstance(to_dense(value), torch.Tensor)
        else:
            assert isinstance(value, SeedProjectedTensor)


@given(st.binary(max_size=300))
@FUZZ
def test_fuzz_arbitrary_bytes_raise_only_codec_error(data):
    try:
        out = tensor_map_from_bytes(data, max_elements=1 << 16)
    except CodecError:
        return
    _check_decoded(out)


@given(tensor_maps.filter(bool), st.data())
@FUZZ
def test_fuzz_mutated_payloads_raise_only_codec_error(tensors, data):
    payload = bytearray(tensor_map_to_bytes(tensors))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if not payload:
            break
        i = data.draw(st.integers(0, len(payload) - 1))
        if op == "flip":
            payload[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del payload[i:]
        elif op == "insert":
            payload[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            del payload[i]
    try:
        out = tensor_map_from_bytes(bytes(payload), max_elements=1 << 16)
    except CodecError:
        return
    _check_decoded(out)


# Hostile messages built field by field reach the validation that byte mutations rarely do
# (most mutated bytes already fail protobuf parsing).
wire_dtypes = st.integers(0, 12)
wire_shapes = st.lists(st.integers(-2, 6), max_size=3)


@st.composite
def hostile_tensors(draw):
    return common_pb2.Tensor(
        dtype=draw(wire_dtypes), shape=draw(wire_shapes), data=draw(st.binary(max_size=48))
    )


@st.composite
def hostile_named(draw):
    name = draw(st.sampled_from(["a", "b", "c", "d", ""]))
    kind = draw(st.sampled_from(["dense", "sparse", "projected", "none"]))
    if kind == "dense":
        return common_pb2.NamedTensor(name=name, dense=draw(hostile_tensors()))
    if kind == "sparse":
        n = draw(st.integers(0, 4))
        dtype, numpy_type = draw(st.sampled_from([
            (common_pb2.INT64, "<i8"), (common_pb2.INT32, "<i4"), (common_pb2.INT16, "<i2"),
            (common_pb2.UINT8, "u1"), (common_pb2.FLOAT32, "<f4")]))
        indices = common_pb2.Tensor(
            dtype=dtype,
            shape=draw(st.sampled_from([[n], [1, n], []])),
            data=np.asarray(draw(st.lists(st.integers(-3, 40), min_size=n, max_size=n)))
            .astype(numpy_type)
            .tobytes(),
        )
        sparse = common_pb2.SparseTensor(
            dtype=draw(wire_dtypes),
            shape=draw(wire_shapes),
            indices=draw(st.sampled_from([indices, draw(hostile_tensors())])),
            values=draw(hostile_tensors()),
            index_encoding=draw(st.integers(0, 3)),
        )
        return common_pb2.NamedTensor(name=name, sparse=sparse)
    if kind == "projected":
        projected = common_pb2.SeedProjectedTensor(
            dtype=draw(wire_dtypes),
            shape=draw(wire_shapes),
            seeds=draw(st.lists(st.integers(0, 2**64 - 1), max_size=3)),
            coefficients=draw(st.lists(st.floats(width=32), max_size=3)),
            generator=draw(st.sampled_from(["", "g"])),
        )
        return common_pb2.NamedTensor(name=name, projected=projected)
    return common_pb2.NamedTensor(name=name)


@given(st.lists(hostile_named(), max_size=3))
@FUZZ
def test_fuzz_hostile_messages_raise_only_codec_error(named):
    data = common_pb2.TensorMap(tensors=named).SerializeToString()
    try:
        out = tensor_map_from_bytes(data, max_elements=1 << 16)
    except CodecError:
        return
    _check_decoded(out)


def test_a_bitmap_is_unpacked_block_by_block(monkeypatch):
    import confide.protos.codec as codec

    monkeypatch.setattr(codec, "_BITMAP_BLOCK", 3)  # 24 elements per block
    g = torch.Generator().manual_seed(3)
    positions = torch.sort(torch.randperm(101, generator=g)[:60]).values
    sparse = SparseTensor((101,), positions, torch.randn(60, generator=g))
    msg = encode_named("s", sparse)
    assert msg.sparse.index_encoding == common_pb2.INDEX_BITMAP
    assert decode_named(msg)[1] == sparse
    # one more set bit than values, found in the first block: refused without unpacking more
    first = msg.sparse.indices.data
    msg.sparse.indices.data = bytes([first[0] | 0xFF]) + first[1:]
    with pytest.raises(CodecError, match="indices but 60 values"):
        decode_named(msg)


def test_out_of_range_positions_are_sent_as_they_are_and_refused():
    """A sender's bad position is not folded into a valid gap or bit: it travels as it is,
    and the receiver refuses it."""
    bad = SparseTensor((300,), torch.tensor([-5, 3]), torch.tensor([1.0, 2.0]))
    msg = encode_named("s", bad)
    assert msg.sparse.index_encoding == common_pb2.INDEX_POSITIONS
    with pytest.raises(CodecError, match="index -5 outside"):
        decode_named(msg)
