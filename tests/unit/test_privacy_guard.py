"""The node's side of example-level DP-LoRA: its plan (q from its own N, sigma calibrated for
it), the guard that charges or refuses (node/privacy_guard.py) and the DP-SGD training path
(LoraTrainer.train_private)."""

from __future__ import annotations

import pytest
import torch

from confide.node.data import Example
from confide.node.methods import get_method
from confide.node.models import ModelConfig
from confide.node.privacy_guard import LEDGER_FILE, PrivacyGuard, PrivacySettings, TaskRefused
from confide.node.training.lora import LoraTrainer
from confide.privacy.dp import RdpAccountant
from confide.sdk.client import job_spec
from confide.v1 import coordinator_pb2 as pb

PARAMS = {"target_epsilon": 2.0, "rounds": 2, "local_steps": 3, "expected_batch_size": 10}


def _task(job: str, round_number: int = 1, method: str = "dp-lora", params=None) -> pb.Task:
    spec = job_spec(method, params=PARAMS if params is None else params)
    return pb.Task(task_id=f"{job}-{round_number}", job_id=job, round=round_number, spec=spec,
                   kind=pb.TRAIN)


def _admit(guard: PrivacyGuard, task: pb.Task, n: int = 40):
    method = get_method(task.spec.method)
    config = method.parse_config(dict(PARAMS) if task.spec.method == "dp-lora" else {})
    return guard.admit(task, method, config, n)


def test_each_node_calibrates_sigma_for_its_own_sampling_rate():
    method = get_method("dp-lora")
    config = method.parse_config(PARAMS)
    small, large = method.example_plan(config, 20), method.example_plan(config, 200)
    assert small.sample_rate == 0.5 and large.sample_rate == 0.05
    accountant = RdpAccountant()
    for plan in (small, large):
        assert plan.event.steps == 6
        assert accountant.epsilon(plan.noise_multiplier, plan.sample_rate, 6, 1e-5) <= 2.0 + 1e-6
        assert plan.epsilon_after(2) == pytest.approx(
            accountant.epsilon(plan.noise_multiplier, plan.sample_rate, 6, 1e-5))
    assert small.noise_multiplier > large.noise_multiplier  # more sampling, more noise


def test_the_guard_charges_a_job_once_and_refuses_the_one_that_would_cross(tmp_path):
    guard = PrivacyGuard.open(tmp_path, PrivacySettings(budget=2.5), ["train"])
    plan = _admit(guard, _task("a", 1))
    assert plan is not None and len(guard.ledger.datasets["train"].charges) == 1
    _admit(guard, _task("a", 2))  # the job's next round: already charged
    assert len(guard.ledger.datasets["train"].charges) == 1
    with pytest.raises(TaskRefused, match="privacy budget of dataset 'train' exceeded"):
        _admit(guard, _task("b", 1))
    with pytest.raises(TaskRefused, match="beyond the 2 rounds"):
        _admit(guard, _task("a", 3))
    # a fresh guard on the same folder (a restarted node) still refuses
    again = PrivacyGuard.open(tmp_path, PrivacySettings(budget=2.5), ["train"])
    with pytest.raises(TaskRefused):
        _admit(again, _task("b", 1))
    assert (tmp_path / LEDGER_FILE).stat().st_mode & 0o777 == 0o600
    [row] = again.report()
    assert row.dataset == "train" and row.charges == 1 and 0 < row.epsilon_spent <= 2.0 + 1e-6


def test_a_private_dataset_refuses_non_private_tasks(tmp_path):
    guard = PrivacyGuard.open(tmp_path, PrivacySettings(private_datasets=["train"]), ["train"])
    with pytest.raises(TaskRefused, match="is private"):
        _admit(guard, _task("f", method="fedavg-lora", params={}))
    assert _admit(guard, _task("d")) is not None  # example-level DP is allowed


def _examples(n: int = 24) -> list[Example]:
    return [Example(text=("good fine " if i % 2 else "bad poor ") * 3 + str(i), label=i % 2)
            for i in range(n)]


@pytest.mark.parametrize(("train_only", "moved", "kept"), [
    ("lora-b", "lora_B", "lora_A"), ("head", "classifier", "lora_")])
def test_train_only_moves_only_what_it_names(train_only, moved, kept):
    trainer = LoraTrainer(ModelConfig(base="tiny-bert", num_labels=2, max_length=16))
    before = trainer.trainable_state()
    trainer.load_trainable_state({k: v + 0.01 for k, v in before.items()})  # B != 0
    start = trainer.trainable_state()
    metrics = trainer.train_private(_examples(), steps=2, sample_rate=0.5, noise_multiplier=1.0,
                                    clip_norm=1.0, learning_rate=1e-2, train_only=train_only,
                                    generator=torch.Generator().manual_seed(0))
    after = trainer.trainable_state()
    assert metrics["steps"] == 2
    assert any(not torch.equal(start[k], after[k]) for k in start if moved in k)
    assert all(torch.equal(start[k], after[k]) for k in start if kept in k)
    # hooks removed, everything trainable again: a plain step still works
    assert all(p.requires_grad for n, p in trainer.model.named_parameters()
               if "lora_" in n or "classifier.modules_to_save" in n)
    assert not hasattr(trainer.model, "_forward_counter")


def test_example_level_sends_the_plain_delta_and_checks_its_parameters():
    method = get_method("dp-lora")
    config = method.parse_config(PARAMS)
    global_state = {"w": torch.zeros(4)}
    local_state = {"w": torch.full((4,), 3.0)}  # norm 6, far above C = 1: not clipped here
    update = method.client_update(config, global_state, local_state, {})
    assert torch.equal(update["w"], local_state["w"])
    for bad, message in [({**PARAMS, "rounds": 0}, "rounds"),
                         ({**PARAMS, "train_only": "lora-a"}, "train_only"),
                         ({**PARAMS, "no_noise": True}, "no_noise"),
                         ({**PARAMS, "noise_multiplier": 1.0}, "not both"),
                         ({"rounds": 2}, "noise level is required"),
                         ({**PARAMS, "unit": "person"}, "unit")]:
        with pytest.raises(ValueError, match=message):
            method.parse_config(bad)
    assert method.before_round(config, 3, 3, 3) is not None  # past the charged rounds


def test_the_rounds_epsilon_is_the_largest_nodes():
    from confide.coordinator.job import weighted_metrics
    from confide.coordinator.sessions import TaskOutcome

    outcomes = [TaskOutcome("a", "t1", True, num_examples=100, metrics={"epsilon": 2.0,
                                                                        "loss_last": 1.0}),
                TaskOutcome("b", "t2", True, num_examples=300, metrics={"epsilon": 5.0,
                                                                        "loss_last": 3.0})]
    metrics = weighted_metrics(outcomes)
    assert metrics["epsilon"] == 5.0 and metrics["loss_last"] == 2.5
