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

from coordinator.broker import EmbeddedBroker
from coordinator.events import EventLog
from coordinator.service import CoordinatorService
from coordinator.sessions import SessionRegistry
from coordinator.store import Store
from protos.confide.v1 import coordinator_pb2_grpc as pb_grpc
from protos.events import COORDINATOR_PRESENCE_TOPIC, EventPublisher
from protos.interceptors import MalformedRequestInterceptor

log = logging.getLogger(__name__)

SERVICE_NAME = "confide.v1.Coordinator"
#: messages stay chunked at 1 MiB; 8 MiB leaves room for everything else
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


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

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
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
        self.server = grpc.aio.server(options=grpc_server_options(),
                                      interceptors=[MalformedRequestInterceptor()])
        pb_grpc.add_CoordinatorServicer_to_server(self.service, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        self.port = self.server.add_insecure_port(cfg.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        resumed = self.service.resume_jobs()
        if resumed:
            log.info("resuming job(s): %s", ", ".join(resumed))
        self._expiry = asyncio.create_task(self._expire_sessions(sessions))
        log.info("coordinator listening on %s (data in %s)", self.address, cfg.data_dir)

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
        if self.service is not None:
            await self.service.stop_jobs()
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
    server = CoordinatorServer(config)
    await server.start()
    if ready_file is not None:
        ready_file.write_text(server.address)
    try:
        await server.wait()
    finally:
        await server.stop()
