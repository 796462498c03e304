"""Secure aggregation (SecAgg+): the coordinator learns the sum of the nodes' updates, not one.

Pure and transport-free (third-party imports only: ``cryptography``, ``numpy``): the state
machines take and return message dataclasses; relaying them over the node's session stream is the
round engine's job. Modules:

* :mod:`~privacy.secagg.shamir`: t-of-n Shamir sharing of 32-byte secrets over GF(2^256 + 297)
  (why not a library: see its docstring);
* :mod:`~privacy.secagg.masking`: fixed-point encoding into Z_{2^32} / Z_{2^64} with the overflow
  bound, and the ChaCha20 mask PRG;
* :mod:`~privacy.secagg.messages`: the eight messages, strict ``to_bytes`` / ``from_bytes``;
* :mod:`~privacy.secagg.protocol`: :class:`SecAggClient` and :class:`SecAggServer`, one pair per
  (job, round), and the neighbour graph;
* :mod:`~privacy.secagg.simulate`: one in-process round with real crypto, per-phase seconds and
  bytes (``confide bench secagg`` builds on it).

Threat model
------------
Parties: the coordinator (server) and the round's ``n`` selected nodes, each with a registered
Ed25519 node key; ``k`` neighbours per node (``k = n - 1``: the complete graph), threshold
``t > (k + 1) / 2`` of each share group (a node and its neighbours).

*Honest-but-curious server* (follows the protocol, reads everything it relays). It learns: who
took part and who dropped in which phase; every public key; the sealed shares as ciphertexts
(opaque: AEAD keys come from X25519 agreements it is not part of); each masked vector ``y_i``,
which is uniform on the ring and independent of ``x_i`` (the self mask ``PRG(b_i)`` alone hides
it; tested); in phase 4, ``b_j`` of survivors and ``s_sk_j`` of nodes that dropped after sharing
keys, which is what it needs to compute ``sum_{i in survivors} w_i x_i`` and ``sum w_i`` (the
weights travel inside the masked vector: individual example counts are not revealed, their sum
is). That sum is the intended output; it may itself leak (one survivor's update is the sum minus
the others' if they are known, hence ``t`` survivors at least, and DP below).

*A server that lies about dropouts.* To unmask node ``j`` it would need ``b_j`` (to strip the
self mask) and ``s_sk_j`` (to strip the pairwise masks) for the same round. It can claim ``j``
dropped to some neighbours and survived to others, but each honest node reveals only one kind of
share per peer per round (a second request that would flip a kind raises :class:`SecAggRefused`),
and with ``t`` above half the share group, ``t`` shares of both kinds would need more honest
neighbours than ``j`` has. A node also refuses to answer when it is itself listed as dropped, or
when fewer than ``t`` survivors are listed, or for a job or round other than its own. Key
advertisements are signed with node keys and checked by every node, so the server cannot slip its
own keys in as a neighbour's (man in the middle) without a node key. Limits, stated: this is the
semi-honest protocol of Bonawitz et al. without their consistency-check round (nodes do not sign
the survivor set), so the guarantee against an actively lying server rests on the majority
threshold; a server that chooses the graph seed (public, but picked by it) could grind it to
place corrupted nodes around a victim; it controls which nodes are selected at all (Sybil nodes
need registered node keys); and the neighbour graph is public.

*Colluding nodes* (with or without the server). ``c`` nodes learn their own inputs and keys, the
shares they hold and the pairwise seeds with their neighbours. Fewer than ``t`` colluders in a
share group learn nothing about that group's secrets (Shamir's threshold); together with the
server, colluders holding ``t`` shares of a victim's ``b_j`` (and the server getting ``s_sk_j``
revealed by a fake dropout) unmask it, so ``t`` must exceed the number of corrupted neighbours
any node can have: in SecAgg+'s random graph that holds with high probability for a corrupted
fraction well below ``t / (k + 1)``. Colluders also learn the sum minus their own inputs.

Not protected: the sum, the set of participants and the timing and sizes of messages; the
integrity of the result (a node can submit garbage inside its mask: secure aggregation hides
inputs, it does not validate them; norm bounds need a zero-knowledge proof or DP's clipping).

Distributed DP for node-level DP-LoRA under secure aggregation (plan, not code yet)
-----------------------------------------------------------------------------------
Today ``dp-lora`` in ``central`` mode adds Gaussian noise once to the sum, which needs a trusted
aggregator; under secure aggregation no party sees an un-noised update if each node adds its
share of the noise *in the integer ring*, before masking:

1. Each node clips its whole LoRA delta to L2 norm ``C`` (as now), applies a random rotation
   shared per round (a randomized Hadamard transform from a public seed, so the clipped vector's
   mass spreads evenly across coordinates and stochastic rounding does not blow up the norm),
   scales by ``2^f`` and rounds stochastically to integers (conditional rounding: resample until
   the rounded norm stays under the bound, Kairouz et al.).
2. It adds integer noise: the distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021)
   or, preferred, Skellam noise (Agarwal, Kairouz, Liu, NeurIPS 2021): ``Sk(mu / t)`` per
   coordinate, i.e. the difference of two Poisson(mu / (2t)) draws, from a CSPRNG. Skellam is
   closed under summation, so the sum over ``m`` survivors carries exactly ``Sk(m mu / t)``, whose
   RDP has a closed form (Agarwal et al., Thm. 3.5); the discrete Gaussian sum is only close to
   a discrete Gaussian and needs their bound. The weights are all 1 (an unweighted mean, as
   DP-LoRA already does: example-count weights would break the sensitivity bound).
3. The ring must hold clip, scale, survivors and the noise's tail: ``bits = 64`` or a modular
   clipping argument (the papers' modular arithmetic analysis); the codec's overflow check gains a
   noise term (e.g. 12 standard deviations).
4. Accounting with dp-accounting's RDP accountant (a custom event with Skellam's RDP curve) per
   round, sampling rate as today, reported each round.

Dropouts: each node adds noise for ``t`` survivors, so any round that completes (``>= t``
survivors by construction) has at least the target noise; with more survivors the noise is larger
than needed (utility cost ``m / t``); fewer than ``t`` cannot happen because the round aborts.
Noise from nodes that dropped after masking is never added (their inputs are not in the sum),
which is why the calibration uses ``t`` and not ``n``. Colluding nodes can subtract their own
noise: calibrate for ``t - c`` honest nodes if ``c`` corruptions are assumed.
"""

from __future__ import annotations

from confide.privacy.secagg.errors import (
    SecAggAbort,
    SecAggError,
    SecAggMessageError,
    SecAggProtocolError,
    SecAggRefused,
)
from confide.privacy.secagg.masking import FixedPointCodec, MaskingError
from confide.privacy.secagg.protocol import (
    AggregateResult,
    CostCounters,
    SecAggClient,
    SecAggServer,
    advertisement_payload,
    default_degree,
    default_threshold,
    neighbour_graph,
)

__all__ = [
    "AggregateResult",
    "CostCounters",
    "FixedPointCodec",
    "MaskingError",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggMessageError",
    "SecAggProtocolError",
    "SecAggRefused",
    "SecAggServer",
    "advertisement_payload",
    "default_degree",
    "default_threshold",
    "neighbour_graph",
]
