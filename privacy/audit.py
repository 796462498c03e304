"""Membership inference: does a trained model give its training examples away?

A privacy audit of a finished job (pure math; the job and model plumbing is in
``bench/audit.py``). The attacker gets the model and a pool of candidate examples, half of them
training examples ("members"), half held-out examples of the same distribution
("non-members"), and scores each candidate: a high score says "member". Two attacks:

* **loss threshold** (Yeom et al. 2018): score = -loss of the example under the model. Training
  examples tend to have lower loss.
* **calibrated, offline LiRA** (Carlini et al. 2022, "Membership Inference Attacks From First
  Principles", offline variant): some examples are just easy. Reference models trained without
  the candidates tell how confident a model is on each example when it has *not* seen it. With
  phi = log(p / (1 - p)) for p the probability of the true label (LiRA's logit scaling), the
  score is the one-sided z-score (phi_target - mean_ref) / std_ref, per example; with few
  references the std is the pooled one over all examples (as the paper does for small numbers of
  shadow models).

What is reported: the ROC's AUC, the TPR at 1% and 0.1% FPR, and the empirical epsilon lower
bound those rates imply. An (epsilon, delta)-DP mechanism bounds every test: TPR <= e^eps FPR +
delta and 1 - FPR <= e^eps (1 - TPR) + delta (Kairouz et al. 2015). From a finite sample we use
Clopper-Pearson bounds (TPR from below, FPR from above, 95% each), so the bound is a statistical
lower bound, not a point estimate that noise can push above the truth. If it ever exceeded the
accounted epsilon, the accounting (or the implementation) would be wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

__all__ = [
    "AttackResult",
    "clopper_pearson",
    "empirical_epsilon",
    "evaluate_attack",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "roc_curve",
]


def roc_curve(member_scores: Sequence[float],
              nonmember_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the test "score >= t means member", for every threshold
    between the distinct scores, from (0, 0) to (1, 1)."""
    members = np.asarray(member_scores, dtype=np.float64)
    others = np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise ValueError("an attack needs at least one member and one non-member")
    if not (np.isfinite(members).all() and np.isfinite(others).all()):
        raise ValueError("attack scores must be finite")
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    tpr = np.array([0.0] + [(members >= t).mean() for t in thresholds])
    fpr = np.array([0.0] + [(others >= t).mean() for t in thresholds])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) bounds of a binomial rate: the lower and the upper bound each
    hold one-sided at ``confidence``."""
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(
        beta.ppf(1 - alpha, successes + 1, trials - successes))
    return low, high


def empirical_epsilon(tpr: float, fpr: float, delta: float) -> float:
    """The smallest epsilon an (epsilon, delta)-DP mechanism needs to allow a test with these
    rates (0 if any epsilon allows them)."""
    bounds = [0.0]
    if fpr > 0 and tpr - delta > 0:
        bounds.append(math.log((tpr - delta) / fpr))
    if 1 - tpr > 0 and 1 - delta - fpr > 0:
        bounds.append(math.log((1 - delta - fpr) / (1 - tpr)))
    if fpr == 0 and tpr > delta:
        return math.inf
    return max(bounds)


@dataclass(frozen=True)
class AttackResult:
    """One attack's figures (JSON-ready with ``to_json``)."""

    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    epsilon_lower_bound: float
    """Largest Clopper-Pearson-bounded (95%) epsilon over the ROC's thresholds."""
    members: int
    nonmembers: int

    def to_json(self) -> dict[str, float | int | str]:
        return asdict(self)


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    allowed = fpr <= target + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def evaluate_attack(name: str, member_scores: Sequence[float],
                    nonmember_scores: Sequence[float], delta: float,
                    confidence: float = 0.95) -> AttackResult:
    """AUC, TPR at 1% and 0.1% FPR and the empirical epsilon lower bound of one attack."""
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    n_in, n_out = len(member_scores), len(nonmember_scores)
    best = 0.0
    for f, t in zip(fpr, tpr, strict=True):
        # conservative on both counts: TPR from below, FPR from above (empirical_epsilon
        # checks both of DP's inequalities with them)
        t_low, _ = clopper_pearson(round(t * n_in), n_in, confidence)
        _, f_high = clopper_pearson(round(f * n_out), n_out, confidence)
        best = max(best, empirical_epsilon(t_low, f_high, delta))
    return AttackResult(name, _auc(fpr, tpr), _tpr_at(fpr, tpr, 0.01), _tpr_at(fpr, tpr, 0.001),
                        best, n_in, n_out)


def loss_scores(losses: Sequence[float]) -> np.ndarray:
    """The loss-threshold attack's scores: lower loss, more likely a member."""
    return -np.asarray(losses, dtype=np.float64)


def logit_confidence(losses: Sequence[float] | np.ndarray) -> np.ndarray:
    """phi = log(p / (1 - p)) with p = exp(-loss), the probability of the true label; computed
    stably as -log(expm1(loss)) (LiRA's scaling: roughly Gaussian across models)."""
    loss = np.clip(np.asarray(losses, dtype=np.float64), 1e-12, 700.0)
    return -np.log(np.expm1(loss))


def lira_offline_scores(target_losses: Sequence[float],
                        reference_losses: Sequence[Sequence[float]],
                        global_variance: bool = True) -> np.ndarray:
    """Offline LiRA: per example, how much more confident the target model is than reference
    models that never saw it. ``reference_losses[k][i]`` is reference model k's loss on
    candidate i. One-sided z-score; the std is pooled over examples when ``global_variance``
    (robust with a handful of references), else per example."""
    target = logit_confidence(target_losses)
    refs = logit_confidence(np.asarray(reference_losses, dtype=np.float64))
    if refs.ndim != 2 or refs.shape[1] != target.shape[0] or refs.shape[0] < 1:
        raise ValueError("reference_losses must be [references][candidates], one loss per "
                         "candidate of the target")
    mean = refs.mean(axis=0)
    if global_variance or refs.shape[0] < 2:
        std = np.full_like(mean, (refs - mean).std() if refs.shape[0] > 1 else refs.std())
    else:
        std = refs.std(axis=0)
    return (target - mean) / np.maximum(std, 1e-6)
