"""Node-local data: JSONL files, a node's data directory, BBC News and non-IID shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.node.data import (
    DataError,
    Example,
    LocalData,
    bbc_news,
    dirichlet_shards,
    load_jsonl,
    prepare_bbc_shards,
    split_train_test,
    synthetic_classification,
    synthetic_text,
    write_jsonl,
)

BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def numbered(n: int, num_labels: int = 5) -> list[Example]:
    """Examples with unique texts, so identity can be checked by text."""
    return [Example(text=f"doc {i}", label=i % num_labels) for i in range(n)]


def label_distribution(shard: list[Example], num_labels: int) -> list[float]:
    counts = Counter(ex.label for ex in shard)
    return [counts.get(k, 0) / len(shard) for k in range(num_labels)]


def max_total_variation(shards: list[list[Example]], num_labels: int) -> float:
    everything = [ex for shard in shards for ex in shard]
    overall = label_distribution(everything, num_labels)
    distances = []
    for shard in shards:
        dist = label_distribution(shard, num_labels)
        distances.append(0.5 * sum(abs(p - q) for p, q in zip(dist, overall, strict=True)))
    return max(distances)


# ------------------------------------------------------------------------------ JSONL


def test_jsonl_round_trip(tmp_path: Path) -> None:
    examples = [
        Example("plain text", 0),
        Example('quotes " and \\ backslashes\nand a newline', 3),
        Example("unicode: café ☕ 数据"),
    ]
    path = tmp_path / "sub" / "data.jsonl"
    assert write_jsonl(path, examples) == 3
    assert load_jsonl(path) == examples
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[2]) == {"text": "unicode: café ☕ 数据"}  # no label key when None
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]  # no temp file left


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n   \n{"text": "b"}\n', encoding="utf-8")
    assert load_jsonl(path) == [Example("a", 1), Example("b")]


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"label": 1}', '"text" is missing'),
        ('{"text": 5}', '"text"'),
        ('{"text": "x", "label": "1"}', '"label" must be an integer'),
        ('{"text": "x", "label": 1.5}', '"label" must be an integer'),
        ('{"text": "x", "label": true}', '"label" must be an integer'),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, needle: str) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok", "label": 0}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert needle in message


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------ LocalData


def test_local_data_lists_and_loads(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", numbered(7))
    write_jsonl(tmp_path / "eval-v1.0.jsonl", numbered(3))
    (tmp_path / "notes.txt").write_text("not a dataset")
    (tmp_path / ".hidden.jsonl").write_text('{"text": "x"}\n')
    data = LocalData(tmp_path)
    assert data.datasets() == {"eval-v1.0": 3, "train": 7}
    assert data.load() == numbered(7)  # "" means "train"
    assert data.load("train") == numbered(7)
    assert data.load("eval-v1.0") == numbered(3)


def test_local_data_sees_changes(tmp_path: Path) -> None:
    data = LocalData(tmp_path)
    assert data.datasets() == {}
    write_jsonl(tmp_path / "train.jsonl", numbered(2))
    assert data.datasets() == {"train": 2}
    assert len(data.load()) == 2
    write_jsonl(tmp_path / "train.jsonl", numbered(5))
    assert data.datasets() == {"train": 5}
    assert len(data.load()) == 5
    (tmp_path / "train.jsonl").unlink()
    assert data.datasets() == {}


def test_local_data_load_returns_a_copy(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", numbered(3))
    data = LocalData(tmp_path)
    data.load().clear()
    assert len(data.load()) == 3


def test_local_data_unknown_name_lists_available(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", numbered(1))
    write_jsonl(tmp_path / "other.jsonl", numbered(1))
    with pytest.raises(DataError) as info:
        LocalData(tmp_path).load("missing")
    assert "'missing'" in str(info.value)
    assert "other, train" in str(info.value)


def test_local_data_missing_root(tmp_path: Path) -> None:
    data = LocalData(tmp_path / "nope")
    assert data.datasets() == {}
    with pytest.raises(DataError, match="available: none"):
        data.load()


@pytest.mark.parametrize(
    "name", ["../train", "a/b", "..", ".", ".hidden", "x y", "/etc/passwd", "a\\b", "naïve"]
)
def test_local_data_rejects_bad_names(tmp_path: Path, name: str) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "train.jsonl", numbered(1))  # outside the data root
    with pytest.raises(DataError, match="invalid dataset name"):
        LocalData(tmp_path / "data").load(name)


# ------------------------------------------------------------------------------ BBC News


def test_bbc_news_dedup_and_labels() -> None:
    examples, labels = bbc_news()
    assert labels == BBC_LABELS
    assert 2000 < len(examples) < 2225  # 2,225 files, ~100 exact duplicates
    texts = [ex.text for ex in examples]
    assert len(set(texts)) == len(texts)
    assert all(t == t.strip() and t for t in texts)
    counts = Counter(ex.label for ex in examples)
    assert sorted(counts) == [0, 1, 2, 3, 4]
    assert min(counts.values()) > 300
    # callers may mutate what they get without affecting the next call
    examples.clear()
    assert len(bbc_news()[0]) > 2000


# ------------------------------------------------------------------------------ splitting


def test_split_train_test_is_stratified_disjoint_and_deterministic() -> None:
    examples = numbered(500, num_labels=5)
    train, test = split_train_test(examples, 0.2, seed=3)
    assert len(test) == 100
    assert {ex.text for ex in train}.isdisjoint({ex.text for ex in test})
    assert len(train) + len(test) == len(examples)
    assert Counter(ex.label for ex in test) == dict.fromkeys(range(5), 20)
    assert split_train_test(examples, 0.2, seed=3) == (train, test)
    assert split_train_test(examples, 0.2, seed=4)[1] != test


def test_split_train_test_unlabelled_and_bad_fraction() -> None:
    examples = synthetic_text(50, seed=0)
    train, test = split_train_test(examples, 0.3, seed=0)
    assert (len(train), len(test)) == (35, 15)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            split_train_test(examples, fraction, seed=0)


def test_dirichlet_shards_disjoint_complete_deterministic() -> None:
    examples = numbered(600)
    shards = dirichlet_shards(examples, 6, alpha=0.5, seed=1, min_size=5)
    texts = [ex.text for shard in shards for ex in shard]
    assert len(texts) == len(set(texts)) == len(examples)  # disjoint and complete
    assert min(len(s) for s in shards) >= 5
    assert dirichlet_shards(examples, 6, alpha=0.5, seed=1, min_size=5) == shards
    assert dirichlet_shards(examples, 6, alpha=0.5, seed=2, min_size=5) != shards


def test_dirichlet_shards_are_non_iid_at_small_alpha() -> None:
    examples = numbered(1000)
    skewed = dirichlet_shards(examples, 5, alpha=0.1, seed=0)
    near_iid = dirichlet_shards(examples, 5, alpha=100.0, seed=0)
    assert max_total_variation(skewed, 5) > 0.4
    assert max_total_variation(near_iid, 5) < 0.15


def test_dirichlet_shards_tops_up_when_draws_keep_failing() -> None:
    examples = numbered(12, num_labels=3)  # 12 shards of >= 1 from 3 labels: draws rarely fit
    shards = dirichlet_shards(examples, 12, alpha=0.1, seed=0, min_size=1)
    assert sorted(len(s) for s in shards) == [1] * 12
    assert sorted(ex.text for s in shards for ex in s) == sorted(ex.text for ex in examples)


def test_dirichlet_shards_argument_errors() -> None:
    examples = numbered(10)
    with pytest.raises(ValueError, match="at least"):
        dirichlet_shards(examples, 5, alpha=1.0, seed=0, min_size=3)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_shards(examples, 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="num_shards"):
        dirichlet_shards(examples, 0, alpha=1.0, seed=0)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=8, max_value=120),
    shards=st.integers(min_value=1, max_value=8),
    alpha=st.floats(min_value=0.05, max_value=50.0),
    seed=st.integers(min_value=0, max_value=2**31),
    labelled=st.booleans(),
)
def test_dirichlet_shards_partition_property(
    n: int, shards: int, alpha: float, seed: int, labelled: bool
) -> None:
    examples = numbered(n, 3) if labelled else [Example(f"t{i}") for i in range(n)]
    result = dirichlet_shards(examples, shards, alpha, seed, min_size=1)
    assert len(result) == shards
    assert all(result)
    assert sorted(ex.text for s in result for ex in s) == sorted(ex.text for ex in examples)


def test_prepare_bbc_shards(tmp_path: Path) -> None:
    summary = prepare_bbc_shards(tmp_path, nodes=3, alpha=0.5, test_fraction=0.2, seed=0)
    assert json.loads((tmp_path / "labels.json").read_text()) == BBC_LABELS
    test = load_jsonl(tmp_path / "test.jsonl")
    shards = [LocalData(tmp_path / f"node{i}").load() for i in range(3)]
    assert not (tmp_path / "node3").exists()
    test_texts = {ex.text for ex in test}
    shard_texts = [ex.text for shard in shards for ex in shard]
    assert test_texts.isdisjoint(shard_texts)  # the held-out set never reaches a node
    assert len(set(shard_texts)) == len(shard_texts)
    all_examples, _ = bbc_news()
    assert len(test) + len(shard_texts) == len(all_examples)
    assert abs(len(test) - 0.2 * len(all_examples)) < 5
    assert summary["test_size"] == len(test)
    assert summary["train_sizes"] == [len(s) for s in shards]
    assert summary["labels"] == BBC_LABELS
    # the test set is shuffled: a short prefix (the demo's --test-size) holds every class
    assert {ex.label for ex in test[:60]} == set(range(len(BBC_LABELS)))
    for shard, counts in zip(shards, summary["label_counts"], strict=True):
        assert counts == {
            name: sum(ex.label == i for ex in shard) for i, name in enumerate(BBC_LABELS)
        }


def test_prepare_bbc_shards_caps_per_node(tmp_path: Path) -> None:
    summary = prepare_bbc_shards(tmp_path, nodes=2, alpha=100.0, seed=1, max_train_per_node=40)
    assert summary["train_sizes"] == [40, 40]
    assert LocalData(tmp_path / "node1").datasets() == {"train": 40}


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_classification() -> None:
    examples = synthetic_classification(120, num_labels=4, seed=0)
    assert len(examples) == 120
    assert Counter(ex.label for ex in examples) == dict.fromkeys(range(4), 30)
    assert examples == synthetic_classification(120, num_labels=4, seed=0)
    assert examples != synthetic_classification(120, num_labels=4, seed=1)
    many = synthetic_classification(24, num_labels=12, seed=0)
    assert {ex.label for ex in many} == set(range(12))
    with pytest.raises(ValueError, match="num_labels"):
        synthetic_classification(10, num_labels=1, seed=0)


def test_synthetic_text() -> None:
    examples = synthetic_text(20, seed=0)
    assert len(examples) == 20
    assert all(ex.label is None and ex.text.endswith(" .") for ex in examples)
    assert examples == synthetic_text(20, seed=0)
    assert examples != synthetic_text(20, seed=1)
