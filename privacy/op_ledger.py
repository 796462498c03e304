"""Per-operation accounting of a two-party forward pass: bytes, rounds and seconds by step.

CrypTen counts one party's communication as running totals (``privacy.mpc.comm_stats``). The
ledger reads them before and after each labelled step of the private forward and charges the
difference to ``(op, layer)``; every communicating step of ``privacy.aero_2pc._forward`` runs
inside a scope, so the entries add up to the party's total (``unaccounted`` says by how much
they do not: the test asserts zero). Scopes do not nest: a step is charged once.

The operation names (``OPS``) follow the cost structure of a decoder under 2PC: the input
encoding and the embedding (proportional to the vocabulary), the attention projections, the
scores ``q k^T``, the softmax's row max (comparisons), exponential and reciprocal, the context
``probs v`` with the output projection, LayerNorm, GELU, the FFN's matrix products and the head.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from confide.privacy.mpc import CommStats

OPS = (
    "input", "embedding", "qkv", "attn_scores", "softmax_max", "softmax_exp",
    "softmax_reciprocal", "attn_context", "layernorm", "gelu", "ffn", "head", "output",
)
"""Every label a scope may carry, in the order a forward meets them (tables and charts use it)."""

FIXED = -1
"""The ``layer`` of steps outside the blocks (input, embedding, head, output)."""


@dataclass
class OpLedger:
    """One party's bytes, rounds and seconds per ``(op, layer)`` of a forward pass.

    ``read`` returns the party's running :class:`CommStats` (``privacy.mpc.comm_stats`` inside
    a session; a test may pass its own counter).
    """

    read: Callable[[], CommStats]
    entries: dict[tuple[str, int], CommStats] = field(default_factory=dict)
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    start: CommStats | None = None
    _open: bool = False

    def begin(self) -> None:
        """Mark the start of the forward (the reference ``unaccounted`` is measured from)."""
        self.start = self.read()

    @contextlib.contextmanager
    def scope(self, op: str, layer: int = FIXED) -> Iterator[None]:
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}: use one of {OPS}")
        if self._open:
            raise RuntimeError("ledger scopes do not nest: a step is charged once")
        self._open = True
        before, t0 = self.read(), time.perf_counter()
        try:
            yield
        finally:
            self._open = False
            key = (op, layer)
            self.entries[key] = self.entries.get(key, CommStats()) + (self.read() - before)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def total(self) -> CommStats:
        out = CommStats()
        for stats in self.entries.values():
            out = out + stats
        return out

    def unaccounted(self) -> CommStats:
        """What the party communicated since :meth:`begin` outside every scope."""
        if self.start is None:
            raise RuntimeError("call begin() before the forward")
        return self.read() - self.start - self.total()

    def by_op(self) -> dict[str, dict[str, float]]:
        """Bytes, rounds and seconds per operation, summed over layers, in ``OPS`` order."""
        out: dict[str, dict[str, float]] = {}
        for op in OPS:
            keys = [k for k in self.entries if k[0] == op]
            if not keys:
                continue
            stats = sum((self.entries[k] for k in keys), CommStats())
            out[op] = {"bytes": stats.bytes, "rounds": stats.rounds,
                       "seconds": sum(self.seconds[k] for k in keys)}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per (op, layer) entries, per-op sums and the unaccounted remainder."""
        rows = [{"op": op, "layer": layer, "bytes": s.bytes, "rounds": s.rounds,
                 "seconds": self.seconds[(op, layer)]}
                for (op, layer), s in sorted(self.entries.items(),
                                             key=lambda kv: (kv[0][1], OPS.index(kv[0][0])))]
        left = self.unaccounted() if self.start is not None else CommStats()
        return {"entries": rows, "by_op": self.by_op(),
                "unaccounted": {"bytes": left.bytes, "rounds": left.rounds}}


class NoLedger:
    """The plaintext forward's stand-in: scopes that record nothing."""

    @staticmethod
    @contextlib.contextmanager
    def scope(op: str, layer: int = FIXED) -> Iterator[None]:
        yield
