"""The trivia corpus for causal LM and its many-node split: every pair read (the one broken
YAML entry included), shards that are disjoint, complete, quantity-skewed, at least one pair a
node even at 200 nodes, and the same for the same seed."""

from __future__ import annotations

import importlib.util

import pytest

from confide.node.data import load_jsonl
from confide.node.data_trivia import _pair, prepare_trivia_shards, trivia_qa

pytestmark = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                reason="the trivia corpus is not installed: pip install "
                                       "chatterbot-corpus==1.3.3 (requirements/pinned.txt)")


def test_the_corpus_reads_as_261_unlabelled_question_answer_pairs():
    pairs = trivia_qa()
    assert len(pairs) == 261  # 260 well-formed entries and the one that lost its list form
    assert len({p.text for p in pairs}) == 261
    assert all(p.label is None and p.text.startswith("Question: ") and "\nAnswer: " in p.text
               for p in pairs)
    assert any(p.text.endswith("two little ducks\"?\nAnswer: 22") for p in pairs)
    assert _pair(["Q?", 1963]) == ("Q?", "1963") and _pair(42) is None


def _shards(root, nodes):
    return [[e.text for e in load_jsonl(root / f"node{i}" / "train.jsonl")]
            for i in range(nodes)]


@pytest.mark.parametrize("nodes", [10, 200])
def test_shards_are_disjoint_complete_and_hold_at_least_one_pair(tmp_path, nodes):
    summary = prepare_trivia_shards(tmp_path, nodes, alpha=0.3, seed=0)
    shards = _shards(tmp_path, nodes)
    test = [e.text for e in load_jsonl(tmp_path / "test.jsonl")]
    train = [t for shard in shards for t in shard]
    assert len(train) == len(set(train)) == sum(summary["train_sizes"]) == 261 - len(test)
    assert not set(train) & set(test) and len(test) == summary["test_size"] == 52
    assert summary["train_sizes"] == [len(s) for s in shards]
    assert min(summary["train_sizes"]) >= 1  # a node may hold a single pair
    if nodes == 10:  # Dirichlet(0.3) over 10 nodes: sizes far apart (quantity skew)
        assert max(summary["train_sizes"]) >= 4 * min(summary["train_sizes"])
    else:  # 209 pairs over 200 nodes: one each, a few hold two or more
        assert sorted(summary["train_sizes"])[len(shards) // 2] == 1


def test_the_split_is_deterministic_in_its_seed(tmp_path):
    prepare_trivia_shards(tmp_path / "a", 20, alpha=0.5, seed=3)
    prepare_trivia_shards(tmp_path / "b", 20, alpha=0.5, seed=3)
    prepare_trivia_shards(tmp_path / "c", 20, alpha=0.5, seed=4)
    assert _shards(tmp_path / "a", 20) == _shards(tmp_path / "b", 20)
    assert _shards(tmp_path / "a", 20) != _shards(tmp_path / "c", 20)


def test_more_nodes_than_pairs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at most 209 nodes"):
        prepare_trivia_shards(tmp_path, 210)
    with pytest.raises(ValueError):
        prepare_trivia_shards(tmp_path, 0)
