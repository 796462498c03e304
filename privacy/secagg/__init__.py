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

Distributed DP for node-level DP-LoRA under secure aggregation (``distributed_dp.py``)
-------------------------------------------------------------------------------------
``dp-lora`` with ``mode = "distributed"``: each node clips its delta to L2 norm ``C``, rounds
``x / gamma`` to the ring's grid at random (unbiased; no rotation is needed: the grid is so fine
that rounding adds at most ``sqrt(d)`` to a norm of ``C / gamma ~ 10^6 .. 10^18`` units) and adds
its share of the noise as a discrete Gaussian ``N_Z(0, (sigma D)^2 / t)``, ``D = C / gamma +
sqrt(d)``, before masking. The distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021)
was chosen over Skellam (Agarwal et al. 2021) because its bound needs nothing beyond ``tau``,
which underflows on this grid, so the accounting is the Gaussian mechanism's (the project's
RDP accountant, unchanged). Weights are all 1; the codec's bound holds the clip plus 8 standard
deviations (noise beyond is redrawn). Dropouts: noise is calibrated for ``t`` summands; any
unmasked sum has at least ``t`` (inputs of nodes that dropped after masking are in it); more
survivors only add noise. Colluding nodes can subtract their own noise: the guarantee assumes
at least ``t`` honest summands, the same assumption as the threshold itself.
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
