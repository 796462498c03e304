"""DIMAT's pure parts: topologies and mixing weights, permutation specs (function-preserving),
activation matching, merging, and the point of the method: aligned averages of independently
trained MLPs beat plain averages."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from confide.node.merging.activations import CorrelationStats
from confide.node.merging.alignment import align, assignment, match_permutation
from confide.node.merging.merge import dimat_merge, merge
from confide.node.merging.permutation import apply_permutation, permutation_spec
from confide.node.methods.base import UpdateError
from confide.node.methods.dimat import DIMAT, DIMATConfig
from confide.node.methods.topology import (
    mixing_matrix,
    mixing_weights,
    neighbours,
    parse_edges,
    renormalized_weights,
)

VOCAB = 100


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=3, initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config).eval()
        with torch.no_grad():  # zero-initialized biases would hide a wrongly permuted bias
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.1)
        return model


def tiny_llama(seed: int = 0, kv_heads: int = 2) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=128, initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def tiny_mlp(seed: int = 0, inputs: int = 8, width: int = 32, outputs: int = 3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(inputs, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.GELU(),
            torch.nn.Linear(width, outputs),
        ).eval()


def lora_bert(seed: int = 0) -> torch.nn.Module:
    """A PEFT-wrapped BERT whose LoRA B matrices are non-zero (fresh ones are zero, which would
    hide a wrongly permuted adapter)."""
    model = tiny_bert(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.3)
    return peft_model.eval()


def text_batch(seed: int = 0, batch: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[: batch // 2, length - 3:] = 0  # some right padding
    return {"input_ids": input_ids, "attention_mask": mask}


def mlp_batch(seed: int = 0, n: int = 256, inputs: int = 8) -> torch.Tensor:
    return torch.randn(n, inputs, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "bert": (tiny_bert, text_batch),
    "llama-gqa": (lambda seed=0: tiny_llama(seed, kv_heads=2), text_batch),
    "llama-mha": (lambda seed=0: tiny_llama(seed, kv_heads=4), text_batch),
    "mlp": (tiny_mlp, mlp_batch),
    "bert-lora": (lora_bert, text_batch),
}


def run(model: torch.nn.Module, state, batch) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(batch, torch.Tensor):
            out = functional_call(model, state, (batch,))
        else:
            out = functional_call(model, state, (), dict(batch))
    return out if isinstance(out, torch.Tensor) else out.logits


def random_perms(spec, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation per group, never the identity (2 kv groups: always the swap)."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for group in spec.groups:
        perm = torch.randperm(group.size, generator=g)
        perms[group.name] = perm.roll(1) if torch.equal(perm, torch.arange(group.size)) else perm
    return perms


def clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Specs: what is permuted


def test_specs_name_the_documented_groups():
    bert = permutation_spec(tiny_bert())
    assert [(g.name, g.kind, g.size, g.block) for g in bert.groups] == [
        ("bert.encoder.layer.0.ffn", "mlp", 128, 1),
        ("bert.encoder.layer.0.heads", "heads", 4, 16),
        ("bert.encoder.layer.1.ffn", "mlp", 128, 1),
        ("bert.encoder.layer.1.heads", "heads", 4, 16),
    ]
    heads = bert.groups[1]
    assert {(a.name.rsplit(".", 2)[-2], a.dim) for a in heads.axes} >= {
        ("query", 0), ("key", 0), ("value", 0), ("dense", 1),
    }
    llama = permutation_spec(tiny_llama(kv_heads=2))
    kinds = {g.name: (g.kind, g.size, g.block) for g in llama.groups}
    assert kinds["model.layers.0.mlp.units"] == ("mlp", 128, 1)
    assert kinds["model.layers.0.self_attn.heads"] == ("kv-groups", 2, 32)  # 2 q heads x 16
    permuted = llama.tensor_names()
    assert "model.embed_tokens.weight" not in permuted
    assert "lm_head.weight" not in permuted
    assert not any("norm" in name for name in permuted)
    mlp = permutation_spec(tiny_mlp())
    assert [g.name for g in mlp.groups] == ["0.units", "2.units"]
    lora = permutation_spec(lora_bert())
    assert any("lora_B" in name for name in lora.tensor_names())
    assert any("lora_A" in name for name in lora.tensor_names())


# --------------------------------------------------------------------------------------------
# Permutations preserve the function; matching undoes them


@pytest.mark.parametrize("family", sorted(MODELS))
def test_permuting_hidden_units_leaves_outputs_unchanged(family):
    build, make_batch = MODELS[family]
    model, batch = build(), make_batch()
    spec = permutation_spec(model)
    state = model.state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, seed=1))
    changed = [n for n in spec.tensor_names() if not torch.equal(permuted[n], state[n])]
    assert len(changed) == len(spec.tensor_names())  # every permuted tensor really moved
    torch.testing.assert_close(run(model, permuted, batch), run(model, state, batch),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_matching_recovers_a_known_permutation_exactly(family):
    build, make_batch = MODELS[family]
    model, batch = build(), make_batch(seed=3)
    spec = permutation_spec(model)
    state = model.state_dict()
    scrambled = apply_permutation(state, spec, random_perms(spec, seed=2))
    aligned = align(model, scrambled, batch, spec)
    assert aligned.keys() == state.keys()
    for name in state:
        assert torch.equal(aligned[name], state[name]), name


def test_match_permutation_on_raw_activations_and_blocks():
    acts = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    # B's unit j is A's unit inverse[j]; matching maps A's unit i to B's perm-inverse position
    b = acts[:, perm]
    found = match_permutation(acts, b)
    assert torch.equal(b[:, found], acts)
    heads = torch.randperm(3, generator=torch.Generator().manual_seed(2))
    b_blocks = acts.reshape(200, 3, 4)[:, heads].reshape(200, 12)
    found_blocks = match_permutation(acts, b_blocks, block=4)
    assert torch.equal(b_blocks.reshape(200, 3, 4)[:, found_blocks].reshape(200, 12), acts)


def test_correlation_stats_over_batches_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(90, 6, generator=g), torch.randn(90, 6, generator=g)
    one, many = CorrelationStats(), CorrelationStats()
    one.update(a, b)
    for chunk in range(3):
        many.update(a[chunk * 30:(chunk + 1) * 30], b[chunk * 30:(chunk + 1) * 30])
    torch.testing.assert_close(one.correlation(), many.correlation())
    diag = CorrelationStats()
    diag.update(a, a)
    torch.testing.assert_close(diag.correlation().diagonal(), torch.ones(6, dtype=torch.float64))
    constant = torch.zeros(2, 2, dtype=torch.float64)
    assert assignment(constant).sort().values.tolist() == [0, 1]  # dead units: still a perm


# --------------------------------------------------------------------------------------------
# Merging


@pytest.mark.parametrize("mode", ["dimat", "gossip"])
@pytest.mark.parametrize("family", ["bert", "llama-gqa", "mlp"])
def test_merging_identical_models_returns_the_same_model(family, mode):
    build, make_batch = MODELS[family]
    model = build()
    own = clone(model.state_dict())
    merged = dimat_merge(
        model, own, {"b": clone(own), "c": clone(own)}, {"b": 1 / 3, "c": 1 / 3},
        make_batch(), mode,
    )
    assert merged.keys() == own.keys()
    for name in own:
        torch.testing.assert_close(merged[name], own[name], atol=0, rtol=1e-6)
        assert merged[name].dtype == own[name].dtype


def test_dimat_merge_of_a_permuted_copy_is_the_model_itself_gossip_is_not():
    model, batch = tiny_bert(), text_batch()
    own = clone(model.state_dict())
    spec = permutation_spec(model)
    twin = apply_permutation(own, spec, random_perms(spec, seed=5))
    aligned = dimat_merge(model, own, {"b": twin}, {"b": 0.5}, batch, "dimat", spec=spec)
    plain = dimat_merge(model, own, {"b": twin}, {"b": 0.5}, batch, "gossip")
    torch.testing.assert_close(run(model, aligned, batch), run(model, own, batch))
    assert not torch.allclose(run(model, plain, batch), run(model, own, batch), atol=1e-3)


def test_merge_is_the_weighted_average_in_float64():
    own = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([7])}
    other = {"w": torch.tensor([4.0, 8.0]), "steps": torch.tensor([9])}
    merged = merge(own, {"b": other}, {"b": 0.25})
    torch.testing.assert_close(merged["w"], torch.tensor([1.75, 3.5]))
    assert merged["steps"].item() == 7  # integer tensors are not averaged
    with pytest.raises(ValueError, match="sum to 1"):
        merge(own, {"b": other}, {"b": 0.25}, self_weight=0.5)
    with pytest.raises(ValueError, match="weights are for"):
        merge(own, {"b": other}, {"c": 0.5})


def test_mode_none_and_unreachable_neighbours():
    model, batch = tiny_mlp(), mlp_batch()
    own = clone(model.state_dict())
    other = clone(tiny_mlp(seed=9).state_dict())
    assert dimat_merge(model, own, {"b": other}, {"b": 0.5}, None, "none") == own
    # every neighbour unreachable: nothing to merge, no batch needed
    assert dimat_merge(model, own, {}, {"b": 1 / 3, "c": 1 / 3}, None, "dimat") == own
    # "c" unreachable: own and "b" renormalized to 1/2 each
    merged = dimat_merge(model, own, {"b": other}, {"b": 1 / 3, "c": 1 / 3}, batch, "gossip")
    expected = merge(own, {"b": other}, {"b": 0.5})
    for name in own:
        torch.testing.assert_close(merged[name], expected[name])
    with pytest.raises(ValueError, match="not neighbours"):
        dimat_merge(model, own, {"z": other}, {"b": 0.5}, batch, "gossip")
    with pytest.raises(ValueError, match="merge must be"):
        dimat_merge(model, own, {"b": other}, {"b": 0.5}, batch, "average")
    with pytest.raises(ValueError, match="at least one batch"):
        dimat_merge(model, own, {"b": other}, {"b": 0.5}, None, "dimat")


def test_bad_neighbour_states_are_rejected():
    model, batch = tiny_mlp(), mlp_batch()
    own = clone(model.state_dict())
    poisoned = clone(own)
    poisoned["0.weight"][0, 0] = float("nan")
    with pytest.raises(UpdateError, match="NaN"):
        dimat_merge(model, own, {"b": poisoned}, {"b": 0.5}, batch, "dimat")
    partial = {k: v for k, v in own.items() if k != "0.bias"}
    with pytest.raises(UpdateError, match="missing"):
        dimat_merge(model, own, {"b": partial}, {"b": 0.5}, batch, "gossip")
    wrong = clone(own)
    wrong["0.bias"] = torch.zeros(5)
    with pytest.raises(UpdateError, match="shape"):
        dimat_merge(model, own, {"b": wrong}, {"b": 0.5}, batch, "gossip")


def test_adapter_only_states_cannot_be_aligned():
    """Adapters over a shared frozen base: the units are aligned already, and the base weights
    alignment would permute are not in the state. Say so; gossip still works."""
    model, batch = lora_bert(), text_batch()
    adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    other = {k: v + 0.01 for k, v in adapters.items()}
    with pytest.raises(ValueError, match="gossip"):
        dimat_merge(model, adapters, {"b": other}, {"b": 0.5}, batch, "dimat")
    merged = dimat_merge(model, adapters, {"b": other}, {"b": 0.5}, batch, "gossip")
    name = next(iter(adapters))
    torch.testing.assert_close(merged[name], adapters[name] + 0.005)


def _toy_task(seed: int, n: int):
    """Three interleaved spiral arms in the plane: learnable, but not by a linear model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * 1.5
    angle = torch.atan2(x[:, 1], x[:, 0]) + 1.5 * x.norm(dim=1)
    return x, (angle / (2 * math.pi / 3)).floor().remainder(3).long()


def test_aligned_average_of_independent_mlps_beats_the_plain_average():
    """Two MLPs from different random inits, trained on the same task: their units sit in
    different orders, so the plain average mixes unrelated units; aligning first is the point
    of DIMAT."""
    x_train, y_train = _toy_task(0, 2048)
    x_test, y_test = _toy_task(1, 2048)
    models = []
    for seed in (1, 2):
        model = tiny_mlp(seed, inputs=2, width=64).train()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            idx = torch.randint(0, len(x_train), (128,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model.eval())
    a, b = models

    def test_loss(state) -> float:
        return torch.nn.functional.cross_entropy(run(a, state, x_test), y_test).item()

    own, other = clone(a.state_dict()), clone(b.state_dict())
    plain = dimat_merge(a, own, {"b": other}, {"b": 0.5}, x_train[:512], "gossip")
    aligned = dimat_merge(a, own, {"b": other}, {"b": 0.5}, x_train[:512], "dimat")
    losses = {"a": test_loss(own), "b": test_loss(other), "plain": test_loss(plain),
              "aligned": test_loss(aligned)}
    assert max(losses["a"], losses["b"]) < 0.4, losses  # both learned the task
    assert losses["aligned"] < 0.8 * losses["plain"], losses


# --------------------------------------------------------------------------------------------
# Topologies and mixing weights


def node_ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


def _topology_cases():
    for n in range(4, 9):
        yield DIMATConfig(topology="ring"), n
        yield DIMATConfig(topology="full"), n
        for degree in (2, 3, 4):
            if degree < n and n * degree % 2 == 0:
                yield DIMATConfig(topology="random", degree=degree, seed=n), n
        edges = ",".join(f"{i}-{i + 1}" for i in range(n - 1)) + f",0-{n - 1},0-2"
        yield DIMATConfig(topology="edges", edges=edges), n


def _is_connected(adjacency) -> bool:
    seen, todo = set(), [next(iter(adjacency))]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(adjacency[node])
    return len(seen) == len(adjacency)


@pytest.mark.parametrize(("config", "n"), list(_topology_cases()),
                         ids=lambda v: getattr(v, "topology", str(v)))
def test_mixing_matrices_are_symmetric_and_doubly_stochastic(config, n):
    ids = node_ids(n)
    adjacency = neighbours(config, list(reversed(ids)))  # order of the input does not matter
    assert sorted(adjacency) == ids
    assert _is_connected(adjacency)
    w = mixing_matrix(adjacency)
    assert w.dtype == torch.float64 and w.shape == (n, n)
    assert (w >= 0).all()
    torch.testing.assert_close(w, w.T)
    torch.testing.assert_close(w.sum(0), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64))
    for i, node in enumerate(ids):
        self_weight, row = mixing_weights(adjacency, node)
        assert self_weight == pytest.approx(w[i, i].item())
        assert set(row) == set(adjacency[node])


def test_ring_weights_are_one_third():
    adjacency = neighbours(DIMATConfig(topology="ring"), node_ids(6))
    assert adjacency["node-00"] == ["node-01", "node-05"]
    for node in adjacency:
        self_weight, row = mixing_weights(adjacency, node)
        assert self_weight == pytest.approx(1 / 3)
        assert all(w == pytest.approx(1 / 3) for w in row.values())
    full = mixing_matrix(neighbours(DIMATConfig(topology="full"), node_ids(5)))
    torch.testing.assert_close(full, torch.full((5, 5), 0.2, dtype=torch.float64))


@pytest.mark.parametrize(("n", "k"), [(4, 2), (6, 3), (7, 4), (8, 3), (8, 5), (10, 3)])
def test_random_topology_is_k_regular_connected_and_seeded(n, k):
    graphs = []
    for seed in range(6):
        adjacency = neighbours(DIMATConfig(topology="random", degree=k, seed=seed), node_ids(n))
        assert all(len(nbrs) == k for nbrs in adjacency.values())
        assert _is_connected(adjacency)
        again = neighbours(DIMATConfig(topology="random", degree=k, seed=seed), node_ids(n))
        assert again == adjacency  # every node derives the same graph
        graphs.append(tuple(sorted((a, b) for a in adjacency for b in adjacency[a])))
    if n >= 7:
        assert len(set(graphs)) > 1  # the seed matters


def test_small_topologies():
    assert neighbours(DIMATConfig(), ["a"]) == {"a": []}
    assert neighbours(DIMATConfig(), ["b", "a"]) == {"a": ["b"], "b": ["a"]}
    assert mixing_matrix(neighbours(DIMATConfig(), ["a", "b"])).tolist() == [[0.5, 0.5],
                                                                             [0.5, 0.5]]
    three = mixing_matrix(neighbours(DIMATConfig(topology="ring"), ["a", "b", "c"]))
    torch.testing.assert_close(three, torch.full((3, 3), 1 / 3, dtype=torch.float64))


def test_renormalized_weights_sum_to_one():
    adjacency = neighbours(DIMATConfig(topology="full"), node_ids(5))
    self_weight, row = mixing_weights(adjacency, "node-00")
    for lost in range(len(row) + 1):
        for unreachable in itertools.combinations(sorted(row), lost):
            reachable = set(row) - set(unreachable)
            for policy in ("renormalize", "self"):
                new_self, new_row = renormalized_weights(self_weight, row, reachable, policy)
                assert set(new_row) == reachable
                assert new_self + math.fsum(new_row.values()) == pytest.approx(1.0)
    new_self, new_row = renormalized_weights(1 / 3, {"a": 1 / 3, "b": 1 / 3}, {"a"})
    assert new_self == pytest.approx(0.5) and new_row == {"a": pytest.approx(0.5)}
    new_self, new_row = renormalized_weights(1 / 3, {"a": 1 / 3, "b": 1 / 3}, {"a"}, "self")
    assert new_self == pytest.approx(2 / 3) and new_row == {"a": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="sum to 1"):
        renormalized_weights(0.5, {"a": 0.7}, {"a"})
    with pytest.raises(ValueError, match="unreachable must be"):
        renormalized_weights(0.5, {"a": 0.5}, {"a"}, "drop")


def test_symmetric_failures_keep_doubly_stochastic_with_policy_self():
    adjacency = neighbours(DIMATConfig(topology="ring"), node_ids(5))
    ids = sorted(adjacency)
    down = {("node-00", "node-01"), ("node-01", "node-00")}  # one link fails both ways
    w = torch.zeros(5, 5, dtype=torch.float64)
    for i, node in enumerate(ids):
        self_weight, row = mixing_weights(adjacency, node)
        reachable = {j for j in row if (node, j) not in down}
        new_self, new_row = renormalized_weights(self_weight, row, reachable, "self")
        w[i, i] = new_self
        for j, weight in new_row.items():
            w[i, ids.index(j)] = weight
    torch.testing.assert_close(w.sum(0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(w, w.T)


# --------------------------------------------------------------------------------------------
# Configuration


def test_parse_config_through_the_method():
    method = DIMAT()
    config = method.parse_config({"topology": "random", "degree": 3.0, "seed": 7.0})
    assert config == DIMATConfig(topology="random", degree=3, seed=7)
    listed = method.parse_config({"topology": "edges", "edges": ["0-1", [1.0, 2.0], "2-0"]})
    assert listed.edges == "0-1,0-2,1-2"
    assert method.trainable == "full"
    with pytest.raises(ValueError, match="no parameter"):
        method.parse_config({"topolgy": "ring"})
    # no coordinator aggregation at all: the round engine runs its peer phases instead
    assert method.decentralized and not hasattr(method, "aggregate")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"topology": "star"}, "topology must be one of"),
        ({"merge": "average"}, "merge must be one of"),
        ({"degree": 0}, "degree must be"),
        ({"seed": -1}, "seed must be"),
        ({"match_examples": 0}, "match_examples must be"),
        ({"unreachable": "drop"}, "unreachable must be"),
        ({"topology": "edges"}, "needs edges"),
        ({"topology": "ring", "edges": "0-1"}, "only read with topology 'edges'"),
        ({"topology": "edges", "edges": "0-1,1-1"}, "self-loop"),
        ({"topology": "edges", "edges": "0-1,1=2"}, "not of the form"),
        ({"topology": "edges", "edges": [[0, 1.5]]}, "non-negative integers"),
    ],
)
def test_bad_configs_raise_value_error(params, message):
    with pytest.raises(ValueError, match=message):
        DIMATConfig(**params)


@pytest.mark.parametrize(
    ("config", "n", "message"),
    [
        (DIMATConfig(topology="random", degree=4), 4, "degree < nodes"),
        (DIMATConfig(topology="random", degree=3), 5, "must be even"),
        (DIMATConfig(topology="random", degree=1), 4, "disconnected"),
        (DIMATConfig(topology="edges", edges="0-1,2-3"), 4, "disconnected"),
        (DIMATConfig(topology="edges", edges="0-1,1-5"), 4, "only 4 nodes"),
    ],
)
def test_topologies_that_do_not_fit_raise_value_error(config, n, message):
    with pytest.raises(ValueError, match=message):
        neighbours(config, node_ids(n))


def test_parse_edges_canonicalizes():
    assert parse_edges("2-0, 0-1;1-2 0-2") == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="not of the form"):
        parse_edges("0-1,a-b")
    with pytest.raises(ValueError, match="unique"):
        neighbours(DIMATConfig(), ["a", "a"])


@pytest.mark.integration  # starts a process
@pytest.mark.parametrize("module", ["confide.coordinator.service", "confide.node.methods",
                                    "confide.node.methods.dimat"])
def test_the_coordinator_and_the_pure_method_modules_do_not_import_scipy(module):
    """Topology and mixing are pure: the coordinator schedules DIMAT without the node-side
    alignment machinery (scipy's linear assignment). (torch.func is not checked: ``import
    torch`` loads it itself.)"""
    root = Path(__file__).resolve().parents[2]
    code = (f"import sys, {module}\n"
            "leaked = sorted(m for m in sys.modules if m == 'scipy' or m.startswith('scipy.'))\n"
            "print(','.join(leaked))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


def test_the_identity_is_kept_unless_matching_gains_more_than_the_margin():
    """Nearly tied units (an aligned pair of models) stay put; a real permutation is found."""
    from confide.node.merging.alignment import assignment

    torch.manual_seed(0)
    tied = torch.eye(6) * 0.90 + 0.01 * torch.rand(6, 6)
    tied[0, 0] = tied[1, 1] = 0.90
    tied[0, 1] = tied[1, 0] = 0.905  # swapping 0 and 1 gains 0.01 / 6 units: below 0.02
    assert not torch.equal(assignment(tied), torch.arange(6))
    assert torch.equal(assignment(tied, identity_margin=0.02), torch.arange(6))
    shuffled = torch.eye(6)[:, torch.tensor([2, 0, 1, 5, 3, 4])]  # B's units truly permuted
    perm = assignment(shuffled, identity_margin=0.02)
    assert torch.equal(shuffled[torch.arange(6), perm], torch.ones(6))
