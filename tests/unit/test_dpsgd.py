"""Example-level DP-SGD (privacy.dpsgd) and its calibration.

Per-example gradients from Opacus are checked against a loop over single examples on a tiny
random BERT with a PEFT LoRA adapter (padding included); the private step against clipping,
summing and scaling done by hand from that loop; the clipped norms against C; the noise std
against sigma*C with a chi-square test on empty-batch steps (the update is pure noise then);
Poisson batches by their size distribution; calibration and composition against dp-accounting
called directly.
"""

from __future__ import annotations

import copy
import logging
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from confide.privacy.dp import RdpAccountant, SampledGaussian
from confide.privacy.dpsgd import (
    DPSGD,
    calibrate_noise_multiplier,
    clip_and_sum,
    planned_event,
    poisson_batches,
)

pytestmark = pytest.mark.filterwarnings(
    # Opacus' full backward hooks under frozen embeddings: torch warns, the grads are right
    "ignore:Full backward hook is firing:UserWarning"
)

ALPHA = 1e-6
"""False-alarm probability of each statistical test (fixed seeds make each outcome fixed; the
bound says how surprising a failure would be for a correct implementation)."""

N_EXAMPLES = 8
LABELS = 3


def _tiny_lora_bert(seed: int = 0):
    """A 2-layer, 32-wide BERT classifier with random weights and LoRA r=4 on query/value plus a
    trainable head (PEFT), dropout 0 so train() mode is deterministic. LoRA B is made non-zero
    so every adapter weight gets a gradient."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = get_peft_model(
        BertForSequenceClassification(config),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            modules_to_save=["classifier"],
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.train()
    return model


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (N_EXAMPLES, 10), generator=g)
    mask = torch.ones(N_EXAMPLES, 10, dtype=torch.long)
    mask[: N_EXAMPLES // 2, 6:] = 0  # half the examples padded: padding must not leak across
    labels = torch.randint(0, LABELS, (N_EXAMPLES,), generator=g)
    return ids, mask, labels


def _loss_fn(model, data):
    ids, mask, labels = data

    def per_example_loss(batch):
        out = model(input_ids=ids[batch], attention_mask=mask[batch])
        return torch.nn.functional.cross_entropy(out.logits, labels[batch], reduction="none")

    return per_example_loss


def _loop_gradients(model, data, batch):
    """Each example's gradient, one backward pass per example (the reference)."""
    loss_fn = _loss_fn(model, data)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = []
    for i in batch:
        model.zero_grad(set_to_none=True)
        loss_fn([i]).sum().backward()
        grads.append({n: p.grad.detach().to(torch.float64).clone() for n, p in trainable})
    return grads


def _dpsgd(model, *, clip, sigma, q=0.5, n=N_EXAMPLES, seed=0):
    return DPSGD(
        model,
        clip_norm=clip,
        noise_multiplier=sigma,
        sample_rate=q,
        n_examples=n,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.fixture(scope="module")
def lora_setup():
    model = _tiny_lora_bert()
    reference = copy.deepcopy(model)
    data = _data()
    batch = [0, 2, 3, 5, 6]
    return model, reference, data, batch


# --------------------------------------------------------------------------- per-example grads


def test_per_example_gradients_equal_a_loop_over_single_examples(lora_setup):
    model, reference, data, batch = lora_setup
    expected = _loop_gradients(reference, data, batch)
    dp = _dpsgd(model, clip=1.0, sigma=0.0)
    try:
        dp.module.zero_grad(set_to_none=True)
        _loss_fn(model, data)(batch).sum().backward()
        assert set(dp.params) == set(expected[0])
        for name, p in dp.params.items():
            assert p.grad_sample.shape == (len(batch), *p.shape)
            for row, example in enumerate(expected):
                torch.testing.assert_close(
                    p.grad_sample[row].to(torch.float64), example[name], rtol=1e-4, atol=1e-6
                )
        # the gradients are not trivially zero (the comparison above means something)
        assert all(float(sum(g.norm() ** 2 for g in e.values())) > 1e-6 for e in expected)
    finally:
        dp.close()


def test_private_step_is_the_clipped_sum_over_expected_batch_size(lora_setup):
    _, reference, data, batch = lora_setup
    model = copy.deepcopy(reference)
    expected = _loop_gradients(reference, data, batch)
    clip = 0.05  # below most per-example norms, so clipping is active
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in e.values())) for e in expected]
    assert any(n > clip for n in norms)
    q = 0.5
    dp = _dpsgd(model, clip=clip, sigma=0.0, q=q)
    try:
        stats_ = dp.private_step(batch, _loss_fn(model, data))
        assert stats_.batch_size == len(batch)
        assert stats_.clipped_fraction == pytest.approx(sum(n > clip for n in norms) / len(batch))
        assert stats_.max_norm == pytest.approx(max(norms), rel=1e-4)
        for name, p in dp.params.items():
            want = sum(
                e[name] * min(1.0, clip / (n + 1e-6)) for e, n in zip(expected, norms, strict=True)
            ) / (q * N_EXAMPLES)
            torch.testing.assert_close(p.grad.to(torch.float64), want, rtol=1e-4, atol=1e-7)
            assert p.grad_sample is None  # nothing left over for the next step
    finally:
        dp.close()


def test_optimizer_steps_on_the_private_gradient(lora_setup):
    _, reference, data, batch = lora_setup
    model = copy.deepcopy(reference)
    dp = _dpsgd(model, clip=1.0, sigma=1.0, seed=3)
    before = {n: p.detach().clone() for n, p in dp.params.items()}
    optimizer = torch.optim.SGD(list(dp.params.values()), lr=0.1)
    try:
        dp.private_step(batch, _loss_fn(model, data), optimizer)
        for name, p in dp.params.items():
            torch.testing.assert_close(p.detach(), before[name] - 0.1 * p.grad)
    finally:
        dp.close()


def test_eval_mode_and_bad_losses_are_refused(lora_setup):
    _, reference, data, batch = lora_setup
    model = copy.deepcopy(reference)
    dp = _dpsgd(model, clip=1.0, sigma=1.0)
    try:
        model.eval()
        with pytest.raises(RuntimeError, match="train"):
            dp.private_step(batch, _loss_fn(model, data))
        model.train()
        with pytest.raises(ValueError, match="one loss per example"):
            dp.private_step(batch, lambda b: _loss_fn(model, data)(b).mean())
    finally:
        dp.close()


# --------------------------------------------------------------------------- clipping


def test_each_clipped_contribution_is_at_most_c():
    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([1e-8, 0.3, 1.0, 2.0, 1e3, 1e12])[:, None, None]
    a = torch.randn(6, 4, 3, generator=g, dtype=torch.float64) * scales
    b = torch.randn(6, 7, generator=g, dtype=torch.float64) * scales[:, :, 0]
    clip = 1.0
    sums, norms, factors = clip_and_sum([a, b], clip)
    row_norms = torch.sqrt(a.pow(2).sum(dim=(1, 2)) + b.pow(2).sum(dim=1))
    torch.testing.assert_close(norms, row_norms)
    clipped_norms = factors * row_norms
    assert bool((clipped_norms <= clip).all()), clipped_norms
    # examples above C end at C (to Opacus' 1e-6 stabilizer), examples below are untouched
    big = row_norms > clip
    torch.testing.assert_close(
        clipped_norms[big],
        torch.full((int(big.sum()),), clip, dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    assert bool((factors[~big] == 1.0).all())
    torch.testing.assert_close(sums[0], (factors[:, None, None] * a).sum(0))
    torch.testing.assert_close(sums[1], (factors[:, None] * b).sum(0))


def test_clipped_contributions_of_real_grad_samples_are_at_most_c(lora_setup):
    _, reference, data, batch = lora_setup
    model = copy.deepcopy(reference)
    dp = _dpsgd(model, clip=0.02, sigma=0.0)
    try:
        _loss_fn(model, data)(batch).sum().backward()
        samples = [p.grad_sample for p in dp.params.values()]
        _, norms, factors = clip_and_sum(samples, 0.02)
        # each example's clipped gradient over all trainable parameters, from the grad samples
        clipped = torch.cat(
            [factors[:, None] * s.reshape(len(batch), -1).double() for s in samples], dim=1
        )
        per_example = clipped.norm(dim=1)
        assert bool((norms > 0.02).any())
        assert bool((per_example <= 0.02).all()), per_example
    finally:
        dp.close()


def test_clip_and_sum_refuses_nan_and_bad_c():
    with pytest.raises(ValueError, match="NaN"):
        clip_and_sum([torch.tensor([[float("nan")]])], 1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_and_sum([torch.ones(2, 2)], 0.0)


# --------------------------------------------------------------------------- noise


def test_noise_std_is_sigma_times_c():
    """Empty batches: the released gradient is noise / (q N), so (q N) * grad ~ N(0, (sigma C)^2)
    per coordinate. 100 steps x 2,000 coordinates; sigma and C chosen so that sigma, C, sigma/C
    or a forgotten q N scaling all give a variance far outside the chi-square interval (+-1.5%)."""
    sigma, clip, q, n = 1.3, 2.5, 0.25, 40
    model = torch.nn.Sequential(torch.nn.Linear(40, 50))
    model.train()
    dp = _dpsgd(model, clip=clip, sigma=sigma, q=q, n=n, seed=11)

    def never_called(batch):
        raise AssertionError("an empty batch must not run the model")

    draws = []
    try:
        for _ in range(100):
            step = dp.private_step([], never_called)
            assert step.batch_size == 0 and step.noise_std == pytest.approx(sigma * clip)
            draws.append(torch.cat([p.grad.reshape(-1) for p in dp.params.values()]) * (q * n))
    finally:
        dp.close()
    values = torch.cat(draws).to(torch.float64).numpy()
    m = values.size
    expected = (sigma * clip) ** 2
    low = stats.chi2.ppf(ALPHA / 2, m - 1) / (m - 1) * expected
    high = stats.chi2.ppf(1 - ALPHA / 2, m - 1) / (m - 1) * expected
    assert low <= values.var(ddof=1) <= high, (values.std(), sigma * clip)
    assert abs(values.mean()) <= stats.norm.ppf(1 - ALPHA / 2) * sigma * clip / math.sqrt(m)
    # fresh noise every step
    assert not torch.equal(draws[0], draws[1])


# --------------------------------------------------------------------------- Poisson sampling


def test_poisson_batches_vary_in_size_with_the_right_mean():
    n, q, steps = 240, 64 / 240, 400
    batches = poisson_batches(n, q, steps, torch.Generator().manual_seed(2))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(batches) == steps
    assert len(set(sizes.tolist())) > 10  # not a fixed-size shortcut
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(float(sizes.mean()) - n * q) <= z * math.sqrt(n * q * (1 - q) / steps)
    # the variance is the binomial's, not smaller (chi-square, level ALPHA)
    var = float(sizes.var())
    expected = n * q * (1 - q)
    assert (
        stats.chi2.ppf(ALPHA / 2, steps - 1) / (steps - 1) * expected
        <= var
        <= stats.chi2.ppf(1 - ALPHA / 2, steps - 1) / (steps - 1) * expected
    )
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)
    # every example is drawn at rate q (no example favoured)
    counts = torch.zeros(n)
    for b in batches:
        counts[b] += 1
    _, p = stats.chisquare(counts.numpy())
    assert p > ALPHA


def test_poisson_batches_can_be_empty_and_are_reproducible():
    batches = poisson_batches(10, 0.1, 200, torch.Generator().manual_seed(4))
    assert any(len(b) == 0 for b in batches)  # P(empty) = 0.9^10 = 0.35 per step
    assert batches == poisson_batches(10, 0.1, 200, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError):
        poisson_batches(10, 1.5, 1, torch.Generator())


# --------------------------------------------------------------------------- calibration


def _reference_epsilon(events, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()
    for sigma, q, steps in events:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("target", [8.0, 3.0, 1.0])
def test_calibration_matches_the_reference_library_for_a_node(target, caplog):
    # the benchmark's node: 240 examples, expected batch 64, 3 rounds x 12 local steps
    q, rounds, local, delta = 64 / 240, 3, 12, 1e-5
    with caplog.at_level(logging.WARNING, logger="absl"):
        sigma = calibrate_noise_multiplier(target, delta, q, rounds, local)
    assert not [r for r in caplog.records if r.name == "absl"]  # the flood is silenced
    reached = _reference_epsilon([(sigma, q, rounds * local)], delta)
    assert reached <= target
    assert reached == pytest.approx(target, rel=1e-3)  # the smallest such sigma, not any
    assert _reference_epsilon([(sigma * 0.99, q, rounds * local)], delta) > target
    event = planned_event(sigma, q, rounds, local)
    assert event == SampledGaussian(sigma, q, rounds * local)
    assert RdpAccountant().epsilon(sigma, q, event.steps, delta) == pytest.approx(reached)


def test_composed_epsilon_equals_one_reference_run_and_beats_summing():
    events = [(1.1, 0.27, 36), (0.9, 0.1, 100), (2.0, 1.0, 5)]
    delta = 1e-5
    accountant = RdpAccountant()
    composed = accountant.composed_epsilon([SampledGaussian(*e) for e in events], delta)
    assert composed == pytest.approx(_reference_epsilon(events, delta), rel=1e-12)
    assert composed < sum(accountant.epsilon(*e, delta) for e in events)
    assert accountant.composed_epsilon([], delta) == 0.0
    assert accountant.composed_epsilon([SampledGaussian(0.0, 0.1, 3)], delta) == math.inf
