"""A local multi-node cluster of real processes on 127.0.0.1: one coordinator (with its
embedded MQTT broker and SQLite state) and N node daemons, each with its own data folder.

The demo, the benchmarks and the integration tests all use it, so what they exercise is what
a user runs by hand: the same ``confide`` commands, separate processes, real sockets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from confide.coordinator.broker import free_port


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    def __init__(
        self,
        root: Path,
        node_data_dirs: list[Path],
        *,
        threads_per_node: int = 1,
        mqtt: bool = True,
        heartbeat_interval_s: float = 2.0,
        log_level: str = "INFO",
        coordinator_args: tuple[str, ...] = (),
        split_server: bool = False,
        tls_dir: Path | None = None,
        listen_host: str = "127.0.0.1",
        trust_split_server: str = "split-server",
    ) -> None:
        # absolute: the daemons run in another working directory (see _spawn), and an
        # installed copy's would be inside site-packages
        self.root = Path(root).resolve()
        self.node_data_dirs = [Path(d).resolve() for d in node_data_dirs]
        self.threads_per_node = threads_per_node
        self.mqtt = mqtt
        self.heartbeat_interval_s = heartbeat_interval_s
        self.log_level = log_level
        self.coordinator_args = tuple(coordinator_args)
        #: also start a node with the "split-server" role (no data) for split learning
        self.split_server = split_server
        #: the split-server every device of this cluster trusts with its text (SFPrompt's
        #: opt-in, ``--trust-split-server``); "" trusts none. The default names the cluster's
        #: own split-server: one user runs every process of a local cluster.
        self.trust_split_server = trust_split_server
        #: mutual TLS: a folder where the cluster keeps a development CA (tls_dir/ca) and one
        #: --tls folder per process (tls_dir/<name>), created when missing; every process gets
        #: --tls, the coordinator a server-only-TLS anonymous port
        self.tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        self.anonymous_port = free_port() if tls_dir is not None else 0
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        #: where the coordinator listens ("0.0.0.0": beyond loopback, so it requires its
        #: client token; everything still dials 127.0.0.1)
        self.listen = f"{listen_host}:{self.port}"
        self.mqtt_port = free_port() if mqtt else 0
        self.coordinator: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        (self.root / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}" if self.mqtt else ""

    def _env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = str(threads)
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["HF_HUB_OFFLINE"] = "1"
        return env

    def _spawn(self, name: str, args: list[str], threads: int) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "ab")  # noqa: SIM115 (owned by Popen)
        cmd = [sys.executable, "-m", "confide.cli.main", "--log-level", self.log_level, *args]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(threads),
                                cwd=Path(__file__).resolve().parent.parent)

    def start_coordinator(self, timeout: float = 60.0) -> str:
        self._spawn_coordinator()
        return self._wait_for_coordinator(timeout)

    @property
    def _ready_file(self) -> Path:
        return self.root / "coordinator.ready"

    def _spawn_coordinator(self) -> None:
        ready = self._ready_file
        ready.unlink(missing_ok=True)
        args = ["coordinator", "serve", "--listen", self.listen,
                "--data", str(self.root / "coordinator"), "--ready-file", str(ready),
                "--heartbeat", str(self.heartbeat_interval_s)]
        args += ["--mqtt-listen", f"127.0.0.1:{self.mqtt_port}"] if self.mqtt else ["--mqtt",
                                                                                    "none"]
        args += self._tls_args("coordinator")
        if self.anonymous_port:
            args += ["--anonymous-listen", f"127.0.0.1:{self.anonymous_port}"]
        args += self.coordinator_args
        self.coordinator = self._spawn("coordinator", args, threads=1)

    def _wait_for_coordinator(self, timeout: float) -> str:
        assert self.coordinator is not None
        deadline = time.monotonic() + timeout
        while not self._ready_file.exists():
            if self.coordinator.poll() is not None:
                raise ClusterError("coordinator exited; see " + str(self.log("coordinator")))
            if time.monotonic() > deadline:
                raise ClusterError("coordinator did not start in time")
            time.sleep(0.1)
        return self.address

    def start_node(self, index: int, *extra: str, coordinator: str = "") -> subprocess.Popen:
        """Start node ``index``; ``coordinator`` overrides the address it dials (a proxy)."""
        args = ["node", "serve", "--coordinator", coordinator or self.address,
                "--data", str(self.node_data_dirs[index]), "--name", f"node{index}",
                "--threads", str(self.threads_per_node), *self._tls_args(f"node{index}"),
                *(["--trust-split-server", self.trust_split_server]
                  if self.trust_split_server else []),
                *extra]
        process = self._spawn(f"node{index}", args, threads=self.threads_per_node)
        self.nodes[index] = process
        return process

    def start_split_server(self, *extra: str) -> int:
        """Start a node with only the "split-server" role and no data (SFPrompt's body);
        returns its index in ``nodes`` (after the data nodes)."""
        index = len(self.node_data_dirs)
        folder = self.root / "split-server"
        folder.mkdir(parents=True, exist_ok=True)
        args = ["node", "serve", "--coordinator", self.address, "--data", str(folder),
                "--name", "split-server", "--role", "split-server",
                "--threads", str(self.threads_per_node), *self._tls_args("split-server"),
                *extra]
        self.nodes[index] = self._spawn("split-server", args, threads=self.threads_per_node)
        return index

    def tls_folder(self, name: str) -> Path:
        """The --tls folder of ``name`` (a process, or e.g. "client" for the SDK), with a
        certificate from the cluster's CA valid for 127.0.0.1 and localhost."""
        from confide.protos.tls import CA_CERT, create_ca, issue_certificate

        assert self.tls_dir is not None, "the cluster runs without TLS"
        ca = self.tls_dir / "ca"
        if not (ca / CA_CERT).exists():
            create_ca(ca)
        folder = self.tls_dir / name
        if not (folder / f"{name}.key").exists():
            issue_certificate(ca, name, folder, [name, "localhost", "127.0.0.1"])
        return folder

    def _tls_args(self, name: str) -> list[str]:
        if self.tls_dir is None:
            return []
        args = ["--tls", str(self.tls_folder(name))]
        if name != "coordinator":
            args += ["--anonymous-coordinator", f"127.0.0.1:{self.anonymous_port}"]
        return args

    def start(self, timeout: float = 60.0, dial: Mapping[int, str] | None = None,
              flags: Mapping[int, Sequence[str]] | None = None,
              split_server_flags: Sequence[str] = ()) -> LocalCluster:
        """Every process at once: the nodes load their libraries (seconds) while the
        coordinator starts, and dial it with backoff until it listens. ``dial`` gives some
        nodes another address to dial (a relay in front of the coordinator), ``flags`` some
        nodes extra ``node serve`` flags."""
        dial, flags = dial or {}, flags or {}
        self._spawn_coordinator()
        for index in range(len(self.node_data_dirs)):
            self.start_node(index, *flags.get(index, ()), coordinator=dial.get(index, ""))
        if self.split_server:
            self.start_split_server(*split_server_flags)
        try:
            self._wait_for_coordinator(timeout)
        except ClusterError:
            self.stop()  # the nodes already started: a failed start leaves no process behind
            raise
        return self

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def kill_node(self, index: int) -> None:
        """SIGKILL: the node gets no chance to say goodbye (a crash, a pulled plug)."""
        process = self.nodes.pop(index)
        process.kill()
        process.wait()

    def kill_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.kill()
        self.coordinator.wait()
        self.coordinator = None

    def stop(self, timeout: float = 10.0) -> None:
        processes = [*self.nodes.values()]
        if self.coordinator is not None:
            processes.append(self.coordinator)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.nodes.clear()
        self.coordinator = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
