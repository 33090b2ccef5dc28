"""The vector tests of ``crossret.retrieval.bit_masks`` against numpy: ``equal_mask64`` bit by bit;
``any_popcount_below``, ``quarters_popcount_below`` and ``popcount_below_mask64`` at and around the
smallest distances."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest
from numba.core.errors import TypingError

from crossret.retrieval.bit_masks import (
    BELOW_BLOCK,
    MASK_WIDTH,
    any_popcount_below,
    blocks_popcount_below,
    equal_mask64,
    popcount_below_mask64,
    quarters_popcount_below,
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
_quarters = _compiled(quarters_popcount_below)
_mask = _compiled(popcount_below_mask64)
_blocks = _compiled(blocks_popcount_below)
_ALL = (_below, _quarters, _mask, _blocks)


def _bits(hit: np.ndarray) -> int:
    return int(sum(1 << int(i) for i in np.flatnonzero(hit)))


@pytest.mark.parametrize("n_words", [1, 2, 4])
def test_the_below_tests_are_exact_at_the_bound(n_words: int) -> None:
    # Word-major codes (word w of item j at start + w * stride + j). For every bound around the smallest
    # distance of the 256 codes and of each quarter: any_popcount_below says "some code below" for the
    # 256, quarters_popcount_below the same per quarter, blocks_popcount_below per 256 of 1,024 codes,
    # and popcount_below_mask64 names every code of a quarter below the bound. None may look at the
    # codes after its own (often nearer ones are there).
    rng = np.random.default_rng(n_words)
    stride = 4 * BELOW_BLOCK + 37
    start = 11
    for trial in range(30):
        codes = rng.integers(0, 2**63, n_words * stride + start, dtype=np.int64).view(np.uint64)
        if trial % 3 == 0:  # sparse bits: small distances, down to 0
            codes &= rng.integers(0, 2**63, codes.size, dtype=np.int64).view(np.uint64)
        query = codes[start + 5 + np.arange(n_words) * stride].copy() if trial % 5 == 0 else \
            rng.integers(0, 2**63, n_words, dtype=np.int64).view(np.uint64)
        span = np.zeros(4 * BELOW_BLOCK, np.int64)
        for w in range(n_words):
            block = codes[start + w * stride:start + w * stride + 4 * BELOW_BLOCK]
            span += np.bitwise_count(block ^ query[w]).astype(np.int64)
        distance = span[:BELOW_BLOCK]
        quarters = distance.reshape(4, MASK_WIDTH)
        blocks = span.reshape(4, BELOW_BLOCK)
        bounds = {0, 1, 64 * n_words, 64 * n_words + 1}
        for nearest in np.concatenate([quarters.min(axis=1), blocks.min(axis=1)]):
            bounds |= {max(int(nearest) - 1, 0), int(nearest), int(nearest) + 1, int(nearest) + 3}
        for bound in sorted(bounds):
            args = (codes, np.uint64(start), np.uint64(stride), n_words, query, np.int64(bound))
            assert _below(*args) == (distance.min() < bound), (trial, bound)
            assert _quarters(*args) == _bits(quarters.min(axis=1) < bound), (trial, bound)
            assert _blocks(*args) == _bits(blocks.min(axis=1) < bound), (trial, bound)
            for part in range(4):
                at = np.uint64(start + part * MASK_WIDTH)
                got = _mask(codes, at, np.uint64(stride), n_words, query, np.int64(bound))
                assert int(got) == _bits(quarters[part] < bound), (trial, bound, part)


@pytest.mark.parametrize("test", _ALL)
def test_the_below_tests_refuse_codes_that_are_not_uint64(test: object) -> None:
    with pytest.raises(TypingError):
        test(np.zeros(BELOW_BLOCK, np.int64), np.uint64(0), np.uint64(0), 1, np.zeros(1, np.uint64), np.int64(3))


@pytest.mark.parametrize("n_words", [1, 2, 4])
def test_the_below_tests_at_distance_zero_everywhere_and_the_largest_bound(n_words: int) -> None:
    # Every code equals the query: distance 0 is below any bound from 1 up to 64 · words + 1.
    query = np.random.default_rng(n_words).integers(0, 2**63, n_words, dtype=np.int64).view(np.uint64)
    codes = np.repeat(query, 4 * BELOW_BLOCK)  # word-major, stride 1,024
    for bound in (0, 1, 64 * n_words, 64 * n_words + 1):
        args = (codes, np.uint64(0), np.uint64(4 * BELOW_BLOCK), n_words, query, np.int64(bound))
        assert _below(*args) == (bound > 0), bound
        assert _quarters(*args) == (0b1111 if bound > 0 else 0), bound
        assert _blocks(*args) == (0b1111 if bound > 0 else 0), bound
        assert int(_mask(*args)) == (2**64 - 1 if bound > 0 else 0), bound
