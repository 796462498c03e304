"""Shared test set-up: quiet, offline, single-threaded torch (CI has 2 cores), and helpers
that build real node data folders and real local clusters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

from confide.node.data import synthetic_classification, write_jsonl


def make_shards(root: Path, nodes: int, per_node: int = 64, num_labels: int = 2,
                seed: int = 0) -> list[Path]:
    """Node folders, each with a private train.jsonl of generated, learnable examples."""
    dirs = []
    for i in range(nodes):
        folder = root / f"node{i}"
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "train.jsonl",
                    synthetic_classification(per_node, num_labels, seed=seed + i))
        dirs.append(folder)
    return dirs


@pytest.fixture
def shards(tmp_path: Path):
    def factory(nodes: int, **kwargs) -> list[Path]:
        return make_shards(tmp_path / "data", nodes, **kwargs)

    return factory


INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration starts real processes: mark it ``integration``, so
    ``pytest -m "not integration"`` is the fast, in-process loop (unit tests that start a
    process carry the marker themselves)."""
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
