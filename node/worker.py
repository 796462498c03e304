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
from node.merging import fetch_neighbours
from node.methods import UpdateError, get_method, method_params
from node.methods.base import Method, MethodConfig
from node.methods.dimat import DIMATConfig, check_neighbour_state, dimat_merge
from node.methods.sfprompt import SFPROMPT_TRAINABLE, SFPromptConfig, SplitTrainer
from node.minion_worker import MinionCancelled, MinionWorker
from node.models import job_model_config
from node.split_model import build_split_trainer
from node.split_transport import RemoteBody
from node.store import ModelStore
from node.trainer import LoraTrainer
from protos.codec import tensor_map_from_bytes, tensor_map_to_bytes, to_dense
from protos.confide.v1 import coordinator_pb2 as pb
from protos.state import state_digest

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]


class TaskCancelled(Exception):
    """The coordinator cancelled the task, or the session ended."""


class NeedsFullState(Exception):
    """A compact broadcast cannot be applied here: the coordinator must send the whole
    global state (the message says why)."""


class TaskWorker:
    def __init__(self, data: LocalData, models: ModelStore, device: torch.device,
                 max_cached_models: int = 1, local_model: str = "smollm2") -> None:
        self.data = data
        #: Minions: the local model spec (agents.backends) and its worker, made on first use
        self.local_model = local_model
        self._minions: MinionWorker | None = None
        self.models = models
        self.device = device
        self.max_cached_models = max_cached_models
        self._trainers: OrderedDict[tuple, LoraTrainer | SplitTrainer] = OrderedDict()
        #: the seeded initial state of each cached trainer
        self._initial: dict[tuple, dict[str, torch.Tensor]] = {}
        #: SFPrompt: each job's examples that survived EL2N pruning (pruned once per job)
        self._pruned: dict[str, list] = {}
        # one task at a time: a task abandoned by a dropped session may still be finishing
        # its current step when the next session's task arrives
        self._lock = threading.Lock()

    def _key(self, spec: pb.JobSpec) -> tuple:
        method = get_method(spec.method)
        split = method.trainable == SFPROMPT_TRAINABLE
        return (spec.model.SerializeToString(deterministic=True),
                job_model_config(spec).adapter,
                repr(method.parse_config(method_params(spec))) if split else "")

    def _trainer(self, spec: pb.JobSpec) -> LoraTrainer | SplitTrainer:
        """Building a model is the expensive part: keep the last one(s) between rounds.

        The INIT task and every TRAIN task of a job go through here, so they build the same
        kind of trainer: LoRA or full-parameter (``LoraTrainer``), or the device's head and
        tail of a split model (``SplitTrainer``, SFPrompt), from the job's method. The seeded
        initial state is kept beside it: a cached trainer holds whatever the last job trained,
        and a new job must start from the seeded weights, as every other node does."""
        method = get_method(spec.method)
        cfg = job_model_config(spec)
        key = self._key(spec)
        trainer = self._trainers.pop(key, None)
        if trainer is None:
            cfg.validate()
            split = method.trainable == SFPROMPT_TRAINABLE
            log.info("building %s model %s on %s%s", cfg.task, cfg.base, self.device,
                     " (device side of a split)" if split else "")
            if split:
                config = method.parse_config(method_params(spec))
                assert isinstance(config, SFPromptConfig)
                trainer = build_split_trainer(cfg, config, self.device)
            else:
                trainer = LoraTrainer(cfg, self.device)
            self._initial[key] = trainer.trainable_state()
        self._trainers[key] = trainer
        while len(self._trainers) > self.max_cached_models:
            self._initial.pop(self._trainers.popitem(last=False)[0], None)
        return trainer

    def _seeded_state(self, spec: pb.JobSpec) -> dict[str, torch.Tensor]:
        """The seeded initial trainable state of the job's model (built if need be)."""
        self._trainer(spec)
        return self._initial[self._key(spec)]

    def _own_state(self, task: pb.Task) -> dict[str, torch.Tensor]:
        """A decentralized job's model at this node: after its last merge, or the seeded
        start before the first round."""
        own = self.models.load(task.job_id, "own")
        return own if own is not None else self._seeded_state(task.spec)

    def initial_state(self, task: pb.Task) -> bytes:
        """INIT: the seeded initial state, never a cached trainer's trained one."""
        with self._lock:
            state = self._seeded_state(task.spec)
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
        if method.decentralized:
            return self._train_own(task, progress, cancelled)
        global_state = self._received_global(task, method, config, global_payload)
        examples = self.data.load(spec.train.dataset)
        trainer = self._trainer(spec)
        trainer.load_trainable_state(global_state)
        self.models.save(task.job_id, "global", global_state, {"round": str(task.round)})

        def on_step(step: int, total: int, loss: float) -> None:
            if cancelled.is_set():
                raise TaskCancelled("task cancelled")
            progress(step, total, loss)

        if isinstance(trainer, SplitTrainer):
            assert isinstance(config, SFPromptConfig)
            examples, metrics = self._train_split(task, config, trainer, examples, on_step)
        else:
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
        stored = self.models.load(task.job_id, "memory")
        memory = dict(stored or {})
        update = method.client_update(config, global_state, local_state, memory)
        if memory or stored:  # also when the method emptied it: no stale state next round
            self.models.save(task.job_id, "memory", memory)
        return tensor_map_to_bytes(update), len(examples), metrics

    def _received_global(self, task: pb.Task, method: Method, config: MethodConfig,
                         payload: bytes) -> dict[str, torch.Tensor]:
        """The round's global state: sent whole, built here from the job's seed (the first
        round), or rebuilt from a compact broadcast on top of the state this node kept from
        the job's previous round; the last two checked against the coordinator's digest."""
        if task.global_from_seed:  # the first round: the seeded state every node can build
            state = dict(self._seeded_state(task.spec))
            if state_digest(state) != task.global_digest:
                raise NeedsFullState("this node's seeded initial state differs from the "
                                     "coordinator's (another torch or model version?)")
            return state
        received = tensor_map_from_bytes(payload)
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

    def _train_split(self, task: pb.Task, config: SFPromptConfig, trainer: SplitTrainer,
                     examples: list, on_step: ProgressFn) -> tuple[list, dict[str, float]]:
        """SFPrompt's local round: prune once per job (EL2N through the local path), then
        split steps through the job's split-server and local-loss steps on the device."""
        spec = task.spec
        kept = self._pruned.get(task.job_id)
        if kept is None:
            if len(self._pruned) >= 8:  # jobs long gone
                self._pruned.clear()
            kept = trainer.prune(examples, config.prune_gamma,
                                 batch_size=max(spec.train.batch_size, 1),
                                 by_label=config.prune_by_label)
            self._pruned[task.job_id] = kept
            log.info("pruning kept %d of %d examples (gamma %g, EL2N)", len(kept),
                     len(examples), config.prune_gamma)
        per_epoch = -(-len(kept) // spec.train.batch_size)
        steps = config.split_steps or (
            min(spec.train.max_steps, spec.train.local_epochs * per_epoch)
            if spec.train.max_steps else spec.train.local_epochs * per_epoch)
        servers = [p for p in task.peers if p.role == "split-server"]
        if not servers:
            raise ValueError("an SFPrompt task needs a split-server peer; the coordinator "
                             "sent none")
        seed = spec.seed * 100_003 + task.round
        server = servers[0]
        with RemoteBody(server.address, task.job_id, spec, task.round,
                        timeout_s=max(task.deadline_s, 30.0), server_id=server.node_id) as body:
            metrics = trainer.train_round(kept, body, steps=steps,
                                          batch_size=spec.train.batch_size,
                                          lr=spec.train.learning_rate,
                                          local_loss_steps=config.local_loss_steps,
                                          seed=seed, progress=on_step)
        # what crossed the device <-> split-server link, as counted on the wire
        metrics["split_bytes_up"] = body.bytes_up
        metrics["split_bytes_down"] = body.bytes_down
        metrics["pruned_examples"] = len(examples) - len(kept)
        return kept, metrics

    # ------------------------------------------------------------ decentralized (DIMAT)

    def _train_own(self, task: pb.Task, progress: ProgressFn,
                   cancelled: threading.Event) -> tuple[bytes, int, dict[str, float]]:
        """A decentralized round's training: from the node's own model, no global state; the
        result is kept as this round's "shared" model for the neighbours to fetch. Nothing
        goes to the coordinator but metrics."""
        spec = task.spec
        examples = self.data.load(spec.train.dataset)
        trainer = self._trainer(spec)
        assert isinstance(trainer, LoraTrainer)
        trainer.load_trainable_state(self._own_state(task))

        def on_step(step: int, total: int, loss: float) -> None:
            if cancelled.is_set():
                raise TaskCancelled("task cancelled")
            progress(step, total, loss)

        metrics = trainer.train(examples, epochs=spec.train.local_epochs,
                                max_steps=spec.train.max_steps,
                                batch_size=spec.train.batch_size,
                                learning_rate=spec.train.learning_rate,
                                seed=spec.seed * 100_003 + task.round, progress=on_step)
        self.models.save(task.job_id, "shared", trainer.trainable_state(),
                         {"round": str(task.round)})
        return b"", len(examples), metrics

    def merge(self, task: pb.Task, progress: ProgressFn,
              cancelled: threading.Event) -> tuple[bytes, int, dict[str, float]]:
        with self._lock:
            return self._merge(task)

    def _merge(self, task: pb.Task) -> tuple[bytes, int, dict[str, float]]:
        """DIMAT's merge: fetch the neighbours' models of this round peer to peer, align
        them to this node's model on its own examples and average with the mixing weights
        the coordinator published; keep the result as the node's own model."""
        spec = task.spec
        method = get_method(spec.method)
        config = method.parse_config(method_params(spec))
        assert isinstance(config, DIMATConfig)
        trainer = self._trainer(spec)
        assert isinstance(trainer, LoraTrainer)
        own = self.models.load(task.job_id, "shared")
        meta = self.models.metadata(task.job_id, "shared") or {}
        if own is None or meta.get("round") != str(task.round):
            raise ValueError(f"this node has no model trained in round {task.round} to merge")
        if config.merge == "none":  # local only: nothing to fetch, nothing crosses
            self.models.save(task.job_id, "own", own, {"round": str(task.round)})
            return b"", 0, {"neighbours": 0.0, "neighbours_merged": 0.0,
                            "peer_bytes_down": 0.0, "peer_bytes_up": 0.0}
        # half the task's deadline for the fetches: the alignment needs the rest
        fetched = fetch_neighbours(task, timeout_s=max(task.deadline_s / 2, 15.0))
        for node_id, state in list(fetched.states.items()):
            try:  # a neighbour whose model does not fit is skipped, like an unreachable one
                check_neighbour_state(own, state, node_id)
            except UpdateError as exc:
                fetched.failures[node_id] = f"unusable model: {exc}"
                del fetched.states[node_id]
                log.warning("merge of round %d skips neighbour %s: %s", task.round,
                            node_id[:12], exc)
        weights = {p.node_id: p.weight for p in task.peers if p.role == "neighbour"}
        examples = self.data.load(spec.train.dataset)[: config.match_examples]
        batch = trainer.batch(examples) if config.merge == "dimat" else None
        merged = dimat_merge(trainer.model, own, fetched.states, weights, batch, config.merge,
                             self_weight=task.self_weight, unreachable=config.unreachable)
        self.models.save(task.job_id, "own", merged, {"round": str(task.round)})
        return b"", 0, {
            "neighbours": float(len(weights)),
            "neighbours_merged": float(len(fetched.states)),
            "peer_bytes_down": float(fetched.bytes_down),
            "peer_bytes_up": float(fetched.bytes_up),
        }

    # ------------------------------------------------------------ agents (Minions)

    def minion(self, task: pb.Task, progress: ProgressFn,
               cancelled: threading.Event) -> tuple[bytes, int, dict[str, float]]:
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
