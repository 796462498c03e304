"""The node's task worker: every job starts from the seeded model, whatever ran before."""

from __future__ import annotations

import threading

import pytest
import torch

from coordinator.jobs import normalize_spec
from node.data import LocalData, synthetic_classification, write_jsonl
from node.store import ModelStore
from node.worker import TaskWorker
from protos.codec import tensor_map_from_bytes, to_dense
from protos.confide.v1 import coordinator_pb2 as pb
from protos.sdk import job_spec


def _state(payload: bytes) -> dict[str, torch.Tensor]:
    return {k: to_dense(v) for k, v in tensor_map_from_bytes(payload).items()}


@pytest.mark.parametrize("method", ["fedavg-lora", "fedavg-full"])
def test_a_new_job_starts_from_the_seeded_state_not_the_last_jobs_training(tmp_path, method):
    write_jsonl(tmp_path / "data" / "train.jsonl", synthetic_classification(32, 2, seed=1))
    worker = TaskWorker(LocalData(tmp_path / "data"), ModelStore(tmp_path / "models"),
                        torch.device("cpu"))
    spec = normalize_spec(job_spec(method, base="tiny-bert", num_labels=2, max_length=16,
                                   max_steps=4, batch_size=8, learning_rate=5e-2))
    first = worker.initial_state(pb.Task(task_id="a", job_id="job1", kind=pb.INIT, spec=spec))
    task = pb.Task(task_id="b", job_id="job1", round=1, kind=pb.TRAIN, spec=spec,
                   has_global=True)
    worker.train(task, first, lambda *_: None, threading.Event())  # the cached model moves
    second = worker.initial_state(pb.Task(task_id="c", job_id="job2", kind=pb.INIT, spec=spec))
    before, after = _state(first), _state(second)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
