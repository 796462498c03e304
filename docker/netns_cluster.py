#!/usr/bin/env python3
"""The compose topology without Docker: every service of docker/compose.yaml as real
processes, each in its own Linux network namespace with its own address on a bridge, started
through the same entrypoint (docker/entrypoint.py) with the same CONFIDE_* environment, in
the compose file's dependency order, declared healthy by the compose file's own healthcheck
commands. Needs root (``ip netns``, veth pairs, a bridge).

    sudo python docker/netns_cluster.py --quick                # up, run the scenario, down
    sudo python docker/netns_cluster.py --quick --keep          # ... and leave it running

What differs from Docker, and why:

- no images, no mount namespaces: a service's container paths (``/data``, ``/shards``, ...)
  become folders under ``<workdir>/root/<service>``, and each named volume a folder under
  ``<workdir>/volumes`` linked where the compose file mounts it; ``/app`` is this checkout and
  ``python`` the interpreter running this file;
- names resolve through ``/etc/netns/<ns>/hosts`` (``ip netns exec`` mounts it over
  /etc/hosts), one line per service, as Docker's embedded DNS would answer (and a
  ``resolv.conf`` naming no reachable server, so lookups do not wait on DNS);
- Eclipse Mosquitto is not installed here: the coordinator runs its embedded amqtt broker
  instead (``CONFIDE_MQTT=''``, listening on ``coordinator:1883``), and the name
  ``mosquitto`` resolves to the coordinator;
- ``--quick`` (the tests) swaps in tiny models and fewer steps through the same variables
  (``QUICK`` below), so the scenario takes about a minute on 2 cores;
- healthchecks are polled every 0.5 s rather than at the compose interval.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
COMPOSE_FILE = HERE / "compose.yaml"
APP = "/app"  # where the image keeps the checkout (docker/Dockerfile WORKDIR)

#: the variables the image's Dockerfile sets (ENV) that matter to the processes
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

#: always: the embedded broker stands in for Mosquitto
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` in an environment value, from this shell's
    environment, as ``docker compose`` does."""
    return _VARIABLE.sub(lambda m: os.environ.get(m[1]) or (m[2] or ""), value)


NO_MOSQUITTO = {"coordinator": {"CONFIDE_MQTT": "", "CONFIDE_MQTT_LISTEN": "coordinator:1883"}}

#: --quick: tiny models, few steps (service name patterns -> variables)
QUICK: dict[str, dict[str, str]] = {
    "prepare": {"CONFIDE_MAX_PER_NODE": "32", "CONFIDE_DOCS_PER_NODE": "1",
                "CONFIDE_AERO_ARGS": "--d-model 32 --layers 1 --heads 2 --d-ff 64 --max-len 16 "
                                     "--vocab 256 --steps 5 --batch-size 4 --eval-articles 5"},
    "coordinator": {"CONFIDE_REMOTE_MODEL": "tiny", "CONFIDE_MINIONS_MAX_TOKENS": "8",
                    "CONFIDE_HEARTBEAT": "1"},
    "*node*": {"CONFIDE_LOCAL_MODEL": "tiny", "CONFIDE_THREADS": "1", "CONFIDE_DEVICE": "cpu",
               "OMP_NUM_THREADS": "1"},
    "split-server": {"CONFIDE_LOCAL_MODEL": "tiny", "CONFIDE_THREADS": "1",
                     "CONFIDE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"},
    "scenario": {"CONFIDE_SCENARIO_BASE": "tiny-bert", "CONFIDE_SCENARIO_ROUNDS": "2",
                 "CONFIDE_SCENARIO_MAX_STEPS": "2", "CONFIDE_SCENARIO_MAX_LENGTH": "32",
                 "CONFIDE_SCENARIO_TIMEOUT": "240", "OMP_NUM_THREADS": "1"},
}


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def netns_available() -> str:
    """'' when network namespaces can be made here, else why not."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    try:
        import shutil

        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
    except Exception as exc:  # pragma: no cover
        return str(exc)
    probe = f"cfprobe{secrets.token_hex(3)}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def load_compose(path: Path = COMPOSE_FILE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def is_ours(service: dict) -> bool:
    """A service of the Confide image (the others, Mosquitto, are replaced)."""
    return "build" in service or str(service.get("image", "")).startswith("confide")


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


@dataclass
class Service:
    name: str
    spec: dict
    netns: str
    host_if: str
    ip: str
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    healthy: bool = False
    log: Path | None = None


class NetnsCluster:
    """The compose services as processes in network namespaces (see the module docstring)."""

    def __init__(self, workdir: Path | str, *, compose_file: Path = COMPOSE_FILE,
                 overrides: dict[str, dict[str, str]] | None = None,
                 python: str = sys.executable, verbose: bool = True) -> None:
        self.workdir = Path(workdir).resolve()
        self.compose = load_compose(compose_file)
        self.python = python
        self.verbose = verbose
        self.run_id = secrets.token_hex(2)
        self.bridge = f"cf{self.run_id}br"
        octets = secrets.randbelow(50) + 200, secrets.randbelow(250) + 1
        self.prefix = f"10.{octets[0]}.{octets[1]}"
        self.gateway = f"{self.prefix}.1"
        self.replaced = {n for n, s in self.compose["services"].items() if not is_ours(s)}
        self.services: dict[str, Service] = {}
        for index, (name, spec) in enumerate(
                (n, s) for n, s in self.compose["services"].items() if is_ours(s)):
            self.services[name] = Service(name, spec, netns=f"cf{self.run_id}-{name}",
                                          host_if=f"cf{self.run_id}h{index}",
                                          ip=f"{self.prefix}.{index + 2}")
        overrides = {**NO_MOSQUITTO, **(overrides or {})}
        for service in self.services.values():
            env = {k: "" if v is None else interpolate(str(v))
                   for k, v in (service.spec.get("environment") or {}).items()}
            for pattern, values in overrides.items():
                if fnmatch.fnmatch(service.name, pattern):
                    env.update(values)
            service.environment = env
        self._network_up = False

    # ------------------------------------------------------------------ paths and names

    def say(self, message: str) -> None:
        if self.verbose:
            print(f"netns: {message}", flush=True)

    @property
    def token(self) -> str | None:
        """The coordinator's client token (CONFIDE_TOKEN), which SDK calls from here need:
        the coordinator listens beyond loopback."""
        return self.services["coordinator"].environment.get("CONFIDE_TOKEN") or None

    def address(self, name: str, port: int) -> str:
        """How this (root-namespace) process reaches a service's port: over the bridge."""
        return f"{self.services[name].ip}:{port}"

    def host_path(self, service: str, container_path: str) -> str:
        """A service's container path as a path here (``/app`` is this checkout)."""
        if container_path == APP or container_path.startswith(APP + "/"):
            return str(REPO / container_path[len(APP):].lstrip("/"))
        return str(self.workdir / "root" / service / container_path.lstrip("/"))

    def volume(self, name: str) -> Path:
        return self.workdir / "volumes" / name

    def _mount_volumes(self, service: Service) -> None:
        for entry in service.spec.get("volumes") or []:
            source, target = str(entry).split(":")[:2]
            if source.startswith((".", "/")):
                raise NetnsError(f"{service.name}: bind mounts are not supported ({entry})")
            volume = self.volume(source)
            volume.mkdir(parents=True, exist_ok=True)
            link = Path(self.host_path(service.name, target))
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(volume, target_is_directory=True)

    def _translate(self, service: str, value: str) -> str:
        return self.host_path(service, value) if value.startswith("/") else value

    def env(self, service: Service) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIDE_")}
        env.update(IMAGE_ENV)
        env.update({k: self._translate(service.name, v) for k, v in service.environment.items()})
        return env

    def command(self, service: Service, argv: list[str]) -> list[str]:
        """A compose command (``python /app/...``) as a command line run in the service's
        namespace."""
        line = [self.python if a == "python" else self._translate(service.name, a)
                if a.startswith(APP) else a for a in argv]
        return ["ip", "netns", "exec", service.netns, *line]

    # ------------------------------------------------------------------ network

    def network_up(self) -> None:
        self.say(f"bridge {self.bridge} {self.prefix}.0/24, one namespace per service")
        self._network_up = True
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = ["127.0.0.1 localhost"]
        for s in self.services.values():
            hosts.append(f"{s.ip} {s.name}")
        coordinator = self.services.get("coordinator")
        for name in self.replaced:  # Mosquitto: the coordinator's embedded broker
            if coordinator is not None:
                hosts.append(f"{coordinator.ip} {name}")
        for s in self.services.values():
            _ip("netns", "add", s.netns)
            _ip("link", "add", s.host_if, "type", "veth", "peer", "name", "eth0",
                "netns", s.netns)
            _ip("link", "set", s.host_if, "master", self.bridge)
            _ip("link", "set", s.host_if, "up")
            _ip("-n", s.netns, "addr", "add", f"{s.ip}/24", "dev", "eth0")
            _ip("-n", s.netns, "link", "set", "eth0", "up")
            _ip("-n", s.netns, "link", "set", "lo", "up")
            _ip("-n", s.netns, "route", "add", "default", "via", self.gateway)
            folder = Path("/etc/netns") / s.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(hosts) + "\n")
            # no DNS server is reachable from a namespace: a resolver that fails at once
            # (gRPC's c-ares would otherwise wait seconds on AAAA queries before using hosts)
            (folder / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def network_down(self) -> None:
        if not self._network_up:
            return
        for s in self.services.values():
            _ip("netns", "del", s.netns, check=False)
            _ip("link", "del", s.host_if, check=False)
            folder = Path("/etc/netns") / s.netns
            for name in ("hosts", "resolv.conf"):
                with contextlib.suppress(OSError):
                    (folder / name).unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()
        _ip("link", "del", self.bridge, check=False)
        self._network_up = False

    def partition(self, name: str) -> None:
        """Cut a service off the network (its link down): nothing in or out, no RST."""
        _ip("link", "set", self.services[name].host_if, "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.services[name].host_if, "up")

    # ------------------------------------------------------------------ processes

    def launch(self, name: str) -> subprocess.Popen:
        service = self.services[name]
        self._mount_volumes(service)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        service.log = self.workdir / "logs" / f"{name}.log"
        log = open(service.log, "ab")  # noqa: SIM115 (owned by the process)
        argv = [str(a) for a in service.spec.get("command") or []]
        line = self.command(service, ["python", f"{APP}/docker/entrypoint.py", *argv])
        service.process = subprocess.Popen(line, env=self.env(service), cwd=REPO, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        service.healthy = False
        self.say(f"{name} started in {service.netns} ({service.ip}), log {service.log}")
        return service.process

    def check_health(self, name: str) -> bool:
        service = self.services[name]
        test = (service.spec.get("healthcheck") or {}).get("test")
        if not test:
            raise NetnsError(f"{name} has no healthcheck in the compose file")
        if test[0] not in ("CMD", "CMD-SHELL"):
            raise NetnsError(f"{name}: unsupported healthcheck {test}")
        argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
        result = subprocess.run(self.command(service, [str(a) for a in argv]),
                                env=self.env(service), cwd=REPO, capture_output=True,
                                text=True, timeout=30)
        service.healthy = result.returncode == 0
        return service.healthy

    def _satisfied(self, dep: str, condition: str) -> bool:
        if dep in self.replaced:
            return True
        service = self.services[dep]
        if service.process is None:
            return False
        if condition == "service_completed_successfully":
            code = service.process.poll()
            if code not in (None, 0):
                raise NetnsError(f"{dep} exited with {code}:\n{self.tail(dep)}")
            return code == 0
        if service.process.poll() is not None:
            raise NetnsError(f"{dep} exited with {service.process.returncode}:\n"
                             f"{self.tail(dep)}")
        if condition == "service_healthy":
            return service.healthy or self.check_health(dep)
        return True

    def start(self, exclude: tuple[str, ...] = ("scenario",), timeout: float = 300.0) -> None:
        """Start every service but ``exclude`` in the compose file's dependency order, and
        wait until each long-running one is healthy."""
        if not self._network_up:
            self.network_up()
        for name in self.replaced:
            self.say(f"{name}: not started (Mosquitto is not installed here); the coordinator's "
                     "embedded amqtt broker stands in for it")
        pending = [n for n in self.services if n not in exclude]
        deadline = time.monotonic() + timeout
        while True:
            for name in list(pending):
                deps = depends_on(self.services[name].spec)
                if all(self._satisfied(d, c) for d, c in deps.items()):
                    self.launch(name)
                    pending.remove(name)
            daemons = [n for n in self.services if n not in exclude
                       and self.services[n].spec.get("healthcheck")]
            if not pending and all(self._satisfied(n, "service_healthy") for n in daemons):
                return
            if time.monotonic() > deadline:
                waiting = pending or [n for n in daemons if not self.services[n].healthy]
                raise NetnsError(f"not up within {timeout:.0f}s: waiting for {waiting}")
            time.sleep(0.5)

    def run_oneshot(self, name: str, timeout: float = 600.0) -> int:
        """Run a one-shot service (e.g. ``scenario``) to its end; its exit status."""
        for dep, condition in depends_on(self.services[name].spec).items():
            if not self._satisfied(dep, condition):
                raise NetnsError(f"{name} needs {dep} ({condition})")
        process = self.launch(name)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop_service(name)
            raise NetnsError(f"{name} did not finish within {timeout:.0f}s:\n"
                             f"{self.tail(name)}") from None

    def tail(self, name: str, chars: int = 3000) -> str:
        log = self.services[name].log
        return log.read_text(errors="replace")[-chars:] if log and log.exists() else ""

    def stop_service(self, name: str, timeout: float = 10.0, kill: bool = False) -> None:
        process = self.services[name].process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        for name in reversed(list(self.services)):
            self.stop_service(name)
        self.network_down()

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/netns", help="volumes, logs (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (QUICK)")
    p.add_argument("--keep", action="store_true",
                   help="after the scenario, keep the services running until Ctrl-C")
    p.add_argument("--no-scenario", action="store_true", help="only start the services")
    args = p.parse_args(argv)
    problem = netns_available()
    if problem:
        print(f"netns: {problem}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    cluster = NetnsCluster(workdir, overrides=QUICK if args.quick else None)
    code = 0

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        started = time.monotonic()
        cluster.start()
        cluster.say(f"services healthy in {time.monotonic() - started:.1f}s; coordinator at "
                    f"{cluster.address('coordinator', 50051)}")
        if not args.no_scenario:
            code = cluster.run_oneshot("scenario")
            print(cluster.tail("scenario", 6000))
            cluster.say(f"scenario exited {code}")
        if args.keep:
            cluster.say("running; Ctrl-C stops everything")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    except NetnsError as exc:
        print(f"netns: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        cluster.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
