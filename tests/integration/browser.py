"""Headless Chromium for the browser tests: the distribution's build (Playwright's own browser
download is not reachable here), installed with apt when it is missing and we may."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium_path(install: bool = True) -> str:
    """A Chromium executable, apt-installing Debian's when there is none and this is root;
    skips the test (with the reason) only when none can be had."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                        "(requirements/pinned.txt; scripts/setup.sh installs it)")
    found = os.environ.get("CONFIDE_CHROMIUM") or next(
        (path for path in CANDIDATES if Path(path).exists()), "")
    if found:
        return found
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                     "fonts-liberation"]):
            if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode:
                break
        return chromium_path(install=False)
    pytest.skip("no Chromium: install it (`apt-get install chromium`, as root) or point "
                "CONFIDE_CHROMIUM at one; scripts/setup.sh does this when it can")
    raise AssertionError("unreachable")
