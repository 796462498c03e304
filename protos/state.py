"""Names one exact global state on the wire.

The coordinator and a node compare digests to tell they hold the same bits of a global state
(``Task.global_digest``, ``Task.global_base_digest``); a node that can build states itself
says so with ``STATE_DIGEST_FEATURE`` in its ``NodeInfo.features``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import torch

STATE_DIGEST_FEATURE = "state-digest"
"""``NodeInfo.features`` entry of a node that builds global states itself (the seeded first
round, compact broadcasts) and checks them against ``Task.global_digest``."""


def state_digest(state: Mapping[str, torch.Tensor], person: bytes = b"confide-state") -> bytes:
    """BLAKE2b-256 of a state's names, dtypes, shapes and bytes (sorted by name), with
    ``person`` for domain separation: names one exact global state, so a node and the
    coordinator can tell they hold the same bits."""
    h = hashlib.blake2b(digest_size=32, person=person)
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}".encode()
        h.update(struct.pack("<Q", len(header)) + header)
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.digest()
