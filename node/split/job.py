"""An SFPrompt job on a device, as the worker runs its TRAIN tasks: pruning once per job
(EL2N after an optional warm-up, or the random control), then each round's steps: split steps
through the job's split-server (``RemoteBody``) with local-loss steps in place of some of
them, on the job's schedule."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from confide.node.data import Example
from confide.node.methods import MethodConfig
from confide.node.methods.sfprompt import SFPromptConfig
from confide.node.models import ModelConfig
from confide.node.split.trainer import SplitTrainer, build_split_trainer
from confide.node.split.transport import RemoteBody
from confide.node.training.task import ProgressFn, round_seed
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["SplitJobTrainer"]


class SplitJobTrainer:
    """A ``SplitTrainer`` and its job's SFPrompt config, behind the worker's ``TaskTrainer``."""

    def __init__(self, trainer: SplitTrainer, config: SFPromptConfig) -> None:
        self.trainer = trainer
        self.config = config
        self._job_id: str | None = None

    @classmethod
    def build(cls, model_cfg: ModelConfig, method_cfg: MethodConfig,
              device: torch.device) -> SplitJobTrainer:
        if not isinstance(method_cfg, SFPromptConfig):
            raise TypeError(f"a split trainer needs an SFPrompt config, got "
                            f"{type(method_cfg).__name__}")
        return cls(build_split_trainer(model_cfg, method_cfg, device), method_cfg)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.trainer.trainable_state()

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.trainer.load_trainable_state(state)

    def train_task(self, task: pb.Task, examples: Sequence[Example], progress: ProgressFn,
                   scratch: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """SFPrompt's local round: prune once per job (EL2N through the local path, kept in
        ``scratch``), then split steps through the job's split-server and local-loss steps on
        the device. Counts the examples that survived pruning."""
        spec, config = task.spec, self.config
        if task.job_id != self._job_id:  # the private head adapter belongs to one job
            self.trainer.reset_private_state()
            self._job_id = task.job_id
        kept = scratch.get("pruned")
        if kept is None:
            kept = self.trainer.prune(examples, config.prune_gamma,
                                      batch_size=max(spec.train.batch_size, 1),
                                      by_label=config.prune_by_label,
                                      method=config.prune_method,
                                      warmup_steps=config.prune_warmup_steps,
                                      lr=spec.train.learning_rate, seed=round_seed(task))
            scratch["pruned"] = kept
            log.info("pruning kept %d of %d examples (gamma %g, %s, %d warm-up steps)",
                     len(kept), len(examples), config.prune_gamma, config.prune_method,
                     config.prune_warmup_steps)
        per_epoch = -(-len(kept) // spec.train.batch_size)
        steps = config.round_steps or (
            min(spec.train.max_steps, spec.train.local_epochs * per_epoch)
            if spec.train.max_steps else spec.train.local_epochs * per_epoch)
        if config.local_loss_steps > steps:
            raise ValueError(
                f"sfprompt: local_loss_steps ({config.local_loss_steps}) replace some of the "
                f"round's {steps} steps and cannot exceed them; lower local_loss_steps or set "
                "round_steps"
            )
        servers = [p for p in task.peers if p.role == "split-server"]
        if not servers:
            raise ValueError("an SFPrompt task needs a split-server peer; the coordinator "
                             "sent none")
        server = servers[0]
        with RemoteBody(server.address, task.job_id, spec, task.round,
                        timeout_s=max(task.deadline_s, 30.0), server_id=server.node_id) as body:
            metrics = self.trainer.train_round(kept, body, steps=steps,
                                               batch_size=spec.train.batch_size,
                                               lr=spec.train.learning_rate,
                                               local_loss_steps=config.local_loss_steps,
                                               schedule=config.local_loss_schedule,
                                               seed=round_seed(task), progress=progress)
        # what crossed the device <-> split-server link, as counted on the wire
        metrics["split_bytes_up"] = body.bytes_up
        metrics["split_bytes_down"] = body.bytes_down
        metrics["pruned_examples"] = len(examples) - len(kept)
        return len(kept), metrics
