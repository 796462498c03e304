"""Anonymous update submission: the coordinator learns "some node of the ring sent this",
and that no ring member sent two updates in one round, but not which member it was.

A node fetches a fresh single-use challenge, ring-signs (challenge, job, round, ring epoch,
example count, payload hash) with a linkable ring signature whose link tag is scoped to
(job, round), and streams the header and its update on a call of its own, outside its
identified session. The coordinator checks the signature against the job's ring, the nonce
(fresh, unused, unexpired) and the link tag (first use in this round), then files the update
under its link tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from privacy.ringsig import RingSignature, RingSignatureError, verify
from protos.confide.v1 import coordinator_pb2 as pb
from protos.identity import anonymous_scope, anonymous_update_message, ring_epoch_id

CHALLENGE_TTL_S = 120.0
MAX_OUTSTANDING_CHALLENGES = 100_000


class AnonymousRejected(Exception):
    """Why an anonymous submission was refused (sent back as UNAUTHENTICATED et al.)."""

    def __init__(self, message: str, code: str = "UNAUTHENTICATED") -> None:
        super().__init__(message)
        self.code = code


class ChallengeBook:
    """Single-use nonces with an expiry: a replayed submission finds its nonce spent."""

    def __init__(self, ttl_s: float = CHALLENGE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._open: dict[bytes, float] = {}

    def issue(self) -> pb.Challenge:
        now = time.monotonic()
        if len(self._open) >= MAX_OUTSTANDING_CHALLENGES:
            self._open = {n: t for n, t in self._open.items() if t > now}
            if len(self._open) >= MAX_OUTSTANDING_CHALLENGES:
                raise AnonymousRejected("too many outstanding challenges; retry later",
                                        "RESOURCE_EXHAUSTED")
        nonce = os.urandom(32)
        self._open[nonce] = now + self.ttl_s
        return pb.Challenge(nonce=nonce, expires_ms=int((time.time() + self.ttl_s) * 1000))

    def spend(self, nonce: bytes) -> None:
        expires = self._open.pop(nonce, None)
        if expires is None:
            raise AnonymousRejected("unknown or already used challenge (replay?); "
                                    "call GetChallenge for a fresh one")
        if expires < time.monotonic():
            raise AnonymousRejected("challenge expired; call GetChallenge again")


@dataclass
class AnonymousUpdate:
    key_image: bytes
    payload: bytes
    num_examples: int
    bytes_up: int = 0


@dataclass
class AnonymousInbox:
    """Verified anonymous updates per (job, round), keyed by link tag."""

    _updates: dict[tuple[str, int], dict[bytes, AnonymousUpdate]] = field(
        default_factory=lambda: defaultdict(dict))
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

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

    def verify_and_file(self, header: pb.AnonymousUpdateHeader, payload: bytes,
                        ring: list[bytes], challenges: ChallengeBook,
                        wire_bytes: int = 0) -> bytes:
        """Check everything about one submission; file it; return its link tag."""
        if not ring:
            raise AnonymousRejected(f"job {header.job_id} has no ring (not anonymous?)",
                                    "FAILED_PRECONDITION")
        if header.epoch_id != ring_epoch_id(ring):
            raise AnonymousRejected("ring epoch mismatch: fetch the job's ring again")
        if hashlib.sha256(payload).digest() != header.payload_sha256:
            raise AnonymousRejected("payload does not match the signed hash",
                                    "INVALID_ARGUMENT")
        challenges.spend(header.nonce)
        try:
            signature = RingSignature.decode(header.signature, len(ring))
        except RingSignatureError as exc:
            raise AnonymousRejected(f"malformed ring signature: {exc}") from None
        message = anonymous_update_message(header.nonce, header.job_id, header.round,
                                           header.epoch_id, header.num_examples,
                                           header.payload_sha256)
        scope = anonymous_scope(header.job_id, header.round)
        if not verify(message, ring, signature, scope):
            raise AnonymousRejected("ring signature does not verify against the job's ring")
        filed = self._updates[(header.job_id, header.round)]
        if signature.key_image in filed:
            raise AnonymousRejected("this ring member already submitted an update in this "
                                    "round (same link tag)", "ALREADY_EXISTS")
        filed[signature.key_image] = AnonymousUpdate(signature.key_image, payload,
                                                     int(header.num_examples), wire_bytes)
        self._arrived.set()
        return signature.key_image

    def take(self, job_id: str, round_number: int) -> list[AnonymousUpdate]:
        return list(self._updates.pop((job_id, round_number), {}).values())

    def count(self, job_id: str, round_number: int) -> int:
        return len(self._updates.get((job_id, round_number), {}))
