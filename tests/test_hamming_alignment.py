"""Buffers and copies of the Hamming kernels start on a cache line; results do not depend on it."""

from __future__ import annotations

import numpy as np
import pytest

from crossret.retrieval import hamming


def _assert_stable(q: np.ndarray, db: np.ndarray, k: int) -> None:
    """hamming_topk against a stable sort of the full distance rows (ties by position)."""
    got_d, got_i = hamming.hamming_topk(q, db, k)
    dist = np.bitwise_count(q[:, None, 0] ^ db[None, :, 0]).astype(np.int64)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got_i, order)
    np.testing.assert_array_equal(got_d, np.take_along_axis(dist, order, axis=1))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.uint64])
def test_kernel_buffers_start_on_a_cache_line(dtype: type) -> None:
    for n in (1, 7, 256, 4096):
        buf = hamming._aligned_empty(n, dtype)
        assert buf.shape == (n,) and buf.dtype == dtype
        assert buf.ctypes.data % hamming._ALIGN == 0


def test_aligned_copy_is_an_equal_copy_on_a_cache_line() -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, 1001, dtype=np.int64).view(np.uint64)
    for offset in range(8):
        view = base[offset:offset + 993].reshape(-1, 1)
        copy = hamming.aligned_copy(view)
        assert copy.ctypes.data % hamming._ALIGN == 0
        assert copy.shape == view.shape and copy.dtype == view.dtype
        np.testing.assert_array_equal(copy, view)
        assert not np.shares_memory(copy, view)


def test_a_misaligned_one_word_database_is_searched_from_an_aligned_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many queries over 1-word codes that start mid cache line: the scan reads an aligned copy and
    # returns exactly what a stable sort does; below the query count it reads the codes in place.
    monkeypatch.setattr(hamming, "uses_threshold_scan", lambda *args: True)
    rng = np.random.default_rng(6)
    raw = rng.integers(0, 60, 70_001).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    db = raw[:-1] if raw.ctypes.data % hamming._ALIGN else raw[1:]
    assert db.ctypes.data % hamming._ALIGN
    copies: list[int] = []
    real_copy = hamming.aligned_copy
    monkeypatch.setattr(hamming, "aligned_copy", lambda a: copies.append(a.size) or real_copy(a))
    monkeypatch.setattr(hamming, "_ALIGNED_COPY_QUERIES", 40)
    q = rng.integers(0, 60, (40, 1)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    q[::2] = rng.integers(0, 2**63, (20, 1), dtype=np.int64).view(np.uint64)  # and fresh codes
    _assert_stable(q, db.reshape(-1, 1), 10)
    assert copies == [db.size]
    _assert_stable(q[:39], db.reshape(-1, 1), 10)
    assert copies == [db.size]
