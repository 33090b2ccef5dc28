"""``equal_mask64``: bit i of the result is ``array[start + i] == value``, checked against numpy."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest
from numba.core.errors import TypingError

from crossret.retrieval.bit_masks import MASK_WIDTH, equal_mask64


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
