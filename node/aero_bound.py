"""The public attention-score bound of a trained AERO model, for the max-free softmax.

Under 2PC the softmax's row max costs comparisons (heads x T^2 of them per layer, the largest
cost at T=128). ``privacy.aero_2pc.MaxFreeSoftmax`` subtracts a public bound B instead, which
is correct as long as every attention score s satisfies |s| <= B (then exp(s - B) <= 1 and a
row's sum stays above e^-2B). Entropy-regularized training keeps the scores in a narrow range,
so B is a property of the trained model:

* :func:`measure_score_bound` runs the model over held-out text (plaintext, the owner's side),
  takes the largest |score| over every layer, head and visible position, and adds a margin;
* :func:`check_score_bound` is the export check: it refuses a model without a bound, and one
  whose scores on the given text exceed its bound;
* the bound travels with the weights as safetensors metadata (``BOUND_KEY``, written by
  ``node.private_inference.publish_model``) and in the model's public configuration as
  ``softmax_bound``: both parties need it, and it reveals one number about the weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

BOUND_KEY = "confide.aero.softmax_bound"
DEFAULT_MARGIN = 1.25
"""B = margin x the largest |score| seen: text the calibration did not cover may go further."""


class ScoreBoundError(ValueError):
    """A model cannot be exported with the max-free softmax (no bound, or scores beyond it)."""


@dataclass(frozen=True)
class ScoreBound:
    """The public bound B and what it was measured on."""

    bound: float
    max_abs_score: float
    tokens: int
    margin: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScoreBound:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"bound", "max_abs_score", "tokens",
                                                        "margin"}:
            raise ValueError(f"{BOUND_KEY} must hold bound, max_abs_score, tokens and margin")
        bound = data["bound"]
        if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"{BOUND_KEY}.bound must be a finite number > 0, got {bound!r}")
        return cls(float(bound), float(data["max_abs_score"]), int(data["tokens"]),
                   float(data["margin"]))


@torch.no_grad()
def attention_scores(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's scaled attention scores (B, H, T, T) before masking, as the private
    forward computes them (``q k^T / sqrt(d_head)`` x the learnable logit scale)."""
    ids = model._check(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    t = ids.shape[1]
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(t, device=ids.device))
    out = []
    for block in model.blocks:
        attn = block.attn
        y = block.ln1(x) if hasattr(block, "ln1") else x
        b = y.shape[0]

        def heads(proj, y=y, b=b, attn=attn):
            return proj(y).view(b, t, attn.n_heads, attn.d_head).transpose(1, 2)

        s = heads(attn.q) @ heads(attn.k).transpose(-1, -2) / math.sqrt(attn.d_head)
        if hasattr(attn, "logit_scale"):
            s = s * attn.logit_scale.view(1, -1, 1, 1)
        out.append(s)
        x, _ = block(x)
    return out


def _windows(sequences: Sequence[Sequence[int]], length: int) -> list[list[int]]:
    flat = [t for s in sequences for t in s]
    return [flat[i:i + length] for i in range(0, len(flat) - 1, length) if flat[i:i + length]]


@torch.no_grad()
def max_abs_score(model: Any, sequences: Sequence[Sequence[int]]) -> tuple[float, int]:
    """The largest |score| at visible (causal) positions over the text cut into max_len
    windows, and the number of tokens seen."""
    worst, tokens = 0.0, 0
    for window in _windows(sequences, model.config.max_len):
        ids = torch.tensor(window)
        mask = torch.ones(len(window), len(window), dtype=torch.bool).tril()
        for s in attention_scores(model, ids):
            worst = max(worst, s.abs().masked_fill(~mask, 0).max().item())
        tokens += len(window)
    if not tokens:
        raise ScoreBoundError("no calibration text: the bound must be measured on some")
    return worst, tokens


def measure_score_bound(model: Any, sequences: Sequence[Sequence[int]],
                        margin: float = DEFAULT_MARGIN) -> ScoreBound:
    """The model's bound: ``margin`` x the largest |score| on ``sequences`` (held-out text)."""
    if not margin >= 1.0:
        raise ValueError(f"margin must be >= 1, got {margin!r}")
    worst, tokens = max_abs_score(model, sequences)
    # rounded up: a bound rounded down could fall below the scores it was measured on
    return ScoreBound(math.ceil(worst * margin * 1e4) / 1e4, worst, tokens, margin)


def check_score_bound(model: Any, bound: ScoreBound | None,
                      sequences: Sequence[Sequence[int]]) -> float:
    """The export check: refuse a model without a bound or with scores beyond it on
    ``sequences``; returns the largest |score| seen."""
    from confide.privacy.aero_2pc import MAX_SOFTMAX_BOUND

    if bound is None:
        raise ScoreBoundError("the model carries no softmax bound: measure one on held-out "
                              "text (node.aero_bound.measure_score_bound) before exporting it "
                              "for the max-free softmax")
    if not 0 < bound.bound <= MAX_SOFTMAX_BOUND:
        raise ScoreBoundError(f"softmax bound {bound.bound:g} is outside (0, "
                              f"{MAX_SOFTMAX_BOUND:g}]: the max-free softmax cannot represent "
                              "its range in 16-bit fixed point")
    worst, tokens = max_abs_score(model, sequences)
    if worst > bound.bound:
        raise ScoreBoundError(f"attention scores reach {worst:.3f} on {tokens} tokens, beyond "
                              f"the model's bound {bound.bound:g}: the max-free softmax would "
                              "be wrong; measure the bound again")
    return worst
