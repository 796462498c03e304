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
    assert bound.bound >= worst * 1.25
    with torch.no_grad():  # an almost untrained model: scores near 0, the bound still above
        for block in model.blocks:
            block.attn.q.weight.mul_(1e-3)
    small = measure_score_bound(model, text)
    assert 0 < small.max_abs_score < 1e-3 and small.bound >= small.max_abs_score * 1.25
    model = _model()
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


def _train_tiny(variant: str):
    import argparse

    from confide.node.aero_training import add_model_arguments, train_variant

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--d-model", "32", "--layers", "2", "--heads", "4", "--d-ff",
                              "64", "--max-len", "16", "--steps", "3", "--batch-size", "2",
                              "--eval-articles", "2"])
    return train_variant(variant, _text(8), _text(3, 48), 64, args)


def test_aero_train_out_stores_the_measured_bound_and_a_node_serves_it_max_free(tmp_path):
    """``confide aero train --out`` (write_trained with out=): the file carries the bound that
    training measured, checked on the held-out text, so a node serving a copy of it tells the
    data owner to run the max-free softmax; a variant without a bound gets CrypTen's."""
    import shutil

    from confide.cli.main import _softmax_mode
    from confide.node.aero import load_aero
    from confide.node.aero_training import write_trained
    from confide.node.private_inference import TokenizerSpec

    spec = TokenizerSpec("minilm", tuple(range(100, 164)), 0)
    served = {}
    for variant in ("aero", "baseline"):
        model, record = _train_tiny(variant)
        out = write_trained(model, spec, _text(3, 48),
                            out=str(tmp_path / "out" / f"{variant}.safetensors"))
        loaded = load_aero(out)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
        folder = tmp_path / "node" / "private"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, folder / out.name)
        served[variant] = (PrivateModelRegistry(folder).get(variant), record)
    aero, record = served["aero"]
    assert record["softmax_bound"] is not None and record["softmax_bound"] > 0
    assert aero.softmax_bound == record["softmax_bound"]
    assert aero.tokenizer == spec
    assert aero.public_config()["softmax_bound"] == record["softmax_bound"]
    assert _softmax_mode(aero.public_config()).startswith("max-free")
    baseline, record = served["baseline"]
    assert record["softmax_bound"] is None and baseline.softmax_bound is None
    assert _softmax_mode(baseline.public_config()).startswith("CrypTen")


def test_write_trained_refuses_a_bound_the_held_out_text_exceeds(tmp_path):
    from confide.node.aero_training import write_trained

    model, _ = _train_tiny("aero")
    worst, tokens = max_abs_score(model, _text(3, 48))
    model.softmax_bound = ScoreBound(worst * 0.5, worst * 0.5, tokens, 1.0)
    with pytest.raises(ScoreBoundError, match="beyond"):
        write_trained(model, None, _text(3, 48), out=str(tmp_path / "m.safetensors"))
    assert not list(tmp_path.iterdir())


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


def _cost(layers: int, rows: dict[str, tuple[float, float]]) -> dict:
    return {"shape": {"n_layers": 12}, "layers_measured": layers,
            "extrapolation": None if layers == 12 else f"{layers} block(s) measured ...",
            "rows": [{"config": name, "bytes": b, "seconds": s} for name, (b, s) in rows.items()]}


def test_direct_cost_rows_accumulate_one_configuration_at_a_time_beside_the_extrapolated():
    from confide.bench.private import _goals, combine_costs

    two = _cost(2, {"baseline": (10e9, 400.0), "aero": (2e9, 150.0)})
    previous = {"time": "t0", "cost": two}
    # the first direct row: extrapolated figures stay the goals' source until aero runs too
    cost, extrapolated = combine_costs(_cost(12, {"baseline": (11e9, 900.0)}), previous)
    assert cost["layers_measured"] == 12 and [r["config"] for r in cost["rows"]] == ["baseline"]
    assert extrapolated["layers_measured"] == 2
    assert {r["from_run"] for r in extrapolated["rows"]} == {"t0"}
    goals = _goals(cost, None, extrapolated)
    assert [g["measured"] for g in goals[:2]] == [pytest.approx(5.0), pytest.approx(400 / 150)]
    assert "2 block(s) measured" in goals[0]["text"] and "direct" not in goals[0]["text"]
    assert [g["met"] for g in _goals(cost, None, None)[:2]] == [None, None]
    # the next run adds aero: the baseline row is kept, saying which run measured it
    previous = {"time": "t1", "cost": cost, "cost_extrapolated": extrapolated}
    cost, extrapolated = combine_costs(_cost(12, {"aero": (2.5e9, 500.0)}), previous)
    assert [(r["config"], r.get("from_run")) for r in cost["rows"]] == [
        ("baseline", "t1"), ("aero", None)]
    assert {r["from_run"] for r in extrapolated["rows"]} == {"t0"}
    goals = _goals(cost, None, extrapolated)
    assert goals[0]["measured"] == pytest.approx(4.4) and goals[0]["met"] is True
    assert goals[1]["measured"] == pytest.approx(1.8) and goals[1]["met"] is False
    assert "direct 12-block" in goals[0]["text"] and "extrapolated from 2" in goals[0]["text"]
    # a later extrapolated run does not displace the direct figures; a rerun row replaces its own
    previous = {"time": "t2", "cost": cost, "cost_extrapolated": extrapolated}
    cost2, extrapolated2 = combine_costs(_cost(4, {"baseline": (9e9, 1.0)}), previous)
    assert cost2["layers_measured"] == 12 and extrapolated2["layers_measured"] == 4
    cost3, _ = combine_costs(_cost(12, {"baseline": (12e9, 1.0)}), previous)
    assert [(r["config"], r["bytes"]) for r in cost3["rows"]] == [
        ("baseline", 12e9), ("aero", 2.5e9)]
    # nothing run: the previous slots as they were; no previous at all: nothing
    assert combine_costs(None, previous)[0]["rows"][1]["from_run"] == "t2"
    assert combine_costs(None, None) == (None, None)


def test_cost_configs_option_names_every_cost_configuration_and_refuses_others():
    import argparse

    from confide.bench.private import COST_CONFIGS, add_arguments, cost_config_names

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert cost_config_names(args.cost_configs) == list(COST_CONFIGS)
    assert [c["name"] for c in cost_configs(50257, 5.0, 12)] == list(COST_CONFIGS)
    assert cost_config_names("aero-local-emb, baseline") == ["aero-local-emb", "baseline"]
    for bad in ("", "aero,gpt2"):
        with pytest.raises(SystemExit, match=r"cost configuration|--cost-configs"):
            cost_config_names(bad)
