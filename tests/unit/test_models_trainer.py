"""Devices, offline model construction and the LoRA trainer (tiny models; MiniLM and SmolLM2
from their package files)."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from confide.node.data import Example, synthetic_classification, synthetic_text
from confide.node.device import autocast, select_device
from confide.node.models import (
    ModelConfig,
    build_base_model,
    build_lora_model,
    default_target_modules,
    load_tokenizer,
    smollm2_cache_dir,
)
from confide.node.training.lora import LoraTrainer

TINY_CLS = ModelConfig(base="tiny-bert", num_labels=4, max_length=32)
TINY_LM = ModelConfig(task="causal-lm", base="tiny-llama", max_length=32)


@pytest.fixture(scope="module")
def cls_data() -> tuple[list[Example], list[Example]]:
    return synthetic_classification(480, 4, seed=0), synthetic_classification(200, 4, seed=1)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------------ device


def test_select_device_cpu_and_auto() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device().type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
@pytest.mark.parametrize("pref", ["cuda", "cuda:0", "cuda:3"])
def test_select_device_cuda_unavailable(pref: str) -> None:
    with pytest.raises(ValueError, match=r"CUDA is not available.*'auto' or 'cpu'"):
        select_device(pref)


def test_select_device_cuda_index_out_of_range() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ValueError, match="CUDA device"):
        select_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("pref", ["tpu", "cuda:x", "gpu", "cuda:-1"])
def test_select_device_unknown(pref: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        select_device(pref)


def test_autocast_is_a_no_op_on_cpu() -> None:
    ctx = autocast(torch.device("cpu"))
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# ------------------------------------------------------------------------------ ModelConfig


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"task": "translation"}, "unknown task"),
        ({"base": "gpt-17"}, "unknown base"),
        ({"base": ""}, "non-empty"),
        ({"task": "causal-lm", "base": "minilm"}, "does not support task"),
        ({"task": "causal-lm", "base": "tiny-bert"}, "does not support task"),
        ({"num_labels": 1}, "num_labels"),
        ({"max_length": 1}, "max_length"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": 0.0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": ("query", "")}, "target_modules"),
        ({"target_modules": ["query"]}, "target_modules"),
        ({"seed": -1}, "seed"),
    ],
)
def test_model_config_validation(overrides: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**overrides).validate()


def test_model_config_valid_forms(tmp_path: Path) -> None:
    ModelConfig().validate()
    ModelConfig(task="causal-lm", base="smollm2", num_labels=0).validate()  # labels unused
    ModelConfig(base="tiny-llama", num_labels=3).validate()
    with pytest.raises(ValueError, match="unknown base"):
        ModelConfig(base=str(tmp_path)).validate()  # a directory without a model
    (tmp_path / "config.json").write_text("{}")
    ModelConfig(base=str(tmp_path)).validate()  # a local model directory
    cfg = ModelConfig(base="minilm", num_labels=5, target_modules=("query", "key"), seed=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"bogus": 1})


def test_default_target_modules() -> None:
    bert = build_base_model(TINY_CLS)
    llama = build_base_model(TINY_LM)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    assert default_target_modules(bert) == ["query", "value"]
    assert default_target_modules(llama) == ["q_proj", "v_proj"]
    assert default_target_modules(gpt2) == ["c_attn"]
    with pytest.raises(ValueError, match="target_modules"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_tokenizers_have_pad_tokens() -> None:
    for cfg in (TINY_CLS, TINY_LM):
        tokenizer = load_tokenizer(cfg)
        assert tokenizer.pad_token_id is not None
        assert tokenizer.padding_side == "right"


# ------------------------------------------------------------------------------ construction


def test_lora_model_trains_only_adapters_and_head() -> None:
    model, _ = build_lora_model(TINY_CLS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n or ".classifier.modules_to_save." in n for n in trainable)
    assert any(".classifier." in n for n in trainable)
    lm, _ = build_lora_model(TINY_LM)
    assert all("lora_" in n for n, p in lm.named_parameters() if p.requires_grad)


def test_identical_seeds_build_identical_models() -> None:
    before = torch.random.get_rng_state()
    a, b = LoraTrainer(TINY_CLS), LoraTrainer(TINY_CLS)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    assert_same_tensors(a.trainable_state(), b.trainable_state())
    assert_same_tensors(a.model.state_dict(), b.model.state_dict())
    other = LoraTrainer(ModelConfig(base="tiny-bert", num_labels=4, max_length=32, seed=1))
    assert any(
        not torch.equal(x, y)
        for x, y in zip(a.trainable_state().values(), other.trainable_state().values(), strict=True)
    )


# ------------------------------------------------------------------------------ training


def test_tiny_bert_classification_learns(cls_data) -> None:
    train, test = cls_data
    trainer = LoraTrainer(TINY_CLS)
    before = trainer.evaluate(test)
    seen: list[tuple[int, int]] = []
    stats = trainer.train(
        train,
        epochs=2,
        max_steps=50,
        learning_rate=1e-2,
        progress=lambda step, total, loss: seen.append((step, total)),
    )
    after = trainer.evaluate(test)
    assert stats["steps"] == 50
    assert stats["num_examples"] == len(train)
    assert seen == [(s, 50) for s in range(1, 51)]
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.7  # chance is 0.25
    assert trainer.model.training


def test_train_is_seeded_and_leaves_rng_alone(cls_data) -> None:
    train, _ = cls_data
    a, b = LoraTrainer(TINY_CLS), LoraTrainer(TINY_CLS)
    before = torch.random.get_rng_state()
    stats_a = a.train(train[:64], epochs=1, batch_size=16, seed=7)
    stats_b = b.train(train[:64], epochs=1, batch_size=16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert stats_a == stats_b
    assert stats_a["steps"] == 4
    assert_same_tensors(a.trainable_state(), b.trainable_state())


def test_epochs_and_max_steps(cls_data) -> None:
    train, _ = cls_data
    trainer = LoraTrainer(TINY_CLS)
    assert trainer.train(train[:20], epochs=3, batch_size=8)["steps"] == 9
    assert trainer.train(train[:20], epochs=3, batch_size=8, max_steps=4)["steps"] == 4
    assert trainer.train(train[:20], epochs=1, batch_size=8, max_steps=10)["steps"] == 3


def test_progress_callback_can_abort_training(cls_data) -> None:
    train, _ = cls_data
    trainer = LoraTrainer(TINY_CLS)

    def stop(step: int, total: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        trainer.train(train[:64], progress=stop)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.train(train[:32])["steps"] == 2  # still usable


def test_local_directory_base(tmp_path: Path) -> None:
    build_base_model(TINY_LM).save_pretrained(tmp_path)
    load_tokenizer(TINY_LM).save_pretrained(tmp_path)
    trainer = LoraTrainer(ModelConfig(task="causal-lm", base=str(tmp_path), max_length=32))
    reference = LoraTrainer(TINY_LM)
    assert_same_tensors(trainer.trainable_state(), reference.trainable_state())
    assert math.isclose(
        trainer.evaluate(synthetic_text(8, seed=0))["loss"],
        reference.evaluate(synthetic_text(8, seed=0))["loss"],
        rel_tol=1e-5,
    )


def test_train_rejects_bad_input() -> None:
    trainer = LoraTrainer(TINY_CLS)
    with pytest.raises(ValueError, match="no examples"):
        trainer.train([])
    with pytest.raises(ValueError, match="no examples"):
        trainer.evaluate([])
    for label in (4, -1, None):
        with pytest.raises(ValueError, match=r"example 1 has label.*\[0, 4\)"):
            trainer.train([Example("ok", 0), Example("bad", label)])
    with pytest.raises(ValueError, match="batch_size"):
        trainer.train([Example("ok", 0)], batch_size=0)


def test_tiny_llama_causal_lm_learns() -> None:
    trainer = LoraTrainer(TINY_LM)
    held_out = synthetic_text(64, seed=1)
    before = trainer.evaluate(held_out)
    stats = trainer.train(synthetic_text(480, seed=0), epochs=2, max_steps=40, learning_rate=1e-2)
    after = trainer.evaluate(held_out)
    assert set(after) == {"loss", "perplexity"}
    assert stats["loss_last"] < stats["loss_first"] - 2.0
    assert after["loss"] < before["loss"] - 2.0
    assert math.isclose(after["perplexity"], math.exp(after["loss"]), rel_tol=1e-6)


def test_causal_lm_evaluation_ignores_padding() -> None:
    trainer = LoraTrainer(TINY_LM)
    texts = [*synthetic_text(6, seed=3), Example("anna likes the red car")]
    one_by_one = trainer.evaluate(texts, batch_size=1)
    padded = trainer.evaluate(texts, batch_size=7)
    assert math.isclose(one_by_one["loss"], padded["loss"], rel_tol=1e-4)


# ------------------------------------------------------------------------------ state


def test_trainable_state_round_trip(tmp_path: Path, cls_data) -> None:
    train, test = cls_data
    source = LoraTrainer(TINY_CLS)
    source.train(train[:64], learning_rate=1e-2)
    state = source.trainable_state()
    trainable = [p for p in source.model.parameters() if p.requires_grad]
    assert len(state) == len(trainable)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in trainable)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    assert list(state) == list(source.trainable_state())  # stable order

    # through memory
    target = LoraTrainer(TINY_CLS)
    target.load_trainable_state(state)
    assert_same_tensors(target.trainable_state(), state)
    assert target.evaluate(test[:40]) == source.evaluate(test[:40])
    state[next(iter(state))].add_(1.0)  # the trainer holds its own copy
    assert not torch.equal(target.trainable_state()[next(iter(state))], state[next(iter(state))])

    # through a safetensors file
    path = tmp_path / "adapters" / "round1.safetensors"
    source.save_trainable_state(path)
    assert [p.name for p in path.parent.iterdir()] == ["round1.safetensors"]
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.read_bytes()[8:9] == b"{" and header_len < path.stat().st_size  # not a pickle
    loaded = LoraTrainer.load_state_file(path)
    assert_same_tensors(loaded, source.trainable_state())
    fresh = LoraTrainer(TINY_CLS)
    fresh.load_trainable_state(loaded)
    assert_same_tensors(fresh.trainable_state(), source.trainable_state())


def test_load_trainable_state_is_strict() -> None:
    trainer = LoraTrainer(TINY_CLS)
    state = trainer.trainable_state()
    first = next(iter(state))

    missing = dict(state)
    del missing[first]
    with pytest.raises(ValueError, match=re.escape(f"missing [{first}]")):
        trainer.load_trainable_state(missing)

    extra = {**state, "base_model.model.bogus.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=re.escape("unexpected [base_model.model.bogus.weight]")):
        trainer.load_trainable_state(extra)

    wrong = {**state, first: torch.zeros(3, 3)}
    pattern = f"wrong shapes.*{re.escape(first)}: got " + re.escape("(3, 3)")
    with pytest.raises(ValueError, match=pattern):
        trainer.load_trainable_state(wrong)

    other_rank = LoraTrainer(ModelConfig(base="tiny-bert", num_labels=4, lora_r=4))
    with pytest.raises(ValueError, match="wrong shapes"):
        trainer.load_trainable_state(other_rank.trainable_state())

    # a failed load changes nothing
    assert_same_tensors(trainer.trainable_state(), state)


def test_load_trainable_state_converts_dtype() -> None:
    trainer = LoraTrainer(TINY_CLS)
    state = {k: (v + 0.5).to(torch.float64) for k, v in trainer.trainable_state().items()}
    trainer.load_trainable_state(state)
    for name, value in trainer.trainable_state().items():
        assert torch.allclose(value, state[name].float())


# ------------------------------------------------------------------------------ real bases


def test_minilm_loads_offline_and_runs() -> None:
    trainer = LoraTrainer(ModelConfig(base="minilm", num_labels=5, max_length=64))
    assert trainer.model.base_model.model.config.hidden_size == 384
    examples = [Example("Shares rose sharply after the results.", 0), Example("A new album.", 1)]
    result = trainer.evaluate(examples)
    assert math.isfinite(result["loss"])
    stats = trainer.train(examples, max_steps=1)
    assert stats["steps"] == 1 and math.isfinite(stats["loss_first"])


def test_smollm2_loads_from_gguf_and_caches(tmp_path: Path) -> None:
    cfg = ModelConfig(task="causal-lm", base="smollm2", max_length=32)
    start = time.perf_counter()
    model = build_base_model(cfg, cache_dir=tmp_path)  # GGUF -> float32 -> safetensors cache
    tokenizer = load_tokenizer(cfg, cache_dir=tmp_path)
    first_load = time.perf_counter() - start
    cache = smollm2_cache_dir(tmp_path)
    assert (cache / "model.safetensors").is_file()
    assert (cache / "confide-source.json").is_file()
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token_id is not None

    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert logits.shape[-1] >= len(tokenizer) - 1 and torch.isfinite(logits).all()

    del model
    start = time.perf_counter()
    cached = build_base_model(cfg, cache_dir=tmp_path)  # now from the safetensors copy
    cached_load = time.perf_counter() - start
    with torch.no_grad():
        again = cached(**batch).logits
    torch.testing.assert_close(again, logits)
    del cached

    # classification on the cached copy: a seeded new "score" head, padded batches via eos-as-pad
    classifier = LoraTrainer(
        ModelConfig(base="smollm2", num_labels=3, max_length=16), cache_dir=tmp_path
    )
    assert classifier.model.base_model.model.config.pad_token_id == tokenizer.pad_token_id
    result = classifier.evaluate([Example("A short one.", 0), Example("A longer sentence.", 2)])
    assert math.isfinite(result["loss"])
    print(f"smollm2: first load {first_load:.1f}s, cached load {cached_load:.1f}s")
    shutil.rmtree(cache)  # 0.5 GB: do not leave it in pytest's kept tmp dirs


def test_sgd_with_a_head_rate_moves_only_the_head_when_the_body_rate_is_tiny(cls_data) -> None:
    """Per-group rates and plain SGD (Ferret's paper): the head gets its own rate."""
    from confide.node.methods.head import is_head_parameter
    from confide.node.training.lora import parameter_groups

    trainer = LoraTrainer(TINY_CLS)
    groups = parameter_groups(trainer.model, 1e-3, 5e-2)
    assert [g["lr"] for g in groups] == [1e-3, 5e-2]
    head_names = [n for n, p in trainer.model.named_parameters()
                  if p.requires_grad and is_head_parameter(n)]
    assert head_names and all("classifier" in n for n in head_names)
    before = trainer.trainable_state()
    trainer.train(cls_data[0][:32], max_steps=2, batch_size=16, learning_rate=1e-12,
                  optimizer="sgd", head_learning_rate=5e-2)
    after = trainer.trainable_state()
    moved = {n for n in before if not torch.allclose(before[n], after[n], atol=1e-9)}
    assert moved and all("classifier" in n for n in moved), moved
    with pytest.raises(ValueError, match="optimizer"):
        trainer.train(cls_data[0][:16], max_steps=1, optimizer="lion")
