"""Runs the coordinator's tasks on this node: build the model, apply the global state,
train on the local shard, and turn the result into the method's wire update.

Runs in a worker thread (training is blocking torch work) while the session keeps
heart-beating. The local data never leaves this module's process: only the method's update
(a tensor map) and a few scalar metrics are returned.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from node.data import LocalData
from node.methods import get_method, method_params
from node.models import ModelConfig, adapter_for
from node.store import ModelStore
from node.trainer import LoraTrainer
from protos.codec import tensor_map_from_bytes, tensor_map_to_bytes, to_dense
from protos.confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]


class TaskCancelled(Exception):
    """The coordinator cancelled the task, or the session ended."""


def model_config(spec: pb.ModelSpec, adapter: str = "lora") -> ModelConfig:
    """The ModelConfig of a job's model spec; ``adapter`` from the job's method (see
    ``job_model_config``)."""
    return ModelConfig(
        task=spec.task,
        base=spec.base,
        num_labels=spec.num_labels if spec.task == "sequence-classification" else 2,
        max_length=spec.max_length,
        lora_r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=tuple(spec.lora.target_modules),
        seed=spec.seed,
        adapter=adapter,
    )


def job_model_config(spec: pb.JobSpec) -> ModelConfig:
    """What a job trains: its model spec, with the adapter its method's ``trainable`` needs
    (LoRA adapters, or every parameter for full-parameter methods such as Ferret)."""
    return model_config(spec.model, adapter=adapter_for(get_method(spec.method).trainable))


class TaskWorker:
    def __init__(self, data: LocalData, models: ModelStore, device: torch.device,
                 max_cached_models: int = 1) -> None:
        self.data = data
        self.models = models
        self.device = device
        self.max_cached_models = max_cached_models
        self._trainers: OrderedDict[tuple, LoraTrainer] = OrderedDict()
        # one task at a time: a task abandoned by a dropped session may still be finishing
        # its current step when the next session's task arrives
        self._lock = threading.Lock()

    def _trainer(self, spec: pb.JobSpec) -> LoraTrainer:
        """Building a model is the expensive part: keep the last one(s) between rounds.

        The INIT task and every TRAIN task of a job go through here, so they build the same
        kind of trainer (LoRA or full-parameter, from the job's method)."""
        cfg = job_model_config(spec)
        key = (spec.model.SerializeToString(deterministic=True), cfg.adapter)
        trainer = self._trainers.pop(key, None)
        if trainer is None:
            cfg.validate()
            log.info("building %s model %s on %s", cfg.task, cfg.base, self.device)
            trainer = LoraTrainer(cfg, self.device)
        self._trainers[key] = trainer
        while len(self._trainers) > self.max_cached_models:
            self._trainers.popitem(last=False)
        return trainer

    def initial_state(self, task: pb.Task) -> bytes:
        with self._lock:
            state = self._trainer(task.spec).trainable_state()
        return tensor_map_to_bytes(state)

    def train(self, task: pb.Task, global_payload: bytes, progress: ProgressFn,
              cancelled: threading.Event) -> tuple[bytes, int, dict[str, float]]:
        with self._lock:
            return self._train(task, global_payload, progress, cancelled)

    def _train(self, task: pb.Task, global_payload: bytes, progress: ProgressFn,
               cancelled: threading.Event) -> tuple[bytes, int, dict[str, float]]:
        spec = task.spec
        method = get_method(spec.method)
        config = method.parse_config(method_params(spec))
        global_state = {k: to_dense(v) for k, v in tensor_map_from_bytes(global_payload).items()}
        examples = self.data.load(spec.train.dataset)
        trainer = self._trainer(spec)
        trainer.load_trainable_state(global_state)
        self.models.save(task.job_id, "global", global_state, {"round": str(task.round)})

        def on_step(step: int, total: int, loss: float) -> None:
            if cancelled.is_set():
                raise TaskCancelled("task cancelled")
            progress(step, total, loss)

        metrics = trainer.train(
            examples,
            epochs=spec.train.local_epochs,
            max_steps=spec.train.max_steps,
            batch_size=spec.train.batch_size,
            learning_rate=spec.train.learning_rate,
            seed=spec.seed * 100_003 + task.round,
            progress=on_step,
        )
        local_state = trainer.trainable_state()
        self.models.save(task.job_id, "local", local_state, {"round": str(task.round)})
        memory = self.models.load(task.job_id, "memory") or {}
        update = method.client_update(config, global_state, local_state, memory)
        if memory:
            self.models.save(task.job_id, "memory", memory)
        return tensor_map_to_bytes(update), len(examples), metrics
