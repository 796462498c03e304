"""Per-operation accounting (privacy.op_ledger), the max-free softmax (privacy.aero_2pc) and
the score bound's export check (node.aero_bound): plaintext parts, fast."""

from __future__ import annotations

import pytest
import torch

from confide.bench.private import cost_configs, extrapolate
from confide.node import aero_bound, private_inference
from confide.node.aero import AeroConfig, AeroModel
from confide.node.aero_bound import (
    ScoreBound,
    ScoreBoundError,
    check_score_bound,
    max_abs_score,
    measure_score_bound,
)
from confide.node.private_inference import PrivateModelRegistry, publish_model
from confide.privacy import aero_2pc
from confide.privacy.aero_2pc import MaxFreeSoftmax, fixed_point_round, weight_spec
from confide.privacy.mpc import CommStats, MpcError
from confide.privacy.op_ledger import OpLedger

TINY = {"max_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}


class Counter:
    """A party's running totals, advanced by hand."""

    def __init__(self) -> None:
        self.now = CommStats()

    def send(self, rounds: int, nbytes: int) -> None:
        self.now = self.now + CommStats(rounds, nbytes, 0.0)


def test_ledger_entries_add_up_to_the_total_and_leaks_show():
    counter = Counter()
    ledger = OpLedger(lambda: counter.now)
    ledger.begin()
    with ledger.scope("input"):
        pass
    for layer in range(2):
        with ledger.scope("softmax_max", layer):
            counter.send(7, 1000)
        with ledger.scope("softmax_exp", layer):
            counter.send(8, 300)
    with ledger.scope("head"):
        counter.send(1, 50)
    assert ledger.unaccounted() == CommStats()
    by_op = ledger.by_op()
    assert list(by_op) == ["input", "softmax_max", "softmax_exp", "head"]  # OPS order
    assert sum(v["bytes"] for v in by_op.values()) == counter.now.bytes == 2650
    assert sum(v["rounds"] for v in by_op.values()) == counter.now.rounds
    assert by_op["softmax_max"]["bytes"] == 2000
    counter.send(3, 99)  # communication outside any scope is reported, not lost
    assert ledger.unaccounted() == CommStats(3, 99, 0.0)
    assert ledger.to_dict()["unaccounted"] == {"bytes": 99, "rounds": 3}


def test_ledger_refuses_nesting_and_unknown_ops():
    ledger = OpLedger(CommStats)
    with pytest.raises(ValueError, match="unknown operation"), ledger.scope("matmul"):
        pass
    with ledger.scope("qkv", 0), pytest.raises(RuntimeError, match="do not nest"), \
            ledger.scope("ffn", 0):
        pass


def _rows(bound: float, t: int, heads: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.rand(heads, t, t, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    mask = torch.tril(torch.ones(t, t, dtype=torch.float64))
    return s, mask, s.masked_fill(mask == 0, float("-inf")).softmax(-1)


@pytest.mark.parametrize("bound", [1.0, 2.0, 4.0, 5.2])
@pytest.mark.parametrize("t", [16, 128])
def test_max_free_softmax_error_bound_on_its_stated_range(bound, t):
    """Scores anywhere in [-B, B] (uniform: harsher than trained attention), 16-bit fixed
    point emulated after every multiply: within 5e-3 of the exact softmax for B <= 5.2."""
    mf = MaxFreeSoftmax.tune(bound, t)
    s, mask, exact = _rows(bound, t)
    approx = mf.softmax(s, mask, q=fixed_point_round)
    assert (approx - exact).abs().max().item() < 5e-3
    assert (approx * (1 - mask)).abs().max().item() == 0  # the future stays masked
    assert 1.8 * 2**mf.exp_iters >= 2 * bound - (bound - mf.shift)  # exp valid on its range


def test_max_free_softmax_degrades_past_its_range_and_refuses_absurd_bounds():
    s, mask, exact = _rows(10.0, 32)
    approx = MaxFreeSoftmax.tune(10.0, 32).softmax(s, mask, q=fixed_point_round)
    assert (approx - exact).abs().max().item() > 0.1  # e^-20 underflows 16-bit fixed point
    for bad in (0.0, -1.0, aero_2pc.MAX_SOFTMAX_BOUND + 1):
        with pytest.raises(MpcError):
            MaxFreeSoftmax.tune(bad, 32)


def _model(seed: int = 0) -> AeroModel:
    return AeroModel(AeroConfig.softmax_only(64, seed=seed, **TINY)).eval()


def _text(n: int = 6, length: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (length,), generator=gen).tolist() for _ in range(n)]


def test_score_bound_is_measured_and_the_export_check_refuses_what_it_should(tmp_path):
    model, text = _model(), _text()
    bound = measure_score_bound(model, text)
    worst, tokens = max_abs_score(model, text)
    assert bound.max_abs_score == worst > 0 and tokens == 240
    assert bound.bound >= worst * 1.2
    assert check_score_bound(model, bound, text) == worst
    with pytest.raises(ScoreBoundError, match="no softmax bound"):
        check_score_bound(model, None, text)
    tight = ScoreBound(worst * 0.5, worst, tokens, 1.0)
    with pytest.raises(ScoreBoundError, match="beyond"):
        check_score_bound(model, tight, text)
    with pytest.raises(ScoreBoundError, match="beyond"):
        publish_model(model, tmp_path, "tight", softmax_bound=tight, calibration=text)
    with pytest.raises(ValueError, match="calibration"):
        publish_model(model, tmp_path, "nocal", softmax_bound=bound)
    assert not (tmp_path / "private" / "tight.safetensors").exists()


def test_a_published_bound_reaches_the_public_config(tmp_path):
    model, text = _model(), _text()
    bound = measure_score_bound(model, text)
    publish_model(model, tmp_path, "with", softmax_bound=bound, calibration=text)
    publish_model(model, tmp_path, "without")
    registry = PrivateModelRegistry(tmp_path / "private")
    served = registry.get("with")
    assert served.softmax_bound == bound.bound
    assert served.arch()["softmax_bound"] == bound.bound
    assert served.public_config()["softmax_bound"] == bound.bound
    assert "softmax_bound" not in registry.get("without").arch()
    assert private_inference.BOUND_KEY == aero_bound.BOUND_KEY


def test_scores_match_the_models_attention():
    model, ids = _model(), torch.tensor(_text(1, 16)[0])
    _, probs = model.forward_with_attentions(ids)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    for scores, p in zip(aero_bound.attention_scores(model, ids), probs, strict=True):
        assert torch.allclose(scores.masked_fill(~mask, float("-inf")).softmax(-1), p,
                              atol=1e-6)


def test_emulated_max_free_forward_keeps_the_top1():
    model, text = _model(), _text(2, 16)
    config = model.config.to_dict() | {"softmax_bound": measure_score_bound(model, text).bound}
    for window in text:
        ids = torch.tensor(window)
        emulated = aero_2pc.reference_forward(model.state_dict(), config, ids,
                                              emulate_max_free=True)
        with torch.no_grad():
            plain = model(ids)
        assert (emulated - plain).abs().max().item() < 1e-2
        assert torch.equal(emulated.argmax(-1), plain.argmax(-1))


def test_weight_spec_for_public_embedding_and_ffn_removal():
    config = AeroConfig.softmax_only(64, **TINY).to_dict()
    names = [n for n, _ in weight_spec(config, 8)]
    assert "tok_emb" in names and "blocks.1.ffn.weight" in names
    public = [n for n, _ in weight_spec(config | {"ffn_layers": 1}, 8, public_embedding=True)]
    assert "tok_emb" not in public and "blocks.0.ffn.weight" in public
    assert "blocks.1.ffn.weight" not in public
    with pytest.raises(MpcError, match="ffn_layers"):
        weight_spec(config | {"ffn_layers": 3}, 8)
    with pytest.raises(MpcError, match="softmax_bound"):
        weight_spec(config | {"softmax_bound": -1}, 8)


def test_cost_extrapolation_is_linear_by_block_kind():
    # measured: 2 blocks, block 0 with FFN, block 1 without; full: 12 blocks, 6 with FFN
    entry = {"bytes": 10, "rounds": 1, "seconds": 0.5}
    by_layer = {("head", -1): {"bytes": 100, "rounds": 2, "seconds": 1.0},
                ("qkv", 0): entry, ("ffn", 0): entry, ("qkv", 1): entry}
    out = extrapolate(by_layer, 12, 6, 1)
    assert out["head"]["bytes"] == 100
    assert out["qkv"]["bytes"] == 120 and out["ffn"]["bytes"] == 60
    assert out["qkv"]["seconds"] == 6.0
    names = [c["name"] for c in cost_configs(50257, 4.0, 2)]
    assert names[:4] == ["baseline", "ln-free", "softmax-only", "aero"]
    with pytest.raises(ValueError, match="block kind"):
        extrapolate({("qkv", 0): entry}, 12, 6, 6)
