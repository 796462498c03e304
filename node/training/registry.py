"""Which trainer a job needs, keyed by what its method trains (``Method.trainable``).

Adding a kind of training is one line here plus its trainer; the worker never looks at the
method's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from confide.node.methods import MethodConfig
from confide.node.models import ModelConfig
from confide.node.split.job import SplitJobTrainer
from confide.node.training.lora import LoraTrainer
from confide.node.training.task import TaskTrainer

__all__ = ["TRAINERS", "TrainerKind", "trainer_kind"]

TrainerFactory = Callable[[ModelConfig, MethodConfig, torch.device], TaskTrainer]


@dataclass(frozen=True)
class TrainerKind:
    """How to build a trainer for a job's model config and method config, on a device."""

    build: TrainerFactory
    #: the method's parameters shape the model (SFPrompt's cut and prompts), not only the
    #: job's model spec: a built trainer is reused only for the same parameters
    shaped_by_method: bool = False
    #: named in the log line when one is built
    label: str = ""


def _lora(model_cfg: ModelConfig, method_cfg: MethodConfig, device: torch.device) -> LoraTrainer:
    return LoraTrainer(model_cfg, device)


TRAINERS: dict[str, TrainerKind] = {
    "lora": TrainerKind(_lora),  # LoRA adapters + task head
    "full": TrainerKind(_lora),  # every parameter (ModelConfig.adapter "none")
    "sfprompt": TrainerKind(SplitJobTrainer.build, shaped_by_method=True,
                            label=" (device side of a split)"),
}


def trainer_kind(trainable: str) -> TrainerKind:
    """The entry for a method's ``trainable``; ValueError naming the known ones."""
    try:
        return TRAINERS[trainable]
    except KeyError:
        raise ValueError(f"no trainer for trainable {trainable!r}; known: "
                         f"{', '.join(TRAINERS)}") from None
