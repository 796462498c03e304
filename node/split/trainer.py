"""The device side of a split model (SFPrompt): head + tail + prompts, trained through a
``Body`` (the server's layers, in process or over a stream), with EL2N pruning and local-loss
steps; the method's steps 0-3 (``node.methods.sfprompt``).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from confide.node.device import bf16_autocast, seeded_rng
from confide.node.methods.sfprompt import (
    ACTIVATION_DTYPES,
    PRUNE_METHODS,
    SFPromptConfig,
    local_step_schedule,
)
from confide.node.models import ModelConfig
from confide.node.split.body import Body, is_int, is_number, nbytes
from confide.node.split.defences import (
    ActivationNoise,
    add_private_lora,
    distance_correlation,
    private_lora_parameters,
    reset_private_lora,
)
from confide.node.split.model import SplitConfig, build_split
from confide.node.split.pruning import el2n, kept_examples
from confide.node.training.batching import Batcher
from confide.node.training.state import check_state, copy_into, cpu_copies
from confide.node.training.task import ProgressFn

__all__ = ["SplitTrainer", "build_split_trainer", "wire_rel_error"]


def _traffic() -> dict[str, float]:
    """A round's counters of what crossed the seam, and the rounding of what was sent."""
    return {"up": 0, "down": 0, "mask": 0, "calls": 0, "activation_err": 0.0,
            "activation_norm": 0.0, "gradient_err": 0.0, "gradient_norm": 0.0}


def _rounding(traffic: dict[str, float], kind: str, exact: torch.Tensor,
              wire: torch.Tensor) -> None:
    """Add the squared rounding error of casting ``exact`` to the wire, and its squared norm."""
    exact = exact.float()
    error = 0.0 if wire.dtype == exact.dtype else float((wire.float() - exact).square().sum())
    traffic[f"{kind}_err"] = traffic.get(f"{kind}_err", 0.0) + error
    traffic[f"{kind}_norm"] = traffic.get(f"{kind}_norm", 0.0) + float(exact.square().sum())


def wire_rel_error(traffic: dict[str, float], kind: str) -> float:
    """||cast(x) - x|| / ||x|| over everything of ``kind`` ("activation" or "gradient") sent
    this round: what the wire dtype cost (0 for float32 or when nothing was sent)."""
    norm = traffic[f"{kind}_norm"]
    return math.sqrt(traffic[f"{kind}_err"] / norm) if norm > 0 else 0.0


class SplitTrainer:
    """The device side: head + tail (+ prompts) of a split model, the loops that train and
    evaluate them through a ``Body``, pruning, and the trainable state.

    ``head`` / ``tail`` are ``node.split.model.DeviceHead`` / ``DeviceTail`` (built by
    ``build_split_trainer`` for a job); ``tokenizer`` pads on the right. Batches are made as
    every node trainer makes them (``node.training.batching``). ``device`` is a resolved
    ``torch.device`` (or its name).

    Defences (``node.split.defences``), all on the device: ``activation_noise`` (sigma of the
    per-token Gaussian noise on every hidden state sent to a body; the local path is not
    noised), ``private_head_lora`` (rank of a LoRA adapter on the head's layers that trains
    with the prompts but is not part of ``trainable_state``: it never leaves the device) and
    ``nopeek_weight`` (weight of the distance correlation between the token embeddings and the
    hidden states, added to the loss of every step).
    """

    def __init__(
        self,
        head: nn.Module,
        tail: nn.Module,
        tokenizer: Any,
        *,
        max_length: int = 128,
        activation_dtype: str = "float32",
        device: torch.device | str = "cpu",
        activation_noise: float = 0.0,
        private_head_lora: int = 0,
        nopeek_weight: float = 0.0,
    ) -> None:
        if activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(
                f"activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got "
                f"{activation_dtype!r}"
            )
        if not is_int(max_length) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.head = head.to(self.device)
        self.tail = tail.to(self.device)
        self.tokenizer = tokenizer
        self.task: str = tail.task
        self._classification = self.task != "causal-lm"
        self.num_prompts: int = head.num_prompts
        self.num_labels: int | None = tail.num_labels
        limit = head.max_tokens
        self.max_length = max_length if limit is None else min(max_length, limit)
        self.activation_dtype = activation_dtype
        self.wire_dtype = ACTIVATION_DTYPES[activation_dtype]
        self._compute_dtype = head.prompts.dtype
        self._params: dict[str, nn.Parameter] = {}
        if head.prompts.requires_grad:
            self._params["head.prompts"] = head.prompts
        for name, param in tail.named_parameters():
            if param.requires_grad:
                self._params[f"tail.{name}"] = param
        if not self._params:
            raise ValueError("nothing trains: no prompts and a frozen tail")
        self._keys = sorted(self._params)
        self.noise = ActivationNoise(activation_noise)
        if private_head_lora:
            add_private_lora(head.stack, private_head_lora)
            head.stack.to(self.device)
        self._private = private_lora_parameters(head.stack)
        if not is_number(nopeek_weight) or nopeek_weight < 0:
            raise ValueError(f"nopeek_weight must be a finite number >= 0, got {nopeek_weight!r}")
        if nopeek_weight > 0 and not self._private:
            raise ValueError("nopeek_weight needs private_head_lora >= 1")
        self.nopeek_weight = float(nopeek_weight)
        self._shapes = {name: tuple(self._params[name].shape) for name in self._keys}
        self._next_step = 0
        self._batcher = Batcher(tokenizer, task=self.task, num_labels=self.num_labels,
                                max_length=self.max_length, device=self.device)

    # ---------------------------------------------------------------- state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of the prompts and trainable tail tensors, sorted by name."""
        return cpu_copies(self._params, self._keys)

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a (global) trainable state; strict about names and shapes."""
        check_state(state, self._shapes, "this split (head/tail layers, prompts, train_tail)")
        copy_into(self._params, state)

    def reset_private_state(self) -> None:
        """A new job: the private head adapter starts again as the public head."""
        reset_private_lora(self.head.stack)

    # ---------------------------------------------------------------- the seam

    def _body_forward(self, body: Body, step: int, hidden: torch.Tensor, mask: torch.Tensor,
                      train: bool, traffic: dict[str, float]) -> torch.Tensor:
        sent = self.noise(hidden.detach())
        wire = sent.to(self.wire_dtype)
        _rounding(traffic, "activation", sent, wire)
        wire_mask = mask.to(torch.bool)
        traffic["up"] += nbytes(wire) + nbytes(wire_mask)
        traffic["mask"] += nbytes(wire_mask)
        out = body.forward(step, wire, wire_mask, train=train)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or (
            tuple(out.shape) != tuple(wire.shape)
        ):
            raise ValueError(
                f"the body answered step {step} with "
                f"{getattr(out, 'dtype', type(out).__name__)} "
                f"{tuple(getattr(out, 'shape', ()))}, expected floating {tuple(wire.shape)}"
            )
        traffic["down"] += nbytes(out)
        traffic["calls"] += 1
        return out.detach().to(device=self.device, dtype=self._compute_dtype)

    def _body_backward(self, body: Body, step: int, grad: torch.Tensor, expected: torch.Size,
                       traffic: dict[str, float]) -> torch.Tensor:
        wire = grad.detach().to(self.wire_dtype)
        _rounding(traffic, "gradient", grad.detach(), wire)
        traffic["up"] += nbytes(wire)
        back = body.backward(step, wire)
        if not isinstance(back, torch.Tensor) or not back.is_floating_point() or (
            tuple(back.shape) != tuple(expected)
        ):
            raise ValueError(
                f"the body's gradient for step {step} is "
                f"{getattr(back, 'dtype', type(back).__name__)} "
                f"{tuple(getattr(back, 'shape', ()))}, expected floating {tuple(expected)}"
            )
        traffic["down"] += nbytes(back)
        traffic["calls"] += 1
        return back.detach().to(device=self.device, dtype=self._compute_dtype)

    def _split_loss_step(self, batch: dict[str, torch.Tensor], body: Body,
                         traffic: dict[str, float]) -> torch.Tensor:
        """One split step: head -> body -> tail, loss, and the gradients back to the prompts.
        Leaves gradients in the trainable tensors; returns the loss."""
        step = self._next_step
        self._next_step += 1
        mask = self.head.extend_mask(batch["attention_mask"])
        with bf16_autocast(self.device):
            hidden = self.head(batch["input_ids"], batch["attention_mask"])
        received = self._body_forward(body, step, hidden, mask, True, traffic)
        received.requires_grad_(True)
        with bf16_autocast(self.device):
            loss, _ = self.tail(received, mask, batch["labels"])
        loss.backward()
        grad = received.grad if received.grad is not None else torch.zeros_like(received)
        back = self._body_backward(body, step, grad, hidden.shape, traffic)
        if hidden.requires_grad:
            leak = self._nopeek(batch, hidden)
            if leak is None:
                hidden.backward(back.to(hidden.dtype))
            else:
                torch.autograd.backward([hidden, leak], [back.to(hidden.dtype), None])
        return loss

    def _nopeek(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor
                ) -> torch.Tensor | None:
        """NoPeek's leakage term: weight x dCor(token embeddings, hidden states sent) over the
        batch's real tokens (None when off)."""
        if self.nopeek_weight == 0:
            return None
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            words = self.head.word_embeddings()(batch["input_ids"])[real]
        sent = hidden[:, self.num_prompts:][real]
        return self.nopeek_weight * distance_correlation(words.float(), sent.float())

    def _local_loss_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One local-loss step: the head's output straight into the tail, no server."""
        mask = self.head.extend_mask(batch["attention_mask"])
        with bf16_autocast(self.device):
            hidden = self.head(batch["input_ids"], batch["attention_mask"])
            loss, _ = self.tail(hidden, mask, batch["labels"])
        leak = self._nopeek(batch, hidden)
        (loss if leak is None else loss + leak).backward()
        return loss

    # ---------------------------------------------------------------- pruning

    @torch.no_grad()
    def el2n_scores(self, examples: Sequence[Any], *, batch_size: int = 16) -> list[float]:
        """EL2N of every example through the local path head -> tail (no server round trip:
        pruning costs no communication and reveals nothing to the server), in eval mode."""
        self._batcher.check(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = self._batcher.encode(examples)
        scores: list[float] = []
        with self._eval():
            for batch in self._batcher.in_order(examples, encoded, batch_size):
                mask = self.head.extend_mask(batch["attention_mask"])
                with bf16_autocast(self.device):
                    hidden = self.head(batch["input_ids"], batch["attention_mask"])
                    _, logits = self.tail(hidden, mask)
                scores.extend(el2n(logits, batch["labels"], self.task, self.num_prompts).tolist())
        return scores

    def prune(self, examples: Sequence[Any], gamma: float, *, batch_size: int = 16,
              by_label: bool = True, method: str = "el2n", warmup_steps: int = 0,
              lr: float = 5e-4, seed: int = 0) -> list[Any]:
        """The top ceil(gamma * n) examples by EL2N (ties: lower index), in their original
        order. gamma = 1 returns every example without scoring.

        ``by_label`` (classification only): keep the top gamma of each label instead of the
        top gamma overall. Scored before any training, EL2N is dominated by the random head's
        bias towards some classes, and a global cut dropped whole classes in the benchmark
        (a MiniLM shard of 4 labels kept 2); per label the shard's label mix survives
        (``node.split.pruning.kept_examples``).

        ``warmup_steps``: that many local-loss steps (no server; ``lr``, ``seed``) before
        scoring, so that the tail that scores is not the untrained one; the trainable state
        (and a private head adapter) is put back afterwards: the warm-up serves the scores
        only. ``method = "random"``: the control; the same fraction (per label too), chosen
        uniformly at random from ``seed``, no scoring and no warm-up."""
        if not is_number(gamma) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma is the fraction kept, in (0, 1], got {gamma!r}")
        if method not in PRUNE_METHODS:
            raise ValueError(f"method must be one of {', '.join(PRUNE_METHODS)}, got {method!r}")
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if gamma >= 1.0:
            self._batcher.check(examples)
            return list(examples)
        if method == "random":
            self._batcher.check(examples)
            rng = random.Random(seed)
            scores = [rng.random() for _ in examples]
        elif warmup_steps:
            saved = self.trainable_state()
            private = [p.detach().clone() for p in self._private]
            try:
                self.train_round(examples, None, steps=warmup_steps, batch_size=batch_size,
                                 lr=lr, local_loss_steps=warmup_steps, seed=seed)
                scores = self.el2n_scores(examples, batch_size=batch_size)
            finally:
                self.load_trainable_state(saved)
                with torch.no_grad():
                    for param, value in zip(self._private, private, strict=True):
                        param.copy_(value)
        else:
            scores = self.el2n_scores(examples, batch_size=batch_size)
        return kept_examples(examples, scores, gamma, by_label and self._classification)

    # ---------------------------------------------------------------- train / evaluate

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        modes = (self.head.training, self.tail.training)
        self.head.eval()
        self.tail.eval()
        try:
            yield
        finally:
            self.head.train(modes[0])
            self.tail.train(modes[1])

    def train_round(
        self,
        examples: Sequence[Any],
        body: Body | None,
        *,
        steps: int,
        batch_size: int = 16,
        lr: float = 5e-4,
        local_loss_steps: int = 0,
        schedule: str = "last",
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> dict[str, float]:
        """``steps`` steps in all, ``local_loss_steps`` of them local-loss steps (no server)
        in place of split steps through ``body``; ``schedule`` says which
        (``local_step_schedule``: "last" or "interleave"). One fresh AdamW over the prompts
        (+ tail); batches cycle through the shuffled examples (seeded by ``seed``, as is
        dropout). Returns loss statistics, the bytes that crossed the seam
        (``activation_bytes_up`` includes ``mask_bytes_up``) and the relative rounding error
        of what the device sent in the wire dtype (``activation_wire_rel_error``,
        ``gradient_wire_rel_error``). ``progress(done, total, loss)`` after every step may
        raise to abort."""
        self._batcher.check(examples)
        if not is_int(steps) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not is_int(local_loss_steps) or not 0 <= local_loss_steps <= steps:
            raise ValueError(f"local_loss_steps replace some of the steps: an integer in "
                             f"[0, {steps}], got {local_loss_steps!r}")
        if steps < 1:
            raise ValueError("nothing to do: steps is 0")
        local = local_step_schedule(steps, local_loss_steps, schedule)
        if not all(local) and body is None:
            raise ValueError("split steps need a body (the server side); got None")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not is_number(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")

        encoded = self._batcher.encode(examples)
        batches = self._batcher.shuffled(examples, encoded, batch_size, random.Random(seed))
        params = [self._params[name] for name in self._keys] + self._private
        optimizer = torch.optim.AdamW(params, lr=lr)
        split_losses: list[float] = []
        local_losses: list[float] = []
        traffic = _traffic()
        self.head.train()
        self.tail.train()
        try:
            with seeded_rng(self.device, seed):
                for done, is_local in enumerate(local, start=1):
                    batch = next(batches)
                    optimizer.zero_grad(set_to_none=True)
                    if not is_local:
                        assert body is not None
                        loss = self._split_loss_step(batch, body, traffic)
                        split_losses.append(float(loss.detach()))
                    else:
                        loss = self._local_loss_step(batch)
                        local_losses.append(float(loss.detach()))
                    optimizer.step()
                    if progress is not None:
                        progress(done, steps, float(loss.detach()))
        finally:
            optimizer.zero_grad(set_to_none=True)
        losses = split_losses + local_losses
        metrics: dict[str, float] = {
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "loss_mean": sum(losses) / len(losses),
            "steps": len(losses),
            "split_steps": len(split_losses),
            "local_loss_steps": len(local_losses),
            "num_examples": len(examples),
            "activation_bytes_up": traffic["up"],
            "activation_bytes_down": traffic["down"],
            "mask_bytes_up": traffic["mask"],
            "body_calls": traffic["calls"],
            "activation_wire_rel_error": wire_rel_error(traffic, "activation"),
            "gradient_wire_rel_error": wire_rel_error(traffic, "gradient"),
        }
        if split_losses:
            metrics["split_loss_mean"] = sum(split_losses) / len(split_losses)
        if local_losses:
            metrics["local_loss_mean"] = sum(local_losses) / len(local_losses)
        return metrics

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Any], body: Body | None = None, *,
                 batch_size: int = 32) -> dict[str, float]:
        """Loss and accuracy (classification) or loss and perplexity (causal LM) through the
        split path head -> body -> tail (``body=None``: the local path head -> tail).
        Classification loss is the mean over examples, LM loss the mean over predicted tokens."""
        self._batcher.check(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = self._batcher.encode(examples)
        loss_sum = 0.0
        count = 0
        correct = 0
        traffic = _traffic()
        with self._eval():
            for batch in self._batcher.in_order(examples, encoded, batch_size):
                mask = self.head.extend_mask(batch["attention_mask"])
                with bf16_autocast(self.device):
                    hidden = self.head(batch["input_ids"], batch["attention_mask"])
                if body is not None:
                    step = self._next_step
                    self._next_step += 1
                    hidden = self._body_forward(body, step, hidden, mask, False, traffic)
                with bf16_autocast(self.device):
                    loss, logits = self.tail(hidden, mask, batch["labels"])
                if self._classification:
                    n = batch["labels"].numel()
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                else:
                    # predicted tokens: the last prompt predicts the first token
                    n = int((self.tail.full_labels(batch["labels"])[:, 1:] != -100).sum())
                if n:
                    loss_sum += float(loss) * n
                    count += n
        loss = loss_sum / count if count else float("nan")
        out: dict[str, float] = {"loss": loss}
        if self._classification:
            out["accuracy"] = correct / len(examples)
        else:
            out["perplexity"] = math.exp(min(loss, 700.0))
        out["activation_bytes_up"] = traffic["up"]
        out["activation_bytes_down"] = traffic["down"]
        return out


def build_split_trainer(
    model_cfg: ModelConfig,
    method_cfg: SFPromptConfig,
    device: torch.device | str = "cpu",
    cache_dir: Path | str | None = None,
) -> SplitTrainer:
    """The device side of an SFPrompt job: head + tail of the seeded base, ready to train."""
    split_cfg = SplitConfig.from_method(method_cfg, model_cfg.seed)
    parts = build_split(model_cfg, split_cfg, role="device", cache_dir=cache_dir)
    assert parts.head is not None and parts.tail is not None and parts.tokenizer is not None
    return SplitTrainer(
        parts.head,
        parts.tail,
        parts.tokenizer,
        max_length=model_cfg.max_length,
        activation_dtype=method_cfg.activation_dtype,
        device=device,
        activation_noise=method_cfg.activation_noise,
        private_head_lora=method_cfg.private_head_lora,
        nopeek_weight=method_cfg.nopeek_weight,
    )
