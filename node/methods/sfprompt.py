"""SFPrompt: split federated prompt tuning, with dataset pruning and local-loss updates.

Cao et al., "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for Large Pre-Trained
Models over Resource-Limited Devices" (2024), as this module runs it:

    Job parameters: head_layers, tail_layers, num_prompts, prune_gamma, local_loss_steps,
    split_steps, train_tail, train_lm_head, activation_dtype, body_lr.

    Parties. The model is cut in three (``node.split_model``): each device holds the head
    (embeddings, soft prompts p, the first ``head_layers`` layers) and the tail (the last
    ``tail_layers`` layers, final norm / pooler, output head); one server holds the body (the
    layers between). Labels never leave a device: the loss is computed in its tail.
    Trainable state w: the prompts and, with ``train_tail``, the tail (``trainable =
    "sfprompt"``), named "head.prompts" and "tail.<parameter>". The body is frozen unless
    ``body_lr`` > 0; it is the server's, never averaged.

    Device i (``SplitTrainer``), before training (once per job, or per round: the caller's
    choice):
        0. load w_{r-1}
        1. prune: s_j = EL2N(x_j, y_j) = || softmax(tail(head(x_j))) - onehot(y_j) ||_2 through
           the *local* path head -> tail, no server round trip (pruning costs no communication;
           the scores rank examples, so the missing body shifts all of them alike). Causal LM:
           the mean over predicted tokens of the per-token EL2N. Keep D_i' = the top
           ceil(gamma * |D_i|) examples by s (ties: the lower index), the hard / informative
           ones, as in Paul et al. 2021 ("Deep Learning on a Data Diet"); for classification
           the top gamma of each label (``prune_by_label``, the default), so that scores of an
           untrained head cannot drop whole classes.

    Device i, round r:
        2. for t = 1..split_steps, on a batch (x, y) of D_i':
               h   = head(x)                        (B, P+T, H): prompts ++ embeddings, layers
               send h (cast to activation_dtype) and the (B, P+T) mask    -> server
                   server: z = body(h, mask), keeps the autograd graph of step t
               receive z;  loss = tail(z, mask, y);  g_z = d loss / d z
               send g_z (activation_dtype)                                -> server
                   server: g_h = (d z / d h)^T g_z, frees the graph; with body_lr > 0 it also
                   steps its own optimizer on the body
               receive g_h;  back-propagate it through the head into p
               AdamW step on p (+ the tail)
        3. for t = 1..local_loss_steps (local-loss update, no server):
               loss = tail(head(x), mask, y);  AdamW step on p (+ the tail)
        4. send delta_i = w_i - w_{r-1}, densely (prompts + tail: small)

    Coordinator (``aggregate``):
        5. w_r = w_{r-1} + sum_i n_i delta_i / sum_i n_i      (n_i: examples of device i)

Wire. Per split step: up B(P+T)H activations + B(P+T) mask bytes + B(P+T)H gradients, down
B(P+T)H outputs + B(P+T)H gradients, each activation element 4 / 2 / 2 bytes for float32 /
float16 / bfloat16 (``activation_bytes``). Per round: delta_i up, w_r down (prompts: P x H
floats; tail: its parameters). Local-loss steps and pruning cost no bytes.

The seam (``Body``) is transport-agnostic: ``LocalBody`` runs the server side in process, and
is what a server wraps behind a stream (it receives detached tensors and keeps one graph per
step id until that step's backward). Step ids are unique per ``SplitTrainer`` (a running
counter), so a server keys its graphs by (device, step).

Running it (what a worker and the server do):

    device:  trainer = node.split_model.build_split_trainer(model_cfg, cfg, device)
             kept = trainer.prune(examples, cfg.prune_gamma)          # EL2N, local, no bytes
             trainer.load_trainable_state(w_prev)
             metrics = trainer.train_round(kept, body, steps=..., batch_size=..., lr=...,
                                           local_loss_steps=cfg.local_loss_steps, seed=...)
             payload = SFPrompt().client_update(cfg, w_prev, trainer.trainable_state(), {})
    server:  parts = node.split_model.build_split(model_cfg, SplitConfig.from_method(cfg,
                 model_cfg.seed), role="server");  body = LocalBody(parts.body, lr=cfg.body_lr)
             serve body.forward / body.backward per (device, step) over a stream.

Precision: activations cross in ``activation_dtype``; the parts compute in their parameter
dtype (float32 here), under bf16 autocast on GPUs that have bf16, else in float32 (no fp16
autocast: its loss scaling would have to cross the seam).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from node.methods.base import MethodConfig
from node.methods.fedavg_lora import FedAvgLoRA

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATION_DTYPES",
    "SFPROMPT_TRAINABLE",
    "Body",
    "LocalBody",
    "SFPrompt",
    "SFPromptConfig",
    "SplitTrainer",
    "activation_bytes",
    "el2n",
    "top_fraction",
]

ACTIVATION_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""What may cross the seam: the wire dtype of activations and their gradients."""

SFPROMPT_TRAINABLE = "sfprompt"
"""``FederatedMethod.trainable`` of SFPrompt: prompts + tail of a split model."""

ProgressFn = Callable[[int, int, float], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SFPromptConfig(MethodConfig):
    """SFPrompt's job parameters.

    ``head_layers`` (>= 1) / ``tail_layers`` (>= 0): layers the device runs before and after
    the server's body. ``num_prompts``: soft prompt vectors prepended to the input embeddings.
    ``prune_gamma`` in (0, 1]: fraction of its examples a device keeps (top EL2N); 1 keeps all.
    ``prune_by_label``: classification keeps the top fraction of every label (the label mix
    survives pruning), not of the whole shard.
    ``local_loss_steps``: steps per round through head -> tail with no server. ``split_steps``:
    steps per round through the server (0: as the job's train spec says). ``train_tail``: the
    tail trains with the prompts. ``train_lm_head``: so does a causal LM's vocabulary projection
    (large; off by default). ``activation_dtype``: what crosses the wire ("float32",
    "float16", "bfloat16"). ``body_lr``: the server's learning rate for the body (0: frozen).
    """

    head_layers: int = 1
    tail_layers: int = 1
    num_prompts: int = 8
    prune_gamma: float = 1.0
    prune_by_label: bool = True
    local_loss_steps: int = 0
    split_steps: int = 0
    train_tail: bool = True
    train_lm_head: bool = False
    activation_dtype: str = "float32"
    body_lr: float = 0.0

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for values that make no sense."""
        lows = {"head_layers": 1, "tail_layers": 0, "num_prompts": 0,
                "local_loss_steps": 0, "split_steps": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                hint = (
                    " (the device must run at least one layer: plain token embeddings sent to "
                    "the server give the text away)" if name == "head_layers" else ""
                )
                raise ValueError(f"sfprompt: {name} must be an integer >= {low}, got "
                                 f"{value!r}{hint}")
        for name in ("train_tail", "train_lm_head", "prune_by_label"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"sfprompt: {name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.num_prompts == 0 and not self.train_tail:
            raise ValueError(
                "sfprompt: nothing to train: num_prompts is 0 and train_tail is false"
            )
        gamma = self.prune_gamma
        if not _is_number(gamma) or not 0.0 < gamma <= 1.0:
            raise ValueError(
                f"sfprompt: prune_gamma is the fraction of examples kept, a number in (0, 1] "
                f"(1 keeps all), got {gamma!r}"
            )
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(
                f"sfprompt: activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, "
                f"got {self.activation_dtype!r}"
            )
        if not _is_number(self.body_lr) or self.body_lr < 0:
            raise ValueError(
                f"sfprompt: body_lr must be a finite number >= 0 (0 keeps the server's body "
                f"frozen), got {self.body_lr!r}"
            )


class SFPrompt(FedAvgLoRA):
    """Aggregation side of SFPrompt: FedAvg of the devices' prompt + tail deltas (the
    FedAvg-LoRA update and aggregation, over a different trainable state)."""

    name = "sfprompt"
    config_class = SFPromptConfig
    trainable = SFPROMPT_TRAINABLE
    needs_split_server = True

    def validate_config(self, config: MethodConfig) -> None:
        assert isinstance(config, SFPromptConfig)
        config.validate()


# --------------------------------------------------------------------------------------------
# The seam


@runtime_checkable
class Body(Protocol):
    """The server's side of the split, as the device sees it (in process or over a stream).

    ``forward(step, hidden, attention_mask)``: hidden (B, L, H) floating in the wire dtype, mask
    (B, L) bool; returns the body's output (B, L, H) in the same dtype. With ``train`` the body
    keeps step ``step``'s graph until ``backward(step, grad_output)``, which returns the
    gradient with respect to the hidden states it received (same shape and dtype as
    ``grad_output``) and releases the graph. ``train=False`` (evaluation, scoring) keeps
    nothing and expects no backward.
    """

    def forward(self, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor, *,
                train: bool = True) -> torch.Tensor: ...

    def backward(self, step: int, grad_output: torch.Tensor) -> torch.Tensor: ...


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def activation_bytes(batch_size: int, positions: int, hidden_size: int,
                     activation_dtype: str = "float32") -> dict[str, int]:
    """Bytes one split training step moves: up (activations + bool mask + gradients) and down
    (outputs + gradients), for ``positions`` = prompts + tokens."""
    size = torch.empty((), dtype=ACTIVATION_DTYPES[activation_dtype]).element_size()
    tensor = batch_size * positions * hidden_size * size
    mask = batch_size * positions
    return {"up": 2 * tensor + mask, "down": 2 * tensor, "mask": mask}


def _bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # node.device.autocast, minus fp16 (whose loss scaling would have to cross the seam).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LocalBody:
    """The server side of the seam, run in process; a server wraps this same class.

    It receives tensors as a transport would deliver them (detached, in the wire dtype, on any
    device), computes in the body's own dtype and device, and answers in the dtype and on the
    device it was sent. Per training step it keeps the received hidden states (as a leaf that
    requires grad) and the output until ``backward`` of that step, at most ``max_pending``
    steps (a device that vanished mid-step must not leak memory: the oldest are dropped).
    ``lr`` > 0 trains the body with ``optimizer`` ("adamw" or "sgd"), one step per backward;
    0 keeps it frozen. Counters: ``bytes_received`` / ``bytes_sent`` (what the server would
    receive and send), ``forward_calls`` / ``backward_calls``.
    """

    def __init__(self, body: nn.Module, lr: float = 0.0, *, optimizer: str = "adamw",
                 max_pending: int = 8) -> None:
        if not _is_number(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0 (0 = frozen body), got {lr!r}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if not _is_int(max_pending) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self.module = body
        self.lr = float(lr)
        self.max_pending = max_pending
        params = [p for p in body.parameters() if p.is_floating_point()]
        if not params:
            raise ValueError("the body has no floating parameters")
        for param in params:
            param.requires_grad_(self.lr > 0)
        self._device = params[0].device
        self._dtype = params[0].dtype
        self._optimizer: torch.optim.Optimizer | None = None
        if self.lr > 0:
            cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
            self._optimizer = cls(params, lr=self.lr)
        self._pending: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.forward_calls = 0
        self.backward_calls = 0

    @property
    def pending(self) -> int:
        """Steps whose graph is held, waiting for their backward."""
        return len(self._pending)

    def reset(self) -> None:
        """Drop every held graph (e.g. the device's session ended)."""
        self._pending.clear()

    def forward(self, step: int, hidden: torch.Tensor, attention_mask: torch.Tensor, *,
                train: bool = True) -> torch.Tensor:
        if not hidden.is_floating_point() or hidden.dim() != 3:
            raise ValueError(
                f"the body takes floating hidden states (batch, length, hidden), got "
                f"{hidden.dtype} {tuple(hidden.shape)}"
            )
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"the attention mask must have shape {tuple(hidden.shape[:2])}, got "
                f"{tuple(attention_mask.shape)}"
            )
        self.forward_calls += 1
        self.bytes_received += _nbytes(hidden) + _nbytes(attention_mask)
        x = hidden.detach().to(device=self._device, dtype=self._dtype)
        mask = attention_mask.detach().to(self._device)
        if not train:
            was = self.module.training
            self.module.eval()
            try:
                with torch.no_grad(), _bf16_autocast(self._device):
                    out = self.module(x, mask)
            finally:
                self.module.train(was)
        else:
            if step in self._pending:
                raise ValueError(f"step {step} already has a forward waiting for its backward")
            self.module.train()
            x.requires_grad_(True)
            with torch.enable_grad(), _bf16_autocast(self._device):
                out = self.module(x, mask)
            self._pending[step] = (x, out)
            while len(self._pending) > self.max_pending:
                dropped, _ = self._pending.popitem(last=False)
                log.warning("body: dropping the graph of step %d (no backward came)", dropped)
        reply = out.detach().to(device=hidden.device, dtype=hidden.dtype)
        self.bytes_sent += _nbytes(reply)
        return reply

    def backward(self, step: int, grad_output: torch.Tensor) -> torch.Tensor:
        held = self._pending.pop(step, None)
        if held is None:
            raise ValueError(
                f"no forward of step {step} is waiting for its backward (never sent, already "
                "answered, or dropped after max_pending newer steps)"
            )
        x, out = held
        if tuple(grad_output.shape) != tuple(out.shape) or not grad_output.is_floating_point():
            raise ValueError(
                f"the gradient of step {step} must be floating with shape {tuple(out.shape)}, "
                f"got {grad_output.dtype} {tuple(grad_output.shape)}"
            )
        self.backward_calls += 1
        self.bytes_received += _nbytes(grad_output)
        out.backward(grad_output.detach().to(device=out.device, dtype=out.dtype))
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        reply = grad.detach().to(device=grad_output.device, dtype=grad_output.dtype)
        self.bytes_sent += _nbytes(reply)
        return reply


# --------------------------------------------------------------------------------------------
# Pruning


def el2n(logits: torch.Tensor, labels: torch.Tensor, task: str,
         num_prompts: int = 0) -> torch.Tensor:
    """EL2N score per example, float32 (B,): || softmax(logits) - onehot(y) ||_2.

    Classification: logits (B, C), labels (B,). Causal LM: logits (B, P+T, V) as the tail
    returns them, labels (B, T) with -100 on padding; the per-token score of every predicted
    token (after the usual shift; the last prompt predicts the first token), averaged per
    example (0 for an example with no predicted token).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if task != "causal-lm":
        onehot = nn.functional.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
        return (probs - onehot).norm(dim=-1)
    pad = labels.new_full((labels.shape[0], num_prompts), -100)
    targets = nn.functional.pad(torch.cat([pad, labels], dim=1), (0, 1), value=-100)[:, 1:]
    valid = targets != -100
    picked = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # ||p - e_y||^2 = sum p^2 - 2 p_y + 1
    squared = (probs * probs).sum(-1) - 2.0 * picked + 1.0
    per_token = squared.clamp(min=0.0).sqrt() * valid
    return per_token.sum(1) / valid.sum(1).clamp(min=1)


def top_fraction(scores: Sequence[float], gamma: float) -> list[int]:
    """Indices (ascending) of the top ceil(gamma * n) scores; ties go to the lower index.

    NaN ranks lowest. ceil is taken with a 1e-9 tolerance, so 0.3 of 10 keeps 3, not 4.
    """
    if not _is_number(gamma) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma is the fraction kept, in (0, 1], got {gamma!r}")
    n = len(scores)
    keep = min(n, math.ceil(gamma * n - 1e-9))

    def key(i: int) -> tuple[float, int]:
        s = float(scores[i])
        return (-s if not math.isnan(s) else math.inf, i)

    return sorted(sorted(range(n), key=key)[:keep])


# --------------------------------------------------------------------------------------------
# The device


class SplitTrainer:
    """The device side: head + tail (+ prompts) of a split model, the loops that train and
    evaluate them through a ``Body``, pruning, and the trainable state.

    ``head`` / ``tail`` are ``node.split_model.DeviceHead`` / ``DeviceTail`` (built by
    ``node.split_model.build_split_trainer`` for a job); ``tokenizer`` pads on the right.
    Batches are encoded as ``node.trainer.LoraTrainer`` encodes them (truncation to
    ``max_length``, no token type ids, dynamic padding; causal-LM labels are the ids with -100
    on padding). ``device`` is a resolved ``torch.device`` (or its name).
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
    ) -> None:
        if activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(
                f"activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got "
                f"{activation_dtype!r}"
            )
        if not _is_int(max_length) or max_length < 2:
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
        self._shapes = {name: tuple(self._params[name].shape) for name in self._keys}
        self._next_step = 0

    # ---------------------------------------------------------------- state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of the prompts and trainable tail tensors, sorted by name."""
        return {
            name: self._params[name].detach().to(device="cpu", dtype=torch.float32).clone()
            for name in self._keys
        }

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a (global) trainable state; strict about names and shapes."""
        missing = sorted(set(self._keys) - set(state))
        unexpected = sorted(set(state) - set(self._keys))
        if missing or unexpected:
            raise ValueError(
                f"trainable state does not match this split (head/tail layers, prompts, "
                f"train_tail): missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        wrong = [
            f"{name}: got {tuple(state[name].shape)}, expected {self._shapes[name]}"
            for name in self._keys
            if tuple(state[name].shape) != self._shapes[name]
        ]
        if wrong:
            raise ValueError(f"trainable state has wrong shapes: {wrong[:5]}")
        with torch.no_grad():
            for name in self._keys:
                param = self._params[name]
                param.copy_(state[name].detach().to(device=param.device, dtype=param.dtype))

    # ---------------------------------------------------------------- batches

    def _check(self, examples: Sequence[Any]) -> None:
        if not examples:
            raise ValueError("no examples: a device needs at least one example")
        if self._classification:
            n = self.num_labels
            for i, ex in enumerate(examples):
                if ex.label is None or isinstance(ex.label, bool) or not 0 <= ex.label < n:
                    raise ValueError(
                        f"example {i} has label {ex.label!r}; sequence-classification with "
                        f"num_labels={n} needs integer labels in [0, {n})"
                    )

    def _encode(self, examples: Sequence[Any]) -> list[dict[str, list[int]]]:
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

    def _collate(self, encoded: Sequence[dict[str, list[int]]],
                 labels: Sequence[int | None]) -> dict[str, torch.Tensor]:
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

    def _in_order(self, examples: Sequence[Any], encoded: Sequence[dict[str, list[int]]],
                  batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(examples), batch_size):
            idx = range(start, min(start + batch_size, len(examples)))
            yield self._collate([encoded[i] for i in idx], [examples[i].label for i in idx])

    def _shuffled_forever(self, examples: Sequence[Any], encoded: Sequence[dict[str, list[int]]],
                          batch_size: int, rng: random.Random
                          ) -> Iterator[dict[str, torch.Tensor]]:
        while True:  # epochs over the shuffled data, as many as the steps need
            order = list(range(len(examples)))
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                yield self._collate([encoded[i] for i in idx], [examples[i].label for i in idx])

    # ---------------------------------------------------------------- the seam

    def _body_forward(self, body: Body, step: int, hidden: torch.Tensor, mask: torch.Tensor,
                      train: bool, traffic: dict[str, int]) -> torch.Tensor:
        wire = hidden.detach().to(self.wire_dtype)
        wire_mask = mask.to(torch.bool)
        traffic["up"] += _nbytes(wire) + _nbytes(wire_mask)
        traffic["mask"] += _nbytes(wire_mask)
        out = body.forward(step, wire, wire_mask, train=train)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or (
            tuple(out.shape) != tuple(wire.shape)
        ):
            raise ValueError(
                f"the body answered step {step} with "
                f"{getattr(out, 'dtype', type(out).__name__)} "
                f"{tuple(getattr(out, 'shape', ()))}, expected floating {tuple(wire.shape)}"
            )
        traffic["down"] += _nbytes(out)
        traffic["calls"] += 1
        return out.detach().to(device=self.device, dtype=self._compute_dtype)

    def _body_backward(self, body: Body, step: int, grad: torch.Tensor, expected: torch.Size,
                       traffic: dict[str, int]) -> torch.Tensor:
        wire = grad.detach().to(self.wire_dtype)
        traffic["up"] += _nbytes(wire)
        back = body.backward(step, wire)
        if not isinstance(back, torch.Tensor) or not back.is_floating_point() or (
            tuple(back.shape) != tuple(expected)
        ):
            raise ValueError(
                f"the body's gradient for step {step} is "
                f"{getattr(back, 'dtype', type(back).__name__)} "
                f"{tuple(getattr(back, 'shape', ()))}, expected floating {tuple(expected)}"
            )
        traffic["down"] += _nbytes(back)
        traffic["calls"] += 1
        return back.detach().to(device=self.device, dtype=self._compute_dtype)

    def _split_loss_step(self, batch: dict[str, torch.Tensor], body: Body,
                         traffic: dict[str, int]) -> torch.Tensor:
        """One split step: head -> body -> tail, loss, and the gradients back to the prompts.
        Leaves gradients in the trainable tensors; returns the loss."""
        step = self._next_step
        self._next_step += 1
        mask = self.head.extend_mask(batch["attention_mask"])
        with _bf16_autocast(self.device):
            hidden = self.head(batch["input_ids"], batch["attention_mask"])
        received = self._body_forward(body, step, hidden, mask, True, traffic)
        received.requires_grad_(True)
        with _bf16_autocast(self.device):
            loss, _ = self.tail(received, mask, batch["labels"])
        loss.backward()
        grad = received.grad if received.grad is not None else torch.zeros_like(received)
        back = self._body_backward(body, step, grad, hidden.shape, traffic)
        if hidden.requires_grad:
            hidden.backward(back.to(hidden.dtype))
        return loss

    def _local_loss_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One local-loss step: the head's output straight into the tail, no server."""
        mask = self.head.extend_mask(batch["attention_mask"])
        with _bf16_autocast(self.device):
            hidden = self.head(batch["input_ids"], batch["attention_mask"])
            loss, _ = self.tail(hidden, mask, batch["labels"])
        loss.backward()
        return loss

    # ---------------------------------------------------------------- pruning

    @torch.no_grad()
    def el2n_scores(self, examples: Sequence[Any], *, batch_size: int = 16) -> list[float]:
        """EL2N of every example through the local path head -> tail (no server round trip:
        pruning costs no communication and reveals nothing to the server), in eval mode."""
        self._check(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = self._encode(examples)
        scores: list[float] = []
        with self._eval():
            for batch in self._in_order(examples, encoded, batch_size):
                mask = self.head.extend_mask(batch["attention_mask"])
                with _bf16_autocast(self.device):
                    hidden = self.head(batch["input_ids"], batch["attention_mask"])
                    _, logits = self.tail(hidden, mask)
                scores.extend(el2n(logits, batch["labels"], self.task, self.num_prompts).tolist())
        return scores

    def prune(self, examples: Sequence[Any], gamma: float, *, batch_size: int = 16,
              by_label: bool = True) -> list[Any]:
        """The top ceil(gamma * n) examples by EL2N (ties: lower index), in their original
        order. gamma = 1 returns every example without scoring.

        ``by_label`` (classification only): keep the top gamma of each label instead of the
        top gamma overall. Scored before any training, EL2N is dominated by the random head's
        bias towards some classes, and a global cut dropped whole classes in the benchmark
        (a MiniLM shard of 4 labels kept 2); per label the shard's label mix survives."""
        if not _is_number(gamma) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma is the fraction kept, in (0, 1], got {gamma!r}")
        if gamma >= 1.0:
            self._check(examples)
            return list(examples)
        scores = self.el2n_scores(examples, batch_size=batch_size)
        if not (by_label and self._classification):
            return [examples[i] for i in top_fraction(scores, gamma)]
        groups: dict[Any, list[int]] = {}
        for i, example in enumerate(examples):
            groups.setdefault(example.label, []).append(i)
        kept = [group[j] for group in groups.values()
                for j in top_fraction([scores[i] for i in group], gamma)]
        return [examples[i] for i in sorted(kept)]

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
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> dict[str, float]:
        """``steps`` split steps through ``body``, then ``local_loss_steps`` local-loss steps,
        with one fresh AdamW over the prompts (+ tail); batches cycle through the shuffled
        examples (seeded by ``seed``, as is dropout). Returns loss statistics and the bytes
        that crossed the seam (``activation_bytes_up`` includes ``mask_bytes_up``).
        ``progress(done, total, loss)`` after every step may raise to abort."""
        self._check(examples)
        if not _is_int(steps) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not _is_int(local_loss_steps) or local_loss_steps < 0:
            raise ValueError(f"local_loss_steps must be an integer >= 0, got {local_loss_steps!r}")
        if steps + local_loss_steps < 1:
            raise ValueError("nothing to do: steps and local_loss_steps are both 0")
        if steps > 0 and body is None:
            raise ValueError("split steps need a body (the server side); got None")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not _is_number(lr) or lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")

        encoded = self._encode(examples)
        batches = self._shuffled_forever(examples, encoded, batch_size, random.Random(seed))
        params = [self._params[name] for name in self._keys]
        optimizer = torch.optim.AdamW(params, lr=lr)
        total = steps + local_loss_steps
        split_losses: list[float] = []
        local_losses: list[float] = []
        traffic = {"up": 0, "down": 0, "mask": 0, "calls": 0}
        cuda_devices = []
        if self.device.type == "cuda":
            index = self.device.index
            cuda_devices = [torch.cuda.current_device() if index is None else index]
        self.head.train()
        self.tail.train()
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(seed)
                for done in range(1, total + 1):
                    batch = next(batches)
                    optimizer.zero_grad(set_to_none=True)
                    if done <= steps:
                        assert body is not None
                        loss = self._split_loss_step(batch, body, traffic)
                        split_losses.append(float(loss.detach()))
                    else:
                        loss = self._local_loss_step(batch)
                        local_losses.append(float(loss.detach()))
                    optimizer.step()
                    if progress is not None:
                        progress(done, total, float(loss.detach()))
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
        self._check(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded = self._encode(examples)
        loss_sum = 0.0
        count = 0
        correct = 0
        traffic = {"up": 0, "down": 0, "mask": 0, "calls": 0}
        with self._eval():
            for batch in self._in_order(examples, encoded, batch_size):
                mask = self.head.extend_mask(batch["attention_mask"])
                with _bf16_autocast(self.device):
                    hidden = self.head(batch["input_ids"], batch["attention_mask"])
                if body is not None:
                    step = self._next_step
                    self._next_step += 1
                    hidden = self._body_forward(body, step, hidden, mask, False, traffic)
                with _bf16_autocast(self.device):
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
