#!/usr/bin/env python3
"""The container entrypoint: turns ``CONFIDE_*`` environment variables into the real
``confide`` command lines and execs them (so the daemon is PID 1's replacement and gets
docker's SIGTERM itself).

    CONFIDE_ROLE=coordinator   confide coordinator serve ...
    CONFIDE_ROLE=node          confide node serve ...
    CONFIDE_ROLE=prepare       one-shot: confide data bbc ..., the nodes' Minions documents,
                               confide aero train ... (a small private-inference model)
    CONFIDE_ROLE=scenario      one-shot: python docker/scenario.py ... (the demo scenario)

Arguments given to the container (``docker run IMAGE confide status ...``, or a compose
``command:``) are executed as they are instead. ``VARIABLES`` below is the one list of what
this entrypoint accepts, per role; ``tests/unit/test_compose.py`` checks the compose file
against it, and ``docker/netns_cluster.py`` runs this same file outside Docker.

``python docker/entrypoint.py --print`` shows the command lines the environment gives,
without running them; ``--help-vars`` lists every variable.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROLES = ("coordinator", "node", "prepare", "scenario")
DAEMONS = ("coordinator", "node")


@dataclass(frozen=True)
class Var:
    name: str
    roles: tuple[str, ...]
    help: str
    default: str = ""
    required: bool = False


VARIABLES: dict[str, Var] = {v.name: v for v in [
    Var("CONFIDE_ROLE", ROLES, "what this container runs: " + ", ".join(ROLES),
        required=True),
    Var("CONFIDE_LOG_LEVEL", ROLES, "DEBUG, INFO, WARNING or ERROR", "INFO"),
    Var("CONFIDE_CACHE", ROLES, "Confide's cache root, read by the code itself: the image sets "
        "it to where SmolLM2 was converted at build time (read only, shared by every "
        "container)", "/opt/confide-cache"),
    Var("CONFIDE_TLS", ("coordinator", "node", "scenario"),
        "a --tls folder (ca.pem + this party's certificate): mutual TLS on every gRPC link"),
    Var("CONFIDE_TOKEN", ("coordinator", "node", "scenario"),
        "the coordinator's client token (job submission beyond loopback without TLS): the "
        "coordinator accepts it instead of generating one, the scenario's SDK sends it; a "
        "node's daemon ignores it, its healthcheck (--registered) reads the node list with it"),
    # the daemons
    Var("CONFIDE_LISTEN", DAEMONS, "gRPC address: the coordinator's service, a node's peer "
        "service (HOST:PORT; '' turns a node's peer service off)", required=True),
    Var("CONFIDE_DATA", DAEMONS, "the daemon's folder: coordinator SQLite state and global "
        "models; a node's private datasets, key, models and private/ inference models",
        required=True),
    Var("CONFIDE_MQTT", DAEMONS, "coordinator: mqtt://HOST:PORT of an external broker "
        "(Mosquitto), 'none' = no MQTT events, '' = start the embedded broker; node: "
        "override the broker the coordinator announces"),
    Var("CONFIDE_MQTT_LISTEN", ("coordinator",), "where the embedded broker listens (only "
        "with CONFIDE_MQTT='')", "0.0.0.0:1883"),
    Var("CONFIDE_HEARTBEAT", ("coordinator",), "node heartbeat interval, seconds (a node "
        "silent for 4 intervals is dropped)", "5"),
    Var("CONFIDE_REMOTE_MODEL", ("coordinator",), "Minions' remote model: smollm2, tiny, "
        "path:DIR or openai:URL#model", "smollm2"),
    Var("CONFIDE_MINIONS_MAX_TOKENS", ("coordinator",), "cap on every Minions generation, "
        "tokens (0 = the protocol's defaults)", "0"),
    Var("CONFIDE_COORDINATOR", ("node", "scenario"), "the coordinator's HOST:PORT",
        required=True),
    Var("CONFIDE_ADVERTISE", ("node",), "the peer address other parties dial (HOST:PORT as "
        "they resolve it: the compose service name)"),
    Var("CONFIDE_NODE_ROLES", ("node",), "comma-separated node roles: trainer, split-server",
        "trainer"),
    Var("CONFIDE_NAME", ("node",), "a readable node name"),
    Var("CONFIDE_DEVICE", ("node",), "auto (CUDA when present), cpu, cuda[:N]", "auto"),
    Var("CONFIDE_THREADS", ("node",), "torch threads, 0 = torch's default", "0"),
    Var("CONFIDE_LOCAL_MODEL", ("node",), "Minions' local model reading <data>/docs/*.txt",
        "smollm2"),
    Var("CONFIDE_COST", ("node",), "participation cost per round (budgeted jobs)", "0"),
    Var("CONFIDE_TRUST_SPLIT_SERVER", ("node",), "comma-separated split-servers (names or "
        "node ids) this node trusts with its text: it takes part in SFPrompt jobs paired with "
        "one of them (--trust-split-server; the split-server can read the text back from the "
        "activations it receives, README: split-learning threat model). '' = none: SFPrompt "
        "tasks are refused, unless the policy file in CONFIDE_DATA (trust_split_servers) "
        "names one"),
    # prepare: the data shards, the nodes' documents and the private-inference model
    Var("CONFIDE_NODES", ("prepare",), "device nodes to make shards for", "3"),
    Var("CONFIDE_SHARDS", ("prepare",), "where node0..N-1 shard folders go (mount each "
        "node's data volume at <shards>/nodeI)", required=True),
    Var("CONFIDE_MAX_PER_NODE", ("prepare",), "training articles per node, 0 = all", "240"),
    Var("CONFIDE_ALPHA", ("prepare",), "Dirichlet label skew of the shards", "0.5"),
    Var("CONFIDE_DOCS_PER_NODE", ("prepare",), "articles of its own shard each node keeps as "
        "Minions documents (<shard>/docs/news.txt), 0 = none", "3"),
    Var("CONFIDE_AERO_DATA", ("prepare",), "a node folder to publish a private-inference "
        "model into (its private/), '' = none"),
    Var("CONFIDE_AERO_NAME", ("prepare",), "that model's name", "aero"),
    Var("CONFIDE_AERO_ARGS", ("prepare",), "extra `confide aero train` options (its size and "
        "training steps)", "--d-model 64 --layers 2 --heads 4 --d-ff 128 --max-len 32 "
        "--vocab 1024 --steps 60 --eval-articles 20"),
    # scenario
    Var("CONFIDE_SCENARIO_STEPS", ("scenario",), "comma-separated steps: dp-lora, dimat, "
        "private, minions", "dp-lora,dimat,private,minions"),
    Var("CONFIDE_SCENARIO_DEVICES", ("scenario",), "device (trainer) nodes to wait for", "3"),
    Var("CONFIDE_SCENARIO_BASE", ("scenario",), "base model of the training steps", "minilm"),
    Var("CONFIDE_SCENARIO_ROUNDS", ("scenario",), "DP-LoRA rounds", "3"),
    Var("CONFIDE_SCENARIO_MAX_STEPS", ("scenario",), "local steps per round, 0 = an epoch",
        "10"),
    Var("CONFIDE_SCENARIO_MAX_LENGTH", ("scenario",), "tokens per example", "128"),
    Var("CONFIDE_SCENARIO_PRIVATE_NODE", ("scenario",), "peer HOST:PORT serving the private "
        "model ('' = the split-server's advertised address)"),
    Var("CONFIDE_SCENARIO_PRIVATE_MODEL", ("scenario",), "the private model's name", "aero"),
    Var("CONFIDE_SCENARIO_QUESTION", ("scenario",), "the Minions question",
        "Which organisations and people do these news reports mention?"),
    Var("CONFIDE_SCENARIO_TIMEOUT", ("scenario",), "seconds each step may take", "900"),
    Var("CONFIDE_SCENARIO_REPORT", ("scenario",), "also write the results as JSON here"),
]}


def accepted(role: str) -> set[str]:
    """The variables a container of ``role`` reads."""
    return {name for name, var in VARIABLES.items() if role in var.roles}


class EntrypointError(ValueError):
    pass


def _get(env: Mapping[str, str], name: str) -> str:
    return env.get(name, VARIABLES[name].default)


def check(env: Mapping[str, str]) -> str:
    """The role, after refusing variables the role does not read (a typo would otherwise be
    ignored silently)."""
    role = env.get("CONFIDE_ROLE", "")
    if role not in ROLES:
        raise EntrypointError(f"CONFIDE_ROLE must be one of {', '.join(ROLES)}, got {role!r}")
    unknown = sorted(k for k in env if k.startswith("CONFIDE_") and k not in accepted(role))
    if unknown:
        raise EntrypointError(f"CONFIDE_ROLE={role} does not read {', '.join(unknown)}; it "
                              f"reads {', '.join(sorted(accepted(role)))}")
    for name in sorted(accepted(role)):
        # a node's CONFIDE_LISTEN may be '' (no peer service), but it must be said
        if VARIABLES[name].required and (name not in env or
                                         (not env[name] and name != "CONFIDE_LISTEN")):
            raise EntrypointError(f"{name} is required for CONFIDE_ROLE={role}: "
                                  f"{VARIABLES[name].help}")
    return role


def _confide(env: Mapping[str, str], *args: str) -> list[str]:
    return ["confide", "--log-level", _get(env, "CONFIDE_LOG_LEVEL"), *args]


def _tls(env: Mapping[str, str]) -> list[str]:
    tls = env.get("CONFIDE_TLS", "")
    return ["--tls", tls] if tls else []


def commands(env: Mapping[str, str]) -> list[list[str]]:
    """The command lines this environment runs, in order (``confide ...`` or ``python
    docker/scenario.py ...``). Pure: nothing runs here."""
    role = check(env)
    g = lambda name: _get(env, name)  # noqa: E731
    if role == "coordinator":
        args = ["coordinator", "serve", "--listen", g("CONFIDE_LISTEN"),
                "--data", g("CONFIDE_DATA"), "--mqtt", g("CONFIDE_MQTT"),
                "--mqtt-listen", g("CONFIDE_MQTT_LISTEN"), "--heartbeat", g("CONFIDE_HEARTBEAT"),
                "--remote-model", g("CONFIDE_REMOTE_MODEL"),
                "--minions-max-tokens", g("CONFIDE_MINIONS_MAX_TOKENS"), *_tls(env)]
        return [_confide(env, *args)]
    if role == "node":
        args = ["node", "serve", "--coordinator", g("CONFIDE_COORDINATOR"),
                "--data", g("CONFIDE_DATA"), "--listen", g("CONFIDE_LISTEN"),
                "--device", g("CONFIDE_DEVICE"), "--threads", g("CONFIDE_THREADS"),
                "--local-model", g("CONFIDE_LOCAL_MODEL"), "--cost", g("CONFIDE_COST")]
        for option, name in (("--advertise", "CONFIDE_ADVERTISE"), ("--name", "CONFIDE_NAME"),
                             ("--mqtt", "CONFIDE_MQTT")):
            if g(name):
                args += [option, g(name)]
        for node_role in g("CONFIDE_NODE_ROLES").split(","):
            if node_role.strip():
                args += ["--role", node_role.strip()]
        for server in g("CONFIDE_TRUST_SPLIT_SERVER").split(","):
            if server.strip():
                args += ["--trust-split-server", server.strip()]
        return [_confide(env, *args, *_tls(env))]
    if role == "prepare":
        shards = g("CONFIDE_SHARDS")
        lines = [_confide(env, "data", "bbc", "--nodes", g("CONFIDE_NODES"), "--out", shards,
                          "--max-per-node", g("CONFIDE_MAX_PER_NODE"),
                          "--alpha", g("CONFIDE_ALPHA"))]
        if g("CONFIDE_AERO_DATA"):
            lines.append(_confide(env, "aero", "train", "--variant", "aero",
                                  "--node-data", g("CONFIDE_AERO_DATA"),
                                  "--name", g("CONFIDE_AERO_NAME"),
                                  *shlex.split(g("CONFIDE_AERO_ARGS"))))
        return lines
    args = ["--coordinator", g("CONFIDE_COORDINATOR"), "--steps", g("CONFIDE_SCENARIO_STEPS"),
            "--devices", g("CONFIDE_SCENARIO_DEVICES"), "--base", g("CONFIDE_SCENARIO_BASE"),
            "--rounds", g("CONFIDE_SCENARIO_ROUNDS"),
            "--max-steps", g("CONFIDE_SCENARIO_MAX_STEPS"),
            "--max-length", g("CONFIDE_SCENARIO_MAX_LENGTH"),
            "--private-node", g("CONFIDE_SCENARIO_PRIVATE_NODE"),
            "--private-model", g("CONFIDE_SCENARIO_PRIVATE_MODEL"),
            "--question", g("CONFIDE_SCENARIO_QUESTION"),
            "--timeout", g("CONFIDE_SCENARIO_TIMEOUT"),
            "--log-level", g("CONFIDE_LOG_LEVEL"), *_tls(env)]
    if g("CONFIDE_SCENARIO_REPORT"):
        args += ["--report", g("CONFIDE_SCENARIO_REPORT")]
    return [["python", str(HERE / "scenario.py"), *args]]


def _argv(line: list[str]) -> list[str]:
    """Run ``confide`` and ``python`` with this interpreter: the image's venv, or the one
    that runs this file outside Docker (docker/netns_cluster.py)."""
    if line[0] == "confide":
        return [sys.executable, "-m", "confide.cli.main", *line[1:]]
    if line[0] == "python":
        return [sys.executable, *line[1:]]
    return line


# ------------------------------------------------------------------------------ prepare


def write_documents(shards: Path, nodes: int, per_node: int) -> None:
    """Minions reads a node's ``<data>/docs/*.txt``: give each node a few articles of its own
    shard as one document (the articles stay on that node's volume)."""
    for i in range(nodes):
        folder = shards / f"node{i}"
        articles = []
        with open(folder / "train.jsonl", encoding="utf-8") as f:
            for line in f:
                if len(articles) >= per_node:
                    break
                articles.append(json.loads(line)["text"].strip())
        (folder / "docs").mkdir(exist_ok=True)
        (folder / "docs" / "news.txt").write_text("\n\n".join(articles) + "\n", encoding="utf-8")


def prepare(env: Mapping[str, str], lines: list[list[str]]) -> int:
    """Run the data preparation once: a marker in each volume makes a second ``up`` skip it."""
    shards = Path(_get(env, "CONFIDE_SHARDS"))
    nodes = int(_get(env, "CONFIDE_NODES"))
    marker = ".confide-prepared"
    shard_done = all((shards / f"node{i}" / marker).exists() for i in range(nodes))
    aero = _get(env, "CONFIDE_AERO_DATA")
    aero_done = not aero or (Path(aero) / marker).exists()
    if shard_done and aero_done:
        print("prepare: shards, documents and the private model are already there")
        return 0
    for line in lines:
        is_aero = line[3:5] == ["aero", "train"]
        if (aero_done if is_aero else shard_done):
            continue
        print("prepare: " + shlex.join(line), flush=True)
        code = subprocess.call(_argv(line))
        if code:
            print(f"prepare: failed ({code}): {shlex.join(line)}", file=sys.stderr)
            return code
        if not is_aero:
            write_documents(shards, nodes, int(_get(env, "CONFIDE_DOCS_PER_NODE")))
            for i in range(nodes):
                (shards / f"node{i}" / marker).write_text("ok\n")
        else:
            (Path(aero) / marker).write_text("ok\n")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--help-vars"]:
        for var in VARIABLES.values():
            default = f" (default: {var.default})" if var.default else ""
            print(f"{var.name:<32} [{','.join(var.roles)}] {var.help}{default}")
        return 0
    if argv and argv[0] != "--print":  # an explicit command: run it as given
        line = _argv(argv)
        os.execvp(line[0], line)
    env = dict(os.environ)
    try:
        lines = commands(env)
    except EntrypointError as exc:
        print(f"entrypoint: {exc}", file=sys.stderr)
        return 2
    if argv[:1] == ["--print"]:
        for line in lines:
            print(shlex.join(line))
        return 0
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if env["CONFIDE_ROLE"] == "prepare":
        return prepare(env, lines)
    print("entrypoint: " + shlex.join(lines[0]), flush=True)
    line = _argv(lines[0])
    os.execv(line[0], line)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
