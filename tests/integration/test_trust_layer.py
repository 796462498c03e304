"""Anonymous update submission and truthful incentive selection, across real processes."""

from __future__ import annotations

import grpc
import pytest

from confide.cluster.local import LocalCluster
from confide.node.anonymous import load_or_create_ring_key
from confide.privacy.ringsig import RingKeyPair, sign
from confide.protos.identity import (
    RING_KEY_FEATURE,
    NodeKey,
    anonymous_scope,
    anonymous_update_message,
)
from confide.protos.stream import stream_digest, stream_tensor_map
from confide.sdk.client import Client
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc
from tests.integration.helpers import events_until, tiny_spec, wait_for_nodes


def test_anonymous_job_files_updates_under_link_tags_not_node_ids(tmp_path, shards):
    with LocalCluster(tmp_path / "cluster", shards(3), mqtt=False) as cluster, \
            Client(cluster.address) as client:
        nodes = wait_for_nodes(client, 3)
        job = client.submit_job(tiny_spec(rounds=2, min_nodes=3, max_steps=40,
                                          anonymous=True))
        events: list[pb.Event] = []
        final = client.wait_job(job.job_id, on_event=events.append)
        trained = client.fetch_global_model(job.job_id)
    assert final.state == pb.COMPLETED, final.reason
    # no training progress is published for anonymous tasks: step counts and totals would
    # tell the nodes' data sizes, and so their uploads, apart
    assert not [e for e in events if e.kind == "node.progress"]
    assert [e for e in events if e.kind == "round.completed"]
    node_ids = {n.node_id for n in nodes}
    for summary in final.rounds:
        assert set(summary.selected) == node_ids          # who was asked is no secret
        assert len(summary.participants) == 3
        assert all(p.startswith("anon-") for p in summary.participants)
        assert not set(summary.participants) & node_ids   # who sent what is
    # link tags are scoped to the round: the same node is not linkable across rounds
    assert not set(final.rounds[0].participants) & set(final.rounds[1].participants)
    assert trained


def _register(stub, name: str, v2: bool = True) -> tuple[NodeKey, RingKeyPair]:
    """A registration without a session; ``v2=False`` is how a node of an older version
    registers (its ring key without the ristretto255 feature)."""
    key, ring_key = NodeKey.generate(), RingKeyPair.generate()
    ts, sig = key.sign_registration()
    info = pb.NodeInfo(name=name, ring_public_key=ring_key.public,
                       features=[RING_KEY_FEATURE] if v2 else [])
    stub.Register(pb.RegisterRequest(public_key=key.public_bytes, timestamp_ms=ts, signature=sig,
                                     info=info))
    return key, ring_key


def _submit(stub, ring_key, job_id, round_number, payload, *, nonce=None, tamper=False,
            ring_round=None):
    ring = stub.GetRing(pb.GetRingRequest(
        job_id=job_id, round=round_number if ring_round is None else ring_round))
    if nonce is None:
        nonce = stub.GetChallenge(pb.GetChallengeRequest()).nonce
    digest = stream_digest(payload)
    # a round this small is one anonymity set, the whole ring (set 0)
    message = anonymous_update_message(nonce, job_id, round_number, ring.epoch_id, 0, 5, digest)
    signature = sign(message, list(ring.public_keys), ring_key,
                     anonymous_scope(job_id, round_number))
    header = pb.AnonymousUpdateHeader(job_id=job_id, round=round_number, epoch_id=ring.epoch_id,
                                      nonce=nonce, num_examples=5, payload_sha256=digest,
                                      signature=signature.encode(), set_index=0)
    sent = {name: t + 1 for name, t in payload.items()} if tamper else payload
    # the update streams as a tensor map, as a node's does
    messages = [pb.AnonymousUpdateMessage(header=header)] + [
        pb.AnonymousUpdateMessage(chunk=c) for c in stream_tensor_map(sent, "t")]
    return stub.SubmitAnonymousUpdate(iter(messages), timeout=10), nonce


def test_anonymous_submissions_reject_replays_doubles_outsiders_and_tampering(tmp_path,
                                                                              shards):
    import torch

    with LocalCluster(tmp_path / "cluster", shards(2), mqtt=False) as cluster, \
            grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with Client(cluster.address) as client:
            wait_for_nodes(client, 2)
            nodes = [load_or_create_ring_key(d / "ring_key.seed")
                     for d in cluster.node_data_dirs]
            # two more members of the job that are never selected (registered, no session)
            members = [_register(stub, f"member{i}") for i in range(2)]
            # and a node of an older version (a v1 ed25519 ring key): in no ring
            _register(stub, "old-node", v2=False)
            # a v2 registration with a key that is no ristretto255 element is refused
            key = NodeKey.generate()
            ts, sig = key.sign_registration()
            with pytest.raises(grpc.RpcError) as info:
                stub.Register(pb.RegisterRequest(
                    public_key=key.public_bytes, timestamp_ms=ts, signature=sig,
                    info=pb.NodeInfo(name="bad", ring_public_key=b"\xff" * 32,
                                     features=[RING_KEY_FEATURE])))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # the real nodes train long enough for the round to stay open meanwhile
            job = client.submit_job(tiny_spec(rounds=1, min_nodes=2, anonymous=True,
                                              max_steps=5000, round_timeout_s=300))
            events_until(client, job.job_id, "round.started", timeout=60)
            # the job's members are every registered ring key; round 1's ring, the keys of
            # the two nodes selected for it
            job_ring = stub.GetRing(pb.GetRingRequest(job_id=job.job_id))
            assert len(job_ring.public_keys) == 4
            ring = stub.GetRing(pb.GetRingRequest(job_id=job.job_id, round=1))
            assert sorted(ring.public_keys) == sorted(k.public for k in nodes)
            # k = 32 by default: two nodes are one anonymity set, published with the ring
            assert ring.anonymity_set == 32
            assert [list(s.members) for s in ring.sets] == [[0, 1]]
            assert ring.epoch_id != job_ring.epoch_id
            payload = {"w": torch.zeros(4)}
            ack, nonce = _submit(stub, nodes[0], job.job_id, 1, payload)
            assert len(ack.key_image) == 32

            cases = [
                # the same nonce again: a replay
                (dict(ring_key=nodes[1], nonce=nonce), grpc.StatusCode.UNAUTHENTICATED),
                # the same node again in the same round: linked by its tag
                (dict(ring_key=nodes[0]), grpc.StatusCode.ALREADY_EXISTS),
                # a key outside the round's ring: a member that was not selected ...
                (dict(ring_key=members[0][1]), None),
                # ... and a stranger
                (dict(ring_key=RingKeyPair.generate()), None),
                # the member signs over the job's ring instead: not this round's ring
                (dict(ring_key=members[0][1], ring_round=0), grpc.StatusCode.UNAUTHENTICATED),
                # a payload that is not the one signed
                (dict(ring_key=nodes[1], tamper=True), grpc.StatusCode.INVALID_ARGUMENT),
                # a round that is not being collected (and has no ring)
                (dict(ring_key=nodes[1], round_number=2, ring_round=1),
                 grpc.StatusCode.FAILED_PRECONDITION),
            ]
            for kwargs, code in cases:
                ring_key = kwargs.pop("ring_key")
                round_number = kwargs.pop("round_number", 1)
                if code is None:  # outside the ring: cannot even produce a signature
                    with pytest.raises(ValueError):
                        _submit(stub, ring_key, job.job_id, round_number, payload, **kwargs)
                    continue
                with pytest.raises(grpc.RpcError) as info:
                    _submit(stub, ring_key, job.job_id, round_number, payload, **kwargs)
                assert info.value.code() == code, kwargs
            # the other selected node fills the round's second slot ...
            _submit(stub, nodes[1], job.job_id, 1, payload)
            # ... and nobody can add a third
            with pytest.raises(grpc.RpcError) as info:
                _submit(stub, nodes[0], job.job_id, 1, payload)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            client.cancel_job(job.job_id)


def test_budgeted_job_selects_by_truthful_auction_and_pays_critical_values(tmp_path, shards):
    budget = 10.0
    cluster = LocalCluster(tmp_path / "cluster", shards(3), mqtt=False)
    try:
        cluster.start(flags={i: ("--cost", str(cost))
                             for i, cost in enumerate((1.0, 2.0, 40.0))})
        with Client(cluster.address) as client:
            nodes = {n.info.name: n for n in wait_for_nodes(client, 3)}
            job = client.submit_job(tiny_spec(rounds=2, min_nodes=2, max_steps=2,
                                              budget=budget))
            final = client.wait_job(job.job_id)
            ledger = client.get_ledger(job.job_id)
    finally:
        cluster.stop()
    assert final.state == pb.COMPLETED, final.reason
    expensive = nodes["node2"].node_id
    for summary in final.rounds:
        assert expensive not in summary.selected
        assert len(summary.selected) == 2
    for round_number in (1, 2):
        paid = [p for p in ledger.payments if p.round == round_number]
        assert {p.node_id for p in paid} == {nodes["node0"].node_id, nodes["node1"].node_id}
        assert sum(p.payment for p in paid) <= budget + 1e-9        # budget feasible
        assert all(p.payment >= p.reported_cost for p in paid)     # individually rational
    assert set(ledger.totals) == {nodes["node0"].node_id, nodes["node1"].node_id}


def test_an_anonymous_round_with_one_selected_node_fails_clearly(tmp_path, shards):
    """Two ring members are registered but only one node is online: a round's ring would
    hold one key, which hides nobody, so the job waits for a second node (min_nodes 1
    notwithstanding) and fails before any task goes out when none comes."""
    with LocalCluster(tmp_path / "cluster", shards(1), mqtt=False) as cluster, \
            grpc.insecure_channel(cluster.address) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        with Client(cluster.address) as client:
            wait_for_nodes(client, 1)
            _register(stub, "absent-member")
            job = client.submit_job(tiny_spec(rounds=1, min_nodes=1, anonymous=True,
                                              max_steps=2, wait_for_nodes_s=3))
            final = client.wait_job(job.job_id)
            assert final.state == pb.FAILED
            assert "the job needs 2" in final.reason
            assert "a ring of one hides nobody" in final.reason
            assert not final.rounds  # no round record: no task went out
            with pytest.raises(grpc.RpcError) as info:
                stub.GetRing(pb.GetRingRequest(job_id=job.job_id, round=1))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert len(stub.GetRing(pb.GetRingRequest(job_id=job.job_id)).public_keys) == 2
