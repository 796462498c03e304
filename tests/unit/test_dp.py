"""DP building blocks (privacy.dp) and DP-LoRA's pure parts (node.methods.dp_lora).

The accountant is checked against dp-accounting called directly, clipping with property tests
(huge and tiny values included), the noise with a chi-square test of its variance at a fixed
seed, and the method's modes, aggregation, validation and budget stop without any daemon.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from confide.node.methods import ClientUpdate, get_method
from confide.node.methods.dp_lora import DPLoRAConfig
from confide.privacy.dp import (
    DEFAULT_ORDERS,
    RdpAccountant,
    clip_by_global_norm,
    gaussian_noise_like,
    l2_norm,
    secure_generator,
)

ALPHA = 1e-6
"""False-alarm probability of each statistical test (its outcome is fixed by the seed anyway;
the bound says how surprising a failure would be for a correct sampler)."""

SAMPLES = 200_000


def _reference_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """dp-accounting's RDP accountant, called directly."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return accountant.compose(event, steps).get_epsilon(delta)


def _assert_std(sample: torch.Tensor, expected_std: float) -> None:
    """Two-sided chi-square test of the variance and z-test of the mean, at level ALPHA."""
    values = sample.to(torch.float64).reshape(-1).numpy()
    n = values.size
    variance = values.var(ddof=1)
    low = stats.chi2.ppf(ALPHA / 2, n - 1) / (n - 1) * expected_std**2
    high = stats.chi2.ppf(1 - ALPHA / 2, n - 1) / (n - 1) * expected_std**2
    assert low <= variance <= high, (math.sqrt(variance), expected_std)
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(values.mean()) <= z * expected_std / math.sqrt(n)


# --------------------------------------------------------------------------- accountant


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta"),
    [
        (1.0, 1.0, 1, 1e-5),
        (1.0, 1.0, 5, 1e-5),
        (0.8, 0.5, 10, 1e-6),
        (1.1, 0.01, 1000, 1e-5),
        (4.0, 0.1, 100, 1e-3),
        (2.0, 1.0, 50, 1e-5),
    ],
)
def test_accountant_epsilon_is_dp_accountings(sigma, q, steps, delta):
    ours = RdpAccountant().epsilon(sigma, q, steps, delta)
    assert ours == pytest.approx(_reference_epsilon(sigma, q, steps, delta), rel=1e-12)
    assert 0 < ours < math.inf


def test_accountant_uses_dp_accountings_default_orders_and_edge_cases():
    assert tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS) == DEFAULT_ORDERS
    assert len(DEFAULT_ORDERS) == 156 and min(DEFAULT_ORDERS) > 1
    accountant = RdpAccountant()
    assert accountant.epsilon(1.0, 1.0, 0, 1e-5) == 0.0
    assert accountant.epsilon(0.0, 1.0, 3, 1e-5) == math.inf
    with pytest.raises(ValueError, match="delta"):
        accountant.epsilon(1.0, 1.0, 3, 0.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        accountant.epsilon(1.0, 1.5, 3, 1e-5)


def test_epsilon_grows_with_steps_and_shrinks_with_noise_and_sampling():
    accountant = RdpAccountant()
    by_steps = [accountant.epsilon(1.0, 1.0, t, 1e-5) for t in range(1, 8)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == len(by_steps)
    assert accountant.epsilon(2.0, 1.0, 5, 1e-5) < accountant.epsilon(1.0, 1.0, 5, 1e-5)
    assert accountant.epsilon(1.0, 0.2, 5, 1e-5) < accountant.epsilon(1.0, 1.0, 5, 1e-5)


def test_rdp_epsilon_upper_bounds_the_tight_pld_epsilon():
    """RDP is a (slightly loose) upper bound; dp-accounting's PLD accountant is tight."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.0)), 5
    )
    pld = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(1e-5)
    rdp = RdpAccountant().epsilon(1.0, 1.0, 5, 1e-5)
    assert pld <= rdp <= 1.25 * pld


@pytest.mark.parametrize(
    ("target", "delta", "q", "steps"),
    [(8.0, 1e-5, 1.0, 20), (1.0, 1e-5, 1.0, 3), (2.0, 1e-6, 0.1, 200), (0.5, 1e-5, 0.05, 50)],
)
def test_calibration_round_trips(target, delta, q, steps):
    accountant = RdpAccountant()
    sigma = accountant.noise_multiplier_for(target, delta, q, steps)
    reached = accountant.epsilon(sigma, q, steps, delta)
    assert reached <= target  # never more privacy spent than asked for
    assert reached == pytest.approx(target, rel=1e-3)
    # and it is the smallest such sigma, to the calibration's tolerance
    assert accountant.epsilon(sigma * (1 - 1e-3), q, steps, delta) > target


@pytest.mark.parametrize(
    ("target", "delta", "q", "steps", "message"),
    [
        (0.0, 1e-5, 1.0, 3, "target_epsilon"),
        (math.inf, 1e-5, 1.0, 3, "target_epsilon"),
        (1.0, 0.0, 1.0, 3, "delta"),
        (1.0, 1e-5, 0.0, 3, "step"),
        (1.0, 1e-5, 1.0, 0, "step"),
    ],
)
def test_calibration_rejects_meaningless_targets(target, delta, q, steps, message):
    with pytest.raises(ValueError, match=message):
        RdpAccountant().noise_multiplier_for(target, delta, q, steps)


def test_local_epsilon_is_the_unamplified_gaussian_at_twice_the_sensitivity():
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.5 / 2), 4)
    assert RdpAccountant().local_epsilon(1.5, 4, 1e-5) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-12
    )
    assert RdpAccountant().local_epsilon(1.5, 4, 1e-5) > RdpAccountant().epsilon(1.5, 1.0, 4, 1e-5)


# --------------------------------------------------------------------------- clipping


def test_l2_norm_is_the_global_norm_in_float64():
    tensors = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]], dtype=torch.float64)}
    assert l2_norm(tensors) == 5.0
    rng = torch.Generator().manual_seed(0)
    tensors = {"x": torch.randn(7, 5, generator=rng), "y": torch.randn(11, generator=rng)}
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors.values()])
    assert l2_norm(tensors) == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-14)
    # no overflow or underflow where the naive sum of squares would
    huge = {"a": torch.full((4,), 1e300, dtype=torch.float64)}
    assert l2_norm(huge) == pytest.approx(2e300, rel=1e-14)
    tiny = {"a": torch.full((4,), 1e-310, dtype=torch.float64)}
    assert l2_norm(tiny) == pytest.approx(2e-310, rel=1e-6)
    assert l2_norm({}) == 0.0
    with pytest.raises(ValueError, match="NaN or infinity"):
        l2_norm({"a": torch.tensor([float("nan")])})


def test_clip_scales_by_one_factor_and_returns_the_original_norm():
    tensors = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    clipped, norm = clip_by_global_norm(tensors, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert tensors["a"][0] == 3.0  # the input is not modified
    within, norm = clip_by_global_norm(tensors, 10.0)
    assert norm == 5.0 and all(torch.equal(within[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(tensors, 0.0)


def _float_arrays(dtype: torch.dtype):
    width = 32 if dtype == torch.float32 else 64
    element = st.floats(allow_nan=False, allow_infinity=False, width=width)
    return st.lists(st.lists(element, min_size=1, max_size=12), min_size=1, max_size=4).map(
        lambda arrays: {f"t{i}": torch.tensor(a, dtype=dtype) for i, a in enumerate(arrays)}
    )


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    max_norm=st.one_of(
        st.floats(min_value=1e-45, max_value=1e38),
        st.sampled_from([1e-45, 1e-40, 1e-30, 1e-12, 1.0, 1e12, 3e38]),
    ),
)
def test_clipped_norm_never_exceeds_the_bound(data, dtype, max_norm):
    tensors = data.draw(_float_arrays(dtype))
    clipped, norm = clip_by_global_norm(tensors, max_norm)
    assert norm == l2_norm(tensors)
    assert l2_norm(clipped) <= max_norm
    for name, tensor in tensors.items():
        assert clipped[name].dtype == tensor.dtype and clipped[name].shape == tensor.shape
        # one non-negative factor for everything: no sign flips, no growth
        assert bool((clipped[name].to(torch.float64) * tensor.to(torch.float64) >= 0).all())
        assert bool((clipped[name].abs() <= tensor.abs()).all())
    if norm <= max_norm:
        assert all(torch.equal(clipped[k], tensors[k]) for k in tensors)


# --------------------------------------------------------------------------- noise


def test_noise_std_matches_sigma_times_c():
    sigma, clip = 1.3, 0.7
    shape = {"a": torch.zeros(SAMPLES // 2, dtype=torch.float64), "b": torch.zeros(400, 250)}
    generator = torch.Generator().manual_seed(1234)
    noise = gaussian_noise_like(shape, sigma * clip, generator)
    assert noise["a"].dtype == torch.float64 and noise["b"].dtype == torch.float32
    assert noise["b"].shape == (400, 250)
    _assert_std(torch.cat([n.reshape(-1).to(torch.float64) for n in noise.values()]), sigma * clip)


def test_noise_is_reproducible_from_a_seed_and_unpredictable_from_urandom():
    shape = {"a": torch.zeros(64)}
    first = gaussian_noise_like(shape, 1.0, torch.Generator().manual_seed(5))
    again = gaussian_noise_like(shape, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(first["a"], again["a"])
    one = gaussian_noise_like(shape, 1.0, secure_generator())
    two = gaussian_noise_like(shape, 1.0, secure_generator())
    assert not torch.equal(one["a"], two["a"])


# --------------------------------------------------------------------------- DP-LoRA


NODE_LEVEL = {"unit": "node"}
"""These tests are of node-level DP-FedAvg (``unit: "node"``); example level is the default."""


def _method():
    return get_method("dp-lora")


def _states(size: int = 12) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(3)
    global_state = {
        "lora_A": torch.randn(size, 4, generator=generator),
        "lora_B": torch.randn(4, size, generator=generator),
        "head": torch.randn(size, generator=generator),
    }
    local_state = {
        k: v + 2.0 * torch.randn(v.shape, generator=generator) for k, v in global_state.items()
    }
    return global_state, local_state


def _delta(global_state, local_state):
    return {
        k: local_state[k].to(torch.float64) - global_state[k].to(torch.float64)
        for k in global_state
    }


def test_registered_under_its_job_name_with_a_frozen_config():
    method = _method()
    assert method.name == "dp-lora" and method.trainable == "lora"
    config = method.parse_config({**NODE_LEVEL, "noise_multiplier": 1.0})
    assert isinstance(config, DPLoRAConfig)
    assert (config.clip_norm, config.delta, config.mode, config.noise_seed) == (
        1.0,
        1e-5,
        "local",
        -1,
    )


def test_central_mode_sends_the_clipped_delta_and_nothing_else():
    method = _method()
    config = method.parse_config(
        {**NODE_LEVEL, "noise_multiplier": 1.0, "clip_norm": 0.5, "mode": "central"}
    )
    global_state, local_state = _states()
    memory: dict = {}
    payload = method.client_update(config, global_state, local_state, memory)
    expected, norm = clip_by_global_norm(_delta(global_state, local_state), 0.5)
    assert norm > 0.5  # the test really clips
    for name in global_state:
        assert payload[name].dtype == global_state[name].dtype
        assert torch.allclose(payload[name].to(torch.float64), expected[name], atol=1e-7)
    assert l2_norm(payload) <= 0.5
    assert memory == {}


def test_local_mode_never_sends_the_unnoised_delta_and_its_noise_is_sigma_c():
    method = _method()
    sigma, clip = 2.0, 0.25
    config = method.parse_config(
        {**NODE_LEVEL, "noise_multiplier": sigma, "clip_norm": clip, "noise_seed": 11}
    )
    global_state = {"w": torch.zeros(SAMPLES)}
    local_state = {"w": torch.linspace(-1, 1, SAMPLES)}
    payload = method.client_update(config, global_state, local_state, {})
    clipped, _ = clip_by_global_norm(_delta(global_state, local_state), clip)
    residual = payload["w"].to(torch.float64) - clipped["w"]
    _assert_std(residual, sigma * clip)
    # replayable with a noise_seed (tests only), fresh without one
    again = method.client_update(config, global_state, local_state, {})
    assert torch.equal(payload["w"], again["w"])
    secure = method.parse_config({**NODE_LEVEL, "noise_multiplier": sigma, "clip_norm": clip})
    first = method.client_update(secure, global_state, local_state, {})
    second = method.client_update(secure, global_state, local_state, {})
    assert not torch.equal(first["w"], second["w"])


def test_central_mode_adds_noise_of_std_sigma_c_once_to_the_sum():
    method = _method()
    sigma, clip, n = 1.5, 0.4, 4
    config = method.parse_config(
        {
            **NODE_LEVEL,
            "noise_multiplier": sigma,
            "clip_norm": clip,
            "mode": "central",
            "noise_seed": 3,
        }
    )
    global_state = {"w": torch.full((SAMPLES,), 0.5, dtype=torch.float64)}
    zero = {"w": torch.zeros(SAMPLES, dtype=torch.float64)}
    updates = [ClientUpdate(f"n{i}", zero, 10) for i in range(n)]
    result = method.aggregate(config, global_state, updates, round_number=2)
    # one draw of N(0, sigma^2 C^2) on the sum, then / n
    _assert_std(result["w"] - global_state["w"], sigma * clip / n)
    generator = method.coordinator_generator(config, 2)
    expected = 0.5 + gaussian_noise_like(zero, sigma * clip, generator)["w"] / n
    assert torch.allclose(result["w"], expected, rtol=0, atol=1e-15)


def test_local_mode_aggregate_is_the_plain_mean_and_adds_no_noise():
    method = _method()
    config = method.parse_config({**NODE_LEVEL, "noise_multiplier": 1.0})
    global_state = {"w": torch.ones(3), "h": torch.zeros(2, dtype=torch.float64)}
    updates = [
        ClientUpdate(
            "small", {"w": torch.full((3,), 1.0), "h": torch.ones(2, dtype=torch.float64)}, 1
        ),
        ClientUpdate(
            "large",
            {"w": torch.full((3,), 3.0), "h": torch.full((2,), 5.0, dtype=torch.float64)},
            1000,
        ),
    ]
    result = method.aggregate(config, global_state, updates, 1)
    # unweighted: the 1000-example node counts as much as the 1-example node
    assert torch.equal(result["w"], torch.full((3,), 3.0))
    assert torch.equal(result["h"], torch.full((2,), 3.0, dtype=torch.float64))
    assert result["w"].dtype == torch.float32 and result["h"].dtype == torch.float64


def test_central_mode_enforces_the_bound_on_an_unclipped_update():
    method = _method()
    config = method.parse_config(
        {
            **NODE_LEVEL,
            "noise_multiplier": 1e-12,
            "clip_norm": 1.0,
            "mode": "central",
            "noise_seed": 0,
        }
    )
    global_state = {"w": torch.zeros(4)}
    updates = [ClientUpdate("greedy", {"w": torch.full((4,), 100.0)}, 5)]
    result = method.aggregate(config, global_state, updates, 1)
    assert torch.allclose(result["w"], torch.full((4,), 0.5), atol=1e-6)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "noise_multiplier .* or target_epsilon .* required|required"),
        ({"noise_multiplier": 1.0, "clip_norm": 0.0}, "clip_norm"),
        ({"noise_multiplier": 1.0, "clip_norm": -2.0}, "clip_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"target_epsilon": -1.0, "noise_multiplier": 1.0}, "target_epsilon"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 2.0}, "delta"),
        ({"noise_multiplier": 1.0, "mode": "global"}, "mode"),
        ({"target_epsilon": 8.0}, "rounds"),
        ({"noise_multiplier": 1.0, "rounds": 5}, "rounds"),
        ({"noise_multiplier": 1.0, "noise_seed": -2}, "noise_seed"),
        ({"noise_multiplier": 1.0, "sigma": 1.0}, "no parameter"),
    ],
)
def test_config_validation_rejects_nonsense(params, message):
    with pytest.raises(ValueError, match=message):
        _method().parse_config({**NODE_LEVEL, **params})


def test_both_zero_names_both_ways_to_set_the_noise():
    with pytest.raises(ValueError) as info:
        _method().parse_config({**NODE_LEVEL, "noise_multiplier": 0.0, "target_epsilon": 0.0})
    assert "noise_multiplier" in str(info.value) and "target_epsilon" in str(info.value)
    assert "required" in str(info.value)


def _run_rounds(config, rounds: int, population: int, selected: int) -> int:
    """How many rounds before_round lets through (the round engine's loop)."""
    method = _method()
    for round_number in range(1, rounds + 1):
        if method.before_round(config, round_number, population, selected):
            return round_number - 1
    return rounds


@pytest.mark.parametrize(("population", "selected"), [(3, 3), (10, 2)])
def test_before_round_stops_exactly_when_the_budget_would_be_exceeded(population, selected):
    method = _method()
    accountant = RdpAccountant()
    q = min(1.0, selected / population)
    eps = [accountant.epsilon(1.0, q, r, 1e-5) for r in range(1, 7)]
    # a budget equal to epsilon after round 3 allows exactly rounds 1..3
    exact = method.parse_config({**NODE_LEVEL, "noise_multiplier": 1.0, "target_epsilon": eps[2]})
    assert _run_rounds(exact, 6, population, selected) == 3
    # between rounds 3 and 4: still 3; a hair below round 3's: 2
    between = method.parse_config(
        {**NODE_LEVEL, "noise_multiplier": 1.0, "target_epsilon": (eps[2] + eps[3]) / 2}
    )
    assert _run_rounds(between, 6, population, selected) == 3
    below = method.parse_config(
        {**NODE_LEVEL, "noise_multiplier": 1.0, "target_epsilon": eps[2] * (1 - 1e-9)}
    )
    assert _run_rounds(below, 6, population, selected) == 2
    reason = method.before_round(exact, 4, population, selected)
    assert reason.startswith(
        f"privacy budget epsilon={eps[2]:g} at delta=1e-05 would be "
        f"exceeded: after round 4 epsilon would be {eps[3]:.4g}"
    )


def test_a_target_with_rounds_calibrates_sigma_to_spend_it_in_those_rounds():
    method = _method()
    config = method.parse_config(
        {**NODE_LEVEL, "target_epsilon": 5.0, "rounds": 4, "mode": "central"}
    )
    sigma = method.noise_multiplier(config)
    assert sigma == RdpAccountant().noise_multiplier_for(5.0, 1e-5, 1.0, 4)
    assert _run_rounds(config, 10, 3, 3) == 4
    metrics = method.round_metrics(config, 4, 3, 3)
    assert 4.99 < metrics["epsilon"] <= 5.0
    # with sampling (q < 1) the same sigma spends less: more rounds fit the budget
    assert _run_rounds(config, 10, 6, 3) > 4


def test_round_metrics_report_epsilon_spent_so_far():
    method = _method()
    config = method.parse_config(
        {**NODE_LEVEL, "noise_multiplier": 1.2, "clip_norm": 0.8, "delta": 1e-6}
    )
    series = [method.round_metrics(config, r, 5, 5) for r in range(1, 5)]
    epsilons = [m["epsilon"] for m in series]
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 4
    for r, metrics in enumerate(series, start=1):
        assert metrics["epsilon"] == pytest.approx(_reference_epsilon(1.2, 1.0, r, 1e-6), rel=1e-12)
        assert metrics["noise_multiplier"] == 1.2 and metrics["clip_norm"] == 0.8
        assert metrics["delta"] == 1e-6 and metrics["sampling_rate"] == 1.0
        assert metrics["epsilon_local"] == RdpAccountant().local_epsilon(1.2, r, 1e-6)
    central = method.parse_config({**NODE_LEVEL, "noise_multiplier": 1.2, "mode": "central"})
    assert "epsilon_local" not in method.round_metrics(central, 1, 5, 5)
    # q = selected / population, clamped to (0, 1]
    assert method.round_metrics(config, 1, 10, 4)["sampling_rate"] == 0.4
    assert method.round_metrics(config, 1, 2, 3)["sampling_rate"] == 1.0


def test_no_budget_means_no_stop():
    config = _method().parse_config({**NODE_LEVEL, "noise_multiplier": 0.5})
    assert _run_rounds(config, 50, 2, 2) == 50
    assert np.isfinite(_method().round_metrics(config, 50, 2, 2)["epsilon"])
