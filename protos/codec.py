"""Tensor codec: torch tensors <-> ``confide.v1`` protobuf messages, never pickle.

Why this module exists: every tensor that crosses a process boundary (model weights, adapter
updates, sparse top-k deltas, seed-projected scalars) travels as raw
little-endian bytes with an explicit dtype and shape, so a receiver can validate it *before*
allocating or trusting anything. Unpickling a peer's bytes would run the peer's code; decoding
these messages only ever builds tensors.

Everything that reads wire data validates it and raises :class:`CodecError` with a message that
says what is wrong and how to fix it, so a daemon can reject a bad update with
``INVALID_ARGUMENT`` instead of crashing.

This module imports only torch, numpy, the standard library and the generated ``confide.v1``
messages (plus ``google.protobuf.message`` for its ``DecodeError``), so any process can use it
without pulling in the rest of the project.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

import numpy as np
import torch
from google.protobuf.message import DecodeError

from confide.v1 import common_pb2

__all__ = [
    "MAX_RANK",
    "SUPPORTED_DTYPES",
    "CodecError",
    "SeedProjectedTensor",
    "SparseTensor",
    "WireTensor",
    "decode_named",
    "decode_tensor_map",
    "dtype_from_proto",
    "dtype_to_proto",
    "encode_named",
    "encode_tensor_map",
    "tensor_from_proto",
    "tensor_map_from_bytes",
    "tensor_map_to_bytes",
    "tensor_to_proto",
    "to_dense",
    "wire_size",
]

DEFAULT_MAX_ELEMENTS = 1 << 31
"""Per-tensor element cap on decode: a hostile shape must not make a receiver allocate
(or later densify) more than this many elements."""

MAX_RANK = 64
"""Most dimensions a decoded tensor may declare; real tensors have a handful."""


class CodecError(ValueError):
    """Bad wire data (or a value that cannot be put on the wire).

    A ``ValueError`` so callers that already map ``ValueError`` to ``INVALID_ARGUMENT`` keep
    working; the message says what is wrong and how the sender can fix it.
    """


# --------------------------------------------------------------------------- dtypes

SUPPORTED_DTYPES: Mapping[torch.dtype, int] = MappingProxyType(
    {
        torch.float32: common_pb2.FLOAT32,
        torch.float16: common_pb2.FLOAT16,
        torch.bfloat16: common_pb2.BFLOAT16,
        torch.float64: common_pb2.FLOAT64,
        torch.int64: common_pb2.INT64,
        torch.int32: common_pb2.INT32,
        torch.int16: common_pb2.INT16,
        torch.int8: common_pb2.INT8,
        torch.uint8: common_pb2.UINT8,
        torch.bool: common_pb2.BOOL,
    }
)
"""torch dtype -> ``confide.v1.DType`` value, for every dtype the wire carries."""

_PROTO_TO_DTYPE: Mapping[int, torch.dtype] = MappingProxyType(
    {v: k for k, v in SUPPORTED_DTYPES.items()}
)

_SUPPORTED_NAMES = ", ".join(common_pb2.DType.Name(v) for v in SUPPORTED_DTYPES.values())


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The ``confide.v1.DType`` value of ``dtype``; CodecError for dtypes the wire lacks."""
    try:
        return SUPPORTED_DTYPES[dtype]
    except KeyError:
        raise CodecError(
            f"dtype {dtype} cannot travel on the wire; convert the tensor to one of "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
        ) from None


def dtype_from_proto(value: int, what: str = "tensor") -> torch.dtype:
    """The torch dtype of a ``confide.v1.DType`` value; CodecError naming bad values."""
    dtype = _PROTO_TO_DTYPE.get(value)
    if dtype is not None:
        return dtype
    if value == common_pb2.DTYPE_UNSPECIFIED:
        raise CodecError(
            f"{what} dtype is DTYPE_UNSPECIFIED (0); the sender must set dtype to one of "
            f"{_SUPPORTED_NAMES}"
        )
    raise CodecError(
        f"{what} has unknown dtype value {value}; supported: {_SUPPORTED_NAMES} "
        "(is the sender newer than this receiver?)"
    )


def _label(name: str) -> str:
    """``repr`` of a tensor name for error messages, cut short: names come from the wire."""
    return repr(name) if len(name) <= 80 else repr(name[:77]) + "..."


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- byte order


def _swap_to_or_from_little(u8: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Convert a flat uint8 view between native and little-endian element order.

    The wire is little-endian; on a big-endian host every element's bytes are reversed
    (the swap is its own inverse, so one helper serves both directions). On little-endian
    hosts this returns its input unchanged.
    """
    if sys.byteorder == "little" or itemsize == 1:
        return u8
    return u8.reshape(-1, itemsize).flip(1).reshape(-1).contiguous()


# --------------------------------------------------------------------------- shapes


def _check_shape(shape: object, what: str, max_elements: int) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape; return it as a tuple with its element count."""
    dims = tuple(int(d) for d in shape)  # type: ignore[attr-defined]
    if len(dims) > MAX_RANK:
        raise CodecError(f"{what} declares {len(dims)} dimensions; at most {MAX_RANK} are allowed")
    for d in dims:
        if d < 0:
            raise CodecError(f"{what} has negative dimension {d} in shape {list(dims)}")
    numel = math.prod(dims)
    if numel > max_elements:
        raise CodecError(
            f"{what} of shape {list(dims)} has {numel} elements, more than the limit of "
            f"{max_elements}; send it in smaller tensors or raise max_elements on the receiver"
        )
    return dims, numel


def _shape_tuple(shape: object, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[attr-defined]
    except TypeError:
        raise CodecError(f"{what} shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise CodecError(f"{what} shape {dims} has a negative dimension")
    return dims


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
    )


# --------------------------------------------------------------------------- wire types


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A tensor of ``shape`` that is zero except ``values[i]`` at flat C-order ``indices[i]``.

    Why: top-k update sparsification (CELLM) sends only the k largest entries of an update;
    the bytes on the wire are the point. ``indices`` is 1-D int64 in memory (int32 on the wire
    when the tensor has at most 2^31 elements), ``values`` 1-D of the dense tensor's dtype. Equality
    is bit-exact on shape, indices and values.
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape_tuple(self.shape, "sparse tensor"))
        if not isinstance(self.indices, torch.Tensor) or not isinstance(self.values, torch.Tensor):
            raise CodecError("sparse tensor indices and values must be torch tensors")
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise CodecError(
                f"sparse tensor indices and values must be 1-D, got shapes "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.numel() != self.values.numel():
            raise CodecError(
                f"sparse tensor has {self.indices.numel()} indices but "
                f"{self.values.numel()} values; they must pair up"
            )
        if self.indices.dtype not in (torch.int64, torch.int32):
            raise CodecError(f"sparse tensor indices must be int64, got {self.indices.dtype}")
        if self.indices.dtype != torch.int64:
            object.__setattr__(self, "indices", self.indices.to(torch.int64))

    __hash__ = None  # type: ignore[assignment]  # holds mutable tensors

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseTensor):
            return NotImplemented
        return (
            self.shape == other.shape
            and _bits_equal(self.indices, other.indices)
            and _bits_equal(self.values, other.values)
        )

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the dense tensor this represents (that of ``values``)."""
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        """The dense tensor: zeros with ``values`` scattered at ``indices``."""
        flat = torch.zeros(math.prod(self.shape), dtype=self.values.dtype)
        if self.indices.numel():
            flat[self.indices.cpu()] = self.values.detach().cpu()
        return flat.reshape(self.shape)


@dataclass(frozen=True)
class SeedProjectedTensor:
    """An update sent as coefficients along random directions regenerated from seeds.

    Why: Ferret-style methods send K scalars instead of a full update;
    ``update = sum_k coefficients[k] * direction(seeds[k])`` where ``generator`` names the
    direction generator both sides must share. The codec cannot densify it (only the method
    knows its generator). Coefficients travel as float32, so they are rounded to float32 here:
    sender and receiver then reconstruct from exactly the same numbers.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    seeds: tuple[int, ...]
    coefficients: tuple[float, ...]
    generator: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape_tuple(self.shape, "seed-projected tensor"))
        seeds = tuple(int(s) for s in self.seeds)
        coefficients = tuple(float(c) for c in self.coefficients)
        if len(seeds) != len(coefficients):
            raise CodecError(
                f"seed-projected tensor has {len(seeds)} seeds but {len(coefficients)} "
                "coefficients; send exactly one coefficient per seed"
            )
        for s in seeds:
            if not 0 <= s < 1 << 64:
                raise CodecError(f"seed {s} does not fit in an unsigned 64-bit integer")
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "coefficients", _round_to_float32(coefficients))
        dtype_to_proto(self.dtype)
        if not isinstance(self.generator, str) or not self.generator:
            raise CodecError(
                "seed-projected tensor needs a non-empty generator name (e.g. "
                "'cpu-truncnormal-v1') so the receiver regenerates the same directions"
            )


def _round_to_float32(values: tuple[float, ...]) -> tuple[float, ...]:
    array = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        rounded = array.astype(np.float32)
    overflow = np.isinf(rounded) & np.isfinite(array)
    if overflow.any():
        bad = float(array[overflow][0])
        raise CodecError(f"coefficient {bad!r} overflows float32, the wire's coefficient type")
    return tuple(float(x) for x in rounded.astype(np.float64))


WireTensor: TypeAlias = torch.Tensor | SparseTensor | SeedProjectedTensor
"""Anything :func:`encode_named` can put on the wire."""


# --------------------------------------------------------------------------- dense tensors


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    """A ``confide.v1.Tensor``: raw little-endian bytes in C order, dtype and shape.

    Accepts any strided or sparse-layout tensor (non-contiguous, 0-d, empty, on any device,
    requiring grad); the bytes are a copy, the tensor is untouched.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    dtype = dtype_to_proto(t.dtype)
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.cpu().contiguous().reshape(-1)
    u8 = _swap_to_or_from_little(flat.view(torch.uint8), flat.element_size())
    return common_pb2.Tensor(dtype=dtype, shape=list(t.shape), data=u8.numpy().tobytes())


def tensor_from_proto(
    msg: common_pb2.Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS, what: str = "tensor"
) -> torch.Tensor:
    """The tensor a ``confide.v1.Tensor`` holds, after validating it.

    Checks the dtype is known, the shape non-negative and within ``max_elements``, and that
    ``data`` holds exactly prod(shape) * itemsize bytes (bool bytes must be 0 or 1). The result
    owns its memory: it is writable and does not alias the message.
    """
    dtype = dtype_from_proto(msg.dtype, what)
    shape, numel = _check_shape(msg.shape, what, max_elements)
    itemsize = _itemsize(dtype)
    expected = numel * itemsize
    data = msg.data
    if len(data) != expected:
        raise CodecError(
            f"{what} of dtype {common_pb2.DType.Name(msg.dtype)} and shape {list(shape)} needs "
            f"{expected} data bytes ({numel} elements x {itemsize} bytes), got {len(data)}"
        )
    try:
        if expected == 0:
            return torch.empty(shape, dtype=dtype)
        u8 = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if dtype == torch.bool and bool((u8 > 1).any()):
            raise CodecError(f"{what} is BOOL but its data holds bytes other than 0 and 1")
        u8 = _swap_to_or_from_little(u8, itemsize)
        return u8.view(dtype).reshape(shape)
    except RuntimeError as exc:  # e.g. a shape whose strides overflow int64
        raise CodecError(f"{what} of shape {list(shape)} cannot be built: {exc}") from None


# --------------------------------------------------------------------------- named tensors


_INT32_POSITIONS = 2**31
_BITMAP_BLOCK = 1 << 20  # bytes of a bitmap unpacked at once


def encode_positions(positions: torch.Tensor, numel: int) -> tuple[int, torch.Tensor]:
    """The smallest encoding of a sparse tensor's flat positions: ``(IndexEncoding, tensor)``.

    Why: with a float32 value per kept entry, a 4-byte position doubles what top-k sends. In
    increasing order (as top-k selections are kept) the positions can go as gaps in the
    narrowest integer type that holds the largest one (1 byte each when the kept entries are
    dense enough), or as a bitmap of one bit per element (cheaper above about 1 kept entry in
    8); otherwise as int32 (int64 past 2^31 elements). Same positions back after decoding.
    """
    plain = positions.to(torch.int32) if numel <= _INT32_POSITIONS else positions
    best: tuple[int, torch.Tensor] = (common_pb2.INDEX_POSITIONS, plain)
    count = positions.numel()
    if (count == 0 or int(positions.min()) < 0 or int(positions.max()) >= numel
            or (count > 1 and not bool((positions.diff() > 0).all()))):
        return best  # empty, out of range (refused on decode) or not strictly increasing

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    gaps = positions.diff(prepend=positions.new_tensor([-1])) - 1
    widest = int(gaps.max())
    for dtype, limit in ((torch.uint8, 1 << 8), (torch.int16, 1 << 15), (torch.int32, 1 << 31)):
        if widest < limit:
            if count * torch.tensor([], dtype=dtype).element_size() < size(best[1]):
                best = (common_pb2.INDEX_GAPS, gaps.to(dtype))
            break
    if (numel + 7) // 8 < size(best[1]):
        bits = torch.zeros((numel + 7) // 8 * 8, dtype=torch.uint8)
        bits[positions] = 1
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
        best = (common_pb2.INDEX_BITMAP, (bits.view(-1, 8) * weights).sum(1).to(torch.uint8))
    return best


def decode_positions(
    indices: torch.Tensor, encoding: int, numel: int, count: int, what: str
) -> torch.Tensor:
    """Flat int64 positions from an encoded ``indices`` tensor (``encode_positions``), checked:
    right dtype and length, every position in [0, numel), none twice, ``count`` of them."""
    if indices.dim() != 1:
        raise CodecError(f"{what} indices must be 1-D, got shape {list(indices.shape)}")
    if encoding == common_pb2.INDEX_POSITIONS:
        if indices.dtype not in (torch.int32, torch.int64):
            raise CodecError(f"{what} indices must be INT32 or INT64, got {indices.dtype}")
        positions = indices.to(torch.int64)
    elif encoding == common_pb2.INDEX_GAPS:
        if indices.dtype not in (torch.uint8, torch.int16, torch.int32):
            raise CodecError(f"{what} gaps must be UINT8, INT16 or INT32, got {indices.dtype}")
        gaps = indices.to(torch.int64)
        if gaps.numel() and int(gaps.min()) < 0:
            raise CodecError(f"{what} has a negative gap")
        positions = torch.cumsum(gaps + 1, 0) - 1  # increasing: no position twice
    elif encoding == common_pb2.INDEX_BITMAP:
        if indices.dtype != torch.uint8 or indices.numel() != (numel + 7) // 8:
            raise CodecError(
                f"{what} bitmap must be {(numel + 7) // 8} UINT8 bytes for {numel} elements, "
                f"got {indices.numel()} {indices.dtype}"
            )
        if numel % 8 and int(indices[-1]) >> (numel % 8):
            raise CodecError(f"{what} bitmap sets padding bits past element {numel}")
        # unpacked a block at a time: a bitmap must not cost 8x its size in memory at once
        shifts = torch.arange(8, dtype=torch.uint8)
        blocks = [torch.empty(0, dtype=torch.int64)]
        for start in range(0, indices.numel(), _BITMAP_BLOCK):
            bits = ((indices[start:start + _BITMAP_BLOCK].unsqueeze(1) >> shifts) & 1)
            blocks.append(torch.nonzero(bits.reshape(-1)).reshape(-1) + 8 * start)
            if sum(b.numel() for b in blocks) > count:
                break  # more positions than values: reported below
        positions = torch.cat(blocks)
    else:
        raise CodecError(f"{what} has unknown index encoding {encoding}")
    if positions.numel() != count:
        raise CodecError(
            f"{what} has {positions.numel()} indices but {count} values; they must pair up"
        )
    if positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= numel:
            bad = low if low < 0 else high
            raise CodecError(f"{what} has index {bad} outside [0, {numel})")
        if encoding == common_pb2.INDEX_POSITIONS and positions.numel() > 1 and bool(
            (torch.sort(positions).values.diff() == 0).any()
        ):
            raise CodecError(f"{what} repeats an index; each position may appear once")
    return positions


def encode_named(name: str, value: WireTensor) -> common_pb2.NamedTensor:
    """A ``confide.v1.NamedTensor`` holding ``value`` in its own oneof variant."""
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__}")
    if isinstance(value, torch.Tensor):
        return common_pb2.NamedTensor(name=name, dense=tensor_to_proto(value))
    if isinstance(value, SparseTensor):
        encoding, indices = encode_positions(value.indices, math.prod(value.shape))
        sparse = common_pb2.SparseTensor(
            dtype=dtype_to_proto(value.dtype),
            shape=list(value.shape),
            indices=tensor_to_proto(indices),
            values=tensor_to_proto(value.values),
            index_encoding=encoding,
        )
        return common_pb2.NamedTensor(name=name, sparse=sparse)
    if isinstance(value, SeedProjectedTensor):
        projected = common_pb2.SeedProjectedTensor(
            dtype=dtype_to_proto(value.dtype),
            shape=list(value.shape),
            seeds=list(value.seeds),
            coefficients=list(value.coefficients),
            generator=value.generator,
        )
        return common_pb2.NamedTensor(name=name, projected=projected)
    raise TypeError(
        f"tensor {name!r}: cannot encode {type(value).__name__}; expected a torch.Tensor, "
        "SparseTensor or SeedProjectedTensor"
    )


def decode_named(
    msg: common_pb2.NamedTensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[str, WireTensor]:
    """``(name, value)`` of a ``confide.v1.NamedTensor``, validating its variant fully."""
    name = msg.name
    kind = msg.WhichOneof("value")
    if kind is None:
        raise CodecError(
            f"tensor {_label(name)} carries no value; "
            "set one of dense, sparse, projected"
        )
    if kind == "dense":
        return name, tensor_from_proto(
            msg.dense, max_elements=max_elements, what=f"tensor {_label(name)}"
        )
    if kind == "sparse":
        return name, _decode_sparse(name, msg.sparse, max_elements)
    if kind == "projected":
        return name, _decode_projected(name, msg.projected, max_elements)
    raise CodecError(f"tensor {_label(name)} has unsupported variant {kind!r}")  # pragma: no cover


def _decode_sparse(name: str, msg: common_pb2.SparseTensor, max_elements: int) -> SparseTensor:
    what = f"sparse tensor {_label(name)}"
    dtype = dtype_from_proto(msg.dtype, what)
    shape, numel = _check_shape(msg.shape, what, max_elements)
    if not msg.HasField("indices") or not msg.HasField("values"):
        raise CodecError(f"{what} must carry both indices and values")
    indices = tensor_from_proto(msg.indices, max_elements=max_elements, what=f"{what} indices")
    values = tensor_from_proto(msg.values, max_elements=max_elements, what=f"{what} values")
    if values.dim() != 1:
        raise CodecError(f"{what} values must be 1-D, got shape {list(values.shape)}")
    if values.dtype != dtype:
        raise CodecError(
            f"{what} declares dtype {dtype} but its values are {values.dtype}; they must match"
        )
    indices = decode_positions(indices, msg.index_encoding, numel, values.numel(), what)
    return SparseTensor(shape=shape, indices=indices, values=values)


def _decode_projected(
    name: str, msg: common_pb2.SeedProjectedTensor, max_elements: int
) -> SeedProjectedTensor:
    what = f"seed-projected tensor {_label(name)}"
    dtype = dtype_from_proto(msg.dtype, what)
    shape, _ = _check_shape(msg.shape, what, max_elements)
    if len(msg.seeds) != len(msg.coefficients):
        raise CodecError(
            f"{what} has {len(msg.seeds)} seeds but {len(msg.coefficients)} coefficients; "
            "send exactly one coefficient per seed"
        )
    if not msg.generator:
        raise CodecError(f"{what} names no direction generator; set generator")
    return SeedProjectedTensor(
        shape=shape,
        dtype=dtype,
        seeds=tuple(msg.seeds),
        coefficients=tuple(msg.coefficients),
        generator=msg.generator,
    )


# --------------------------------------------------------------------------- tensor maps


def encode_tensor_map(tensors: Mapping[str, WireTensor]) -> common_pb2.TensorMap:
    """A ``confide.v1.TensorMap`` of ``tensors``, in their insertion order."""
    out = common_pb2.TensorMap()
    for name, value in tensors.items():
        if isinstance(name, str) and not name:
            raise CodecError("tensor names must be non-empty")
        out.tensors.append(encode_named(name, value))
    return out


def decode_tensor_map(
    msg: common_pb2.TensorMap, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, WireTensor]:
    """The ``{name: value}`` of a ``confide.v1.TensorMap``, in wire order.

    Empty or repeated names are CodecError: a map that silently dropped a duplicate would
    let a sender hide one tensor behind another.
    """
    out: dict[str, WireTensor] = {}
    for i, named in enumerate(msg.tensors):
        if not named.name:
            raise CodecError(f"tensor #{i} of the map has an empty name; every tensor needs one")
        if named.name in out:
            raise CodecError(f"tensor name {_label(named.name)} appears more than once in the map")
        name, value = decode_named(named, max_elements=max_elements)
        out[name] = value
    return out


def tensor_map_to_bytes(tensors: Mapping[str, WireTensor]) -> bytes:
    """Serialized ``confide.v1.TensorMap``: the map's message form (tests, sizes). Transfers
    never send it; they stream the map with :mod:`protos.stream`."""
    return encode_tensor_map(tensors).SerializeToString()


def tensor_map_from_bytes(
    data: bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, WireTensor]:
    """Parse and validate a serialized ``confide.v1.TensorMap``; CodecError on bad input."""
    try:
        msg = common_pb2.TensorMap.FromString(bytes(data))
    except DecodeError as exc:
        raise CodecError(f"payload is not a serialized confide.v1.TensorMap: {exc}") from None
    return decode_tensor_map(msg, max_elements=max_elements)


def to_dense(value: WireTensor) -> torch.Tensor:
    """The dense tensor a dense or sparse value stands for.

    A :class:`SeedProjectedTensor` raises CodecError: only its method's direction generator
    can turn seeds and coefficients back into a tensor.
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, SparseTensor):
        return value.to_dense()
    if isinstance(value, SeedProjectedTensor):
        raise CodecError(
            f"a seed-projected tensor (generator {value.generator!r}) cannot be densified by "
            "the codec; reconstruct it with its method's direction generator"
        )
    raise TypeError(f"cannot densify {type(value).__name__}")


def wire_size(tensors: Mapping[str, WireTensor]) -> int:
    """Bytes of the serialized ``TensorMap`` of ``tensors``: the same tensor bytes the stream
    (:mod:`protos.stream`) carries, with per-message framing instead of per-tensor headers, so
    it ranks encodings (dense vs sparse) as the wire does."""
    return encode_tensor_map(tensors).ByteSize()
