"""The one-pass index-rule walk (``hamming.index_records_walk``) against a reference computed another way.

For every relevant item, in database order, the walk records its distance and how many items at that
distance come before it in the database; ``seen`` ends as each query's distance histogram. The
reference gets both from a stable argsort. The cases reach each way the walk counts a tile: few
relevant items (histogram lanes with a bit mask per 64 items), up to a quarter relevant (lanes, many
records per 64), a dense tile (the branch-free walk), and tiles of both kinds in one query (the
lanes folded in between), on tie-heavy codes, 1-, 2- and 4-word codes (byte and 32-bit distance
buffers), a database length that is no multiple of 64 and chunks that cut through tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

from crossret.retrieval import hamming


def _codes(rng: np.random.Generator, n: int, n_words: int, pool: int) -> np.ndarray:
    """Codes drawn from ``pool`` distinct random codes: many exact ties."""
    base = rng.integers(0, 2**63, (pool, n_words), dtype=np.int64).view(np.uint64) * np.uint64(2)
    return np.ascontiguousarray(base[rng.integers(0, pool, n)])


def _labels(rng: np.random.Generator, n: int, layout: str) -> np.ndarray:
    tile = hamming._EVAL_TILE
    if layout == "sparse":
        labels = rng.integers(0, 300, n)
    elif layout == "quarter":  # about a fifth relevant: lanes, several records per 64 items
        labels = rng.integers(0, 5, n)
    elif layout == "dense":
        labels = rng.integers(0, 2, n)
    else:  # "runs": label 0 rare in tiles 0 and 2, everywhere in tile 1 and the tail
        labels = rng.integers(1, 60, n)
        labels[tile:2 * tile] = 0
        labels[3 * tile + 500:] = 0
        labels[rng.integers(0, n, 40)] = 0
    return labels.astype(np.int32)


def _reference(q: np.ndarray, q_labels: np.ndarray, db: np.ndarray, db_labels: np.ndarray, n_dist: int
               ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Histograms, and per query the (distance, items at it before) of its relevant items in order."""
    hist = np.zeros((len(q), n_dist), np.int64)
    rec_d, rec_s = [], []
    for i in range(len(q)):
        dist = sum(np.bitwise_count(db[:, w] ^ q[i, w]).astype(np.int64) for w in range(q.shape[1]))
        hist[i] = np.bincount(dist, minlength=n_dist)
        order = np.argsort(dist, kind="stable")  # by distance, then database position
        group_start = np.searchsorted(dist[order], dist[order], side="left")
        before = np.empty(len(dist), np.int64)
        before[order] = np.arange(len(dist)) - group_start
        relevant = np.flatnonzero(db_labels == q_labels[i])
        rec_d.append(dist[relevant])
        rec_s.append(before[relevant])
    return hist, rec_d, rec_s


@pytest.mark.parametrize("n_words", [1, 2, 4])
@pytest.mark.parametrize("layout", ["sparse", "quarter", "dense", "runs"])
def test_walk_records_every_relevant_item_exactly(layout: str, n_words: int) -> None:
    rng = np.random.default_rng(n_words * 10 + len(layout))
    n = 3 * hamming._EVAL_TILE + 777
    n_q = 21
    db = _codes(rng, n, n_words, pool=12)
    q = _codes(rng, n_q, n_words, pool=12)
    db_labels = _labels(rng, n, layout)
    q_labels = rng.integers(0, 3, n_q).astype(np.int32)
    q_labels[:3] = [0, 1, 299]  # "runs": label 0 crosses sparse and dense tiles
    n_dist = 64 * n_words + 1
    hist, want_d, want_s = _reference(q, q_labels, db, db_labels, n_dist)

    counts = np.array([len(r) for r in want_d], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts + 1)[:-1]]).astype(np.int64)
    seen = np.zeros((n_q, n_dist), np.int64)
    n_rec = np.zeros(n_q, np.int64)
    rec_d = np.full(int((counts + 1).sum()), -1, np.int64)
    rec_s = np.full_like(rec_d, -1)
    for start in range(0, n, 2_500):  # chunks that cut through tiles and sub-blocks
        stop = min(start + 2_500, n)
        hamming.index_records_walk(q, q_labels, db[start:stop], db_labels[start:stop], seen, offsets, n_rec,
                                   rec_d, rec_s)
    np.testing.assert_array_equal(seen, hist)
    np.testing.assert_array_equal(n_rec, counts)
    for i in range(n_q):
        got = slice(offsets[i], offsets[i] + n_rec[i])
        np.testing.assert_array_equal(rec_d[got], want_d[i], err_msg=f"query {i} distances")
        np.testing.assert_array_equal(rec_s[got], want_s[i], err_msg=f"query {i} items before")
    assert counts[0] > 0 and counts[2] >= 0  # the cases hold relevant items
