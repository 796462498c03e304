"""The dashboard's web application (Starlette): the page, its static files, read-only JSON
endpoints and one server-sent-event stream.

Every route is a GET that reads the coordinator's store (``views.py``); nothing here writes.
A page reload loses nothing: the page asks the JSON endpoints for the whole state, then
follows the stream from the cursor they returned. Hostile input is answered with a 4xx: a
malformed job id (400), an unknown one (404), an overlong query string (414), a missing or
wrong token where one is required (401).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from confide.coordinator.dashboard import views

STATIC = Path(__file__).resolve().parent / "static"
#: no endpoint takes more than a couple of short parameters
MAX_QUERY_BYTES = 1024
COOKIE = "confide_dashboard"
#: how often the stream looks for new events (seconds)
POLL_S = 0.5
#: how often it rebuilds the node and job lists to look for changes (1,000 nodes: ~20 ms)
LISTS_S = 2.0
#: node rows are pushed at least this often even if nothing but heartbeats changed
NODES_REFRESH_S = 10.0
KEEPALIVE_S = 15.0
#: the page loads only its own files, runs in no frame, leaks no address to other sites
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 12:
        raise ValueError(f"{name} must be a non-negative integer")
    return min(int(raw), high)


def _bad(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard(BaseHTTPMiddleware):
    """Refuse overlong query strings, and (when a token is set) any request without it: as
    ``Authorization: Bearer TOKEN`` or the cookie that ``/?token=TOKEN`` sets once."""

    def __init__(self, app: Any, token: str = "") -> None:
        super().__init__(app)
        self.expected = token.encode()

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(
            COOKIE, "")
        return hmac.compare_digest(given.encode(), self.expected)

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await self._checked(request, call_next)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _checked(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if len(request.scope.get("query_string", b"")) > MAX_QUERY_BYTES:
            return _bad(414, f"query string over {MAX_QUERY_BYTES} bytes")
        if not self.expected:
            return await call_next(request)
        given = request.query_params.get("token")
        if request.url.path == "/" and given is not None:
            if not hmac.compare_digest(given.encode(), self.expected):
                return PlainTextResponse("wrong token", status_code=401)
            # the token leaves the address bar (and the history) for an HttpOnly cookie
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
            return response
        if not self.authorized(request):
            return PlainTextResponse(
                "this dashboard needs the coordinator's client token: open /?token=TOKEN "
                "once, or send Authorization: Bearer TOKEN (the coordinator keeps it in "
                "<data>/client_token)", status_code=401)
        return await call_next(request)


class _DroppingQueue(asyncio.Queue):
    """Progress for one page: when a page stops reading, ticks are dropped, never raised
    into the coordinator's event log (the node's session would pay for it)."""

    def put_nowait(self, item: Any) -> None:
        if not self.full():
            super().put_nowait(item)


def _digest(rows: Any) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(source: views.Source, token: str = "",
               stopping: asyncio.Event | None = None) -> Starlette:
    """The dashboard over ``source``; ``token`` non-empty requires it on every request;
    ``stopping`` ends open event streams (an open stream would hold a graceful shutdown)."""
    anonymous = views.AnonymityCache(source.store)
    stopping = stopping or asyncio.Event()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def nodes(request: Request) -> Response:
        return JSONResponse({"nodes": views.node_rows(source)})

    async def jobs(request: Request) -> Response:
        return JSONResponse({"jobs": views.job_rows(source)})

    async def job(request: Request) -> Response:
        try:
            return JSONResponse(views.job_detail(source, request.path_params["job_id"]))
        except ValueError as exc:
            return _bad(400, str(exc))
        except views.NotFound as exc:
            return _bad(404, str(exc))

    async def job_events(request: Request) -> Response:
        try:
            after = _int_param(request, "after", 0, 2**62)
            limit = _int_param(request, "limit", 1000, 5000)
            rows = views.job_events(source, request.path_params["job_id"], after, limit)
        except ValueError as exc:
            return _bad(400, str(exc))
        except views.NotFound as exc:
            return _bad(404, str(exc))
        return JSONResponse({"events": rows})

    async def recent(request: Request) -> Response:
        try:
            count = _int_param(request, "count", 200, 2000)
        except ValueError as exc:
            return _bad(400, str(exc))
        cursor, rows = views.recent_events(source, anonymous, count)
        return JSONResponse({"cursor": cursor, "events": rows})

    async def stream(request: Request) -> Response:
        try:
            cursor = _int_param(request, "after", 0, 2**62)
        except ValueError as exc:
            return _bad(400, str(exc))
        return StreamingResponse(_follow(request, cursor), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def _follow(request: Request, cursor: int) -> AsyncIterator[str]:
        """New events as they are stored; node and job lists when they change."""
        progress = _DroppingQueue(maxsize=10_000)
        if source.events is not None:
            source.events.transient_listeners.add(progress)
        try:
            async for chunk in _poll(request, cursor, progress):
                yield chunk
        finally:
            if source.events is not None:
                source.events.transient_listeners.discard(progress)

    def _progress(queue: asyncio.Queue) -> dict[str, Any]:
        """The latest progress of each node since the last poll (older ticks are stale)."""
        latest: dict[str, Any] = {}
        while not queue.empty():
            row = views.progress_row(queue.get_nowait())
            if row is not None:
                latest[row["node"]] = row
        return latest

    async def _poll(request: Request, cursor: int,
                    progress: asyncio.Queue) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        seen_nodes = seen_jobs = ""
        nodes_at = keepalive_at = loop.time()
        lists_at = 0.0
        yield "retry: 2000\n\n"
        while not stopping.is_set() and not await request.is_disconnected():
            cursor, rows = views.events_since(source, cursor, anonymous)
            for row in rows:
                yield _sse("event", row)
            if rows:
                yield _sse("cursor", cursor)
            latest = _progress(progress)
            if latest:
                yield _sse("progress", list(latest.values()))
            if loop.time() - lists_at < LISTS_S:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), POLL_S)
                continue
            lists_at = loop.time()
            node_list = views.node_rows(source)
            shape = _digest([{k: v for k, v in n.items() if k != "last_heartbeat_ms"}
                             for n in node_list])
            if shape != seen_nodes or loop.time() - nodes_at > NODES_REFRESH_S:
                seen_nodes, nodes_at = shape, loop.time()
                yield _sse("nodes", node_list)
            job_list = views.job_rows(source)
            shape = _digest(job_list)
            if shape != seen_jobs:
                seen_jobs = shape
                yield _sse("jobs", job_list)
            if loop.time() - keepalive_at > KEEPALIVE_S:
                keepalive_at = loop.time()
                yield ": keepalive\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_S)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _bad(404, "no such page")

    routes = [
        Route("/", index),
        Route("/api/nodes", nodes),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/jobs/{job_id}/events", job_events),
        Route("/api/events", recent),
        Route("/api/stream", stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, token=token)],
                     exception_handlers={404: not_found})
