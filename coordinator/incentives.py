"""Truthful, budget-feasible selection of participants: the proportional-share mechanism.

Before a round every eligible node reports a participation cost ``c_i``; the coordinator assigns
it a value ``v_i > 0`` (the size of its data for the job) and has a budget ``B`` for the round.
This module implements the proportional-share mechanism for additive valuations of

    Y. Singer, "Budget Feasible Mechanisms", FOCS 2010,

paying each winner its threshold (critical value); see also

    N. Chen, N. Gravin, P. Lu, "On the Approximability of Budget Feasible Mechanisms",
    SODA 2011,

which revisits this mechanism and its threshold payments. The derivation of the payment below is
self-contained, and the unit tests check it three ways.

It is the concrete instance of the principle of Truth-FedBan (Wei et al., "Incentivized Truthful
Communication for Federated Bandits", ICLR 2024): a winner's payment is its critical value, so it
does not depend on the winner's own report.

PROPORTIONAL-SHARE(bids, B)
    Allocation rule.
        Sort the bidders by ``c/v`` ascending, ties broken by node id: 1, 2, ..., n, and let
        ``V_k = v_1 + ... + v_k``. The winners are ``S = {1, ..., k}`` for the largest ``k`` with

            c_k <= B * v_k / V_k.                                         (proportional share)

        ``c_k / v_k`` grows with ``k`` and ``B / V_k`` shrinks, so the ``k`` meeting the
        condition form a prefix: a bidder wins iff the condition holds at its own position.
    Payment rule.
        Each winner ``i`` in ``S`` is paid its critical value, the supremum of the costs it
        could report and still win, the others' bids fixed:

            p_i = min( B * v_i / V(S) ,  v_i * c_{k+1} / v_{k+1} )            (threshold)

        with the second term dropped when everyone wins (``k = n``). Losers are paid nothing.

Why this is the critical value. Sort the others alone: ratios ``r_1 <= ... <= r_{n-1}``,
``r_n = +inf``, and ``V'_j`` the sum of their first ``j`` values. Reporting ``c`` puts ``i`` at
the position ``j`` with ``r_{j-1} <= c / v_i <= r_j``, where it wins iff
``c <= B * v_i / (V'_{j-1} + v_i)``; so its critical value is

    theta_i = max_{1 <= j <= n}  min( v_i * r_j ,  B * v_i / (V'_{j-1} + v_i) )

(a position ``i`` cannot win at contributes no more than the one before it). For a winner the
others' first ``k - 1`` are the other winners and ``r_k = c_{k+1} / v_{k+1}``, so the term
``j = k`` is ``(threshold)``. Terms ``j < k`` are at most ``v_i * r_{k-1}``, the ratio of a winner,
``<= B * v_i / V(S)`` and ``<= v_i * r_k``. Terms ``j > k`` are at most
``B * v_i / (V(S) + v_{k+1})``, which is below both: below ``B * v_i / V(S)`` plainly, and below
``v_i * c_{k+1} / v_{k+1}`` because bidder ``k + 1`` loses, ``c_{k+1} > B v_{k+1} / V_{k+1}``.
``critical_value`` computes ``theta_i`` position by position; the unit tests check it equals
``(threshold)`` and the threshold found by bisecting the allocation rule.

Why truthful. The allocation is monotone: lowering one's cost moves one forward in the order,
where the share ``B * v_i / (V'_{j-1} + v_i)`` is only larger, so a winner stays a winner and the
winning reports of ``i`` are an interval from 0 up to ``p_i`` (whether ``p_i`` itself wins depends
only on the tie-break by node id). A winner is paid ``p_i``, which does not depend on its report.
By Myerson's lemma (monotone allocation + threshold payments) reporting the true cost is a
dominant strategy: a report can change whether ``i`` wins, never what it is paid if it does, and
winning is worth ``p_i - c_i``, which is >= 0 exactly when the truthful report wins.

Why individually rational. A winner has ``c_i / v_i <= c_k / v_k <= B / V(S)`` and
``c_i / v_i <= c_{k+1} / v_{k+1}``, so ``c_i <= p_i``.

Why budget feasible. ``p_i <= B * v_i / V(S)`` for every winner, and these shares sum to ``B``.
No clamping is needed; the unit tests check the property (and this bound) on random instances.

Arithmetic: the mechanism is computed exactly, in rational arithmetic (``fractions.Fraction``) on
the reported floats, so the order, the share condition and the thresholds are those of the
argument above with no rounding: a subnormal cost does not tie with zero, and a winner's payment
is bit-for-bit independent of its own report. Each payment is then rounded down to a float; since
a winner's cost is a float ``<= p_i``, rounding down keeps ``payment >= cost`` exact, and the
payments' exact sum stays ``<= B``. The cost is O(n log n) for the sort plus O(n) for payments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["Allocation", "Bid", "critical_value", "proportional_share", "select_winners"]


@dataclass(frozen=True)
class Bid:
    """A node's sealed bid: its reported cost and the value the coordinator assigns it."""

    node_id: str
    cost: float
    value: float


@dataclass(frozen=True)
class Allocation:
    """The outcome of one auction: who is selected, and what each winner is paid."""

    winners: list[str] = field(default_factory=list)
    payments: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Exact:
    """A bid in exact arithmetic, so comparisons are the mathematical ones."""

    bid: Bid
    cost: Fraction
    value: Fraction
    ratio: Fraction


def _validate(bids: Sequence[Bid], budget: float) -> None:
    """Refuse input the mechanism's guarantees do not cover, naming the offending bid."""
    if not isinstance(budget, int | float) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    seen: set[str] = set()
    for bid in bids:
        if bid.node_id in seen:
            raise ValueError(f"duplicate bid from node {bid.node_id!r}: one bid per node")
        seen.add(bid.node_id)
        if not isinstance(bid.cost, int | float) or not math.isfinite(bid.cost) or bid.cost < 0:
            raise ValueError(f"cost of node {bid.node_id!r} must be a finite number >= 0, "
                             f"got {bid.cost!r}")
        if (not isinstance(bid.value, int | float) or not math.isfinite(bid.value)
                or bid.value <= 0):
            raise ValueError(f"value of node {bid.node_id!r} must be a finite number > 0, "
                             f"got {bid.value!r}")


def _order(bids: Sequence[Bid]) -> list[_Exact]:
    """Bidders by cost per unit of value, ties broken by node id so the order is deterministic."""
    exact = []
    for bid in bids:
        cost, value = Fraction(bid.cost), Fraction(bid.value)
        exact.append(_Exact(bid, cost, value, cost / value))
    return sorted(exact, key=lambda e: (e.ratio, e.bid.node_id))


def _winning_prefix(ordered: Sequence[_Exact], budget: Fraction) -> int:
    """Length k of the longest prefix whose last bidder gets its proportional share of B."""
    total = Fraction(0)
    k = 0
    for e in ordered:
        total += e.value
        if e.cost * total > budget * e.value:  # c_k > B * v_k / V_k
            break  # the condition fails from here on: c/v only grows, B/V only shrinks
        k += 1
    return k


def _threshold(value: Fraction, others: Sequence[_Exact], budget: Fraction) -> Fraction:
    """theta_i = max_j min(v_i * r_j, B * v_i / (V'_{j-1} + v_i)) over the positions j that i
    could take among ``others`` (sorted by ``_order``): the definition, for any bidder."""
    best = Fraction(0)
    before = Fraction(0)  # V'_{j-1}: the value of the others ahead of position j
    for other in others:
        best = max(best, min(value * other.ratio, budget * value / (before + value)))
        before += other.value
    return max(best, budget * value / (before + value))  # last position: no one to overtake


def _round_down(x: Fraction) -> float:
    """The largest float <= x: keeps payment >= cost exact and the exact total <= B."""
    f = float(x)
    return math.nextafter(f, -math.inf) if Fraction(f) > x else f


def select_winners(bids: Sequence[Bid], budget: float) -> list[str]:
    """The allocation rule alone: node ids of the winners, in the mechanism's order."""
    _validate(bids, budget)
    ordered = _order(bids)
    return [e.bid.node_id for e in ordered[: _winning_prefix(ordered, Fraction(budget))]]


def critical_value(bid: Bid, others: Sequence[Bid], budget: float) -> float:
    """The supremum of the costs ``bid`` could report and still win against ``others``.

    Only ``bid.value`` matters, not ``bid.cost``: that is the point. Rounded down to a float.
    """
    _validate([bid, *others], budget)
    return _round_down(_threshold(Fraction(bid.value), _order(others), Fraction(budget)))


def proportional_share(bids: Sequence[Bid], budget: float) -> Allocation:
    """Select winners under ``budget`` and pay each its critical value (Singer 2010).

    Truthful, individually rational and budget feasible; see the module docstring for why.
    """
    _validate(bids, budget)
    exact_budget = Fraction(budget)
    ordered = _order(bids)
    k = _winning_prefix(ordered, exact_budget)
    winners = ordered[:k]
    total_value = sum((e.value for e in winners), Fraction(0))
    first_loser = ordered[k] if k < len(ordered) else None
    payments: dict[str, float] = {}
    for e in winners:
        threshold = exact_budget * e.value / total_value  # its proportional share of B,
        if first_loser is not None:  # and above k+1's ratio it falls behind k+1, and loses
            threshold = min(threshold, e.value * first_loser.ratio)
        payments[e.bid.node_id] = _round_down(threshold)
    return Allocation(winners=[e.bid.node_id for e in winners], payments=payments)
