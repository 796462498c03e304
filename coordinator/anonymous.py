"""Anonymous update submission: the coordinator learns "some node of the ring sent this",
and that no ring member sent two updates in one round, but not which member it was.

A node fetches a fresh single-use challenge, ring-signs (challenge, job, round, ring epoch,
set index, example count, payload hash) with a linkable ring signature whose link tag is scoped
to (job, round), and streams the header and its update on a call of its own, outside its
identified session. The signature is over the node's anonymity set: one of the sets of at
least k keys that the round's ring (the ring keys of the nodes selected for the round) is
partitioned into (``protos.anonymity_sets``), so checking it costs O(k), not O(n). The
coordinator checks the signature against the set the header names, the nonce (fresh, unused,
unexpired) and the link tag (first use in this round: the tag depends on the key and the
round, not on the set, so a second update signed over another set links too), then files the
update under its link tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from confide.privacy.ringsig import RingSignature, RingSignatureError, ValidatedRing, verify
from confide.protos.anonymity_sets import DEFAULT_ANONYMITY_SET, anonymity_sets
from confide.protos.codec import WireTensor
from confide.protos.identity import anonymous_scope, anonymous_update_message, ring_epoch_id
from confide.protos.stream import stream_digest
from confide.v1 import coordinator_pb2 as pb

CHALLENGE_TTL_S = 120.0
MAX_OUTSTANDING_CHALLENGES = 100_000


class AnonymousRejected(Exception):
    """Why an anonymous submission was refused (sent back as UNAUTHENTICATED et al.)."""

    def __init__(self, message: str, code: str = "UNAUTHENTICATED") -> None:
        super().__init__(message)
        self.code = code


class ChallengeBook:
    """Single-use nonces with an expiry, kept without per-challenge state: a nonce is
    16 random bytes, its expiry (8 bytes, ms) and an HMAC of both under a key of this
    process (8 bytes), so issuing costs no memory and a flood of GetChallenge calls cannot
    crowd out honest ones. Only *spent* nonces are remembered, until they expire, so a
    replayed submission finds its nonce spent. A coordinator restart invalidates the
    outstanding ones (a node fetches a fresh challenge per upload)."""

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._key = os.urandom(32)
        self._spent: dict[bytes, float] = {}

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:8]

    def issue(self) -> pb.Challenge:
        expires_ms = int((time.time() + self.ttl_s) * 1000)
        body = os.urandom(16) + expires_ms.to_bytes(8, "big")
        return pb.Challenge(nonce=body + self._tag(body), expires_ms=expires_ms)

    def spend(self, nonce: bytes) -> None:
        body, tag = nonce[:24], nonce[24:]
        if len(nonce) != 32 or not hmac.compare_digest(tag, self._tag(body)):
            raise AnonymousRejected("unknown challenge (not issued by this coordinator, or "
                                    "issued before a restart); call GetChallenge for a fresh "
                                    "one")
        now_ms = time.time() * 1000
        expires_ms = int.from_bytes(body[16:24], "big")
        if expires_ms < now_ms:
            raise AnonymousRejected("challenge expired; call GetChallenge again")
        if nonce in self._spent:
            raise AnonymousRejected("challenge already used (replay?); call GetChallenge for "
                                    "a fresh one")
        if len(self._spent) >= MAX_OUTSTANDING_CHALLENGES:
            self._spent = {n: t for n, t in self._spent.items() if t > now_ms}
            if len(self._spent) >= MAX_OUTSTANDING_CHALLENGES:
                raise AnonymousRejected("too many uploads in flight; retry later",
                                        "RESOURCE_EXHAUSTED")
        self._spent[nonce] = expires_ms


@dataclass
class AnonymousUpdate:
    key_image: bytes
    payload: dict[str, WireTensor]
    num_examples: int
    bytes_up: int = 0
    #: what checking it cost the coordinator (wall and this thread's CPU seconds)
    verify_s: float = 0.0
    verify_cpu_s: float = 0.0


@dataclass
class AnonymousInbox:
    """Verified anonymous updates per (job, round), keyed by link tag."""

    _updates: dict[tuple[str, int], dict[bytes, AnonymousUpdate]] = field(
        default_factory=lambda: defaultdict(dict))
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: (job, round) -> how many uploads it takes: the round being collected, nothing else
    _open: dict[tuple[str, int], int] = field(default_factory=dict)
    #: (job, round) -> (ring epoch, k, its anonymity sets, the sets checked so far): a
    #: round's partition is computed once and each set's keys are validated once
    _sets: dict[tuple[str, int], tuple[str, int, list[list[int]], dict[int, ValidatedRing]]] = (
        field(default_factory=dict))

    def open_round(self, job_id: str, round_number: int, limit: int) -> None:
        """Accept uploads for this round of the job, at most ``limit`` (the nodes selected):
        an upload for another round, or one too many, is refused."""
        for key in [k for k in self._open if k[0] == job_id]:
            del self._open[key]
        self._open[(job_id, round_number)] = limit

    def forget(self, job_id: str) -> None:
        """The job ended: drop whatever it left behind."""
        for key in [k for k in self._open if k[0] == job_id]:
            del self._open[key]
        for key in [k for k in self._updates if k[0] == job_id]:
            del self._updates[key]
        for key in [k for k in self._sets if k[0] == job_id]:
            del self._sets[key]

    def signing_set(self, job_id: str, round_number: int, ring: list[bytes], set_size: int,
                    index: int) -> ValidatedRing:
        """Anonymity set ``index`` of the round, as a ring whose keys are checked once: the
        partition is computed once per round, each set's keys validated on its first use."""
        key, epoch = (job_id, round_number), ring_epoch_id(ring)
        cached = self._sets.get(key)
        if cached is None or cached[:2] != (epoch, set_size):
            try:
                members = anonymity_sets(ring, set_size, job_id, round_number)
            except ValueError as exc:
                raise AnonymousRejected(f"round {round_number}'s ring cannot be used: {exc}",
                                        "FAILED_PRECONDITION") from None
            for old in [k for k in self._sets if k[0] == job_id]:
                del self._sets[old]  # one round of a job at a time
            cached = self._sets[key] = (epoch, set_size, members, {})
        _, _, members, checked = cached
        if index >= len(members):
            raise AnonymousRejected(f"set_index {index}: round {round_number} has "
                                    f"{len(members)} anonymity set(s)", "INVALID_ARGUMENT")
        if index not in checked:
            try:
                checked[index] = ValidatedRing([ring[i] for i in members[index]])
            except RingSignatureError as exc:
                raise AnonymousRejected(f"anonymity set {index} cannot be used: {exc}",
                                        "FAILED_PRECONDITION") from None
        return checked[index]

    async def wait_for(self, job_id: str, round_number: int, count: int,
                       timeout: float) -> int:
        """Wait until ``count`` updates of the round are filed or ``timeout`` passes: nodes
        say "done" on their sessions *before* they upload, after a random delay, so the
        round has to wait for the uploads. Returns how many arrived."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while self.count(job_id, round_number) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.count(job_id, round_number)

    def verify_and_file(self, header: pb.AnonymousUpdateHeader,
                        payload: dict[str, WireTensor], ring: list[bytes],
                        challenges: ChallengeBook, wire_bytes: int = 0,
                        set_size: int = DEFAULT_ANONYMITY_SET,
                        payload_sha256: bytes | None = None) -> bytes:
        """Check everything about one submission; file it; return its link tag. ``ring`` is
        the round's ring, ``set_size`` the job's k; ``payload_sha256`` the SHA-256 its stream
        ended with (checked against the signed one): the signature is checked against the one
        anonymity set the header names, O(k) whatever the ring's size."""
        started, started_cpu = time.perf_counter(), time.thread_time()
        if not ring:
            raise AnonymousRejected(f"job {header.job_id} has no ring for round "
                                    f"{header.round} (not anonymous, or not that round)",
                                    "FAILED_PRECONDITION")
        if header.epoch_id != ring_epoch_id(ring):
            raise AnonymousRejected("ring epoch mismatch: fetch the round's ring again")
        key = (header.job_id, header.round)
        if key not in self._open:
            raise AnonymousRejected(f"job {header.job_id} is not collecting updates for round "
                                    f"{header.round}", "FAILED_PRECONDITION")
        if len(self._updates.get(key, {})) >= self._open[key]:
            raise AnonymousRejected(f"round {header.round} already has an update from every "
                                    "selected node", "RESOURCE_EXHAUSTED")
        if payload_sha256 is None:
            payload_sha256 = stream_digest(payload)
        if payload_sha256 != header.payload_sha256:
            raise AnonymousRejected("payload does not match the signed hash",
                                    "INVALID_ARGUMENT")
        signers = self.signing_set(header.job_id, header.round, ring, set_size,
                                   header.set_index)
        challenges.spend(header.nonce)
        try:
            signature = RingSignature.decode(header.signature, len(signers))
        except RingSignatureError as exc:
            raise AnonymousRejected(f"malformed ring signature: {exc}") from None
        message = anonymous_update_message(header.nonce, header.job_id, header.round,
                                           header.epoch_id, header.set_index,
                                           header.num_examples, header.payload_sha256)
        scope = anonymous_scope(header.job_id, header.round)
        if not verify(message, signers, signature, scope):
            raise AnonymousRejected(f"ring signature does not verify against anonymity set "
                                    f"{header.set_index} of the round's ring")
        filed = self._updates[(header.job_id, header.round)]
        if signature.key_image in filed:
            raise AnonymousRejected("this ring member already submitted an update in this "
                                    "round (same link tag)", "ALREADY_EXISTS")
        filed[signature.key_image] = AnonymousUpdate(
            signature.key_image, payload, int(header.num_examples), wire_bytes,
            time.perf_counter() - started, time.thread_time() - started_cpu)
        self._arrived.set()
        return signature.key_image

    def take(self, job_id: str, round_number: int) -> list[AnonymousUpdate]:
        """The round's updates; the round is closed to further uploads."""
        self._open.pop((job_id, round_number), None)
        self._sets.pop((job_id, round_number), None)
        return list(self._updates.pop((job_id, round_number), {}).values())

    def count(self, job_id: str, round_number: int) -> int:
        return len(self._updates.get((job_id, round_number), {}))
