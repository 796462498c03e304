"""The unit tests on each supported Python, inside containers built by docker/Dockerfile from a
base with that Python: Debian 12 (3.11) and Debian 13 (3.13) minbase images by default
(``debootstrap --variant=minbase`` + ``docker import``, docker/README.md). Where Docker or a
base image is missing the test skips and says which. First build of the 3.13 image: ~10 min
(PyPI's torch for 3.13 is the CUDA build: ~2.7 GB of downloads); later builds reuse the layers.

Knobs: CONFIDE_TEST_PY311_BASE / CONFIDE_TEST_PY313_BASE (base images), CONFIDE_BUILD_NETWORK
(``host`` by default: a bridge with no NAT reaches no index), CONFIDE_TORCH_INDEX_URL (e.g.
https://download.pytorch.org/whl/cpu for the CPU build of torch where that index is reachable).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

VERSIONS = {  # version -> (the base image's variable, its default, the interpreter)
    "3.11": ("CONFIDE_TEST_PY311_BASE", "local/py311-bookworm:base", "python3.11"),
    "3.13": ("CONFIDE_TEST_PY313_BASE", "local/py313-trixie:base", "python3.13"),
}


def _docker_missing() -> str:
    if shutil.which("docker") is None:
        return "no docker command (docker/README.md: an engine on a Debian machine)"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode:
        return "no Docker engine reachable ('docker info' fails)"
    return ""


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_the_unit_tests_pass_in_a_container(version):
    missing = _docker_missing()
    if missing:
        pytest.skip(missing)
    variable, default, python = VERSIONS[version]
    base = os.environ.get(variable, default)
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True,
                      timeout=60).returncode:
        pytest.skip(f"no base image {base} for Python {version} (set {variable}, or make one: "
                    "docker/README.md)")
    tag = f"confide-test:py{version.replace('.', '')}"
    build = subprocess.run(
        ["docker", "build", "-f", "docker/Dockerfile", "-t", tag,
         "--network", os.environ.get("CONFIDE_BUILD_NETWORK", "host"),
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"PYTHON={python}",
         "--build-arg", f"TORCH_INDEX_URL={os.environ.get('CONFIDE_TORCH_INDEX_URL', '')}",
         "."], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", tag, "-c",
         "python --version && python -m pytest -p no:cacheprovider -q -m 'not integration' "
         "--basetemp=/tmp/pt tests/unit"], capture_output=True, text=True, timeout=1200)
    out = run.stdout + run.stderr
    assert out.startswith(f"Python {version}."), out[:200]
    summary = out.strip().splitlines()[-1]
    print(f"Python {version} ({base}): {summary}")
    assert run.returncode == 0, out[-4000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary
