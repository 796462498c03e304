"""Shamir sharing over GF(2^256 + 297) (privacy.secagg.shamir): the field's prime, test vectors
of fixed polynomials (shares and secrets known by hand), round trips and refusals."""

from __future__ import annotations

import contextlib
import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.privacy.secagg.shamir import (
    PRIME,
    ShamirError,
    combine,
    evaluate_polynomial,
    lagrange_at_zero,
    split,
)

_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83,
          89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173)


def _miller_rabin(n: int) -> bool:
    """False means composite (a proof); True means prime except with probability < 4^-40."""
    if n < 2:
        return False
    for p in _BASES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _as_secret(value: int) -> bytes:
    return value.to_bytes(32, "big")


def test_the_modulus_is_the_smallest_prime_above_2_to_256():
    assert PRIME == 2**256 + 297
    assert _miller_rabin(PRIME)
    # every smaller candidate is provably composite (a Miller-Rabin witness or a small factor)
    assert not any(_miller_rabin(2**256 + i) for i in range(1, 297))
    assert not _miller_rabin(2**256 + 299)  # the check does say "composite" when it should
    sympy = pytest.importorskip("sympy")
    assert sympy.isprime(PRIME)


def test_vector_small_polynomial_from_the_textbook_example():
    # f(x) = 1234 + 166 x + 94 x^2 (Wikipedia's "Shamir's secret sharing" example)
    shares = evaluate_polynomial([1234, 166, 94], range(1, 7))
    assert shares == {1: 1494, 2: 1942, 3: 2578, 4: 3402, 5: 4414, 6: 5614}
    for subset in itertools.combinations(shares, 3):
        assert combine({x: shares[x] for x in subset}, 3) == _as_secret(1234)


def test_vector_values_that_wrap_around_the_modulus():
    # f(x) = (2^256 - 1) - x: f(1) = 2^256 - 2, f(2) = 2^256 - 3, f(3) = 2^256 - 4
    shares = evaluate_polynomial([2**256 - 1, PRIME - 1], [1, 2, 3])
    assert shares == {1: 2**256 - 2, 2: 2**256 - 3, 3: 2**256 - 4}
    assert combine({2: shares[2], 3: shares[3]}, 2) == _as_secret(2**256 - 1)
    # f(x) = 5 - x + x^2: 5, 7, 11 at 1, 2, 3; f(4) = 17
    shares = evaluate_polynomial([5, PRIME - 1, 1], [1, 2, 3, 4])
    assert shares == {1: 5, 2: 7, 3: 11, 4: 17}
    assert combine({2: 7, 3: 11, 4: 17}, 3) == _as_secret(5)


def test_lagrange_coefficients_at_zero_for_points_1_2_3():
    # l1 = 2*3/((2-1)(3-1)) = 3, l2 = 1*3/((1-2)(3-2)) = -3, l3 = 1*2/((1-3)(2-3)) = 1
    assert lagrange_at_zero([1, 2, 3]) == {1: 3, 2: PRIME - 3, 3: 1}


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(2, 12), st.data())
def test_any_threshold_subset_recovers_the_secret(secret, n, data):
    t = data.draw(st.integers(1, n))
    points = data.draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    shares = split(secret, t, points)
    subset = data.draw(st.lists(st.sampled_from(points), min_size=t, max_size=n, unique=True))
    assert combine({x: shares[x] for x in subset}, t) == secret


def test_shares_are_fresh_each_time():
    secret = secrets.token_bytes(32)
    a, b = split(secret, 3, [1, 2, 3, 4]), split(secret, 3, [1, 2, 3, 4])
    assert a != b  # random coefficients: two sharings of one secret differ
    assert combine(a, 3) == combine(b, 3) == secret


def test_refusals():
    with pytest.raises(ShamirError):
        split(b"short", 2, [1, 2])
    with pytest.raises(ShamirError):
        split(bytes(32), 3, [1, 2])  # threshold above the share count
    with pytest.raises(ShamirError):
        split(bytes(32), 2, [1, 1, 2])  # duplicate points
    with pytest.raises(ShamirError):
        split(bytes(32), 2, [0, 1])  # x = 0 would hand out the secret
    shares = split(bytes(32), 3, [1, 2, 3])
    with pytest.raises(ShamirError):
        combine({1: shares[1], 2: shares[2]}, 3)  # fewer than t
    with pytest.raises(ShamirError):
        combine({1: PRIME, 2: 0, 3: 0}, 3)  # not a field element


def test_a_wrong_share_never_silently_gives_the_secret():
    secret = secrets.token_bytes(32)
    shares = split(secret, 2, [1, 2, 3])
    shares[1] = (shares[1] + 1) % PRIME
    with contextlib.suppress(ShamirError):  # or: combined to a value >= 2^256, refused
        assert combine({1: shares[1], 2: shares[2]}, 2) != secret
