"""The round engine in process: the real JobRunner, Store (tmp SQLite), EventLog, sessions and
methods, with scripted nodes (``tests/unit/fakes.py``) instead of daemons."""

from __future__ import annotations

import asyncio
import random

import torch

from confide.coordinator.events import EventLog
from confide.coordinator.jobs import normalize_spec
from confide.coordinator.runner import JobRunner
from confide.coordinator.sessions import SessionRegistry
from confide.coordinator.store import RoundRecord, Store
from confide.node.methods import get_method
from confide.sdk.client import job_spec
from confide.v1 import coordinator_pb2 as pb
from tests.unit.fakes import INITIAL_STATE, FakeNode, Reply, honest

JOB = "0123456789ab"


class Coordinator:
    """The coordinator's parts a job runs on, without the gRPC service."""

    def __init__(self, tmp_path) -> None:
        self.store = Store(tmp_path)
        self.sessions = SessionRegistry()
        self.events = EventLog(self.store)

    def submit(self, **spec) -> None:
        spec.setdefault("round_timeout_s", 5.0)
        spec.setdefault("wait_for_nodes_s", 2.0)
        self.store.create_job(JOB, normalize_spec(job_spec(**spec)))

    def run(self, nodes: list[FakeNode], late: list[FakeNode] = (), after_s: float = 0.0
            ) -> pb.JobStatus:
        async def main() -> None:
            for node in nodes:
                node.join(self.store, self.sessions)
            runner = JobRunner(JOB, self.store, self.sessions, self.events)
            running = runner.start()
            if late:
                await asyncio.sleep(after_s)
                for node in late:
                    node.join(self.store, self.sessions)
            await running
            for node in [*nodes, *late]:
                await node.leave()

        asyncio.run(main())
        status = self.store.job(JOB)
        assert status is not None
        return status

    def events_of(self, kind: str) -> list[pb.Event]:
        return [e for e in self.store.events(JOB) if e.kind == kind]

    def rounds(self) -> list[RoundRecord]:
        return self.store.rounds(JOB)


def trained(node: FakeNode) -> list[int]:
    return [t.round for t in node.tasks if t.kind == pb.TRAIN]


def test_each_round_trains_its_seeded_sample_and_aggregates(tmp_path):
    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=2, min_nodes=2, nodes_per_round=2, seed=7)
    nodes = [FakeNode(name, honest(1.0)) for name in ("a", "b", "c")]
    status = coordinator.run(nodes)
    assert status.state == pb.COMPLETED, status.reason
    for record in coordinator.rounds():
        expected = random.Random(f"7/{record.round}").sample(nodes, 2)
        assert record.selected == [n.node_id for n in expected]
        assert sorted(record.participants) == sorted(record.selected)
        assert record.state == "completed" and not record.dropped
        assert record.bytes_down > 0 and record.bytes_up > 0
    for node in nodes:  # a node trains exactly in the rounds that selected it
        assert trained(node) == [r.round for r in coordinator.rounds()
                                 if node.node_id in r.selected]
    _, state = coordinator.store.latest_global(JOB)
    assert torch.equal(state["w"], torch.full((4,), 2.0))


def test_the_job_waits_for_min_nodes_and_fails_when_they_do_not_come(tmp_path):
    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=1, min_nodes=2, wait_for_nodes_s=5.0)
    status = coordinator.run([FakeNode("a", honest())], late=[FakeNode("b", honest())],
                             after_s=0.3)
    assert status.state == pb.COMPLETED, status.reason

    coordinator = Coordinator(tmp_path / "again")
    coordinator.submit(rounds=1, min_nodes=2, wait_for_nodes_s=0.3)
    status = coordinator.run([FakeNode("a", honest())])
    assert status.state == pb.FAILED
    assert "only 1 idle trainer node(s) online, the job needs 2" in status.reason


def test_a_node_past_the_round_deadline_is_dropped_with_the_reason(tmp_path):
    def late(task, state):
        return Reply(silent=True) if task.kind == pb.TRAIN else honest()(task, state)

    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=1, min_nodes=2, round_timeout_s=0.5)
    nodes = [FakeNode("a", honest()), FakeNode("b", honest()), FakeNode("c", late)]
    status = coordinator.run(nodes)
    assert status.state == pb.COMPLETED, status.reason
    (record,) = coordinator.rounds()
    assert sorted(record.participants) == ["a", "b"]
    assert "no result within the round deadline" in record.dropped["c"]
    (dropped,) = coordinator.events_of("node.dropped")
    assert dropped.node_id == "c" and dropped.message == record.dropped["c"]


def test_bad_updates_are_dropped_with_their_reasons_never_aggregated(tmp_path):
    def sends(reply):
        return lambda task, state: reply if task.kind == pb.TRAIN else honest()(task, state)

    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=1, min_nodes=1)
    nodes = [
        FakeNode("a", honest(2.0)),
        FakeNode("b", sends(Reply(raw=b"\xff\xfe garbage"))),
        FakeNode("c", sends(Reply(update={"w": torch.ones(5)}))),  # fails check_update
        FakeNode("d", sends(Reply(update={"w": torch.full((4,), float("nan"))}))),
        FakeNode("e", sends(Reply(failure="out of memory"))),
    ]
    status = coordinator.run(nodes)
    assert status.state == pb.COMPLETED, status.reason
    (record,) = coordinator.rounds()
    assert record.participants == ["a"]
    # raw bytes are no tensor-map stream: refused at their first chunk
    assert record.dropped["b"].startswith("invalid update stream: 10 data bytes arrived outside")
    assert record.dropped["c"] == "invalid update: tensor 'w' has shape (5,), expected (4,)"
    assert "NaN" in record.dropped["d"]
    assert record.dropped["e"] == "node failed: out of memory"
    assert {e.node_id: e.message for e in coordinator.events_of("node.dropped")} == \
        record.dropped
    _, state = coordinator.store.latest_global(JOB)
    assert torch.equal(state["w"], torch.full((4,), 2.0))  # a's update alone


def test_min_nodes_failure_names_every_dropped_node(tmp_path):
    def fails(task, state):
        return Reply(failure="disk full") if task.kind == pb.TRAIN else honest()(task, state)

    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=2, min_nodes=3)
    nodes = [FakeNode("a", honest()), FakeNode("b", fails),
             FakeNode("c", lambda t, s: Reply(raw=b"\x01") if t.kind == pb.TRAIN
                      else honest()(t, s))]
    status = coordinator.run(nodes)
    assert status.state == pb.FAILED
    assert status.reason.startswith(
        "round 1: 1 of 3 node(s) returned a valid update, min_nodes is 3 (")
    assert "b: node failed: disk full" in status.reason
    assert "c: invalid update" in status.reason
    (record,) = coordinator.rounds()
    assert record.state == "failed" and set(record.dropped) == {"b", "c"}
    (failed,) = coordinator.events_of("round.failed")
    assert failed.message == status.reason
    assert coordinator.store.latest_global(JOB)[0] == 0  # nothing committed


def test_a_ferret_update_failing_the_config_check_is_dropped_and_not_paid(tmp_path):
    ferret = get_method("ferret")
    start = {"a": torch.zeros(300)}

    def trains_with(k: int):
        config = ferret.parse_config({"k": k})

        def behave(task, state):
            if task.kind == pb.INIT:
                return Reply(update=start)
            local = {name: value + 0.1 for name, value in state.items()}
            return Reply(update=ferret.client_update(config, state, local, {}))

        return behave

    coordinator = Coordinator(tmp_path)
    coordinator.submit(method="ferret", params={"k": 8}, rounds=1, min_nodes=2, budget=100.0)
    nodes = [FakeNode("a", trains_with(8), cost=1.0), FakeNode("b", trains_with(8), cost=1.0),
             FakeNode("c", trains_with(16), cost=1.0)]
    status = coordinator.run(nodes)
    assert status.state == pb.COMPLETED, status.reason
    (auction,) = coordinator.events_of("round.auction")
    assert auction.message.startswith("3 of 3 bidder(s) selected")
    (record,) = coordinator.rounds()
    assert sorted(record.participants) == ["a", "b"]
    assert "16 coefficients, this job expects 8" in record.dropped["c"]
    assert [e.node_id for e in coordinator.events_of("node.dropped")] == ["c"]
    paid = {p.node_id for p in coordinator.store.ledger(JOB).payments}
    assert paid == {"a", "b"}


def test_a_restarted_job_resumes_at_the_first_uncommitted_round(tmp_path):
    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=3, min_nodes=2)
    store = coordinator.store
    store.save_global(JOB, 0, INITIAL_STATE)
    store.save_global(JOB, 1, {"w": torch.full((4,), 1.0)})
    store.save_round(JOB, RoundRecord(round=1, state="completed", selected=["a", "b"],
                                      participants=["a", "b"]))
    # round 2's model was written, but its round row was not: it is not committed
    store.save_global(JOB, 2, {"w": torch.full((4,), 99.0)})
    store.set_job_state(JOB, pb.RUNNING)
    nodes = [FakeNode("a", honest()), FakeNode("b", honest())]
    status = coordinator.run(nodes)
    assert status.state == pb.COMPLETED, status.reason
    (started,) = coordinator.events_of("job.started")
    assert started.message == "resumed after round 1"
    for node in nodes:
        assert not any(t.kind == pb.INIT for t in node.tasks)
        assert trained(node) == [2, 3]
    _, state = store.latest_global(JOB)
    assert torch.equal(state["w"], torch.full((4,), 3.0))


def test_a_refusal_is_a_node_refused_event_and_a_refusing_node_is_not_asked_to_init_again(
        tmp_path):
    def refuses(task, state):
        return Reply(failure="this node does not run method 'fedavg-lora'", refused=True)

    coordinator = Coordinator(tmp_path)
    coordinator.submit(rounds=1, min_nodes=1)
    nodes = [FakeNode("a", refuses), FakeNode("b", honest())]
    status = coordinator.run(nodes)
    assert status.state == pb.COMPLETED, status.reason
    assert sum(t.kind == pb.INIT for t in nodes[0].tasks) <= 1  # asked at most once
    (record,) = coordinator.rounds()
    assert record.participants == ["b"]
    assert record.dropped == {"a": "node refused: this node does not run method 'fedavg-lora'"}
    (refused,) = coordinator.events_of("node.refused")
    assert refused.node_id == "a" and "does not run method" in refused.message
    assert not coordinator.events_of("node.dropped")
