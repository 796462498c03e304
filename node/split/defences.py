"""Defences of the device's activations in split learning (SFPrompt), applied by the device.

The hidden states a device sends to the split-server carry its tokens: the residual stream of
early layers keeps each token's embedding almost untouched (``node.split.attacks`` measures
it). The device, whose text it is, applies these before anything crosses:

- ``ActivationNoise``: Gaussian noise calibrated per token (std ``sigma * ||h_t|| / sqrt(H)``
  per coordinate, so the noise norm is about ``sigma`` times the token's own norm), drawn
  from a generator seeded with the device's own secret (``os.urandom``), never the job's seed.
  Guarantee: none formal, empirical only. Read as a Gaussian mechanism on a token vector
  clipped to norm C (sensitivity 2C between any two tokens), the noise gives a per-token
  metric-DP epsilon of ``2 sqrt(2 ln(1.25/delta)) sqrt(H) / sigma`` (``per_token_epsilon``):
  about 190 / sigma for MiniLM (H=384) at delta=1e-5, which protects nothing at any sigma a
  model survives; the norm-relative scale also leaks each token's norm. What we claim is what
  the attack suite measures.
- ``add_private_lora`` + ``distance_correlation``: a LoRA adapter on the head's linear maps,
  trained by the device and never sent (not part of the federated state), with a NoPeek loss
  (Vepakomma et al. 2020): the distance correlation between the token embeddings and the
  hidden states sent, which the device minimises beside the task loss.
- more head layers: ``SFPromptConfig.head_layers`` (no code here; ``split_costs`` says what
  it costs the device).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

__all__ = ["ActivationNoise", "add_private_lora", "distance_correlation",
           "per_token_epsilon", "private_lora_parameters", "reset_private_lora"]

LORA_PREFIX = "private_lora"


def per_token_epsilon(sigma: float, hidden_size: int, delta: float = 1e-5) -> float:
    """The classic Gaussian-mechanism epsilon this noise would give one clipped token vector
    (sensitivity 2C, noise std sigma*C/sqrt(H) per coordinate); inf without noise. The
    classic bound is only proven for epsilon < 1: larger values are indicative."""
    if sigma <= 0:
        return math.inf
    return 2.0 * math.sqrt(2.0 * math.log(1.25 / delta)) * math.sqrt(hidden_size) / sigma


class ActivationNoise:
    """Adds per-token calibrated Gaussian noise to (B, L, H) hidden states (prompts included:
    the server should not tell them apart by their noise)."""

    def __init__(self, sigma: float, seed: int | None = None) -> None:
        if not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"activation noise sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.generator = torch.Generator(device="cpu")
        # the device's own secret seed: the server must not be able to regenerate the noise
        self.generator.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None
                                   else seed)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return hidden
        scale = hidden.detach().float().norm(dim=-1, keepdim=True) / math.sqrt(hidden.shape[-1])
        noise = torch.randn(hidden.shape, generator=self.generator, dtype=torch.float32)
        return hidden + (self.sigma * scale * noise.to(hidden.device)).to(hidden.dtype)


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation between rows of x (N, D) and z (N, E), in [0, 1]
    (Szekely et al. 2007); NoPeek's leakage loss. Differentiable in both."""
    if x.shape[0] != z.shape[0] or x.shape[0] < 2:
        raise ValueError(f"distance correlation needs >= 2 paired rows, got {x.shape} and "
                         f"{z.shape}")

    def centred(v: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(v.float(), v.float()).clamp_min(0)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(z)
    dcov_xz = (a * b).mean().clamp_min(0)
    dcov_xx = (a * a).mean()
    dcov_zz = (b * b).mean()
    return torch.sqrt(dcov_xz / torch.sqrt(dcov_xx * dcov_zz).clamp_min(1e-12))


class _LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update B A (B starts at zero, so the
    adapted head starts as the public head)."""

    def __init__(self, base: nn.Linear, rank: int, seed: int) -> None:
        super().__init__()
        self.base = base
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=generator)
                                   / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)


def add_private_lora(stack: nn.Module, rank: int, seed: int | None = None) -> int:
    """Wrap every ``nn.Linear`` of ``stack`` (the head's layers) with a rank-``rank`` LoRA
    update, in place; the A matrices are drawn from the device's own seed. Returns how many
    maps were wrapped."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"private LoRA rank must be an integer >= 1, got {rank!r}")
    base_seed = int.from_bytes(os.urandom(8), "little") >> 1 if seed is None else seed
    targets = [(parent, name, child) for parent in stack.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for index, (parent, name, child) in enumerate(targets):
        setattr(parent, name, _LoRALinear(child, rank, base_seed + index))
    return len(targets)


def private_lora_parameters(stack: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters ``add_private_lora`` added (the device's private state)."""
    return [p for m in stack.modules() if isinstance(m, _LoRALinear)
            for p in (m.lora_a, m.lora_b)]


def reset_private_lora(stack: nn.Module) -> None:
    """Back to the public head (B = 0): a new job starts from what the server knows."""
    with torch.no_grad():
        for module in stack.modules():
            if isinstance(module, _LoRALinear):
                module.lora_b.zero_()
