"""Streamed tensor maps: the one wire format of every model transfer.

Why: serializing a whole state into one ``TensorMap`` blob, slicing it into chunks, joining and
parsing it again cost four to five full copies and several times the model in memory. Here a
map streams as ``confide.v1.Chunk`` messages: per tensor a chunk holding its
``TensorHeader`` (name, dtype, shape, encoding, byte length), then chunks of ``data`` cut
straight from the tensor's memory (a ``memoryview`` of its contiguous CPU bytes). The receiver
checks each header against its limits *before* it allocates anything, allocates the tensor
once (``torch.empty``) and copies each chunk into place; the SHA-256 of the stream (updated
incrementally at both ends) is checked before the map is handed out. Sender and receiver each
hold the state plus the chunk in flight.

Framing (transfer id, order, announced size, digest) is :class:`protos.chunking.ChunkFraming`'s;
tensor validation reuses :mod:`protos.codec` (dtypes, shapes, sparse position encodings).
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import AsyncIterable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from confide.protos.chunking import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_PAYLOAD,
    ChunkError,
    ChunkFraming,
    drain,
    drain_async,
)
from confide.protos.codec import (
    DEFAULT_MAX_ELEMENTS,
    CodecError,
    SeedProjectedTensor,
    SparseTensor,
    WireTensor,
    _check_shape,
    _itemsize,
    _label,
    decode_positions,
    dtype_from_proto,
    dtype_to_proto,
    encode_positions,
)
from confide.v1 import common_pb2

__all__ = [
    "DEFAULT_MAX_TENSORS",
    "MAX_NAME_CHARS",
    "TensorMapReceiver",
    "receive_tensor_map",
    "receive_tensor_map_async",
    "stream_digest",
    "stream_tensor_map",
]

DEFAULT_MAX_TENSORS = 1 << 16
"""Most tensors a receiver accepts in one map by default (headers cost memory too)."""

MAX_NAME_CHARS = 4096
"""Longest tensor name a receiver accepts."""

_DENSE = common_pb2.TENSOR_DENSE
_SPARSE = common_pb2.TENSOR_SPARSE
_PROJECTED = common_pb2.TENSOR_SEED_PROJECTED


# --------------------------------------------------------------------------- sending


def _le_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian C-order bytes of ``t`` as a memoryview of its own memory when it
    already is a contiguous CPU tensor (a copy of this one tensor otherwise)."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.cpu().contiguous().reshape(-1)
    if sys.byteorder != "little" and flat.element_size() > 1:  # pragma: no cover (BE hosts)
        flat = flat.view(torch.uint8).reshape(-1, flat.element_size()).flip(1).contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


@dataclass
class _Outgoing:
    header: common_pb2.TensorHeader
    parts: tuple[torch.Tensor, ...]  # the tensors whose bytes follow, in order


def _outgoing(name: str, value: WireTensor) -> _Outgoing:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__}")
    if not name:
        raise CodecError("tensor names must be non-empty")
    if isinstance(value, torch.Tensor):
        header = common_pb2.TensorHeader(
            name=name, dtype=dtype_to_proto(value.dtype), shape=list(value.shape),
            encoding=_DENSE, byte_length=value.numel() * value.element_size())
        return _Outgoing(header, (value,))
    if isinstance(value, SparseTensor):
        encoding, indices = encode_positions(value.indices, math.prod(value.shape))
        values = value.values
        header = common_pb2.TensorHeader(
            name=name, dtype=dtype_to_proto(values.dtype), shape=list(value.shape),
            encoding=_SPARSE, index_encoding=encoding, index_dtype=dtype_to_proto(indices.dtype),
            index_count=indices.numel(), value_count=values.numel(),
            byte_length=indices.numel() * indices.element_size()
            + values.numel() * values.element_size())
        return _Outgoing(header, (indices, values))
    if isinstance(value, SeedProjectedTensor):
        header = common_pb2.TensorHeader(
            name=name, dtype=dtype_to_proto(value.dtype), shape=list(value.shape),
            encoding=_PROJECTED, seeds=list(value.seeds), coefficients=list(value.coefficients),
            generator=value.generator)
        return _Outgoing(header, ())
    raise TypeError(
        f"tensor {name!r}: cannot encode {type(value).__name__}; expected a torch.Tensor, "
        "SparseTensor or SeedProjectedTensor"
    )


def _plan(tensors: Mapping[str, WireTensor]) -> list[_Outgoing]:
    return [_outgoing(name, value) for name, value in tensors.items()]


def _pieces(plan: list[_Outgoing],
            chunk_size: int) -> Iterator[common_pb2.TensorHeader | memoryview]:
    """Each tensor's header, then its bytes in slices of at most ``chunk_size`` (views of the
    tensor's memory, taken one tensor at a time)."""
    for item in plan:
        yield item.header
        for part in item.parts:
            view = _le_bytes(part)
            for start in range(0, view.nbytes, chunk_size):
                yield view[start:start + chunk_size]


def _hash_piece(digest, piece: common_pb2.TensorHeader | memoryview) -> None:
    if isinstance(piece, memoryview):
        digest.update(piece)
    else:
        encoded = piece.SerializeToString(deterministic=True)
        digest.update(len(encoded).to_bytes(8, "little") + encoded)


def stream_tensor_map(
    tensors: Mapping[str, WireTensor], transfer_id: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[common_pb2.Chunk]:
    """The chunks of ``tensors``: per tensor its header, then its bytes; the last chunk carries
    ``last`` and the stream's SHA-256. An empty map is one empty last chunk.

    Headers are built (and bad names, dtypes or values refused) at once; each tensor's bytes
    are read only when its chunks are taken, so a lazy consumer holds one chunk at a time.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    plan = _plan(tensors)
    total = sum(item.header.byte_length for item in plan)
    return _chunks(plan, transfer_id, chunk_size, total)


def _chunks(plan: list[_Outgoing], transfer_id: str, chunk_size: int,
            total: int) -> Iterator[common_pb2.Chunk]:
    digest = hashlib.sha256()
    pending: common_pb2.Chunk | None = None
    for index, piece in enumerate(_pieces(plan, chunk_size)):
        _hash_piece(digest, piece)
        if pending is not None:
            yield pending
        if isinstance(piece, memoryview):
            pending = common_pb2.Chunk(transfer_id=transfer_id, index=index,
                                       total_bytes=total, data=piece.tobytes())
        else:
            pending = common_pb2.Chunk(transfer_id=transfer_id, index=index,
                                       total_bytes=total, header=piece)
    if pending is None:
        pending = common_pb2.Chunk(transfer_id=transfer_id, index=0, total_bytes=total)
    pending.last = True
    pending.sha256 = digest.digest()
    yield pending


def stream_digest(tensors: Mapping[str, WireTensor],
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """The SHA-256 :func:`stream_tensor_map` puts in its last chunk, without building chunks
    (an anonymous update signs it before it streams)."""
    digest = hashlib.sha256()
    for piece in _pieces(_plan(tensors), chunk_size):
        _hash_piece(digest, piece)
    return digest.digest()


# --------------------------------------------------------------------------- receiving


def _allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The one allocation of a received tensor's buffer (after its header checked out)."""
    return torch.empty(shape, dtype=dtype)


class _Incoming:
    """One tensor being received: its buffers (allocated once) and how far they are filled."""

    def __init__(self, header: common_pb2.TensorHeader, buffers: list[torch.Tensor]) -> None:
        self.header = header
        self.buffers = buffers
        self.views = [memoryview(b.reshape(-1).view(torch.uint8).numpy()).cast("B")
                      if b.numel() else memoryview(b"") for b in buffers]
        self.part = 0
        self.offset = 0
        self._skip_full()

    def _skip_full(self) -> None:
        while self.part < len(self.views) and self.offset == self.views[self.part].nbytes:
            self.part += 1
            self.offset = 0

    @property
    def full(self) -> bool:
        return self.part >= len(self.views)

    def fill(self, data: bytes) -> None:
        """Copy ``data`` into the buffers (it may run from one buffer into the next)."""
        pos = 0
        while pos < len(data):
            if self.full:
                raise ChunkError(
                    f"data runs past the {self.header.byte_length} bytes tensor "
                    f"{_label(self.header.name)} declared")
            view = self.views[self.part]
            n = min(len(data) - pos, view.nbytes - self.offset)
            view[self.offset:self.offset + n] = data[pos:pos + n] if pos or n < len(data) else data
            self.offset += n
            pos += n
            self._skip_full()


class TensorMapReceiver(ChunkFraming):
    """Rebuilds a streamed tensor map, validating each header before allocating its tensor.

    Limits (each checked at the header, before any allocation): ``max_bytes`` bounds the
    transfer's announced data bytes and so the sum of every allocation; ``max_elements`` bounds
    each tensor's (dense) element count; ``max_tensors`` the number of tensors. ``add`` returns
    ``{name: value}`` (dense tensors, :class:`SparseTensor`, :class:`SeedProjectedTensor`) once
    the last chunk's SHA-256 matched; a tensor's buffer is never handed out before.
    """

    def __init__(self, transfer_id: str | None = None, max_bytes: int = DEFAULT_MAX_PAYLOAD, *,
                 max_elements: int = DEFAULT_MAX_ELEMENTS,
                 max_tensors: int = DEFAULT_MAX_TENSORS) -> None:
        super().__init__(transfer_id, max_bytes)
        self._max_elements = max_elements
        self._max_tensors = max_tensors
        self._declared = 0  # data bytes the headers so far declared (and allocated)
        self._current: _Incoming | None = None
        self._out: dict[str, WireTensor] = {}

    def _release(self) -> None:
        self._current = None
        self._out = {}

    # ----------------------------------------------------------------- headers

    def _on_header(self, header: common_pb2.TensorHeader) -> None:
        if self._current is not None:
            raise ChunkError(
                f"header of tensor {_label(header.name)} arrived before tensor "
                f"{_label(self._current.header.name)} got its {self._current.header.byte_length} "
                "bytes")
        name = header.name
        if not name:
            raise CodecError(f"tensor #{len(self._out)} of the map has an empty name; "
                             "every tensor needs one")
        if len(name) > MAX_NAME_CHARS:
            raise CodecError(f"tensor name of {len(name)} characters; at most "
                             f"{MAX_NAME_CHARS} are allowed")
        if name in self._out:
            raise CodecError(f"tensor name {_label(name)} appears more than once in the map")
        if len(self._out) >= self._max_tensors:
            raise CodecError(f"the map holds more than {self._max_tensors} tensors")
        sizes = self._check(header)  # raises before anything is allocated
        declared = self._declared + header.byte_length
        if declared > (self._total or 0):
            raise ChunkError(
                f"tensor {_label(name)} declares {header.byte_length} bytes, which brings the "
                f"map to {declared}, more than the announced {self._total}")
        self._declared = declared
        try:
            buffers = [_allocate(shape, dtype) for shape, dtype in sizes]
        except RuntimeError as exc:  # e.g. a shape whose strides overflow int64
            raise CodecError(f"tensor {_label(name)} cannot be allocated: {exc}") from None
        incoming = _Incoming(header, buffers)
        if incoming.full:
            self._finish(incoming)
        else:
            self._current = incoming

    def _check(self, h: common_pb2.TensorHeader) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Validate a header; return the buffers (shape, dtype) its bytes fill."""
        if h.encoding == _DENSE:
            what = f"tensor {_label(h.name)}"
        elif h.encoding == _SPARSE:
            what = f"sparse tensor {_label(h.name)}"
        elif h.encoding == _PROJECTED:
            what = f"seed-projected tensor {_label(h.name)}"
        else:
            raise CodecError(f"tensor {_label(h.name)} has unknown encoding {h.encoding}")
        dtype = dtype_from_proto(h.dtype, what)
        shape, numel = _check_shape(h.shape, what, self._max_elements)
        itemsize = _itemsize(dtype)
        if h.encoding == _DENSE:
            buffers = [(shape, dtype)]
            expected = numel * itemsize
        elif h.encoding == _SPARSE:
            index_dtype = dtype_from_proto(h.index_dtype, f"{what} indices")
            if h.value_count > numel:
                raise CodecError(f"{what} has {h.value_count} values for {numel} elements")
            if h.index_encoding == common_pb2.INDEX_BITMAP:
                want = (numel + 7) // 8
            elif h.index_encoding in (common_pb2.INDEX_POSITIONS, common_pb2.INDEX_GAPS):
                want = h.value_count
            else:
                raise CodecError(f"{what} has unknown index encoding {h.index_encoding}")
            if h.index_count != want:
                raise CodecError(f"{what} declares {h.index_count} indices; its encoding "
                                 f"needs {want}")
            buffers = [((h.index_count,), index_dtype), ((h.value_count,), dtype)]
            expected = h.index_count * _itemsize(index_dtype) + h.value_count * itemsize
        else:
            if len(h.seeds) != len(h.coefficients):
                raise CodecError(f"{what} has {len(h.seeds)} seeds but {len(h.coefficients)} "
                                 "coefficients; send exactly one coefficient per seed")
            if not h.generator:
                raise CodecError(f"{what} names no direction generator; set generator")
            buffers, expected = [], 0
        if h.byte_length != expected:
            raise CodecError(
                f"{what} of dtype {common_pb2.DType.Name(h.dtype)} and shape {list(shape)} "
                f"needs {expected} data bytes, its header declares {h.byte_length}")
        return buffers

    # ----------------------------------------------------------------- data

    def _on_data(self, data: bytes) -> None:
        if not data:
            return  # the empty last chunk of an empty map
        if self._current is None:
            raise ChunkError(f"{len(data)} data bytes arrived outside any tensor "
                             "(a header must come first)")
        self._current.fill(data)
        if self._current.full:
            current, self._current = self._current, None
            self._finish(current)

    def _finish(self, incoming: _Incoming) -> None:
        h = incoming.header
        if sys.byteorder != "little":  # pragma: no cover (BE hosts)
            for b in incoming.buffers:
                if b.element_size() > 1 and b.numel():
                    u8 = b.view(torch.uint8).reshape(-1, b.element_size())
                    u8.copy_(u8.flip(1))
        if h.encoding == _DENSE:
            (tensor,) = incoming.buffers
            if tensor.dtype == torch.bool and tensor.numel() and bool(
                    (tensor.view(torch.uint8) > 1).any()):
                raise CodecError(f"tensor {_label(h.name)} is BOOL but its data holds bytes "
                                 "other than 0 and 1")
            self._out[h.name] = tensor
        elif h.encoding == _SPARSE:
            what = f"sparse tensor {_label(h.name)}"
            indices, values = incoming.buffers
            if values.dtype == torch.bool and values.numel() and bool(
                    (values.view(torch.uint8) > 1).any()):
                raise CodecError(f"{what} is BOOL but its values hold bytes other than 0 and 1")
            shape = tuple(int(d) for d in h.shape)
            positions = decode_positions(indices, h.index_encoding, math.prod(shape),
                                         values.numel(), what)
            self._out[h.name] = SparseTensor(shape=shape, indices=positions, values=values)
        else:
            self._out[h.name] = SeedProjectedTensor(
                shape=tuple(h.shape), dtype=dtype_from_proto(h.dtype), seeds=tuple(h.seeds),
                coefficients=tuple(h.coefficients), generator=h.generator)

    def _result(self) -> dict[str, WireTensor]:
        if self._current is not None:  # pragma: no cover (byte counts make this unreachable)
            raise ChunkError(f"tensor {_label(self._current.header.name)} is incomplete")
        out, self._out = self._out, {}
        return out

    def add(self, chunk: common_pb2.Chunk) -> dict[str, WireTensor] | None:
        """Accept the next chunk; return the whole map when it was the last one."""
        return super().add(chunk)


def receive_tensor_map(chunks: Iterable[common_pb2.Chunk], **limits) -> dict[str, WireTensor]:
    """The map of a complete chunk stream (``limits``: :class:`TensorMapReceiver`'s)."""
    return drain(TensorMapReceiver(**limits), chunks)


async def receive_tensor_map_async(chunks: AsyncIterable[common_pb2.Chunk],
                                   **limits) -> dict[str, WireTensor]:
    """:func:`receive_tensor_map` for async streams (a ``grpc.aio`` server stream)."""
    return await drain_async(TensorMapReceiver(**limits), chunks)
