"""Exact cosine k-nearest-neighbour search (faiss) and mutual-kNN edge lists.

Everything here works on cosine similarity: rows are L2-normalised once and searched with a faiss
inner-product index, so ``similarity = cos(a, b)``. Results are returned as arrays, never as
Python lists of neighbours, so graph builders stay vectorised.
"""

from __future__ import annotations

import numpy as np

from crossret.errors import DataError

# Rows whose norm is below this are treated as all-zero: they are kept (a zero vector has cosine 0
# with everything) instead of being divided into NaN.
_MIN_NORM = 1e-12


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Row-wise ``x / ||x||`` as C-contiguous float32; all-zero rows stay zero."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise DataError(f"kNN: expected a 2-D feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError("kNN: features contain NaN or inf")
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    tiny = norms < _MIN_NORM
    unit = x / np.where(tiny, 1.0, norms)
    unit[tiny[:, 0]] = 0.0  # numerically zero rows: cosine 0 with everything
    return np.ascontiguousarray(unit, dtype=np.float32)


KNN_METHODS = ("exact", "hnsw", "auto")
# "auto" switches to HNSW above this many database rows: exact search is O(Q N d), so a graph of
# 100k nodes (two 50k domains) would spend most of its time there; HNSW is ~O(N log N) overall.
AUTO_HNSW_ROWS = 20_000


def knn_search(
    queries: np.ndarray, database: np.ndarray, k: int, *, exclude_self: bool = False, normalized: bool = False,
    method: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar database rows of every query (exact, faiss ``IndexFlatIP``).

    Args:
        queries: ``(Q, d)``.
        database: ``(N, d)``.
        k: neighbours per query; clipped to the number available (``N``, or ``N - 1`` with
            ``exclude_self``).
        exclude_self: ``queries`` *is* ``database`` (same rows, same order) and row ``i`` must not
            be its own neighbour.
        normalized: rows are already L2-normalised (skips a copy).
        method: ``exact`` (``IndexFlatIP``), ``hnsw`` (``IndexHNSWFlat``, inner product, M = 32,
            efSearch = max(64, 4k): approximate, ~O(log N) per query) or ``auto`` (HNSW above
            20,000 database rows).

    Returns:
        ``(similarities, indices)``, both ``(Q, k')``, best first; exact ties in similarity come in
        faiss's order (not specified; in practice higher index first). ``k' = 0`` gives empty arrays.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise DataError(f"kNN: k must be a positive integer, got {k!r}")
    q = np.ascontiguousarray(queries, dtype=np.float32) if normalized else l2_normalize(queries)
    db = np.ascontiguousarray(database, dtype=np.float32) if normalized else l2_normalize(database)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise DataError(f"kNN: queries {q.shape} and database {db.shape} must be 2-D with equal dimension")
    if exclude_self and q.shape[0] != db.shape[0]:
        raise DataError("kNN: exclude_self needs queries and database to be the same rows")
    available = db.shape[0] - (1 if exclude_self else 0)
    k_eff = int(min(k, available))
    if k_eff <= 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)

    import faiss

    if method not in KNN_METHODS:
        raise DataError(f"kNN: method must be one of {', '.join(KNN_METHODS)}, got {method!r}")
    if method == "hnsw" or (method == "auto" and db.shape[0] > AUTO_HNSW_ROWS):
        index = faiss.IndexHNSWFlat(db.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 4 * (k_eff + 1))
        # A multi-threaded HNSW build links nodes in a thread-dependent order, so the graph (and
        # every neighbour list) could change between two runs of the same seed. One thread keeps
        # the build, hence COUPLE's selection and resume, reproducible; searching stays parallel.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(db)
        finally:
            faiss.omp_set_num_threads(threads)
    else:
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
    sims, idx = index.search(q, k_eff + (1 if exclude_self else 0))
    if exclude_self:
        sims, idx = _drop_self(sims, idx, k_eff)
    return sims.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)


def _drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from a ``k + 1`` search (it is usually, not always, first:
    duplicates tie with it), keeping the best ``k`` of the rest."""
    rows = np.arange(idx.shape[0])[:, None]
    is_self = idx == rows
    # Rows where self was not returned (k + 1 exact duplicates ahead of it): drop the last column.
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = ~is_self
    return sims[keep].reshape(idx.shape[0], k), idx[keep].reshape(idx.shape[0], k)


def mutual_pairs(
    idx_ab: np.ndarray, idx_ba: np.ndarray, n_b: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual-kNN pairs between sets A and B.

    ``idx_ab[i]`` are the neighbours (in B) of ``a_i``, ``idx_ba[j]`` the neighbours (in A) of
    ``b_j``. A pair ``(i, j)`` is mutual when ``j ∈ idx_ab[i]`` and ``i ∈ idx_ba[j]``.
    For a set with itself (``A = B``) each unordered pair appears twice, once per direction.

    Returns ``(a_index, b_index)`` int64 arrays, sorted by ``a_index`` then ``b_index``.
    """
    n_a = idx_ab.shape[0]
    if idx_ab.size == 0 or idx_ba.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Encode the pairs as integers a * n_b + b and intersect the two directed sets.
    forward = (np.repeat(np.arange(n_a, dtype=np.int64), idx_ab.shape[1]) * n_b + idx_ab.reshape(-1)).astype(np.int64)
    backward = (idx_ba.reshape(-1).astype(np.int64) * n_b
                + np.repeat(np.arange(idx_ba.shape[0], dtype=np.int64), idx_ba.shape[1]))
    both = np.intersect1d(forward, backward)
    return both // n_b, both % n_b
