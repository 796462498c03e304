"""Fixed-point encoding into the ring Z_{2^bits} and the mask PRG of secure aggregation.

Encoding (:class:`FixedPointCodec`). A node's float update ``x`` (entries within
``|x| <= clip``) and its integer weight ``w`` (its example count, 1 for an unweighted mean) become
one ring vector of ``dim + 1`` elements::

    [ round(w * x_1 * 2^f), ..., round(w * x_dim * 2^f), w ]   mod 2^bits

so the masked sum hands the coordinator ``sum_i w_i x_i`` and ``sum_i w_i`` and nothing per node:
the weighted mean without the individual weights (the example counts stay inside the masked
vector). Negative values are two's complement in the ring; the sum is read back as a signed
integer and divided by ``2^f``.

* Quantization step: ``step = 2^-f``. Each node's entry is rounded to the nearest multiple of
  ``step`` (error <= step / 2), so the decoded weighted sum over ``n`` nodes is within
  ``n * step / 2`` of the exact one and the weighted mean within ``n * step / (2 * sum w)``;
  values that are multiples of ``step`` (and integers with ``f = 0``) come back exactly.
* Overflow bound: the sum is exact only while it never leaves ``(-2^(bits-1), 2^(bits-1))``.
  With at most ``max_nodes`` nodes, ``0 <= w <= max_weight`` and ``|x| <= clip``, every entry of
  the sum is bounded by ``max_nodes * (max_weight * clip * 2^f + 1/2)`` and the weight slot by
  ``max_nodes * max_weight``; the codec refuses parameters where either reaches ``2^(bits-1)``,
  and refuses at encoding time a weight or value outside its bounds (never a silent clip: a
  clipped update is the caller's decision, e.g. DP-LoRA's). :meth:`FixedPointCodec.for_bounds`
  picks the finest step that fits. A per-entry product above 2^53 is refused too (float64 would
  round it before we do).

PRG (:func:`prg_ring_elements`). A 32-byte seed keys ChaCha20 (``cryptography``; RFC 7539's
cipher with a zero nonce, which is safe because every seed is used for exactly one expansion: the
self-mask seed is fresh per round and pairwise seeds come from per-round keys through HKDF with
the job and round in its info). The keystream read as little-endian ``bits``-bit words is the
mask: uniform on the ring since ``2^bits`` divides ``2^32``/``2^64`` exactly. ChaCha20 expands
~1 MiB in 0.2 ms here, so PRG cost is small against the network.

Masks: ``y_i = encode(x_i) + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(s_ij)`` with
``sign(i, j) = +1`` if ``i`` sorts before ``j`` and ``-1`` otherwise, so every pair's masks cancel
in the sum (:func:`pairwise_sign`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from confide.privacy.secagg.errors import SecAggError

__all__ = [
    "SEED_BYTES",
    "FixedPointCodec",
    "MaskingError",
    "pairwise_sign",
    "prg_ring_elements",
]

SEED_BYTES = 32
_ZERO_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter (0) + 12-byte nonce (0)
_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SIGNED = {32: np.dtype("<i4"), 64: np.dtype("<i8")}


class MaskingError(SecAggError, ValueError):
    """Codec parameters that could overflow, or an input outside the codec's bounds."""


def prg_ring_elements(seed: bytes, count: int, bits: int) -> np.ndarray:
    """``count`` uniform elements of Z_{2^bits} (uint32/uint64) from ChaCha20 keyed by ``seed``."""
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise MaskingError(f"a PRG seed is {SEED_BYTES} bytes")
    if bits not in _DTYPES or count < 0:
        raise MaskingError("bits is 32 or 64, count >= 0")
    width = bits // 8
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(count * width))
    return np.frombuffer(stream, dtype=_DTYPES[bits]).copy()


def pairwise_sign(me: str, peer: str) -> int:
    """+1 if ``me`` sorts before ``peer``, else -1: the two ends of a pair add opposite masks."""
    if me == peer:
        raise MaskingError("no pairwise mask with oneself")
    return 1 if me < peer else -1


@dataclass(frozen=True)
class FixedPointCodec:
    """Floats and weights <-> ring vectors of ``dim + 1`` elements (layout in the module doc).

    ``max_nodes`` is the most inputs ever summed (the round's participants), ``max_weight`` the
    largest weight a node may use, ``clip`` the largest ``|x|``; ``frac_bits`` ``f`` sets the
    step ``2^-f``. Construction checks the overflow bound and raises :class:`MaskingError`.
    """

    bits: int
    frac_bits: int
    clip: float
    max_weight: int
    max_nodes: int

    def __post_init__(self) -> None:
        if self.bits not in _DTYPES:
            raise MaskingError("the ring is Z_{2^32} or Z_{2^64}")
        if not 0 <= self.frac_bits < self.bits:
            raise MaskingError(f"frac_bits must be in 0..{self.bits - 1}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise MaskingError("clip must be a positive finite bound on |x|")
        if self.max_weight < 1 or self.max_nodes < 1:
            raise MaskingError("max_weight and max_nodes are >= 1")
        limit = 2 ** (self.bits - 1)
        per_entry = self.max_weight * self.clip * 2.0**self.frac_bits
        if per_entry > 2.0**53:
            raise MaskingError("max_weight * clip * 2^frac_bits exceeds 2^53: float64 cannot "
                               "round it exactly; lower frac_bits")
        if self.max_nodes * (per_entry + 0.5) >= limit or self.max_nodes * self.max_weight >= limit:
            raise MaskingError(
                f"overflow: {self.max_nodes} nodes x weight {self.max_weight} x |x| <= {self.clip}"
                f" at step 2^-{self.frac_bits} can reach 2^{self.bits - 1}; use more bits, a "
                "coarser step (for_bounds picks one), a smaller clip or smaller weights")

    @classmethod
    def for_bounds(cls, *, max_nodes: int, max_weight: int, clip: float,
                   bits: int = 32) -> FixedPointCodec:
        """The codec with the finest step whose sum cannot overflow (raises if none fits)."""
        for frac_bits in range(min(bits - 1, 53), -1, -1):
            try:
                return cls(bits, frac_bits, clip, max_weight, max_nodes)
            except MaskingError:
                continue
        raise MaskingError(f"no step fits {max_nodes} nodes x weight {max_weight} x clip {clip} "
                           f"in {bits} bits")

    @property
    def step(self) -> float:
        """The quantization step ``2^-frac_bits``."""
        return 2.0**-self.frac_bits

    @property
    def dtype(self) -> np.dtype:
        return _DTYPES[self.bits]

    @property
    def element_bytes(self) -> int:
        return self.bits // 8

    def encode(self, values: np.ndarray, weight: int = 1) -> np.ndarray:
        """``[round(w x 2^f) ..., w]`` in the ring (dtype uint32/uint64)."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
            raise MaskingError("the weight is an integer (an example count, or 1)")
        if not 0 <= weight <= self.max_weight:
            raise MaskingError(f"weight {weight} outside 0..{self.max_weight}")
        if not np.all(np.isfinite(x)):
            raise MaskingError("the update holds NaN or infinity")
        if x.size and float(np.max(np.abs(x))) > self.clip:
            raise MaskingError(f"an entry exceeds the codec's clip {self.clip}; clip the update "
                               "first (the overflow bound depends on it)")
        scaled = np.rint(x * (int(weight) * 2.0**self.frac_bits)).astype(np.int64)
        return self._ring_vector(scaled, int(weight))

    @property
    def bound_units(self) -> int:
        """The largest ``|entry|`` of a weight-1 input in ring units (``clip * 2^f``)."""
        return math.floor(self.clip * 2.0**self.frac_bits)

    def encode_units(self, units: np.ndarray) -> np.ndarray:
        """A weight-1 input already in ring units (int64: e.g. rounded and noised by the node,
        ``distributed_dp``), each within :attr:`bound_units` so the overflow bound holds."""
        u = np.asarray(units).reshape(-1)
        if u.dtype != np.int64:
            raise MaskingError("ring units are int64")
        if u.size and int(np.max(np.abs(u))) > self.bound_units:
            raise MaskingError(f"an entry exceeds the codec's bound of {self.bound_units} "
                               "units (the overflow bound depends on it)")
        return self._ring_vector(u, 1)

    def _ring_vector(self, scaled: np.ndarray, weight: int) -> np.ndarray:
        out = np.empty(scaled.size + 1, dtype=self.dtype)
        out[:-1] = scaled.astype(self.dtype)  # two's complement: wraps negatives into the ring
        out[-1] = weight
        return out

    def decode_sum(self, ring_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """``(sum_i w_i x_i as float64, sum_i w_i)`` from the unmasked ring sum."""
        total = np.asarray(ring_sum, dtype=self.dtype)
        signed = total.view(_SIGNED[self.bits])
        return signed[:-1].astype(np.float64) * self.step, int(signed[-1])
