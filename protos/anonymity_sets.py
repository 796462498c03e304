"""The anonymity sets of an anonymous round: which keys an update is ring-signed over.

Signing over every selected node makes each verification O(n) and a round O(n^2) for the
coordinator. Instead the round's ring (its selected nodes' ring keys, sorted) is partitioned
into ``m = max(1, n // k)`` sets by a public seeded shuffle, and each node signs over the one
set that holds its key: verification is O(k) per update.

The rule (part of the wire contract: a node recomputes it and refuses a ring whose published
sets differ):

    seed  = SHA-256(DOMAIN || epoch_id || len || job_id || round (4 B) || k (4 B))
    order = the ring's indices sorted by SHA-256(seed || key)
    sets  = ``order`` cut into m consecutive runs, the first ``n mod m`` of ``n // m + 1``
            keys and the rest of ``n // m``; each set's indices ascending (its ring order).

Why this rule:
- every set has at least k keys (k <= |set| < 2k), except that a ring of fewer than k keys is
  one set: k is the smallest anonymity set a node gets, which is what a user asks for;
- a node is in exactly one set and cannot choose it (a signer-chosen set would tell, over
  rounds, which sets a node likes); nor can the coordinator, short of choosing whom it
  selects, which it could abuse with the whole ring as well;
- the shuffle depends on the job and round, so sets change from round to round.

What it costs: the coordinator learns which set an update came from (the set index is on
the header), so the anonymity set *is* that set: ``|set|`` members instead of all n. Comparing
sets across rounds narrows a signer down faster than comparing whole rings would, for any
update whose content links it to earlier ones (see the README's anonymous-updates section).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from confide.protos.identity import ring_epoch_id

DEFAULT_ANONYMITY_SET = 32
MIN_ANONYMITY_SET = 2
MAX_ANONYMITY_SET = 4096
_DOMAIN = b"confide/v2/anonymity-sets\x00"


def set_size(requested: int) -> int:
    """The job's k: what its spec asks (0 = the default)."""
    return int(requested) or DEFAULT_ANONYMITY_SET


def anonymity_sets(keys: Sequence[bytes], k: int, job_id: str,
                   round_number: int) -> list[list[int]]:
    """The partition of a round ring (``keys``, in ring order) into sets of at least ``k``
    keys, as lists of indices into ``keys``."""
    return [list(s) for s in _partition(tuple(keys), int(k), job_id, int(round_number))]


@functools.lru_cache(maxsize=64)
def _partition(keys: tuple[bytes, ...], k: int, job_id: str,
               round_number: int) -> tuple[tuple[int, ...], ...]:
    """Cached: a coordinator answers every node's GetRing for a round with the same sets."""
    if not MIN_ANONYMITY_SET <= k <= MAX_ANONYMITY_SET:
        raise ValueError(f"an anonymity set has {MIN_ANONYMITY_SET}..{MAX_ANONYMITY_SET} "
                         f"members, got {k}")
    n = len(keys)
    if n == 0:
        return []
    job = job_id.encode()
    seed = hashlib.sha256(_DOMAIN + ring_epoch_id(list(keys)).encode()
                          + len(job).to_bytes(2, "big") + job
                          + int(round_number).to_bytes(4, "big") + k.to_bytes(4, "big")).digest()
    order = sorted(range(n), key=lambda i: hashlib.sha256(seed + keys[i]).digest())
    count = max(1, n // k)
    small, bigger = divmod(n, count)
    sets, start = [], 0
    for j in range(count):
        size = small + (1 if j < bigger else 0)
        sets.append(tuple(sorted(order[start:start + size])))
        start += size
    return tuple(sets)


def set_of(sets: Sequence[Sequence[int]], index: int) -> int:
    """Which set holds ring index ``index``."""
    for number, members in enumerate(sets):
        if index in members:
            return number
    raise ValueError(f"ring index {index} is in no set")
