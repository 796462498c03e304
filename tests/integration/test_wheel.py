"""The built wheel holds one top-level package, ``confide``, and works from an installed copy
outside the checkout: the public API imports and the ``confide`` command runs. The sdist
(``python -m build``) carries what a build from it needs. A fresh venv outside the checkout,
with the wheel installed (``--no-deps``; the heavy dependencies are this interpreter's, put on
its path without running their .pth files), runs ``confide --help``, ``confide data bbc``, a
two-node job and imports the SDK, while an audit hook records every file it opens under the
checkout: there must be none."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path | None]:
    """The wheel and the sdist, built from a copy of the files git knows (tracked, or new and
    not ignored), so nothing left in the checkout (a stale build/, runs/) can end up in them.
    The sdist only where the ``build`` package is installed."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # the wheel with pip (no isolation: this interpreter's setuptools, offline; `build`'s
    # wheel step would need the `wheel` package beside setuptools < 70), the sdist with
    # `python -m build` where installed (requirements/pinned.txt)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], check=True, timeout=600)
    if importlib.util.find_spec("build") is not None:
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
                        "--sdist", "--outdir", str(out), str(source)], check=True, timeout=600,
                       capture_output=True)
    (wheel,) = out.glob("confide-*.whl")
    sdists = list(out.glob("confide-*.tar.gz"))
    return {"wheel": wheel, "sdist": sdists[0] if sdists else None}


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    return dist["wheel"]


def test_the_sdist_carries_the_sources(dist):
    if dist["sdist"] is None:
        pytest.skip("the `build` package is not installed: no sdist (pip install build)")
    with tarfile.open(dist["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for part in ("pyproject.toml", "setup.py", "README.md", "protos/confide/v1/coordinator.proto",
                 "protos/confide/v1/coordinator_pb2.py", "node/worker.py", "cli/main.py",
                 "sdk/client.py"):
        assert part in names, part


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


#: installed into the fresh venv: records (does not block) every file opened under the
#: checkout, in this process and in every daemon it starts (they run the venv's python)
_AUDIT = """
import os, sys
_ROOT = {root!r}
_DEPS = {deps!r}
_LOG = {log!r}
def _hook(event, args, _busy=[]):
    if event != "open" or _busy or not isinstance(args[0], (str, bytes)):
        return
    path = os.fsdecode(args[0])
    full = os.path.abspath(path)
    if full.startswith(_ROOT + os.sep) and not full.startswith(_DEPS + os.sep):
        _busy.append(1)
        try:
            with open(_LOG, "a") as f:
                f.write(f"{{os.getpid()}} {{path}}\\n")
        finally:
            _busy.clear()
sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """A venv outside the checkout with the wheel installed (no dependencies), this
    interpreter's site-packages on its path (plain paths: their .pth files, which would put
    the checkout's editable install back, are not run), and the audit hook above."""
    home = tmp_path_factory.mktemp("user")
    env_dir, log = home / "venv", home / "checkout-reads.log"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    # the installed dependencies, wherever they are (the checkout's own .venv included: they
    # are packages, not the checkout's sources, and the audit hook leaves them out)
    deps = ROOT / ".venv"
    heavy = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()
             and (not p.startswith(str(ROOT)) or p.startswith(str(deps)))]
    (site / "zz_heavy_dependencies.pth").write_text("\n".join(heavy) + "\n")
    (site / "sitecustomize.py").write_text(textwrap.dedent(_AUDIT.format(
        root=str(ROOT), deps=str(deps), log=str(log))))
    return env_dir, log


def _run(venv_dir: Path, cwd: Path, *args: str, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("CONFIDE_")}
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.timeout(900)
def test_a_fresh_venv_runs_the_cli_a_job_and_the_sdk(venv, tmp_path):
    venv_dir, log = venv
    confide = str(venv_dir / "bin" / "confide")  # the console script the wheel declares
    python = str(venv_dir / "bin" / "python")
    out = _run(venv_dir, tmp_path, python, "-c", "import confide, confide.sdk.client as c; "
               "from confide import Client, job_spec; print(confide.__file__); "
               "print(job_spec('fedavg-lora', rounds=1).method)")
    assert out.splitlines()[0].startswith(str(venv_dir)), out
    assert out.splitlines()[1] == "fedavg-lora"
    assert "coordinator" in _run(venv_dir, tmp_path, confide, "--help")
    out = _run(venv_dir, tmp_path, confide, "data", "bbc", "--nodes", "2", "--out", "shards",
               "--max-per-node", "20")
    assert (tmp_path / "shards" / "node1" / "train.jsonl").is_file(), out
    # a two-node federated job through real daemons (coordinator + 2 nodes) of a few steps
    out = _run(venv_dir, tmp_path, confide, "demo", "--nodes", "2", "--rounds", "1",
               "--max-steps", "2", "--max-per-node", "16", "--max-length", "32",
               "--test-size", "16", "--workdir", "demo", timeout=840)
    assert "COMPLETED" in out or "completed" in out, out
    assert "held-out accuracy" in out, out
    reads = log.read_text() if log.exists() else ""
    assert not reads, f"the installed copy read files of the checkout:\n{reads[:2000]}"
