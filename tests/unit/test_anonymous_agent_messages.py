"""Anonymous agent messages: ring-signed over the registry ring, no sender, no replays."""

from __future__ import annotations

import pytest

from confide.node.anonymous import AgentMessageVerifier, AnonymityError, sign_agent_message
from confide.privacy.ringsig import RingKeyPair
from confide.protos.identity import ring_epoch_id
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import node_pb2


def _ring(keys: list[RingKeyPair]) -> pb.Ring:
    public = sorted(k.public for k in keys)
    return pb.Ring(epoch_id=ring_epoch_id(public), public_keys=public)


def _message() -> node_pb2.AgentEnvelope:
    return node_pb2.AgentEnvelope(sender="node0", task_kind="weather.lookup",
                                  protocol_hash="ab" * 32, body='{"city": "paris"}')


def test_signed_message_names_no_sender_verifies_once_and_hides_the_signer():
    members = [RingKeyPair.generate() for _ in range(4)]
    ring = _ring(members)
    signed = sign_agent_message(_message(), ring, members[2])
    assert signed.sender == "" and signed.anonymous and len(signed.nonce) == 32
    verifier = AgentMessageVerifier(lambda: ring)
    assert verifier.check(signed) is None
    assert "replay" in verifier.check(signed)
    # two messages of one member share no link tag: the receiver cannot group them
    other = sign_agent_message(_message(), ring, members[2])
    assert other.ring_signature[-32:] != signed.ring_signature[-32:]
    assert verifier.check(other) is None


@pytest.mark.parametrize("field,value", [
    ("body", '{"city": "rome"}'), ("text", "hello"), ("task_kind", "math.add"),
    ("protocol_hash", "cd" * 32), ("nonce", b"\x01" * 32), ("sender", "node2"),
])
def test_any_change_to_a_signed_message_is_refused(field, value):
    members = [RingKeyPair.generate() for _ in range(3)]
    ring = _ring(members)
    signed = sign_agent_message(_message(), ring, members[0])
    setattr(signed, field, value)
    assert AgentMessageVerifier(lambda: ring).check(signed) is not None


def test_outsiders_tiny_rings_and_stale_rings_are_refused():
    members = [RingKeyPair.generate() for _ in range(3)]
    ring = _ring(members)
    with pytest.raises(ValueError):  # a key outside the ring cannot sign
        sign_agent_message(_message(), ring, RingKeyPair.generate())
    with pytest.raises(AnonymityError):
        sign_agent_message(_message(), _ring(members[:1]), members[0])
    signed = sign_agent_message(_message(), ring, members[0])
    newer = _ring([*members, RingKeyPair.generate()])  # the registry grew since
    assert "current registry ring" in AgentMessageVerifier(lambda: newer).check(signed)
    signed.ring_signature = signed.ring_signature[:-1]
    assert "malformed" in AgentMessageVerifier(lambda: ring).check(signed)
