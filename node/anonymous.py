"""The node's side of anonymous actions: update submission, and agent messages.

The update leaves on a call of its own, on a fresh channel, carrying no node id: only a
linkable ring signature over the node's anonymity set, one of the sets of at least k keys the
round's ring (the ring keys of the nodes selected for the round) is partitioned into. The node
checks the ring it is shown contains its own key (else it would be signing into a ring the
coordinator made up), that the published sets follow the public rule
(``protos.anonymity_sets``: the coordinator cannot hand it a smaller or hand-picked set) and
that its set is not trivially small, then signs the exact bytes of ``protos.identity`` over
its set.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from confide.privacy.ringsig import (
    RingKeyPair,
    RingSignature,
    RingSignatureError,
    ValidatedRing,
    sign,
    verify,
)
from confide.protos.anonymity_sets import anonymity_sets, set_of, set_size
from confide.protos.codec import WireTensor
from confide.protos.identity import (
    agent_message_bytes,
    agent_message_scope,
    anonymous_scope,
    anonymous_update_message,
    ring_epoch_id,
)
from confide.protos.stream import stream_digest, stream_tensor_map
from confide.protos.tls import PROCESS as TLS_PROCESS
from confide.protos.tls import TLSChoice, aio_channel
from confide.protos.tls import active as tls_active
from confide.v1 import coordinator_pb2 as pb
from confide.v1 import coordinator_pb2_grpc as pb_grpc
from confide.v1 import node_pb2

MIN_RING_SIZE = 2


class AnonymityError(RuntimeError):
    """The node refuses to submit: the ring would not hide it."""


def load_or_create_ring_key(path: Path) -> RingKeyPair:
    """The node's ring key, from a 32-byte seed file readable only by its owner."""
    path = Path(path)
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} must hold a 32-byte seed")
        return RingKeyPair.from_seed(seed)
    seed = os.urandom(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(seed)
    return RingKeyPair.from_seed(seed)


@dataclass(frozen=True)
class SigningSet:
    """The anonymity set a node signs over: its index in the round and its keys (ring order)."""

    index: int
    keys: list[bytes]


def check_ring(ring: pb.Ring, key: RingKeyPair, anonymity_set: int | None = None,
               job_id: str | None = None, round_number: int | None = None) -> SigningSet:
    """This node's anonymity set, once the round's ring is sure to hide it: the ring holds the
    node's key (else it would be signing into a ring the coordinator made up), its epoch id
    matches its keys, it is the ring of this job and round, its k is the job's
    (``anonymity_set``, the task's spec value) and its published sets are exactly the public
    rule's, and the node's set has at least two keys."""
    keys = list(ring.public_keys)
    if key.public not in keys:
        raise AnonymityError("the ring does not contain this node's ring key")
    if len(keys) < MIN_RING_SIZE:
        raise AnonymityError(f"a ring of {len(keys)} key(s) hides nobody")
    if ring.epoch_id != ring_epoch_id(keys):
        raise AnonymityError("the ring's epoch id does not match its keys")
    if (job_id, round_number) != (None, None) and (ring.job_id, ring.round) != (job_id,
                                                                              round_number):
        raise AnonymityError(f"the coordinator sent the ring of {ring.job_id} round "
                             f"{ring.round}, not of this task ({job_id} round {round_number})")
    if anonymity_set is not None and ring.anonymity_set != set_size(anonymity_set):
        raise AnonymityError(f"the ring's anonymity sets are for k = {ring.anonymity_set}, "
                             f"the job asks k = {set_size(anonymity_set)}")
    try:
        expected = anonymity_sets(keys, ring.anonymity_set, ring.job_id, ring.round)
    except ValueError as exc:
        raise AnonymityError(f"the ring's anonymity sets: {exc}") from None
    if [list(s.members) for s in ring.sets] != expected:
        raise AnonymityError("the coordinator's anonymity sets do not follow the public rule "
                             "(protos.anonymity_sets): refusing to sign over a set it chose")
    index = set_of(expected, keys.index(key.public))
    members = [keys[i] for i in expected[index]]
    if len(members) < MIN_RING_SIZE:
        raise AnonymityError(f"an anonymity set of {len(members)} key(s) hides nobody")
    try:
        ValidatedRing(members)
    except RingSignatureError as exc:
        raise AnonymityError(f"this node's anonymity set cannot be signed over: {exc}") from None
    return SigningSet(index, members)


def _anonymous_tls(tls: TLSChoice, dedicated_port: bool):
    config = tls_active() if tls is ... else tls
    if config is not None and not dedicated_port:
        raise AnonymityError("TLS is on and no anonymous port is configured (node serve "
                             "--anonymous-coordinator, coordinator serve --anonymous-listen): "
                             "an upload on the mutual-TLS port would carry this node's "
                             "certificate")
    return config


async def fetch_ring(coordinator: str, key: RingKeyPair, job_id: str, round_number: int,
                     channel_options: list | None = None, *, tls: TLSChoice = TLS_PROCESS,
                     dedicated_port: bool = False, anonymity_set: int | None = None) -> pb.Ring:
    """The round's ring, checked (``check_ring``, with the job's ``anonymity_set`` when
    given): a node looks before it says "done", so a node outside the ring, or shown sets
    that break the rule, fails its task at once instead of leaving the round waiting."""
    config = _anonymous_tls(tls, dedicated_port)
    async with aio_channel(coordinator, channel_options, tls=config,
                           client_cert=False) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        ring = await stub.GetRing(pb.GetRingRequest(job_id=job_id, round=round_number),
                                  timeout=30)
    check_ring(ring, key, anonymity_set, job_id, round_number)
    return ring


async def submit_anonymously(coordinator: str, key: RingKeyPair, task: pb.Task,
                             payload: Mapping[str, WireTensor], num_examples: int,
                             channel_options: list | None = None, *,
                             tls: TLSChoice = TLS_PROCESS, dedicated_port: bool = False,
                             ring: pb.Ring | None = None) -> bytes:
    """Ring-sign and upload ``payload`` for ``task`` (over ``ring``, fetched if not given);
    returns the link tag the coordinator filed it under.

    Under TLS the upload never presents the node's certificate (it names the node): it goes
    with server-only TLS to the coordinator's anonymous port (``dedicated_port``: the node's
    ``--anonymous-coordinator``), since the main port requires client certificates."""
    config = _anonymous_tls(tls, dedicated_port)
    async with aio_channel(coordinator, channel_options, tls=config,
                           client_cert=False) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        if ring is None:
            ring = await stub.GetRing(pb.GetRingRequest(job_id=task.job_id, round=task.round),
                                      timeout=30)
        signers = check_ring(ring, key, task.spec.anonymity_set, task.job_id, task.round)
        challenge = await stub.GetChallenge(pb.GetChallengeRequest(), timeout=30)
        header = signed_update_header(key, task.job_id, task.round, ring, signers,
                                      challenge.nonce, stream_digest(payload), num_examples)

        async def messages() -> AsyncIterator[pb.AnonymousUpdateMessage]:
            yield pb.AnonymousUpdateMessage(header=header)
            # a random transfer id: the task id would tell the coordinator who this is
            for chunk in stream_tensor_map(payload, header.payload_sha256.hex()[:32]):
                yield pb.AnonymousUpdateMessage(chunk=chunk)

        ack = await stub.SubmitAnonymousUpdate(messages(), timeout=max(task.deadline_s, 30))
        return ack.key_image


def signed_update_header(key: RingKeyPair, job_id: str, round_number: int, ring: pb.Ring,
                         signers: SigningSet, nonce: bytes, digest: bytes,
                         num_examples: int) -> pb.AnonymousUpdateHeader:
    """The header of an anonymous update: the exact bytes of ``protos.identity`` ring-signed
    over the node's anonymity set (``signers``, from :func:`check_ring`); ``digest`` is the
    SHA-256 of the update's tensor-map stream (``protos.stream.stream_digest``)."""
    message = anonymous_update_message(nonce, job_id, round_number, ring.epoch_id,
                                       signers.index, num_examples, digest)
    signature = sign(message, signers.keys, key, anonymous_scope(job_id, round_number))
    return pb.AnonymousUpdateHeader(
        job_id=job_id, round=round_number, epoch_id=ring.epoch_id, nonce=nonce,
        num_examples=num_examples, payload_sha256=digest, signature=signature.encode(),
        set_index=signers.index)


# ------------------------------------------------------------------ anonymous agent messages


def sign_agent_message(envelope: node_pb2.AgentEnvelope, ring: pb.Ring,
                       key: RingKeyPair) -> node_pb2.AgentEnvelope:
    """A copy of ``envelope`` without a sender, ring-signed over the registry ring: the
    receiver learns "some registered node sent this", not which."""
    keys = list(ring.public_keys)
    if len(keys) < MIN_RING_SIZE:
        raise AnonymityError(f"a ring of {len(keys)} key(s) hides nobody")
    if ring.epoch_id != ring_epoch_id(keys):
        raise AnonymityError("the ring's epoch id does not match its keys")
    signed = node_pb2.AgentEnvelope()
    signed.CopyFrom(envelope)
    signed.sender = ""
    signed.anonymous = True
    signed.ring_epoch = ring.epoch_id
    signed.nonce = os.urandom(32)
    message = agent_message_bytes(signed.nonce, signed.ring_epoch, signed.task_kind,
                                  signed.protocol_hash, signed.body, signed.text)
    signed.ring_signature = sign(message, keys, key, agent_message_scope(signed.nonce)).encode()
    return signed


class AgentMessageVerifier:
    """The receiving node's check of an anonymous agent message: the signature against the
    registry ring of the epoch it names (fetched from the coordinator, cached; refetched at
    most every ``refetch_s`` seconds, so messages naming made-up epochs cannot make the node
    flood the coordinator), and a nonce never seen before (a bounded memory of recent
    nonces: a replay is refused)."""

    def __init__(self, fetch_ring, max_nonces: int = 100_000, refetch_s: float = 10.0) -> None:
        self._fetch_ring = fetch_ring  # () -> pb.Ring (the current registry ring)
        self._ring: pb.Ring | None = None
        self._fetched_at = -float("inf")
        self._seen: dict[bytes, None] = {}
        self.max_nonces = max_nonces
        self.refetch_s = refetch_s
        self._lock = threading.Lock()  # messages are checked in worker threads

    def _current_ring(self, epoch: str) -> pb.Ring | None:
        with self._lock:
            ring, fetched_at = self._ring, self._fetched_at
        if ring is not None and ring.epoch_id == epoch:
            return ring
        if time.monotonic() - fetched_at < self.refetch_s:
            return ring  # fetched recently: the message's epoch is simply not current
        fresh = self._fetch_ring()  # outside the lock: a slow coordinator blocks no one else
        with self._lock:
            self._ring, self._fetched_at = fresh, time.monotonic()
        return fresh

    def check(self, envelope: node_pb2.AgentEnvelope) -> str | None:
        """None when the message is genuine; otherwise why it is refused."""
        if envelope.sender:
            return "an anonymous message must not name its sender"
        if len(envelope.nonce) != 32:
            return "an anonymous message needs a 32-byte nonce"
        ring = self._current_ring(envelope.ring_epoch)
        if ring is None or ring.epoch_id != envelope.ring_epoch:
            return "signed over a ring that is not the coordinator's current registry ring"
        keys = list(ring.public_keys)
        try:
            signature = RingSignature.decode(envelope.ring_signature, len(keys))
        except RingSignatureError as exc:
            return f"malformed ring signature: {exc}"
        message = agent_message_bytes(envelope.nonce, envelope.ring_epoch, envelope.task_kind,
                                      envelope.protocol_hash, envelope.body, envelope.text)
        if not verify(message, keys, signature, agent_message_scope(envelope.nonce)):
            return "the ring signature does not verify"
        with self._lock:
            if envelope.nonce in self._seen:
                return "this nonce was used before (replay)"
            self._seen[envelope.nonce] = None
            while len(self._seen) > self.max_nonces:
                self._seen.pop(next(iter(self._seen)))
        return None
