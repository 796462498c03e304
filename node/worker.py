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
from collections.abc import Mapping
from typing import Any, TypeAlias

import torch

from confide.node.data import LocalData
from confide.node.merging.merge import merge_round
from confide.node.methods import UpdateError, get_method, method_params
from confide.node.methods.base import Method, MethodConfig
from confide.node.methods.dp_lora import ExamplePlan
from confide.node.minion_worker import MinionCancelled, MinionWorker
from confide.node.models import job_model_config
from confide.node.privacy_guard import PrivacyGuard
from confide.node.store import ModelStore
from confide.node.training.registry import trainer_kind
from confide.node.training.task import ProgressFn, TaskTrainer
from confide.protos.chunking import DEFAULT_MAX_PAYLOAD
from confide.protos.codec import WireTensor, to_dense
from confide.protos.state import state_digest
from confide.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

TaskAnswer: TypeAlias = tuple[dict[str, WireTensor] | bytes, int, dict[str, float]]
"""What a task gives the session to send: the update (a tensor map it streams, or raw bytes
for a Minions reply), the example count and the metrics."""


class TaskCancelled(Exception):
    """The coordinator cancelled the task, or the session ended."""


class NeedsFullState(Exception):
    """A compact broadcast cannot be applied here: the coordinator must send the whole
    global state (the message says why)."""


class TaskWorker:
    def __init__(self, data: LocalData, models: ModelStore, device: torch.device,
                 max_cached_models: int = 1, local_model: str = "smollm2",
                 guard: PrivacyGuard | None = None,
                 payload_cap: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.data = data
        #: the node policy's cap on what a transfer may bring (caps.payload_bytes): DIMAT's
        #: peer fetches are refused at the stream's header above it
        self.payload_cap = payload_cap
        #: the owner's privacy budget (None: nothing enforced nor recorded; tests only)
        self.guard = guard
        #: Minions: the local model spec (agents.backends) and its worker, made on first use
        self.local_model = local_model
        self._minions: MinionWorker | None = None
        self.models = models
        self.device = device
        self.max_cached_models = max_cached_models
        self._trainers: OrderedDict[tuple, TaskTrainer] = OrderedDict()
        #: the seeded initial state of each cached trainer
        self._initial: dict[tuple, dict[str, torch.Tensor]] = {}
        #: what a job's trainer keeps at this node between its tasks (e.g. SFPrompt's pruned
        #: examples), for the jobs that keep something
        self._scratch: dict[str, dict[str, Any]] = {}
        # one task at a time: a task abandoned by a dropped session may still be finishing
        # its current step when the next session's task arrives
        self._lock = threading.Lock()

    def _key(self, spec: pb.JobSpec) -> tuple:
        method = get_method(spec.method)
        shaped = trainer_kind(method.trainable).shaped_by_method
        return (spec.model.SerializeToString(deterministic=True),
                job_model_config(spec).adapter,
                repr(method.parse_config(method_params(spec))) if shaped else "")

    def _trainer(self, spec: pb.JobSpec) -> TaskTrainer:
        """Building a model is the expensive part: keep the last one(s) between rounds.

        The INIT task and every TRAIN task of a job go through here, so they build the same
        kind of trainer, the one the trainer table names for the method's ``trainable``. The
        seeded initial state is kept beside it: a cached trainer holds whatever the last job
        trained, and a new job must start from the seeded weights, as every other node does."""
        method = get_method(spec.method)
        cfg = job_model_config(spec)
        key = self._key(spec)
        trainer = self._trainers.pop(key, None)
        if trainer is None:
            cfg.validate()
            kind = trainer_kind(method.trainable)
            log.info("building %s model %s on %s%s", cfg.task, cfg.base, self.device, kind.label)
            trainer = kind.build(cfg, method.parse_config(method_params(spec)), self.device)
            self._initial[key] = trainer.trainable_state()
        self._trainers[key] = trainer
        while len(self._trainers) > self.max_cached_models:
            self._initial.pop(self._trainers.popitem(last=False)[0], None)
        return trainer

    def _train_task(self, task: pb.Task, trainer: TaskTrainer, examples: list,
                    progress: ProgressFn,
                    cancelled: threading.Event) -> tuple[int, dict[str, float]]:
        """The trainer runs the task; a cancelled task stops at its next step."""

        def on_step(step: int, total: int, loss: float) -> None:
            if cancelled.is_set():
                raise TaskCancelled("task cancelled")
            progress(step, total, loss)

        scratch = self._scratch.get(task.job_id, {})
        try:
            return trainer.train_task(task, examples, on_step, scratch)
        finally:
            if scratch and task.job_id not in self._scratch:
                if len(self._scratch) >= 8:  # jobs long gone
                    self._scratch.clear()
                self._scratch[task.job_id] = scratch

    def _seeded_state(self, spec: pb.JobSpec) -> dict[str, torch.Tensor]:
        """The seeded initial trainable state of the job's model (built if need be)."""
        self._trainer(spec)
        return self._initial[self._key(spec)]

    def _own_state(self, task: pb.Task) -> dict[str, torch.Tensor]:
        """A decentralized job's model at this node: after its last merge, or the seeded
        start before the first round."""
        own = self.models.load(task.job_id, "own")
        return own if own is not None else self._seeded_state(task.spec)

    def initial_state(self, task: pb.Task) -> dict[str, torch.Tensor]:
        """INIT: the seeded initial state, never a cached trainer's trained one (a copy of
        the map: the session streams it while the cache may change)."""
        with self._lock:
            return dict(self._seeded_state(task.spec))

    def train(self, task: pb.Task, global_payload: Mapping[str, WireTensor],
              progress: ProgressFn, cancelled: threading.Event) -> TaskAnswer:
        with self._lock:
            return self._train(task, global_payload, progress, cancelled)

    def _train(self, task: pb.Task, global_payload: Mapping[str, WireTensor],
               progress: ProgressFn, cancelled: threading.Event) -> TaskAnswer:
        spec = task.spec
        method = get_method(spec.method)
        config = method.parse_config(method_params(spec))
        if method.decentralized:
            return self._train_own(task, progress, cancelled)
        global_state = self._received_global(task, method, config, global_payload)
        examples = self.data.load(spec.train.dataset)
        plan = self._admit(task, method, config, len(examples))
        global_state = self._received_global(task, method, config, global_payload)
        trainer = self._trainer(spec)
        trainer.load_trainable_state(global_state)
        self.models.save(task.job_id, "global", global_state, {"round": str(task.round)})

        if plan is None:
            num_examples, metrics = self._train_task(task, trainer, examples, progress,
                                                     cancelled)
        else:
            num_examples, metrics = self._train_private(task, trainer, examples, plan,
                                                        progress, cancelled)
        local_state = trainer.trainable_state()
        self.models.save(task.job_id, "local", local_state, {"round": str(task.round)})
        stored = self.models.load(task.job_id, "memory")
        memory = dict(stored or {})
        update = method.client_update(config, global_state, local_state, memory)
        if memory or stored:  # also when the method emptied it: no stale state next round
            self.models.save(task.job_id, "memory", memory)
        return dict(update), num_examples, metrics

    def _admit(self, task: pb.Task, method: Method, config: MethodConfig,
               n_examples: int) -> ExamplePlan | None:
        """The owner's say before any data is touched: ``PrivacyGuard.admit`` refuses the task
        (``TaskRefused``) or charges it; the DP-SGD plan, if the task is example-level DP."""
        if self.guard is not None:
            return self.guard.admit(task, method, config, n_examples)
        if getattr(config, "unit", "") == "example":  # no ledger (tests): plan, no charge
            return method.example_plan(config, n_examples)  # type: ignore[attr-defined]
        return None

    def _train_private(self, task: pb.Task, trainer: TaskTrainer, examples: list,
                       plan: ExamplePlan, progress: ProgressFn,
                       cancelled: threading.Event) -> tuple[int, dict[str, float]]:
        """Example-level DP-SGD for this round: ``plan.local_steps`` Poisson-sampled, clipped,
        noised steps; the metrics carry this node's epsilon so far, sigma and q."""
        train_private = getattr(trainer, "train_private", None)
        if train_private is None:
            raise ValueError("this method's trainer has no example-level DP-SGD path")

        def on_step(step: int, total: int, loss: float) -> None:
            if cancelled.is_set():
                raise TaskCancelled("task cancelled")
            progress(step, total, loss)

        metrics = train_private(
            examples, steps=plan.local_steps, sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier, clip_norm=plan.clip_norm,
            learning_rate=task.spec.train.learning_rate, train_only=plan.train_only,
            progress=on_step)
        metrics.update(noise_multiplier=plan.noise_multiplier, sampling_rate=plan.sample_rate)
        if plan.event is not None:  # the no-noise control spends no finite epsilon
            metrics["epsilon"] = plan.epsilon_after(task.round)
        if self.guard is not None:
            metrics["epsilon_node_budget_spent"] = self.guard.ledger.spent(
                task.spec.train.dataset)
        return len(examples), metrics

    def _received_global(self, task: pb.Task, method: Method, config: MethodConfig,
                         payload: Mapping[str, WireTensor]) -> dict[str, torch.Tensor]:
        """The round's global state: sent whole, built here from the job's seed (the first
        round), or rebuilt from a compact broadcast on top of the state this node kept from
        the job's previous round; the last two checked against the coordinator's digest."""
        if task.global_from_seed:  # the first round: the seeded state every node can build
            state = dict(self._seeded_state(task.spec))
            if state_digest(state) != task.global_digest:
                raise NeedsFullState("this node's seeded initial state differs from the "
                                     "coordinator's (another torch or model version?)")
            return state
        received = dict(payload)  # its stream's digest was checked on arrival
        if not task.global_base_digest:
            return {k: to_dense(v) for k, v in received.items()}
        base = self.models.load(task.job_id, "global")
        if base is None:
            raise NeedsFullState("this node keeps no global state of the job")
        if state_digest(base) != task.global_base_digest:
            raise NeedsFullState("the global state this node keeps is not the broadcast's base")
        try:
            state = method.apply_compact(config, base, received)
        except UpdateError as exc:
            raise NeedsFullState(f"the compact broadcast does not apply: {exc}") from exc
        if state_digest(state) != task.global_digest:
            raise NeedsFullState("the rebuilt global state differs from the coordinator's")
        return state

    # ------------------------------------------------------------ decentralized (DIMAT)

    def _train_own(self, task: pb.Task, progress: ProgressFn,
                   cancelled: threading.Event) -> TaskAnswer:
        """A decentralized round's training: from the node's own model, no global state; the
        result is kept as this round's "shared" model for the neighbours to fetch. Nothing
        goes to the coordinator but metrics."""
        spec = task.spec
        examples = self.data.load(spec.train.dataset)
        method = get_method(spec.method)
        self._admit(task, method, method.parse_config(method_params(spec)), len(examples))
        trainer = self._trainer(spec)
        trainer.load_trainable_state(self._own_state(task))
        num_examples, metrics = self._train_task(task, trainer, examples, progress, cancelled)
        self.models.save(task.job_id, "shared", trainer.trainable_state(),
                         {"round": str(task.round)})
        return {}, num_examples, metrics

    def merge(self, task: pb.Task, progress: ProgressFn,
              cancelled: threading.Event) -> TaskAnswer:
        with self._lock:
            return self._merge(task)

    def _merge(self, task: pb.Task) -> TaskAnswer:
        """A decentralized round's merge (``node.merging.merge.merge_round``): this node's
        model of the round with its neighbours' ones; the result is the node's own model."""
        spec = task.spec
        method = get_method(spec.method)
        config = method.parse_config(method_params(spec))
        trainer = self._trainer(spec)
        own = self.models.load(task.job_id, "shared")
        meta = self.models.metadata(task.job_id, "shared") or {}
        if own is None or meta.get("round") != str(task.round):
            raise ValueError(f"this node has no model trained in round {task.round} to merge")
        merged, metrics = merge_round(task, config, trainer, own,
                                      lambda: self.data.load(spec.train.dataset),
                                      max_bytes=self.payload_cap)
        self.models.save(task.job_id, "own", merged, {"round": str(task.round)})
        return {}, 0, metrics

    # ------------------------------------------------------------ agents (Minions)

    def minion(self, task: pb.Task, progress: ProgressFn,
               cancelled: threading.Event) -> TaskAnswer:
        """A MINION task: the jobs in ``task.instructions`` run by the local model on this
        node's documents (``node/minion_worker.py``); the reply is the update payload."""
        with self._lock:
            if self._minions is None:
                self._minions = MinionWorker(self.data.root, self.local_model,
                                             device=str(self.device))
            try:
                payload, metrics = self._minions.handle(task.instructions, cancelled)
            except MinionCancelled as exc:
                raise TaskCancelled(str(exc)) from None
        return payload, 0, metrics
