"""Trainable state: what leaves a trainer, what a round's global state loads into it, and
the safetensors files it is kept in (never pickles).

Every trainer exposes the same shape of state: CPU float32 copies of exactly its trainable
tensors, under stable sorted names, which is what the wire codec and the aggregators expect;
and every trainer loads a state strictly (a partial or reshaped state means the sender built
a different model, and training from it would silently start from a wrong point).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["check_state", "copy_into", "cpu_copies", "load_state_file", "save_state_file"]


def cpu_copies(tensors: Mapping[str, torch.Tensor],
               names: Sequence[str]) -> dict[str, torch.Tensor]:
    """CPU float32 copies of ``tensors[name]`` for each of ``names``, in that order."""
    return {
        name: tensors[name].detach().to(device="cpu", dtype=torch.float32).clone()
        for name in names
    }


def check_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                what: str) -> None:
    """ValueError unless ``state`` has exactly the names of ``shapes``, each of its shape.
    ``what`` names the model in the message (the sender built another one)."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"trainable state does not match {what}: missing {_preview(missing)}, "
            f"unexpected {_preview(unexpected)}"
        )
    wrong = [
        f"{name}: got {tuple(state[name].shape)}, expected {shape}"
        for name, shape in shapes.items()
        if tuple(state[name].shape) != shape
    ]
    if wrong:
        raise ValueError(f"trainable state has wrong shapes: {_preview(wrong)}")


def copy_into(params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the live tensors ``params`` (their device and dtype), no autograd."""
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].detach().to(device=param.device, dtype=param.dtype))


def save_state_file(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file (on the CPU), in sorted key order."""
    loaded = load_file(str(path), device="cpu")
    return {name: loaded[name] for name in sorted(loaded)}


def _preview(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"
