"""Chunk framing: stream payloads of any size under gRPC's 4 MiB default message limit.

Why: a model or an update can be far larger than one gRPC message may be. Tensor maps stream
through ``protos.stream`` (per tensor a header, then its bytes), which frames its chunks with
:class:`ChunkFraming`; a raw payload is cut into ``confide.v1.Chunk`` messages
that share a ``transfer_id``, are numbered from 0, announce the whole payload's size in every
chunk, and end with a chunk marked ``last`` that carries the payload's SHA-256.

The receiving side (:class:`ChunkAssembler`) trusts nothing: it rejects chunks of another
transfer, out of order or repeated, a size that changes or exceeds the receiver's limit, more
bytes than announced, a last chunk that arrives early, a wrong digest, and anything after the
end, each with a :class:`ChunkError` that says what happened. It never returns wrong data.

Imports only the standard library and the generated ``confide.v1.common_pb2``.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Iterable, Iterator

from confide.v1 import common_pb2

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "ChunkAssembler",
    "ChunkError",
    "ChunkFraming",
    "assemble",
    "assemble_async",
    "drain",
    "drain_async",
    "split_payload",
    "wire_bytes",
]

DEFAULT_CHUNK_SIZE = 1 << 20
"""1 MiB of payload per chunk: well under gRPC's 4 MiB default message limit."""

DEFAULT_MAX_PAYLOAD = 1 << 31
"""2 GiB: the most a receiver accepts by default (a hostile size is refused up front)."""

_MAX_CHUNKS = 1 << 32  # Chunk.index is a uint32

GRPC_FRAME_BYTES = 5
"""gRPC's length-prefixed message framing: 1 flag byte + 4 length bytes per message."""


def wire_bytes(message) -> int:
    """Bytes a protobuf message occupies in a gRPC stream (the message plus gRPC framing):
    what every byte counter of the project adds up."""
    return message.ByteSize() + GRPC_FRAME_BYTES


class ChunkError(ValueError):
    """A chunk stream is malformed; the message says what went wrong."""


def split_payload(
    payload: bytes, transfer_id: str, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[common_pb2.Chunk]:
    """The chunks of ``payload``, indexed from 0; the last one carries ``last`` and SHA-256.

    Every chunk announces ``total_bytes``. An empty payload gives exactly one (last, empty)
    chunk. Arguments are checked at once (ValueError), not when iteration starts.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    view = memoryview(payload).cast("B")
    total = view.nbytes
    if max(1, -(-total // chunk_size)) > _MAX_CHUNKS:
        raise ValueError(
            f"a payload of {total} bytes needs more than {_MAX_CHUNKS} chunks of "
            f"{chunk_size} bytes; use a larger chunk_size"
        )
    return _chunks(view, transfer_id, chunk_size)


def _chunks(view: memoryview, transfer_id: str, chunk_size: int) -> Iterator[common_pb2.Chunk]:
    total = view.nbytes
    digest = hashlib.sha256()
    index = 0
    start = 0
    while True:
        piece = view[start : start + chunk_size]
        digest.update(piece)
        start += len(piece)
        last = start >= total
        yield common_pb2.Chunk(
            transfer_id=transfer_id,
            index=index,
            data=piece.tobytes(),
            last=last,
            total_bytes=total,
            sha256=digest.digest() if last else b"",
        )
        if last:
            return
        index += 1


class ChunkFraming:
    """The checks every chunked transfer gets, whatever its chunks carry.

    Why a base: raw payloads (:class:`ChunkAssembler`) and streamed tensor maps
    (``protos.stream.TensorMapReceiver``) share one framing: transfer id, order, the announced
    ``total_bytes`` (refused above ``max_bytes`` at the first chunk), no more data than
    announced, an early last chunk, the SHA-256 and nothing after the end. A subclass says what
    a header and a piece of data do (``_on_header``/``_on_data``) and what a finished transfer
    gives (``_result``). After a ChunkError the receiver stays failed: the transfer must start
    over with a new one.
    """

    def __init__(self, transfer_id: str | None = None, max_bytes: int = DEFAULT_MAX_PAYLOAD):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._transfer_id = transfer_id
        self._max_bytes = max_bytes
        self._total: int | None = None
        self._next_index = 0
        self._received = 0
        self._digest = hashlib.sha256()
        self._done = False
        self._error: str | None = None

    @property
    def transfer_id(self) -> str | None:
        """The transfer being assembled (None until the first chunk when not given)."""
        return self._transfer_id

    @property
    def total_bytes(self) -> int | None:
        """The size the chunks announce (None before the first chunk)."""
        return self._total

    @property
    def done(self) -> bool:
        """True once the last chunk arrived and the transfer checked out."""
        return self._done

    @property
    def received_bytes(self) -> int:
        """Payload bytes accepted so far."""
        return self._received

    @property
    def sha256(self) -> bytes:
        """The SHA-256 the completed transfer checked out with (b"" before it is done)."""
        return self._digest.digest() if self._done else b""

    def _fail(self, message: str) -> ChunkError:
        self._error = message
        self._release()
        return ChunkError(message)

    def _release(self) -> None:
        """Drop what was received so far (after a failure)."""

    def _on_header(self, header: common_pb2.TensorHeader) -> None:
        raise ChunkError("chunk carries a tensor header; this receiver takes raw payload bytes")

    def _on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _result(self):
        raise NotImplementedError

    def add(self, chunk: common_pb2.Chunk):
        """Accept the next chunk; return the transfer's result when it was the last one."""
        if self._error is not None:
            raise ChunkError(f"transfer already failed: {self._error}")
        tid = self._transfer_id if self._transfer_id is not None else chunk.transfer_id
        if self._done:
            raise self._fail(
                f"chunk {chunk.index} of transfer {tid!r} arrived after the transfer completed"
            )
        if self._transfer_id is None:
            self._transfer_id = chunk.transfer_id
        elif chunk.transfer_id != self._transfer_id:
            raise self._fail(
                f"chunk belongs to transfer {chunk.transfer_id!r}, expected {self._transfer_id!r}"
            )
        if chunk.index != self._next_index:
            kind = "duplicate" if chunk.index < self._next_index else "out-of-order"
            raise self._fail(
                f"{kind} chunk index {chunk.index} in transfer {tid!r}: expected {self._next_index}"
            )
        total = chunk.total_bytes
        if self._total is None:
            if total > self._max_bytes:
                raise self._fail(
                    f"payload of {total} bytes exceeds the limit of {self._max_bytes} bytes"
                )
            self._total = total
        elif total != self._total:
            raise self._fail(
                f"chunk {chunk.index} announces total_bytes={total}, but earlier chunks "
                f"announced {self._total}"
            )
        self._next_index += 1
        try:
            if chunk.WhichOneof("body") == "header":
                header = chunk.header
                encoded = header.SerializeToString(deterministic=True)
                self._digest.update(len(encoded).to_bytes(8, "little") + encoded)
                self._on_header(header)
            else:
                data = chunk.data
                if self._received + len(data) > self._total:
                    raise ChunkError(
                        f"chunk {chunk.index} brings the payload to "
                        f"{self._received + len(data)} bytes, more than the announced "
                        f"{self._total}"
                    )
                self._received += len(data)
                self._digest.update(data)
                self._on_data(data)
        except ValueError as exc:  # ChunkError, or a CodecError of a header
            raise self._fail(str(exc)) from None
        if not chunk.last:
            return None
        if self._received != self._total:
            raise self._fail(f"last chunk arrived after {self._received} of {self._total} bytes")
        if chunk.sha256 != self._digest.digest():
            raise self._fail(
                f"sha256 mismatch: the {self._total}-byte payload does not match the digest "
                "in the last chunk (corrupted or tampered in transit)"
            )
        try:
            result = self._result()
        except ValueError as exc:
            raise self._fail(str(exc)) from None
        self._done = True
        return result

    def truncated_error(self) -> ChunkError:
        """The error for a stream that ended before its last chunk."""
        total = "an unknown number of" if self._total is None else str(self._total)
        return ChunkError(f"truncated stream: got {self._received} of {total} bytes")


class ChunkAssembler(ChunkFraming):
    """Rebuilds one raw payload from its chunks, validating each as it arrives.

    ``transfer_id=None`` adopts the first chunk's id. ``max_bytes`` bounds the announced size,
    so a hostile sender cannot make the receiver buffer more than that.
    """

    def __init__(self, transfer_id: str | None = None, max_bytes: int = DEFAULT_MAX_PAYLOAD):
        super().__init__(transfer_id, max_bytes)
        self._parts: list[bytes] = []

    def _release(self) -> None:
        self._parts = []

    def _on_data(self, data: bytes) -> None:
        self._parts.append(data)

    def _result(self) -> bytes:
        payload = b"".join(self._parts)
        self._parts = []
        return payload

    def add(self, chunk: common_pb2.Chunk) -> bytes | None:
        """Accept the next chunk; return the whole payload when it was the last one."""
        return super().add(chunk)


def drain(receiver: ChunkFraming, chunks: Iterable[common_pb2.Chunk]):
    """Feed a whole chunk stream to ``receiver``; its result (extras are an error)."""
    out = None
    for chunk in chunks:
        result = receiver.add(chunk)
        if result is not None:
            out = result
    if out is None:
        raise receiver.truncated_error()
    return out


async def drain_async(receiver: ChunkFraming, chunks: AsyncIterable[common_pb2.Chunk]):
    """:func:`drain` for async streams, e.g. a ``grpc.aio`` server-streaming call."""
    out = None
    async for chunk in chunks:
        result = receiver.add(chunk)
        if result is not None:
            out = result
    if out is None:
        raise receiver.truncated_error()
    return out


def assemble(
    chunks: Iterable[common_pb2.Chunk],
    *,
    transfer_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD,
) -> bytes:
    """The payload of a complete chunk stream (consumed to its end; extras are an error)."""
    return drain(ChunkAssembler(transfer_id, max_bytes), chunks)


async def assemble_async(
    chunks: AsyncIterable[common_pb2.Chunk],
    *,
    transfer_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_PAYLOAD,
) -> bytes:
    """:func:`assemble` for async streams, e.g. a ``grpc.aio`` server-streaming call."""
    return await drain_async(ChunkAssembler(transfer_id, max_bytes), chunks)
