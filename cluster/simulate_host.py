"""Many virtual nodes in one process, over one shared base model: what a Ray actor of
``confide simulate`` runs (or this process itself, with ``--backend local``).

Each virtual node is a real node session: the daemon's own key, local data, privacy ledger,
admission gate and model store (``NodeDaemon`` without its peer service), the real
``CoordinatorLink`` speaking gRPC to the coordinator, and the real ``TaskWorker`` (the job's
trainer, e.g. ``LoraTrainer``, and the method's ``client_update``). What differs from a
daemon is only what makes hundreds of them fit on one machine:

- the trainers are shared: every node's worker of one host uses the same trainer cache and
  the same lock, so the host holds ONE copy of the base model, and a node's trainable state
  sits in it only while that node trains (each task loads the round's global state first,
  and the optimizer is fresh per task; what a node keeps between rounds is in its own model
  store on disk, as with a daemon);
- failure injection (``Faults``): a node drawn to drop out fails its task at once; a
  straggler waits a drawn delay before training, so the coordinator's real round deadline
  decides whether its update still counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import resource
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil  # installed with peft and amqtt, core dependencies
import torch

from confide.node.daemon import NodeConfig, NodeDaemon
from confide.node.session import CoordinatorLink
from confide.node.worker import TaskCancelled, TaskWorker
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


class SimulatedDropout(RuntimeError):
    """This virtual node was drawn to drop out of the round (``--dropout``)."""


@dataclass(frozen=True)
class Faults:
    """Failure injection, drawn per (seed, node, round) so a rerun injects the same faults.

    ``dropout``: the fraction of selected nodes that fail their round's task.
    ``straggler``: the fraction of the others that wait before training, for a delay drawn
    from an exponential distribution of mean ``delay_mean_s`` (capped at ``delay_max_s``)."""

    dropout: float = 0.0
    straggler: float = 0.0
    delay_mean_s: float = 5.0
    delay_max_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dropout", "straggler"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.delay_mean_s < 0 or self.delay_max_s < 0:
            raise ValueError("straggler delays must be >= 0")

    def fate(self, node: str, round_number: int) -> tuple[bool, float]:
        """(drops out, straggler delay in s) of ``node`` in ``round_number``."""
        digest = hashlib.sha256(f"{self.seed}/{node}/{round_number}".encode()).digest()
        rng = random.Random(digest)
        if rng.random() < self.dropout:
            return True, 0.0
        if rng.random() < self.straggler:
            return False, min(rng.expovariate(1.0 / self.delay_mean_s)
                              if self.delay_mean_s > 0 else 0.0, self.delay_max_s)
        return False, 0.0


class _QuietDropouts(logging.Filter):
    """The session logs a failed task with its traceback; an injected dropout is expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedDropout))


class SharedTrainers:
    """What the workers of one host share: the trainer cache, the seeded initial states and
    the lock that lets one node at a time use a trainer (``TaskWorker`` keeps them per
    worker; here one per host)."""

    def __init__(self) -> None:
        self.trainers: OrderedDict = OrderedDict()
        self.initial: dict = {}
        self.lock = threading.Lock()


class VirtualWorker(TaskWorker):
    """A ``TaskWorker`` over the host's shared trainers, with the injected faults."""

    def __init__(self, daemon: NodeDaemon, shared: SharedTrainers, faults: Faults,
                 label: str) -> None:
        super().__init__(daemon.data, daemon.models, daemon.device, guard=daemon.privacy)
        self._trainers = shared.trainers
        self._initial = shared.initial
        self._lock = shared.lock
        self.faults = faults
        self.label = label
        self.injected: dict[str, int] = {"dropped": 0, "delayed": 0}

    def train(self, task: pb.Task, global_payload: bytes, progress, cancelled: threading.Event
              ) -> tuple[bytes, int, dict[str, float]]:
        drops, delay = self.faults.fate(self.label, task.round)
        if drops:
            self.injected["dropped"] += 1
            raise SimulatedDropout(f"simulated dropout of {self.label} in round {task.round}")
        if delay > 0:
            self.injected["delayed"] += 1
            if cancelled.wait(delay):  # the session ended (e.g. the coordinator gave up)
                raise TaskCancelled("task cancelled while straggling")
        return super().train(task, global_payload, progress, cancelled)


@dataclass(frozen=True)
class HostSpec:
    """What one host runs: its nodes (index, data folder), where the coordinator is."""

    coordinator: str
    nodes: tuple[tuple[int, str], ...]
    faults: Faults = Faults()
    threads: int = 1
    log_level: str = "WARNING"
    #: "cpu", or "auto" (the GPU Ray gave the actor: --gpus-per-node; untested here)
    device: str = "cpu"


class VirtualNodeHost:
    """Runs ``spec.nodes`` virtual nodes on one event loop in a thread of this process."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.shared = SharedTrainers()
        self.links: list[CoordinatorLink] = []
        self.workers: list[VirtualWorker] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> int:
        """Start every node's session (returns once they are dialling); the node count."""
        logging.basicConfig(level=self.spec.log_level)
        logging.getLogger("confide.node.session").addFilter(_QuietDropouts())
        torch.set_num_threads(max(1, self.spec.threads))
        self._thread = threading.Thread(target=self._run, name="virtual-nodes", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"virtual nodes did not start: {self._error}")
        return len(self.links)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        # one thread per node at most: a straggler waits in its thread, and must not hold up
        # the other nodes' tasks queued behind it in a small default pool
        loop.set_default_executor(ThreadPoolExecutor(
            max_workers=min(len(self.spec.nodes) + 4, 512), thread_name_prefix="vnode"))
        asyncio.set_event_loop(loop)
        try:
            for index, folder in self.spec.nodes:
                self._add_node(index, Path(folder))
        except BaseException as exc:  # reported by start()
            self._error = exc
        self._ready.set()
        if self._error is None:
            loop.run_forever()
        loop.close()

    def _add_node(self, index: int, folder: Path) -> None:
        name = f"sim{index}"
        daemon = NodeDaemon(NodeConfig(coordinator=self.spec.coordinator, data_dir=folder,
                                       name=name, listen="", device=self.spec.device,
                                       agent=False))
        worker = VirtualWorker(daemon, self.shared, self.spec.faults, name)
        link = CoordinatorLink(self.spec.coordinator, daemon.key, daemon.info(), worker,
                               ring_key=daemon.ring_key, gate=daemon.gate)
        assert self._loop is not None
        self._tasks.append(self._loop.create_task(link.run(), name=name))
        self.links.append(link)
        self.workers.append(worker)

    def stats(self) -> dict:
        """Sessions connected, tasks done/failed, faults injected, this process's memory."""
        rss = psutil.Process().memory_info().rss / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        return {
            "nodes": len(self.links),
            "connected": sum(link.state.connected for link in self.links),
            "tasks_done": sum(link.state.tasks_done for link in self.links),
            "dropped": sum(w.injected["dropped"] for w in self.workers),
            "delayed": sum(w.injected["delayed"] for w in self.workers),
            "models_held": len(self.shared.trainers),
            "rss_mb": rss, "rss_peak_mb": peak,
        }

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def close() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for link in self.links:
                with contextlib.suppress(Exception):
                    await link.close()
            # the sessions' tasks are cancelled (a straggler's wait ends): let their threads
            # finish before the loop closes under them
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loop.shutdown_default_executor(), 30)
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(timeout=30)

