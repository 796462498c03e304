"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(p), p = 2^256 + 297.

Why a module of our own (the project rule: crypto from maintained libraries, or test vectors and a
reason). SecAgg shares two 32-byte secrets per node and neighbour: the self-mask seed ``b_i`` and
the X25519 mask secret key ``s_sk_i``. What the maintained options do, probed on this machine
(see ARCHITECTURE.md, "Secure-aggregation primitives"):

* pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` shares 16-byte secrets only (GF(2^128));
  a 32-byte secret would be two independent sharings glued together, ~0.19 s to combine at n=100;
* pyshamir (a port of HashiCorp Vault's) works byte by byte over GF(2^8), so n <= 255 and
  combining took ~5 s;
* the other PyPI packages named "shamir"/"secretsharing" are unmaintained since 2014-2021.

A prime field just above 2^256 holds every 32-byte secret as one field element, so one sharing is
one polynomial: splitting takes ~1 ms and combining ~1 ms at n=100, with Lagrange coefficients that
the server reuses for every secret revealed by the same set of survivors. The arithmetic is
Python's integers (``pow(x, -1, p)`` for inverses), about 30 lines; correctness is pinned by test
vectors in ``tests/unit/test_secagg_shamir.py`` (a fixed polynomial -> known shares -> the known
secret, including values that wrap around p) and the primality of p is checked there.

The scheme (Shamir 1979): to share ``s`` with threshold ``t`` among points ``x_1..x_n`` (distinct,
nonzero, < p), draw ``a_1..a_{t-1}`` uniformly from GF(p) with ``secrets.randbelow`` and hand
``y_j = f(x_j)``, ``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1} mod p``. Any ``t`` shares give
``s = f(0) = sum_j y_j * prod_{m != j} x_m / (x_m - x_j)`` (Lagrange at 0); any ``t - 1`` shares are
independent of ``s`` (information-theoretic).

What it does not do: authenticate shares. A wrong share gives a wrong secret, silently, unless the
caller can check the result (SecAgg checks a reconstructed ``s_sk`` against the advertised public
key; shares travel inside an AEAD, which authenticates them in transit). A combined value
>= 2^256 cannot be a 32-byte secret and is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "ShamirError",
    "combine",
    "evaluate_polynomial",
    "lagrange_at_zero",
    "split",
]

PRIME = 2**256 + 297
"""The field modulus: the smallest prime above 2^256 (checked in the tests)."""
SECRET_BYTES = 32
SHARE_BYTES = 33
"""A share value ``y < p`` needs 257 bits: 33 bytes big-endian on the wire."""


class ShamirError(ValueError):
    """Parameters or shares that cannot be used (a ValueError: bad input)."""


def _check_points(xs: Iterable[int]) -> list[int]:
    points = list(xs)
    for x in points:
        if not isinstance(x, int) or isinstance(x, bool) or not 0 < x < PRIME:
            raise ShamirError(f"share points are integers in 1..p-1, got {x!r}")
    if len(set(points)) != len(points):
        raise ShamirError("share points must be distinct")
    return points


def evaluate_polynomial(coefficients: Sequence[int], xs: Iterable[int]) -> dict[int, int]:
    """``{x: f(x) mod p}`` for ``f = coefficients[0] + coefficients[1] x + ...`` (Horner).

    :func:`split` with its random coefficients; public so the tests can pin known polynomials.
    """
    if not coefficients or any(not 0 <= c < PRIME for c in coefficients):
        raise ShamirError("coefficients are field elements 0..p-1, at least one")
    shares = {}
    for x in _check_points(xs):
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Share a 32-byte ``secret``: ``{x: y}`` for each point, any ``threshold`` of them recover it.

    ``threshold`` 1 hands the secret itself to everyone (allowed: it is what t=1 means).
    """
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ShamirError(f"the secret must be {SECRET_BYTES} bytes")
    points = _check_points(xs)
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold {threshold} must be in 1..{len(points)} (the share count)")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return evaluate_polynomial(coefficients, points)


def lagrange_at_zero(xs: Iterable[int]) -> dict[int, int]:
    """The Lagrange coefficients ``{x_j: prod_{m != j} x_m / (x_m - x_j) mod p}``.

    They depend only on the points, so a caller combining many secrets from the same senders
    computes them once (SecAgg's server does: one set per survivor set).
    """
    points = _check_points(xs)
    coefficients = {}
    for j in points:
        numerator, denominator = 1, 1
        for m in points:
            if m != j:
                numerator = numerator * m % PRIME
                denominator = denominator * (m - j) % PRIME
        coefficients[j] = numerator * pow(denominator, -1, PRIME) % PRIME
    return coefficients


def combine(shares: Mapping[int, int], threshold: int,
            coefficients: Mapping[int, int] | None = None) -> bytes:
    """The 32-byte secret from at least ``threshold`` shares ``{x: y}``.

    Uses exactly ``threshold`` shares (the smallest points, so a caller's cached ``coefficients``
    from :func:`lagrange_at_zero` of those points apply). With fewer shares it raises: less than
    the threshold reveals nothing, and guessing would hand back garbage.
    """
    if threshold < 1 or len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(_check_points(shares))[:threshold]
    for x in points:
        if not isinstance(shares[x], int) or not 0 <= shares[x] < PRIME:
            raise ShamirError("share values are field elements 0..p-1")
    if coefficients is None or set(coefficients) != set(points):
        coefficients = lagrange_at_zero(points)
    value = sum(shares[x] * coefficients[x] for x in points) % PRIME
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("the shares do not combine to a 32-byte secret (a share is wrong)")
    return value.to_bytes(SECRET_BYTES, "big")
