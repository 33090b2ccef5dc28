"""``ranking_metrics`` (arbitrary score matrices, whole or streamed) against a brute-force Python reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from _ranking_reference import metrics_from_orders
from crossret.errors import ConfigError, DataError
from crossret.retrieval import metrics as metrics_module
from crossret.retrieval.metrics import dense_retrieval_metrics, ranking_metrics


def brute_force(scores: np.ndarray, q_ids, g_ids, ks) -> dict:
    """Each row sorted with Python's ``sorted`` by (descending score, gallery index)."""
    orders = [sorted(range(scores.shape[1]), key=lambda g, row=row: (-int(row[g]), g)) for row in scores]
    return metrics_from_orders(orders, list(q_ids), list(g_ids), ks)


def assert_same(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_g = 17, 31
    scores = rng.integers(-3, 4, (n_q, n_g))  # few distinct values: many ties
    q_ids = rng.integers(0, 6, n_q)
    g_ids = rng.integers(0, 5, n_g)  # id 5 never in the gallery: some queries without matches
    ks = (1, 3, 10, 50)
    reference = brute_force(scores, q_ids, g_ids, ks)
    ours = ranking_metrics(scores, q_ids, g_ids, ks=ks, chunk_size=4)
    assert_same(ours, reference)
    # Float scores with the same values rank identically.
    assert ranking_metrics(scores.astype(np.float32), q_ids, g_ids, ks=ks) == ours


def test_array_and_callable_give_identical_results() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, (23, 19)).astype(np.float64)
    q_ids, g_ids = rng.integers(0, 4, 23), rng.integers(0, 4, 19)
    calls: list[tuple[int, int]] = []

    def chunk(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        return scores[start:stop]

    whole = ranking_metrics(scores, q_ids, g_ids)
    for chunk_size in (1, 5, 23, 1000):
        calls.clear()
        assert ranking_metrics(chunk, q_ids, g_ids, chunk_size=chunk_size) == whole
        # Contiguous, in order, each row exactly once, at most chunk_size rows per call.
        assert calls[0][0] == 0 and calls[-1][1] == 23
        assert all(a[1] == b[0] for a, b in itertools.pairwise(calls))
        assert all(stop - start <= chunk_size for start, stop in calls)


def test_equals_dense_metrics_for_embedding_products() -> None:
    rng = np.random.default_rng(4)
    # Integer embeddings: exact products, hence ties, and bit-identical scores on both paths.
    query = rng.integers(-2, 3, (29, 4)).astype(np.float32)
    gallery = rng.integers(-2, 3, (41, 4)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 7, 29), rng.integers(0, 6, 41)
    ks = (1, 2, 5, 10)
    dense = dense_retrieval_metrics(query, gallery, q_ids, g_ids, ks=ks, chunk_size=7)
    assert ranking_metrics(query @ gallery.T, q_ids, g_ids, ks=ks, chunk_size=3) == dense
    assert ranking_metrics(lambda a, b: query[a:b] @ gallery.T, q_ids, g_ids, ks=ks) == dense
    assert_same(dense, brute_force(query @ gallery.T, q_ids, g_ids, ks))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int64, np.uint64, np.float16, np.bool_])
def test_integer_and_small_dtypes_rank_exactly(dtype) -> None:
    rng = np.random.default_rng(5)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    values = rng.integers(0, 2 if dtype is np.bool_ else 4, (11, 13))
    scores = values.astype(dtype)
    if info is not None:  # the extremes, where -x would overflow or wrap around
        scores[0, :3] = [info.min, info.max, info.min]
        scores[1, :2] = [info.max, info.min]
    q_ids, g_ids = rng.integers(0, 3, 11), rng.integers(0, 3, 13)
    reference = brute_force(scores.astype(object), q_ids, g_ids, (1, 5))
    assert_same(ranking_metrics(scores, q_ids, g_ids, ks=(1, 5)), reference)


def test_negative_zero_ties_with_zero_and_infinities_rank() -> None:
    scores = np.array([[0.0, -0.0, np.inf, -np.inf, 0.0]])
    # Order: inf (2), then 0.0 / -0.0 / 0.0 tied in gallery order (0, 1, 4), then -inf (3).
    result = ranking_metrics(scores, [7], [1, 7, 1, 1, 1], ks=(1, 2, 3))
    assert (result["rank2"], result["rank3"]) == (0.0, 1.0)
    assert result["map"] == pytest.approx(1 / 3)


def test_chunk_memory_cap_applies_to_callables(monkeypatch) -> None:
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(9, 20))
    q_ids, g_ids = rng.integers(0, 3, 9), rng.integers(0, 3, 20)
    full = ranking_metrics(scores, q_ids, g_ids)
    monkeypatch.setattr(metrics_module, "_DENSE_CHUNK_ENTRIES", 40)  # 2 queries per chunk
    sizes: list[int] = []

    def chunk(start: int, stop: int) -> np.ndarray:
        sizes.append(stop - start)
        return scores[start:stop]

    assert ranking_metrics(chunk, q_ids, g_ids) == full
    assert max(sizes) == 2


def test_errors() -> None:
    scores = np.zeros((2, 3))
    with pytest.raises(DataError, match=r"shape \(2, 3\).*3 query ids"):
        ranking_metrics(scores, [0, 1, 2], [0, 1, 2])
    with pytest.raises(DataError, match="2 gallery ids"):
        ranking_metrics(scores, [0, 1], [0, 1])
    nan = scores.copy()
    nan[1, 2] = np.nan
    with pytest.raises(DataError, match=r"NaN.*query 1"):
        ranking_metrics(nan, [0, 1], [0, 1, 2])
    with pytest.raises(DataError, match="NaN"):
        ranking_metrics(lambda a, b: nan[a:b], [0, 1], [0, 1, 2], chunk_size=1)
    with pytest.raises(DataError, match=r"queries 0\.\.1 have shape \(2, 2\), expected \(2, 3\)"):
        ranking_metrics(lambda a, b: scores[a:b, :2], [0, 1], [0, 1, 2])
    with pytest.raises(DataError, match="numeric"):
        ranking_metrics(np.array([["a", "b"]]), [0], [0, 1])
    with pytest.raises(DataError, match="empty"):
        ranking_metrics(np.zeros((0, 3)), [], [0, 1, 2])
    with pytest.raises(DataError, match="1-D"):
        ranking_metrics(scores, [[0, 1], [1, 0]], [0, 1, 2])
    with pytest.raises(DataError, match="integers"):
        ranking_metrics(scores, [0.5, 1], [0, 1, 2])
    for bad in ((0,), (), (1.5,), (True,)):
        with pytest.raises(ConfigError, match="ks"):
            ranking_metrics(scores, [0, 1], [0, 1, 2], ks=bad)
    with pytest.raises(ConfigError, match="chunk_size"):
        ranking_metrics(scores, [0, 1], [0, 1, 2], chunk_size=0)
    with pytest.raises(DataError, match="NaN"):  # the refactored dense path keeps its own checks
        dense_retrieval_metrics(np.full((2, 3), np.nan), np.ones((2, 3)), [0, 1], [0, 1])
