"""Server-side guard for malformed requests, shared by both daemons.

gRPC turns a request that fails to parse into status UNKNOWN with a Python traceback class
name. This interceptor makes it INVALID_ARGUMENT with a message that names the expected
message type, for unary and streaming requests alike, before any handler runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return _Malformed(f"{method}: request is not a valid protobuf message ({exc})")

    return parse


async def _checked_stream(requests: AsyncIterator[Any], context) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        yield request


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserialize = _safe(handler.request_deserializer, method)
        serialize = handler.response_serializer

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
                async for response in inner_us(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests, context):
                return await inner_su(_checked_stream(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
        inner_ss = handler.stream_stream

        async def stream_stream(requests, context):
            async for response in inner_ss(_checked_stream(requests, context), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
