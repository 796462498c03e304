"""Compute-device selection for node-side training and inference.

A node runs wherever its owner runs it: a laptop without a GPU, a workstation with one, a
container that hides some GPUs through ``CUDA_VISIBLE_DEVICES``. Jobs therefore name a device
*preference* ("auto", "cpu", "cuda", "cuda:N") and the node resolves it here, failing early with a
message a person can act on rather than deep inside a training step.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

__all__ = ["autocast", "autocast_dtype", "bf16_autocast", "seeded_rng", "select_device"]

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def select_device(preference: str = "auto") -> torch.device:
    """Resolve a device preference to a ``torch.device``.

    ``"auto"`` picks CUDA when torch can use it and the CPU otherwise, so the same job
    description runs on every node. An explicit ``"cuda"`` / ``"cuda:N"`` is a promise the caller
    relies on (for timings, memory), so it is an error, not a silent CPU fallback, when it cannot
    be honoured.
    """
    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(pref)
    if match is None:
        raise ValueError(
            f"unknown device {preference!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N' "
            "(N = index of a visible GPU)"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {preference!r} was requested but CUDA is not available to this process "
            f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'}); "
            "use device 'auto' or 'cpu', or install a CUDA build of torch on a machine with a GPU"
        )
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"device {preference!r} was requested but only {count} CUDA device(s) are visible "
            f"(valid: cuda:0..cuda:{count - 1}); check CUDA_VISIBLE_DEVICES or pick a lower index"
        )
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced-precision dtype used for mixed precision on ``device``, or None for none.

    bf16 keeps fp32's exponent range, so it needs no loss scaling; GPUs without bf16 fall back to
    fp16 (and the trainer then uses a gradient scaler). CPU training stays in fp32: CPU autocast
    is slower than fp32 on most CPUs and only risks accuracy.
    """
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A mixed-precision context for forward passes on ``device`` (a no-op on CPU)."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """``autocast`` minus fp16: bf16 on GPUs that have it, else float32. For a model split
    between parties, whose fp16 loss scaling would have to cross the seam."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """torch's RNG (and ``device``'s CUDA RNG) seeded with ``seed`` inside, the caller's
    random state untouched outside: dropout in a training round is reproducible."""
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
