"""Differential-privacy building blocks: clipping, Gaussian noise and privacy accounting.

Pure functions of tensors and numbers: no networking, no daemons, nothing from ``node``,
``coordinator`` or ``protos`` (the dependency rule in ARCHITECTURE.md). ``node.methods.dp_lora``
assembles them into DP-LoRA; anything else that needs DP (a benchmark, a future DP-SGD trainer)
can use them directly.

What is here:

* :func:`l2_norm` and :func:`clip_by_global_norm`: the L2 norm over *all* tensors of an update
  (one vector, as DP-FedAvg clips it), and the clipped copy whose norm never exceeds ``C``, also
  after rounding back to the tensors' dtype and for huge or tiny values (computed with a
  max-abs rescaling, so nothing overflows or underflows on the way).
* :func:`gaussian_noise_like`: N(0, std^2) noise shaped like an update, drawn on the CPU from a
  caller-supplied ``torch.Generator`` (reproducible in tests). :func:`secure_generator` seeds one
  from ``os.urandom`` for real use.
* :class:`RdpAccountant`: epsilon of the sampled Gaussian mechanism and the noise multiplier
  that reaches a target epsilon, computed by Google's ``dp-accounting`` (its RDP accountant and
  its ``calibrate_dp_mechanism``), not by formulas of our own; also epsilon of a composition of
  several such runs (:class:`SampledGaussian` events, e.g. every DP-SGD job on one dataset),
  composed exactly in RDP rather than by adding epsilons. dp-accounting logs an absl warning
  for every order whose series does not converge (hundreds per calibration); those are
  silenced while it runs (the orders are dropped from the minimum, which is what it says).

Known limits of the noise (stated, not hidden): the samples come from torch's Mersenne-Twister
generator and are floating-point Gaussians. Seeding from ``os.urandom`` makes the seed
unpredictable, but the generator is not a cryptographically secure one and floating-point
Gaussian samplers are known to leak through their low-order bits (Mironov 2012 for Laplace;
Holohan and Braghin 2021 for Gaussian). A deployment that must hold against such an attacker
should swap :func:`gaussian_noise_like` for a discrete Gaussian drawn from a CSPRNG.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    import dp_accounting

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "SampledGaussian",
    "clip_by_global_norm",
    "gaussian_noise_like",
    "l2_norm",
    "secure_generator",
]

DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)
"""The Renyi orders alpha the accountant evaluates: dp-accounting's own default set,
1.1, 1.2, ..., 10.9 (step 0.1), 11, 12, ..., 63, and 128, 256, 512, 1024 (156 orders). epsilon
is the minimum over them of the RDP-to-(epsilon, delta) conversion, so a finer or wider set can
only lower (tighten) the reported epsilon; this set covers the regime of interest (sigma around
0.5..50, epsilon around 0.1..100)."""

# --------------------------------------------------------------------------- norms and clipping


def _float64_values(tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    values = []
    for name, tensor in tensors.items():
        if tensor.dtype.is_complex:
            raise TypeError(f"tensor {name!r} is complex; DP clipping takes real tensors")
        value = tensor.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(value).all():
            raise ValueError(f"tensor {name!r} contains NaN or infinity; it cannot be clipped")
        values.append(value)
    return values


def _max_abs(values: Sequence[torch.Tensor]) -> float:
    return max((float(v.abs().max()) for v in values if v.numel()), default=0.0)


def _scaled_norm(values: Sequence[torch.Tensor], scale: float) -> float:
    """sqrt(sum((v / scale)^2)) over all values; with scale = max|v| every term is <= 1."""
    total = 0.0
    for v in values:
        if v.numel():
            total += float(torch.sum((v / scale) ** 2))
    return math.sqrt(total)


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The global L2 norm of all tensors taken as one vector, in float64.

    Computed as ``m * ||v / m||`` with ``m = max |v|``, so neither huge (1e300) nor tiny
    (subnormal) values overflow or underflow on the way. Raises ValueError for NaN/infinity.
    """
    values = _float64_values(tensors)
    peak = _max_abs(values)
    if peak == 0.0:
        return 0.0
    return peak * _scaled_norm(values, peak)


def clip_by_global_norm(
    tensors: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """Scale all tensors by one factor so that their global L2 norm is at most ``max_norm``.

    Returns the clipped copy (same names, shapes and dtypes, on the CPU) and the norm before
    clipping. The factor is ``min(1, C / norm)`` (DP-FedAvg's rule; the usual ``+ tiny`` in the
    denominator is not needed because it only divides when norm > C > 0), applied in float64
    as ``(v / m) * (C / ||v / m||)`` (m = max |v|) so it neither overflows nor underflows. If
    rounding back to a narrower dtype would push the norm above C by an ulp, the factor is
    shrunk until it does not: the result's norm never exceeds C (a property test checks it).
    """
    if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    max_norm = float(max_norm)
    values = _float64_values(tensors)
    names = list(tensors)
    dtypes = [t.dtype for t in tensors.values()]
    peak = _max_abs(values)
    norm = 0.0 if peak == 0.0 else peak * _scaled_norm(values, peak)
    if norm <= max_norm:
        return {name: t.detach().to("cpu").clone() for name, t in tensors.items()}, norm

    # scale = C / norm = (C / m) / ||v / m||, applied to v / m (max |v / m| = 1): no step
    # overflows or underflows. No "+ tiny" is needed: we only get here when norm > C > 0.
    unit = [v / peak for v in values]
    factor = max_norm / _scaled_norm(unit, 1.0)
    shrink = 0.0
    for _attempt in range(64):
        clipped = {
            name: (u * (factor * (1.0 - shrink))).to(dtype)
            for name, u, dtype in zip(names, unit, dtypes, strict=True)
        }
        if l2_norm(clipped) <= max_norm:
            return clipped, norm
        # rounding to the dtype overshot C; back off by a few ulps of that dtype, doubling
        eps = max((torch.finfo(d).eps for d in dtypes if d.is_floating_point), default=2.0**-52)
        shrink = min(1.0, 4 * eps if shrink == 0.0 else 2 * shrink)
    zeros = {name: torch.zeros_like(t, device="cpu") for name, t in tensors.items()}
    return zeros, norm


# --------------------------------------------------------------------------- noise


def secure_generator() -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with 64 bits from ``os.urandom``: nobody can predict or
    replay the noise it draws (see the module docstring for what it does not protect)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def gaussian_noise_like(
    tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) noise for every element of every tensor.

    Drawn on the CPU in float64 from ``generator`` (names in the mapping's order, so the same
    generator state gives the same noise), returned as float64 for float64 tensors and float32
    otherwise. Add it to the update in float64 or float32, then cast to the state's dtype.
    """
    if not (isinstance(std, int | float) and math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    noise = {}
    for name, tensor in tensors.items():
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        sample = torch.randn(tuple(tensor.shape), generator=generator, dtype=torch.float64)
        noise[name] = (sample * float(std)).to(dtype)
    return noise


# --------------------------------------------------------------------------- accounting


class SampledGaussian(NamedTuple):
    """One run of the Poisson-sampled Gaussian mechanism: ``steps`` steps at noise multiplier
    sigma and sampling rate q (a DP-SGD job on one dataset, or DP-FedAvg rounds)."""

    noise_multiplier: float
    sampling_rate: float
    steps: int


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Raise the ``absl`` logger to ERROR while dp-accounting runs: it warns once per RDP order
    whose series fails to converge ("Excluding this order from the epsilon computation"), which
    floods a calibration with hundreds of lines that say nothing actionable."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _sampled_gaussian(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    import dp_accounting  # here, not at the top: see _accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )


def _accounting():
    """dp-accounting's RDP accountant module, imported on first use: the library pulls in
    SciPy's signal processing (0.4 s of CPU), which every daemon would pay at start for jobs
    that may never be private. :data:`DEFAULT_ORDERS` is written out for the same reason (a
    unit test checks it against the library's set)."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return rdp_privacy_accountant


@functools.lru_cache(maxsize=4096)
def _epsilon(
    orders: tuple[float, ...],
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
) -> float:
    return _composed_epsilon(orders, ((noise_multiplier, sampling_rate, steps),), delta)


@functools.lru_cache(maxsize=1024)
def _composed_epsilon(
    orders: tuple[float, ...], events: tuple[tuple[float, float, int], ...], delta: float
) -> float:
    accountant = _accounting().RdpAccountant(list(orders))
    with _quiet_absl():
        for sigma, q, steps in events:
            accountant.compose(_sampled_gaussian(sigma, q, steps))
        return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def _calibrate(
    orders: tuple[float, ...],
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    tol: float,
) -> float:
    import dp_accounting  # here, not at the top: see _accounting

    with _quiet_absl():
        sigma = dp_accounting.calibrate_dp_mechanism(
            lambda: _accounting().RdpAccountant(list(orders)),
            lambda sigma: _sampled_gaussian(sigma, sampling_rate, steps),
            target_epsilon,
            delta,
            tol=tol,
        )
    return float(sigma)


def _check(
    noise_multiplier: float | None = None,
    sampling_rate: float | None = None,
    steps: int | None = None,
    delta: float | None = None,
) -> None:
    if noise_multiplier is not None and not (noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if sampling_rate is not None and not (0 <= sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate!r}")
    if steps is not None and (int(steps) != steps or steps < 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if delta is not None and not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


class RdpAccountant:
    """Privacy spent by the sampled Gaussian mechanism, from dp-accounting's RDP accountant.

    The mechanism (DP-FedAvg, McMahan et al. 2018): each step samples every participant
    independently with probability ``q`` (Poisson sampling), sums their updates clipped to L2
    norm C and adds N(0, sigma^2 C^2) noise: sensitivity C under adding or removing one
    participant (``NeighboringRelation.ADD_OR_REMOVE_ONE``), ``noise_multiplier`` sigma.
    ``orders`` defaults to :data:`DEFAULT_ORDERS` (dp-accounting's default set). Results are
    memoized: the accountant is a pure function of its arguments.
    """

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        self.orders: tuple[float, ...] = (
            DEFAULT_ORDERS if orders is None else tuple(float(a) for a in orders)
        )
        if not self.orders or min(self.orders) <= 1:
            raise ValueError("RDP orders must be a non-empty set of numbers > 1")

    def epsilon(
        self, noise_multiplier: float, sampling_rate: float, steps: int, delta: float
    ) -> float:
        """epsilon at ``delta`` after ``steps`` steps at noise multiplier sigma and sampling
        rate q. 0 for no steps (or q = 0); infinity for sigma = 0."""
        _check(noise_multiplier, sampling_rate, steps, delta)
        if steps == 0 or sampling_rate == 0:
            return 0.0
        if noise_multiplier == 0:
            return math.inf
        return _epsilon(
            self.orders, float(noise_multiplier), float(sampling_rate), int(steps), float(delta)
        )

    def composed_epsilon(self, events: Sequence[SampledGaussian], delta: float) -> float:
        """epsilon at ``delta`` of all ``events`` applied to the same data, composed in RDP
        (RDP adds per order, then one conversion to epsilon): exact composition, tighter than
        the sum of each event's epsilon. Events with no step or q = 0 spend nothing; one with
        sigma = 0 makes it infinite."""
        _check(delta=delta)
        kept = []
        for event in events:
            sigma, q, steps = (float(event[0]), float(event[1]), event[2])
            _check(sigma, q, steps)
            if steps == 0 or q == 0:
                continue
            if sigma == 0:
                return math.inf
            kept.append((sigma, q, int(steps)))
        if not kept:
            return 0.0
        return _composed_epsilon(self.orders, tuple(kept), float(delta))

    def noise_multiplier_for(
        self,
        target_epsilon: float,
        delta: float,
        sampling_rate: float,
        steps: int,
        tol: float = 1e-6,
    ) -> float:
        """The smallest sigma (to within ``tol``) whose epsilon after ``steps`` steps at rate
        q is at most ``target_epsilon`` at ``delta``: dp-accounting's calibrate_dp_mechanism
        (Brent's method with a bisection fallback that guarantees epsilon <= target)."""
        _check(None, sampling_rate, steps, delta)
        if not (math.isfinite(target_epsilon) and target_epsilon > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
        if steps < 1 or sampling_rate <= 0:
            raise ValueError("calibration needs at least one step at a sampling rate > 0")
        from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

        try:
            return _calibrate(
                self.orders,
                float(target_epsilon),
                float(delta),
                float(sampling_rate),
                int(steps),
                float(tol),
            )
        except (NoBracketIntervalFoundError, ValueError) as exc:
            raise ValueError(
                f"no noise multiplier reaches epsilon={target_epsilon:g} at delta={delta:g} "
                f"over {steps} step(s) at q={sampling_rate:g}: {exc}"
            ) from exc

    def local_epsilon(self, noise_multiplier: float, steps: int, delta: float) -> float:
        """What one participant's own noised updates reveal to whoever receives them (local
        DP): each is a Gaussian mechanism whose sensitivity is 2C (any two clipped updates
        differ by at most 2C, so the effective multiplier is sigma / 2), with no amplification
        by sampling (the receiver knows who sent it), composed over ``steps`` updates."""
        _check(noise_multiplier, None, steps, delta)
        if steps == 0:
            return 0.0
        if noise_multiplier == 0:
            return math.inf
        return _epsilon(self.orders, float(noise_multiplier) / 2.0, 1.0, int(steps), float(delta))
