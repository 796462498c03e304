"""EL2N pruning (SFPrompt's step 1): score every example by how wrong the untrained model is
on it, keep the hardest fraction.

Paul et al. 2021 ("Deep Learning on a Data Diet"): EL2N = || softmax(logits) - onehot(y) ||_2.
The device scores through its local path head -> tail (``SplitTrainer.el2n_scores``): pruning
costs no communication and reveals nothing to the server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from confide.node.split.body import is_number

__all__ = ["el2n", "kept_examples", "top_fraction"]


def el2n(logits: torch.Tensor, labels: torch.Tensor, task: str,
         num_prompts: int = 0) -> torch.Tensor:
    """EL2N score per example, float32 (B,): || softmax(logits) - onehot(y) ||_2.

    Classification: logits (B, C), labels (B,). Causal LM: logits (B, P+T, V) as the tail
    returns them, labels (B, T) with -100 on padding; the per-token score of every predicted
    token (after the usual shift; the last prompt predicts the first token), averaged per
    example (0 for an example with no predicted token).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if task != "causal-lm":
        onehot = nn.functional.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
        return (probs - onehot).norm(dim=-1)
    pad = labels.new_full((labels.shape[0], num_prompts), -100)
    targets = nn.functional.pad(torch.cat([pad, labels], dim=1), (0, 1), value=-100)[:, 1:]
    valid = targets != -100
    picked = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # ||p - e_y||^2 = sum p^2 - 2 p_y + 1
    squared = (probs * probs).sum(-1) - 2.0 * picked + 1.0
    per_token = squared.clamp(min=0.0).sqrt() * valid
    return per_token.sum(1) / valid.sum(1).clamp(min=1)


def top_fraction(scores: Sequence[float], gamma: float) -> list[int]:
    """Indices (ascending) of the top ceil(gamma * n) scores; ties go to the lower index.

    NaN ranks lowest. ceil is taken with a 1e-9 tolerance, so 0.3 of 10 keeps 3, not 4.
    """
    if not is_number(gamma) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma is the fraction kept, in (0, 1], got {gamma!r}")
    n = len(scores)
    keep = min(n, math.ceil(gamma * n - 1e-9))

    def key(i: int) -> tuple[float, int]:
        s = float(scores[i])
        return (-s if not math.isnan(s) else math.inf, i)

    return sorted(sorted(range(n), key=key)[:keep])


def kept_examples(examples: Sequence[Any], scores: Sequence[float], gamma: float,
                  by_label: bool) -> list[Any]:
    """The examples of the top ceil(gamma * n) ``scores``, in their original order.

    ``by_label``: keep the top gamma of each label instead of the top gamma overall. Scored
    before any training, EL2N is dominated by the random head's bias towards some classes, and
    a global cut dropped whole classes in the benchmark (a MiniLM shard of 4 labels kept 2);
    per label the shard's label mix survives."""
    if not by_label:
        return [examples[i] for i in top_fraction(scores, gamma)]
    groups: dict[Any, list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.label, []).append(i)
    kept = [group[j] for group in groups.values()
            for j in top_fraction([scores[i] for i in group], gamma)]
    return [examples[i] for i in sorted(kept)]
