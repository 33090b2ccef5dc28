"""build_cross_domain_graph against a plain-numpy brute-force construction; structure invariants,
edge counts, switching kinds off, summary() and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from crossret.errors import DataError
from crossret.graph import CrossDomainGraph, build_cross_domain_graph, knn_search, l2_normalize, mutual_pairs

# ------------------------------------------------------------------ brute force


class _TopK:
    """argsort top-k that remembers the smallest gap between the k-th and (k+1)-th value, so a test
    can assert that float32 (library) and float64 (here) rankings cannot disagree."""

    def __init__(self) -> None:
        self.min_gap = np.inf

    def __call__(self, values: np.ndarray, k: int) -> list[int]:
        order = np.argsort(-values, kind="stable")
        if k < values.size and np.isfinite(values[order[k]]):
            self.min_gap = min(self.min_gap, values[order[k - 1]] - values[order[k]])
        return [int(i) for i in order[:k]]


def brute_graph(
    fs: np.ndarray, ys: np.ndarray, ft: np.ndarray, kc: int, kt: int, ks: int
) -> tuple[np.ndarray, dict[str, int], dict[tuple[int, int], str], float]:
    """Dense adjacency, edge counts by kind, all kNN edges (before dropping weight <= 0), min gap."""
    ns, nt = fs.shape[0], ft.shape[0]
    x = np.vstack([fs, ft]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    cos = x @ x.T
    topk = _TopK()
    edges: dict[tuple[int, int], str] = {}
    if kc > 0:
        s_nb = [topk(cos[i, ns:], kc) for i in range(ns)]  # target indices (0..nt-1)
        t_nb = [topk(cos[ns + j, :ns], kc) for j in range(nt)]  # source indices
        for i in range(ns):
            for j in s_nb[i]:
                if i in t_nb[j]:
                    edges[(i, ns + j)] = "cross"
    if kt > 0:
        ctt = cos[ns:, ns:].copy()
        np.fill_diagonal(ctt, -np.inf)
        nb = [topk(ctt[j], min(kt, nt - 1)) for j in range(nt)]
        for j in range(nt):
            for m in nb[j]:
                if j < m and j in nb[m]:
                    edges[(ns + j, ns + m)] = "target"
    if ks > 0:
        for i in range(ns):
            same = np.array([m for m in range(ns) if ys[m] == ys[i] and m != i], dtype=np.int64)
            if same.size == 0:
                continue
            for local in topk(cos[i, same], ks):
                m = int(same[local])
                edges[(min(i, m), max(i, m))] = "source"
    dense = np.zeros((ns + nt, ns + nt))
    counts = {"cross": 0, "target": 0, "source": 0}
    for (i, j), kind in edges.items():
        if cos[i, j] > 0:
            dense[i, j] = dense[j, i] = cos[i, j]
            counts[kind] += 1
    return dense, counts, edges, topk.min_gap


def clustered_data(
    seed: int, ns: int, nt: int, dim: int, classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    ys = rng.integers(0, classes, size=ns)
    yt = rng.integers(0, classes, size=nt)
    shift = rng.normal(size=dim) * 0.5
    fs = centres[ys] + rng.normal(size=(ns, dim))
    ft = centres[yt] + shift + rng.normal(size=(nt, dim))
    return fs, ys, ft


def check_structure(graph: CrossDomainGraph, ys: np.ndarray) -> np.ndarray:
    a = graph.adjacency
    assert sp.isspmatrix_csr(a) or isinstance(a, sp.csr_array)
    assert a.has_canonical_format
    dense = a.toarray()
    n = graph.n_nodes
    assert dense.shape == (n, n)
    np.testing.assert_array_equal(dense, dense.T)
    assert (np.diag(dense) == 0).all()
    assert (a.data > 0).all(), "no stored zero or negative weights"
    assert (dense <= 1 + 1e-6).all()
    ns = graph.n_source
    src_r, src_c = np.nonzero(dense[:ns, :ns])
    assert (ys[src_r] == ys[src_c]).all(), "a source-source edge joins different labels"
    return dense


# ------------------------------------------------------------------ equality with brute force


@pytest.mark.parametrize(
    ("seed", "ns", "nt", "dim", "classes", "kc", "kt", "ks"),
    [
        (0, 25, 20, 5, 3, 3, 3, 3),
        (1, 30, 30, 4, 4, 5, 2, 4),
        (2, 12, 18, 3, 2, 1, 1, 1),
        (3, 8, 10, 2, 3, 20, 20, 20),  # every k larger than what is available
        (4, 40, 15, 6, 5, 4, 6, 2),
        (5, 20, 20, 3, 6, 7, 5, 6),  # low dimension, many classes: negative cosines to drop
        (13, 16, 16, 3, 8, 10, 10, 6),
    ],
)
def test_graph_matches_bruteforce(
    seed: int, ns: int, nt: int, dim: int, classes: int, kc: int, kt: int, ks: int
) -> None:
    fs, ys, ft = clustered_data(seed, ns, nt, dim, classes)
    graph = build_cross_domain_graph(fs, ys, ft, k_cross=kc, k_target=kt, k_source=ks)
    dense_ref, counts_ref, _, gap = brute_graph(fs, ys, ft, kc, kt, ks)
    assert gap > 1e-5, "test data must have no near-ties at the k-th neighbour"
    assert graph.n_source == ns and graph.n_target == nt
    dense = check_structure(graph, ys)
    np.testing.assert_array_equal(dense != 0, dense_ref != 0)
    np.testing.assert_allclose(dense, dense_ref, atol=1e-6)
    assert graph.edge_counts == counts_ref
    assert sum(counts_ref.values()) * 2 == graph.adjacency.nnz
    assert sum(counts_ref.values()) > 0


def test_bruteforce_cases_exercise_dropping() -> None:
    """The low-dimensional cases above really have kNN edges of weight <= 0 of every kind (so the
    dropping and the per-kind recount after it are tested)."""
    dropped = {"cross": 0, "target": 0, "source": 0}
    for seed, ns, nt, dim, classes, kc, kt, ks in [(5, 20, 20, 3, 6, 7, 5, 6), (13, 16, 16, 3, 8, 10, 10, 6)]:
        fs, ys, ft = clustered_data(seed, ns, nt, dim, classes)
        _, counts, edges, _ = brute_graph(fs, ys, ft, kc, kt, ks)
        for kind in dropped:
            dropped[kind] += sum(k == kind for k in edges.values()) - counts[kind]
    assert all(d > 0 for d in dropped.values()), dropped


def test_block_counts_match_edge_counts() -> None:
    fs, ys, ft = clustered_data(6, 30, 25, 5, 3)
    graph = build_cross_domain_graph(fs, ys, ft)
    dense = graph.adjacency.toarray()
    ns = graph.n_source
    assert graph.edge_counts["cross"] == np.count_nonzero(dense[:ns, ns:])
    assert graph.edge_counts["target"] == np.count_nonzero(np.triu(dense[ns:, ns:]))
    assert graph.edge_counts["source"] == np.count_nonzero(np.triu(dense[:ns, :ns]))


def test_handmade_graph_drops_non_positive_edges() -> None:
    fs = np.array([[1.0, 0.0], [-1.0, 0.0]])
    ys = np.array([0, 0])
    ft = np.array([[1.0, 0.1], [-1.0, 0.1]])
    graph = build_cross_domain_graph(fs, ys, ft, k_cross=1, k_target=1, k_source=1)
    assert graph.edge_counts == {"cross": 2, "target": 0, "source": 0}
    cos = 1.0 / np.sqrt(1.01)
    expected = np.zeros((4, 4))
    expected[0, 2] = expected[2, 0] = cos
    expected[1, 3] = expected[3, 1] = cos
    np.testing.assert_allclose(graph.adjacency.toarray(), expected, atol=1e-6)
    assert graph.adjacency.nnz == 4


def test_cross_edges_are_mutual_not_one_directional() -> None:
    """Two sources near one target: both pick it, but the target (k=1) only picks the nearer one."""
    fs = np.array([[1.0, 0.0], [1.0, 0.2]])
    ys = np.array([0, 1])
    ft = np.array([[1.0, 0.05], [0.0, 1.0]])
    graph = build_cross_domain_graph(fs, ys, ft, k_cross=1, k_target=0, k_source=0)
    dense = graph.adjacency.toarray()
    assert dense[0, 2] > 0
    assert dense[1, 2] == 0  # s1's nearest target is t0, but t0's nearest source is s0
    assert dense[1, 3] == 0  # t1's nearest source is s1, but s1's nearest target is t0
    assert graph.edge_counts["cross"] == 1


# ------------------------------------------------------------------ switching kinds off


@pytest.mark.parametrize("kind", ["cross", "target", "source"])
def test_k_zero_switches_kind_off(kind: str) -> None:
    fs, ys, ft = clustered_data(7, 25, 20, 5, 3)
    full = build_cross_domain_graph(fs, ys, ft, k_cross=3, k_target=3, k_source=3)
    ks = {"k_cross": 3, "k_target": 3, "k_source": 3}
    ks[f"k_{kind}"] = 0
    part = build_cross_domain_graph(fs, ys, ft, **ks)
    ns = 25
    blocks = {
        "cross": (slice(0, ns), slice(ns, None)),
        "target": (slice(ns, None), slice(ns, None)),
        "source": (slice(0, ns), slice(0, ns)),
    }
    d_full, d_part = full.adjacency.toarray(), part.adjacency.toarray()
    assert full.edge_counts[kind] > 0
    assert part.edge_counts[kind] == 0
    assert not d_part[blocks[kind]].any()
    for other, block in blocks.items():
        if other != kind:
            np.testing.assert_array_equal(d_part[block], d_full[block])
            assert part.edge_counts[other] == full.edge_counts[other]


def test_all_kinds_off_gives_empty_graph() -> None:
    fs, ys, ft = clustered_data(8, 5, 4, 3, 2)
    graph = build_cross_domain_graph(fs, ys, ft, k_cross=0, k_target=0, k_source=0)
    assert graph.adjacency.nnz == 0
    assert graph.adjacency.shape == (9, 9)
    assert graph.edge_counts == {"cross": 0, "target": 0, "source": 0}
    summary = graph.summary()
    assert summary["isolated_nodes"] == 9
    assert summary["targets_with_cross_edge"] == 0


def test_single_target_and_singleton_classes() -> None:
    """One target (no intra-target pair) and classes of one source (no intra-source pair)."""
    rng = np.random.default_rng(9)
    fs = rng.normal(size=(3, 4))
    ys = np.array([0, 1, 2])
    ft = rng.normal(size=(1, 4))
    graph = build_cross_domain_graph(fs, ys, ft, k_cross=3, k_target=3, k_source=3)
    dense_ref, counts_ref, _, _ = brute_graph(fs, ys, ft, 3, 3, 3)
    assert graph.edge_counts == counts_ref
    assert counts_ref["target"] == counts_ref["source"] == 0
    np.testing.assert_allclose(graph.adjacency.toarray(), dense_ref, atol=1e-6)


# ------------------------------------------------------------------ helpers of the dataclass


def test_summary_and_properties_are_consistent() -> None:
    fs, ys, ft = clustered_data(10, 30, 30, 6, 4)
    graph = build_cross_domain_graph(fs, ys, ft, k_cross=2, k_target=1, k_source=1)
    dense = graph.adjacency.toarray()
    ns, n = graph.n_source, graph.n_nodes
    assert n == 60
    summary = graph.summary()
    assert summary["nodes"] == 60
    for kind, count in graph.edge_counts.items():
        assert summary[f"edges_{kind}"] == count
    isolated = int((~dense.any(axis=1)).sum())
    assert summary["isolated_nodes"] == isolated
    assert isolated > 0, "sparse k should leave some node isolated"
    with_cross = int(dense[ns:, :ns].any(axis=1).sum())
    assert summary["targets_with_cross_edge"] == with_cross
    assert 0 < with_cross < graph.n_target
    np.testing.assert_allclose(graph.degree, dense.sum(axis=1), rtol=1e-12)
    assert graph.degree.dtype == np.float64
    np.testing.assert_array_equal(graph.is_source(), np.arange(n) < ns)
    np.testing.assert_array_equal(graph.target_nodes(), np.arange(ns, n))


# ------------------------------------------------------------------ errors


def _ok() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return clustered_data(11, 6, 5, 3, 2)


def test_dimension_mismatch() -> None:
    fs, ys, _ = _ok()
    with pytest.raises(DataError, match="3-d but target features 4-d"):
        build_cross_domain_graph(fs, ys, np.ones((5, 4)))


def test_empty_domains() -> None:
    fs, ys, ft = _ok()
    with pytest.raises(DataError, match="both domains need samples"):
        build_cross_domain_graph(np.zeros((0, 3)), np.zeros(0, np.int64), ft)
    with pytest.raises(DataError, match="both domains need samples"):
        build_cross_domain_graph(fs, ys, np.zeros((0, 3)))


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 1, -1, 0, 1, 0]),
        np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0]),
        np.array([0, 1, 1, 0, 1]),
        np.array([[0], [1], [1], [0], [1], [0]]),
        np.array([True, False, True, False, True, False]),
    ],
)
def test_bad_labels(labels: np.ndarray) -> None:
    fs, _, ft = _ok()
    with pytest.raises(DataError, match="non-negative integers"):
        build_cross_domain_graph(fs, labels, ft)


@pytest.mark.parametrize("name", ["k_cross", "k_target", "k_source"])
@pytest.mark.parametrize("value", [-1, 1.5, None, "3"])
def test_bad_k(name: str, value: object) -> None:
    fs, ys, ft = _ok()
    with pytest.raises(DataError, match=f"{name} must be an integer >= 0"):
        build_cross_domain_graph(fs, ys, ft, **{name: value})  # type: ignore[arg-type]


def test_non_finite_features() -> None:
    fs, ys, ft = _ok()
    ft = ft.copy()
    ft[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        build_cross_domain_graph(fs, ys, ft)


# ------------------------------------------------------------------ previous construction, ivf


def previous_construction(fs: np.ndarray, ys: np.ndarray, ft: np.ndarray, k: int) -> tuple[sp.csr_matrix, dict]:
    """The graph exactly as built before the index reuse / class grouping / 1-D unique changes: three
    one-off exact searches, a mask per class and ``np.unique(axis=1)``."""
    xs, xt = l2_normalize(fs), l2_normalize(ft)
    n_s, n_t = xs.shape[0], xt.shape[0]
    _, t_to_s = knn_search(xt, xs, k, normalized=True)
    _, s_to_t = knn_search(xs, xt, k, normalized=True)
    s_idx, t_idx = mutual_pairs(s_to_t, t_to_s, n_t)
    _, t_to_t = knn_search(xt, xt, k, exclude_self=True, normalized=True)
    a, b = mutual_pairs(t_to_t, t_to_t, n_t)
    keep = a < b
    pairs = []
    for cls in np.unique(ys):
        members = np.flatnonzero(ys == cls)
        if members.size < 2:
            continue
        _, local = knn_search(xs[members], xs[members], k, exclude_self=True, normalized=True)
        u, v = np.repeat(members, local.shape[1]), members[local.reshape(-1)]
        pairs.append(np.stack([np.minimum(u, v), np.maximum(u, v)]))
    source = np.unique(np.concatenate(pairs, axis=1), axis=1)
    row = np.concatenate([s_idx, n_s + a[keep], source[0]])
    col = np.concatenate([n_s + t_idx, n_s + b[keep], source[1]])
    nodes = np.concatenate([xs, xt])
    weight = np.einsum("ij,ij->i", nodes[row], nodes[col]).astype(np.float64)
    counts = {"cross": s_idx.size, "target": int(keep.sum()), "source": source.shape[1]}
    start, positive = 0, weight > 0
    for kind in ("cross", "target", "source"):
        counts[kind], start = int(positive[start:start + counts[kind]].sum()), start + counts[kind]
    upper = sp.coo_matrix((weight[positive], (row[positive], col[positive])), shape=(n_s + n_t,) * 2)
    adjacency = (upper + upper.T).tocsr()
    adjacency.sum_duplicates()
    adjacency.sort_indices()
    return adjacency, counts


@pytest.mark.parametrize(("seed", "ns", "nt", "classes", "knn"),
                         [(20, 1500, 1200, 7, "exact"), (21, 900, 2000, 3, "auto"), (22, 600, 700, 40, "exact")])
def test_exact_graph_is_bitwise_the_previous_construction(seed: int, ns: int, nt: int, classes: int, knn: str) -> None:
    fs, ys, ft = clustered_data(seed, ns, nt, 12, classes)
    ys = ys * 3 + 1  # non-contiguous class ids
    graph = build_cross_domain_graph(fs, ys, ft, knn=knn)
    ref, counts = previous_construction(fs, ys, ft, 3)
    assert graph.edge_counts == counts
    np.testing.assert_array_equal(graph.adjacency.indptr, ref.indptr)
    np.testing.assert_array_equal(graph.adjacency.indices, ref.indices)
    np.testing.assert_array_equal(graph.adjacency.data, ref.data)


def test_ivf_graph_keeps_most_exact_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """With small cells the ivf search is genuinely approximate; the graph keeps the structure
    invariants and most of the exact graph's edges."""
    import crossret.graph.knn as knn_module

    monkeypatch.setattr(knn_module, "IVF_CELL_ROWS", 60)
    monkeypatch.setattr(knn_module, "IVF_PROBES", 6)
    fs, ys, ft = clustered_data(23, 2500, 2500, 16, 5)
    exact = build_cross_domain_graph(fs, ys, ft, knn="exact")
    approx = build_cross_domain_graph(fs, ys, ft, knn="ivf")
    assert knn_module.KnnIndex(l2_normalize(ft), method="ivf").approximate
    check_structure(approx, ys)
    e, a = exact.adjacency, approx.adjacency
    shared = e.multiply(a > 0).nnz
    assert shared / e.nnz > 0.9
    assert shared / a.nnz > 0.9
    # shared edges carry the same cosine weight
    np.testing.assert_allclose(e.multiply(a > 0).data, a.multiply(e > 0).data, atol=1e-6)


# ------------------------------------------------------------------ benchmarks/graph_scaling.py


def _graph_scaling_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "graph_scaling.py"
    spec = importlib.util.spec_from_file_location("graph_scaling_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_graph_scaling_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows, recall (approximate above a lowered threshold) and exponents of the scaling benchmark."""
    import crossret.graph.knn as knn_module

    bench = _graph_scaling_module()
    monkeypatch.setattr(knn_module, "AUTO_APPROX_ROWS", 500)
    monkeypatch.setattr(knn_module, "IVF_CELL_ROWS", 50)
    monkeypatch.setattr(knn_module, "IVF_PROBES", 4)
    out = bench.measure_graph_scaling([600, 1600], dim=8, classes=3, repeat_up_to=600, recall_queries=100)
    small, large = out["rows"]
    assert (small["nodes"], large["nodes"]) == (600, 1600)
    assert (small["repeats"], large["repeats"]) == (2, 1)
    assert small["recall"]["cross_target_to_source"] is None  # 300 rows: exact
    for key in ("cross_target_to_source", "cross_source_to_target", "target"):
        assert 0.5 < large["recall"][key] <= 1.0
    assert large["converged"] and large["edges"] == large["edges_cross"] + large["edges_target"] + large[
        "edges_source"]
    assert set(out["exponents"]) >= {"total_seconds_vs_nodes", "graph_cpu_seconds_vs_edges"}
    assert out["exponents_approximate_regime"] == {}  # only one size above 2 × 500 nodes


def test_isotropic_generator_is_the_earlier_one() -> None:
    bench = _graph_scaling_module()
    xs, ys, xt = bench.synthetic(501, 6, 3, 7, intrinsic_dim=None)
    rng = np.random.default_rng(7)  # the earlier generator, draw for draw
    centres = rng.normal(size=(3, 6)) * 2.0
    ys_ref, yt_ref = rng.integers(0, 3, 250), rng.integers(0, 3, 251)
    xs_ref = centres[ys_ref] + rng.normal(size=(250, 6))
    xt_ref = centres[yt_ref] + rng.normal(size=6) + rng.normal(size=(251, 6)) * 1.2
    np.testing.assert_array_equal(ys, ys_ref)
    np.testing.assert_array_equal(xs, xs_ref.astype(np.float32))
    np.testing.assert_array_equal(xt, xt_ref.astype(np.float32))
    xs16, _, xt16 = bench.synthetic(501, 6, 3, 7, intrinsic_dim=2)
    assert xs16.shape == (250, 6) and xt16.shape == (251, 6)
