"""Fixed-point ring encoding and the mask PRG (privacy.secagg.masking): the documented step, the
overflow bound at its edge, refusals, and the PRG being ChaCha20's keystream."""

from __future__ import annotations

import numpy as np
import pytest

from confide.privacy.secagg.masking import (
    FixedPointCodec,
    MaskingError,
    pairwise_sign,
    prg_ring_elements,
)


def _ring_sum(codec: FixedPointCodec, vectors, weights) -> np.ndarray:
    total = np.zeros(len(vectors[0]) + 1, dtype=codec.dtype)
    for v, w in zip(vectors, weights, strict=True):
        total += codec.encode(v, w)
    return total


@pytest.mark.parametrize("bits", [32, 64])
def test_weighted_sum_within_the_documented_step(bits):
    rng = np.random.default_rng(1)
    n = 20
    codec = FixedPointCodec.for_bounds(max_nodes=n, max_weight=500, clip=2.0, bits=bits)
    vectors = [rng.uniform(-2, 2, 1000) for _ in range(n)]
    weights = [int(w) for w in rng.integers(0, 501, n)]
    got, weight_total = codec.decode_sum(_ring_sum(codec, vectors, weights))
    exact = sum(w * v for w, v in zip(weights, vectors, strict=True))
    assert weight_total == sum(weights)
    assert np.max(np.abs(got - exact)) <= n * codec.step / 2
    assert np.max(np.abs(got - exact)) > 0  # floats are rounded: the bound is what is promised


def test_multiples_of_the_step_and_integers_come_back_exactly():
    rng = np.random.default_rng(2)
    codec = FixedPointCodec(32, 10, clip=100.0, max_weight=7, max_nodes=5)
    vectors = [rng.integers(-100 * 1024, 100 * 1024, 300) / 1024 for _ in range(5)]
    weights = [1, 2, 3, 7, 0]
    got, total = codec.decode_sum(_ring_sum(codec, vectors, weights))
    np.testing.assert_array_equal(got, sum(w * v for w, v in zip(weights, vectors, strict=True)))
    assert total == 13
    ints = FixedPointCodec(64, 0, clip=2.0**40, max_weight=1, max_nodes=100)
    vectors = [rng.integers(-(2**40), 2**40, 50).astype(np.float64) for _ in range(100)]
    got, _ = ints.decode_sum(_ring_sum(ints, vectors, [1] * 100))
    np.testing.assert_array_equal(got.astype(np.int64),
                                  np.sum(np.stack(vectors), axis=0).astype(np.int64))


@pytest.mark.parametrize("bits", [32, 64])
def test_the_overflow_bound_is_tight_enough_and_never_wrong(bits):
    n, weight, clip = 37, 1000, 1.5
    codec = FixedPointCodec.for_bounds(max_nodes=n, max_weight=weight, clip=clip, bits=bits)
    # one bit finer would be refused: for_bounds picked the finest admissible step
    with pytest.raises(MaskingError, match=r"overflow|2\^53"):
        FixedPointCodec(bits, codec.frac_bits + 1, clip, weight, n)
    # the worst case the bound allows decodes correctly at both ends
    for sign in (1.0, -1.0):
        vectors = [np.full(4, sign * clip)] * n
        got, total = codec.decode_sum(_ring_sum(codec, vectors, [weight] * n))
        np.testing.assert_array_equal(got, np.full(4, sign * clip * weight * n))
        assert total == n * weight


def test_parameters_that_could_overflow_are_refused():
    with pytest.raises(MaskingError, match="overflow"):
        FixedPointCodec(32, 16, clip=1.0, max_weight=1000, max_nodes=100)
    with pytest.raises(MaskingError):
        FixedPointCodec.for_bounds(max_nodes=2**20, max_weight=2**12, clip=1.0, bits=32)
    with pytest.raises(MaskingError):
        FixedPointCodec(48, 8, 1.0, 1, 1)


def test_inputs_outside_the_bounds_are_refused_not_clipped():
    codec = FixedPointCodec(32, 8, clip=1.0, max_weight=10, max_nodes=4)
    with pytest.raises(MaskingError, match="clip"):
        codec.encode(np.array([0.5, 1.01]))
    with pytest.raises(MaskingError, match="weight"):
        codec.encode(np.zeros(3), 11)
    with pytest.raises(MaskingError):
        codec.encode(np.array([np.nan]))
    with pytest.raises(MaskingError):
        codec.encode(np.zeros(3), 1.5)  # type: ignore[arg-type]


def test_prg_is_the_chacha20_keystream():
    # RFC 7539 / the original ChaCha20 test vector: all-zero key and nonce, block 0
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    assert prg_ring_elements(bytes(32), 16, 32).tobytes() == expected
    assert prg_ring_elements(bytes(32), 8, 64).tobytes() == expected
    seed = bytes(range(32))
    np.testing.assert_array_equal(prg_ring_elements(seed, 100, 32),
                                  prg_ring_elements(seed, 100, 32))
    assert not np.array_equal(prg_ring_elements(seed, 100, 32),
                              prg_ring_elements(bytes(31) + b"\x01", 100, 32))
    with pytest.raises(MaskingError):
        prg_ring_elements(b"short", 4, 32)


def test_prg_output_looks_uniform_on_the_ring():
    values = prg_ring_elements(bytes(range(32)), 160_000, 32)
    counts = np.bincount((values >> 28).astype(np.int64), minlength=16)
    expected = values.size / 16
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 60  # 15 degrees of freedom: p ~ 1e-7 at 60; a biased stream is far above


def test_pairwise_signs_are_opposite():
    assert pairwise_sign("a", "b") == 1 and pairwise_sign("b", "a") == -1
    with pytest.raises(MaskingError):
        pairwise_sign("a", "a")
