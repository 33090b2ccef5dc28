"""knn_search / mutual_pairs / l2_normalize: exactness against numpy brute force, self-exclusion with
duplicates, clipping of k, zero rows and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from crossret.errors import DataError
from crossret.graph import knn_search, l2_normalize, mutual_pairs
from crossret.graph.knn import KnnIndex

# ------------------------------------------------------------------ helpers


def brute_cosine(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Cosine matrix in float64; a zero row has cosine 0 with everything."""
    q = np.asarray(queries, dtype=np.float64)
    db = np.asarray(database, dtype=np.float64)
    qn = np.linalg.norm(q, axis=1, keepdims=True)
    dn = np.linalg.norm(db, axis=1, keepdims=True)
    q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
    db = np.divide(db, dn, out=np.zeros_like(db), where=dn > 0)
    return q @ db.T


def brute_topk(cos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k similarities, indices and whether the k-th is separated from the (k+1)-th (no tie)."""
    order = np.argsort(-cos, axis=1, kind="stable")
    sims = np.take_along_axis(cos, order, axis=1)
    k = min(k, cos.shape[1])
    if k < cos.shape[1]:
        separated = (sims[:, k - 1] - sims[:, k]) > 1e-4
    else:
        separated = np.ones(cos.shape[0], dtype=bool)
    return sims[:, :k], order[:, :k], separated


# ------------------------------------------------------------------ knn_search vs brute force


@pytest.mark.parametrize(
    ("seed", "n_q", "n_db", "dim", "k"),
    [(0, 20, 50, 8, 5), (1, 7, 30, 3, 1), (2, 40, 40, 16, 10), (3, 5, 12, 2, 12), (4, 33, 64, 5, 7)],
)
def test_knn_search_matches_bruteforce(seed: int, n_q: int, n_db: int, dim: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n_q, dim)) * rng.uniform(0.1, 10, size=(n_q, 1))
    db = rng.normal(size=(n_db, dim)) * rng.uniform(0.1, 10, size=(n_db, 1))
    sims, idx = knn_search(q, db, k)
    cos = brute_cosine(q, db)
    ref_sims, ref_idx, separated = brute_topk(cos, k)
    assert sims.shape == idx.shape == (n_q, min(k, n_db))
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    # The returned similarity is the cosine of the returned pair.
    np.testing.assert_allclose(sims, np.take_along_axis(cos, idx, axis=1), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all(), "best first"
    assert separated.mean() > 0.8, "test data should have few near-ties"
    for row in np.flatnonzero(separated):
        assert set(idx[row].tolist()) == set(ref_idx[row].tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_search_exclude_self_matches_bruteforce(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(30, 6))
    k = 4
    sims, idx = knn_search(x, x, k, exclude_self=True)
    cos = brute_cosine(x, x)
    np.fill_diagonal(cos, -np.inf)
    ref_sims, ref_idx, separated = brute_topk(cos, k)
    assert idx.shape == (30, k)
    assert not (idx == np.arange(30)[:, None]).any()
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    for row in np.flatnonzero(separated):
        assert set(idx[row].tolist()) == set(ref_idx[row].tolist())


@pytest.mark.parametrize(("copies", "k"), [(2, 1), (3, 2), (4, 3), (5, 3), (6, 8)])
def test_knn_search_exclude_self_with_duplicates(copies: int, k: int) -> None:
    """Duplicated rows tie with the query itself; the row must still never be its own neighbour."""
    rng = np.random.default_rng(copies * 10 + k)
    base = rng.normal(size=(5, 4))
    x = np.repeat(base, copies, axis=0)
    x = x[rng.permutation(x.shape[0])]
    n = x.shape[0]
    sims, idx = knn_search(x, x, k, exclude_self=True)
    k_eff = min(k, n - 1)
    assert idx.shape == (n, k_eff)
    rows = np.arange(n)[:, None]
    assert not (idx == rows).any()
    # No neighbour repeated within a row.
    assert all(len(set(r.tolist())) == k_eff for r in idx)
    cos = brute_cosine(x, x)
    np.fill_diagonal(cos, -np.inf)
    ref_sims, _, _ = brute_topk(cos, k_eff)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    # The other copies of a row come first (cosine 1).
    for i in range(n):
        twins = {j for j in range(n) if j != i and np.array_equal(x[j], x[i])}
        got = set(idx[i, : min(len(twins), k_eff)].tolist())
        assert got <= twins


def test_knn_search_all_rows_identical_exclude_self() -> None:
    x = np.tile(np.array([[1.0, 2.0, 3.0]]), (6, 1))
    sims, idx = knn_search(x, x, 5, exclude_self=True)
    for i in range(6):
        assert sorted(idx[i].tolist()) == [j for j in range(6) if j != i]
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)


def test_knn_search_exact_ties_are_deterministic() -> None:
    # The order among exact ties is faiss's (unspecified), but it must be repeatable.
    _, first = knn_search(np.ones((3, 3)), np.ones((25, 3)), 5)
    _, again = knn_search(np.ones((3, 3)), np.ones((25, 3)), 5)
    np.testing.assert_array_equal(first, again)
    assert len(set(first[0].tolist())) == 5


def test_knn_search_k_clipped() -> None:
    rng = np.random.default_rng(5)
    q = rng.normal(size=(4, 3))
    db = rng.normal(size=(7, 3))
    sims, idx = knn_search(q, db, 100)
    assert sims.shape == idx.shape == (4, 7)
    for row in idx:
        assert sorted(row.tolist()) == list(range(7))
    sims, idx = knn_search(db, db, 100, exclude_self=True)
    assert idx.shape == (7, 6)
    for i, row in enumerate(idx):
        assert sorted(row.tolist()) == [j for j in range(7) if j != i]
    # A single row with exclude_self has no neighbour at all.
    sims, idx = knn_search(db[:1], db[:1], 3, exclude_self=True)
    assert sims.shape == idx.shape == (1, 0)
    assert idx.dtype == np.int64


def test_knn_search_no_queries() -> None:
    sims, idx = knn_search(np.zeros((0, 3)), np.ones((5, 3)), 2)
    assert sims.shape[0] == idx.shape[0] == 0
    assert sims.dtype == np.float32 and idx.dtype == np.int64


def test_knn_search_zero_rows_give_cosine_zero() -> None:
    rng = np.random.default_rng(6)
    db = rng.normal(size=(8, 5))
    db[[2, 5]] = 0.0
    q = rng.normal(size=(4, 5))
    q[1] = 0.0
    sims, idx = knn_search(q, db, 8)
    assert np.isfinite(sims).all()
    np.testing.assert_allclose(sims[1], 0.0, atol=0)
    cos = brute_cosine(q, db)
    np.testing.assert_allclose(sims, np.take_along_axis(cos, idx, axis=1), atol=1e-5)
    for row in (0, 2, 3):
        zero_cols = np.isin(idx[row], [2, 5])
        np.testing.assert_allclose(sims[row, zero_cols], 0.0, atol=0)
    # exclude_self with zero rows: still never itself, still finite.
    sims, idx = knn_search(db, db, 3, exclude_self=True)
    assert np.isfinite(sims).all()
    assert not (idx == np.arange(8)[:, None]).any()


def test_knn_search_scale_invariant_for_ordinary_norms() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(20, 4))
    s1, i1 = knn_search(x, x, 5, exclude_self=True)
    s2, i2 = knn_search(x * 1e3, x * 1e-3, 5, exclude_self=True)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_array_equal(i1, i2)


def test_knn_search_tiny_norm_rows_are_cosine_or_zero() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 4))
    s_ref, i_ref = knn_search(x, x, 3)
    s_tiny, i_tiny = knn_search(x * 1e-14, x * 1e-14, 3)
    is_cosine = np.allclose(s_tiny, s_ref, atol=1e-5) and np.array_equal(i_tiny, i_ref)
    is_zero = np.allclose(s_tiny, 0.0, atol=1e-6)
    assert is_cosine or is_zero


def test_knn_search_normalized_flag_uses_inner_product() -> None:
    rng = np.random.default_rng(9)
    x = l2_normalize(rng.normal(size=(15, 6)))
    s1, i1 = knn_search(x, x, 4, normalized=True)
    s2, i2 = knn_search(x, x, 4)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, np.take_along_axis(x @ x.T, i1, axis=1), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_knn_search_rejects_non_finite(bad: float) -> None:
    x = np.ones((4, 3))
    y = x.copy()
    y[2, 1] = bad
    with pytest.raises(DataError, match="NaN or inf"):
        knn_search(y, x, 2)
    with pytest.raises(DataError, match="NaN or inf"):
        knn_search(x, y, 2)


@pytest.mark.parametrize("k", [0, -1, 2.5, "3", None])
def test_knn_search_rejects_bad_k(k: object) -> None:
    x = np.ones((4, 3))
    with pytest.raises(DataError, match="positive integer"):
        knn_search(x, x, k)  # type: ignore[arg-type]


def test_knn_search_accepts_numpy_integer_k() -> None:
    x = np.random.default_rng(10).normal(size=(6, 3))
    s1, i1 = knn_search(x, x, np.int64(2))
    s2, i2 = knn_search(x, x, 2)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_knn_search_shape_errors() -> None:
    with pytest.raises(DataError, match="equal dimension"):
        knn_search(np.ones((3, 4)), np.ones((5, 3)), 2)
    with pytest.raises(DataError, match="2-D"):
        knn_search(np.ones(4), np.ones((5, 4)), 2)
    with pytest.raises(DataError, match="same rows"):
        knn_search(np.ones((3, 4)), np.ones((5, 4)), 2, exclude_self=True)


# ------------------------------------------------------------------ l2_normalize


def test_l2_normalize() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(10, 7)) * 5
    x[3] = 0.0
    y = l2_normalize(x)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    norms = np.linalg.norm(y.astype(np.float64), axis=1)
    np.testing.assert_allclose(np.delete(norms, 3), 1.0, atol=1e-6)
    assert (y[3] == 0).all()
    # Direction preserved: y_i = x_i / ||x_i||.
    expected = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    with pytest.raises(DataError, match="2-D"):
        l2_normalize(np.ones((2, 3, 4)))


# ------------------------------------------------------------------ mutual_pairs


def random_neighbours(rng: np.random.Generator, n_a: int, n_b: int, k: int, no_self: bool = False) -> np.ndarray:
    rows = []
    for i in range(n_a):
        pool = np.array([j for j in range(n_b) if not (no_self and j == i)])
        rows.append(rng.choice(pool, size=k, replace=False))
    return np.array(rows, dtype=np.int64).reshape(n_a, k)


def brute_mutual(idx_ab: np.ndarray, idx_ba: np.ndarray) -> list[tuple[int, int]]:
    pairs = {(i, int(j)) for i in range(idx_ab.shape[0]) for j in idx_ab[i] if i in set(idx_ba[j].tolist())}
    return sorted(pairs)


@pytest.mark.parametrize(("seed", "n_a", "n_b", "k"), [(0, 30, 25, 5), (1, 10, 40, 8), (2, 50, 6, 3), (3, 4, 4, 4)])
def test_mutual_pairs_matches_bruteforce(seed: int, n_a: int, n_b: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    idx_ab = random_neighbours(rng, n_a, n_b, min(k, n_b))
    idx_ba = random_neighbours(rng, n_b, n_a, min(k, n_a))
    a, b = mutual_pairs(idx_ab, idx_ba, n_b)
    assert a.dtype == np.int64 and b.dtype == np.int64
    got = list(zip(a.tolist(), b.tolist(), strict=True))
    expected = brute_mutual(idx_ab, idx_ba)
    assert got == expected  # same pairs, sorted by a then b
    assert len(expected) > 0


@pytest.mark.parametrize(("seed", "n", "k"), [(0, 30, 5), (1, 12, 11), (2, 60, 2)])
def test_mutual_pairs_same_set(seed: int, n: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    idx = random_neighbours(rng, n, n, k, no_self=True)
    a, b = mutual_pairs(idx, idx, n)
    got = list(zip(a.tolist(), b.tolist(), strict=True))
    assert got == brute_mutual(idx, idx)
    # Each unordered pair appears in both directions, never (i, i).
    assert set(got) == {(j, i) for i, j in got}
    assert not (a == b).any()


def test_mutual_pairs_on_real_knn() -> None:
    rng = np.random.default_rng(12)
    xa = rng.normal(size=(20, 5))
    xb = rng.normal(size=(15, 5))
    _, ab = knn_search(xa, xb, 3)
    _, ba = knn_search(xb, xa, 3)
    a, b = mutual_pairs(ab, ba, 15)
    cos = brute_cosine(xa, xb)
    # Brute force from the cosine matrix directly (rank of b among a's row, and of a among b's column).
    rank_ab = np.argsort(np.argsort(-cos, axis=1), axis=1)
    rank_ba = np.argsort(np.argsort(-cos.T, axis=1), axis=1).T
    expected = np.argwhere((rank_ab < 3) & (rank_ba < 3))
    np.testing.assert_array_equal(np.stack([a, b], axis=1), expected)


def test_mutual_pairs_empty() -> None:
    empty = np.zeros((5, 0), np.int64)
    some = np.zeros((4, 2), np.int64)
    for x, y in ((empty, some), (some, empty)):
        a, b = mutual_pairs(x, y, 4)
        assert a.size == b.size == 0
        assert a.dtype == b.dtype == np.int64


def test_hnsw_search_is_reproducible_and_restores_faiss_threads():
    import faiss

    x = np.random.default_rng(5).normal(size=(3000, 16)).astype(np.float32)
    before = faiss.omp_get_max_threads()
    first = knn_search(x[:300], x, 5, method="hnsw")
    second = knn_search(x[:300], x, 5, method="hnsw")
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])
    assert faiss.omp_get_max_threads() == before
    # and it finds (almost) the exact neighbours on this easy set
    exact = knn_search(x[:300], x, 5, method="exact")[1]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(first[1], exact, strict=True)])
    assert recall > 0.95


# ------------------------------------------------------------------ KnnIndex and the ivf cell search


def clustered(seed: int, n: int, dim: int = 16, classes: int = 6, rank: int = 4) -> np.ndarray:
    """Unit rows around ``classes`` centres, varying in a ``rank``-dimensional subspace per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    basis = rng.normal(size=(classes, rank, dim))
    labels = rng.integers(0, classes, n)
    z = rng.normal(size=(n, rank))
    x = centres[labels] + np.einsum("nr,nrd->nd", z, basis[labels]) + rng.normal(size=(n, dim)) * 0.1
    return l2_normalize(x)


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(approx, exact, strict=True)]))


def test_ivf_recall_against_exact() -> None:
    """Genuinely approximate (60 cells, 6 probed): most neighbours found, every returned similarity is
    the true cosine of the returned pair, best first, and never better than the exact k-th."""
    db = clustered(0, 6000)
    q = clustered(1, 800)
    index = KnnIndex(db, method="ivf", cell_rows=100, probes=6)
    assert index.approximate
    sims, idx = index.search(q, 5)
    exact_sims, exact_idx = knn_search(q, db, 5)
    assert recall(idx, exact_idx) > 0.9
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", q, db[idx]), atol=1e-5)
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert (sims <= exact_sims + 1e-5).all()
    assert all(len(set(row.tolist())) == 5 for row in idx)


def test_ivf_exclude_self_recall_and_no_self() -> None:
    x = clustered(2, 5000)
    _, idx = KnnIndex(x, method="ivf", cell_rows=100, probes=6).search(x, 4, exclude_self=True)
    assert not (idx == np.arange(x.shape[0])[:, None]).any()
    _, exact = knn_search(x, x, 4, exclude_self=True)
    assert recall(idx, exact) > 0.9


def test_ivf_is_exact_when_probes_cover_all_cells() -> None:
    """probes >= number of cells: the flat exact search, bit for bit (also the small-database case)."""
    db = clustered(3, 900)
    q = clustered(4, 120)
    index = KnnIndex(db, method="ivf", cell_rows=100, probes=9)
    assert not index.approximate
    np.testing.assert_array_equal(index.search(q, 4)[1], knn_search(q, db, 4)[1])
    np.testing.assert_array_equal(index.search(q, 4)[0], knn_search(q, db, 4)[0])


def test_ivf_is_deterministic() -> None:
    db = clustered(5, 4000)
    q = clustered(6, 300)
    first = KnnIndex(db, method="ivf", cell_rows=100, probes=4).search(q, 3)
    second = KnnIndex(db, method="ivf", cell_rows=100, probes=4).search(q, 3)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_ivf_tiny_cells_fall_back_to_exact_for_short_rows() -> None:
    """Probed cells holding fewer than k rows: those queries get the exact answer, never -1."""
    rng = np.random.default_rng(7)
    db = l2_normalize(rng.normal(size=(60, 8)))
    q = l2_normalize(rng.normal(size=(40, 8)))
    sims, idx = KnnIndex(db, method="ivf", cell_rows=2, probes=2).search(q, 12)
    assert (idx >= 0).all()
    exact_sims, _ = knn_search(q, db, 12)
    assert (sims <= exact_sims + 1e-5).all()
    assert all(len(set(row.tolist())) == 12 for row in idx)


@pytest.mark.parametrize("method", ["exact", "hnsw", "ivf"])
def test_index_reuse_equals_one_off_searches(method: str) -> None:
    """Searching one built index twice gives what two single-use knn_search calls give."""
    db = clustered(8, 3000)
    q1, q2 = clustered(9, 200), clustered(10, 150)
    index = KnnIndex(db, method=method, cell_rows=100, probes=5) if method == "ivf" else KnnIndex(db, method=method)
    for q in (q1, q2):
        got = index.search(q, 3)
        if method == "ivf":
            ref = KnnIndex(db, method="ivf", cell_rows=100, probes=5).search(q, 3)
        else:
            ref = knn_search(q, db, 3, method=method)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[0], ref[0])
    # exclude_self on the same index after plain searches
    np.testing.assert_array_equal(index.search(db, 2, exclude_self=True)[1],
                                  (KnnIndex(db, method=method, cell_rows=100, probes=5) if method == "ivf"
                                   else KnnIndex(db, method=method)).search(db, 2, exclude_self=True)[1])


def test_auto_switches_to_ivf_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    import crossret.graph.knn as knn_module

    db = clustered(11, 500)
    assert KnnIndex(db, method="auto").method == "exact"
    monkeypatch.setattr(knn_module, "AUTO_APPROX_ROWS", 400)
    assert KnnIndex(db, method="auto").method == "ivf"
    assert KnnIndex(db[:400], method="auto").method == "exact"


def test_spherical_kmeans_gives_unit_centroids_and_is_seeded() -> None:
    from crossret.graph.knn import _spherical_kmeans

    x = clustered(12, 2000)
    c1 = _spherical_kmeans(x, 20, seed=3)
    c2 = _spherical_kmeans(x, 20, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)
    # Lloyd steps do not make the objective Σ max_j <x, c_j> worse than the random initial rows.
    init = x[np.sort(np.random.default_rng(3).choice(2000, 20, replace=False))]
    assert (x @ c1.T).max(axis=1).sum() >= (x @ init.T).max(axis=1).sum() - 1e-3


@pytest.mark.parametrize(("kwargs", "message"), [({"method": "annoy"}, "method must be one of"),
                                                 ({"cell_rows": 0}, "cell_rows"), ({"probes": -1}, "probes"),
                                                 ({"probes": True}, "probes")])
def test_knn_index_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        KnnIndex(np.ones((4, 3)), **kwargs)


def test_knn_index_search_errors() -> None:
    index = KnnIndex(np.random.default_rng(13).normal(size=(5, 3)), method="ivf")
    with pytest.raises(DataError, match="equal dimension"):
        index.search(np.ones((2, 4)), 2)
    with pytest.raises(DataError, match="same rows"):
        index.search(np.ones((2, 3)), 2, exclude_self=True)
    with pytest.raises(DataError, match="positive integer"):
        index.search(np.ones((2, 3)), 0)
