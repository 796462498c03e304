"""Anonymity sets (protos.anonymity_sets) and what each side does with them: the rule is a
deterministic partition into sets of at least k; a node refuses a ring whose published sets
break it; the coordinator verifies an update against one set (O(k) group operations,
whatever the round's size) and still links a second update of one key in one round, also
when it was signed over another set."""

from __future__ import annotations

import hashlib

import pytest
import torch

from confide.coordinator.anonymous import AnonymousInbox, AnonymousRejected, ChallengeBook
from confide.node.anonymous import AnonymityError, check_ring, signed_update_header
from confide.privacy import ringsig
from confide.privacy.ringsig import RingKeyPair
from confide.protos.anonymity_sets import DEFAULT_ANONYMITY_SET, anonymity_sets, set_of, set_size
from confide.protos.identity import RING_KEY_FEATURE, ring_epoch_id, ring_key_of
from confide.protos.stream import stream_digest
from confide.v1 import coordinator_pb2 as pb

KEYS = [RingKeyPair.from_seed(hashlib.sha256(i.to_bytes(2, "big")).digest()) for i in range(300)]
JOB = "0123456789ab"


def _ring(members: list[RingKeyPair], k: int, round_number: int = 1) -> pb.Ring:
    """A round ring as an honest coordinator publishes it."""
    keys = sorted(m.public for m in members)
    ring = pb.Ring(job_id=JOB, round=round_number, epoch_id=ring_epoch_id(keys),
                   public_keys=keys, anonymity_set=k)
    for members_ in anonymity_sets(keys, k, JOB, round_number):
        ring.sets.add(members=members_)
    return ring


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize(("n", "k"), [(2, 32), (31, 32), (32, 32), (63, 32), (64, 32),
                                      (1000, 32), (100, 7), (5, 2)])
def test_the_sets_partition_the_ring_into_sets_of_at_least_k(n, k):
    keys = sorted(key.public for key in KEYS[:n]) if n <= 300 else [
        hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]
    sets = anonymity_sets(keys, k, JOB, 3)
    assert sorted(i for s in sets for i in s) == list(range(n))  # each key exactly once
    assert all(s == sorted(s) for s in sets)  # ring order inside a set
    if n < 2 * k:
        assert sets == [list(range(n))]  # a small round is one set: the whole ring
    else:
        assert all(k <= len(s) < 2 * k for s in sets)
        assert max(map(len, sets)) - min(map(len, sets)) <= 1
    assert anonymity_sets(keys, k, JOB, 3) == sets  # deterministic: every node gets the same


def test_the_sets_change_with_the_round_and_job_but_not_with_who_computes_them():
    keys = sorted(key.public for key in KEYS[:200])
    first = anonymity_sets(keys, 16, JOB, 1)
    assert anonymity_sets(keys, 16, JOB, 2) != first
    assert anonymity_sets(keys, 16, "another-job", 1) != first
    assert anonymity_sets(list(keys), 16, JOB, 1) == first


def test_set_of_finds_the_one_set_that_holds_a_key():
    keys = sorted(key.public for key in KEYS[:100])
    sets = anonymity_sets(keys, 10, JOB, 1)
    for index in range(100):
        assert index in sets[set_of(sets, index)]


@pytest.mark.parametrize("k", [0, 1, 5000])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="anonymity set"):
        anonymity_sets([KEYS[0].public, KEYS[1].public], k, JOB, 1)


def test_set_size_defaults_and_job_validation():
    from confide import job_spec
    from confide.coordinator.jobs import normalize_spec

    assert set_size(0) == DEFAULT_ANONYMITY_SET == 32 and set_size(8) == 8
    assert normalize_spec(job_spec(anonymous=True, min_nodes=2)).anonymity_set == 32
    spec = job_spec(anonymous=True, min_nodes=2)
    spec.anonymity_set = 1
    with pytest.raises(ValueError, match="anonymity_set"):
        normalize_spec(spec)
    spec = job_spec(min_nodes=2)
    spec.anonymity_set = 8
    with pytest.raises(ValueError, match="only an anonymous job"):
        normalize_spec(spec)


def test_only_nodes_that_announce_v2_ring_keys_count():
    key = KEYS[0].public
    assert ring_key_of(pb.NodeInfo(ring_public_key=key, features=[RING_KEY_FEATURE])) == key
    assert ring_key_of(pb.NodeInfo(ring_public_key=key)) is None  # an older node: v1 key
    assert ring_key_of(pb.NodeInfo(ring_public_key=key[:31],
                                   features=[RING_KEY_FEATURE])) is None


# ---------------------------------------------------------------- the node's check


def test_a_node_signs_over_its_own_set_of_the_rule():
    members = KEYS[:100]
    ring = _ring(members, 16)
    for key in members[:10]:
        signers = check_ring(ring, key, 16, JOB, 1)
        assert key.public in signers.keys and 16 <= len(signers.keys) < 32
        expected = anonymity_sets(list(ring.public_keys), 16, JOB, 1)[signers.index]
        assert signers.keys == [ring.public_keys[i] for i in expected]


def _moved_member(ring: pb.Ring) -> pb.Ring:
    """Sets of the right sizes, but one member swapped between two sets (hand-picked)."""
    bad = pb.Ring()
    bad.CopyFrom(ring)
    a, b = bad.sets[0].members, bad.sets[1].members
    a[0], b[0] = b[0], a[0]
    return bad


def _tiny_first_set(ring: pb.Ring) -> pb.Ring:
    """The target isolated with one other key: what a coordinator wanting to unmask it would
    publish."""
    bad = pb.Ring()
    bad.CopyFrom(ring)
    members = list(bad.sets[0].members)
    del bad.sets[:]
    bad.sets.add(members=members[:2])
    bad.sets.add(members=sorted(set(range(len(ring.public_keys))) - set(members[:2])))
    return bad


@pytest.mark.parametrize("corrupt", [_moved_member, _tiny_first_set])
def test_a_node_refuses_sets_that_break_the_rule(corrupt):
    members = KEYS[:100]
    ring = _ring(members, 16)
    bad = corrupt(ring)
    first = ring.public_keys[bad.sets[0].members[0]]
    victim = next(k for k in members if k.public == first)
    with pytest.raises(AnonymityError, match="public rule"):
        check_ring(bad, victim, 16, JOB, 1)


def test_a_node_refuses_a_smaller_k_or_another_rounds_ring():
    members = KEYS[:100]
    small = _ring(members, 4)  # sets follow the rule, but for k = 4
    with pytest.raises(AnonymityError, match="k = 4"):
        check_ring(small, members[0], 16, JOB, 1)
    with pytest.raises(AnonymityError, match="round"):
        check_ring(_ring(members, 16, round_number=2), members[0], 16, JOB, 1)


# ---------------------------------------------------------------- the coordinator's check


def _submission(key: RingKeyPair, ring: pb.Ring, book: ChallengeBook, k: int,
                payload: bytes = b"update") -> tuple[pb.AnonymousUpdateHeader, dict]:
    update = {"u": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    signers = check_ring(ring, key, k, JOB, ring.round)
    return signed_update_header(key, JOB, ring.round, ring, signers, book.issue().nonce,
                                stream_digest(update), 10), update


def _count_group_operations(monkeypatch) -> dict[str, int]:
    counts = {"mul": 0, "mul_base": 0, "valid": 0}
    for name, attr in (("mul", "_mul"), ("mul_base", "_mul_base"),
                       ("valid", "is_valid_public_key")):
        real = getattr(ringsig, attr)

        def counted(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)
        monkeypatch.setattr(ringsig, attr, counted)
    return counts


@pytest.mark.parametrize("n", [40, 300])
def test_verifying_an_update_costs_o_k_whatever_the_round_size(monkeypatch, n):
    """Structural, not timed: the group operations the coordinator spends on one update
    depend on its set's size (4 multiplications per member), not on the n keys of the round."""
    k = 8
    ring = _ring(KEYS[:n], k)
    book, inbox = ChallengeBook(), AnonymousInbox()
    inbox.open_round(JOB, 1, n)
    headers = [_submission(key, ring, book, k) for key in KEYS[:3]]
    counts = _count_group_operations(monkeypatch)
    for header, payload in headers:
        inbox.verify_and_file(header, payload, list(ring.public_keys), book, set_size=k)
    sizes = [len(ring.sets[h.set_index].members) for h, _ in headers]
    assert counts["mul_base"] == sum(sizes) and counts["mul"] == 3 * sum(sizes)
    # ...and each set's keys are validated once; each key image twice (decode, verify)
    assert counts["valid"] == sum(len(ring.sets[i].members)
                                  for i in {h.set_index for h, _ in headers}) + 2 * 3
    assert sum(sizes) < 3 * 2 * k


def test_a_second_update_of_one_node_links_even_over_another_set():
    """One key, one round: the link tag depends on the key and the round, not the set. Here
    the round's ring is re-fixed (a resumed round) and the node lands in another set with
    other members: its second update verifies, and is refused as a double submission."""
    k, node = 8, KEYS[0]
    book, inbox = ChallengeBook(), AnonymousInbox()
    inbox.open_round(JOB, 1, 100)
    first_ring = _ring(KEYS[:40], k)
    header, payload = _submission(node, first_ring, book, k)
    inbox.verify_and_file(header, payload, list(first_ring.public_keys), book, set_size=k)
    second_ring = _ring([node, *KEYS[100:140]], k)
    again, payload = _submission(node, second_ring, book, k, b"second")
    first_set = {first_ring.public_keys[i] for i in first_ring.sets[header.set_index].members}
    second_set = {second_ring.public_keys[i] for i in second_ring.sets[again.set_index].members}
    assert first_set & second_set == {node.public}
    with pytest.raises(AnonymousRejected, match="already submitted") as raised:
        inbox.verify_and_file(again, payload, list(second_ring.public_keys), book, set_size=k)
    assert raised.value.code == "ALREADY_EXISTS"
    other, payload = _submission(KEYS[100], second_ring, book, k, b"other")
    inbox.verify_and_file(other, payload, list(second_ring.public_keys), book, set_size=k)
    assert inbox.count(JOB, 1) == 2


def test_the_coordinator_refuses_a_wrong_set_index_or_a_signature_over_another_set():
    k = 8
    ring = _ring(KEYS[:40], k)
    book, inbox = ChallengeBook(), AnonymousInbox()
    inbox.open_round(JOB, 1, 40)
    header, payload = _submission(KEYS[0], ring, book, k)
    header.set_index = len(ring.sets)
    with pytest.raises(AnonymousRejected, match="set_index") as raised:
        inbox.verify_and_file(header, payload, list(ring.public_keys), book, set_size=k)
    assert raised.value.code == "INVALID_ARGUMENT"
    header, payload = _submission(KEYS[1], ring, book, k)
    header.set_index = (header.set_index + 1) % len(ring.sets)  # a set it did not sign over
    with pytest.raises(AnonymousRejected, match="does not verify"):
        inbox.verify_and_file(header, payload, list(ring.public_keys), book, set_size=k)


def test_a_node_refuses_a_set_holding_an_invalid_key():
    """An invalid key in the node's set (a coordinator that skipped the registration check)
    is an AnonymityError the session reports, not a crash in the signing code."""
    members = sorted(k.public for k in KEYS[:3])
    bad = sorted([*members, b"\xff" * 32])
    ring = pb.Ring(job_id=JOB, round=1, epoch_id=ring_epoch_id(bad), public_keys=bad,
                   anonymity_set=32)
    ring.sets.add(members=anonymity_sets(bad, 32, JOB, 1)[0])
    with pytest.raises(AnonymityError, match="cannot be signed over"):
        check_ring(ring, KEYS[0], 32, JOB, 1)
