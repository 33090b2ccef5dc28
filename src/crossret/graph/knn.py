"""Cosine k-nearest-neighbour search (faiss: exact, HNSW or inverted-file cells) and mutual-kNN edge lists.

Everything here works on cosine similarity: rows are L2-normalised once and searched with a faiss
inner-product index, so ``similarity = cos(a, b)``. Results are returned as arrays, never as
Python lists of neighbours, so graph builders stay vectorised.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from crossret.errors import DataError
from crossret.threads import use_threads

# Centroid sums (of unit vectors) below this norm are treated as empty in the spherical k-means.
_MIN_NORM = 1e-12


def l2_normalize(features: np.ndarray, what: str = "features") -> np.ndarray:
    """Row-wise ``x / ||x||`` as C-contiguous float32; all-zero rows stay zero.

    Cosine is scale-invariant, so every row with a non-zero entry is normalised, however small or
    large its norm (1e-30 and 1e30 rows alike: the norm is taken in float64, where neither
    underflows nor overflows for float32 input). Only rows that are exactly zero have no direction:
    they stay zero, i.e. cosine 0 with everything (no edge in a graph, since edges need ``cos > 0``).
    NaN/inf rows are a :class:`DataError` naming them (``what`` names the matrix in the message).
    """
    return np.ascontiguousarray(unit_rows(features, what), dtype=np.float32)


def unit_rows(features: np.ndarray, what: str = "features", owner: str = "kNN") -> np.ndarray:
    """:func:`l2_normalize` in float64 (``owner`` starts the error messages)."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise DataError(f"{owner}: expected a 2-D feature matrix, got shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{owner}: {what} must be numeric, got dtype {x.dtype}")
    x64 = x.astype(np.float64)
    finite = np.isfinite(x64).all(axis=1)
    if not finite.all():
        from crossret.data.domain import describe_rows

        bad = np.flatnonzero(~finite)
        raise DataError(f"{owner}: {what} contain NaN or inf in {bad.size} row(s) ({describe_rows(bad)}); "
                        "clean or drop them")
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(x64, axis=1, keepdims=True)
    if np.isinf(norms).any():  # float64 input near its own limit: rescale the rows first (exact for powers of 2)
        peak = np.abs(x64).max(axis=1, keepdims=True)
        x64 = x64 / np.where(peak > 0, peak, 1.0)
        norms = np.linalg.norm(x64, axis=1, keepdims=True)
    zero = norms == 0.0
    return x64 / np.where(zero, 1.0, norms)


KNN_METHODS = ("exact", "hnsw", "ivf", "auto")
# "auto" switches to the approximate ``ivf`` search above this many database rows. Exact search costs
# O(Q·N·d), so the searches of a 100k-node graph (two 50k domains) would take most of its time; ``ivf``
# costs O(Q·(N/B + p·B)·d) with a fixed cell size B and p probed cells, i.e. about linear in Q.
AUTO_APPROX_ROWS = 20_000
# ivf defaults: cells of about IVF_CELL_ROWS database rows, each query scans its IVF_PROBES most similar
# cells. Their recall against exact search is measured by benchmarks/graph_scaling.py (docs/benchmarks.md,
# "Graph + diffusion scaling").
IVF_CELL_ROWS = 1_000
IVF_PROBES = 8
# Spherical k-means of the cells: Lloyd iterations and training rows per cell (a sample keeps training
# O(nlist² d), negligible next to the search).
IVF_KMEANS_ITERS = 10
IVF_TRAIN_PER_CELL = 64


class KnnIndex:
    """A cosine neighbour index over one database, built once and searched by several query sets.

    ``method``: ``exact`` (faiss ``IndexFlatIP``), ``hnsw`` (``IndexHNSWFlat``, inner product, M = 32,
    efSearch = max(64, 4(k+1)), built on one thread so the graph is reproducible), ``ivf`` (see
    :class:`_CellIndex`: k-means cells, each query scans the ``probes`` cells with the most similar
    centroids, exactly, by blocked BLAS products) or ``auto`` (exact up to 20,000 database rows, ``ivf``
    above). Searching one index twice gives the same neighbours as two single-use indexes.
    ``cell_rows`` / ``probes`` (``ivf``; default :data:`IVF_CELL_ROWS` / :data:`IVF_PROBES`): database
    rows per cell and cells scanned per query; ``seed`` seeds the k-means.
    """

    def __init__(self, database: np.ndarray, *, method: str = "exact", normalized: bool = False,
                 cell_rows: int | None = None, probes: int | None = None, seed: int = 0) -> None:
        # None: the module defaults, read now (not at import) so that one setting changes every index.
        cell_rows = IVF_CELL_ROWS if cell_rows is None else cell_rows
        probes = IVF_PROBES if probes is None else probes
        if method not in KNN_METHODS:
            raise DataError(f"kNN: method must be one of {', '.join(KNN_METHODS)}, got {method!r}")
        for name, value in (("cell_rows", cell_rows), ("probes", probes)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise DataError(f"kNN: {name} must be a positive integer, got {value!r}")
        self.database = np.ascontiguousarray(database, dtype=np.float32) if normalized else l2_normalize(database)
        if self.database.ndim != 2:
            raise DataError(f"kNN: expected a 2-D database, got shape {self.database.shape}")
        if method == "auto":
            method = "ivf" if self.database.shape[0] > AUTO_APPROX_ROWS else "exact"
        self.method = method
        self.cell_rows, self.probes, self.seed = int(cell_rows), int(probes), seed
        self._index = None  # built on first search (a database may never be searched)

    @property
    def approximate(self) -> bool:
        """Whether searches may miss true neighbours (``ivf`` probing every cell is exact)."""
        return self.method != "exact" and not (self.method == "ivf" and self._cells_cover_all())

    def _cells_cover_all(self) -> bool:
        return _n_cells(self.database.shape[0], self.cell_rows) <= self.probes

    def _build(self) -> Any:
        import faiss

        db = self.database
        if self.method == "hnsw":
            index = faiss.IndexHNSWFlat(db.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            # A multi-threaded HNSW build links nodes in a thread-dependent order, so the graph (and
            # every neighbour list) could change between two runs of the same seed. One thread keeps
            # the build, hence COUPLE's selection and resume, reproducible; searching uses the graph-search
            # thread count (crossret.threads).
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                index.add(db)
            finally:
                faiss.omp_set_num_threads(threads)
            return index
        if self.method == "ivf" and not self._cells_cover_all():
            return _CellIndex(db, self.cell_rows, self.probes, self.seed)
        # exact, or ivf whose probes would cover every cell anyway (the same answer, faster)
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
        return index

    def search(self, queries: np.ndarray, k: int, *, exclude_self: bool = False,
               normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most cosine-similar database rows of every query; see :func:`knn_search`."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise DataError(f"kNN: k must be a positive integer, got {k!r}")
        q = np.ascontiguousarray(queries, dtype=np.float32) if normalized else l2_normalize(queries)
        db = self.database
        if q.ndim != 2 or q.shape[1] != db.shape[1]:
            raise DataError(f"kNN: queries {q.shape} and database {db.shape} must be 2-D with equal dimension")
        if exclude_self and q.shape[0] != db.shape[0]:
            raise DataError("kNN: exclude_self needs queries and database to be the same rows")
        available = db.shape[0] - (1 if exclude_self else 0)
        k_eff = int(min(k, available))
        if k_eff <= 0 or q.shape[0] == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        # faiss gets the graph-search thread count of its own: where faiss shares torch's OpenMP runtime,
        # it would otherwise inherit the count of a training loop around it (COUPLE trains on 1 thread).
        with use_threads("graph_search"):
            if self._index is None:
                self._index = self._build()
            if self.method == "hnsw":
                self._index.hnsw.efSearch = max(64, 4 * (k_eff + 1))
            sims, idx = self._index.search(q, k_eff + (1 if exclude_self else 0))
        if exclude_self:
            sims, idx = _drop_self(sims, idx, k_eff)
        return sims.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)


def knn_search(
    queries: np.ndarray, database: np.ndarray, k: int, *, exclude_self: bool = False, normalized: bool = False,
    method: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar database rows of every query (one-off :class:`KnnIndex`).

    Args:
        queries: ``(Q, d)``.
        database: ``(N, d)``.
        k: neighbours per query; clipped to the number available (``N``, or ``N - 1`` with
            ``exclude_self``).
        exclude_self: ``queries`` *is* ``database`` (same rows, same order) and row ``i`` must not
            be its own neighbour.
        normalized: rows are already L2-normalised (skips a copy).
        method: ``exact`` (``IndexFlatIP``), ``hnsw`` (approximate, ~O(log N) per query), ``ivf``
            (approximate, k-means cells, ~O(N/B + p·B) per query) or ``auto`` (exact up to 20,000
            database rows, ``ivf`` above); see :class:`KnnIndex`.

    Returns:
        ``(similarities, indices)``, both ``(Q, k')``, best first; exact ties in similarity come in
        faiss's order (not specified; in practice higher index first). ``k' = 0`` gives empty arrays.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise DataError(f"kNN: k must be a positive integer, got {k!r}")
    q = np.ascontiguousarray(queries, dtype=np.float32) if normalized else l2_normalize(queries)
    index = KnnIndex(database, method=method, normalized=normalized)
    return index.search(q, k, exclude_self=exclude_self, normalized=True)


def _n_cells(rows: int, cell_rows: int) -> int:
    return max(1, round(rows / cell_rows))


class _CellIndex:
    """Inverted-file cosine search computed exactly inside the probed cells.

    Build: spherical k-means (``nlist = round(N / B)`` centroids ``c_j``, trained on a seeded sample of
    ``64·nlist`` rows) and each row assigned to ``argmax_j <x, c_j>``; rows are stored grouped by cell.
    Search: each query ``q`` probes the ``p`` cells with the largest ``<q, c_j>``; every cell then
    scores all queries that probe it against its rows in one BLAS product (``faiss.knn``), and each
    query keeps the best ``k`` of its ``p·k`` candidates. Cost ``O(Q·(nlist + p·B)·d)``; a neighbour is
    missed only when it lies in an unprobed cell. Deterministic: the k-means is seeded numpy + faiss
    BLAS products (no thread-dependent reduction order), and ties between cells keep cell order.
    """

    def __init__(self, database: np.ndarray, cell_rows: int, probes: int, seed: int) -> None:
        self.database = database
        n = database.shape[0]
        self.nlist = _n_cells(n, cell_rows)
        self.probes = min(probes, self.nlist)
        self.centroids = _spherical_kmeans(database, self.nlist, seed)
        cell = _nearest(database, self.centroids, 1)[:, 0]
        self.order = np.argsort(cell, kind="stable")  # database rows grouped by cell
        self.bounds = np.searchsorted(cell[self.order], np.arange(self.nlist + 1))
        self.grouped = np.ascontiguousarray(database[self.order])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        n_q, p = queries.shape[0], self.probes
        probe = _nearest(queries, self.centroids, p).reshape(-1)  # (Q·p,): slot s = query s // p
        slots = np.argsort(probe, kind="stable")
        slot_bounds = np.searchsorted(probe[slots], np.arange(self.nlist + 1))
        sims = np.full((n_q * p, k), -np.inf, np.float32)
        idx = np.full((n_q * p, k), -1, np.int64)
        for cell in range(self.nlist):
            mine = slots[slot_bounds[cell]:slot_bounds[cell + 1]]
            lo, hi = self.bounds[cell], self.bounds[cell + 1]
            if mine.size == 0 or hi == lo:
                continue
            kk = int(min(k, hi - lo))
            s, i = faiss.knn(queries[mine // p], self.grouped[lo:hi], kk, metric=faiss.METRIC_INNER_PRODUCT)
            sims[mine, :kk] = s
            idx[mine, :kk] = self.order[lo + i]
        sims = sims.reshape(n_q, p * k)
        idx = idx.reshape(n_q, p * k)
        # Best k of the p·k candidates (distinct rows: a row lives in one cell); stable sort keeps the
        # probe order among equal similarities.
        best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims, idx = np.take_along_axis(sims, best, axis=1), np.take_along_axis(idx, best, axis=1)
        short = np.flatnonzero(idx[:, -1] < 0)
        if short.size:  # probed cells held fewer than k rows (tiny cells): search those queries exactly
            s, i = faiss.knn(queries[short], self.database, k, metric=faiss.METRIC_INNER_PRODUCT)
            sims[short], idx[short] = s, i
        return sims, idx


def _nearest(x: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(n, k)`` of the ``k`` centroids with the largest inner product with each row."""
    import faiss

    return faiss.knn(x, centroids, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def _spherical_kmeans(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Unit centroids maximising ``Σ_i max_j <x_i, c_j>`` (Lloyd on a seeded sample of the rows).

    ``c_j ← Σ_{i∈j} x_i / ||Σ_{i∈j} x_i||``; an emptied cell keeps its previous centroid."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    sample = x[np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_CELL * nlist), replace=False))]
    centroids = sample[np.sort(rng.choice(sample.shape[0], size=nlist, replace=False))].copy()
    for _ in range(IVF_KMEANS_ITERS):
        assign = _nearest(sample, centroids, 1)[:, 0]
        members = sp.csr_matrix((np.ones(assign.size), (assign, np.arange(assign.size))), shape=(nlist, assign.size))
        sums = members @ sample.astype(np.float64)
        norms = np.linalg.norm(sums, axis=1)
        keep = norms > _MIN_NORM
        centroids[keep] = (sums[keep] / norms[keep, None]).astype(np.float32)
    return np.ascontiguousarray(centroids)


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
