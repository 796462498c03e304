"""Local training and evaluation on a node, for classification and causal language models.

This is the "local update" every federated method shares: load the global trainable state, train
on the node's own examples, hand back the new trainable state. What is trainable follows
``ModelConfig.adapter``: with ``"lora"`` (FedAvg-LoRA, DP-LoRA, CELLM) the LoRA matrices and, for
classification, the head; with ``"none"`` (full-parameter methods such as Ferret) every floating
parameter of the model. Only the trainable tensors ever leave the trainer, as CPU float32 tensors
with stable, sorted names, which is what the wire codec and the aggregators expect. State files
are safetensors, never pickles.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from node.data import Example
from node.device import autocast, autocast_dtype, select_device
from node.models import ModelConfig, build_model

__all__ = ["LoraTrainer", "load_state_file", "save_state_file"]

ProgressFn = Callable[[int, int, float], None]


def save_state_file(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write tensors to a safetensors file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file (on the CPU), in sorted key order."""
    loaded = load_file(str(path), device="cpu")
    return {name: loaded[name] for name in sorted(loaded)}


class LoraTrainer:
    """A model (PEFT LoRA, or plain with ``adapter="none"``) plus the loops to train and
    evaluate it on lists of ``Example``.

    Building the model is the expensive part (seconds for real bases), so a node builds one
    trainer per job configuration and reuses it across rounds, loading each round's global state
    with ``load_trainable_state``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device | str = "cpu",
        cache_dir: Path | str | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = device if isinstance(device, torch.device) else select_device(device)
        model, tokenizer = build_model(cfg, cache_dir)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self._classification = cfg.task == "sequence-classification"
        self._full = cfg.adapter == "none"
        initial = self._current_state()
        # Sorted names: the same order however the model was built or the state was read back.
        self._keys = sorted(initial)
        self._shapes = {name: tuple(initial[name].shape) for name in self._keys}

    # ---------------------------------------------------------------- state

    def _current_state(self) -> dict[str, torch.Tensor]:
        """The live trainable tensors by name (no copies)."""
        if self._full:
            return {
                name: param
                for name, param in self.model.named_parameters()
                if param.requires_grad and param.is_floating_point()
            }
        return get_peft_model_state_dict(self.model)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of exactly the trainable tensors, sorted by name.

        Names are PEFT's (``get_peft_model_state_dict``: no adapter name) with LoRA, the model's
        parameter names with ``adapter="none"``; identical on every node that built the same
        ``ModelConfig``.
        """
        state = self._current_state()
        return {
            name: state[name].detach().to(device="cpu", dtype=torch.float32).clone()
            for name in self._keys
        }

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load trainable tensors (e.g. a round's global adapter); strict about names and shapes.

        A partial or mismatched state means the sender built a different model (other base,
        rank or targets); loading it silently would train from a wrong start, so it is an error.
        """
        expected = set(self._keys)
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            what = "full" if self._full else f"r={self.cfg.lora_r}"
            raise ValueError(
                f"trainable state does not match this model ({self.cfg.base}, {what})"
                f": missing {_preview(missing)}, unexpected {_preview(unexpected)}"
            )
        wrong = [
            f"{name}: got {tuple(state[name].shape)}, expected {self._shapes[name]}"
            for name in self._keys
            if tuple(state[name].shape) != self._shapes[name]
        ]
        if wrong:
            raise ValueError(f"trainable state has wrong shapes: {_preview(wrong)}")
        current = self._current_state()
        converted = {
            name: state[name].detach().to(device=self.device, dtype=current[name].dtype)
            for name in self._keys
        }
        if self._full:
            with torch.no_grad():
                for name in self._keys:
                    current[name].copy_(converted[name])
        else:
            set_peft_model_state_dict(self.model, converted)

    def save_trainable_state(self, path: Path) -> None:
        """Write the trainable state to a safetensors file, atomically."""
        save_state_file(path, self.trainable_state())

    @staticmethod
    def load_state_file(path: Path) -> dict[str, torch.Tensor]:
        """Read a trainable state written by ``save_trainable_state`` (pass it to ``load_...``)."""
        return load_state_file(path)

    # ---------------------------------------------------------------- batches

    def _check(self, examples: Sequence[Example]) -> None:
        if not examples:
            raise ValueError("no examples: a node needs at least one example to train or evaluate")
        if self._classification:
            n = self.cfg.num_labels
            for i, ex in enumerate(examples):
                if ex.label is None or isinstance(ex.label, bool) or not 0 <= ex.label < n:
                    raise ValueError(
                        f"example {i} has label {ex.label!r}; sequence-classification with "
                        f"num_labels={n} needs integer labels in [0, {n})"
                    )

    def _encode(self, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
        encoded = self.tokenizer(
            [ex.text for ex in examples],
            truncation=True,
            max_length=self.cfg.max_length,
            return_token_type_ids=False,
        )
        return [
            {"input_ids": ids, "attention_mask": mask}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
        ]

    def _collate(
        self, encoded: Sequence[dict[str, list[int]]], labels: Sequence[int | None]
    ) -> dict[str, torch.Tensor]:
        """Pad one batch to its own longest sequence (dynamic padding) and attach labels."""
        batch = self.tokenizer.pad(list(encoded), padding=True, return_tensors="pt")
        out = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }
        if self._classification:
            out["labels"] = torch.tensor(list(labels), dtype=torch.long, device=self.device)
        else:
            out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """``examples`` as one model-ready batch (ids, mask, labels) on the trainer's device:
        what a merge runs through the model to match hidden units (DIMAT)."""
        self._check(examples)
        return self._collate(self._encode(examples), [ex.label for ex in examples])

    def _batches(
        self,
        encoded: Sequence[dict[str, list[int]]],
        examples: Sequence[Example],
        order: Sequence[int],
        batch_size: int,
    ) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self._collate([encoded[i] for i in idx], [examples[i].label for i in idx])

    # ---------------------------------------------------------------- train / evaluate

    def train(
        self,
        examples: Sequence[Example],
        *,
        epochs: int = 1,
        max_steps: int = 0,
        batch_size: int = 16,
        learning_rate: float = 5e-4,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> dict[str, float]:
        """Train the trainable tensors with AdamW and return loss statistics.

        The optimizer is fresh on every call: in federated learning each round starts from the
        global state, and stale moment estimates from the previous round would pull towards this
        node's old update. ``epochs`` passes over the (shuffled) data are made, stopping early
        after ``max_steps`` optimizer steps when that is > 0 (a compute cap per round, so a node
        with a large shard does not hold the round up; 0 = no cap). The data order and any
        dropout are seeded by ``seed``, so a round is reproducible.
        """
        self._check(examples)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 = no cap), got {max_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")

        encoded = self._encode(examples)
        per_epoch = math.ceil(len(examples) / batch_size)
        total = min(max_steps, epochs * per_epoch) if max_steps > 0 else epochs * per_epoch
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate)
        use_scaler = autocast_dtype(self.device) == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        rng = random.Random(seed)
        losses: list[float] = []
        cuda_devices = []
        if self.device.type == "cuda":
            index = self.device.index
            cuda_devices = [torch.cuda.current_device() if index is None else index]

        self.model.train()
        # A progress callback may raise to abort (cancellation): drop the gradients either way.
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(seed)
                for _ in range(epochs):
                    order = list(range(len(examples)))
                    rng.shuffle(order)
                    for batch in self._batches(encoded, examples, order, batch_size):
                        with autocast(self.device):
                            loss = self.model(**batch).loss
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        value = float(loss.detach())
                        losses.append(value)
                        if progress is not None:
                            progress(len(losses), total, value)
                        if len(losses) >= total:
                            break
                    if len(losses) >= total:
                        break
        finally:
            optimizer.zero_grad(set_to_none=True)
        return {
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean": sum(losses) / len(losses),
            "steps": len(losses),
            "num_examples": len(examples),
        }

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], *, batch_size: int = 32) -> dict[str, float]:
        """Loss and accuracy (classification) or loss and perplexity (causal LM).

        Classification loss is the mean over examples; language-model loss is the mean over
        predicted tokens, so perplexity does not depend on how examples fall into batches.
        """
        self._check(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.model.training
        self.model.eval()
        try:
            encoded = self._encode(examples)
            order = list(range(len(examples)))
            loss_sum = 0.0
            count = 0
            correct = 0
            for batch in self._batches(encoded, examples, order, batch_size):
                with autocast(self.device):
                    out = self.model(**batch)
                if self._classification:
                    n = batch["labels"].numel()
                    correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                else:
                    n = int((batch["labels"][:, 1:] != -100).sum())  # tokens that are predicted
                if n:
                    loss_sum += float(out.loss) * n
                    count += n
        finally:
            self.model.train(was_training)
        loss = loss_sum / count if count else float("nan")
        if self._classification:
            return {"loss": loss, "accuracy": correct / len(examples)}
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _preview(items: Sequence[str], limit: int = 5) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"
