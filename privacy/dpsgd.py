"""Example-level DP-SGD: Poisson sampling, per-example clipping, Gaussian noise on the sum.

Pure building block (no networking, nothing from ``node``/``coordinator``/``protos``): a trainer
(e.g. a LoRA trainer on a PEFT-wrapped Hugging Face model) calls it once per local step. The
mechanism is DP-SGD (Abadi et al. 2016) as Opacus implements it, with the Poisson sampling its
privacy analysis assumes:

1. :meth:`DPSGD.sample_batches` draws every local step's batch by Poisson sampling: each of the
   node's ``N`` examples joins each step independently with probability ``q``. Batches have
   varying sizes and may be empty; there is deliberately no fixed-size shortcut, because the
   accountant's amplification by sampling (:class:`privacy.dp.RdpAccountant`, the Poisson-
   sampled Gaussian) only holds for this sampling.
2. :meth:`DPSGD.private_step` runs the caller's forward pass on the batch; Opacus 1.6's
   ``GradSampleModule`` (hooks mode: per-layer grad samplers, functorch for layers without one)
   records each example's gradient of every trainable parameter during the backward pass.
3. Each example's gradient, taken as one vector over *all* trainable parameters, is clipped to
   L2 norm ``C`` (factor ``min(1, C / (norm + 1e-6))``, Opacus' rule, computed in float64), the
   clipped gradients are summed, N(0, (sigma*C)^2) noise is added to every coordinate, and the
   result is divided by the *expected* batch size ``q * N`` (not the drawn size, which would
   leak it). Sensitivity of the sum under adding or removing one example: C.
4. The noised average is written to ``param.grad``; any torch optimizer may then step on it
   (post-processing does not spend privacy). Pass ``optimizer`` to let :meth:`private_step`
   call ``optimizer.step()`` for you.

Why Opacus' ``GradSampleModule`` and not our own per-example gradients: per-example gradients
are the part that is easy to get subtly wrong (tied weights, layers without a grad sampler);
Opacus is maintained and was checked here to match a single-example loop on the PEFT-wrapped
MiniLM to 1.2e-7. Why not Opacus' ``PrivacyEngine``/``DPOptimizer``: they own the data loader
and the optimizer, and secure noise there needs ``secure_mode``, which needs ``torchcsprng``
(unmaintained since 2021, no build for this torch). Clipping, noise and scaling here are a few
lines with a test each (``tests/unit/test_dpsgd.py``).

Gotchas the caller must respect (each checked at run time with a clear error):

* the model must be in ``train()`` mode: Opacus' hooks record nothing in ``eval()``. For
  deterministic tests set dropout to 0 rather than switching to ``eval()``.
* the loss callable returns one loss per example (shape ``[B]``, no reduction): the step sums
  them itself, so each example's gradient is that of its own loss.
* every trainable parameter must be reached by the forward pass through hooked modules; a
  parameter that receives a gradient without a per-example gradient is refused.

Noise: drawn with :func:`privacy.dp.gaussian_noise_like` from a caller-supplied
``torch.Generator`` (use :func:`privacy.dp.secure_generator` in real runs). Its limits are
privacy/dp.py's: a Mersenne-Twister generator seeded from ``os.urandom`` and floating-point
Gaussians, not a CSPRNG discrete Gaussian (stated in that module's docstring).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from torch import nn

from confide.privacy.dp import RdpAccountant, SampledGaussian, gaussian_noise_like

__all__ = [
    "DPSGD",
    "StepStats",
    "calibrate_noise_multiplier",
    "clip_and_sum",
    "planned_event",
    "poisson_batches",
]

CLIP_STABILIZER = 1e-6
"""Added to each norm before dividing (Opacus' rule): the clipped norm is then strictly below C
(by a relative margin of about 1e-6 / norm) and a zero gradient divides safely."""


def planned_event(
    noise_multiplier: float, sample_rate: float, rounds: int, local_steps: int
) -> SampledGaussian:
    """The accounting event of a whole DP-SGD job on one node: ``rounds * local_steps`` steps of
    the Poisson-sampled Gaussian at (sigma, q). Each example lives on one node, so nodes compose
    in parallel and each node's job is this one event on its own dataset."""
    for label, value in (("rounds", rounds), ("local_steps", local_steps)):
        if int(value) != value or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    return SampledGaussian(float(noise_multiplier), float(sample_rate), int(rounds * local_steps))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    local_steps: int,
    accountant: RdpAccountant | None = None,
) -> float:
    """The smallest sigma whose job (``rounds * local_steps`` Poisson-sampled steps at rate q)
    spends at most ``target_epsilon`` at ``delta``: :meth:`privacy.dp.RdpAccountant.
    noise_multiplier_for` (dp-accounting's calibration, absl warnings silenced). Raises
    ValueError if no sigma reaches it."""
    steps = planned_event(0.0, sample_rate, rounds, local_steps).steps
    return (accountant or RdpAccountant()).noise_multiplier_for(
        target_epsilon, delta, sample_rate, steps
    )


def poisson_batches(
    n_examples: int, sample_rate: float, steps: int, generator: torch.Generator
) -> list[list[int]]:
    """``steps`` Poisson-sampled batches of indices into ``range(n_examples)``.

    Each index joins each batch independently with probability ``sample_rate``; batch sizes are
    Binomial(n_examples, sample_rate), so they vary and a batch may be empty. Indices within a
    batch are in increasing order. Uniform draws come from ``generator`` (reproducible).
    """
    if int(n_examples) != n_examples or n_examples < 0:
        raise ValueError(f"n_examples must be an integer >= 0, got {n_examples!r}")
    if not (0 <= sample_rate <= 1):
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    draws = torch.rand((int(steps), int(n_examples)), generator=generator, dtype=torch.float64)
    mask = draws < float(sample_rate)
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def clip_and_sum(
    grad_samples: Sequence[torch.Tensor], clip_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Clip each example's gradient (one row per example in every tensor of ``grad_samples``,
    taken together as one vector) to L2 norm ``clip_norm`` and sum over examples.

    Returns the sums (float64, one per tensor, without the batch dimension), the norms before
    clipping and the clip factors (float64, shape ``[B]``). Everything is computed in float64,
    so the clipped norms are below C up to float64 rounding.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if not grad_samples:
        raise ValueError("no per-example gradients to clip")
    batch = grad_samples[0].shape[0]
    values = [g.detach().to(torch.float64).reshape(batch, -1) for g in grad_samples]
    for v in values:
        if v.shape[0] != batch:
            raise ValueError("per-example gradients disagree on the batch size")
        if not torch.isfinite(v).all():
            raise ValueError("a per-example gradient contains NaN or infinity")
    squared = torch.zeros(batch, dtype=torch.float64)
    for v in values:
        squared += (v * v).sum(dim=1)
    norms = squared.sqrt()
    factors = (clip_norm / (norms + CLIP_STABILIZER)).clamp(max=1.0)
    sums = [(factors @ v).reshape(g.shape[1:]) for v, g in zip(values, grad_samples, strict=True)]
    return sums, norms, factors


@dataclass(frozen=True)
class StepStats:
    """What one private step did (nothing here is private: the batch size is not released
    beyond the node, and norms are diagnostics for the operator, not for the coordinator)."""

    batch_size: int
    """Examples drawn for this step (Poisson: varies, may be 0)."""
    loss: float
    """Mean per-example loss of the drawn batch (NaN for an empty batch)."""
    clipped_fraction: float
    """Share of the batch whose gradient norm exceeded C (NaN for an empty batch)."""
    max_norm: float
    """Largest per-example gradient norm before clipping (0 for an empty batch)."""
    noise_std: float
    """Standard deviation of the noise added to the sum: sigma * C."""


class DPSGD:
    """Example-level DP-SGD on one model, one local step at a time.

    ``model``: any ``nn.Module`` (e.g. a PEFT-wrapped Hugging Face model); its trainable
    parameters (``requires_grad``) are the ones trained and protected. It is wrapped in Opacus'
    ``GradSampleModule`` (hooks are attached to its submodules, so calling ``model`` or
    :attr:`module` both record per-example gradients). ``clip_norm`` C, ``noise_multiplier``
    sigma and ``sample_rate`` q define the mechanism; ``n_examples`` N is the size of the
    dataset the batches are drawn from (the step divides by q*N). ``generator`` draws both the
    batches and the noise (:func:`privacy.dp.secure_generator` in real runs).

    Typical trainer loop::

        dp = DPSGD(peft_model, clip_norm=1.0, noise_multiplier=sigma, sample_rate=q,
                   n_examples=len(data), generator=secure_generator())
        for batch in dp.sample_batches(local_steps):
            stats = dp.private_step(batch, lambda idx: per_example_losses(peft_model, idx),
                                    optimizer)

    Call :meth:`close` to remove the hooks when done (the model is usable without them).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        n_examples: int,
        generator: torch.Generator,
    ) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if int(n_examples) != n_examples or n_examples < 1:
            raise ValueError(f"n_examples must be an integer >= 1, got {n_examples!r}")
        self.model = model
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.n_examples = int(n_examples)
        self.generator = generator
        self.params: dict[str, nn.Parameter] = {
            name: p for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.params:
            raise ValueError("the model has no trainable parameter")
        # loss_reduction="sum": the step sums per-example losses, so grad_sample[i] is the
        # gradient of example i's own loss (no 1/B factor to undo)
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.steps_taken = 0

    @property
    def expected_batch_size(self) -> float:
        """q * N: the divisor of the noised sum (fixed, so it reveals nothing of the batch)."""
        return self.sample_rate * self.n_examples

    def sample_batches(self, steps: int) -> list[list[int]]:
        """``steps`` Poisson-sampled batches of example indices (see :func:`poisson_batches`)."""
        return poisson_batches(self.n_examples, self.sample_rate, steps, self.generator)

    def private_step(
        self,
        batch: Sequence[int],
        per_example_loss: Callable[[Sequence[int]], torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
    ) -> StepStats:
        """One DP-SGD step on ``batch`` (indices from :meth:`sample_batches`).

        ``per_example_loss(batch)`` runs the forward pass on those examples and returns their
        losses, shape ``[len(batch)]``, unreduced. It is not called for an empty batch: the step
        then releases noise only, as the mechanism requires. Afterwards every trainable
        parameter's ``.grad`` holds ``(sum of clipped per-example gradients + noise) / (q N)``
        in its dtype; if ``optimizer`` is given, ``optimizer.step()`` is called on it.
        """
        if not self.model.training:
            raise RuntimeError(
                "DP-SGD needs the model in train() mode: Opacus records no per-example "
                "gradient in eval() (set dropout to 0 for determinism instead)"
            )
        batch = list(batch)
        self.module.zero_grad(set_to_none=True)
        names = list(self.params)
        loss_value = math.nan
        clipped_fraction = math.nan
        max_norm = 0.0
        if batch:
            losses = per_example_loss(batch)
            if losses.dim() != 1 or losses.shape[0] != len(batch):
                raise ValueError(
                    f"per_example_loss must return one loss per example, shape "
                    f"[{len(batch)}], got {tuple(losses.shape)}"
                )
            with warnings.catch_warnings():
                # Opacus' full backward hooks on a first layer whose input needs no gradient
                # (frozen embeddings below LoRA): torch warns, the per-example grads are right
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            loss_value = float(losses.detach().mean())
            samples = [self._grad_sample(name, len(batch)) for name in names]
            sums, norms, factors = clip_and_sum(samples, self.clip_norm)
            clipped_fraction = float((factors < 1.0).to(torch.float64).mean())
            max_norm = float(norms.max())
        else:
            sums = [torch.zeros(tuple(self.params[n].shape), dtype=torch.float64) for n in names]
        std = self.noise_multiplier * self.clip_norm
        # float64 sums in, float64 noise out, drawn in the parameters' order
        noise = gaussian_noise_like(dict(zip(names, sums, strict=True)), std, self.generator)
        divisor = self.expected_batch_size
        for name, total in zip(names, sums, strict=True):
            param = self.params[name]
            noised = (total + noise[name]) / divisor
            param.grad = noised.to(dtype=param.dtype, device=param.device)
            param.grad_sample = None
        if optimizer is not None:
            optimizer.step()
        self.steps_taken += 1
        return StepStats(
            batch_size=len(batch),
            loss=loss_value,
            clipped_fraction=clipped_fraction,
            max_norm=max_norm,
            noise_std=std,
        )

    def _grad_sample(self, name: str, batch_size: int) -> torch.Tensor:
        param = self.params[name]
        sample = getattr(param, "grad_sample", None)
        if isinstance(sample, list):
            raise RuntimeError(
                f"parameter {name!r} accumulated per-example gradients over several backward "
                "passes; per_example_loss must run exactly one forward pass"
            )
        if sample is None:
            if param.grad is not None:
                raise RuntimeError(
                    f"parameter {name!r} got a gradient but no per-example gradient: its "
                    "module is not hooked by Opacus (or the model ran in eval())"
                )
            # not reached by this forward pass: every example contributes zero to it
            return torch.zeros((batch_size, *param.shape), dtype=param.dtype)
        if sample.shape[0] != batch_size:
            raise RuntimeError(
                f"parameter {name!r} has {sample.shape[0]} per-example gradients for a batch "
                f"of {batch_size} (batch_first inputs expected)"
            )
        return sample

    def close(self) -> None:
        """Remove Opacus' hooks and per-example gradient state from the model."""
        self.module.zero_grad(set_to_none=True)
        self.module.to_standard_module()
