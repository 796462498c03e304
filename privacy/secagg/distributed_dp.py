"""Distributed differential privacy under secure aggregation: the distributed discrete Gaussian.

With node-level DP and secure aggregation, nobody may see an un-noised update, not even the
sum: so each node adds a share of the noise itself, in the integer ring where the masking
happens, and the coordinator unmasks a sum that is already noised. The mechanism is the
distributed discrete Gaussian (DDG) of Kairouz, Liu and Steinke, "The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation" (ICML 2021):

    node i (values x_i with ||x_i||_2 <= C, the ring's step gamma = 2^-frac_bits):
        1. u_i = randomized_round(x_i / gamma)       (unbiased; ||u_i||_2 <= C/gamma + sqrt(d))
        2. y_i = u_i + N_Z(0, s^2)^d                 (discrete Gaussian, s = z * D / sqrt(t))
    coordinator: sum_i y_i (unmasked), times gamma

where D = C/gamma + sqrt(d) bounds the L2 sensitivity in ring units after rounding, t is the
secure-aggregation threshold (the fewest inputs any unmasked sum holds) and z the job's noise
multiplier. A sum of m >= t such inputs carries the sum of m discrete Gaussians, which their
Theorem 1 shows is close to one discrete Gaussian of variance m s^2: the release satisfies
(1/2) eps^2-concentrated DP with

    eps = min( sqrt(D^2 / (m s^2) + tau d / 2),  D / (sqrt(m) s) + tau sqrt(d) ),
    tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 s^2 k / (k + 1)),

so with m >= t, D / (sqrt(m) s) <= 1/z: the Gaussian mechanism's noise multiplier z, up to the
tau term (reported, and refused unless negligible; with the ring's fine steps s is ~10^6 and
tau underflows to 0). Dropouts: the noise is calibrated for t survivors; more survivors add
more noise than needed (utility, not privacy); fewer cannot be unmasked at all.

The sampler is Canonne, Kamath and Steinke's (NeurIPS 2020) rejection from a discrete Laplace,
vectorized with numpy's generator seeded from the OS (their exact Bernoulli(exp(-x)) sampler
is replaced by floating-point exp, as in practical implementations: a documented deviation).
Noise is truncated at ``tail`` standard deviations (resampled beyond), so the ring's overflow
bound holds; that changes the distribution by at most d * 2 exp(-tail^2 / 2) in total
variation (about 1e-9 for d = 10^5 at tail 8), which adds to delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from confide.privacy.secagg.errors import SecAggError

__all__ = [
    "DistributedDPError",
    "DistributedGaussian",
    "discrete_gaussian",
    "randomized_round",
]

#: refuse a configuration whose tau term would cost more than this in eps (per round)
MAX_TAU_COST = 1e-9


class DistributedDPError(SecAggError, ValueError):
    """The distributed-noise configuration cannot give its guarantee (or a bad input)."""


def randomized_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each entry to floor or ceil with the probabilities that keep it unbiased (int64)."""
    x = np.asarray(x, dtype=np.float64)
    floor = np.floor(x)
    up = rng.random(x.shape) < (x - floor)
    return (floor + up).astype(np.int64)


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of N_Z(0, sigma^2): P(k) proportional to exp(-k^2 / (2 sigma^2)), by
    rejection from the discrete Laplace of scale t = floor(sigma) + 1 (Canonne et al. 2020,
    Algorithm 3), vectorized: the rejected entries are drawn again."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise DistributedDPError(f"sigma must be a positive finite number, got {sigma}")
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # the geometric's success probability: 1 - exp(-1/t)
    while pending.size:
        n = pending.size
        # discrete Laplace(t): the difference of two geometric variables on {0, 1, ...}
        y = (rng.geometric(p, n) - 1) - (rng.geometric(p, n) - 1)
        accept = rng.random(n) < np.exp(-((np.abs(y) - sigma * sigma / t) ** 2)
                                        / (2.0 * sigma * sigma))
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out


@dataclass(frozen=True)
class DistributedGaussian:
    """One round's distributed noise: the job's noise multiplier ``z`` and L2 clip ``C``, and
    the secure-aggregation threshold ``t`` (the fewest inputs an unmasked sum holds)."""

    noise_multiplier: float
    l2_clip: float
    min_summands: int
    tail: float = 8.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise DistributedDPError("distributed noise needs a noise multiplier > 0")
        if not (math.isfinite(self.l2_clip) and self.l2_clip > 0):
            raise DistributedDPError("the L2 clip must be a positive finite number")
        if self.min_summands < 1:
            raise DistributedDPError("the threshold (fewest summands) is at least 1")

    def sensitivity(self, step: float, dim: int) -> float:
        """D: the L2 bound of a rounded input in ring units (C / step + sqrt(d))."""
        return self.l2_clip / step + math.sqrt(dim)

    def node_sigma(self, step: float, dim: int) -> float:
        """s: each node's discrete-Gaussian parameter in ring units."""
        return self.noise_multiplier * self.sensitivity(step, dim) / math.sqrt(self.min_summands)

    def tau(self, step: float, dim: int, summands: int | None = None) -> float:
        """Kairouz et al.'s tau for a sum of ``summands`` (default t) node noises."""
        m = summands or self.min_summands
        s2 = self.node_sigma(step, dim) ** 2
        return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, m))

    def epsilon_cdp(self, step: float, dim: int, summands: int | None = None) -> float:
        """eps of the (1/2) eps^2-CDP the unmasked sum of ``summands`` (>= t) inputs gets."""
        m = summands or self.min_summands
        if m < self.min_summands:
            raise DistributedDPError(f"a sum of {m} < t = {self.min_summands} inputs is never "
                                     "unmasked")
        d_units, s = self.sensitivity(step, dim), self.node_sigma(step, dim)
        tau = self.tau(step, dim, m)
        return min(math.sqrt(d_units**2 / (m * s * s) + tau * dim / 2.0),
                   d_units / (math.sqrt(m) * s) + tau * math.sqrt(dim))

    def effective_noise_multiplier(self, step: float, dim: int) -> float:
        """The Gaussian noise multiplier with the same CDP (1 / eps); refuses a grid so coarse
        that tau costs more than :data:`MAX_TAU_COST`."""
        eps = self.epsilon_cdp(step, dim)
        if eps - 1.0 / self.noise_multiplier > MAX_TAU_COST:
            raise DistributedDPError(
                f"the ring step {step:g} is too coarse for distributed noise: each node's "
                f"discrete Gaussian (s = {self.node_sigma(step, dim):.3g} steps) is too narrow "
                "for the sum to be close to one Gaussian; use a finer step (64-bit ring)")
        return 1.0 / eps

    def noised_input(self, values: np.ndarray, step: float, bound_units: int,
                     rng: np.random.Generator) -> np.ndarray:
        """Node side: ``randomized_round(values / step)`` plus this node's noise share, as
        int64 ring units; each entry stays within ``bound_units`` (noise beyond ``tail``
        standard deviations is drawn again; an update without that headroom is refused)."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise DistributedDPError("the update holds NaN or infinity")
        norm = float(np.linalg.norm(x))
        if norm > self.l2_clip * (1 + 1e-9):
            raise DistributedDPError(f"the update's L2 norm {norm:.6g} exceeds the clip "
                                     f"{self.l2_clip}: clip it first")
        dim = x.size
        self.effective_noise_multiplier(step, dim)  # refuses a grid too coarse
        sigma = self.node_sigma(step, dim)
        rounded = randomized_round(x / step, rng)
        if float(np.max(np.abs(rounded), initial=0)) + self.tail * sigma > bound_units:
            raise DistributedDPError(
                f"the ring's per-entry bound ({bound_units} steps) leaves no room for "
                f"{self.tail:g} standard deviations of noise ({sigma:.3g} steps) on this update")
        noise = discrete_gaussian(sigma, dim, rng)
        bad = np.flatnonzero(np.abs(noise) > self.tail * sigma)
        while bad.size:  # the truncated tail (module docstring): draw those again
            noise[bad] = discrete_gaussian(sigma, bad.size, rng)
            bad = bad[np.abs(noise[bad]) > self.tail * sigma]
        return rounded + noise
