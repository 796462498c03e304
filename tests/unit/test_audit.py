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
