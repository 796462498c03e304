"""SFPrompt: split federated prompt tuning, with dataset pruning and local-loss updates.

Cao et al., "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for Large Pre-Trained
Models over Resource-Limited Devices" (2024), as this module runs it:

    Job parameters: head_layers, tail_layers, num_prompts, prune_gamma, prune_method,
    prune_warmup_steps, round_steps, local_loss_steps, local_loss_schedule, train_tail,
    train_lm_head, activation_dtype, body_lr.

    Parties. The model is cut in three (``node.split.model``): each device holds the head
    (embeddings, soft prompts p, the first ``head_layers`` layers) and the tail (the last
    ``tail_layers`` layers, final norm / pooler, output head); one server holds the body (the
    layers between). Labels never leave a device: the loss is computed in its tail.
    Trainable state w: the prompts and, with ``train_tail``, the tail (``trainable =
    "sfprompt"``), named "head.prompts" and "tail.<parameter>". The body is frozen unless
    ``body_lr`` > 0; it is the server's, never averaged.

    Device i (``SplitTrainer``), before training (once per job, in its first round):
        0. load w_{r-1}
        1. prune (``prune_gamma`` < 1):
           a. warm-up: ``prune_warmup_steps`` local-loss steps (step 3's update, no server)
              on D_i, so that the tail that scores is not the untrained one (EL2N is
              computed "early in training", Paul et al. 2021); the warm-up's weights are then
              thrown away: w_{r-1} is loaded again, the round's update starts from it
           b. s_j = EL2N(x_j, y_j) = || softmax(tail(head(x_j))) - onehot(y_j) ||_2 through
              the *local* path head -> tail, no server round trip (pruning costs no
              communication; the missing body shifts all the scores alike). Causal LM: the
              mean over predicted tokens of the per-token EL2N. ``prune_method = "random"``
              (the control): s_j uniform random, seeded by the task (job seed and round)
           c. keep D_i' = the top ceil(gamma * |D_i|) examples by s (ties: the lower index),
              the hard / informative ones, as in Paul et al. 2021 ("Deep Learning on a Data
              Diet"); for classification the top gamma of each label (``prune_by_label``,
              the default), so that the scores cannot drop whole classes.

    Device i, round r: T = ``round_steps`` steps (0: as the job's train spec says), of which
    L = ``local_loss_steps`` are local-loss steps that *replace* split steps (0 <= L <= T;
    the round's step count, and so the device's work, stays T whatever L is; only the T - L
    split steps cost bytes). The schedule (``local_loss_schedule``,
    ``local_step_schedule``) says which steps t in 1..T are local:
        "last":       t > T - L (the paper's phase order: split training, then the
                      local-loss update)
        "interleave": spread evenly, t local iff floor(t L / T) > floor((t - 1) L / T)
    for t = 1..T, on the next batch (x, y) of D_i' (shuffled, cycled):
        2. a split step (t not local):
               h   = head(x)                        (B, P+T, H): prompts ++ embeddings, layers
               send h (cast to activation_dtype) and the (B, P+T) mask    -> server
                   server: z = body(h, mask), keeps the autograd graph of step t
               receive z;  loss = tail(z, mask, y);  g_z = d loss / d z
               send g_z (activation_dtype)                                -> server
                   server: g_h = (d z / d h)^T g_z, frees the graph; with body_lr > 0 it also
                   steps its own optimizer on the body
               receive g_h;  back-propagate it through the head into p
               AdamW step on p (+ the tail)
        3. a local-loss step (t local: no server, no bytes):
               loss = tail(head(x), mask, y);  AdamW step on p (+ the tail)
        4. after step T: send delta_i = w_i - w_{r-1}, densely (prompts + tail: small)

    Coordinator (``aggregate``):
        5. w_r = w_{r-1} + sum_i n_i delta_i / sum_i n_i      (n_i: examples of device i)

Wire. Per split step: up B(P+T)H activations + B(P+T) mask bytes + B(P+T)H gradients, down
B(P+T)H outputs + B(P+T)H gradients, each activation element 4 / 2 / 2 bytes for float32 /
float16 / bfloat16 (``node.split.body.activation_bytes``). Per round: delta_i up, w_r down
(prompts: P x H floats; tail: its parameters). Local-loss steps and pruning cost no bytes.
float16 / bfloat16 on the wire round every activation and gradient the device sends and
receives; the device measures the relative error of what it sends (||cast(x) - x|| / ||x||
over the round: ``activation_wire_rel_error``, ``gradient_wire_rel_error`` in the round's
metrics, 0 for float32), and ``tests/unit/test_sfprompt.py`` measures the end-to-end error of
one step's prompt gradient against float32.

Where each part lives (this module is the method: its config and the aggregation):

    node/split/model.py      the cut: DeviceHead, ServerBody, DeviceTail, build_split, costs
    node/split/body.py       the seam: Body, and LocalBody (the server side, in process)
    node/split/pruning.py    EL2N scores and the top-gamma selection (step 1)
    node/split/trainer.py    SplitTrainer: the device's steps 0-3 through any Body
    node/split/transport.py  the seam over NodePeer.SplitSession: RemoteBody, SplitServer
    node/split/job.py        a TRAIN task on the device: prune once per job, then a round

Running it (what a worker and the server do):

    device:  trainer = node.split.trainer.build_split_trainer(model_cfg, cfg, device)
             trainer.load_trainable_state(w_prev)
             kept = trainer.prune(examples, cfg.prune_gamma, method=cfg.prune_method,
                                  warmup_steps=cfg.prune_warmup_steps)  # local, no bytes
             metrics = trainer.train_round(kept, body, steps=T, batch_size=..., lr=...,
                                           local_loss_steps=cfg.local_loss_steps,
                                           schedule=cfg.local_loss_schedule, seed=...)
             payload = SFPrompt().client_update(cfg, w_prev, trainer.trainable_state(), {})
    server:  parts = node.split.model.build_split(model_cfg, SplitConfig.from_method(cfg,
                 model_cfg.seed), role="server");  body = LocalBody(parts.body, lr=cfg.body_lr)
             serve body.forward / body.backward per (device, step) over a stream.

Precision: activations cross in ``activation_dtype``; the parts compute in their parameter
dtype (float32 here), under bf16 autocast on GPUs that have bf16, else in float32 (no fp16
autocast: its loss scaling would have to cross the seam).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from confide.node.methods.base import MethodConfig
from confide.node.methods.fedavg_lora import FedAvgLoRA

__all__ = [
    "ACTIVATION_DTYPES",
    "LOCAL_LOSS_SCHEDULES",
    "PRUNE_METHODS",
    "SFPROMPT_TRAINABLE",
    "SFPrompt",
    "SFPromptConfig",
    "local_step_schedule",
]

ACTIVATION_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""What may cross the seam: the wire dtype of activations and their gradients."""

SFPROMPT_TRAINABLE = "sfprompt"
"""``FederatedMethod.trainable`` of SFPrompt: prompts + tail of a split model."""

LOCAL_LOSS_SCHEDULES = ("last", "interleave")
"""Which of a round's steps are local-loss steps: the last L (the paper's phase order), or
spread evenly among the split steps."""

PRUNE_METHODS = ("el2n", "random")
"""How pruning scores examples: EL2N (the method), or uniformly at random (the control that
says whether EL2N's choice is worth anything)."""


def local_step_schedule(total: int, local: int, schedule: str = "last") -> list[bool]:
    """For steps 1..``total`` of a round, whether each is a local-loss step: exactly
    ``local`` of them are, the rest are split steps (the count never changes, only which)."""
    if not _is_int(total) or total < 0 or not _is_int(local) or not 0 <= local <= total:
        raise ValueError(f"need 0 <= local_loss_steps <= steps, got {local!r} of {total!r}")
    if schedule == "last":
        return [t > total - local for t in range(1, total + 1)]
    if schedule == "interleave":
        return [(t * local) // total > ((t - 1) * local) // total for t in range(1, total + 1)]
    raise ValueError(f"local_loss_schedule must be one of {', '.join(LOCAL_LOSS_SCHEDULES)}, "
                     f"got {schedule!r}")


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
    survives pruning), not of the whole shard. ``prune_method``: "el2n" (the method) or
    "random" (the control: the same fraction, chosen at random). ``prune_warmup_steps``:
    local-loss steps before scoring, undone after it (the tail that scores is not untrained).
    ``round_steps``: steps per round, split and local-loss together (0: as the job's train
    spec says). ``local_loss_steps``: how many of them are local-loss steps through
    head -> tail with no server (they replace split steps; at most ``round_steps``).
    ``local_loss_schedule``: which steps are local, "last" or "interleave"
    (``local_step_schedule``). ``train_tail``: the
    tail trains with the prompts. ``train_lm_head``: so does a causal LM's vocabulary projection
    (large; off by default). ``activation_dtype``: what crosses the wire ("float32",
    "float16", "bfloat16"). ``body_lr``: the server's learning rate for the body (0: frozen).

    Defences of the text against the split-server (``node.split.defences``; measured by
    ``confide bench split --attack``): ``activation_noise`` sigma >= 0, Gaussian noise on
    every hidden state sent, about sigma times the token's own norm, from the device's own
    secret seed (no formal guarantee); ``private_head_lora`` rank >= 0, a LoRA adapter on the
    head's layers that the device trains and never sends; ``nopeek_weight`` >= 0, the weight
    of the distance correlation between token embeddings and the hidden states sent, added to
    the device's loss (needs ``private_head_lora``: the frozen public head cannot learn it).
    None of them keeps the text from the split-server at an accuracy worth having (README,
    "Split learning"): a device joins an SFPrompt job only if its owner trusts the
    split-server (``confide node serve --trust-split-server NAME``).
    """

    head_layers: int = 1
    tail_layers: int = 1
    num_prompts: int = 8
    prune_gamma: float = 1.0
    prune_by_label: bool = True
    prune_method: str = "el2n"
    prune_warmup_steps: int = 0
    round_steps: int = 0
    local_loss_steps: int = 0
    local_loss_schedule: str = "last"
    train_tail: bool = True
    train_lm_head: bool = False
    activation_dtype: str = "float32"
    body_lr: float = 0.0
    activation_noise: float = 0.0
    private_head_lora: int = 0
    nopeek_weight: float = 0.0

    def validate(self) -> None:
        """Raise ValueError, saying what to change, for values that make no sense."""
        lows = {"head_layers": 1, "tail_layers": 0, "num_prompts": 0,
                "local_loss_steps": 0, "round_steps": 0, "prune_warmup_steps": 0,
                "private_head_lora": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                hint = (
                    " (the device must run at least one layer; even then the hidden states give "
                    "the text away: see the README's split-learning threat model)"
                    if name == "head_layers" else ""
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
        if self.round_steps and self.local_loss_steps > self.round_steps:
            raise ValueError(
                f"sfprompt: local_loss_steps ({self.local_loss_steps}) replace some of the "
                f"round's steps and cannot exceed round_steps ({self.round_steps})"
            )
        if self.local_loss_schedule not in LOCAL_LOSS_SCHEDULES:
            raise ValueError(
                f"sfprompt: local_loss_schedule must be one of "
                f"{', '.join(LOCAL_LOSS_SCHEDULES)}, got {self.local_loss_schedule!r}"
            )
        if self.prune_method not in PRUNE_METHODS:
            raise ValueError(
                f"sfprompt: prune_method must be one of {', '.join(PRUNE_METHODS)}, got "
                f"{self.prune_method!r}"
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
        for name in ("activation_noise", "nopeek_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"sfprompt: {name} must be a finite number >= 0 (0: off), "
                                 f"got {value!r}")
        if self.nopeek_weight > 0 and self.private_head_lora == 0:
            raise ValueError(
                "sfprompt: nopeek_weight needs private_head_lora >= 1 (the public head is "
                "frozen: only a device-private adapter can learn to hide the tokens)"
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
