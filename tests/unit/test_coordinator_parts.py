"""The coordinator's building blocks without processes: job spec defaults and validation,
the SQLite store and its atomic model files, node identity signatures."""

from __future__ import annotations

import pytest
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from confide.coordinator.jobs import normalize_spec
from confide.coordinator.store import RoundRecord, Store
from confide.protos.identity import NodeKey, node_id_for, register_message, session_message
from confide.sdk.client import job_spec
from confide.v1 import coordinator_pb2 as pb


def test_normalize_fills_defaults_for_unset_fields():
    spec = normalize_spec(pb.JobSpec())
    assert spec.method == "fedavg-lora"
    assert spec.rounds == 3 and spec.min_nodes == 1
    assert spec.model.task == "sequence-classification" and spec.model.num_labels == 2
    assert spec.model.lora.r == 8 and spec.model.lora.alpha == 16
    assert spec.train.batch_size == 16 and spec.train.dataset == "train"


@pytest.mark.parametrize("overrides,message", [
    (dict(method="nope"), "unknown method"),
    (dict(rounds=10**6), "rounds"),
    (dict(min_nodes=3, nodes_per_round=2), "nodes_per_round"),
    (dict(min_nodes=1, nodes_per_round=1, anonymous=True), "at least 2 per round"),
    (dict(task="vision"), "model.task"),
    (dict(max_length=10**6), "max_length"),
    (dict(dataset="a/b"), "train.dataset"),
    (dict(lora_dropout=1.5), "dropout"),
])
def test_normalize_rejects_bad_specs_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        normalize_spec(job_spec(**overrides))


def test_store_round_trip_and_resume_point(tmp_path):
    store = Store(tmp_path)
    spec = normalize_spec(job_spec(rounds=2))
    store.create_job("0123456789ab", spec)
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    store.save_global("0123456789ab", 0, state)
    assert store.latest_global("0123456789ab")[0] == 0
    # a model file written without its round row does not count as a completed round
    store.save_global("0123456789ab", 1, {"w": state["w"] + 1})
    assert store.latest_global("0123456789ab")[0] == 0
    store.save_round("0123456789ab", RoundRecord(round=1, state="completed", bytes_up=10,
                                                 bytes_down=20, metrics={"loss": 0.5}))
    number, latest = store.latest_global("0123456789ab")
    assert number == 1 and torch.equal(latest["w"], state["w"] + 1)
    store.close()

    reopened = Store(tmp_path)  # a restarted coordinator sees the same thing
    status = reopened.job("0123456789ab")
    assert status.rounds_completed == 1
    assert status.rounds[0].bytes.up == 10 and status.rounds[0].metrics["loss"] == 0.5
    assert status.spec == spec
    assert not list(tmp_path.rglob("*.tmp"))


def test_store_keeps_a_job_ring_and_one_ring_per_round(tmp_path):
    store = Store(tmp_path)
    keys = [bytes([i]) * 32 for i in range(4)]
    store.save_ring("job", keys)
    store.save_ring("job", keys[:2])  # the job's members are fixed once
    store.save_round_ring("job", 1, keys[1:3])
    store.save_round_ring("job", 2, keys[:2])
    store.save_round_ring("job", 2, keys[2:])  # a resumed round re-fixes its ring
    assert store.ring("job") == keys
    assert store.ring("job", 1) == keys[1:3] and store.ring("job", 2) == keys[2:]
    assert store.ring("job", 3) == [] and store.ring("other", 1) == []
    store.close()
    assert Store(tmp_path).ring("job", 1) == keys[1:3]


def test_store_events_replay_in_order(tmp_path):
    store = Store(tmp_path)
    for seq in (1, 2, 3):
        store.append_event(pb.Event(job_id="j", seq=seq, kind=f"k{seq}"))
    assert [e.kind for e in store.events("j", after_seq=1)] == ["k2", "k3"]
    assert store.last_event_seq("j") == 3


def test_node_key_signatures_follow_the_documented_bytes(tmp_path):
    key = NodeKey.load_or_create(tmp_path / "key.pem")
    again = NodeKey.load_or_create(tmp_path / "key.pem")
    assert key.node_id == again.node_id == node_id_for(key.public_bytes)
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    public = Ed25519PublicKey.from_public_bytes(key.public_bytes)
    _, signature = key.sign_registration(1234)
    public.verify(signature, register_message(key.public_bytes, 1234))
    public.verify(key.sign_session(b"n" * 32), session_message(b"n" * 32, key.node_id))
    with pytest.raises(InvalidSignature):  # domain separation: one signature, one purpose
        public.verify(signature, session_message(b"n" * 32, key.node_id))


def test_challenges_are_stateless_single_use_and_unforgeable(monkeypatch):
    import time as clock

    from confide.coordinator.anonymous import AnonymousRejected, ChallengeBook

    book = ChallengeBook(ttl_s=60)
    for _ in range(1000):  # issuing keeps no state: a flood cannot crowd out honest nodes
        book.issue()
    assert not book._spent
    nonce = book.issue().nonce
    assert len(nonce) == 32
    book.spend(nonce)
    with pytest.raises(AnonymousRejected, match="already used"):
        book.spend(nonce)
    forged = bytearray(book.issue().nonce)
    forged[3] ^= 1
    with pytest.raises(AnonymousRejected, match="unknown challenge"):
        book.spend(bytes(forged))
    with pytest.raises(AnonymousRejected, match="unknown challenge"):
        ChallengeBook().spend(book.issue().nonce)  # another coordinator's (or before restart)
    old = book.issue().nonce
    later = clock.time() + 120
    monkeypatch.setattr(clock, "time", lambda: later)
    with pytest.raises(AnonymousRejected, match="expired"):
        book.spend(old)


def test_update_weights_are_capped_at_the_registered_dataset(tmp_path):
    """A node's claimed example count weights its update: at most what it registered, 0 for
    a node that registered none, and an anonymous update at most the largest dataset of the
    round's ring."""
    from confide.coordinator.anonymous import AnonymousInbox
    from confide.coordinator.events import EventLog
    from confide.coordinator.federated_rounds import FederatedRounds
    from confide.coordinator.job import RunningJob
    from confide.coordinator.node_pool import NodePool
    from confide.coordinator.sessions import SessionRegistry, TaskOutcome

    store = Store(tmp_path)
    keys = {name: bytes([i + 1]) * 32 for i, name in enumerate(["a", "b", "c"])}
    for name, size in (("a", 40), ("b", 300), ("c", 0)):
        info = pb.NodeInfo(name=name, ring_public_key=keys[name])
        if size:
            info.datasets["train"] = size
        store.upsert_node(name, keys[name], info)
    store.create_job("0123456789ab", normalize_spec(job_spec(anonymous=True, min_nodes=2)))
    store.save_round_ring("0123456789ab", 1, sorted([keys["a"], keys["c"]]))
    job = RunningJob.load("0123456789ab", store, SessionRegistry(), EventLog(store))
    pool = NodePool(job)
    caps = FederatedRounds(job, pool, AnonymousInbox())._example_caps(1, pool.infos())

    def weight(node_id: str, claimed: int) -> int:
        return FederatedRounds._capped(TaskOutcome(node_id, "t", True, num_examples=claimed), caps)

    assert weight("a", 10**9) == 40 and weight("a", 7) == 7
    assert weight("c", 10**9) == 0
    assert weight("anon-1f2e", 10**9) == 40  # b (300) is not in round 1's ring
