"""Distributed DP under secure aggregation (privacy.secagg.distributed_dp): the discrete
Gaussian sampler against its exact law, unbiased rounding, the calibration and its CDP bound,
and a whole SecAgg+ round whose unmasked sum carries the noise of every survivor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from confide.privacy.secagg.distributed_dp import (
    DistributedDPError,
    DistributedGaussian,
    discrete_gaussian,
    randomized_round,
)
from confide.privacy.secagg.protocol import codec_of
from tests.unit.test_secagg_protocol import Nodes, run


def _discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """The exact law, normalized over a range that holds all but ~1e-30 of the mass."""
    k = np.arange(-int(20 * sigma) - 20, int(20 * sigma) + 21)
    weights = np.exp(-(k.astype(float) ** 2) / (2 * sigma * sigma))
    return np.exp(-(support.astype(float) ** 2) / (2 * sigma * sigma)) / weights.sum()


@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.5])
def test_the_sampler_follows_the_discrete_gaussian(sigma):
    rng = np.random.default_rng(1)
    draws = discrete_gaussian(sigma, 60_000, rng)
    values, counts = np.unique(draws, return_counts=True)
    expected = _discrete_gaussian_pmf(sigma, values) * draws.size
    keep = expected >= 5  # the chi-square test's usual rule; the tails are pooled
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], draws.size - expected[keep].sum())
    assert stats.chisquare(observed, expected).pvalue > 1e-4
    # and a sampler that ignored sigma would fail it: the same test on sigma * 1.2
    wrong = _discrete_gaussian_pmf(sigma * 1.2, values[keep]) * draws.size
    wrong = np.append(wrong, draws.size - wrong.sum())
    assert stats.chisquare(observed, wrong).pvalue < 1e-6


def test_large_sigma_draws_have_the_gaussian_moments():
    draws = discrete_gaussian(3.0e6, 200_000, np.random.default_rng(2))
    assert abs(draws.mean()) < 4 * 3.0e6 / math.sqrt(draws.size)
    assert draws.std() == pytest.approx(3.0e6, rel=0.01)


def test_randomized_rounding_is_unbiased_and_moves_each_entry_less_than_one():
    rng = np.random.default_rng(3)
    x = rng.uniform(-50, 50, 1_000)
    rounds = np.stack([randomized_round(x, rng) for _ in range(400)])
    assert np.all(np.abs(rounds - x) < 1)
    assert np.abs(rounds.mean(axis=0) - x).max() < 0.1


def test_calibration_gives_the_noise_multiplier_on_the_sum():
    noise = DistributedGaussian(noise_multiplier=1.1, l2_clip=1.0, min_summands=4)
    step, dim = 2.0**-20, 10_000
    s = noise.node_sigma(step, dim)
    assert s == pytest.approx(1.1 * (2**20 + 100) / 2)
    # t summands: the sum's std over the sensitivity is z; tau underflows at these scales
    assert noise.tau(step, dim) == 0.0
    assert noise.effective_noise_multiplier(step, dim) == pytest.approx(1.1)
    # more survivors than t only add noise
    assert noise.epsilon_cdp(step, dim, summands=8) < noise.epsilon_cdp(step, dim)
    with pytest.raises(DistributedDPError, match="never"):
        noise.epsilon_cdp(step, dim, summands=3)


def test_a_grid_too_coarse_for_the_sum_to_be_gaussian_is_refused():
    # a tiny noise multiplier on a step of 1: each node's discrete Gaussian is ~0.3 wide
    noise = DistributedGaussian(noise_multiplier=0.01, l2_clip=1.0, min_summands=3)
    with pytest.raises(DistributedDPError, match="too coarse"):
        noise.effective_noise_multiplier(1.0, 1_000)


def test_a_node_refuses_an_unclipped_update_or_one_without_headroom():
    noise = DistributedGaussian(1.0, 1.0, 3)
    rng = np.random.default_rng(4)
    with pytest.raises(DistributedDPError, match="L2 norm"):
        noise.noised_input(np.full(4, 1.0), 2.0**-16, 2**30, rng)
    with pytest.raises(DistributedDPError, match="no room"):
        noise.noised_input(np.full(4, 0.4), 2.0**-16, 2**16, rng)


def test_a_secure_round_unmasks_the_sum_plus_every_survivors_noise():
    """The unmasked sum differs from the true sum by noise of the calibrated size: the
    coordinator never sees an un-noised sum, and the mean is still unbiased."""
    nodes = Nodes(5)
    dim = 4_000
    rng = np.random.default_rng(5)
    values = {}
    for i in nodes.ids:
        v = rng.normal(size=dim)
        values[i] = v * (0.5 / np.linalg.norm(v))  # clipped to C = 1 with room
    weights = {i: 1 for i in nodes.ids}
    sigma, clip = 0.8, 1.0
    t = 3
    noise = DistributedGaussian(sigma, clip, t)
    result, state = run(nodes, values, weights, dim=dim, clip=clip * (1 + 8 * sigma),
                        max_weight=1, bits=64, threshold=t, noise=noise,
                        drop={"masked_input": {nodes.ids[0]}})
    server = state.server
    survivors = [i for i in nodes.ids]  # dropping after the masked input keeps it in the sum
    true_sum = sum(values[i] for i in survivors)
    residual = result.weighted_sum - true_sum
    step = codec_of(server.setup).step
    expected_std = math.sqrt(len(survivors)) * noise.node_sigma(step, dim) * step
    assert expected_std == pytest.approx(sigma * clip * math.sqrt(len(survivors) / t),
                                         rel=0.01)
    assert residual.std() == pytest.approx(expected_std, rel=0.05)
    assert abs(residual.mean()) < 5 * expected_std / math.sqrt(dim)
    assert result.weight_total == len(survivors)


def test_submission_pairs_distributed_noise_with_secure_aggregation():
    from confide.coordinator.jobs import normalize_spec
    from confide.sdk.client import job_spec

    def spec(mode: str, secure: bool):
        return job_spec("dp-lora", min_nodes=3, secure_aggregation=secure,
                        params={"unit": "node", "mode": mode, "noise_multiplier": 1.0})

    assert normalize_spec(spec("distributed", True)).secure_aggregation
    with pytest.raises(ValueError, match="set secure_aggregation"):
        normalize_spec(spec("distributed", False))
    with pytest.raises(ValueError, match="mode 'distributed'"):
        normalize_spec(spec("central", True))
