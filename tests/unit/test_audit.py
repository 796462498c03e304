"""The membership-inference audit (privacy/audit.py) on a model small enough to overfit in a
fraction of a second: a logistic model on synthetic data with noisy labels, where memorising
the training set is the only way to fit it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from confide.privacy.audit import (
    clopper_pearson,
    empirical_epsilon,
    evaluate_attack,
    lira_offline_scores,
    loss_scores,
    roc_curve,
)

DIM, N = 120, 60
DELTA = 1e-5


def _data(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, generator=generator)
    signal = (x[:, 0] > 0).long()
    flip = torch.rand(n, generator=generator) < 0.3  # label noise: only memorising fits it
    return x, torch.where(flip, 1 - signal, signal)


def _train(x: torch.Tensor, y: torch.Tensor, epochs: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@torch.no_grad()
def _losses(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none").numpy()


@pytest.fixture(scope="module")
def world():
    g = torch.Generator().manual_seed(7)
    members, others = _data(g, N), _data(g, N)
    references = [_train(*_data(g, N)) for _ in range(4)]  # never saw a candidate
    candidates = (torch.cat([members[0], others[0]]), torch.cat([members[1], others[1]]))
    ref_losses = [_losses(m, *candidates) for m in references]
    return members, others, candidates, ref_losses, g


def _audit(model, candidates, ref_losses):
    losses = _losses(model, *candidates)
    loss = evaluate_attack("loss", loss_scores(losses[:N]), loss_scores(losses[N:]), DELTA)
    lira = lira_offline_scores(losses, ref_losses)
    calibrated = evaluate_attack("lira", lira[:N], lira[N:], DELTA)
    return loss, calibrated


def test_attacks_find_the_members_of_an_overfit_model(world):
    members, _others, candidates, ref_losses, _g = world
    loss, calibrated = _audit(_train(*members), candidates, ref_losses)
    assert loss.auc > 0.8 and calibrated.auc > 0.7
    assert loss.epsilon_lower_bound > 0.5  # the bound shows a real leak


def test_attacks_are_at_chance_on_a_model_that_never_saw_the_members(world):
    _members, _others, candidates, ref_losses, g = world
    stranger = _train(*_data(g, N))  # same distribution, other examples
    loss, calibrated = _audit(stranger, candidates, ref_losses)
    assert abs(loss.auc - 0.5) < 0.15 and abs(calibrated.auc - 0.5) < 0.15
    # finite-sample noise must not read as a leak: the bound is a confidence bound
    assert loss.epsilon_lower_bound < 1.0 and calibrated.epsilon_lower_bound < 1.0


def test_roc_of_separated_scores_is_perfect_and_the_bound_follows_the_rates():
    fpr, tpr, _ = roc_curve([2.0, 3.0], [0.0, 1.0])
    assert tpr[fpr == 0].max() == 1.0
    assert evaluate_attack("x", [2.0, 3.0], [0.0, 1.0], DELTA).auc == 1.0
    # TPR 0.5 at FPR 0.05: eps >= log(0.5 / 0.05)
    assert empirical_epsilon(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    assert empirical_epsilon(0.3, 0.3, 0.0) == 0.0
    low, high = clopper_pearson(5, 100)
    assert 0 < low < 0.05 < high < 0.15


def test_bench_candidate_pools_are_disjoint_label_matched_and_checked_before_any_job():
    from collections import Counter

    from confide.bench.audit import candidate_pools
    from confide.node.data import Example

    members_pool = [Example(f"m{i}", i % 3) for i in range(90)]
    outsiders = [Example(f"o{i}", i % 3) for i in range(150)]
    members, nonmembers, reference = candidate_pools(members_pool, outsiders, 60, 30, seed=1)
    assert len(members) == len(nonmembers) == 60
    assert Counter(e.label for e in members) == Counter(e.label for e in nonmembers)
    texts = [e.text for e in members + nonmembers + reference]
    assert len(texts) == len(set(texts))  # no article in two roles
    assert all(e.text.startswith("o") for e in nonmembers + reference)
    assert len(reference) == 150 - 60

    with pytest.raises(ValueError, match="lower --candidates"):
        candidate_pools(members_pool, [Example("o", 0)] * 10, 60, 0, seed=1)
    with pytest.raises(ValueError, match="--reference-size asks 200"):
        candidate_pools(members_pool, outsiders, 60, 200, seed=1)
