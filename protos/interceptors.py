"""Server-side guard for malformed requests, shared by both daemons.

gRPC turns a request that fails to parse into status UNKNOWN with a Python traceback class
name. This interceptor makes it INVALID_ARGUMENT with a message that names the expected
message type, for unary and streaming requests alike, before any handler runs.

It also bounds how long a call may stay open without its first request message
(``FIRST_MESSAGE_TIMEOUT_S``, DEADLINE_EXCEEDED): gRPC itself waits forever for the request
of a call whose client sent headers and nothing else (a "slow-loris" client), even on unary
methods. Unary methods are therefore received as one-message streams here (the wire is the
same), so the wait for their request has a deadline too. Streams apply their own deadlines
after the first message (session heartbeats, a round's deadline).
"""

from __future__ import annotations

import asyncio
import inspect
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


#: seconds a call may stay open before its first request message arrives
FIRST_MESSAGE_TIMEOUT_S = 30.0

_END = object()


async def _first(requests: AsyncIterator[Any], context, method: str, timeout: float) -> Any:
    """The first request message (``_END`` if the client closed without one), or abort with
    DEADLINE_EXCEEDED when none comes within ``timeout``."""
    try:
        return await asyncio.wait_for(anext(requests), timeout)
    except StopAsyncIteration:
        return _END
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"{method}: no request message within {timeout:.0f}s of opening "
                            "the call")


async def _one(requests: AsyncIterator[Any], context, method: str, timeout: float) -> Any:
    """The request of a unary method, received as a stream."""
    request = await _first(aiter(requests), context, method, timeout)
    if request is _END:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the call ended without a request message")
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
    return request


async def _checked_stream(requests: AsyncIterator[Any], context, method: str,
                          timeout: float) -> AsyncIterator[Any]:
    iterator = aiter(requests)
    request = await _first(iterator, context, method, timeout)
    while request is not _END:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        yield request
        request = await anext(iterator, _END)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, first_message_timeout_s: float = FIRST_MESSAGE_TIMEOUT_S) -> None:
        self.first_message_timeout_s = first_message_timeout_s

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        timeout = self.first_message_timeout_s
        deserialize = _safe(handler.request_deserializer, method)
        serialize = handler.response_serializer

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(requests, context):
                return await inner(await _one(requests, context, method, timeout), context)

            return grpc.stream_unary_rpc_method_handler(unary_unary, deserialize, serialize)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            if inspect.isasyncgenfunction(inner_us):
                async def unary_stream(requests, context):
                    request = await _one(requests, context, method, timeout)
                    async for response in inner_us(request, context):
                        yield response
            else:  # a handler that answers with context.write (e.g. grpc's health Watch)
                async def unary_stream(requests, context):
                    return await inner_us(await _one(requests, context, method, timeout),
                                          context)

            return grpc.stream_stream_rpc_method_handler(unary_stream, deserialize, serialize)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests, context):
                return await inner_su(_checked_stream(requests, context, method, timeout),
                                      context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
        inner_ss = handler.stream_stream

        if inspect.isasyncgenfunction(inner_ss):
            async def stream_stream(requests, context):
                checked = _checked_stream(requests, context, method, timeout)
                async for response in inner_ss(checked, context):
                    yield response
        else:
            async def stream_stream(requests, context):
                return await inner_ss(_checked_stream(requests, context, method, timeout),
                                      context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
