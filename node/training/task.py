"""What the worker needs of a trainer, whatever the method trains.

A trainer holds one job's model on this node. The worker loads each round's starting state
into it, asks it to run a TRAIN task on the node's examples, and reads the trained state back;
how the trainer trains (LoRA steps, split steps through a server) is its own business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from confide.node.data import Example
from confide.v1 import coordinator_pb2 as pb

__all__ = ["ProgressFn", "TaskTrainer", "round_seed"]

ProgressFn = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)`` after every step; it may raise to abort."""


class TaskTrainer(Protocol):
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """CPU float32 copies of the trainable tensors, sorted by name."""
        ...

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a state of the same names and shapes (ValueError otherwise)."""
        ...

    def train_task(self, task: pb.Task, examples: Sequence[Example], progress: ProgressFn,
                   scratch: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """Run ``task``'s local training from the loaded state; the number of examples it
        trained on and its metrics. ``scratch`` persists at this node between the tasks of
        one job (e.g. the examples kept by pruning) and never leaves it."""
        ...


def round_seed(task: pb.Task) -> int:
    """The seed of a task's data order and dropout: the job's seed and the round."""
    return task.spec.seed * 100_003 + task.round
