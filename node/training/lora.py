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

import ctypes
import math
import random
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from confide.node.data import Example
from confide.node.device import autocast, autocast_dtype, seeded_rng, select_device
from confide.node.methods.head import is_head_parameter
from confide.node.models import ModelConfig, build_model
from confide.node.training.batching import Batcher
from confide.node.training.state import (
    check_state,
    copy_into,
    cpu_copies,
    load_state_file,
    save_state_file,
)
from confide.node.training.task import ProgressFn, round_seed
from confide.privacy.dp import secure_generator
from confide.privacy.dpsgd import DPSGD
from confide.v1 import coordinator_pb2 as pb

__all__ = ["TRAIN_ONLY", "LoraTrainer"]

TRAIN_ONLY = ("all", "lora-b", "head")
"""Which trainable tensors DP-SGD moves (the others stay as received): every one, LoRA B and
the head with A frozen (FFA-LoRA), or the head only. Fewer coordinates, less total noise."""


def parameter_groups(model: torch.nn.Module, learning_rate: float,
                     head_learning_rate: float = 0.0) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: the body at ``learning_rate``, the task
    head at ``head_learning_rate`` (when > 0; else one group at ``learning_rate``)."""
    body, head = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (head if head_learning_rate > 0 and is_head_parameter(name) else body).append(
                parameter)
    groups = [{"params": body, "lr": learning_rate}] if body else []
    if head:
        groups.append({"params": head, "lr": head_learning_rate})
    return groups


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Poisson batches have a new shape every step, and glibc keeps the freed blocks of each: a
    MiniLM node's RSS grew from 3 GB to 7.4 GB over some 20 DP-SGD steps (B = 64) and was
    OOM-killed with three nodes on a 23 GB machine. After a trim it stays at one step's peak."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not Linux/glibc
    _LIBC = None


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
        self._batcher = Batcher(tokenizer, task=cfg.task, num_labels=cfg.num_labels,
                                max_length=cfg.max_length, device=self.device)
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
        return cpu_copies(self._current_state(), self._keys)

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load trainable tensors (e.g. a round's global adapter); strict about names and shapes.

        A partial or mismatched state means the sender built a different model (other base,
        rank or targets); loading it silently would train from a wrong start, so it is an error.
        """
        what = "full" if self._full else f"r={self.cfg.lora_r}"
        check_state(state, self._shapes, f"this model ({self.cfg.base}, {what})")
        if self._full:
            copy_into(self._current_state(), state)
            return
        current = self._current_state()
        set_peft_model_state_dict(self.model, {
            name: state[name].detach().to(device=self.device, dtype=current[name].dtype)
            for name in self._keys
        })

    def save_trainable_state(self, path: Path) -> None:
        """Write the trainable state to a safetensors file, atomically."""
        save_state_file(path, self.trainable_state())

    @staticmethod
    def load_state_file(path: Path) -> dict[str, torch.Tensor]:
        """Read a trainable state written by ``save_trainable_state`` (pass it to ``load_...``)."""
        return load_state_file(path)

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """``examples`` as one model-ready batch (ids, mask, labels) on the trainer's device:
        what a merge runs through the model to match hidden units (DIMAT)."""
        return self._batcher.batch(examples)

    # ---------------------------------------------------------------- train / evaluate

    def train_task(self, task: pb.Task, examples: Sequence[Example], progress: ProgressFn,
                   scratch: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """A TRAIN task's local training, as its job's train spec says."""
        train = task.spec.train
        metrics = self.train(examples, epochs=train.local_epochs, max_steps=train.max_steps,
                             batch_size=train.batch_size, learning_rate=train.learning_rate,
                             seed=round_seed(task), progress=progress,
                             optimizer=train.optimizer or "adamw",
                             head_learning_rate=train.head_learning_rate)
        return len(examples), metrics

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
        optimizer: str = "adamw",
        head_learning_rate: float = 0.0,
    ) -> dict[str, float]:
        """Train the trainable tensors with AdamW (or plain SGD: ``optimizer = "sgd"``, as
        Ferret's paper does) and return loss statistics. ``head_learning_rate`` > 0 gives the
        task head (classifier / score) its own rate: full-parameter methods train a fresh head
        beside a pretrained body, which want different rates.

        The optimizer is fresh on every call: in federated learning each round starts from the
        global state, and stale moment estimates from the previous round would pull towards this
        node's old update. ``epochs`` passes over the (shuffled) data are made, stopping early
        after ``max_steps`` optimizer steps when that is > 0 (a compute cap per round, so a node
        with a large shard does not hold the round up; 0 = no cap). The data order and any
        dropout are seeded by ``seed``, so a round is reproducible.
        """
        self._batcher.check(examples)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0 = no cap), got {max_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")

        encoded = self._batcher.encode(examples)
        per_epoch = math.ceil(len(examples) / batch_size)
        total = min(max_steps, epochs * per_epoch) if max_steps > 0 else epochs * per_epoch
        batches = self._batcher.shuffled(examples, encoded, batch_size, random.Random(seed))
        groups = parameter_groups(self.model, learning_rate, head_learning_rate)
        if optimizer == "sgd":
            step_rule: torch.optim.Optimizer = torch.optim.SGD(groups, lr=learning_rate)
        elif optimizer == "adamw":
            step_rule = torch.optim.AdamW(groups, lr=learning_rate)
        else:
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        use_scaler = autocast_dtype(self.device) == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        losses: list[float] = []

        self.model.train()
        # A progress callback may raise to abort (cancellation): drop the gradients either way.
        try:
            with seeded_rng(self.device, seed):
                for batch in islice(batches, total):
                    losses.append(self._step(batch, step_rule, scaler))
                    if progress is not None:
                        progress(len(losses), total, losses[-1])
        finally:
            step_rule.zero_grad(set_to_none=True)
        return {
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean": sum(losses) / len(losses),
            "steps": len(losses),
            "num_examples": len(examples),
        }

    def _step(self, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler) -> float:
        """One optimizer step on one batch; the loss. (Example-level DP-SGD replaces this
        step and the batches: ``train_private``.)"""
        with autocast(self.device):
            loss = self.model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    # ---------------------------------------------------------------- example-level DP-SGD

    def train_private(
        self,
        examples: Sequence[Example],
        *,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        clip_norm: float,
        learning_rate: float,
        train_only: str = "all",
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, float]:
        """``steps`` DP-SGD steps (``privacy.dpsgd.DPSGD``) on ``examples``, AdamW on the noised
        gradients (post-processing).

        Instead of shuffled epochs: Poisson batches at rate ``sample_rate``; instead of the
        batch gradient: each example's gradient clipped to ``clip_norm``, summed, plus
        N(0, (noise_multiplier * clip_norm)^2), divided by the expected batch size. Full
        precision (no autocast or loss scaling: they would rescale per-example gradients), the
        model in train() mode (Opacus' hooks record nothing in eval()). The noise and the
        batches come from ``generator`` (default: ``secure_generator()``, unpredictable).
        """
        self._batcher.check(examples)
        if train_only not in TRAIN_ONLY:
            raise ValueError(f"train_only must be one of {', '.join(TRAIN_ONLY)}, "
                             f"got {train_only!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        encoded = self._batcher.encode(examples)
        frozen = self._freeze_for(train_only)
        dp: DPSGD | None = None
        losses: list[float] = []
        clipped: list[float] = []
        self.model.train()
        try:
            dp = DPSGD(self.model, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                       sample_rate=sample_rate, n_examples=len(examples),
                       generator=generator or secure_generator())
            optimizer = torch.optim.AdamW(list(dp.params.values()), lr=learning_rate)

            def per_example_loss(indices: Sequence[int]) -> torch.Tensor:
                batch = self._batcher.collate([encoded[i] for i in indices],
                                              [examples[i].label for i in indices])
                return self._per_example_loss(batch)

            for indices in dp.sample_batches(steps):
                stats = dp.private_step(indices, per_example_loss, optimizer)
                _return_freed_memory()
                if stats.batch_size:
                    losses.append(stats.loss)
                    clipped.append(stats.clipped_fraction)
                if progress is not None:
                    progress(dp.steps_taken, steps, stats.loss if stats.batch_size else 0.0)
        finally:
            if dp is not None:
                dp.close()
            for param in frozen:
                param.requires_grad_(True)
            self.model.zero_grad(set_to_none=True)
        nan = float("nan")
        return {
            "loss_first": losses[0] if losses else nan,
            "loss_last": losses[-1] if losses else nan,
            "loss_mean": sum(losses) / len(losses) if losses else nan,
            "clipped_fraction": sum(clipped) / len(clipped) if clipped else nan,
            "steps": steps,
            "num_examples": len(examples),
        }

    def _freeze_for(self, train_only: str) -> list[torch.nn.Parameter]:
        """Freeze what ``train_only`` leaves out; the parameters frozen here (to unfreeze)."""
        if train_only == "all":
            return []
        frozen = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            is_lora = "lora_" in name
            if (train_only == "head" and is_lora) or (train_only == "lora-b"
                                                      and "lora_A" in name):
                param.requires_grad_(False)
                frozen.append(param)
        return frozen

    def _per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per example (shape [B]): cross-entropy of each example's label, or the
        mean next-token loss of each sequence (causal LM)."""
        labels = batch.pop("labels")
        logits = self.model(**batch).logits
        if self._classification:
            return F.cross_entropy(logits.float(), labels, reduction="none")
        shifted, targets = logits[:, :-1].float(), labels[:, 1:]
        token = F.cross_entropy(shifted.transpose(1, 2), targets, reduction="none",
                                ignore_index=-100)
        counted = (targets != -100).sum(dim=1).clamp(min=1)
        return token.sum(dim=1) / counted

    @torch.no_grad()
    def example_losses(self, examples: Sequence[Example], *,
                       batch_size: int = 32) -> list[float]:
        """Each example's own loss under the current state (eval mode): what a membership
        inference audit scores (``privacy.audit``)."""
        self._batcher.check(examples)
        was_training = self.model.training
        self.model.eval()
        try:
            encoded = self._batcher.encode(examples)
            losses: list[float] = []
            for batch in self._batcher.in_order(examples, encoded, batch_size):
                losses.extend(self._per_example_loss(batch).tolist())
        finally:
            self.model.train(was_training)
        return losses

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], *, batch_size: int = 32) -> dict[str, float]:
        """Loss and accuracy (classification) or loss and perplexity (causal LM).

        Classification loss is the mean over examples; language-model loss is the mean over
        predicted tokens, so perplexity does not depend on how examples fall into batches.
        """
        self._batcher.check(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.model.training
        self.model.eval()
        try:
            encoded = self._batcher.encode(examples)
            loss_sum = 0.0
            count = 0
            correct = 0
            for batch in self._batcher.in_order(examples, encoded, batch_size):
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

