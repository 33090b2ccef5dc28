"""The vector tests of ``crossret.retrieval.bit_masks`` against numpy: ``equal_mask64`` bit by bit and
``any_popcount_below`` at and around the smallest distance."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest
from numba.core.errors import TypingError

from crossret.retrieval.bit_masks import (
    BELOW_BLOCK,
    MASK_WIDTH,
    any_popcount_below,
    any_popcount_below_64,
    equal_mask64,
)


@nb.njit(cache=False)
def _masks(array, starts, value):  # pragma: no cover - compiled
    out = np.empty(starts.shape[0], np.uint64)
    for i in range(starts.shape[0]):
        out[i] = equal_mask64(array, starts[i], value)
    return out


def _reference(array: np.ndarray, start: int, value: object) -> int:
    hits = np.flatnonzero(array[start:start + MASK_WIDTH] == value)
    return int(sum(1 << int(i) for i in hits))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_mask_bits_are_the_equalities_at_every_offset(dtype: type) -> None:
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    info = np.iinfo(dtype)
    pool = np.array([info.min, info.max, 0, 1, 7], dtype=dtype)  # extremes: no sign mix-up
    array = pool[rng.integers(0, pool.size, 300)]
    starts = np.array([0, 1, 5, 63, 64, 101, 300 - MASK_WIDTH], np.int64)
    for value in pool:
        got = _masks(array, starts, dtype(value))
        assert [int(m) for m in got] == [_reference(array, int(s), value) for s in starts], value


def test_all_equal_and_none_equal_give_full_and_empty_masks() -> None:
    array = np.full(MASK_WIDTH, 3, np.int32)
    assert int(_masks(array, np.array([0]), np.int32(3))[0]) == 2**64 - 1
    assert int(_masks(array, np.array([0]), np.int32(4))[0]) == 0


def test_a_value_of_another_dtype_is_a_typing_error_not_a_truncation() -> None:
    # 300 truncated to uint8 would be 44 and match silently.
    with pytest.raises(TypingError):
        _masks(np.full(MASK_WIDTH, 44, np.uint8), np.array([0]), np.int64(300))


def _compiled(test: object) -> object:
    """A compiled caller of ``test`` (an intrinsic) that passes the query words as a tuple."""

    @nb.njit(cache=False)
    def call(codes, start, stride, n_words, a, bound):  # pragma: no cover - compiled
        if n_words == 1:
            return test(codes, start, stride, (a[0],), bound)
        if n_words == 2:
            return test(codes, start, stride, (a[0], a[1]), bound)
        return test(codes, start, stride, (a[0], a[1], a[2], a[3]), bound)

    return call


_below = _compiled(any_popcount_below)


_TESTS = {BELOW_BLOCK: _below, MASK_WIDTH: _compiled(any_popcount_below_64)}  # codes per test -> the test


@pytest.mark.parametrize("n_codes", [BELOW_BLOCK, MASK_WIDTH])
@pytest.mark.parametrize("n_words", [1, 2, 4])
def test_any_popcount_below_is_exact_at_the_bound(n_words: int, n_codes: int) -> None:
    # Word-major codes (word w of item j at start + w * stride + j); the test must say "some item below
    # the bound" exactly when the smallest distance of its n_codes items is below it, for every bound
    # around it (and ignore the items after them, which are often nearer).
    rng = np.random.default_rng(n_words)
    stride = BELOW_BLOCK + 37
    start = 11
    for trial in range(30):
        codes = rng.integers(0, 2**63, n_words * stride + start, dtype=np.int64).view(np.uint64)
        if trial % 3 == 0:  # sparse bits: small distances, down to 0
            codes &= rng.integers(0, 2**63, codes.size, dtype=np.int64).view(np.uint64)
        query = codes[start + 5 + np.arange(n_words) * stride].copy() if trial % 5 == 0 else \
            rng.integers(0, 2**63, n_words, dtype=np.int64).view(np.uint64)
        distance = np.zeros(n_codes, np.int64)
        for w in range(n_words):
            block = codes[start + w * stride:start + w * stride + n_codes]
            distance += np.bitwise_count(block ^ query[w]).astype(np.int64)
        nearest = int(distance.min())
        for bound in {0, 1, max(nearest - 1, 0), nearest, nearest + 1, 64 * n_words, 64 * n_words + 1}:
            got = _TESTS[n_codes](codes, np.uint64(start), np.uint64(stride), n_words, query, np.int64(bound))
            assert got == (nearest < bound), (trial, nearest, bound)


def test_any_popcount_below_refuses_codes_that_are_not_uint64() -> None:
    with pytest.raises(TypingError):
        _below(np.zeros(BELOW_BLOCK, np.int64), np.uint64(0), np.uint64(0), 1, np.zeros(1, np.uint64), np.int64(3))


@pytest.mark.parametrize("n_words", [1, 2, 4])
def test_any_popcount_below_at_distance_zero_everywhere_and_the_largest_bound(n_words: int) -> None:
    # Every code equals the query: distance 0 is below any bound from 1 up to 64 · words + 1.
    query = np.random.default_rng(n_words).integers(0, 2**63, n_words, dtype=np.int64).view(np.uint64)
    codes = np.repeat(query, BELOW_BLOCK)  # word-major, stride 256
    for bound in (0, 1, 64 * n_words, 64 * n_words + 1):
        got = _below(codes, np.uint64(0), np.uint64(BELOW_BLOCK), n_words, query, np.int64(bound))
        assert got == (bound > 0), bound
