"""Examples to model-ready batches, the same way for every trainer on a node.

LoRA / full-parameter training, the device side of a split model (SFPrompt) and DIMAT's
matching batches all encode text alike: truncation to ``max_length``, no token type ids,
dynamic padding (each batch padded to its own longest sequence, on the tokenizer's side),
classification labels as a long tensor, causal-LM labels as the ids with -100 on padding.
Where training draws its batches (``shuffled``) is the seam a sampler such as DP-SGD's
Poisson sampling replaces.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from confide.node.data import Example

__all__ = ["Batcher", "Encoded"]

Encoded = dict[str, list[int]]
"""One tokenized example: ``input_ids`` and ``attention_mask``, unpadded."""


class Batcher:
    """Checks, encodes and collates a trainer's examples for one task and tokenizer."""

    def __init__(self, tokenizer: Any, *, task: str, num_labels: int | None, max_length: int,
                 device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.classification = task != "causal-lm"
        self.num_labels = num_labels
        self.max_length = max_length
        self.device = device

    def check(self, examples: Sequence[Example]) -> None:
        """ValueError for no examples, or a classification label out of range."""
        if not examples:
            raise ValueError("no examples: a node needs at least one example to train or evaluate")
        if self.classification:
            n = self.num_labels
            assert n is not None
            for i, ex in enumerate(examples):
                if ex.label is None or isinstance(ex.label, bool) or not 0 <= ex.label < n:
                    raise ValueError(
                        f"example {i} has label {ex.label!r}; sequence-classification with "
                        f"num_labels={n} needs integer labels in [0, {n})"
                    )

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        encoded = self.tokenizer(
            [ex.text for ex in examples],
            truncation=True,
            max_length=self.max_length,
            return_token_type_ids=False,
        )
        return [
            {"input_ids": ids, "attention_mask": mask}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
        ]

    def collate(self, encoded: Sequence[Encoded],
                labels: Sequence[int | None]) -> dict[str, torch.Tensor]:
        """Pad one batch to its own longest sequence (dynamic padding) and attach labels."""
        batch = self.tokenizer.pad(list(encoded), padding=True, return_tensors="pt")
        out = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }
        if self.classification:
            out["labels"] = torch.tensor(list(labels), dtype=torch.long, device=self.device)
        else:
            out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """``examples`` as one checked batch."""
        self.check(examples)
        return self.collate(self.encode(examples), [ex.label for ex in examples])

    def in_order(self, examples: Sequence[Example], encoded: Sequence[Encoded],
                 batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of consecutive examples (evaluation, scoring)."""
        return self._batches(examples, encoded, range(len(examples)), batch_size)

    def shuffled(self, examples: Sequence[Example], encoded: Sequence[Encoded],
                 batch_size: int, rng: random.Random) -> Iterator[dict[str, torch.Tensor]]:
        """Epochs over the examples, each in a fresh order from ``rng``, for as many batches
        as the caller takes (the last batch of an epoch may be short)."""
        while True:
            order = list(range(len(examples)))
            rng.shuffle(order)
            yield from self._batches(examples, encoded, order, batch_size)

    def _batches(self, examples: Sequence[Example], encoded: Sequence[Encoded],
                 order: Sequence[int], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.collate([encoded[i] for i in idx], [examples[i].label for i in idx])
