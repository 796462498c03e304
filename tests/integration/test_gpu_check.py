"""scripts/gpu-check.sh: without CUDA it says so and exits 0; with one it times the GPU. Its
CPU arm (the same code the GPU arm runs, on another device) is run here either way, tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_gpu_check_says_no_cuda_or_times_it_and_its_cpu_arm_runs():
    import torch

    tiny = ("--steps", "1", "--batch", "2", "--max-length", "16")
    if not torch.cuda.is_available():
        done = _run(*tiny)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "no CUDA device" in done.stdout
    done = _run("--devices", "cpu", *tiny, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(r["workload"], r["device"]) for r in rows} == {("lora", "cpu"), ("split", "cpu")}
    assert all(r["s_per_step"] > 0 for r in rows)
