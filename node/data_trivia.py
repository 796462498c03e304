"""The trivia corpus for causal language modelling: 261 question/answer pairs read offline from
the ``chatterbot-corpus`` package's ``trivia.yml``, split over many nodes with quantity skew.

Why this corpus: it is the project's real (not synthetic) causal-LM workload that ships as a
package (no download at run time), and it is small, so at a few hundred nodes a node holds one
to a few examples: the regime where many-node methods (node-level DP, secure aggregation)
behave differently from a handful of well-fed nodes. Each pair becomes one example,
``"Question: ...\\nAnswer: ..."``, so a model trained on it learns to answer in that form and
perplexity on held-out pairs measures it.

The pairs have no labels, so ``dirichlet_shards`` puts them in one group: each node's share
comes from one Dirichlet(alpha) draw over the nodes, which is quantity skew (small alpha: a few
nodes hold most pairs, the rest the minimum).
"""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

import yaml  # PyYAML: installed with transformers; safe_load only

from confide.node.data import DataError, Example, dirichlet_shards, write_jsonl

__all__ = ["prepare_trivia_shards", "trivia_qa", "trivia_text"]

TRIVIA_PACKAGE = "chatterbot_corpus"
TRIVIA_INSTALL = "pip install chatterbot-corpus==1.3.3"


def _trivia_file() -> Path:
    # find_spec: the package is only a folder of YAML files here; nothing of it is imported
    spec = importlib.util.find_spec(TRIVIA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the trivia corpus needs the chatterbot-corpus package: {TRIVIA_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "english" / "trivia.yml"
    if not path.is_file():
        raise DataError(f"chatterbot-corpus is installed but {path} is missing; reinstall it")
    return path


def _pair(entry: object) -> tuple[str, str] | None:
    """One conversation as (question, answer). One entry of 1.3.3 lost its list form in the
    YAML (``"question? - '22'"``): it is read back as the pair it was meant to be."""
    if isinstance(entry, list) and len(entry) == 2:
        return str(entry[0]).strip(), str(entry[1]).strip()
    if isinstance(entry, str) and " - " in entry:
        question, answer = entry.rsplit(" - ", 1)
        return question.strip(), answer.strip().strip("'\"")
    return None


def trivia_text(question: str, answer: str) -> str:
    """How a pair reads as one causal-LM example."""
    return f"Question: {question}\nAnswer: {answer}"


@functools.lru_cache(maxsize=1)
def _trivia_cached() -> tuple[Example, ...]:
    data = yaml.safe_load(_trivia_file().read_text(encoding="utf-8"))
    seen: set[str] = set()
    examples = []
    for entry in data.get("conversations", []) if isinstance(data, dict) else []:
        pair = _pair(entry)
        if pair is None or not all(pair) or pair[0] in seen:
            continue
        seen.add(pair[0])
        examples.append(Example(text=trivia_text(*pair)))
    if not examples:
        raise DataError(f"{_trivia_file()} holds no question/answer pairs")
    return tuple(examples)


def trivia_qa() -> list[Example]:
    """Every trivia pair (deduplicated by question, in file order) as unlabelled examples."""
    return list(_trivia_cached())


def prepare_trivia_shards(out_dir: Path, nodes: int, alpha: float = 0.5,
                          test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write a federated trivia workload: ``out_dir/node{i}/train.jsonl`` per node (quantity
    skewed, every node at least one pair) and ``out_dir/test.jsonl`` (held out, never on a
    node). Deterministic in ``seed``. More nodes than training pairs is an error that says the
    most this corpus can feed."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    examples = trivia_qa()
    random.Random(f"{seed}/trivia").shuffle(examples)
    cut = max(1, round(len(examples) * test_fraction))
    test, train = examples[:cut], examples[cut:]
    if nodes > len(train):
        raise ValueError(f"the trivia corpus has {len(train)} training pairs (of "
                         f"{len(examples)}): at most {len(train)} nodes, got {nodes}")
    # one pair guaranteed, no more: a larger floor (BBC's up to 10) would flatten the skew
    # of a corpus this small (at 10 nodes, 7 of 10 shards would sit at the floor)
    shards = dirichlet_shards(train, nodes, alpha, seed, min_size=1)
    out_dir = Path(out_dir)
    for i, shard in enumerate(shards):
        write_jsonl(out_dir / f"node{i}" / "train.jsonl", shard)
    write_jsonl(out_dir / "test.jsonl", test)
    return {"dataset": "trivia", "nodes": nodes, "alpha": alpha, "seed": seed, "labels": [],
            "train_sizes": [len(s) for s in shards], "test_size": len(test)}
