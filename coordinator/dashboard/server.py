"""Serve the dashboard from inside the coordinator process (uvicorn on the coordinator's own
event loop), so the page reads the very store and sessions the gRPC service uses.

Loopback by default. Any other address is reachable from other machines: there every request
needs the coordinator's client token (``coordinator/auth.py``), and a coordinator that holds no
token it enforces refuses to start such a dashboard instead of serving it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from confide.coordinator.auth import is_loopback
from confide.coordinator.dashboard.app import create_app
from confide.coordinator.dashboard.views import Source

log = logging.getLogger(__name__)


class DashboardRefused(ValueError):
    """A dashboard address that would be open beyond this machine."""


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--dashboard wants HOST:PORT (e.g. 127.0.0.1:8080), not {bind!r}")
    return host.strip("[]"), int(port)


def dashboard_token(bind: str, token: str) -> str:
    """The token the dashboard on ``bind`` requires ("" on loopback), or DashboardRefused
    when it is beyond loopback and there is no token to require."""
    parse_bind(bind)
    if is_loopback(bind):
        return ""
    if not token:
        raise DashboardRefused(
            f"refusing to serve the dashboard on {bind}: beyond loopback it needs the "
            "coordinator's client token, and this coordinator enforces none. Bind it to "
            "127.0.0.1 (and reach it through an SSH tunnel), or give the coordinator a "
            "token (--token or $CONFIDE_TOKEN, or --listen beyond loopback, which makes one "
            "in <data>/client_token); the page then asks for it")
    return token


class _Quiet(uvicorn.Server):
    """uvicorn inside a daemon that handles its own signals: leave them alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DashboardServer:
    def __init__(self, bind: str, source: Source, token: str = "") -> None:
        self.bind = bind
        self.token = dashboard_token(bind, token)
        self.source = source
        self.stopping = asyncio.Event()
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host, _ = parse_bind(self.bind)
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{'[' + shown + ']' if ':' in shown else shown}:{self.port}/"

    async def start(self) -> None:
        host, port = parse_bind(self.bind)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # bound here so that a taken port fails the start, not a background task
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"dashboard cannot listen on {self.bind}: {exc.strerror}") from None
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        app = create_app(self.source, self.token, self.stopping)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2, h11_max_incomplete_event_size=16384)
        self._server = _Quiet(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        log.info("dashboard on %s%s", self.url,
                 " (needs the client token)" if self.token else "")

    async def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
