"""SecAgg+ as two explicit state machines: :class:`SecAggClient` (a node) and
:class:`SecAggServer` (the coordinator), one pair per (job, round). Transport-free: each method
takes a parsed message and returns the message(s) to send; the round engine moves the bytes.

Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020 (SecAgg+); with the complete graph it is Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (semi-honest variant, without the
consistency-check round). Node ``i``'s *neighbours* ``N(i)`` come from a public graph; its *share
group* is ``G(i) = N(i) + {i}`` (it keeps its own share, as in Bonawitz et al., so a small complete
round survives a dropout). Shamir points are ``1 + position`` in ``Setup.participants``.

Phases (server call -> what it returns; client call -> what it returns)::

    0 setup      server = SecAggServer.new_round(...)      -> server.setup (Setup, to all)
    1 advertise  client.handle_setup(setup)                 -> AdvertiseKeys
                 server.receive_advertisement(m) ...; server.close_advertising()
                                                            -> {node: KeyBundle}
    2 share keys client.handle_key_bundle(bundle)           -> ShareKeys
                 server.receive_shares(m) ...; server.close_sharing()
                                                            -> {node: ForwardedShares}
    3 masked in. client.handle_forwarded_shares(fwd, x, w)  -> MaskedInput
                 server.receive_masked_input(m) ...; server.close_masking()
                                                            -> UnmaskRequest (to survivors)
    4 unmasking  client.handle_unmask_request(req)          -> UnmaskResponse
                 server.receive_unmask(m) ...; server.finish() -> AggregateResult

``close_*`` is what the round engine calls when everyone answered or the phase's deadline passed:
whoever did not answer has dropped. Each raises :class:`SecAggAbort` when fewer than ``t`` nodes
are left; ``finish`` raises it when any needed secret lacks ``t`` shares, before unmasking
anything. A bad message raises :class:`SecAggProtocolError` (reject it, the round goes on); an
honest client raises :class:`SecAggRefused` rather than reveal both shares of one peer or answer
for another job or round.

Per phase, node ``i``:
1. makes X25519 key pairs ``(c_sk, c_pk)`` (encryption) and ``(s_sk, s_pk)`` (masking) and signs
   :func:`advertisement_payload` ``(job, round, i, c_pk, s_pk)`` with the caller's ``sign``
   (its Ed25519 node key; the key never enters this module).
2. checks every neighbour's advertisement with the caller's ``verify(node_id, payload, sig)``,
   draws the self-mask seed ``b_i``, Shamir-shares ``b_i`` and ``s_sk_i`` (threshold ``t``) over
   the share group, and seals the pair of shares to each neighbour ``j`` with ChaCha20-Poly1305,
   key ``HKDF(X25519(c_sk_i, c_pk_j), info = job, round, i, j)``, associated data the same
   binding: a share replayed from another job, round or pair does not open.
3. opens the shares it received (their senders are ``U2``, those still in), and sends
   ``y_i = encode(w_i x_i, w_i) + PRG(b_i) + sum_{j in U2 n N(i)} sign(i,j) PRG(s_ij)`` with
   ``s_ij = HKDF(X25519(s_sk_i, s_pk_j), info = job, round, {i, j})``.
4. given the survivors ``U3`` (it must be one, and ``|U3| >= t``), reveals for each ``j`` in
   ``U2 n G(i)`` the share of ``b_j`` if ``j`` in ``U3`` else the share of ``s_sk_j``; never both
   kinds for one ``j`` (a second request that would flip a kind raises :class:`SecAggRefused`).

The server reconstructs ``b_j`` for every survivor and ``s_sk_j`` for every node that dropped
after sharing (checked against the advertised ``s_pk_j``), and returns
``sum_{i in U3} y_i - PRG(b_i) - (masks shared with dropped nodes)``: exactly the sum of the
survivors' encoded inputs. Thresholds: ``t`` must exceed half the share group (``t > (k+1)/2``),
so that shares of ``b_j`` and of ``s_sk_j`` cannot both reach ``t`` when every honest node reveals
only one kind (the double-reveal rule); clients refuse a setup with a lower ``t``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confide.privacy.secagg import shamir
from confide.privacy.secagg.distributed_dp import DistributedGaussian
from confide.privacy.secagg.errors import SecAggAbort, SecAggProtocolError, SecAggRefused
from confide.privacy.secagg.masking import (
    FixedPointCodec,
    MaskingError,
    pairwise_sign,
    prg_ring_elements,
)
from confide.privacy.secagg.messages import (
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SELF_SEED,
    AdvertiseKeys,
    ForwardedShares,
    KeyBundle,
    MaskedInput,
    RevealedShare,
    SealedShare,
    Setup,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

__all__ = [
    "AggregateResult",
    "CostCounters",
    "SecAggClient",
    "SecAggServer",
    "Signer",
    "Verifier",
    "advertisement_payload",
    "codec_of",
    "default_degree",
    "default_threshold",
    "neighbour_graph",
    "open_shares",
    "seal_shares",
    "validate_setup",
]

Signer = Callable[[bytes], bytes]
"""Signs bytes with the node's own key (Ed25519 in Confide); supplied by the node daemon."""
Verifier = Callable[[str, bytes, bytes], bool]
"""``verify(node_id, payload, signature)`` against ``node_id``'s registered key."""

_DOMAIN_ADVERTISE = b"confide/secagg/v1/advertise\x00"
_DOMAIN_SHARE_KEY = b"confide/secagg/v1/share-key\x00"
_DOMAIN_SHARE_AD = b"confide/secagg/v1/share-ad\x00"
_DOMAIN_MASK = b"confide/secagg/v1/pairwise-mask\x00"
_DOMAIN_GRAPH = b"confide/secagg/v1/graph\x00"
_ZERO_NONCE = bytes(12)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _binding(job_id: str, round_: int, *ids: str) -> bytes:
    return _lp(job_id.encode()) + round_.to_bytes(8, "big") + b"".join(_lp(i.encode())
                                                                       for i in ids)


def advertisement_payload(job_id: str, round_: int, sender: str, c_pk: bytes,
                          s_pk: bytes) -> bytes:
    """The bytes a node signs in phase 1 (and a verifier checks): domain, job, round, sender,
    both public keys."""
    return _DOMAIN_ADVERTISE + _binding(job_id, round_, sender) + c_pk + s_pk


# ---------------------------------------------------------------- graph and parameters


def default_degree(n: int, expected_dropout: float = 0.0, max_failure: float = 1e-3) -> int:
    """Neighbours per node: the complete graph (n - 1) for small rounds, else an even degree of
    at least ``3 log2 n`` (SecAgg+ takes O(log n); at n=100 this is 20), raised until the round
    survives ``expected_dropout`` (each node independently gone by unmasking) with probability
    ``>= 1 - max_failure``: by a union bound over the n share groups,
    ``n * P(Binomial(k + 1, 1 - dropout) < t) <= max_failure`` with ``t`` the majority
    threshold. A majority threshold makes heavy dropout expensive: at n=100, 10% needs k=20
    but 30% needs the complete graph (which then fails with probability ~1e-3)."""
    if n < 2:
        return 0
    if not 0.0 <= expected_dropout < 1.0:
        raise ValueError("expected_dropout is a probability below 1")
    k = 2 * math.ceil(1.5 * math.log2(n))
    while k < n - 1 and n * _group_failure(k, expected_dropout) > max_failure:
        k += 2
    return n - 1 if k >= n - 1 else k


def _group_failure(degree: int, dropout: float) -> float:
    """``P(Binomial(k + 1, 1 - dropout) < t)``: a share group left with fewer than t members."""
    m, t, alive = degree + 1, default_threshold(degree), 1.0 - dropout
    return sum(math.comb(m, s) * alive**s * dropout ** (m - s) for s in range(t))


def default_threshold(degree: int) -> int:
    """The smallest threshold the double-reveal rule allows: a majority of the share group."""
    return (degree + 1) // 2 + 1


def neighbour_graph(participants: Sequence[str], degree: int,
                    graph_seed: bytes) -> dict[str, frozenset[str]]:
    """The public neighbour graph: complete if ``degree >= n - 1``, else the Harary graph
    ``H_{k,n}`` (each node linked to the ``k/2`` nearest on each side of a ring) over the
    participants ordered by ``SHA-256(seed, id)``, i.e. a random ring from a public seed.
    Everyone computes it from the Setup, so the server cannot show nodes different graphs."""
    ids = list(participants)
    n = len(ids)
    if degree >= n - 1:
        return {p: frozenset(q for q in ids if q != p) for p in ids}
    if degree % 2:
        raise SecAggProtocolError("a sparse neighbour graph needs an even degree")
    ring = sorted(ids, key=lambda p: hashlib.sha256(_DOMAIN_GRAPH + graph_seed
                                                    + _lp(p.encode())).digest())
    half = degree // 2
    return {p: frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d)
            for pos, p in enumerate(ring)}


def validate_setup(setup: Setup) -> None:
    """What both sides check before taking part: sizes, an even sparse degree, and
    ``(k+1)/2 < t <= k+1`` (the double-reveal rule needs a majority threshold)."""
    n = len(setup.participants)
    if n < 2:
        raise SecAggProtocolError("secure aggregation needs at least 2 participants")
    if not 1 <= setup.degree <= n - 1:
        raise SecAggProtocolError(f"degree {setup.degree} outside 1..{n - 1}")
    if setup.degree < n - 1 and setup.degree % 2:
        raise SecAggProtocolError("a sparse neighbour graph needs an even degree")
    group = setup.degree + 1
    if not group // 2 < setup.threshold <= group or setup.threshold < 2:
        raise SecAggProtocolError(
            f"threshold {setup.threshold} must be a majority of the share group of {group} "
            f"(> {group // 2}) and at most {group}")
    try:
        codec_of(setup)
    except MaskingError as e:
        raise SecAggProtocolError(f"unusable encoding: {e}") from e


def codec_of(setup: Setup) -> FixedPointCodec:
    """The fixed-point codec a Setup fixes (its overflow bound uses all participants)."""
    return FixedPointCodec(setup.bits, setup.frac_bits, setup.clip, setup.max_weight,
                           len(setup.participants))


# ---------------------------------------------------------------- primitives


@dataclass
class CostCounters:
    """What a party spent: tests assert SecAgg+'s scaling with these, benchmarks report them."""

    key_agreements: int = 0
    prg_expansions: int = 0
    aead_operations: int = 0
    shamir_splits: int = 0
    shamir_combines: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, start: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _agree(private: X25519PrivateKey, public: bytes, counters: CostCounters) -> bytes:
    counters.key_agreements += 1
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # a small-order public key gives the all-zero secret
        raise SecAggProtocolError("a public key gives a degenerate key agreement") from e


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _pair_mask_seed(agreement: bytes, job_id: str, round_: int, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _hkdf(agreement, _DOMAIN_MASK + _binding(job_id, round_, lo, hi))


def seal_shares(agreement: bytes, job_id: str, round_: int, sender: str, receiver: str,
                plaintext: bytes) -> bytes:
    """ChaCha20-Poly1305 under ``HKDF(agreement, job, round, sender, receiver)`` with the same
    binding as associated data. The key is unique per directed pair and round (fresh c keys),
    so the zero nonce is used once per key."""
    binding = _binding(job_id, round_, sender, receiver)
    key = _hkdf(agreement, _DOMAIN_SHARE_KEY + binding)
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, _DOMAIN_SHARE_AD + binding)


def open_shares(agreement: bytes, job_id: str, round_: int, sender: str, receiver: str,
                ciphertext: bytes) -> bytes:
    """Inverse of :func:`seal_shares`; raises :class:`SecAggProtocolError` if the ciphertext
    was made for another job, round, pair or key, or was altered."""
    binding = _binding(job_id, round_, sender, receiver)
    key = _hkdf(agreement, _DOMAIN_SHARE_KEY + binding)
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, _DOMAIN_SHARE_AD + binding)
    except InvalidTag as e:
        raise SecAggProtocolError(f"the share from {sender} does not open for {receiver} in "
                                  f"job {job_id!r} round {round_} (replayed or forged)") from e


def _private_from_seed(seed: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(seed)


def _public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


# ---------------------------------------------------------------- client


class SecAggClient:
    """A node's side of one (job, round). Methods must be called in phase order; each checks
    the message's job, round and addressee and the phase, and raises otherwise."""

    def __init__(self, node_id: str, sign: Signer, verify: Verifier) -> None:
        self.node_id = node_id
        self._sign = sign
        self._verify = verify
        self.counters = CostCounters()
        self._phase = "new"
        self._setup: Setup | None = None
        self._revealed: dict[str, int] = {}
        self._response: UnmaskResponse | None = None

    # -- helpers
    def _expect(self, phase: str, job_id: str, round_: int, addressee: str | None) -> Setup:
        if self._setup is not None and (job_id, round_) != (self._setup.job_id,
                                                             self._setup.round):
            raise SecAggRefused(f"{self.node_id} joined job {self._setup.job_id!r} round "
                                f"{self._setup.round}, not job {job_id!r} round {round_}")
        if addressee is not None and addressee != self.node_id:
            raise SecAggProtocolError(f"message for {addressee}, this is {self.node_id}")
        if self._phase != phase or self._setup is None:
            raise SecAggProtocolError(f"{self.node_id} is in phase {self._phase!r}, "
                                      f"not {phase!r}")
        return self._setup

    @property
    def job_round(self) -> tuple[str, int] | None:
        return None if self._setup is None else (self._setup.job_id, self._setup.round)

    # -- phase 1
    def handle_setup(self, setup: Setup) -> AdvertiseKeys:
        """Join the round: check the setup, make the two key pairs, sign them."""
        start = time.perf_counter()
        if self._phase != "new":
            raise SecAggRefused(f"{self.node_id} already joined job {self.job_round}")
        if self.node_id not in setup.participants:
            raise SecAggProtocolError(f"{self.node_id} is not a participant of this round")
        validate_setup(setup)
        self._setup = setup
        self._codec = codec_of(setup)
        self._neighbours = neighbour_graph(setup.participants, setup.degree,
                                           setup.graph_seed)[self.node_id]
        self._point = {p: i + 1 for i, p in enumerate(setup.participants)}
        self._c_sk = X25519PrivateKey.generate()
        self._s_seed = secrets.token_bytes(32)
        self._s_sk = _private_from_seed(self._s_seed)
        c_pk, s_pk = _public_bytes(self._c_sk), _public_bytes(self._s_sk)
        payload = advertisement_payload(setup.job_id, setup.round, self.node_id, c_pk, s_pk)
        self._phase = "advertised"
        message = AdvertiseKeys(setup.job_id, setup.round, self.node_id, c_pk, s_pk,
                                self._sign(payload))
        self.counters.timed("advertise", start)
        return message

    # -- phase 2
    def handle_key_bundle(self, bundle: KeyBundle) -> ShareKeys:
        """Check the neighbours' signed keys, share ``b_i`` and ``s_sk_i``, seal the shares."""
        start = time.perf_counter()
        setup = self._expect("advertised", bundle.job_id, bundle.round, bundle.receiver)
        keys: dict[str, tuple[bytes, bytes]] = {}
        for ad in bundle.advertisements:
            if ad.sender not in self._neighbours:
                raise SecAggProtocolError(f"{ad.sender} is not a neighbour of {self.node_id}")
            if (ad.job_id, ad.round) != (setup.job_id, setup.round):
                raise SecAggRefused(f"an advertisement of {ad.sender} for another job/round")
            payload = advertisement_payload(ad.job_id, ad.round, ad.sender, ad.c_pk, ad.s_pk)
            if not self._verify(ad.sender, payload, ad.signature):
                raise SecAggProtocolError(f"the key advertisement of {ad.sender} does not "
                                          "verify against its node key (forged)")
            keys[ad.sender] = (ad.c_pk, ad.s_pk)
        own = (_public_bytes(self._c_sk), _public_bytes(self._s_sk))
        every_key = [k for pair in [*keys.values(), own] for k in pair]
        if len(set(every_key)) != len(every_key):
            raise SecAggProtocolError("two advertised public keys are equal")
        group = [*keys, self.node_id]
        if len(group) < setup.threshold:
            raise SecAggAbort(f"{self.node_id}: {len(group)} of its share group advertised "
                              f"keys, the threshold is {setup.threshold}")
        self._peer_keys = keys
        self._b_seed = secrets.token_bytes(32)
        points = [self._point[p] for p in group]
        b_shares = shamir.split(self._b_seed, setup.threshold, points)
        s_shares = shamir.split(self._s_seed, setup.threshold, points)
        self.counters.shamir_splits += 2
        self._held: dict[str, tuple[int, int]] = {
            self.node_id: (b_shares[self._point[self.node_id]],
                           s_shares[self._point[self.node_id]])}
        self._c_agreements: dict[str, bytes] = {}
        sealed = []
        for peer in sorted(keys):
            agreement = _agree(self._c_sk, keys[peer][0], self.counters)
            self._c_agreements[peer] = agreement
            x = self._point[peer]
            plaintext = (b_shares[x].to_bytes(shamir.SHARE_BYTES, "big")
                         + s_shares[x].to_bytes(shamir.SHARE_BYTES, "big"))
            self.counters.aead_operations += 1
            sealed.append(SealedShare(peer, seal_shares(agreement, setup.job_id, setup.round,
                                                        self.node_id, peer, plaintext)))
        self._phase = "shared"
        self.counters.timed("share_keys", start)
        return ShareKeys(setup.job_id, setup.round, self.node_id, tuple(sealed))

    # -- phase 3
    def handle_forwarded_shares(self, forwarded: ForwardedShares, values: np.ndarray,
                                weight: int = 1,
                                noise: DistributedGaussian | None = None) -> MaskedInput:
        """Open the shares received (their senders are still in), then mask the input.

        ``values`` is the flat float update (entries within the setup's clip) and ``weight``
        the node's integer weight (its example count, or 1 for an unweighted mean). With
        ``noise`` (distributed DP, weight 1) the node rounds and noises its input in the ring
        first, with the Setup's threshold as the fewest summands."""
        start = time.perf_counter()
        setup = self._expect("shared", forwarded.job_id, forwarded.round, forwarded.receiver)
        if noise is not None:  # raises before any state change
            if weight != 1 or noise.min_summands != setup.threshold:
                raise MaskingError("distributed noise takes weight 1 and the round's threshold")
            units = noise.noised_input(values, self._codec.step, self._codec.bound_units,
                                       np.random.default_rng())
            encoded = self._codec.encode_units(units)
        else:
            encoded = self._codec.encode(values, weight)  # raises before any state change
        if encoded.size != setup.dim + 1:
            raise MaskingError(f"the update has {encoded.size - 1} entries, the round "
                               f"{setup.dim}")
        opened: dict[str, tuple[int, int]] = {}
        for item in forwarded.shares:
            if item.peer not in self._peer_keys:
                raise SecAggProtocolError(f"a share from {item.peer}, who is not an advertised "
                                          f"neighbour of {self.node_id}")
            self.counters.aead_operations += 1
            plain = open_shares(self._c_agreements[item.peer], setup.job_id, setup.round,
                                item.peer, self.node_id, item.ciphertext)
            b_share = int.from_bytes(plain[:shamir.SHARE_BYTES], "big")
            s_share = int.from_bytes(plain[shamir.SHARE_BYTES:], "big")
            if b_share >= shamir.PRIME or s_share >= shamir.PRIME:
                raise SecAggProtocolError(f"the share from {item.peer} is not a field element")
            opened[item.peer] = (b_share, s_share)
        if len(opened) + 1 < setup.threshold:
            raise SecAggAbort(f"{self.node_id}: {len(opened) + 1} of its share group shared "
                              f"keys, the threshold is {setup.threshold}")
        self._held.update(opened)
        masked = encoded + prg_ring_elements(self._b_seed, encoded.size, setup.bits)
        self.counters.prg_expansions += 1
        for peer in sorted(opened):
            agreement = _agree(self._s_sk, self._peer_keys[peer][1], self.counters)
            seed = _pair_mask_seed(agreement, setup.job_id, setup.round, self.node_id, peer)
            mask = prg_ring_elements(seed, encoded.size, setup.bits)
            self.counters.prg_expansions += 1
            if pairwise_sign(self.node_id, peer) > 0:
                masked += mask
            else:
                masked -= mask
        self._phase = "masked"
        self.counters.timed("masked_input", start)
        return MaskedInput(setup.job_id, setup.round, self.node_id, masked.tobytes())

    # -- phase 4
    def handle_unmask_request(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal, for each peer whose shares it holds, the share of ``b_j`` if ``j`` survived,
        else the share of ``s_sk_j``. A second request that would flip a kind is refused."""
        start = time.perf_counter()
        if self._phase == "unmasked" and self._setup is not None:
            self._expect("unmasked", request.job_id, request.round, None)
            kinds = self._kinds(request.survivors)
            if kinds != self._revealed:
                raise SecAggRefused(f"{self.node_id} already revealed shares for this round; "
                                    "revealing the other share of a peer would unmask it")
            assert self._response is not None
            return self._response
        setup = self._expect("masked", request.job_id, request.round, None)
        survivors = set(request.survivors)
        if self.node_id not in survivors:
            raise SecAggRefused(f"{self.node_id} sent its masked input but is not listed among "
                                "the survivors: the server lies about dropouts")
        if not survivors <= set(setup.participants):
            raise SecAggProtocolError("the survivors include non-participants")
        if len(survivors) < setup.threshold:
            raise SecAggAbort(f"{len(survivors)} survivors, the threshold is {setup.threshold}")
        kinds = self._kinds(request.survivors)
        shares = tuple(RevealedShare(peer, kind, self._held[peer][kind])
                       for peer, kind in sorted(kinds.items()))
        self._revealed = kinds
        self._response = UnmaskResponse(setup.job_id, setup.round, self.node_id, shares)
        self._phase = "unmasked"
        self.counters.timed("unmask", start)
        return self._response

    def _kinds(self, survivors: Iterable[str]) -> dict[str, int]:
        alive = set(survivors)
        return {peer: SHARE_KIND_SELF_SEED if peer in alive else SHARE_KIND_MASK_KEY
                for peer in self._held}


# ---------------------------------------------------------------- server


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked round: ``weighted_sum = sum w_i x_i`` (float64, exact up to the codec's
    step per node), ``weight_total = sum w_i``, over ``survivors``; ``ring_sum`` is the exact
    integer sum in the ring (weight slot last)."""

    weighted_sum: np.ndarray
    weight_total: int
    survivors: tuple[str, ...]
    ring_sum: np.ndarray

    def mean(self) -> np.ndarray:
        """The weighted mean ``sum w_i x_i / sum w_i``."""
        if self.weight_total <= 0:
            raise SecAggAbort("the survivors' weights sum to 0: no mean")
        return self.weighted_sum / self.weight_total


class SecAggServer:
    """The coordinator's side of one (job, round). It only ever sees public keys, sealed
    shares, masked vectors, the shares revealed in phase 4 and the final sum."""

    def __init__(self, setup: Setup, verify: Verifier) -> None:
        validate_setup(setup)
        self.setup = setup
        self._verify = verify
        self.counters = CostCounters()
        self._codec = codec_of(setup)
        self._graph = neighbour_graph(setup.participants, setup.degree, setup.graph_seed)
        self._point = {p: i + 1 for i, p in enumerate(setup.participants)}
        self._phase = "advertise"
        self._ads: dict[str, AdvertiseKeys] = {}
        self._shares: dict[str, ShareKeys] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._unmask: dict[str, UnmaskResponse] = {}

    @classmethod
    def new_round(cls, *, job_id: str, round_: int, participants: Sequence[str], dim: int,
                  clip: float, max_weight: int, verify: Verifier, bits: int = 32,
                  frac_bits: int | None = None, degree: int | None = None,
                  threshold: int | None = None, graph_seed: bytes | None = None,
                  expected_dropout: float = 0.0) -> SecAggServer:
        """Phase 0: pick the graph (``degree``: :func:`default_degree` for the expected
        dropout), the threshold (:func:`default_threshold`) and the finest fixed-point step
        that cannot overflow."""
        ids = tuple(sorted(participants))
        k = default_degree(len(ids), expected_dropout) if degree is None else degree
        if frac_bits is None:
            codec = FixedPointCodec.for_bounds(max_nodes=len(ids), max_weight=max_weight,
                                               clip=clip, bits=bits)
            frac_bits = codec.frac_bits
        setup = Setup(job_id, round_, ids, default_threshold(k) if threshold is None else threshold,
                      k, secrets.token_bytes(32) if graph_seed is None else graph_seed, dim,
                      bits, frac_bits, float(clip), max_weight)
        return cls(setup, verify)

    def neighbours(self, node_id: str) -> frozenset[str]:
        return self._graph[node_id]

    def _check(self, phase: str, job_id: str, round_: int, sender: str,
               allowed: Iterable[str], seen: Mapping[str, object]) -> None:
        if self._phase != phase:
            raise SecAggProtocolError(f"the server is in phase {self._phase!r}, not {phase!r}")
        if (job_id, round_) != (self.setup.job_id, self.setup.round):
            raise SecAggProtocolError(f"a message for job {job_id!r} round {round_}")
        if sender not in allowed:
            raise SecAggProtocolError(f"{sender} may not send in phase {phase!r}")
        if sender in seen:
            raise SecAggProtocolError(f"{sender} already sent in phase {phase!r}")

    def _need(self, count: int, what: str) -> None:
        if count < self.setup.threshold:
            self._phase = "failed"
            raise SecAggAbort(f"only {count} nodes {what}; the threshold is "
                              f"{self.setup.threshold}: the round fails, nothing is unmasked")

    # -- phase 1
    def receive_advertisement(self, message: AdvertiseKeys) -> None:
        self._check("advertise", message.job_id, message.round, message.sender,
                    self.setup.participants, self._ads)
        payload = advertisement_payload(message.job_id, message.round, message.sender,
                                        message.c_pk, message.s_pk)
        if not self._verify(message.sender, payload, message.signature):
            raise SecAggProtocolError(f"the key advertisement of {message.sender} does not "
                                      "verify against its node key (forged)")
        self._ads[message.sender] = message

    def close_advertising(self) -> dict[str, KeyBundle]:
        """End phase 1: each advertiser gets its advertised neighbours' keys."""
        start = time.perf_counter()
        if self._phase != "advertise":
            raise SecAggProtocolError(f"the server is in phase {self._phase!r}")
        self._need(len(self._ads), "advertised keys")
        self._u1 = frozenset(self._ads)
        bundles = {
            node: KeyBundle(self.setup.job_id, self.setup.round, node,
                            tuple(self._ads[p] for p in sorted(self._graph[node] & self._u1)))
            for node in sorted(self._u1)}
        self._phase = "share"
        self.counters.timed("advertise", start)
        return bundles

    # -- phase 2
    def receive_shares(self, message: ShareKeys) -> None:
        self._check("share", message.job_id, message.round, message.sender, self._u1,
                    self._shares)
        expected = self._graph[message.sender] & self._u1
        if {s.peer for s in message.shares} != expected:
            raise SecAggProtocolError(f"{message.sender} must send one share to each advertised "
                                      "neighbour, no more, no fewer")
        self._shares[message.sender] = message

    def close_sharing(self) -> dict[str, ForwardedShares]:
        """End phase 2: route each sealed share to its receiver (only among those still in)."""
        start = time.perf_counter()
        if self._phase != "share":
            raise SecAggProtocolError(f"the server is in phase {self._phase!r}")
        self._need(len(self._shares), "shared keys")
        self._u2 = frozenset(self._shares)
        inbox: dict[str, list[SealedShare]] = {node: [] for node in self._u2}
        for sender in sorted(self._u2):
            for item in self._shares[sender].shares:
                if item.peer in inbox:
                    inbox[item.peer].append(SealedShare(sender, item.ciphertext))
        self._phase = "mask"
        out = {node: ForwardedShares(self.setup.job_id, self.setup.round, node, tuple(items))
               for node, items in inbox.items()}
        self.counters.timed("share_keys", start)
        return out

    # -- phase 3
    def receive_masked_input(self, message: MaskedInput) -> None:
        self._check("mask", message.job_id, message.round, message.sender, self._u2,
                    self._masked)
        size = (self.setup.dim + 1) * self._codec.element_bytes
        if len(message.vector) != size:
            raise SecAggProtocolError(f"a masked input of {len(message.vector)} bytes, expected "
                                      f"{size}")
        self._masked[message.sender] = np.frombuffer(message.vector, dtype=self._codec.dtype)

    def close_masking(self) -> UnmaskRequest:
        """End phase 3: the survivors are those who sent a masked input."""
        start = time.perf_counter()
        if self._phase != "mask":
            raise SecAggProtocolError(f"the server is in phase {self._phase!r}")
        self._need(len(self._masked), "sent a masked input")
        self._u3 = frozenset(self._masked)
        self._phase = "unmask"
        self.counters.timed("masked_input", start)
        return UnmaskRequest(self.setup.job_id, self.setup.round, tuple(sorted(self._u3)))

    # -- phase 4
    def receive_unmask(self, message: UnmaskResponse) -> None:
        self._check("unmask", message.job_id, message.round, message.sender, self._u3,
                    self._unmask)
        group = (self._graph[message.sender] | {message.sender}) & self._u2
        for share in message.shares:
            if share.owner not in group:
                raise SecAggProtocolError(f"{message.sender} cannot hold a share of "
                                          f"{share.owner}")
            wanted = SHARE_KIND_SELF_SEED if share.owner in self._u3 else SHARE_KIND_MASK_KEY
            if share.kind != wanted:
                raise SecAggProtocolError(f"{message.sender} revealed the wrong kind of share "
                                          f"of {share.owner}")
        self._unmask[message.sender] = message

    def finish(self) -> AggregateResult:
        """Reconstruct every needed secret (or abort before unmasking anything), remove the
        masks and decode the sum of the survivors' inputs."""
        start = time.perf_counter()
        if self._phase != "unmask":
            raise SecAggProtocolError(f"the server is in phase {self._phase!r}")
        self._need(len(self._unmask), "answered the unmask request")
        collected: dict[tuple[str, int], dict[int, int]] = {}
        for responder, message in self._unmask.items():
            for share in message.shares:
                collected.setdefault((share.owner, share.kind), {})[
                    self._point[responder]] = share.value
        t = self.setup.threshold
        cache: dict[tuple[int, ...], dict[int, int]] = {}

        def reconstruct(owner: str, kind: int) -> bytes:
            shares = collected.get((owner, kind), {})
            if len(shares) < t:
                self._phase = "failed"
                what = "self-mask seed" if kind == SHARE_KIND_SELF_SEED else "mask key"
                raise SecAggAbort(f"only {len(shares)} shares of {owner}'s {what}, {t} needed: "
                                  "the round fails, nothing is unmasked")
            points = tuple(sorted(shares)[:t])
            if points not in cache:
                cache[points] = shamir.lagrange_at_zero(points)
            self.counters.shamir_combines += 1
            try:
                return shamir.combine(shares, t, cache[points])
            except shamir.ShamirError as e:
                self._phase = "failed"
                raise SecAggAbort(f"the shares of {owner} do not combine: {e}") from e

        # every reconstruction first: an abort leaves nothing unmasked
        self_seeds = {j: reconstruct(j, SHARE_KIND_SELF_SEED) for j in sorted(self._u3)}
        dropped_keys = {}
        for j in sorted(self._u2 - self._u3):
            seed = reconstruct(j, SHARE_KIND_MASK_KEY)
            private = _private_from_seed(seed)
            if _public_bytes(private) != self._ads[j].s_pk:
                self._phase = "failed"
                raise SecAggAbort(f"the reconstructed mask key of {j} does not match its "
                                  "advertised key (a wrong share)")
            dropped_keys[j] = private
        size = self.setup.dim + 1
        bits = self.setup.bits
        total = np.zeros(size, dtype=self._codec.dtype)
        for i in sorted(self._u3):
            total += self._masked[i]
            total -= prg_ring_elements(self_seeds[i], size, bits)
            self.counters.prg_expansions += 1
        for j, private in dropped_keys.items():
            for i in sorted(self._graph[j] & self._u3):
                agreement = _agree(private, self._ads[i].s_pk, self.counters)
                seed = _pair_mask_seed(agreement, self.setup.job_id, self.setup.round, i, j)
                mask = prg_ring_elements(seed, size, bits)
                self.counters.prg_expansions += 1
                if pairwise_sign(i, j) > 0:  # i added this mask: take it out
                    total -= mask
                else:
                    total += mask
        weighted, weight_total = self._codec.decode_sum(total)
        self._phase = "done"
        self.counters.timed("unmask", start)
        return AggregateResult(weighted, weight_total, tuple(sorted(self._u3)), total)
