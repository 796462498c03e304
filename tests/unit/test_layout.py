"""The dependency direction of ARCHITECTURE.md, enforced: a new import that breaks it fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"protos", "node", "coordinator", "privacy", "agents", "cluster", "client", "cli", "bench",
        "docker", "tests"}
#: the library layers; the tools on top (cli, docker) may use all of them
LIBRARY = {"protos", "privacy", "agents", "node", "coordinator", "cluster", "client"}
ALLOWED = {
    "protos": {"protos"},
    "privacy": {"privacy"},
    "agents": {"agents", "protos"},
    "node": {"node", "protos", "privacy", "agents"},
    # the coordinator may use the pure method modules, never the daemon's internals
    "coordinator": {"coordinator", "protos", "privacy", "agents", "node.methods"},
    # ... so the method modules must stay pure themselves
    "node/methods": {"node.methods", "protos", "privacy"},
    # running Confide as local processes (LocalCluster, experiments): demo, benchmarks, tests
    "cluster": {"cluster", "protos", "privacy", "agents", "node", "coordinator"},
    # the data owner's side of private inference
    "client": {"client", "protos", "privacy", "node"},
    # benchmarks are built on the library, never on the command line (no cli <-> bench loop)
    "bench": LIBRARY | {"bench"},
    # the top: `confide ...` (it runs the benchmarks) and the container scripts
    "cli": LIBRARY | {"cli", "bench"},
    "docker": LIBRARY | {"cli", "bench"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in OURS}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_dependency_direction(package):
    allowed = ALLOWED[package]
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "node" and "methods" in path.parts:
            continue  # checked on its own, more strictly
        for name in imports_of(path):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_no_pickle_or_torch_load_in_package_code():
    offenders = []
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for needle in ("import pickle", "torch.load(", "import dill"):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
