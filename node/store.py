"""The node's model store: per-job safetensors files in the node's data directory.

``global`` is the last global state received from the coordinator, ``local`` the state after
local training, ``memory`` what a method keeps between rounds at the node (e.g. error-feedback
residuals); for decentralized jobs (DIMAT: there is no global state) ``shared`` the model
trained in the latest round, which the node's peer service hands to its neighbours, and ``own``
the model after its last merge. Only ``global`` and ``shared`` are ever served to peers. Metadata
(e.g. the round) is stored in the safetensors header. Writes are
atomic (temporary file, then rename): a crash never leaves half a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

KINDS = ("global", "local", "memory", "own", "shared")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, job_id: str, kind: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ValueError(f"invalid job id {job_id[:64]!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")
        return self.root / job_id / f"{kind}.safetensors"

    def save(self, job_id: str, kind: str, state: dict[str, torch.Tensor],
             metadata: dict[str, str] | None = None) -> Path:
        path = self.path(job_id, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, path)
        return path

    def load(self, job_id: str, kind: str) -> dict[str, torch.Tensor] | None:
        path = self.path(job_id, kind)
        return load_file(str(path)) if path.exists() else None

    def metadata(self, job_id: str, kind: str) -> dict[str, str] | None:
        """The metadata saved with a state (None when there is no such state)."""
        path = self.path(job_id, kind)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
