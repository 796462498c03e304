"""Assembles and runs the coordinator daemon: gRPC server (Coordinator + health), SQLite
store, event log, embedded or external MQTT broker, session expiry, job resumption."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from confide.coordinator.auth import TokenAuth, is_loopback, load_or_create_token
from confide.coordinator.broker import EmbeddedBroker
from confide.coordinator.events import EventLog
from confide.coordinator.service import CoordinatorService
from confide.coordinator.sessions import SessionRegistry
from confide.coordinator.store import Store
from confide.protos.events import COORDINATOR_PRESENCE_TOPIC, EventPublisher
from confide.protos.interceptors import MalformedRequestInterceptor
from confide.protos.tls import AllowOnly, TLSConfig
from confide.protos.tls import add_port as tls_add_port
from confide.protos.tls import load as tls_load
from confide.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "confide.v1.Coordinator"
#: messages stay chunked at 1 MiB; 8 MiB leaves room for everything else
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: what the anonymous port (``anonymous_listen``) serves: ring-signed submission, nothing else
ANONYMOUS_METHODS = tuple(f"/{SERVICE_NAME}/{m}" for m in
                          ("GetRing", "GetChallenge", "SubmitAnonymousUpdate"))


def grpc_server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


@dataclass
class CoordinatorConfig:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("runs/coordinator")
    #: "" starts the embedded broker; "none" disables events over MQTT; else mqtt://host:port
    mqtt: str = ""
    mqtt_listen: str = "127.0.0.1:0"
    heartbeat_interval_s: float = 5.0
    #: a session silent for this many heartbeat intervals is presumed dead
    heartbeat_misses: int = 4
    #: Minions: the remote model (agents.backends spec, loaded on the first question) and a
    #: cap on every generation of a question, remote and local (0: the protocol's defaults)
    remote_model: str = "smollm2"
    minions_max_tokens: int = 0
    #: a --tls folder (protos.tls): the port requires client certificates from its CA
    tls_dir: str = ""
    tls_name: str = ""
    #: a second port serving only the anonymous RPCs, with server-only TLS when tls_dir is
    #: set: an anonymous upload must not present the node's certificate ("" = none)
    anonymous_listen: str = ""
    #: coordinator/auth.py: beyond loopback without TLS, the user RPCs need the client token
    #: (<data>/client_token, or this one); open_reads lets status and watch through without
    token: str = ""
    open_reads: bool = False
    #: HOST:PORT of the read-only web dashboard (coordinator/dashboard), "" = none
    dashboard: str = ""


class CoordinatorServer:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.store: Store | None = None
        self.broker: EmbeddedBroker | None = None
        self.publisher: EventPublisher | None = None
        self.service: CoordinatorService | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._expiry: asyncio.Task | None = None
        self.tls: TLSConfig | None = None
        self.anonymous_server: grpc.aio.Server | None = None
        self.anonymous_port = 0
        #: the client token this coordinator accepts, and whether it requires it
        self.token = ""
        self.requires_token = False
        self.dashboard = None  # coordinator.dashboard.server.DashboardServer when enabled

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        self.tls = tls_load(cfg.tls_dir, cfg.tls_name)  # a bad folder fails before any state
        self.store = Store(cfg.data_dir)
        mqtt_url = await self._start_events(cfg)
        sessions = SessionRegistry()
        events = EventLog(self.store, self.publisher)
        self.service = CoordinatorService(
            self.store, sessions, events, mqtt_url=mqtt_url,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
        )
        self.service.remote_model = cfg.remote_model
        self.service.minions_max_tokens = cfg.minions_max_tokens
        self.token = cfg.token or load_or_create_token(cfg.data_dir)
        # mutual TLS already asks every client for a certificate of the CA; a loopback-only
        # coordinator is reachable only from this machine (the demo runs open)
        self.requires_token = self.tls is None and not is_loopback(cfg.listen)
        if cfg.dashboard:  # refused beyond loopback without a token: before any port opens
            from confide.coordinator.dashboard.server import DashboardServer
            from confide.coordinator.dashboard.views import Source

            self.dashboard = DashboardServer(
                cfg.dashboard, Source(self.store, sessions, events),
                self.token if (cfg.token or self.requires_token) else "")
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
        if self.requires_token:
            interceptors.insert(0, TokenAuth(self.token, open_reads=cfg.open_reads))
        self.server = grpc.aio.server(options=grpc_server_options(), interceptors=interceptors)
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.port = tls_add_port(self.server, cfg.listen, tls=self.tls)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.anonymous_listen:
            await self._start_anonymous_port(cfg, health_servicer)
        resumed = self.service.resume_jobs()
        if resumed:
            log.info("resuming job(s): %s", ", ".join(resumed))
        self._expiry = asyncio.create_task(self._expire_sessions(sessions))
        if self.dashboard is not None:
            await self.dashboard.start()
        log.info("coordinator listening on %s (data in %s)%s", self.address, cfg.data_dir,
                 f", mutual TLS ({self.tls.folder})" if self.tls else
                 (f", job submission{'' if cfg.open_reads else ' and reads'} need the client "
                  f"token ({cfg.data_dir}/client_token)" if self.requires_token
                  else ", open to this machine (loopback)"))

    async def _start_anonymous_port(self, cfg: CoordinatorConfig, health_servicer) -> None:
        """The anonymous RPCs on a port of their own, TLS without client certificates: with
        mutual TLS on the main port a node's upload would otherwise carry its certificate."""
        self.anonymous_server = grpc.aio.server(
            options=grpc_server_options(),
            interceptors=[AllowOnly((*ANONYMOUS_METHODS, "/grpc.health.v1.Health/Check")),
                          MalformedRequestInterceptor()])
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self.anonymous_server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.anonymous_server)
        self.anonymous_port = tls_add_port(self.anonymous_server, cfg.anonymous_listen,
                                           tls=self.tls, require_client_auth=False)
        if self.anonymous_port == 0:
            raise OSError(f"cannot listen on {cfg.anonymous_listen}")
        await self.anonymous_server.start()
        log.info("anonymous submissions on %s:%d (%s)", cfg.anonymous_listen.rsplit(":", 1)[0],
                 self.anonymous_port,
                 "TLS, no client certificate" if self.tls else "plaintext")

    async def _start_events(self, cfg: CoordinatorConfig) -> str:
        if cfg.mqtt == "none":
            return ""
        if cfg.mqtt:
            url = cfg.mqtt
        else:
            host, port = cfg.mqtt_listen.rsplit(":", 1)
            self.broker = EmbeddedBroker(host, int(port))
            try:
                await self.broker.start()
            except Exception as exc:  # events degrade, the coordinator still runs
                log.warning("embedded MQTT broker failed to start (%s); events off", exc)
                self.broker = None
                return ""
            url = self.broker.url
        self.publisher = EventPublisher(
            url,
            client_id="confide-coordinator",
            will=(COORDINATOR_PRESENCE_TOPIC, b'{"status": "offline"}'),
        )
        self.publisher.start()
        self.publisher.publish(COORDINATOR_PRESENCE_TOPIC, b'{"status": "online"}', retain=True)
        return url

    async def _expire_sessions(self, sessions: SessionRegistry) -> None:
        limit = self.config.heartbeat_interval_s * self.config.heartbeat_misses
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            for session in sessions.expire(limit):
                log.warning("node %s: %s", session.node_id, session.close_reason)

    async def stop(self, grace: float = 1.0) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.service is not None:
            await self.service.stop_jobs()
        if self.anonymous_server is not None:
            await self.anonymous_server.stop(grace)
        if self.server is not None:
            await self.server.stop(grace)
        if self.publisher is not None:
            self.publisher.publish(COORDINATOR_PRESENCE_TOPIC, b'{"status": "offline"}',
                                   retain=True)
            await self.publisher.close()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.stop()
        if self.store is not None:
            self.store.close()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


async def serve(config: CoordinatorConfig, ready_file: Path | None = None) -> None:
    """Run until cancelled (Ctrl-C / SIGTERM)."""
    raise_fd_limit()
    server = CoordinatorServer(config)
    await server.start()
    if ready_file is not None:
        ready_file.write_text(server.address)
    try:
        await server.wait()
    finally:
        await server.stop()


def raise_fd_limit() -> int:
    """Every node session is a connection (a file descriptor): lift the soft limit to the hard
    one, as servers do (1,024 by default on many systems). Returns the soft limit now."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed
        return 0
