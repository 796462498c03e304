"""The dependency direction of docs/ARCHITECTURE.md, enforced: a new import that breaks it fails.

Every module of ours is imported through the one namespace, ``confide.<part>``; the parts are
the repository's top-level folders (setup.py maps them), and ``confide.v1`` is the generated
code of the wire contract, part of ``protos``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the folders that install as ``confide.<folder>``
PARTS = {"protos", "node", "coordinator", "privacy", "agents", "sdk", "cluster", "cli", "bench"}
#: top-level names that must never be imported bare (they would be someone else's module)
BARE = PARTS | {"client", "v1"}
#: the library layers; the tools on top (cli, docker) may use all of them
LIBRARY = {"protos", "privacy", "agents", "node", "coordinator", "sdk", "cluster"}
ALLOWED = {
    "protos": {"protos"},
    "privacy": {"privacy"},
    "agents": {"agents", "protos"},
    # (a node's agent looks protocols up in the coordinator's registry through the SDK client,
    # which is the wire contract's typed face and imports only protos)
    "node": {"node", "protos", "privacy", "agents", "sdk.client"},
    # the coordinator may use the pure method modules, never the daemon's internals
    "coordinator": {"coordinator", "protos", "privacy", "agents", "node.methods"},
    # ... so the method modules must stay pure themselves
    "node/methods": {"node.methods", "protos", "privacy"},
    # what a user's code calls: the coordinator client, the data owner's private inference
    "sdk": {"sdk", "protos", "privacy", "node"},
    "sdk/client.py": {"protos"},
    # ... and the simulation's face: a user's code runs `confide simulate` through the SDK;
    # cluster.simulate is built on sdk.client only, never on this module (no import cycle)
    "sdk/simulation.py": {"sdk", "protos", "privacy", "node", "cluster.simulate"},
    # running Confide as local processes (LocalCluster, experiments): demo, benchmarks, tests
    "cluster": {"cluster", "sdk", "protos", "privacy", "agents", "node", "coordinator"},
    # benchmarks are built on the library, never on the command line (no cli <-> bench loop)
    "bench": LIBRARY | {"bench"},
    # the top: `confide ...` (it runs the benchmarks) and the container scripts
    "cli": LIBRARY | {"cli", "bench"},
    "docker": LIBRARY | {"cli", "bench"},
    # the public API re-exports the SDK
    "confide": {"sdk"},
}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(our modules this file imports, as ``part.module`` without the ``confide.`` prefix;
    bare imports of our part names, which are always wrong)"""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    ours = set()
    for name in names:
        if name.startswith("confide."):
            rest = name.removeprefix("confide.")
            ours.add("protos" if rest == "v1" or rest.startswith("v1.") else rest)
    bare = {n for n in names if n.split(".")[0] in BARE}
    return ours, bare


def python_files(package: str):
    if package.endswith(".py"):
        yield ROOT / package
        return
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "node" and "methods" in path.parts:
            continue  # checked on its own, more strictly
        if str(path.relative_to(ROOT)) in ALLOWED:
            continue  # a file with its own rule is checked by that rule
        yield path


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_dependency_direction(package):
    allowed = ALLOWED[package]
    violations = []
    for path in python_files(package):
        ours, _ = imports_of(path)
        for name in sorted(ours):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                violations.append(f"{path.relative_to(ROOT)} imports confide.{name}")
    assert not violations, "\n".join(violations)


def test_nothing_in_cluster_imports_the_sdk_simulation_face():
    """sdk.simulation imports cluster.simulate: the other way would be a loop."""
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "cluster").rglob("*.py"))
                 if any(n == "sdk.simulation" or n.startswith("sdk.simulation.")
                        for n in imports_of(path)[0])]
    assert not offenders, offenders


def test_every_import_goes_through_the_confide_namespace():
    bare = []
    for folder in sorted({*ALLOWED, "tests", "scripts"}):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bare += [f"{path.relative_to(ROOT)} imports {n}" for n in imports_of(path)[1]]
    assert not bare, "\n".join(bare)


def test_every_folder_is_a_mapped_part():
    """A new top-level package folder must be added to setup.py (and to PARTS here)."""
    setup_py = (ROOT / "setup.py").read_text()
    for folder in sorted(PARTS):
        assert f'"{folder}"' in setup_py, folder
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages <= PARTS | {"confide", "tests"}, packages - PARTS


def test_no_pickle_or_torch_load_in_package_code():
    offenders = []
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for needle in ("import pickle", "torch.load(", "import dill"):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
