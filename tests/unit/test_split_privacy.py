"""What the split-server can read (node.split.attacks), the device's defences
(node.split.defences) and the owner's opt-in (node.split.trust), on tiny random-init models."""

from __future__ import annotations

import pytest
import torch

from confide.node.data import synthetic_classification
from confide.node.methods.sfprompt import SFPromptConfig
from confide.node.models import ModelConfig
from confide.node.split.attacks import (
    LearnedInverse,
    capture,
    label_bearing,
    nearest_embedding,
    recovery,
)
from confide.node.split.body import LocalBody
from confide.node.split.defences import (
    ActivationNoise,
    add_private_lora,
    distance_correlation,
    per_token_epsilon,
)
from confide.node.split.model import SplitConfig, build_split
from confide.node.split.trainer import build_split_trainer
from confide.node.split.trust import untrusted_split_server
from confide.v1 import coordinator_pb2 as pb

TEXTS = [ex.text + " Paris 2024" for ex in synthetic_classification(24, 2, seed=3)]


def _parts(base: str = "tiny-bert", head_layers: int = 1):
    cfg = ModelConfig(base=base, num_labels=2, max_length=24, seed=0)
    return build_split(cfg, SplitConfig(head_layers=head_layers, tail_layers=0, num_prompts=2))


def test_nearest_embedding_reads_the_tokens_of_an_undefended_head():
    # tiny-bert only: random-init tiny-llama's layers outweigh its embeddings 8 to 1, unlike
    # any trained model (SmolLM2 is measured by the benchmark)
    parts = _parts()
    seen = capture(parts.head, parts.tokenizer, TEXTS, max_length=24)
    got = recovery(nearest_embedding(seen, parts.head), seen)
    assert got["num_tokens"] > 100 and got["num_label_tokens"] >= 24
    # chance is 1 / vocabulary (~3e-5); a random-init tiny model keeps a third or more of the
    # tokens readable after one layer (MiniLM: all of them, bench/results/split_attack.json)
    assert got["tokens"] > 0.25, got
    # the guesses are not the truth by construction: a shuffled capture scores low
    shuffled = seen.hidden[torch.randperm(seen.hidden.shape[0])]
    seen.hidden = shuffled
    assert recovery(nearest_embedding(seen, parts.head), seen)["tokens"] < got["tokens"] / 2


def test_noise_lowers_what_the_nearest_embedding_attack_reads():
    parts = _parts()
    plain = capture(parts.head, parts.tokenizer, TEXTS, max_length=24)
    noisy = capture(parts.head, parts.tokenizer, TEXTS, max_length=24,
                    defence=ActivationNoise(3.0, seed=1))
    assert not torch.equal(plain.hidden, noisy.hidden)
    before = recovery(nearest_embedding(plain, parts.head), plain)["tokens"]
    after = recovery(nearest_embedding(noisy, parts.head), noisy)["tokens"]
    assert after < before - 0.2, (before, after)


def test_learned_inverse_trains_on_public_text_and_reads_other_text():
    parts = _parts()
    public = capture(parts.head, parts.tokenizer,
                     [e.text for e in synthetic_classification(64, 2, seed=11)], max_length=24)
    victim = capture(parts.head, parts.tokenizer, TEXTS, max_length=24)
    inverse = LearnedInverse(parts.head.hidden_size, parts.head.word_embeddings().weight,
                             width=128)
    inverse.fit(public, steps=60, batch_size=128, negatives=256)
    got = recovery(inverse.guess(victim), victim)
    assert got["tokens"] > 0.3, got


def test_label_bearing_words_are_capitalised_or_numeric():
    text = "the Queen met 3 people in paris"
    offsets = [(0, 3), (4, 9), (10, 13), (14, 15), (16, 22), (23, 25), (26, 31), (0, 0)]
    assert label_bearing(text, offsets) == [False, True, False, True, False, False, False,
                                            False]


def test_distance_correlation_is_one_for_a_copy_and_small_for_independent_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(800, 8, generator=generator)
    assert distance_correlation(x, 3 * x + 1).item() == pytest.approx(1.0, abs=1e-4)
    # the sample estimator is biased upwards (~0.19 at n=800, d=8)
    assert distance_correlation(x, torch.randn(800, 8, generator=generator)).item() < 0.25
    with pytest.raises(ValueError):
        distance_correlation(x[:1], x[:1])


def test_noise_is_per_token_and_from_the_devices_own_seed():
    hidden = torch.ones(2, 3, 16)
    hidden[0, 0] *= 100
    noise = ActivationNoise(1.0)
    out = noise(hidden) - hidden
    # the noise scales with each token's own norm
    assert out[0, 0].norm() > 20 * out[1, 1].norm()
    # two devices (fresh generators from os.urandom) never draw the same noise
    assert not torch.equal(ActivationNoise(1.0)(hidden), ActivationNoise(1.0)(hidden))
    assert ActivationNoise(0.0)(hidden) is hidden
    assert per_token_epsilon(1.0, 384) > 100  # no meaningful formal guarantee, as documented
    with pytest.raises(ValueError):
        ActivationNoise(-1.0)


def test_private_lora_starts_as_the_public_head_and_never_leaves_the_device():
    model_cfg = ModelConfig(base="tiny-bert", num_labels=2, max_length=24, seed=0)
    plain = build_split_trainer(model_cfg, SFPromptConfig(tail_layers=0, num_prompts=2))
    guarded = build_split_trainer(model_cfg, SFPromptConfig(
        tail_layers=0, num_prompts=2, private_head_lora=4, nopeek_weight=1.0))
    ids = torch.tensor([[101, 2000, 2001, 102]])
    mask = torch.ones_like(ids)
    assert torch.allclose(plain.head(ids, mask), guarded.head(ids, mask), atol=1e-6)
    assert plain.trainable_state().keys() == guarded.trainable_state().keys()
    parts = build_split(model_cfg, SplitConfig(head_layers=1, tail_layers=0, num_prompts=2),
                        role="server")
    examples = synthetic_classification(32, 2, seed=5)
    guarded.train_round(examples, LocalBody(parts.body), steps=4, batch_size=8, lr=5e-2)
    # the adapter trained, the federated state did not grow
    assert plain.trainable_state().keys() == guarded.trainable_state().keys()
    plain.load_trainable_state(guarded.trainable_state())  # same prompts: only the adapter differs
    assert not torch.allclose(plain.head(ids, mask), guarded.head(ids, mask), atol=1e-4)
    guarded.reset_private_state()  # a new job starts from the public head again
    assert torch.allclose(plain.head(ids, mask), guarded.head(ids, mask), atol=1e-6)


def test_add_private_lora_wraps_every_linear_map():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert add_private_lora(layer, 2, seed=0) == 2
    with pytest.raises(ValueError):
        add_private_lora(layer, 0)


def test_noise_crosses_the_seam_in_training_and_evaluation():
    model_cfg = ModelConfig(base="tiny-bert", num_labels=2, max_length=24, seed=0)
    trainer = build_split_trainer(model_cfg, SFPromptConfig(tail_layers=0, num_prompts=2,
                                                            activation_noise=2.0))
    parts = build_split(model_cfg, SplitConfig(head_layers=1, tail_layers=0, num_prompts=2),
                        role="server")
    seen: list[torch.Tensor] = []

    class Recording(LocalBody):
        def forward(self, step, hidden, attention_mask, *, train=True):
            seen.append(hidden.clone())
            return super().forward(step, hidden, attention_mask, train=train)

    examples = synthetic_classification(8, 2, seed=5)
    trainer.evaluate(examples, Recording(parts.body), batch_size=8)
    with torch.no_grad():
        enc = trainer.tokenizer([e.text for e in examples], truncation=True, max_length=24,
                                padding=True, return_tensors="pt")
        clean = trainer.head(enc["input_ids"], enc["attention_mask"])
    assert seen and seen[0].shape == clean.shape
    relative = (seen[0] - clean).norm(dim=-1) / clean.norm(dim=-1)
    assert 1.5 < relative.mean().item() < 2.5


@pytest.mark.parametrize("params, match", [
    ({"activation_noise": -1.0}, "activation_noise"),
    ({"nopeek_weight": 1.0}, "private_head_lora"),
    ({"private_head_lora": -2}, "private_head_lora"),
])
def test_defence_parameters_are_validated(params, match):
    with pytest.raises(ValueError, match=match):
        SFPromptConfig(**params).validate()


def test_an_untrusted_split_server_is_refused_with_a_reason():
    peers = [pb.Peer(node_id="n1", role="peer"),
             pb.Peer(node_id="abc123", name="gpu-box", role="split-server")]
    reason = untrusted_split_server(peers, {"other"})
    assert reason and "--trust-split-server gpu-box" in reason
    assert "trust_split_servers" in reason
    assert untrusted_split_server(peers, {"gpu-box"}) is None
    assert untrusted_split_server(peers, {"abc123"}) is None
    assert untrusted_split_server([], set()) is None  # no split-server, nothing to trust
    # a split-server without a name is named by its node id
    nameless = untrusted_split_server([pb.Peer(node_id="abc123", role="split-server")], ())
    assert nameless and "--trust-split-server abc123" in nameless
