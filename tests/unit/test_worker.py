"""The node's task worker: every job starts from the seeded model, whatever ran before."""

from __future__ import annotations

import threading

import pytest
import torch

from confide.coordinator.jobs import normalize_spec
from confide.node.data import LocalData, synthetic_classification, write_jsonl
from confide.node.store import ModelStore
from confide.node.worker import TaskWorker
from confide.protos.codec import to_dense
from confide.sdk.client import job_spec
from confide.v1 import coordinator_pb2 as pb


def _state(payload: bytes) -> dict[str, torch.Tensor]:
    return {k: to_dense(v) for k, v in payload.items()}


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


def test_a_compact_broadcast_needs_the_kept_base_state_and_the_right_result(tmp_path):
    """Ferret's downlink: the node rebuilds the round's state from the state it kept and the
    mean scalars, or asks for the whole state (no kept state, another base, wrong result)."""
    from confide.node.methods import ClientUpdate, get_method
    from confide.node.worker import NeedsFullState
    from confide.protos.state import state_digest

    write_jsonl(tmp_path / "data" / "train.jsonl", synthetic_classification(16, 2, seed=1))
    models = ModelStore(tmp_path / "models")
    worker = TaskWorker(LocalData(tmp_path / "data"), models, torch.device("cpu"))
    spec = normalize_spec(job_spec("ferret", base="tiny-bert", num_labels=2, max_length=16,
                                   max_steps=1, batch_size=8, learning_rate=1e-2,
                                   params={"k": 4}))
    ferret = get_method("ferret")
    config = ferret.parse_config({"k": 4})
    start = _state(worker.initial_state(pb.Task(task_id="i", job_id="job1", kind=pb.INIT,
                                                spec=spec)))
    moved = {k: v + 0.01 for k, v in start.items()}
    update = ferret.client_update(config, start, moved, {})
    after, compact = ferret.aggregate_compact(config, start, [ClientUpdate("n", update, 4)], 1)
    payload = dict(compact)

    def task(base: bytes, digest: bytes) -> pb.Task:
        return pb.Task(task_id="t", job_id="job1", round=2, kind=pb.TRAIN, spec=spec,
                       has_global=True, global_base_digest=base, global_digest=digest)

    good = task(state_digest(start), state_digest(after))
    with pytest.raises(NeedsFullState, match="keeps no global state"):
        worker.train(good, payload, lambda *_: None, threading.Event())
    models.save("job1", "global", moved)
    with pytest.raises(NeedsFullState, match="not the broadcast's base"):
        worker.train(good, payload, lambda *_: None, threading.Event())
    models.save("job1", "global", start)
    with pytest.raises(NeedsFullState, match="differs"):
        worker.train(task(state_digest(start), state_digest(start)), payload,
                     lambda *_: None, threading.Event())
    worker.train(good, payload, lambda *_: None, threading.Event())
    kept = models.load("job1", "global")
    assert all(torch.equal(kept[k], after[k]) for k in after)


def test_the_first_round_state_is_built_from_the_seed_and_checked(tmp_path):
    """Round 1 sends no state: the node builds the job's seeded state, as INIT does, and
    asks for the whole state when its bits differ from the coordinator's."""
    from confide.node.worker import NeedsFullState
    from confide.protos.state import state_digest

    write_jsonl(tmp_path / "data" / "train.jsonl", synthetic_classification(16, 2, seed=1))
    models = ModelStore(tmp_path / "models")
    spec = normalize_spec(job_spec("fedavg-lora", base="tiny-bert", num_labels=2,
                                   max_length=16, max_steps=1, batch_size=8,
                                   learning_rate=1e-2))
    # the INIT node and the training node are different workers (different processes)
    init = TaskWorker(LocalData(tmp_path / "data"), ModelStore(tmp_path / "m0"),
                      torch.device("cpu"))
    seeded = _state(init.initial_state(pb.Task(task_id="i", job_id="job1", kind=pb.INIT,
                                               spec=spec)))
    worker = TaskWorker(LocalData(tmp_path / "data"), models, torch.device("cpu"))

    def task(digest: bytes) -> pb.Task:
        return pb.Task(task_id="t", job_id="job1", round=1, kind=pb.TRAIN, spec=spec,
                       global_from_seed=True, global_digest=digest)

    wrong = {k: v + 1 for k, v in seeded.items()}
    with pytest.raises(NeedsFullState, match="seeded initial state differs"):
        worker.train(task(state_digest(wrong)), {}, lambda *_: None, threading.Event())
    worker.train(task(state_digest(seeded)), {}, lambda *_: None, threading.Event())
    kept = models.load("job1", "global")
    assert all(torch.equal(kept[k], seeded[k]) for k in seeded)
