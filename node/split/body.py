"""The seam of a split model: what the device's trainer calls (``Body``), and the server's
side of it run in process (``LocalBody``), which a split-server wraps behind a stream.

The seam is transport-agnostic: ``LocalBody`` receives detached tensors and keeps one graph per
step id until that step's backward. Step ids are unique per ``SplitTrainer`` (a running
counter), so a server keys its graphs by (device, step).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from confide.node.device import bf16_autocast
from confide.node.methods.sfprompt import ACTIVATION_DTYPES

log = logging.getLogger(__name__)

__all__ = ["Body", "LocalBody", "activation_bytes", "is_int", "is_number", "nbytes"]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


def nbytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor takes on the wire."""
    return tensor.numel() * tensor.element_size()


def activation_bytes(batch_size: int, positions: int, hidden_size: int,
                     activation_dtype: str = "float32") -> dict[str, int]:
    """Bytes one split training step moves: up (activations + bool mask + gradients) and down
    (outputs + gradients), for ``positions`` = prompts + tokens."""
    size = torch.empty((), dtype=ACTIVATION_DTYPES[activation_dtype]).element_size()
    tensor = batch_size * positions * hidden_size * size
    mask = batch_size * positions
    return {"up": 2 * tensor + mask, "down": 2 * tensor, "mask": mask}


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
        if not is_number(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0 (0 = frozen body), got {lr!r}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if not is_int(max_pending) or max_pending < 1:
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
        self.bytes_received += nbytes(hidden) + nbytes(attention_mask)
        x = hidden.detach().to(device=self._device, dtype=self._dtype)
        mask = attention_mask.detach().to(self._device)
        if not train:
            was = self.module.training
            self.module.eval()
            try:
                with torch.no_grad(), bf16_autocast(self._device):
                    out = self.module(x, mask)
            finally:
                self.module.train(was)
        else:
            if step in self._pending:
                raise ValueError(f"step {step} already has a forward waiting for its backward")
            self.module.train()
            x.requires_grad_(True)
            with torch.enable_grad(), bf16_autocast(self._device):
                out = self.module(x, mask)
            self._pending[step] = (x, out)
            while len(self._pending) > self.max_pending:
                dropped, _ = self._pending.popitem(last=False)
                log.warning("body: dropping the graph of step %d (no backward came)", dropped)
        reply = out.detach().to(device=hidden.device, dtype=hidden.dtype)
        self.bytes_sent += nbytes(reply)
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
        self.bytes_received += nbytes(grad_output)
        out.backward(grad_output.detach().to(device=out.device, dtype=out.dtype))
        grad = x.grad if x.grad is not None else torch.zeros_like(x)
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        reply = grad.detach().to(device=grad_output.device, dtype=grad_output.dtype)
        self.bytes_sent += nbytes(reply)
        return reply
