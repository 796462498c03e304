"""Secure aggregation through the real round engine (store, sessions, events, methods) with
fake nodes that run the real node-side code (``node/secagg.py``): the sum equals plain
aggregation, dropouts in each phase, aborts, and what the wiring refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.coordinator import secure_rounds
from confide.coordinator.jobs import normalize_spec
from confide.coordinator.secure_rounds import _PhaseInbox
from confide.coordinator.sessions import NodeSession
from confide.coordinator.store import RoundRecord
from confide.node.secagg import NodeSecureAggregation, SecureAggregationError, registered_verifier
from confide.privacy.secagg import SecAggProtocolError, SecAggServer
from confide.privacy.secagg.messages import (
    AdvertiseKeys,
    ForwardedShares,
    KeyBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.protos.identity import node_id_for
from confide.sdk.client import job_spec
from confide.v1 import coordinator_pb2 as pb
from tests.unit.fakes import FakeNode, Reply, SecureFakeNode
from tests.unit.test_coordinator_rounds import JOB, Coordinator

DIM = 64
STATE = {"w": torch.zeros(DIM // 2), "b": torch.zeros(DIM // 2)}


def random_deltas(name: str, examples: int = 10):
    """INIT: STATE; TRAIN: a delta fixed by (node name, round)."""
    def behave(task, state):
        if task.kind == pb.INIT:
            return Reply(update=STATE)
        g = torch.Generator().manual_seed(hash((name, task.round)) % 2**31)
        return Reply(update={k: torch.randn(v.shape, generator=g) * 0.1 for k, v in
                             state.items()}, num_examples=examples, metrics={"loss": 1.0})
    return behave


@pytest.fixture
def quick_phases(monkeypatch):
    """Phases 1, 2 and 4 close after 0.5 s instead of 5 s (nodes here answer at once)."""
    monkeypatch.setattr(secure_rounds, "phase_timeout", lambda round_timeout_s: 0.5)


def run(tmp_path, nodes, **spec):
    coordinator = Coordinator(tmp_path)
    spec.setdefault("min_nodes", 2)
    coordinator.submit(**spec)
    return coordinator, coordinator.run(nodes)


def final_state(coordinator):
    return coordinator.store.latest_global(JOB)[1]


def test_the_secure_sum_is_the_plain_aggregation(tmp_path):
    names, examples = ["a", "b", "c"], [10, 30, 60]
    plain, status = run(tmp_path / "plain", [FakeNode(n, random_deltas(n, e)) for n, e in
                                              zip(names, examples, strict=True)], rounds=2)
    assert status.state == pb.COMPLETED, status.reason
    nodes = [SecureFakeNode(n, random_deltas(n, e)) for n, e in zip(names, examples,
                                                                      strict=True)]
    secure, status = run(tmp_path / "secure", nodes, rounds=2, secure_aggregation=True)
    assert status.state == pb.COMPLETED, status.reason
    expected, got = final_state(plain), final_state(secure)
    for name in expected:  # exact up to the fixed-point step (far below 1e-5 here)
        assert torch.allclose(expected[name], got[name], atol=1e-5), name
        assert not torch.equal(got[name], STATE[name])
    for record in secure.rounds():
        assert record.secure_aggregation and record.secagg_survivors == 3
        assert record.secagg_threshold == 2 and len(record.participants) == 3
        assert "loss" not in record.metrics  # no per-node training metrics under the mask
    summary = secure.store.job(JOB).rounds[0]
    assert summary.secure_aggregation and summary.secagg_survivors == 3
    assert not plain.rounds()[0].secure_aggregation
    # what crossed the wire for node a: a masked vector, never its update; no example count
    assert all(t.spec.secure_aggregation for t in nodes[0].tasks)
    assert secure.events_of("round.secure_aggregation")


def test_cellm_with_shared_positions_sums_exactly_those_positions(tmp_path):
    """CELLM under secure aggregation: the round's positions come from the global state's
    digest, the same at every node; the new state is the weighted mean of the deltas there and
    unchanged elsewhere."""
    from confide.node.methods.cellm import CELLMConfig, shared_positions

    names, examples = ["a", "b", "c"], [10, 30, 60]
    nodes = [SecureFakeNode(n, random_deltas(n, e)) for n, e in zip(names, examples,
                                                                      strict=True)]
    params = {"selection": "shared-random", "density": 0.25}
    secure, status = run(tmp_path, nodes, rounds=1, method="cellm", secure_aggregation=True,
                         params=params)
    assert status.state == pb.COMPLETED, status.reason
    positions = shared_positions(CELLMConfig(density=0.25, selection="shared-random"), STATE)
    assert sum(p.numel() for p in positions.values()) == DIM // 4
    deltas = {n: random_deltas(n, e)(pb.Task(kind=pb.TRAIN, round=1), STATE).update
              for n, e in zip(names, examples, strict=True)}
    got = final_state(secure)
    for key, start in STATE.items():
        expected = start.clone()
        where = positions[key]
        expected[where] += sum(e * deltas[n][key][where] for n, e in
                               zip(names, examples, strict=True)) / sum(examples)
        assert torch.allclose(got[key], expected, atol=1e-5), key


def test_a_node_that_drops_after_its_masked_input_is_still_summed(tmp_path, quick_phases):
    nodes = [SecureFakeNode("a", random_deltas("a")), SecureFakeNode("b", random_deltas("b")),
             SecureFakeNode("c", random_deltas("c"), drop_after="masked")]
    secure, status = run(tmp_path / "s", nodes, rounds=1, secure_aggregation=True)
    assert status.state == pb.COMPLETED, status.reason
    record = secure.rounds()[0]
    assert record.secagg_survivors == 3  # its input is in the sum, its shares were not needed
    plain, _ = run(tmp_path / "p", [FakeNode(n, random_deltas(n)) for n in "abc"], rounds=1)
    for name, value in final_state(plain).items():
        assert torch.allclose(value, final_state(secure)[name], atol=1e-5)


def test_a_node_that_drops_after_sharing_keys_is_left_out_exactly(tmp_path, quick_phases):
    nodes = [SecureFakeNode("a", random_deltas("a")), SecureFakeNode("b", random_deltas("b")),
             SecureFakeNode("c", random_deltas("c"), drop_after="share")]
    secure, status = run(tmp_path / "s", nodes, rounds=1, secure_aggregation=True,
                         round_timeout_s=1.5)
    assert status.state == pb.COMPLETED, status.reason
    record = secure.rounds()[0]
    assert record.secagg_survivors == 2 and nodes[2].node_id in record.dropped
    plain, _ = run(tmp_path / "p", [FakeNode(n, random_deltas(n)) for n in "ab"], rounds=1)
    for name, value in final_state(plain).items():  # the survivors' mean, masks all removed
        assert torch.allclose(value, final_state(secure)[name], atol=1e-5)


def test_too_few_survivors_fail_the_round_with_nothing_unmasked(tmp_path, quick_phases):
    nodes = [SecureFakeNode("a", random_deltas("a")),
             SecureFakeNode("b", random_deltas("b"), drop_after="advertise"),
             SecureFakeNode("c", random_deltas("c"), drop_after="share")]
    secure, status = run(tmp_path, nodes, rounds=1, secure_aggregation=True,
                         round_timeout_s=1.5)
    assert status.state == pb.FAILED
    assert "secure aggregation aborted" in status.reason and "threshold is 2" in status.reason
    record = secure.rounds()[0]
    assert record.state == "failed" and record.secure_aggregation
    assert torch.equal(final_state(secure)["w"], STATE["w"])  # nothing was committed


@pytest.mark.parametrize("spec, words", [
    (dict(method="dimat"), "peer to peer"),
    (dict(method="cellm"), "shared-random"),
    (dict(anonymous=True, min_nodes=2), "anonymous"),
    (dict(method="dp-lora", params={"unit": "node", "mode": "central",
                                     "noise_multiplier": 1.0}), "central"),
    (dict(min_nodes=1), "at least 2 nodes"),
])
def test_jobs_that_cannot_be_securely_aggregated_are_refused_at_submission(spec, words):
    with pytest.raises(ValueError, match=words):
        normalize_spec(job_spec(secure_aggregation=True, **{"method": "fedavg-lora", **spec}))


def test_composing_methods_are_accepted_and_default_to_two_nodes():
    for method, params in [("fedavg-lora", None), ("fedavg-full", None), ("ferret", None),
                           ("sfprompt", None),
                           ("dp-lora", {"unit": "node", "noise_multiplier": 1.0}),
                           ("dp-lora", {"unit": "example", "noise_multiplier": 1.0, "rounds": 3}),
                           ("dp-lora", {"unit": "node", "mode": "distributed",
                                        "noise_multiplier": 1.0}),
                           ("cellm", {"selection": "shared-random"})]:
        spec = job_spec(method, secure_aggregation=True, min_nodes=0, params=params)
        assert normalize_spec(spec).min_nodes == 2


# ------------------------------------------------------------------ the node side's refusals


def _setup_round(n: int = 3, round_: int = 1, keys=None):
    keys = keys or [Ed25519PrivateKey.generate() for _ in range(n)]
    public = [k.public_key().public_bytes_raw() for k in keys]
    ids = [node_id_for(p) for p in public]
    server = SecAggServer.new_round(job_id=JOB, round_=round_, participants=ids, dim=8, clip=1.0,
                                    max_weight=10, verify=registered_verifier(dict(zip(
                                        ids, public, strict=True))))
    return keys, public, ids, server


def _envelope(setup_bytes: bytes, ids, public, round_: int = 1) -> pb.SecAggMessage:
    m = pb.SecAggMessage(job_id=JOB, round=round_, payload=setup_bytes)
    m.node_keys.update(dict(zip(ids, public, strict=True)))
    return m


def test_a_substituted_key_makes_the_node_refuse_the_round():
    keys, public, ids, server = _setup_round()
    sent = []
    node = NodeSecureAggregation(ids[0], keys[0].sign, sent.append)
    forged = _envelope(server.setup.to_bytes(), ids, public)
    forged.node_keys[ids[1]] = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    node.handle(forged)
    assert sent == []  # no advertisement: it does not join a round with a key not its peer's
    with pytest.raises(SecureAggregationError, match="not that node's"):
        registered_verifier(dict(forged.node_keys))


def _join_all(keys, public, ids, server, round_: int = 1):
    outs = {i: [] for i in ids}
    nodes = {i: NodeSecureAggregation(i, k.sign, outs[i].append) for i, k in
             zip(ids, keys, strict=True)}
    for i in ids:
        nodes[i].handle(_envelope(server.setup.to_bytes(), ids, public, round_))
        server.receive_advertisement(AdvertiseKeys.from_bytes(outs[i][-1].secagg.payload))
    for i, bundle in server.close_advertising().items():
        nodes[i].handle(pb.SecAggMessage(job_id=JOB, round=round_, payload=bundle.to_bytes()))
        server.receive_shares(ShareKeys.from_bytes(outs[i][-1].secagg.payload))
    return nodes, outs, server.close_sharing()


def test_a_forged_advertisement_in_the_bundle_is_refused_by_the_node():
    keys, public, ids, server = _setup_round()
    outs = {i: [] for i in ids}
    nodes = {i: NodeSecureAggregation(i, k.sign, outs[i].append) for i, k in
             zip(ids, keys, strict=True)}
    for i in ids:
        nodes[i].handle(_envelope(server.setup.to_bytes(), ids, public))
        server.receive_advertisement(AdvertiseKeys.from_bytes(outs[i][-1].secagg.payload))
    bundle = server.close_advertising()[ids[0]]
    ad = bundle.advertisements[0]  # the server swaps in its own key pair, signed by nobody
    fake = AdvertiseKeys(ad.job_id, ad.round, ad.sender, bytes(range(32)), ad.s_pk, ad.signature)
    forged = KeyBundle(bundle.job_id, bundle.round, bundle.receiver,
                       (fake, *bundle.advertisements[1:]))
    before = len(outs[ids[0]])
    nodes[ids[0]].handle(pb.SecAggMessage(job_id=JOB, round=1, payload=forged.to_bytes()))
    assert len(outs[ids[0]]) == before  # no shares for a forged key


def test_a_share_replayed_from_another_round_is_refused():
    keys, public, ids, server1 = _setup_round(round_=1)
    _, _, round1 = _join_all(keys, public, ids, server1, 1)
    _, _, _, server2 = _setup_round(round_=2, keys=keys)
    nodes, _, _ = _join_all(keys, public, ids, server2, 2)
    me = ids[0]
    state = nodes[me]._rounds[(JOB, 2)]
    state.forwarded = None
    # round 1's forwarded shares under round 2's envelope: the message names round 1
    nodes[me].handle(pb.SecAggMessage(job_id=JOB, round=2, payload=round1[me].to_bytes()))
    assert state.forwarded is None
    # relabelled as round 2's: accepted as a message, but the shares do not open (AEAD binds
    # job, round and pair), so the node masks nothing
    relabelled = ForwardedShares(JOB, 2, me, round1[me].shares)
    nodes[me].handle(pb.SecAggMessage(job_id=JOB, round=2, payload=relabelled.to_bytes()))
    with pytest.raises(SecAggProtocolError, match="does not open"):
        state.client.handle_forwarded_shares(state.forwarded, np.zeros(8), 1)


def test_an_honest_node_never_reveals_both_shares_of_a_peer():
    keys, public, ids, server = _setup_round()
    nodes, outs, forwarded = _join_all(keys, public, ids, server)
    me = ids[0]
    for i in ids:  # mask directly (the method layout is exercised by the round tests)
        nodes[i].handle(pb.SecAggMessage(job_id=JOB, round=1, payload=forwarded[i].to_bytes()))
        state = nodes[i]._rounds[(JOB, 1)]
        state.client.handle_forwarded_shares(state.forwarded, np.zeros(8), 1)
    first = UnmaskRequest(JOB, 1, tuple(ids))
    nodes[me].handle(pb.SecAggMessage(job_id=JOB, round=1, payload=first.to_bytes()))
    answered = len(outs[me])
    assert UnmaskResponse.from_bytes(outs[me][-1].secagg.payload).sender == me
    # the coordinator now claims ids[1] dropped: answering would reveal its mask key too
    flipped = UnmaskRequest(JOB, 1, (ids[0], ids[2]))
    nodes[me].handle(pb.SecAggMessage(job_id=JOB, round=1, payload=flipped.to_bytes()))
    assert len(outs[me]) == answered
    # and a request that lists this node as dropped is refused by the others
    other = ids[2]
    before = len(outs[other])
    nodes[other].handle(pb.SecAggMessage(job_id=JOB, round=1, payload=UnmaskRequest(
        JOB, 1, (ids[0], ids[1])).to_bytes()))
    assert len(outs[other]) == before


# ------------------------------------------------------------------ fuzzing the handlers


_node_keys, _node_public, _node_ids, _node_server = _setup_round()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=st.text(max_size=20), round_=st.integers(0, 2**32 - 1), payload=st.binary(
    max_size=300), prefix=st.sampled_from([b"", b"CSA\x01\x01", b"CSA\x01\x03",
                                           b"CSA\x01\x05", b"CSA\x01\x06"]),
    keys=st.dictionaries(st.text(max_size=40), st.binary(max_size=40), max_size=3))
def test_any_secagg_message_to_a_node_is_refused_without_crashing(job, round_, payload, prefix,
                                                                    keys):
    node = NodeSecureAggregation(_node_ids[0], _node_keys[0].sign, [].append)
    node.handle(_envelope(_node_server.setup.to_bytes(), _node_ids, _node_public))
    message = pb.SecAggMessage(job_id=job, round=round_, payload=prefix + payload)
    message.node_keys.update(keys)
    node.handle(message)  # never raises
    node.handle(pb.SecAggMessage(job_id=JOB, round=1, payload=prefix + payload))


@settings(max_examples=150, deadline=None)
@given(sender=st.sampled_from(["x", *_node_ids]), job=st.sampled_from(["", JOB]),
       round_=st.integers(0, 3), payload=st.binary(max_size=300),
       phase=st.sampled_from(["advertise", "share", "unmask", "mask"]))
def test_any_secagg_message_to_the_coordinator_is_refused_without_crashing(sender, job, round_,
                                                                            payload, phase):
    server = SecAggServer.new_round(job_id=JOB, round_=1, participants=_node_ids, dim=8,
                                    clip=1.0, max_weight=10, verify=lambda *a: False)
    inbox = _PhaseInbox(server, RoundRecord(round=1, state="running"))
    inbox.open(phase, set(_node_ids))
    session = NodeSession(sender)
    session.on_secagg = inbox.receive
    session.handle(pb.NodeMessage(secagg=pb.SecAggMessage(job_id=job, round=round_,
                                                          payload=payload)))
    assert inbox.record.bytes_up > 0
    assert set(inbox.rejected) <= set(_node_ids)


def test_a_session_without_a_round_ignores_secagg_messages():
    session = NodeSession("n")
    assert session.handle(pb.NodeMessage(secagg=pb.SecAggMessage(payload=b"x"))) is None



def test_what_the_coordinator_receives_is_independent_of_the_update(tmp_path):
    """The masked vector a node uploads (what crossed its session) against its true update:
    correlation ~0, and two different updates give vectors with the same distribution
    (uniform on the ring)."""
    big = {"w": torch.zeros(4096)}

    def behave(task, state):
        if task.kind == pb.INIT:
            return Reply(update=big)
        return Reply(update={"w": torch.linspace(-1, 1, 4096) * (1 + task.round)})

    nodes = [SecureFakeNode(n, behave) for n in "abc"]
    _, status = run(tmp_path, nodes, rounds=2, secure_aggregation=True)
    assert status.state == pb.COMPLETED, status.reason
    from confide.privacy.secagg.messages import MaskedInput

    true = torch.linspace(-1, 1, 4096).numpy()
    for upload in nodes[0].uploads:
        ring = np.frombuffer(MaskedInput.from_bytes(upload).vector, dtype="<u4")[:-1]
        values = ring.astype(np.float64)
        assert abs(np.corrcoef(values, true)[0, 1]) < 0.1
        # uniform on Z_2^32: mean ~2^31, each quarter of the ring holds ~1/4 of the entries
        quarters = np.bincount((ring >> 30).astype(np.int64), minlength=4) / ring.size
        assert np.all(np.abs(quarters - 0.25) < 0.05)
