"""The built wheel holds one top-level package, ``confide``, and works from an installed copy
outside the checkout: the public API imports and the ``confide`` command runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git knows (tracked, or new and not ignored), so nothing
    left in the checkout (a stale build/, runs/) can end up in it."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], check=True, timeout=600)
    (path,) = out.glob("confide-*.whl")
    return path


def test_the_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"confide", wheel.name.split("-py3")[0] + ".dist-info"}, top
    # the wire contract and every part ship inside it
    for part in ("v1/coordinator_pb2.py", "v1/coordinator.proto", "protos/codec.py",
                 "node/worker.py", "coordinator/service.py", "sdk/client.py", "cli/main.py",
                 # the dashboard's page and its vendored chart library (package data)
                 "coordinator/dashboard/static/index.html",
                 "coordinator/dashboard/static/dashboard.js",
                 "coordinator/dashboard/static/vendor/chart.umd.min.js",
                 "coordinator/dashboard/static/vendor/chart.js-LICENSE.md"):
        assert f"confide/{part}" in names, part


def test_an_installed_copy_outside_the_checkout_imports_the_public_api(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    code = ("import warnings, confide\n"
            "from confide import Client, AsyncClient, job_spec, ConfideError\n"
            f"assert confide.__file__.startswith({str(target)!r}), confide.__file__\n"
            "spec = job_spec('fedavg-lora', rounds=1, min_nodes=1)\n"
            "assert spec.method == 'fedavg-lora'\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    assert confide.SyncConfideClient is Client\n"
            "assert caught and caught[0].category is DeprecationWarning\n"
            "print(confide.__version__)\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    helped = subprocess.run([sys.executable, "-m", "confide.cli.main", "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "coordinator" in helped.stdout, helped.stderr
    benched = subprocess.run([sys.executable, "-m", "confide.cli.main", "bench", "--help"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert benched.returncode == 0 and "federated" in benched.stdout, benched.stderr
