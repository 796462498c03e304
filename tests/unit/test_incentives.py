"""The proportional-share auction's guarantees, proved by property tests over random instances.

Each property is a plain function that returns a counterexample (a string saying what broke) or
None, so the same checks can be run against a deliberately non-truthful pay-as-bid rule, where
they must find a counterexample: the tests can fail.

The checks are exact, with no tolerance: the mechanism computes in rational arithmetic and rounds
payments down, so its guarantees hold bit for bit on floats (see coordinator/incentives.py).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from confide.coordinator.incentives import (
    Allocation,
    Bid,
    critical_value,
    proportional_share,
    select_winners,
)

Mechanism = Callable[[Sequence[Bid], float], Allocation]

PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def pay_as_bid(bids: Sequence[Bid], budget: float) -> Allocation:
    """The same allocation, but each winner is paid what it reported: NOT truthful."""
    winners = select_winners(bids, budget)
    costs = {b.node_id: float(b.cost) for b in bids}
    return Allocation(winners=winners, payments={w: costs[w] for w in winners})


# ------------------------------------------------------------------------ instances

COSTS = st.one_of(st.floats(0, 100), st.sampled_from([0.0, 1.0, 2.0, 5.0, 40.0]))
VALUES = st.one_of(st.floats(0.5, 100), st.sampled_from([1.0, 2.0, 64.0]))
BUDGETS = st.one_of(st.floats(0, 200), st.sampled_from([0.0, 10.0, 100.0]))
REPORTS = st.one_of(COSTS, st.floats(0, 300))


@st.composite
def instances(draw) -> tuple[list[Bid], float]:
    """2..8 bidders (ties in cost/value included; ids shuffled so id order is not bid order)."""
    n = draw(st.integers(2, 8))
    ids = draw(st.permutations([f"node{k}" for k in range(8)]))[:n]
    return [Bid(node_id, draw(COSTS), draw(VALUES)) for node_id in ids], draw(BUDGETS)


@st.composite
def deviations(draw) -> tuple[list[Bid], float, int, float]:
    """An instance, one bidder in it, and another cost that bidder might report instead."""
    bids, budget = draw(instances())
    return bids, budget, draw(st.integers(0, len(bids) - 1)), draw(REPORTS)


# ------------------------------------------------------------------------ the checks

def _reporting(bids: Sequence[Bid], i: int, cost: float) -> list[Bid]:
    """The same bids except that bidder ``i`` reports ``cost``; the others are fixed."""
    return [replace(b, cost=cost) if k == i else b for k, b in enumerate(bids)]


def _utility(mechanism: Mechanism, bids: Sequence[Bid], budget: float, i: int,
             true_cost: float) -> float:
    """Quasi-linear utility of bidder ``i``: payment minus true cost if selected, else 0."""
    payments = mechanism(bids, budget).payments
    node = bids[i].node_id
    return payments[node] - true_cost if node in payments else 0.0


def truthfulness_violation(mechanism: Mechanism, bids: Sequence[Bid], budget: float, i: int,
                           report: float) -> str | None:
    """Bidder ``i`` gains by reporting ``report`` instead of its true cost, others fixed."""
    true_cost = bids[i].cost
    truth = _utility(mechanism, bids, budget, i, true_cost)
    lie = _utility(mechanism, _reporting(bids, i, report), budget, i, true_cost)
    if lie > truth:
        return (f"{bids[i].node_id} (true cost {true_cost!r}) gets utility {lie!r} by reporting "
                f"{report!r}, {truth!r} by telling the truth; bids={bids!r}, budget={budget!r}")
    return None


def individual_rationality_violation(mechanism: Mechanism, bids: Sequence[Bid],
                                     budget: float) -> str | None:
    """A winner is paid less than its (truthfully reported) cost."""
    allocation = mechanism(bids, budget)
    if set(allocation.payments) != set(allocation.winners):
        return f"payments {allocation.payments!r} are not exactly for winners {allocation!r}"
    for bid in bids:
        if bid.node_id in allocation.payments and allocation.payments[bid.node_id] < bid.cost:
            return (f"{bid.node_id} paid {allocation.payments[bid.node_id]!r} < cost "
                    f"{bid.cost!r}; bids={bids!r}, budget={budget!r}")
    return None


def budget_violation(mechanism: Mechanism, bids: Sequence[Bid], budget: float) -> str | None:
    """The payments add up to more than the budget (fsum: the correctly rounded exact sum)."""
    total = math.fsum(mechanism(bids, budget).payments.values())
    if total > budget:
        return f"payments total {total!r} > budget {budget!r}; bids={bids!r}"
    return None


def monotonicity_violation(mechanism: Mechanism, bids: Sequence[Bid], budget: float, i: int,
                           report: float) -> str | None:
    """Lowering one's cost deselects (equivalently: raising it selects a loser)."""
    low, high = sorted((bids[i].cost, report))
    node = bids[i].node_id
    wins_low = node in mechanism(_reporting(bids, i, low), budget).winners
    wins_high = node in mechanism(_reporting(bids, i, high), budget).winners
    if wins_high and not wins_low:
        return (f"{node} wins reporting {high!r} but not {low!r}; bids={bids!r}, "
                f"budget={budget!r}")
    return None


def payment_dependence(mechanism: Mechanism, bids: Sequence[Bid], budget: float, i: int,
                       report: float) -> str | None:
    """A winner's payment changes with its own report while it stays a winner."""
    node = bids[i].node_id
    first = mechanism(bids, budget).payments.get(node)
    second = mechanism(_reporting(bids, i, report), budget).payments.get(node)
    if first is None or second is None:
        return None  # not a winner at both reports: nothing to compare
    if first != second:
        return (f"{node} is paid {first!r} reporting {bids[i].cost!r} but {second!r} reporting "
                f"{report!r}; bids={bids!r}, budget={budget!r}")
    return None


def _threshold_by_bisection(bids: Sequence[Bid], budget: float, i: int) -> tuple[float, float]:
    """Adjacent floats around the critical value, found from the allocation rule alone (it is
    monotone in i's cost): bidder i wins reporting ``lo``, loses reporting ``hi``."""
    node = bids[i].node_id

    def wins(bits: int) -> bool:
        return node in select_winners(_reporting(bids, i, _from_bits(bits)), budget)

    # wins at 0 always; never wins above its share, which is <= B
    lo, hi = _to_bits(0.0), _to_bits(budget + 1.0)
    assert wins(lo)
    assert not wins(hi)
    while hi - lo > 1:  # over the bit patterns: non-negative floats order like their bits
        mid = (lo + hi) // 2
        if wins(mid):
            lo = mid
        else:
            hi = mid
    return _from_bits(lo), _from_bits(hi)


def _to_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _from_bits(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", n))[0]


def _breakpoints(bids: Sequence[Bid], budget: float, i: int) -> list[float]:
    """Every cost at which bidder i's rank or the share condition changes, and just around it."""
    me = bids[i]
    others = sorted((b for k, b in enumerate(bids) if k != i),
                    key=lambda b: (b.cost / b.value, b.node_id))
    points, before = [0.0], 0.0
    for other in others:
        points.append(budget * me.value / (before + me.value))
        points.append(me.value * other.cost / other.value)
        before += other.value
    points.append(budget * me.value / (before + me.value))
    return [p * f for p in points for f in (1 - 1e-7, 1.0, 1 + 1e-7)]


# ------------------------------------------------------------------------ the mechanism passes

@PROPERTY
@given(deviations())
def test_truthful_no_misreport_beats_the_truth(case):
    assert truthfulness_violation(proportional_share, *case) is None


@settings(PROPERTY, max_examples=120)
@given(instances())
def test_truthful_against_every_breakpoint(instance):
    """Misreports exactly at, and just either side of, every place the outcome can change."""
    bids, budget = instance
    for i in range(len(bids)):
        for report in _breakpoints(bids, budget, i):
            assert truthfulness_violation(proportional_share, bids, budget, i, report) is None


@PROPERTY
@given(instances())
def test_individually_rational(instance):
    assert individual_rationality_violation(proportional_share, *instance) is None


@PROPERTY
@given(instances())
def test_budget_feasible(instance):
    assert budget_violation(proportional_share, *instance) is None


@PROPERTY
@given(instances())
def test_each_payment_within_its_proportional_share(instance):
    """The lemma behind budget feasibility: p_i <= B * v_i / V(S) for every winner i."""
    bids, budget = instance
    allocation = proportional_share(bids, budget)
    total_value = sum(Fraction(b.value) for b in bids if b.node_id in allocation.payments)
    for bid in bids:
        if bid.node_id in allocation.payments:
            share = Fraction(budget) * Fraction(bid.value) / total_value
            assert Fraction(allocation.payments[bid.node_id]) <= share


@PROPERTY
@given(deviations())
def test_monotone_lowering_cost_never_deselects(case):
    assert monotonicity_violation(proportional_share, *case) is None


@PROPERTY
@given(deviations())
def test_payment_independent_of_own_winning_report(case):
    assert payment_dependence(proportional_share, *case) is None


@settings(PROPERTY, max_examples=100)
@given(instances())
def test_payment_is_the_critical_value_of_the_allocation(instance):
    """Three ways agree: the closed-form payment, the position-by-position critical value, and
    the threshold found by bisecting the allocation rule."""
    bids, budget = instance
    allocation = proportional_share(bids, budget)
    for i, bid in enumerate(bids):
        lo, hi = _threshold_by_bisection(bids, budget, i)
        others = [b for k, b in enumerate(bids) if k != i]
        assert lo <= critical_value(bid, others, budget) <= hi
        if bid.node_id in allocation.payments:
            assert allocation.payments[bid.node_id] == critical_value(bid, others, budget)
        else:
            assert bid.cost >= hi  # a loser's cost is above its critical value


# ------------------------------------------------------------------------ the checks can fail

FIND = settings(max_examples=5000, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def test_pay_as_bid_is_caught_lying_pays():
    """Hypothesis finds an instance where a pay-as-bid winner gains by overstating its cost."""
    case = find(deviations(),
                lambda c: truthfulness_violation(pay_as_bid, *c) is not None, settings=FIND)
    assert truthfulness_violation(pay_as_bid, *case) is not None
    assert truthfulness_violation(proportional_share, *case) is None


def test_pay_as_bid_is_caught_paying_by_report():
    case = find(deviations(), lambda c: payment_dependence(pay_as_bid, *c) is not None,
                settings=FIND)
    assert payment_dependence(pay_as_bid, *case) is not None
    assert payment_dependence(proportional_share, *case) is None


def test_pay_as_bid_concrete_counterexample():
    """The integration instance: node0 (cost 1) reports 5 and is paid 5 instead of 1."""
    bids = [Bid("node0", 1.0, 64.0), Bid("node1", 2.0, 64.0), Bid("node2", 40.0, 64.0)]
    assert truthfulness_violation(pay_as_bid, bids, 10.0, 0, 5.0) is not None
    assert truthfulness_violation(proportional_share, bids, 10.0, 0, 5.0) is None
    # the other properties hold for pay-as-bid: they alone would not expose it
    assert individual_rationality_violation(pay_as_bid, bids, 10.0) is None
    assert budget_violation(pay_as_bid, bids, 10.0) is None


def test_checks_catch_a_budget_breaking_and_an_irrational_rule():
    """Budget and IR checks fire on rules that pay everyone the budget, or nothing."""
    bids = [Bid("a", 1.0, 1.0), Bid("b", 1.0, 1.0)]

    def pay_the_budget(bs: Sequence[Bid], budget: float) -> Allocation:
        winners = select_winners(bs, budget)
        return Allocation(winners, {w: budget for w in winners})

    def pay_nothing(bs: Sequence[Bid], budget: float) -> Allocation:
        winners = select_winners(bs, budget)
        return Allocation(winners, dict.fromkeys(winners, 0.0))

    assert budget_violation(pay_the_budget, bids, 10.0) is not None
    assert individual_rationality_violation(pay_nothing, bids, 10.0) is not None


# ------------------------------------------------------------------------ concrete instances

def test_integration_instance_cheap_nodes_win_within_budget():
    """Costs 1, 2, 40, values ~64 (dataset sizes), budget 10: the two cheap nodes win."""
    for values in ((64.0, 64.0, 64.0), (70.0, 60.0, 64.0), (60.0, 68.0, 66.0)):
        bids = [Bid(f"node{k}", cost, value)
                for k, (cost, value) in enumerate(zip((1.0, 2.0, 40.0), values, strict=True))]
        allocation = proportional_share(bids, 10.0)
        assert sorted(allocation.winners) == ["node0", "node1"]
        assert set(allocation.payments) == {"node0", "node1"}
        assert sum(allocation.payments.values()) <= 10.0 + 1e-9
        assert allocation.payments["node0"] >= 1.0
        assert allocation.payments["node1"] >= 2.0
    equal = proportional_share([Bid("node0", 1.0, 64.0), Bid("node1", 2.0, 64.0),
                                Bid("node2", 40.0, 64.0)], 10.0)
    assert equal.payments == {"node0": 5.0, "node1": 5.0}  # B * v_i / V(S), the whole budget


def test_zero_costs_and_zero_budget():
    free = [Bid("a", 0.0, 1.0), Bid("b", 0.0, 3.0)]
    assert proportional_share(free, 8.0).payments == {"a": 2.0, "b": 6.0}
    assert proportional_share(free, 0.0).payments == {"a": 0.0, "b": 0.0}
    assert proportional_share([Bid("a", 1.0, 1.0)], 0.0).winners == []


def test_empty_and_deterministic_ties():
    assert proportional_share([], 10.0) == Allocation([], {})
    tied = [Bid("b", 1.0, 1.0), Bid("a", 1.0, 1.0), Bid("c", 1.0, 1.0)]
    assert proportional_share(tied, 10.0).winners == ["a", "b", "c"]
    assert proportional_share(list(reversed(tied)), 10.0) == proportional_share(tied, 10.0)


@pytest.mark.parametrize(("bids", "budget", "message"), [
    ([Bid("a", -1.0, 1.0)], 10.0, "cost of node 'a'"),
    ([Bid("a", math.nan, 1.0)], 10.0, "cost of node 'a'"),
    ([Bid("a", math.inf, 1.0)], 10.0, "cost of node 'a'"),
    ([Bid("a", 1.0, 0.0)], 10.0, "value of node 'a'"),
    ([Bid("a", 1.0, -2.0)], 10.0, "value of node 'a'"),
    ([Bid("a", 1.0, math.nan)], 10.0, "value of node 'a'"),
    ([Bid("a", 1.0, math.inf)], 10.0, "value of node 'a'"),
    ([Bid("a", 1.0, 1.0)], -1.0, "budget must be"),
    ([Bid("a", 1.0, 1.0)], math.nan, "budget must be"),
    ([Bid("a", 1.0, 1.0)], math.inf, "budget must be"),
    ([Bid("a", 1.0, 1.0), Bid("a", 2.0, 1.0)], 10.0, "duplicate bid from node 'a'"),
])
def test_bad_input_is_refused(bids, budget, message):
    with pytest.raises(ValueError, match=message):
        proportional_share(bids, budget)
