"""SFPrompt: the U-shaped split (node.split) and the method (node.methods.sfprompt).

Tiny random-init models: the split's forward and backward must be the unsplit model's, the body
must see only hidden states and a mask, pruning keeps exactly the top EL2N fraction, local-loss
steps never call the server, and a few rounds on a learnable task lower the loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from confide.node.data import Example, synthetic_classification, synthetic_text
from confide.node.methods import ClientUpdate, get_method
from confide.node.methods.sfprompt import SFPrompt, SFPromptConfig, local_step_schedule
from confide.node.models import ModelConfig, load_tokenizer
from confide.node.split.body import LocalBody, activation_bytes
from confide.node.split.model import (
    SplitConfig,
    build_split,
    device_parts,
    server_part,
    split_costs,
    split_model,
)
from confide.node.split.pruning import el2n, top_fraction
from confide.node.split.trainer import (
    SplitTrainer,
    _traffic,
    build_split_trainer,
    wire_rel_error,
)
from confide.node.training.task import round_seed

HIDDEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(base="tiny-bert"))


def _bert(tokenizer, layers: int = 4, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=128, initializer_range=0.125,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def _llama_config(tokenizer, layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
        initializer_range=0.125, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, num_labels=3,
    )


def _llama(tokenizer, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config(tokenizer, layers))


def _batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["the red car and the blue ball", "anna likes", "a b c d e f g h i j"]


def _trainable_grads(head, tail) -> dict[str, torch.Tensor]:
    grads = {"head.prompts": head.prompts.grad.clone()}
    for name, param in tail.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            grads[f"tail.{name}"] = param.grad.clone()
    return grads


def _zero(*modules) -> None:
    for module in modules:
        for param in module.parameters():
            param.grad = None


# -------------------------------------------------------------------------------------------
# The split equals the unsplit model


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("cut", [(1, 1), (2, 0)])
def test_split_forward_and_backward_equal_the_unsplit_model(tokenizer, family, cut):
    """Through the real seam (SplitTrainer + LocalBody: detach, cast, re-attach), the loss,
    logits and gradients of the prompts and of every tail parameter are the HF model's."""
    model = _bert(tokenizer) if family == "bert" else _llama(tokenizer)
    head, body, tail = split_model(model, SplitConfig(head_layers=cut[0], tail_layers=cut[1],
                                                      num_prompts=3, prompt_seed=7))
    trainer = SplitTrainer(head, tail, tokenizer)
    ids, mask = _batch(tokenizer, TEXTS)  # padded on the right
    labels = (torch.tensor([0, 2, 1]) if family == "bert"
              else ids.masked_fill(mask == 0, -100))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    traffic = {"up": 0, "down": 0, "mask": 0, "calls": 0}
    loss = trainer._split_loss_step(batch, LocalBody(body), traffic)
    split_grads = _trainable_grads(head, tail)
    with torch.no_grad():
        _, split_logits = tail(body(head(ids, mask), head.extend_mask(mask)),
                               head.extend_mask(mask))
    _zero(model, head)

    full_labels = labels if family == "bert" else tail.full_labels(labels)
    out = model(inputs_embeds=head.embed(ids), attention_mask=head.extend_mask(mask),
                labels=full_labels)
    out.loss.backward()
    reference = _trainable_grads(head, tail)

    assert traffic["calls"] == 2
    torch.testing.assert_close(loss.detach(), out.loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_logits, out.logits.detach(), atol=1e-5, rtol=1e-5)
    assert sorted(split_grads) == sorted(reference)
    assert len(reference) > 1 and "head.prompts" in reference
    for name in reference:
        assert reference[name].abs().sum() > 0, name
        torch.testing.assert_close(split_grads[name], reference[name], atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_llama_sequence_classification_split_equals_unsplit(tokenizer):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, 3))
    head, body, tail = split_model(model, SplitConfig(head_layers=1, tail_layers=1,
                                                      num_prompts=2))
    # equal lengths: transformers cannot find the last token of padded inputs_embeds
    ids, mask = _batch(tokenizer, ["anna likes red", "ben eats blue"])
    labels = torch.tensor([2, 0])
    em = head.extend_mask(mask)
    loss, logits = tail(body(head(ids, mask), em), em, labels)
    loss.backward()
    split_grads = _trainable_grads(head, tail)
    _zero(model, head)
    out = model(inputs_embeds=head.embed(ids), attention_mask=em, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    for name, grad in _trainable_grads(head, tail).items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_what_trains_and_what_stays_frozen(tokenizer):
    model = _llama(tokenizer)
    head, body, tail = split_model(model, SplitConfig(head_layers=1, tail_layers=1))
    assert head.prompts.requires_grad and tuple(head.prompts.shape) == (8, HIDDEN)
    assert not any(p.requires_grad for n, p in head.named_parameters() if n != "prompts")
    assert not any(p.requires_grad for p in body.parameters())
    assert not tail.lm_head.weight.requires_grad  # vocabulary-sized: opt-in
    assert all(p.requires_grad for n, p in tail.named_parameters() if not n.startswith("lm_"))
    head, _, tail = split_model(_llama(tokenizer), SplitConfig(train_tail=False))
    assert not any(p.requires_grad for p in tail.parameters())
    _, _, tail = split_model(_llama(tokenizer), SplitConfig(train_lm_head=True))
    assert tail.lm_head.weight.requires_grad


def test_prompts_are_seeded_rows_of_the_vocabulary(tokenizer):
    a, _, _ = split_model(_bert(tokenizer), SplitConfig(num_prompts=5, prompt_seed=3))
    b, _, _ = split_model(_bert(tokenizer), SplitConfig(num_prompts=5, prompt_seed=3))
    c, _, _ = split_model(_bert(tokenizer), SplitConfig(num_prompts=5, prompt_seed=4))
    assert torch.equal(a.prompts, b.prompts) and not torch.equal(a.prompts, c.prompts)
    vocab = a.word_embeddings().weight
    for row in a.prompts:
        assert (vocab == row).all(-1).any()


# -------------------------------------------------------------------------------------------
# The seam


class RecordingBody:
    """A Body that records what crosses the seam and counts calls."""

    def __init__(self, inner: LocalBody) -> None:
        self.inner = inner
        self.forwards: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []
        self.backwards: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, step, hidden, attention_mask, *, train=True):
        self.forwards.append((step, hidden.clone(), attention_mask.clone(), train))
        return self.inner.forward(step, hidden, attention_mask, train=train)

    def backward(self, step, grad_output):
        grad = self.inner.backward(step, grad_output)
        self.backwards.append((step, grad_output.clone(), grad.clone()))
        return grad


@pytest.fixture(scope="module")
def bert_parts():
    return build_split(ModelConfig(base="tiny-bert", max_length=32),
                       SplitConfig(head_layers=1, tail_layers=0, num_prompts=4))


def _trainer(parts, **kwargs) -> SplitTrainer:
    return SplitTrainer(parts.head, parts.tail, parts.tokenizer, max_length=32, **kwargs)


def test_body_receives_only_float_hidden_states_and_a_mask(bert_parts):
    trainer = _trainer(bert_parts)
    start = trainer.trainable_state()
    body = RecordingBody(LocalBody(bert_parts.body))
    examples = synthetic_classification(12, 2, seed=1)
    trainer.train_round(examples, body, steps=2, batch_size=4, lr=1e-3)
    trainer.evaluate(examples[:4], body)
    trainer.load_trainable_state(start)

    encoded = trainer._batcher.encode(examples)
    all_ids = {tok for e in encoded for tok in e["input_ids"]}
    assert len(body.forwards) == 3 and len(body.backwards) == 2
    for _step, hidden, mask, _ in body.forwards:
        b, length, width = hidden.shape
        assert hidden.dtype == torch.float32 and width == HIDDEN
        assert mask.dtype == torch.bool and tuple(mask.shape) == (b, length)
        assert mask[:, :4].all()  # the prompts
        assert length - 4 <= 32 and mask.all(-1).any()  # dynamic padding, to the longest
        assert (mask[:, 1:] <= mask[:, :-1]).all()  # padded on the right
        # no token id or label travels: no integer tensor, and the hidden states are not
        # (a cast of) ids: they are not all integers
        assert not torch.equal(hidden, hidden.round())
        assert not set(hidden.flatten().tolist()) <= all_ids
    for _step, grad_out, grad_in in body.backwards:
        assert grad_out.dtype == torch.float32 and grad_out.dim() == 3
        assert grad_in.shape == grad_out.shape
    assert [f[3] for f in body.forwards] == [True, True, False]
    assert len({f[0] for f in body.forwards}) == 3  # unique step ids
    assert body.inner.pending == 0


def test_split_steps_call_the_body_twice_and_local_steps_never(bert_parts):
    trainer = _trainer(bert_parts)
    start = trainer.trainable_state()
    examples = synthetic_classification(8, 2, seed=2)
    body = RecordingBody(LocalBody(bert_parts.body))
    metrics = trainer.train_round(examples, body, steps=5, batch_size=4, lr=1e-3,
                                  local_loss_steps=2)
    assert len(body.forwards) == 3 and len(body.backwards) == 3
    assert metrics["body_calls"] == 6
    assert metrics["split_steps"] == 3 and metrics["local_loss_steps"] == 2
    assert metrics["steps"] == 5

    body = RecordingBody(LocalBody(bert_parts.body))
    metrics = trainer.train_round(examples, body, steps=3, batch_size=4, lr=1e-3,
                                  local_loss_steps=3)
    assert body.forwards == [] and body.backwards == []
    assert metrics["body_calls"] == 0 and metrics["activation_bytes_up"] == 0
    trainer.el2n_scores(examples)  # pruning scores: local path, no server either
    assert body.forwards == []
    trainer.load_trainable_state(start)


def test_float16_activations_halve_the_bytes(bert_parts):
    examples = synthetic_classification(8, 2, seed=3)
    results = {}
    for dtype in ("float32", "float16"):
        trainer = _trainer(bert_parts, activation_dtype=dtype)
        start = trainer.trainable_state()
        inner = LocalBody(bert_parts.body)
        body = RecordingBody(inner)
        metrics = trainer.train_round(examples, body, steps=2, batch_size=4, lr=1e-3, seed=5)
        trainer.load_trainable_state(start)
        assert all(h.dtype == getattr(torch, dtype) for _, h, _, _ in body.forwards)
        assert all(g.dtype == getattr(torch, dtype) for _, g, _ in body.backwards)
        assert inner.bytes_received == metrics["activation_bytes_up"]
        assert inner.bytes_sent == metrics["activation_bytes_down"]
        results[dtype] = metrics
    full, half = results["float32"], results["float16"]
    assert full["mask_bytes_up"] == half["mask_bytes_up"] > 0
    assert full["activation_bytes_down"] == 2 * half["activation_bytes_down"]
    assert (full["activation_bytes_up"] - full["mask_bytes_up"]
            == 2 * (half["activation_bytes_up"] - half["mask_bytes_up"]))
    # the closed form agrees with what was counted (one batch of 4, same length)
    _, hidden, _, _ = body.forwards[0]
    step = activation_bytes(hidden.shape[0], hidden.shape[1], HIDDEN, "float16")
    assert step["down"] == hidden.numel() * 2 * 2


def test_local_body_trains_only_with_a_learning_rate(tokenizer):
    model = _bert(tokenizer)
    head, body, _ = split_model(model, SplitConfig(head_layers=1, tail_layers=1))
    before = [p.detach().clone() for p in body.parameters()]
    ids, mask = _batch(tokenizer, TEXTS)
    em = head.extend_mask(mask).bool()
    frozen = LocalBody(body)
    out = frozen.forward(0, head(ids, mask).detach(), em)
    frozen.backward(0, torch.ones_like(out))
    assert all(torch.equal(a, b) for a, b in zip(before, body.parameters(), strict=True))
    trained = LocalBody(body, lr=1e-2, optimizer="sgd")
    out = trained.forward(1, head(ids, mask).detach(), em)
    trained.backward(1, torch.ones_like(out))
    assert any(not torch.equal(a, b) for a, b in zip(before, body.parameters(), strict=True))
    with pytest.raises(ValueError, match="no forward of step 1"):
        trained.backward(1, torch.ones_like(out))
    small = LocalBody(body, max_pending=2)
    for step in range(3):
        small.forward(step, out, em)
    assert small.pending == 2
    with pytest.raises(ValueError, match="step 0"):
        small.backward(0, torch.ones_like(out))
    with pytest.raises(ValueError, match="floating"):
        small.forward(9, ids, mask)


# -------------------------------------------------------------------------------------------
# Pruning


def test_top_fraction_keeps_exactly_the_top_gamma_with_ties_by_index():
    scores = [0.5, 0.9, 0.5, 0.1, 0.9, float("nan")]
    assert top_fraction(scores, 1.0) == [0, 1, 2, 3, 4, 5]
    assert top_fraction(scores, 0.5) == [0, 1, 4]  # ceil(3.0); 0.5 tie: index 0 before 2
    assert top_fraction(scores, 0.67) == [0, 1, 2, 3, 4]  # ceil(4.02) = 5; NaN ranks last
    assert top_fraction(scores, 0.3) == [1, 4]  # ceil(1.8) = 2
    assert top_fraction(scores, 0.01) == [1]  # at least one; 0.9 tie: index 1 before 4
    assert len(top_fraction([1.0] * 10, 0.3)) == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert top_fraction([], 0.5) == []
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        top_fraction(scores, 0.0)


def test_el2n_is_the_distance_of_the_softmax_from_the_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    expected = (torch.softmax(logits, -1) - torch.eye(3)[labels]).norm(dim=-1)
    torch.testing.assert_close(el2n(logits, labels, "sequence-classification"), expected)
    # causal LM: mean over predicted tokens; the last prompt predicts the first token
    torch.manual_seed(0)
    logits = torch.randn(2, 2 + 4, 5)
    labels = torch.tensor([[1, 2, 3, -100], [4, 0, -100, -100]])
    probs = torch.softmax(logits, -1)
    want = []
    for b in range(2):
        per = [(probs[b, 1 + t] - torch.eye(5)[labels[b, t]]).norm()
               for t in range(4) if labels[b, t] != -100]
        want.append(torch.stack(per).mean())
    torch.testing.assert_close(el2n(logits, labels, "causal-lm", 2), torch.stack(want))


def test_prune_keeps_the_highest_el2n_examples(bert_parts, monkeypatch):
    trainer = _trainer(bert_parts)
    examples = synthetic_classification(10, 2, seed=4)
    scores = trainer.el2n_scores(examples)
    assert len(scores) == 10 and all(0.0 <= s <= math.sqrt(2) + 1e-6 for s in scores)
    kept = trainer.prune(examples, 0.35, by_label=False)
    assert len(kept) == 4
    kept_scores = sorted(scores[examples.index(e)] for e in kept)
    dropped = [s for e, s in zip(examples, scores, strict=True) if e not in kept]
    assert min(kept_scores) >= max(dropped)
    # ties by index, original order kept
    monkeypatch.setattr(trainer, "el2n_scores",
                        lambda ex, batch_size=16: [0.2, 0.7, 0.7, 0.1, 0.7, 0.2, 0, 0, 0, 0])
    assert trainer.prune(examples, 0.2, by_label=False) == [examples[1], examples[2]]
    # 0.2 tie between indices 0 and 5: index 0 wins; the result is in the original order
    assert trainer.prune(examples, 0.4, by_label=False) == [
        examples[0], examples[1], examples[2], examples[4]]
    # by label (the default): the top 40% of each label, so both labels survive
    by_label = trainer.prune(examples, 0.4)
    for label in (0, 1):
        group = [i for i, e in enumerate(examples) if e.label == label]
        fake = [0.2, 0.7, 0.7, 0.1, 0.7, 0.2, 0, 0, 0, 0]
        want = sorted(sorted(group, key=lambda i: (-fake[i], i))[:math.ceil(0.4 * len(group))])
        assert [e for e in by_label if e.label == label] == [examples[i] for i in want]

    def boom(*args, **kwargs):
        raise AssertionError("gamma = 1 must not score")

    monkeypatch.setattr(trainer, "el2n_scores", boom)
    assert trainer.prune(examples, 1.0) == examples


# -------------------------------------------------------------------------------------------
# Rounds, state, aggregation


def test_rounds_lower_the_loss_on_a_learnable_task(bert_parts):
    trainer = _trainer(bert_parts)
    start = trainer.trainable_state()
    body = LocalBody(bert_parts.body)
    examples = synthetic_classification(32, 2, seed=0)
    before = trainer.evaluate(examples, body)
    for round_number in range(3):
        trainer.train_round(examples, body, steps=10, batch_size=16, lr=1e-2,
                            local_loss_steps=2, seed=round_number)
    after = trainer.evaluate(examples, body)
    trainer.load_trainable_state(start)
    assert after["loss"] < before["loss"] - 0.3
    assert after["accuracy"] >= 0.75 > before["accuracy"]


def test_causal_lm_split_training_lowers_perplexity():
    parts = build_split(ModelConfig(base="tiny-llama", task="causal-lm", max_length=24),
                        SplitConfig(head_layers=1, tail_layers=0, num_prompts=4))
    trainer = SplitTrainer(parts.head, parts.tail, parts.tokenizer, max_length=24)
    body = LocalBody(parts.body)
    examples = synthetic_text(16, seed=0)
    before = trainer.evaluate(examples, body)
    metrics = trainer.train_round(examples, body, steps=6, batch_size=8, lr=3e-2,
                                  local_loss_steps=2)
    after = trainer.evaluate(examples, body)
    assert metrics["body_calls"] == 8  # 4 split steps, 2 local-loss steps in their place
    assert after["perplexity"] < before["perplexity"]
    assert sorted(trainer.trainable_state()) == ["head.prompts", "tail.norm.weight"]


def test_trainable_state_round_trips_and_is_strict(bert_parts):
    trainer = _trainer(bert_parts)
    state = trainer.trainable_state()
    assert list(state) == sorted(state)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    assert set(state) == {"head.prompts", "tail.classifier.bias", "tail.classifier.weight",
                          "tail.pooler.dense.bias", "tail.pooler.dense.weight"}
    moved = {name: t + 0.5 for name, t in state.items()}
    trainer.load_trainable_state(moved)
    assert all(torch.equal(trainer.trainable_state()[n], moved[n]) for n in state)
    with pytest.raises(ValueError, match="missing"):
        trainer.load_trainable_state({"head.prompts": state["head.prompts"]})
    with pytest.raises(ValueError, match="wrong shapes"):
        trainer.load_trainable_state({**state, "head.prompts": torch.zeros(3, HIDDEN)})
    trainer.load_trainable_state(state)


def test_two_devices_aggregate_by_example_weighted_mean(bert_parts):
    method = get_method("sfprompt") if "sfprompt" in _registry() else SFPrompt()
    assert method.name == "sfprompt" and method.trainable == "sfprompt"
    config = method.parse_config({"num_prompts": 4, "tail_layers": 0})
    trainer = _trainer(bert_parts)
    global_state = trainer.trainable_state()
    body = LocalBody(bert_parts.body)
    locals_, counts = [], []
    for device, n in enumerate((8, 24)):
        trainer.load_trainable_state(global_state)
        examples = synthetic_classification(n, 2, seed=10 + device)
        trainer.train_round(examples, body, steps=2, batch_size=8, lr=1e-2, seed=device)
        locals_.append(trainer.trainable_state())
        counts.append(n)
    trainer.load_trainable_state(global_state)
    updates = [
        ClientUpdate(f"d{i}", method.client_update(config, global_state, local, {}), n)
        for i, (local, n) in enumerate(zip(locals_, counts, strict=True))
    ]
    for update in updates:
        method.check_update(config, global_state, update.payload)
    result = method.aggregate(config, global_state, updates, 1)
    for name in global_state:
        expected = (locals_[0][name] * 8 + locals_[1][name] * 24) / 32
        torch.testing.assert_close(result[name], expected, atol=1e-6, rtol=1e-5)
        assert not torch.equal(locals_[0][name], locals_[1][name])


def _registry() -> set[str]:
    from confide.node.methods import REGISTRY

    return set(REGISTRY)


# -------------------------------------------------------------------------------------------
# Configuration, building, costs


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"head_layers": 0}, "head_layers must be an integer >= 1"),
        ({"tail_layers": -1}, "tail_layers must be an integer >= 0"),
        ({"prune_gamma": 0.0}, "prune_gamma"),
        ({"prune_gamma": 1.5}, "prune_gamma"),
        ({"activation_dtype": "int8"}, "activation_dtype must be one of float32"),
        ({"body_lr": -0.1}, "body_lr"),
        ({"train_tail": "yes"}, "train_tail must be true or false"),
        ({"num_prompts": 0, "train_tail": False}, "nothing to train"),
        ({"local_loss_steps": 1.5}, "must be an integer"),
        ({"round_steps": 4, "local_loss_steps": 5}, "cannot exceed round_steps"),
        ({"local_loss_schedule": "first"}, "local_loss_schedule must be one of last"),
        ({"prune_method": "loss"}, "prune_method must be one of el2n, random"),
        ({"prune_warmup_steps": -1}, "prune_warmup_steps must be an integer >= 0"),
        ({"split_steps": 3}, "has no parameter"),
        ({"prompts": 3}, "has no parameter"),
    ],
)
def test_config_validation_errors_are_clear(params, needle):
    with pytest.raises(ValueError, match=needle):
        SFPrompt().parse_config(params)


def test_config_defaults_and_struct_numbers():
    config = SFPrompt().parse_config({"num_prompts": 16.0, "prune_gamma": 1, "body_lr": 0})
    assert isinstance(config, SFPromptConfig)
    assert config.num_prompts == 16 and config.activation_dtype == "float32"
    split = SplitConfig.from_method(config, seed=5)
    assert (split.num_prompts, split.prompt_seed, split.head_layers) == (16, 5, 1)


def test_split_rejects_bad_cuts_and_other_architectures(tokenizer):
    with pytest.raises(ValueError, match="leaves no layer for the server"):
        split_model(_bert(tokenizer, layers=2), SplitConfig(head_layers=1, tail_layers=1))
    with pytest.raises(ValueError, match="cannot split GPT2LMHeadModel"):
        split_model(GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2)), SplitConfig())
    with pytest.raises(ValueError, match="head_layers must be an integer >= 1"):
        split_model(_bert(tokenizer), SplitConfig(head_layers=0))


def test_device_and_server_parts_hold_only_their_side(tokenizer):
    full_head, full_body, full_tail = split_model(_bert(tokenizer), SplitConfig())
    head, tail = device_parts(_bert(tokenizer), SplitConfig())
    body = server_part(_bert(tokenizer), SplitConfig())
    assert len(head.stack.layers) == 1 and len(tail.stack.layers) == 1
    assert len(body.stack.layers) == 2
    device_ids = {id(p) for m in (head, tail) for p in m.parameters()}
    assert not device_ids & {id(p) for p in body.parameters()}
    # same seed, same weights on every party
    for a, b in ((full_head, head), (full_body, body), (full_tail, tail)):
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(),
                                      strict=True):
            assert na == nb and torch.equal(pa, pb)
    model = _bert(tokenizer)
    device_parts(model, SplitConfig())
    assert len(model.bert.encoder.layer) == 2  # the body layers are gone from the model
    trainer = build_split_trainer(ModelConfig(base="tiny-bert"),
                                  SFPromptConfig(tail_layers=0, num_prompts=2))
    assert trainer.trainable_state()["head.prompts"].shape == (2, HIDDEN)


def test_split_costs_count_every_parameter_once(tokenizer):
    model = _llama(tokenizer, layers=6)
    total = sum(p.numel() for p in model.parameters())
    head, body, tail = split_model(model, SplitConfig(head_layers=2, tail_layers=1,
                                                      num_prompts=4))
    costs = split_costs(head, body, tail, seq_len=36)
    assert costs.total_params == total + 4 * HIDDEN
    assert costs.device_params + costs.body.params == costs.total_params
    assert costs.body.trainable_params == 0
    assert costs.head.trainable_params == 4 * HIDDEN
    assert 0 < costs.device_flop_share < 1 and 0 < costs.device_param_share < 1
    # one body layer = one head layer in FLOPs (same shapes): 3 body layers, 2 head layers
    layer = costs.body.forward_flops / 3
    assert costs.head.forward_flops == pytest.approx(2 * layer)
    assert costs.tail.train_flops > costs.tail.forward_flops
    data = costs.as_dict()
    assert data["device_flop_share"] == costs.device_flop_share


def test_bert_truncates_to_fit_the_prompts(tokenizer):
    model = _bert(tokenizer)
    head, _, tail = split_model(model, SplitConfig(num_prompts=8))
    trainer = SplitTrainer(head, tail, tokenizer, max_length=1000)
    assert trainer.max_length == 512 - 8
    too_long = torch.ones(1, 510, dtype=torch.long)
    with pytest.raises(ValueError, match="exceed the model's 512 positions"):
        head(too_long, torch.ones_like(too_long))
    assert trainer.evaluate([Example("word " * 600, 0)])["accuracy"] in (0.0, 1.0)


# -------------------------------------------------------------------------------------------
# Local-loss steps in place of split steps, wire precision, pruning controls


@pytest.mark.parametrize("schedule", ["last", "interleave"])
@pytest.mark.parametrize(("total", "local"), [(6, 0), (6, 2), (7, 3), (5, 5), (1, 0)])
def test_local_step_schedule_keeps_the_count_and_places_the_local_steps(schedule, total,
                                                                         local):
    plan = local_step_schedule(total, local, schedule)
    assert len(plan) == total and sum(plan) == local
    if schedule == "last":
        assert plan == [False] * (total - local) + [True] * local


def test_interleaved_local_steps_are_spread_evenly():
    assert local_step_schedule(6, 2, "interleave") == [False, False, True, False, False, True]
    assert local_step_schedule(4, 2, "interleave") == [False, True, False, True]
    with pytest.raises(ValueError, match="local_loss_steps <= steps"):
        local_step_schedule(3, 4)
    with pytest.raises(ValueError, match="local_loss_schedule must be one of"):
        local_step_schedule(3, 1, "first")


@pytest.mark.parametrize("schedule", ["last", "interleave"])
def test_local_loss_steps_replace_split_steps_on_the_schedule(bert_parts, schedule):
    trainer = _trainer(bert_parts)
    start = trainer.trainable_state()
    examples = synthetic_classification(8, 2, seed=2)
    body = RecordingBody(LocalBody(bert_parts.body))
    calls: list[int] = []
    metrics = trainer.train_round(examples, body, steps=6, batch_size=4, lr=1e-3,
                                  local_loss_steps=2, schedule=schedule,
                                  progress=lambda done, total, loss: calls.append(
                                      len(body.forwards)))
    trainer.load_trainable_state(start)
    assert metrics["steps"] == 6  # the round's work is fixed; only which steps are local
    assert metrics["split_steps"] == 4 and metrics["local_loss_steps"] == 2
    # a step went through the server iff the body's forward count grew at that step
    through_server = [b > a for a, b in zip([0, *calls], calls, strict=False)]
    assert [not s for s in through_server] == local_step_schedule(6, 2, schedule)
    with pytest.raises(ValueError, match="replace some of the steps"):
        trainer.train_round(examples, body, steps=2, local_loss_steps=3)
    with pytest.raises(ValueError, match="split steps need a body"):
        trainer.train_round(examples, None, steps=2, local_loss_steps=1)


def _one_step_gradients(parts, dtype: str, examples) -> tuple[dict, dict]:
    """The trainable gradients after one split step in ``dtype``, and the round's counters."""
    trainer = _trainer(parts, activation_dtype=dtype)
    batch = next(trainer._batcher.in_order(examples, trainer._batcher.encode(examples), 8))
    for param in trainer._params.values():
        param.grad = None
    traffic = _traffic()
    trainer._split_loss_step(batch, LocalBody(parts.body), traffic)
    grads = {name: p.grad.detach().clone() for name, p in trainer._params.items()}
    for param in trainer._params.values():
        param.grad = None
    return grads, traffic


def test_half_precision_wire_error_is_measured_against_float32(bert_parts):
    """bf16 / fp16 activations and gradients on the split link: the rounding of what is sent,
    and what it does to one step's prompt gradient, measured against float32."""
    examples = synthetic_classification(8, 2, seed=7)
    exact, traffic32 = _one_step_gradients(bert_parts, "float32", examples)
    assert wire_rel_error(traffic32, "activation") == 0.0
    assert wire_rel_error(traffic32, "gradient") == 0.0
    # unit roundoff: bfloat16 keeps 8 significant bits (2^-9), float16 11 (2^-12)
    for dtype, roundoff in (("bfloat16", 2.0 ** -9), ("float16", 2.0 ** -12)):
        grads, traffic = _one_step_gradients(bert_parts, dtype, examples)
        for kind in ("activation", "gradient"):
            error = wire_rel_error(traffic, kind)
            assert 0.0 < error <= roundoff, (dtype, kind, error)
        prompt = exact["head.prompts"]
        end_to_end = float((grads["head.prompts"] - prompt).norm() / prompt.norm())
        # four roundings (h up, z down, g_z up, g_h down) and the float32 head/tail around
        assert 0.0 < end_to_end < 8 * roundoff * 4, (dtype, end_to_end)
    # the round's metrics carry the same measurement
    trainer = _trainer(bert_parts, activation_dtype="bfloat16")
    start = trainer.trainable_state()
    metrics = trainer.train_round(examples, LocalBody(bert_parts.body), steps=2, batch_size=4,
                                  lr=1e-3)
    trainer.load_trainable_state(start)
    assert 0.0 < metrics["activation_wire_rel_error"] <= 2.0 ** -9
    assert 0.0 < metrics["gradient_wire_rel_error"] <= 2.0 ** -9


def test_random_pruning_is_the_seeded_control_and_scores_nothing(bert_parts, monkeypatch):
    trainer = _trainer(bert_parts)
    examples = synthetic_classification(20, 2, seed=4)

    def boom(*args, **kwargs):
        raise AssertionError("random pruning must not score")

    monkeypatch.setattr(trainer, "el2n_scores", boom)
    first = trainer.prune(examples, 0.5, method="random", seed=3)
    assert first == trainer.prune(examples, 0.5, method="random", seed=3)
    assert first != trainer.prune(examples, 0.5, method="random", seed=4)
    for label in (0, 1):  # by label, as EL2N keeps them
        group = [e for e in examples if e.label == label]
        assert sum(e.label == label for e in first) == math.ceil(0.5 * len(group))
    with pytest.raises(ValueError, match="method must be one of el2n, random"):
        trainer.prune(examples, 0.5, method="loss")


def test_el2n_warm_up_trains_the_scorer_then_puts_the_state_back(bert_parts, monkeypatch):
    trainer = _trainer(bert_parts)
    examples = synthetic_classification(32, 2, seed=0)
    start = trainer.trainable_state()
    untrained = trainer.el2n_scores(examples)
    seen: list[list[float]] = []
    score = trainer.el2n_scores

    def recording(ex, batch_size=16):
        seen.append(score(ex, batch_size=batch_size))
        return seen[-1]

    monkeypatch.setattr(trainer, "el2n_scores", recording)
    kept = trainer.prune(examples, 0.5, warmup_steps=12, lr=1e-2, batch_size=16, seed=1)
    assert len(kept) == 16 and len(seen) == 1
    # untrained, EL2N mostly says which label the random head leans to (close to a random
    # choice within each label); the warm-up takes that bias out: the gap between the
    # labels' mean scores shrinks, and the mean score falls

    def label_gap(scores: list[float]) -> float:
        means = [sum(s for s, e in zip(scores, examples, strict=True) if e.label == label)
                 / sum(e.label == label for e in examples) for label in (0, 1)]
        return abs(means[0] - means[1])

    assert label_gap(seen[0]) < label_gap(untrained) / 2
    assert sum(seen[0]) < sum(untrained)
    after = trainer.trainable_state()
    assert all(torch.equal(after[k], start[k]) for k in start)  # the warm-up is undone


def _smollm2_shaped(task: str):
    """SmolLM2-135M's architecture (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536,
    49,152 words, tied embeddings), weightless on the meta device: FLOPs need shapes only."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         tie_word_embeddings=True, num_labels=5, pad_token_id=0)
    with torch.device("meta"):
        if task == "causal-lm":
            return LlamaForCausalLM(config)
        return LlamaForSequenceClassification(config)


def test_device_compute_share_on_a_smollm2_shaped_model_with_one_device_layer():
    cut = SplitConfig(head_layers=1, tail_layers=0, num_prompts=8)
    head, body, tail = split_model(_smollm2_shaped("sequence-classification"), cut)
    costs = split_costs(head, body, tail, seq_len=104)
    # one layer of 30 on the device, the 576 x 5 score head once per sequence: about 1/30
    assert 1 / 31 < costs.device_train_flop_share < 1 / 29
    assert costs.device_train_flop_share <= 0.05  # the goal, by count
    assert costs.device_vs_full_finetuning < costs.device_train_flop_share
    head, body, tail = split_model(_smollm2_shaped("causal-lm"), cut)
    lm = split_costs(head, body, tail, seq_len=104)
    # as a causal LM the vocabulary projection (49,152 x 576 per position, ~8 layers' worth)
    # stays on the device: its share is far above 5%
    assert 0.15 < lm.device_train_flop_share < 0.3


def test_a_job_prunes_once_and_refuses_more_local_steps_than_the_round_has(bert_parts):
    """The worker's side (``SplitJobTrainer``): pruning (here the random control) runs once per
    job and is kept; local-loss steps beyond the round's steps are refused before any server
    is dialled (the peer's address is never used)."""
    from confide.node.split.job import SplitJobTrainer
    from confide.v1 import coordinator_pb2 as pb

    examples = synthetic_classification(16, 2, seed=8)
    config = SFPromptConfig(tail_layers=0, num_prompts=4, prune_gamma=0.5,
                            prune_method="random", local_loss_steps=3)
    job = SplitJobTrainer(_trainer(bert_parts), config)
    task = pb.Task(job_id="j", round=1,
                   spec=pb.JobSpec(train=pb.TrainSpec(batch_size=4, max_steps=2, local_epochs=1)),
                   peers=[pb.Peer(role="split-server", address="127.0.0.1:1")])
    scratch: dict = {}
    with pytest.raises(ValueError, match=r"local_loss_steps \(3\) replace some of the round's "
                                         r"2 steps"):
        job.train_task(task, examples, lambda *args: None, scratch)
    kept = scratch["pruned"]
    assert len(kept) == 8 and kept == job.trainer.prune(examples, 0.5, method="random",
                                                         seed=round_seed(task))
