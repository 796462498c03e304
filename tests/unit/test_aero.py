"""node.aero: the switches build the intended structure, attention is causal, the entropy
regularizer behaves as specified, training lowers the loss and files round-trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from confide.node.aero import (
    AeroConfig,
    AeroModel,
    EntropyRegConfig,
    SigmoidGELU,
    bbc_token_sequences,
    entropy_penalty,
    load_aero,
    make_blocks,
    perplexity,
    save_aero,
    train_aero,
    vocab_size_of,
)

TINY = {"max_len": 16, "d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64}


def module_types(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def test_baseline_has_layernorm_gelu_and_ffn():
    model = AeroModel(AeroConfig.baseline(64, **TINY))
    types = module_types(model)
    assert torch.nn.LayerNorm in types and SigmoidGELU in types
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules()) == 2 * 2 + 1
    assert all(hasattr(block, "ffn") for block in model.blocks)


def test_softmax_only_has_no_layernorm_and_no_activation():
    model = AeroModel(AeroConfig.softmax_only(64, **TINY))
    types = module_types(model)
    assert torch.nn.LayerNorm not in types
    assert not types & {SigmoidGELU, torch.nn.GELU, torch.nn.ReLU}
    assert not any("ln" in name for name, _ in model.named_parameters())
    # the learnable scalars of normalization="scaled"
    names = dict(model.named_parameters())
    assert names["blocks.0.attn_scale"].shape == ()
    assert names["blocks.1.attn.logit_scale"].shape == (4,)


def test_other_switches():
    relu = AeroModel(AeroConfig.baseline(64, activation="relu", **TINY))
    assert torch.nn.ReLU in module_types(relu) and SigmoidGELU not in module_types(relu)
    no_ffn = AeroModel(AeroConfig.softmax_only(64, ffn=False, **TINY))
    assert not any(hasattr(block, "ffn") for block in no_ffn.blocks)
    wn = AeroModel(AeroConfig.softmax_only(64, normalization="weight", **TINY))
    names = {name for name, _ in wn.named_parameters()}
    assert "blocks.0.attn.q.weight_v" in names and "blocks.0.attn.q.weight_g" in names
    assert "blocks.0.attn.q.weight" not in names
    untied = AeroModel(AeroConfig.baseline(64, tie_embeddings=False, **TINY))
    assert "lm_head.weight" in dict(untied.named_parameters())


def test_vocab_from_tokenizer_or_int():
    class FakeTokenizer:
        def __len__(self) -> int:
            return 123

    assert vocab_size_of(FakeTokenizer()) == 123
    assert AeroConfig.baseline(FakeTokenizer(), **TINY).vocab_size == 123
    assert AeroConfig.softmax_only(77, **TINY).vocab_size == 77
    with pytest.raises(ValueError, match="divisible"):
        AeroConfig.baseline(64, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="activation"):
        AeroConfig.baseline(64, activation="swish")


@pytest.mark.parametrize("preset", ["baseline", "softmax_only"])
def test_causal_future_tokens_do_not_change_past_logits(preset):
    model = AeroModel(getattr(AeroConfig, preset)(64, init_std=0.2, **TINY)).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 64
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)
    # the attention itself is lower-triangular
    _, attentions = model.forward_with_attentions(ids)
    assert all(torch.all(p.triu(diagonal=1) == 0) for p in attentions)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(2, 4, 12))


def test_entropy_penalty_zero_inside_margin_positive_outside():
    layers, batch, heads, t = 2, 3, 4, 8
    max_ent = math.log(t)
    thresholds = torch.full((layers, heads), 0.5)
    inside = torch.full((layers, batch, heads, t), 0.5 * max_ent + 0.15 * max_ent)
    assert entropy_penalty(inside, thresholds, margin=0.2, coeff=1.0) == 0
    outside = torch.full((layers, batch, heads, t), 0.5 * max_ent + 0.3 * max_ent)
    penalty = entropy_penalty(outside, thresholds, margin=0.2, coeff=1.0)
    expected = (0.3 * max_ent) ** 2 * batch * t  # summed over batch and positions, mean over L, H
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    assert entropy_penalty(outside, thresholds, margin=0.2, coeff=1e-5).item() == pytest.approx(
        expected * 1e-5, rel=1e-5)
    # too low an entropy (collapsed heads) is penalized as well
    low = torch.zeros((layers, batch, heads, t))
    assert entropy_penalty(low, thresholds, margin=0.2, coeff=1.0) > 0
    # "row" mode measures against ln(i + 1): a uniform causal attention sits at fraction 1
    uniform = torch.log(torch.arange(1, t + 1).float()).expand(layers, batch, heads, t)
    assert entropy_penalty(uniform, torch.ones(layers, heads), max_entropy="row") == 0


def test_entropies_from_the_model_and_gradient_reaches_thresholds():
    cfg = AeroConfig.softmax_only(64, init_std=0.2, **TINY)
    model = AeroModel(cfg)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ent = model.attention_entropies(ids)
    assert ent.shape == (2, 2, 4, 10)
    assert torch.all(ent >= -1e-6) and torch.all(ent <= math.log(10) + 1e-5)
    assert ent[:, :, :, 0].abs().max() < 1e-6  # the first row attends to itself only
    # thresholds far from the entropies -> a positive penalty whose gradient reaches them
    with torch.no_grad():
        for block in model.blocks:
            block.attn.entropy_threshold.fill_(3.0)
    model.zero_grad()
    _, attentions = model.forward_with_attentions(ids)
    penalty = model.entropy_penalty(attentions)
    assert penalty > 0
    penalty.backward()
    assert all(block.attn.entropy_threshold.grad.abs().sum() > 0 for block in model.blocks)


def test_per_layer_thresholds_are_independent_parameters():
    model = AeroModel(AeroConfig.softmax_only(64, **TINY))
    params = [block.attn.entropy_threshold for block in model.blocks]
    assert params[0] is not params[1]
    assert params[0].data_ptr() != params[1].data_ptr()
    named = dict(model.named_parameters())
    assert named["blocks.0.attn.entropy_threshold"] is params[0]
    assert named["blocks.1.attn.entropy_threshold"] is params[1]
    with torch.no_grad():
        params[1][2] = 0.9
    thresholds = model.entropy_thresholds()
    assert thresholds.shape == (2, 4)
    assert thresholds[1, 2].item() == pytest.approx(0.9)
    assert torch.all(thresholds[0] == 0.5)  # layer 0 untouched
    # the penalty of layer 1 depends on layer 1's thresholds only
    ent = torch.rand(2, 1, 4, 8)
    grad = torch.autograd.grad(model.entropy_penalty(ent), params)
    ent_only_layer0 = ent.clone()
    ent_only_layer0[1] = model.entropy_thresholds()[1].detach()[None, :, None] * math.log(8)
    grad0 = torch.autograd.grad(model.entropy_penalty(ent_only_layer0), params)
    assert grad[1].abs().sum() > 0 and grad0[1].abs().sum() == 0


def test_entropy_reg_off_means_no_thresholds_and_zero_penalty():
    model = AeroModel(AeroConfig.baseline(64, **TINY))
    assert not any("entropy_threshold" in n for n, _ in model.named_parameters())
    assert model.entropy_penalty(torch.rand(2, 1, 4, 8)) == 0


def _toy_sequences(n: int = 40, length: int = 33) -> list[list[int]]:
    # a learnable language: arithmetic progressions mod 32
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(n):
        start, step = torch.randint(0, 32, (2,), generator=gen).tolist()
        seqs.append([(start + (step % 4 + 1) * i) % 32 for i in range(length)])
    return seqs


@pytest.mark.parametrize("preset", ["baseline", "softmax_only"])
def test_a_few_training_steps_lower_the_loss(preset):
    torch.manual_seed(0)
    cfg = getattr(AeroConfig, preset)(32, **TINY)
    model = AeroModel(cfg)
    seqs = _toy_sequences()
    before = perplexity(model, seqs, block_len=17)
    history = train_aero(model, seqs, steps=40, batch_size=8, block_len=17, lr=3e-3)
    assert len(history) == 40
    first = sum(h["ce"] for h in history[:5]) / 5
    last = sum(h["ce"] for h in history[-5:]) / 5
    assert last < first - 0.3
    assert perplexity(model, seqs, block_len=17) < before
    if cfg.entropy_reg.enabled:
        assert all(h["loss"] >= h["ce"] for h in history)


def test_bbc_token_sequences_reads_the_offline_corpus():
    def tokenizer(text, **kwargs):  # a stand-in: one id per word length, capped
        return {"input_ids": [min(len(word), 63) for word in text.split()]}

    seqs = bbc_token_sequences(tokenizer, limit=3)
    assert len(seqs) == 3 and all(len(s) > 50 for s in seqs)
    model = AeroModel(AeroConfig.softmax_only(64, **TINY))
    assert perplexity(model, seqs, block_len=17) > 1.0


def test_make_blocks():
    blocks = make_blocks([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError):
        make_blocks([[1, 2]], 4)


def test_safetensors_round_trip(tmp_path):
    cfg = AeroConfig.softmax_only(
        64, init_std=0.2, seed=3,
        entropy_reg=EntropyRegConfig(enabled=True, coeff=2e-5, max_entropy="row"), **TINY)
    model = AeroModel(cfg).eval()
    path = save_aero(model, tmp_path / "aero.safetensors")
    raw = path.read_bytes()
    assert b"pickle" not in raw[:200] and raw[8:9] == b"{"  # a safetensors JSON header
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["confide.aero.config"])
    assert meta["entropy_reg"]["max_entropy"] == "row" and meta["layernorm"] is False
    loaded = load_aero(path)
    assert loaded.config == cfg
    ids = torch.randint(0, 64, (10,))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_load_rejects_a_file_without_config(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an AERO model"):
        load_aero(tmp_path / "other.safetensors")
