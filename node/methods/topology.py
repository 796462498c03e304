"""Who a decentralized node mixes with, and how much: the job's graph over its nodes and the
Metropolis-Hastings mixing weights (DIMAT, ``node.methods.dimat``).

Pure and cheap (no scipy, no torch.func): the coordinator computes every node's neighbours and
mixing row here, and a node re-weights its row here when a neighbour is unreachable.

    Topology (fixed for a job; every node derives the same graph from the sorted node ids and the
    config, nothing to agree on at run time). Node k is the k-th id in sorted order.
        ring    i ~ i-1, i+1 (mod n)
        full    every pair
        random  a connected k-regular graph (k = ``degree``) drawn from ``seed``: the circulant
                k-regular graph, then 10|E| seeded double-edge swaps that keep it simple, k-regular
                and connected (Python's ``random.Random``, stable across versions and platforms,
                unlike a networkx generator whose algorithm may change between releases)
        edges   an explicit list "0-1,1-2,..." of positions in the sorted id list
    A topology that leaves the graph disconnected is a configuration error: the nodes could
    never reach consensus.

    Mixing matrix (Metropolis-Hastings, needs only the degrees of a node and its neighbours):
        w_ij = 1 / (1 + max(d_i, d_j)) for each edge ij,   w_ii = 1 - sum_j w_ij.
    Symmetric and doubly stochastic for every undirected graph; 1/3 everywhere on a ring.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "TOPOLOGIES",
    "UNREACHABLE_POLICIES",
    "TopologyConfig",
    "check_row",
    "mixing_matrix",
    "mixing_weights",
    "neighbours",
    "parse_edges",
    "renormalized_weights",
]

TOPOLOGIES = ("ring", "full", "random", "edges")
UNREACHABLE_POLICIES = ("renormalize", "self")

_WEIGHT_TOLERANCE = 1e-6
_EDGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


class TopologyConfig(Protocol):
    """What a topology is drawn from (a job's ``DIMATConfig``)."""

    topology: str
    degree: int
    edges: str
    seed: int


def parse_edges(spec: str | Iterable[Any]) -> list[tuple[int, int]]:
    """Undirected edges (i < j, sorted, deduplicated) from "0-1,1-2" or a list of "i-j" strings
    or [i, j] pairs. Self-loops and malformed entries are a ValueError."""
    if isinstance(spec, str):
        items: list[Any] = [part for part in re.split(r"[,;\s]+", spec.strip()) if part]
    else:
        try:
            items = list(spec)
        except TypeError:
            raise ValueError(
                f"dimat: edges must be a string like '0-1,1-2', got {spec!r}"
            ) from None
    edges: set[tuple[int, int]] = set()
    for item in items:
        if isinstance(item, str):
            found = _EDGE.match(item)
            if not found:
                raise ValueError(f"dimat: edge {item!r} is not of the form 'i-j' (e.g. '0-1')")
            a, b = int(found.group(1)), int(found.group(2))
        else:
            try:
                a_raw, b_raw = item
            except (TypeError, ValueError):
                raise ValueError(f"dimat: edge {item!r} is not a pair [i, j]") from None
            if not all(_is_position(v) for v in (a_raw, b_raw)):
                raise ValueError(f"dimat: edge {item!r} must join two non-negative integers")
            a, b = int(a_raw), int(b_raw)
        if a == b:
            raise ValueError(f"dimat: edge {a}-{b} is a self-loop; a node always keeps itself")
        edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def _is_position(value: Any) -> bool:
    """A node position: a non-negative integer (job parameters arrive as floats, so 2.0 is
    fine, 2.5 is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0 and float(value).is_integer()


def neighbours(config: TopologyConfig, nodes: Sequence[str]) -> dict[str, list[str]]:
    """Every node's neighbours (sorted ids) in the job's topology over ``nodes``.

    Nodes are ordered by id, so every node computes the same graph from the same membership.
    ValueError when the topology does not fit the number of nodes or leaves it disconnected.
    """
    ids = sorted(nodes)
    if len(set(ids)) != len(ids):
        raise ValueError("dimat: node ids must be unique")
    n = len(ids)
    if n == 0:
        raise ValueError("dimat: a topology needs at least one node")
    if config.topology == "ring":
        edges = {(min(i, (i + 1) % n), max(i, (i + 1) % n)) for i in range(n) if n > 1}
    elif config.topology == "full":
        edges = {(i, j) for i in range(n) for j in range(i + 1, n)}
    elif config.topology == "random":
        edges = _random_regular(n, config.degree, config.seed)
    else:
        edges = set(parse_edges(config.edges))
        beyond = sorted({v for edge in edges for v in edge if v >= n})
        if beyond:
            raise ValueError(
                f"dimat: edges name node position(s) {beyond} but there are only {n} nodes "
                f"(positions 0..{n - 1} in sorted id order)"
            )
    adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        adjacency[a].add(b)
        adjacency[b].add(a)
    if not _connected(adjacency):
        raise ValueError(
            f"dimat: the {config.topology} topology over {n} nodes is disconnected, so the "
            "nodes could never agree; add edges"
        )
    return {ids[i]: sorted(ids[j] for j in adjacency[i]) for i in range(n)}


def _connected(adjacency: Mapping[int, Collection[int]]) -> bool:
    if not adjacency:
        return True
    start = next(iter(adjacency))
    seen = {start}
    frontier = [start]
    while frontier:
        for nxt in adjacency[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return len(seen) == len(adjacency)


def _random_regular(n: int, k: int, seed: int) -> set[tuple[int, int]]:
    """A connected k-regular graph on n nodes, a pure function of (n, k, seed).

    Start from the circulant graph (i ~ i +- 1..k/2, plus i ~ i + n/2 for odd k), which is
    k-regular and connected, then randomize it with double-edge swaps (ab, cd -> ad, cb) that
    keep it simple, k-regular and connected. Always succeeds; no rejection sampling.
    """
    if not 1 <= k < n:
        raise ValueError(f"dimat: a random {k}-regular topology needs 1 <= degree < nodes ({n})")
    if (n * k) % 2:
        raise ValueError(
            f"dimat: no {k}-regular graph on {n} nodes exists (nodes x degree must be even)"
        )
    if k == 1 and n > 2:
        raise ValueError(
            f"dimat: a 1-regular graph on {n} nodes is a set of disjoint pairs (disconnected); "
            "use degree >= 2"
        )
    adjacency: dict[int, set[int]] = {i: set() for i in range(n)}
    for i in range(n):
        for step in range(1, k // 2 + 1):
            adjacency[i].add((i + step) % n)
            adjacency[(i + step) % n].add(i)
        if k % 2:
            adjacency[i].add((i + n // 2) % n)
            adjacency[(i + n // 2) % n].add(i)
    edges = sorted({(min(a, b), max(a, b)) for a in adjacency for b in adjacency[a]})
    rng = random.Random(seed)
    for _ in range(10 * len(edges)):
        i, j = rng.randrange(len(edges)), rng.randrange(len(edges))
        (a, b), (c, d) = edges[i], edges[j]
        if rng.random() < 0.5:
            c, d = d, c
        if len({a, b, c, d}) < 4 or d in adjacency[a] or b in adjacency[c]:
            continue
        for x, y in ((a, b), (c, d)):
            adjacency[x].discard(y)
            adjacency[y].discard(x)
        for x, y in ((a, d), (c, b)):
            adjacency[x].add(y)
            adjacency[y].add(x)
        if _connected(adjacency):
            edges[i], edges[j] = (min(a, d), max(a, d)), (min(c, b), max(c, b))
            continue
        for x, y in ((a, d), (c, b)):  # the swap cut the graph: undo it
            adjacency[x].discard(y)
            adjacency[y].discard(x)
        for x, y in ((a, b), (c, d)):
            adjacency[x].add(y)
            adjacency[y].add(x)
    return set(edges)


def _check_adjacency(adjacency: Mapping[str, Sequence[str]]) -> None:
    for node, nbrs in adjacency.items():
        for other in nbrs:
            if other == node:
                raise ValueError(f"dimat: node {node!r} lists itself as a neighbour")
            if other not in adjacency or node not in adjacency[other]:
                raise ValueError(
                    f"dimat: the topology is not undirected: {node!r} lists {other!r} but not "
                    "the other way round"
                )


def mixing_weights(
    adjacency: Mapping[str, Sequence[str]], node: str
) -> tuple[float, dict[str, float]]:
    """Node ``node``'s row of the Metropolis-Hastings mixing matrix: (w_ii, {j: w_ij}).

    w_ij = 1 / (1 + max(d_i, d_j)); w_ii = 1 - sum_j w_ij (> 0: at least 1 / (1 + d_i)).
    Needs only the degrees of the node and its neighbours.
    """
    _check_adjacency(adjacency)
    if node not in adjacency:
        raise ValueError(f"dimat: node {node!r} is not in the topology")
    degree = len(adjacency[node])
    row = {j: 1.0 / (1.0 + max(degree, len(adjacency[j]))) for j in sorted(adjacency[node])}
    return 1.0 - math.fsum(row.values()), row


def mixing_matrix(adjacency: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """The Metropolis-Hastings mixing matrix (float64, rows and columns in sorted id order):
    symmetric and doubly stochastic for any undirected graph."""
    ids = sorted(adjacency)
    index = {node: k for k, node in enumerate(ids)}
    matrix = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    for node in ids:
        self_weight, row = mixing_weights(adjacency, node)
        matrix[index[node], index[node]] = self_weight
        for other, weight in row.items():
            matrix[index[node], index[other]] = weight
    return matrix


def renormalized_weights(
    self_weight: float,
    neighbour_weights: Mapping[str, float],
    reachable: Collection[str],
    policy: str = "renormalize",
) -> tuple[float, dict[str, float]]:
    """This merge's row when only ``reachable`` neighbours answered: (w_ii, {j: w_ij}), summing
    to 1 over the node and its reachable neighbours.

    "renormalize": scale w_ii and the reachable w_ij by 1 / (their sum). The row stays
    stochastic, the round's matrix is no longer doubly stochastic in general. "self": add the
    unreachable weight to w_ii; symmetric failures keep the matrix doubly stochastic.
    """
    if policy not in UNREACHABLE_POLICIES:
        raise ValueError(
            f"dimat: unreachable must be one of {', '.join(UNREACHABLE_POLICIES)}, got {policy!r}"
        )
    strangers = sorted(set(reachable) - set(neighbour_weights))
    if strangers:
        raise ValueError(f"dimat: {strangers} are not neighbours of this node in the topology")
    check_row(self_weight, neighbour_weights)
    kept = {j: float(w) for j, w in neighbour_weights.items() if j in reachable}
    if policy == "self":
        missing = math.fsum(w for j, w in neighbour_weights.items() if j not in reachable)
        return float(self_weight) + missing, kept
    total = float(self_weight) + math.fsum(kept.values())
    if total <= 0:
        raise ValueError("dimat: no weight left on this node or a reachable neighbour")
    return float(self_weight) / total, {j: w / total for j, w in kept.items()}


def check_row(self_weight: float, weights: Mapping[str, float]) -> None:
    """ValueError unless a mixing row (w_ii and the w_ij) is finite, >= 0 and sums to 1."""
    values = [float(self_weight), *map(float, weights.values())]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"dimat: mixing weights must be finite and >= 0, got {values}")
    if abs(math.fsum(values) - 1.0) > _WEIGHT_TOLERANCE:
        raise ValueError(
            f"dimat: a node's mixing weights must sum to 1 (self + neighbours), got "
            f"{math.fsum(values):.9f}"
        )
