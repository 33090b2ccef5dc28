"""Numerical robustness (issue "Reliability", item 4): every degenerate input has a defined behaviour.

Each section is one case, checked at every layer where it can arise: data containers → graph (kNN,
cross-domain graph) → flow diffusion / random walks → COUPLE fit + encode → baselines (LSH, ITQ,
source-only) → GCKD feature heads → index / metrics. A behaviour is either a :class:`CrossretError`
subclass whose message names the problem and the remedy, or a result with exact invariants (codes
are ±1 and finite, the selected set excludes unreachable targets, potentials satisfy the KKT
conditions, ...). The decisions are listed in the module docstrings they test (``FeatureNormalizer``,
``crossret.graph.diffusion``, ``build_cross_domain_graph``, ``crossret.hashing.itq``).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from crossret.data.domain import Domain, check_features
from crossret.errors import CodeError, CrossretError, DataError, NumericalError
from crossret.graph.cross_domain import build_cross_domain_graph
from crossret.graph.diffusion import (
    class_seed_mass,
    clip_to_feasible,
    l2_flow_diffusion,
    l2_flow_diffusion_active_set,
    laplacian,
)
from crossret.graph.knn import knn_search, l2_normalize
from crossret.graph.walks import random_walks
from crossret.hashing.couple import Couple, CoupleConfig
from crossret.hashing.itq import ITQ
from crossret.hashing.lsh import LSH
from crossret.hashing.networks import HashNet, check_finite_network
from crossret.hashing.preprocessing import FeatureNormalizer
from crossret.hashing.source_only import SourceOnly, SourceOnlyConfig
from crossret.retrieval import BinaryIndex, pack_codes
from crossret.retrieval.metrics import evaluate_hamming
from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel

BITS = 16
SOLVERS = [l2_flow_diffusion, l2_flow_diffusion_active_set]
TINY_COUPLE = {"epochs": 3, "warmup_epochs": 1, "graph_every": 1, "batch_size": 16, "target_batch_size": 16,
               "hash_hidden": 16, "encoder_dim": 16}
METHODS = ["lsh", "itq", "source-only", "couple"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_method(name: str, **overrides):
    if name == "lsh":
        return LSH(BITS)
    if name == "itq":
        return ITQ(BITS)
    if name == "source-only":
        return SourceOnly(BITS, config=SourceOnlyConfig(epochs=2, hash_hidden=16, encoder_dim=16, **overrides))
    return Couple(BITS, config=CoupleConfig(**{**TINY_COUPLE, **overrides}))


def blobs(seed: int = 0, n: int = 30, dim: int = 8, classes: int = 3, shift: float = 1.0):
    """Labelled source and shifted target features (float64), 3 Gaussian classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, size=(classes, dim))
    labels = np.arange(n) % classes
    xs = centres[labels] + rng.standard_normal((n, dim))
    xt = centres[labels] + rng.standard_normal((n, dim)) + shift
    return xs, labels, xt


def domains(xs, ys, xt) -> tuple[Domain, Domain]:
    return Domain("src", xs, ys), Domain("tgt", xt, np.full(len(xt), -1))


def fit_encode(name: str, xs, ys, xt, queries=None, **overrides):
    method = make_method(name, **overrides)
    method.fit(*domains(xs, ys, xt))
    return method, method.encode(xt if queries is None else queries)


def assert_codes(codes: np.ndarray, n: int) -> None:
    """Codes are an (n, BITS) int8 matrix of ±1 (sign(0) = +1: never 0, never NaN)."""
    assert codes.shape == (n, BITS) and codes.dtype == np.int8
    assert np.isin(codes, (-1, 1)).all()


def assert_finite_diagnostics(value) -> None:
    """No NaN/inf anywhere in a (nested) diagnostics dict: they go to metrics.json."""
    if isinstance(value, dict):
        for item in value.values():
            assert_finite_diagnostics(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            assert_finite_diagnostics(item)
    elif isinstance(value, (float, np.floating)):
        assert np.isfinite(value)


def path_graph(n: int) -> sp.csr_matrix:
    rows = np.arange(n - 1)
    upper = sp.coo_matrix((np.ones(n - 1), (rows, rows + 1)), shape=(n, n))
    return (upper + upper.T).tocsr()


def assert_kkt(adjacency: sp.csr_matrix, delta: np.ndarray, capacity: np.ndarray, result, tol: float = 1e-6) -> None:
    """x ≥ 0, m = Δ − L x, m ≤ T (to tolerance), x_i (T_i − m_i) = 0."""
    x = result.potential.reshape(delta.shape[0], -1)
    m = result.mass.reshape(delta.shape[0], -1)
    scale = max(float(delta.max(initial=0.0)), float(capacity.max(initial=0.0)), np.finfo(float).tiny)
    assert (x >= 0).all()
    np.testing.assert_allclose(m, delta.reshape(m.shape) - laplacian(adjacency) @ x, atol=1e-9 * scale)
    assert (m <= capacity[:, None] + tol * scale).all()
    slack = x * (capacity[:, None] - m)
    assert np.abs(slack).max(initial=0.0) <= 1e-6 * scale * max(1.0, float(x.max(initial=0.0)))


# ================================================================================================
# 1. NaN / inf in inputs: rejected at every boundary, naming the rows
# ================================================================================================
BAD_VALUES = [np.nan, np.inf, -np.inf]


def poisoned(x: np.ndarray, value: float, rows=(1, 3)) -> np.ndarray:
    x = np.array(x, dtype=np.float64, copy=True)
    for r in rows:
        x[r, r % x.shape[1]] = value
    return x


@pytest.mark.parametrize("value", BAD_VALUES)
def test_nan_inf_domain_names_the_rows(value) -> None:
    xs, ys, _ = blobs()
    with pytest.raises(DataError, match=r"src: 2 sample\(s\) have NaN or inf features \(rows 1, 3\); clean or drop"):
        Domain("src", poisoned(xs, value), ys)
    with pytest.raises(DataError, match=r"1 pair\(s\) have NaN or inf text features \(row 3\)"):
        check_features(poisoned(xs, value, rows=(3,)), "wiki", "text", "pair")


def test_nan_row_listing_is_capped() -> None:
    x = np.full((30, 2), np.nan)
    with pytest.raises(DataError, match=r"30 sample\(s\).*rows 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 20 more"):
        Domain("d", x, np.zeros(30, int))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("side", ["source", "target"])
def test_nan_inf_graph_names_domain_and_rows(value, side) -> None:
    xs, ys, xt = blobs()
    if side == "source":
        xs = poisoned(xs, value, rows=(2,))
    else:
        xt = poisoned(xt, value, rows=(2,))
    with pytest.raises(DataError, match=rf"{side} features contain NaN or inf in 1 row\(s\) \(row 2\)"):
        build_cross_domain_graph(xs, ys, xt)
    with pytest.raises(DataError, match=r"NaN or inf in 1 row\(s\) \(row 2\)"):
        knn_search(xs if side == "source" else xt, np.ones((4, xs.shape[1])), 2)


@pytest.mark.parametrize("value", BAD_VALUES)
def test_nan_inf_normaliser_names_the_rows(value) -> None:
    xs, _, _ = blobs()
    with pytest.raises(DataError, match=r"training features: 2 row\(s\) contain NaN or inf \(rows 1, 3\)"):
        FeatureNormalizer().fit(poisoned(xs, value))
    norm = FeatureNormalizer().fit(xs)
    with pytest.raises(DataError, match=r"normaliser: features: 1 row\(s\) contain NaN or inf \(row 3\)"):
        norm.transform(poisoned(xs, value, rows=(3,)))


@pytest.fixture(scope="module")
def fitted_methods():
    """Each method fitted once on ordinary blobs (for the encode-side checks)."""
    xs, ys, xt = blobs()
    out = {}
    for name in METHODS:
        method = make_method(name)
        method.fit(*domains(xs, ys, xt))
        out[name] = method
    return out


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("name", METHODS)
def test_nan_inf_encode_is_refused(fitted_methods, name, value) -> None:
    _, _, xt = blobs()
    rows = np.flatnonzero(~np.isfinite(poisoned(xt, value)).all(axis=1))
    message = rf"{name}\.encode: {rows.size} sample\(s\) have NaN or inf features \(rows {', '.join(map(str, rows))}\)"
    with pytest.raises(DataError, match=message):
        fitted_methods[name].encode(poisoned(xt, value))


@pytest.mark.parametrize("value", BAD_VALUES)
def test_nan_inf_in_diffusion_and_walk_inputs(value) -> None:
    adjacency = path_graph(4)
    bad = adjacency.copy()
    bad.data[0] = value
    bad.data[1] = value  # both directions of edge (0, 1)
    for solver in SOLVERS:
        with pytest.raises(DataError, match="edge weights must be finite and >= 0"):
            solver(bad, np.array([3.0, 0, 0, 0]), np.ones(4))
        with pytest.raises(DataError, match="source mass and capacity must be finite and >= 0"):
            solver(adjacency, np.array([value, 0, 0, 0]), np.ones(4))
    with pytest.raises(DataError, match="edge weights must be finite and >= 0"):
        random_walks(bad, np.array([0]), 3, np.random.default_rng(0))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("modality", ["image", "text"])
def test_nan_inf_feature_heads_name_the_rows(value, modality) -> None:
    model = small_feature_heads()
    x = torch.randn(4, 6 if modality == "image" else 5)
    x[2, 0] = value
    encode = model.encode_image if modality == "image" else model.encode_text
    with pytest.raises(DataError, match=rf"{modality} features: 1 row\(s\) contain NaN or inf \(row 2\)"):
        encode(x)


@pytest.mark.parametrize(("labels", "message"), [
    (np.array([0, 1, np.nan, 1]), "non-integer or NaN"),
    (np.array([0, 1, 1e20, 1]), "below 2\\^63"),
    (np.array([0, 1, 2**63, 1], dtype=np.uint64), "below 2\\^63"),
    (np.array([0, 1, 0.5, 1]), "non-integer or NaN"),
])
def test_bad_labels_are_refused_before_any_cast(labels, message) -> None:
    with pytest.raises(DataError, match=message):
        Domain("d", np.ones((4, 2)), labels)


# ================================================================================================
# 2. Constant features, all rows identical, zero rows
# ================================================================================================
@pytest.mark.parametrize("standardize", [False, True])
def test_normaliser_constant_feature_is_exactly_zero(standardize) -> None:
    xs, _, _ = blobs()
    xs[:, 2] = 0.1  # not exactly representable: rounding noise would show if the mean were computed
    norm = FeatureNormalizer(center=True, scale=standardize).fit(xs)
    out = norm.transform(xs)
    assert (out[:, 2] == 0.0).all() and norm.scale_[2] == 1.0
    assert np.isfinite(out).all() and norm.global_scale == 1.0
    if standardize:
        np.testing.assert_allclose(np.delete(out, 2, axis=1).std(axis=0), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", METHODS)
def test_all_identical_rows_give_one_valid_code(name) -> None:
    """Every training row the same point: no direction to learn. Codes are still ±1 and finite, identical
    for all rows; LSH and ITQ give the all-(+1) code (projections of 0, sign(0) = +1)."""
    _, ys, _ = blobs()
    x = np.full((30, 8), 2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning (ITQ's PCA used to warn and report NaN)
        method, codes = fit_encode(name, x, ys, x)
    assert_codes(codes, 30)
    assert (codes == codes[0]).all()
    if name in ("lsh", "itq"):
        assert (codes == 1).all()
    assert_finite_diagnostics(method.diagnostics)
    if name == "itq":
        assert method.diagnostics["pca_rank"] == 0 and method.diagnostics["explained_variance"] == 0.0
        queries = np.random.default_rng(1).standard_normal((5, 8))
        assert (method.encode(queries) == 1).all()  # no learned direction: every item maps to all +1


@pytest.mark.parametrize("name", METHODS)
def test_constant_columns_do_not_break_codes(name) -> None:
    xs, ys, xt = blobs()
    xs[:, [2, 5]] = 7.0
    xt[:, [2, 5]] = 7.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method, codes = fit_encode(name, xs, ys, xt)
    assert_codes(codes, len(xt))
    assert np.unique(codes, axis=0).shape[0] > 1
    assert_finite_diagnostics(method.diagnostics)
    if name == "itq":
        assert method.diagnostics["pca_rank"] == 6  # the two constant columns carry no variance


def test_zero_rows_are_isolated_and_other_rows_keep_their_edges() -> None:
    xs, ys, xt = blobs()
    xt[[0, 4]] = 0.0
    graph = build_cross_domain_graph(xs, ys, xt, k_cross=3, k_target=3, k_source=3)
    dense = graph.adjacency.toarray()
    n_s = len(xs)
    assert not dense[n_s + 0].any() and not dense[n_s + 4].any()
    assert graph.summary()["isolated_targets"] >= 2
    unit = l2_normalize(xt)
    assert (unit[[0, 4]] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(np.delete(unit, [0, 4], axis=0), axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("rows", ["identical", "duplicated"])
def test_knn_ties_give_a_deterministic_valid_graph(rows) -> None:
    """Identical rows tie in every kNN list: the order is faiss's (deterministic), the graph is valid
    (symmetric, no self-loops, weights in (0, 1]) and identical rows are joined with weight 1."""
    xs, ys, xt = blobs()
    if rows == "identical":
        xs, xt = np.ones_like(xs), np.ones_like(xt)
    else:
        xs, xt = np.repeat(xs[:3], 10, axis=0), np.repeat(xt[:2], 15, axis=0)
        ys = np.repeat(ys[:3], 10)
    first = build_cross_domain_graph(xs, ys, xt, k_cross=3, k_target=3, k_source=3)
    second = build_cross_domain_graph(xs, ys, xt, k_cross=3, k_target=3, k_source=3)
    a = first.adjacency
    assert (a != second.adjacency).nnz == 0
    assert abs(a - a.T).max() == 0 and not a.diagonal().any()
    assert (a.data > 0).all() and (a.data <= 1 + 1e-6).all() and a.nnz > 0
    if rows == "identical":
        np.testing.assert_allclose(a.data, 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_duplicated_rows_get_identical_codes(name) -> None:
    xs, ys, xt = blobs()
    xs, ys = np.repeat(xs[:6], 5, axis=0), np.repeat(ys[:6], 5)
    xt = np.repeat(xt[:4], 5, axis=0)
    _, codes = fit_encode(name, xs, ys, xt)
    assert_codes(codes, len(xt))
    for group in range(4):
        assert (codes[group * 5:(group + 1) * 5] == codes[group * 5]).all()


# ================================================================================================
# 3. A class present in only one domain
# ================================================================================================
def closed_world(seed: int = 0):
    """Source classes 0, 1, 2 and a target with classes 0, 1 only, plus:

    * class 2's sources lie along their own axis (feature 9): negative cosine with every target, so no
      cross edge: the class still seeds the diffusion but its mass cannot leave the source side;
    * a target-only class (6 targets along feature 10): joined to each other, never to a source;
    * one outlier target (feature 8): cosine < 0 with everything, an isolated node.
    Returns ``(source, target, target_only_rows, outlier_row)``.
    """
    rng = np.random.default_rng(seed)
    dim = 11
    centres = np.zeros((3, dim))
    centres[0, 0] = centres[1, 1] = 6.0
    centres[2, 9] = 40.0
    ys = np.repeat(np.arange(3), 12)
    xs = centres[ys] + np.pad(rng.standard_normal((ys.size, 8)), ((0, 0), (0, 3)))
    yt = np.repeat(np.arange(2), 12)
    xt = centres[yt] + np.pad(rng.standard_normal((yt.size, 8)), ((0, 0), (0, 3))) + 0.5
    only = np.zeros((6, dim))
    only[:, 10] = 40.0
    only[:, :8] += rng.standard_normal((6, 8))
    outlier = np.zeros((1, dim))
    outlier[0, 8] = 100.0
    xt = np.concatenate([xt, only, outlier])
    target_only = np.arange(24, 30)
    return Domain("src", xs, ys), Domain("tgt", xt, np.full(len(xt), -1)), target_only, 30


@pytest.mark.parametrize("select_rule", ["top-ratio", "positive"])
@pytest.mark.parametrize("solver", ["active-set", "push"])
def test_couple_class_in_one_domain_and_isolated_targets(select_rule, solver) -> None:
    """COUPLE is closed-set. A source class with no path to the target still seeds its diffusion; its mass
    is clipped to its component and stays on source nodes (``diffusion_classes_without_target`` = 1,
    ``diffusion_clipped_components`` counts it). Targets no diffusion reaches — the isolated outlier and the
    target-only class — keep the classifier's label but are never selected; selected targets carry the
    label of a class whose mass reached them."""
    source, target, target_only, outlier = closed_world()
    method = Couple(BITS, config=CoupleConfig(**{**TINY_COUPLE, "epochs": 4}, graph_features="input", k_target=3,
                                              k_source=3, select_rule=select_rule, solver=solver))
    method.fit(source, target)
    refreshes = [r for r in method.diagnostics["epochs"] if "graph_nodes" in r]
    assert len(refreshes) == 3 == len(method.selection_history)
    for record, entry in zip(refreshes, method.selection_history, strict=True):
        assert record["graph_isolated_targets"] >= 1
        assert record["diffusion_classes_without_target"] == 1
        assert record["diffusion_clipped_components"] >= 1
        assert record["diffusion_converged"] is True
        assert record["targets_reached"] <= len(target) - len(target_only) - 1
        selected = entry["selected"]
        assert selected.size > 0
        assert outlier not in selected and not np.isin(target_only, selected).any()
        assert set(entry["pseudo_labels"][selected].tolist()) <= {0, 1}  # class 2 reached no target
    assert_codes(method.encode(target.features), len(target))
    assert_finite_diagnostics(method.diagnostics)


def test_diffusion_class_without_target_keeps_its_mass_on_source() -> None:
    """Graph: sources 0-1 (class 0) joined to targets 4-5; sources 2-3 (class 1) form their own component.
    The class-1 column is clipped to 99.9 % of its component's capacity and never reaches a target."""
    edges = [(0, 1), (1, 4), (4, 5), (2, 3)]
    rows, cols = zip(*edges, strict=True)
    upper = sp.coo_matrix((np.ones(len(edges)), (rows, cols)), shape=(6, 6))
    adjacency = (upper + upper.T).tocsr()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    seed = class_seed_mass(degree, 4, np.array([0, 0, 1, 1]), 2, target_fill=0.5)
    with pytest.raises(DataError, match=r"infeasible \(column 1\): a connected component of 2 node"):
        l2_flow_diffusion_active_set(adjacency, seed, degree)
    clipped, count = clip_to_feasible(adjacency, seed, degree)
    assert count == 1
    np.testing.assert_array_equal(clipped[:, 0], seed[:, 0])  # the feasible column is untouched
    assert clipped[2:4, 1].sum() == pytest.approx(0.999 * degree[2:4].sum())
    for solver in SOLVERS:
        result = solver(adjacency, clipped, degree)
        assert result.converged
        assert (result.mass[4:, 1] == 0).all() and (result.potential[4:, 1] == 0).all()
        assert result.mass[4:, 0].sum() > 0
        assert_kkt(adjacency, clipped, degree, result, tol=1e-5)


def test_label_gap_class_seeds_nothing_and_labels_nothing() -> None:
    """Source labels {0, 1, 3}: class 2 has no source sample; its seed column is 0 and no reached target
    is labelled 2 (unreached ones keep the classifier's label)."""
    xs, ys, xt = blobs()
    ys = np.where(ys == 2, 3, ys)
    method = Couple(BITS, config=CoupleConfig(**TINY_COUPLE))
    method.fit(*domains(xs, ys, xt))
    assert method.num_classes == 4
    for entry in method.selection_history:
        assert set(entry["pseudo_labels"][entry["selected"]].tolist()) <= {0, 1, 3}


def test_target_only_class_queries_count_as_having_no_relevant_item() -> None:
    """Evaluation: a query whose class is absent from the database has AP 0 and is counted."""
    codes = np.where(np.random.default_rng(0).random((6, BITS)) > 0.5, 1, -1).astype(np.int8)
    result = evaluate_hamming(codes[:2], codes[2:], np.array([7, 0]), np.array([0, 0, 1, 1]))
    assert result.n_queries_without_relevant == 1
    assert result.ap[0] == 0.0 and np.isfinite(result.map)


# ================================================================================================
# 4. Fewer samples than k; k >= number of nodes; one-sample domains and classes
# ================================================================================================
@pytest.mark.parametrize(("n_t", "k_cross", "k_target"), [(3, 5, 10), (1, 3, 3), (2, 50, 50)])
def test_k_larger_than_the_target_is_clipped_and_recorded(n_t, k_cross, k_target) -> None:
    """A k beyond the rows available is clipped per search (kNN returns all rows); the graph records the
    sizes used, and a larger k than every domain gives exactly the graph of k = the largest domain."""
    xs, ys, xt = blobs()
    xt = xt[:n_t]
    graph = build_cross_domain_graph(xs, ys, xt, k_cross=k_cross, k_target=k_target, k_source=100)
    used = {"cross_source": min(k_cross, 30), "cross_target": min(k_cross, n_t), "target": min(k_target, n_t - 1),
            "source": 9}  # classes of 10 samples
    assert graph.k_used == used
    summary = graph.summary()
    assert {kind: summary[f"k_{kind}_used"] for kind in used} == used
    same_target = build_cross_domain_graph(xs, ys, xt, k_cross=k_cross, k_target=used["target"], k_source=9)
    assert (graph.adjacency != same_target.adjacency).nnz == 0
    if k_cross >= 30:
        same_cross = build_cross_domain_graph(xs, ys, xt, k_cross=30, k_target=k_target, k_source=100)
        assert (graph.adjacency != same_cross.adjacency).nnz == 0
    dense = graph.adjacency.toarray()
    assert (dense == dense.T).all() and not np.diag(dense).any()


@pytest.mark.parametrize(("k", "exclude_self", "width"), [(10, False, 4), (10, True, 3), (4, True, 3)])
def test_knn_search_clips_k(k, exclude_self, width) -> None:
    x = np.random.default_rng(0).standard_normal((4, 3))
    sims, idx = knn_search(x, x, k, exclude_self=exclude_self)
    assert sims.shape == idx.shape == (4, width)
    assert (idx >= 0).all() and (idx < 4).all()
    if exclude_self:
        assert not (idx == np.arange(4)[:, None]).any()


def test_couple_with_a_target_smaller_than_k_records_the_clipped_k() -> None:
    xs, ys, xt = blobs()
    method, codes = fit_encode("couple", xs, ys, xt[:3])
    assert_codes(codes, 3)
    for record in method.diagnostics["epochs"][1:]:
        assert record["graph_k_target_used"] == 2 and record["graph_k_cross_target_used"] == 3
        assert record["graph_k_source_used"] == 9 and record["graph_k_cross_source_used"] == 3


@pytest.mark.parametrize("name", METHODS)
def test_one_sample_target(name) -> None:
    """LSH, ITQ, source-only accept a one-sample target; COUPLE refuses it (mutual kNN inside the target
    and target batches need 2 samples)."""
    xs, ys, xt = blobs()
    if name == "couple":
        with pytest.raises(DataError, match=r"both domains need at least 2 training samples \(source 30, target 1\)"):
            fit_encode(name, xs, ys, xt[:1])
        return
    _, codes = fit_encode(name, xs, ys, xt[:1])
    assert_codes(codes, 1)


@pytest.mark.parametrize("name", METHODS)
def test_one_sample_class(name) -> None:
    xs, ys, xt = blobs()
    ys = ys.copy()
    ys[-1] = 5  # a class with a single source sample
    method, codes = fit_encode(name, xs, ys, xt)
    assert_codes(codes, len(xt))
    assert_finite_diagnostics(method.diagnostics)


def test_one_sample_domains_in_containers_and_graph() -> None:
    source = Domain("s", np.ones((1, 3)), [0])
    assert source.n == 1
    with pytest.raises(DataError, match=r"1 class\(es\) present; retrieval by label needs at least 2"):
        source.require_labels()
    graph = build_cross_domain_graph(np.eye(3)[:1], np.array([0]), np.eye(3)[:1] + 0.1, k_cross=3, k_target=3,
                                     k_source=3)
    assert graph.k_used == {"cross_source": 1, "cross_target": 1, "target": 0, "source": 0}
    assert graph.edge_counts == {"cross": 1, "target": 0, "source": 0}


# ================================================================================================
# 5. Isolated nodes
# ================================================================================================
@pytest.mark.parametrize("solver", SOLVERS)
def test_isolated_node_with_mass_beyond_capacity_is_infeasible(solver) -> None:
    adjacency = sp.csr_matrix(sp.block_diag([path_graph(3), sp.csr_matrix((1, 1))]))
    with pytest.raises(DataError, match=r"component of 1 node\(s\) holds mass 1 but only capacity 0.*Lower the "
                                        r"source mass or raise the capacities"):
        solver(adjacency, np.array([0, 0, 0, 1.0]), np.array([1.0, 2, 1, 0]))
    result = solver(adjacency, np.array([2.0, 0, 0, 1.0]), np.array([1.0, 2, 1, 1.0]))
    assert result.potential[3] == 0 and result.mass[3] == 1.0  # held in place, never pushed


def test_seed_mass_on_isolated_sources_is_zero() -> None:
    degree = np.array([0.0, 2.0, 1.0, 0.0, 1.0])
    seed = class_seed_mass(degree, 3, np.array([0, 1, 0]), 2, target_fill=3.0)
    assert seed[0].sum() == 0 and seed[3:].sum() == 0 and seed[1, 1] > 0


def test_walks_from_isolated_nodes_do_not_move() -> None:
    adjacency = sp.csr_matrix(sp.block_diag([path_graph(3), sp.csr_matrix((2, 2))]))
    stop = np.zeros(5, dtype=bool)
    stop[2] = True
    walks = random_walks(adjacency, np.array([3, 4, 0]), 4, np.random.default_rng(0), stop=stop)
    assert walks.lengths[:2].tolist() == [0, 0] and not walks.reached[:2].any()
    assert (walks.nodes[0] == 3).all() and (walks.nodes[1] == 4).all()
    assert walks.lengths[2] >= 1


# ================================================================================================
# 6. Infeasible diffusion and scale
# ================================================================================================
SCALES = [1.0, 2.0 ** -100, 1e-30, 1e30]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_infeasible_diffusion_is_an_error_at_every_scale(solver, scale) -> None:
    """Both solvers refuse infeasible mass (they never rescale it silently), whatever the graph's scale:
    a 1e-30 graph used to slip through the absolute tolerance and return a non-converged result."""
    adjacency = path_graph(4) * scale
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    with pytest.raises(DataError, match=r"flow diffusion is infeasible \(column 0\): a connected component of 4 "
                                        r"node\(s\).*Lower the source mass or raise the capacities"):
        solver(adjacency, np.array([7.0, 0, 0, 0]) * scale, degree)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_diffusion_potentials_are_scale_free(solver, scale) -> None:
    """(cW, cΔ, cT) has the potentials of (W, Δ, T); the result satisfies the KKT conditions."""
    adjacency = path_graph(6)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    delta = np.array([7.0, 0, 0, 0, 0, 0])
    reference = l2_flow_diffusion_active_set(adjacency, delta, degree, tol=1e-10)
    result = solver(adjacency * scale, delta * scale, degree * scale, tol=1e-10)
    assert result.converged
    np.testing.assert_allclose(result.potential, reference.potential, rtol=1e-6, atol=1e-9)
    assert_kkt(adjacency * scale, delta * scale, degree * scale, result)


@pytest.mark.parametrize("solver", SOLVERS)
def test_mass_exactly_at_capacity_is_feasible(solver) -> None:
    adjacency = path_graph(4)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    result = solver(adjacency, np.array([6.0, 0, 0, 0]), degree, tol=1e-8)
    assert result.converged
    np.testing.assert_allclose(result.mass, degree, rtol=1e-6)


@pytest.mark.parametrize("solver", SOLVERS)
def test_empty_graph_is_an_error(solver) -> None:
    with pytest.raises(DataError, match="the graph has no nodes"):
        solver(sp.csr_matrix((0, 0)), np.zeros(0), np.zeros(0))


# ================================================================================================
# 7. NaN appearing during training; overflow at inference
# ================================================================================================
@pytest.mark.parametrize(("name", "lr"), [("source-only", 1e20), ("couple", 1e20), ("source-only", 1e10)])
def test_divergent_training_is_a_numerical_error(name, lr) -> None:
    """A learning rate far too large makes the loss (or, after the last step, the weights) NaN: fit stops
    with a :class:`NumericalError` (a CrossretError and a FloatingPointError) naming lr, never returning NaN
    codes."""
    xs, ys, xt = blobs()
    pattern = r"diverged\. Lower the learning rate \(lr is " + re.escape(f"{lr:g}") + r"\)"
    with pytest.raises(NumericalError, match=pattern) as err:
        fit_encode(name, xs, ys, xt, lr=lr)
    assert isinstance(err.value, CrossretError) and isinstance(err.value, FloatingPointError)


def test_network_with_nan_weights_is_refused() -> None:
    net = HashNet(4, BITS, 3, encoder_dim=4, hash_hidden=4)
    with torch.no_grad():
        net.hash_head[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"couple: the trained network holds NaN or inf in hash_head\.0\.weight"):
        check_finite_network(net, where="couple", lr=1e-4)


def test_inference_overflow_is_a_data_error_not_nan_codes() -> None:
    net = HashNet(4, BITS, 3, encoder_dim=4, hash_hidden=4).eval()
    with torch.no_grad():
        net.encoder[0].weight.fill_(1e30)
    with pytest.raises(DataError, match=r"HashNet: 2 of 2 input row\(s\) give NaN or inf outputs"):
        net(torch.full((2, 4), 1e30))
    net.train()
    assert net(torch.ones(3, 4)).hash.shape == (3, BITS)  # training mode: the loss check applies instead
    with torch.no_grad():
        net.encoder[0].weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"HashNet: the trained network holds NaN or inf in encoder\.0\.weight"):
        net.eval()(torch.ones(2, 4))


def test_normaliser_refuses_rows_that_overflow_float32() -> None:
    norm = FeatureNormalizer().fit(np.random.default_rng(0).standard_normal((20, 3)) * 1e-30)
    assert norm.global_scale < 1
    query = np.array([[0.0, 0, 0], [1e10, 0, 0]])
    with pytest.raises(DataError, match=r"1 row\(s\) \(row 1\) exceed the float32 range after normalisation"):
        norm.transform(query, dtype=np.float32)
    assert np.isfinite(norm.transform(query)).all()  # float64 holds it


def test_feature_heads_overflow_is_a_numerical_error() -> None:
    model = small_feature_heads()
    with pytest.raises(NumericalError, match=r"image features: 2 row\(s\) \(rows 0, 1\) give NaN/inf embeddings.*"
                                             r"L2-normalise each row"):
        model.encode_image(torch.full((2, 6), 1e30))


# ================================================================================================
# 8. Extreme magnitudes, float16 and integer inputs
# ================================================================================================
@pytest.mark.parametrize("name", METHODS)
def test_power_of_two_scales_give_identical_codes(name) -> None:
    """Features ×2^100 and ×2^-100 normalise to bit-identical inputs (the normaliser's power-of-two
    rescale), so every method gives the same codes — and informative ones, not one constant code as
    float32 training on 1e30 inputs used to (BatchNorm overflowed)."""
    xs, ys, xt = blobs()
    codes = []
    for scale in (2.0 ** 100, 2.0 ** -100):
        method, c = fit_encode(name, xs * scale, ys, xt * scale)
        assert method.diagnostics["feature_rescale"] != 1.0
        codes.append(c)
    np.testing.assert_array_equal(codes[0], codes[1])
    assert_codes(codes[0], len(xt))
    assert np.unique(codes[0], axis=0).shape[0] > 3
    if name in ("lsh", "itq"):  # sign/angle methods: the same codes as on unit-scale data
        np.testing.assert_array_equal(codes[0], fit_encode(name, xs, ys, xt)[1])


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("name", METHODS)
def test_extreme_magnitudes_give_informative_finite_codes(name, scale) -> None:
    xs, ys, xt = blobs()
    method, codes = fit_encode(name, xs * scale, ys, xt * scale)
    assert_codes(codes, len(xt))
    assert np.unique(codes, axis=0).shape[0] > 3
    assert np.isfinite(method.encode_real(xt * scale)).all()
    assert_finite_diagnostics(method.diagnostics)


@pytest.mark.parametrize("data", ["identical", "scaled"])
@pytest.mark.parametrize("name", ["lsh", "itq", "source-only"])
def test_degenerate_fits_survive_save_and_load(tmp_path, name, data) -> None:
    """The power-of-two rescale is part of the saved normaliser, and ITQ's zero projection saves like any."""
    from crossret.hashing.registry import load_method

    xs, ys, xt = blobs()
    if data == "identical":
        xs, xt = np.full_like(xs, 3.0), np.full_like(xt, 3.0)
    else:
        xs, xt = xs * 1e30, xt * 1e30
    method, codes = fit_encode(name, xs, ys, xt)
    restored = load_method(method.save(tmp_path / "model"))
    np.testing.assert_array_equal(restored.encode(xt), codes)


def test_magnitude_rule_leaves_ordinary_data_alone() -> None:
    xs, _, _ = blobs()
    for factor in (2.0 ** -19, 1.0, 2.0 ** 18):
        norm = FeatureNormalizer().fit(xs * factor)
        assert norm.global_scale == 1.0 and (norm.scale_ == 1.0).all()


def test_standardising_tiny_data_still_standardises() -> None:
    xs, _, _ = blobs()
    norm = FeatureNormalizer(center=True, scale=True).fit(xs * 1e-30)
    np.testing.assert_allclose(norm.transform(xs * 1e-30).std(axis=0), 1.0, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("name", ["lsh", "itq", "couple"])
def test_float16_and_integer_features(fitted_methods, name, dtype) -> None:
    """Containers convert to float32; encode accepts any real dtype and gives the codes of its float32 value."""
    _, _, xt = blobs()
    values = np.abs(np.round(xt * 10)) if dtype == np.uint8 else np.round(xt * 10)
    cast = values.astype(dtype)
    assert Domain("d", cast, np.zeros(len(cast), int)).features.dtype == np.float32
    method = fitted_methods[name]
    np.testing.assert_array_equal(method.encode(cast), method.encode(cast.astype(np.float32)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64])
def test_feature_heads_cast_other_dtypes(dtype) -> None:
    model = small_feature_heads()
    x = torch.round(torch.randn(3, 6) * 4)
    _, feat = model.encode_image(x.to(dtype))
    _, reference = model.encode_image(x.to(dtype).float())
    torch.testing.assert_close(feat, reference)
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(3))


def test_feature_heads_constant_and_zero_inputs_are_finite() -> None:
    model = small_feature_heads()
    for x in (torch.zeros(2, 6), torch.full((2, 6), 5.0), torch.full((2, 6), 1e-30)):
        _, feat = model.encode_image(x)
        assert torch.isfinite(feat).all()
        torch.testing.assert_close(feat.norm(dim=1), torch.ones(2))


def test_float64_features_beyond_float32_are_refused_not_turned_into_inf() -> None:
    with pytest.raises(DataError, match=r"beyond the float32 range .* in 1 sample\(s\); rescale the features"):
        Domain("d", np.array([[1.0, 2.0], [1e39, 0.0]]), [0, 1])
    unit = l2_normalize(np.array([[1e300, 1e300], [3.0, 4.0]]))  # the graph normalises in float64
    np.testing.assert_allclose(unit, [[2 ** -0.5, 2 ** -0.5], [0.6, 0.8]], rtol=1e-6)


# ================================================================================================
# 9. Index / search on degenerate codes
# ================================================================================================
def test_index_with_k_beyond_the_database_and_tied_codes() -> None:
    codes = np.ones((5, BITS), dtype=np.int8)
    index = BinaryIndex.from_packed(pack_codes(codes), BITS)
    dist, ids = index.search(pack_codes(codes[:2]), 8)
    assert dist.dtype == np.int32 and ids.dtype == np.int64
    assert (ids[:, :5] == np.arange(5)).all() and (dist[:, :5] == 0).all()  # ties: database order
    assert (ids[:, 5:] == -1).all() and (dist[:, 5:] == np.iinfo(np.int32).max).all()


def test_nan_codes_never_reach_the_index() -> None:
    from crossret.retrieval.packing import binarize

    with pytest.raises(CodeError, match="NaN or inf"):
        binarize(np.array([[0.5, np.nan]]))
    assert binarize(np.zeros((1, 4))).tolist() == [[1, 1, 1, 1]]  # sign(0) = +1


# ------------------------------------------------------------------------------------------------ helpers
def small_feature_heads() -> FeatureHeadsModel:
    torch.manual_seed(0)
    model = FeatureHeadsModel(FeatureHeadsConfig(image_dim=6, text_dim=5, embed_dim=4, hidden_dim=8, fusion_dim=4,
                                                 dropout=0.0))
    return model.eval()


@pytest.mark.parametrize("name", ["couple", "source-only"])
def test_huge_label_ids_are_refused_before_allocating_a_classifier(name) -> None:
    from crossret.hashing import make_method

    xs, ys, xt = blobs()
    ys = ys.copy()
    ys[0] = 1 << 40  # would size a classifier head of 2**40 outputs
    method = make_method(name, BITS, seed=0, overrides={"epochs": 1})
    with pytest.raises(DataError, match=r"label id 1099511627776 is too large .* renumber the classes"):
        method.fit(Domain("src", xs, ys), Domain("tgt", xt, np.full(len(xt), -1)))
