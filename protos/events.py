"""The MQTT side of the wire: topic names, payload encoding and a resilient publisher.

Events are best effort by design: a missing or crashed broker must degrade events, never
training. ``EventPublisher`` therefore never raises into its caller; it queues messages,
(re)connects with backoff in the background and drops the oldest messages when the queue
is full.

Topics (payloads are UTF-8 JSON):

- ``confide/nodes/<node_id>/presence``: ``{"node_id", "status": "online"|"offline", ...}``,
  retained, with a retained last will "offline" so a crashed node is reported by the broker.
- ``confide/jobs/<job_id>/events``: one ``confide.v1.Event`` in protobuf's JSON mapping.
- ``confide/coordinator/presence``: the coordinator's own presence, same shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlparse

import aiomqtt
from google.protobuf import json_format

from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

TOPIC_ROOT = "confide"


def node_presence_topic(node_id: str) -> str:
    return f"{TOPIC_ROOT}/nodes/{node_id}/presence"


def job_events_topic(job_id: str) -> str:
    return f"{TOPIC_ROOT}/jobs/{job_id}/events"


COORDINATOR_PRESENCE_TOPIC = f"{TOPIC_ROOT}/coordinator/presence"


def presence_payload(node_id: str, status: str) -> bytes:
    return json.dumps({"node_id": node_id, "status": status}).encode()


def event_to_json(event: pb.Event) -> bytes:
    return json_format.MessageToJson(event, indent=None).encode()


def event_from_json(payload: bytes) -> pb.Event:
    return json_format.Parse(payload, pb.Event())


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Accept ``mqtt://host:port`` (or ``host:port``); port defaults to 1883."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname:
            raise ValueError(f"not an MQTT URL: {url!r} (expected mqtt://HOST:PORT)")
        return cls(parsed.hostname, parsed.port or 1883)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


class EventPublisher:
    """Publishes to an MQTT broker in the background; never raises into the caller."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        queue_size: int = 1000,
    ) -> None:
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.will = will
        self._queue: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue(queue_size)
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mqtt-publisher")

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Queue a message; when the queue is full the oldest message is dropped."""
        while self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self.dropped += 1
        self._queue.put_nowait((topic, payload, retain))

    async def _run(self) -> None:
        delay = 0.5
        pending: tuple[str, bytes, bool] | None = None
        while True:
            will = None
            if self.will is not None:
                will = aiomqtt.Will(self.will[0], self.will[1], qos=1, retain=True)
            try:
                async with aiomqtt.Client(
                    self.address.host,
                    self.address.port,
                    identifier=self.client_id,
                    will=will,
                    timeout=5,
                ) as client:
                    self.connected.set()
                    delay = 0.5
                    while True:
                        if pending is None:
                            pending = await self._queue.get()
                        topic, payload, retain = pending
                        await client.publish(topic, payload, qos=1, retain=retain)
                        pending = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker down, refused, dropped: retry later
                self.connected.clear()
                log.debug("MQTT publisher: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def close(self, *, drain_timeout: float = 1.0) -> None:
        """Give queued messages a moment to go out, then stop."""
        if self._task is None:
            return
        if self.connected.is_set():
            deadline = asyncio.get_running_loop().time() + drain_timeout
            while not self._queue.empty() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._task = None
