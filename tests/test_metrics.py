"""Retrieval metrics against independent brute-force references.

* tie rule ``index``: per query ``np.argsort(dist, kind="stable")`` then cumulative sums;
* tie rule ``expected``: every ordering of every tie group enumerated (itertools.permutations of the
  tied items, product over groups) on tiny databases, and the metrics averaged exactly;
* numerical accuracy of the harmonic-number terms at N ~ 1e6 against ``math.fsum``;
* a published-style MAP implementation (±1 inner-product Hamming + stable argsort);
* the Hamming kernel against ``faiss.IndexBinaryFlat``;
* dense (text-to-image) metrics against a direct argsort reference and a hand-computed example.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from crossret.errors import CodeError, ConfigError, DataError
from crossret.retrieval import hamming
from crossret.retrieval import metrics as metrics_module
from crossret.retrieval.metrics import (
    dense_retrieval_metrics,
    evaluate_hamming,
    mean_average_precision,
)
from crossret.retrieval.packing import pack_codes, pad_packed

TOL = 1e-9


# ----------------------------------------------------------------------------------------------
# References


def _pm1(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, bits))


def _brute_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Hamming distance from ±1 codes by the inner product: d = (L - <q, b>) / 2."""
    bits = q.shape[1]
    return (bits - q.astype(np.int64) @ db.astype(np.int64).T) // 2


def _relevance(q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    return (q_labels[:, None] == db_labels[None, :]) & (db_labels[None, :] != -1)


def _metrics_of_orders(rel_rows: np.ndarray, k: int, ns: list[int]) -> dict:
    """Metrics of each ranked relevance row ``(M, N)`` (bool), averaged over the M rows."""
    n_items = rel_rows.shape[1]
    hits = np.cumsum(rel_rows, axis=1)
    precision = hits / np.arange(1, n_items + 1)
    n_rel = int(rel_rows[0].sum())
    ap = (precision * rel_rows).sum(axis=1) / n_rel if n_rel else np.zeros(len(rel_rows))
    top = min(k, n_items)
    in_top = rel_rows[:, :top].sum(axis=1)
    ap_k_sum = (precision[:, :top] * rel_rows[:, :top]).sum(axis=1)
    ap_k = np.where(in_top > 0, ap_k_sum / np.maximum(in_top, 1), 0.0)
    out = {"ap": ap.mean(), "ap_k": ap_k.mean(), "n_rel": n_rel}
    out["prec"] = {n: (hits[:, n - 1] / n).mean() for n in ns if n <= n_items}
    out["hits"] = {n: hits[:, n - 1].mean() for n in ns if n <= n_items}
    return out


def _index_reference(dist: np.ndarray, rel: np.ndarray, k: int, ns: list[int]) -> list[dict]:
    results = []
    for q in range(dist.shape[0]):
        order = np.argsort(dist[q], kind="stable")
        results.append(_metrics_of_orders(rel[q][order][None, :], k, ns))
    return results


def _expected_reference(dist: np.ndarray, rel: np.ndarray, k: int, ns: list[int]) -> list[dict]:
    """Average over all orderings of all tie groups (each ordering equally likely)."""
    results = []
    for q in range(dist.shape[0]):
        groups = [np.flatnonzero(dist[q] == value) for value in np.unique(dist[q])]
        per_group = [list(itertools.permutations(group.tolist())) for group in groups]
        orders = np.array([list(itertools.chain.from_iterable(choice))
                           for choice in itertools.product(*per_group)])
        results.append(_metrics_of_orders(rel[q][orders], k, ns))
    return results


def _compare(result, reference: list[dict], ns: list[int], topk: int | None) -> None:
    ap_ref = np.array([r["ap"] for r in reference])
    np.testing.assert_allclose(result.ap, ap_ref, rtol=0, atol=TOL)
    assert result.map == pytest.approx(ap_ref.mean(), abs=TOL)
    assert result.n_queries_without_relevant == sum(r["n_rel"] == 0 for r in reference)
    if topk is not None:
        apk_ref = np.array([r["ap_k"] for r in reference])
        np.testing.assert_allclose(result.ap_at_k, apk_ref, rtol=0, atol=TOL)
        assert result.map_at_k == pytest.approx(apk_ref.mean(), abs=TOL)
    else:
        assert result.ap_at_k is None and result.map_at_k is None
    n_db = result.n_database
    assert sorted(result.precision_at) == sorted({n for n in ns if n <= n_db})
    for n in result.precision_at:
        assert result.precision_at[n] == pytest.approx(np.mean([r["prec"][n] for r in reference]), abs=TOL)
        with_rel = [r["hits"][n] / r["n_rel"] for r in reference if r["n_rel"] > 0]
        if with_rel:
            assert result.recall_at[n] == pytest.approx(np.mean(with_rel), abs=TOL)
        else:
            assert result.recall_at[n] is None


def _published_map(q: np.ndarray, db: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray,
                   topk: int | None = None) -> float:
    """CalcMap / CalcTopMap as in most published hashing code (with a stable sort)."""
    bits = q.shape[1]
    total = 0.0
    for i in range(q.shape[0]):
        gnd = (q_labels[i] == db_labels).astype(np.float64)
        hamm = 0.5 * (bits - db.astype(np.float64) @ q[i].astype(np.float64))
        ind = np.argsort(hamm, kind="stable")
        gnd = gnd[ind][:topk] if topk is not None else gnd[ind]
        tsum = int(gnd.sum())
        if tsum == 0:
            continue
        count = np.linspace(1, tsum, tsum)
        tindex = np.asarray(np.where(gnd == 1)).ravel() + 1.0
        total += float(np.mean(count / tindex))
    return total / q.shape[0]


# ----------------------------------------------------------------------------------------------
# Tie rules against brute force


@pytest.mark.parametrize("seed", range(12))
def test_expected_matches_enumeration_of_tie_orders(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(12):
        bits = int(rng.integers(2, 6))
        n_db = int(rng.integers(1, 9))
        n_q = int(rng.integers(1, 6))
        n_labels = int(rng.integers(2, 4))
        q = _pm1(rng, n_q, bits)
        db = _pm1(rng, n_db, bits)
        q_labels = rng.integers(0, n_labels + 1, n_q)  # label n_labels: sometimes no relevant item
        db_labels = rng.integers(-1, n_labels, n_db)
        topk = int(rng.integers(1, n_db + 3))
        ns = sorted({int(v) for v in rng.integers(1, n_db + 3, 3)})
        chunk = int(rng.integers(1, 5))
        result = evaluate_hamming(q, db, q_labels, db_labels, ties="expected", topk=topk,
                                  precision_ns=ns, chunk_size=chunk)
        dist = _brute_distances(q, db)
        reference = _expected_reference(dist, _relevance(q_labels, db_labels), topk, ns)
        _compare(result, reference, ns, topk)


@pytest.mark.parametrize("bits", [3, 5, 7, 48, 64, 100, 130])
def test_index_matches_stable_argsort(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for trial in range(6):
        n_db = int(rng.integers(1, 120))
        n_q = int(rng.integers(1, 15))
        q = _pm1(rng, n_q, bits)
        db = _pm1(rng, n_db, bits)
        if trial % 2:
            # Near-duplicates of the queries make small distances and ties common at any length.
            db[: min(n_db, n_q)] = q[: min(n_db, n_q)]
        q_labels = rng.integers(0, 4, n_q)
        db_labels = rng.integers(-1, 3, n_db)
        topk = [None, 1, 5, n_db, n_db + 10][trial % 5]
        ns = [1, 3, 10, 50, 200]
        result = evaluate_hamming(q, db, q_labels, db_labels, ties="index", topk=topk,
                                  precision_ns=ns, chunk_size=int(rng.integers(1, 40)))
        reference = _index_reference(_brute_distances(q, db), _relevance(q_labels, db_labels),
                                     topk or n_db, ns)
        _compare(result, reference, ns, topk)


def test_index_on_tiny_cases_with_streaming() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        bits = int(rng.integers(1, 5))
        n_db, n_q = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        q, db = _pm1(rng, n_q, bits), _pm1(rng, n_db, bits)
        q_labels, db_labels = rng.integers(0, 3, n_q), rng.integers(-1, 2, n_db)
        topk = int(rng.integers(1, n_db + 3))
        ns = [1, 2, 4, 8, 16]
        result = evaluate_hamming(q, db, q_labels, db_labels, ties="index", topk=topk,
                                  precision_ns=ns, chunk_size=3)
        reference = _index_reference(_brute_distances(q, db), _relevance(q_labels, db_labels), topk, ns)
        _compare(result, reference, ns, topk)


def test_expected_hand_example() -> None:
    # Two items at distance 0, one relevant: AP = 1/2 * 1 + 1/2 * 1/2 = 3/4.
    q = np.array([[1, 1]])
    db = np.array([[1, 1], [1, 1], [-1, -1]])
    result = evaluate_hamming(q, db, [0], [0, 1, 0], ties="expected", topk=1, precision_ns=[1, 2, 3])
    # The relevant item at distance 2 comes third: AP = (3/4 + 2/3) / 2.
    assert result.ap[0] == pytest.approx((0.75 + 2 / 3) / 2, abs=1e-15)
    # Top 1: the relevant one is first with prob 1/2 (AP@1 = 1), else nothing relevant (0).
    assert result.ap_at_k[0] == pytest.approx(0.5, abs=1e-15)
    assert result.precision_at == pytest.approx({1: 0.5, 2: 0.5, 3: 2 / 3})
    index = evaluate_hamming(q, db, [0], [0, 1, 0], ties="index", topk=1)
    assert index.ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert index.ap_at_k[0] == 1.0


def test_query_without_relevant_items_and_unknown_labels() -> None:
    rng = np.random.default_rng(3)
    q, db = _pm1(rng, 4, 8), _pm1(rng, 30, 8)
    q_labels = np.array([0, 5, -1, 1])  # 5: absent from the database; -1 never matches db -1
    db_labels = rng.integers(-1, 2, 30)
    db_labels[:3] = -1
    for ties in ("expected", "index"):
        result = evaluate_hamming(q, db, q_labels, db_labels, ties=ties, topk=10)
        assert result.n_queries_without_relevant == 2
        assert result.ap[1] == result.ap[2] == 0.0
        assert result.ap_at_k[1] == result.ap_at_k[2] == 0.0
        assert result.map == pytest.approx(result.ap.mean())


def test_no_relevant_at_all_gives_zero_and_none() -> None:
    q, db = np.ones((2, 4)), -np.ones((5, 4))
    result = evaluate_hamming(q, db, [1, 1], [-1, 0, 0, 2, -1], precision_ns=[1, 5, 6])
    assert result.map == 0.0 and result.n_queries_without_relevant == 2
    assert result.precision_at == {1: 0.0, 5: 0.0}  # 6 > database size: left out
    assert result.recall_at == {1: None, 5: None}
    assert result.pr_radius["recall"] == [None] * 5
    json.dumps(result.to_dict(), allow_nan=False)


def test_ties_do_not_matter_for_unique_distances_and_defaults() -> None:
    # With 3-bit codes and one item per distance there are no ties: both rules agree exactly.
    q = np.array([[1, 1, 1]])
    db = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [1, 1, 1]])
    labels = [1, 0, 1, 1]
    a = evaluate_hamming(q, db, [1], labels, ties="expected", topk=2, precision_ns=[1, 2, 3, 4])
    b = evaluate_hamming(q, db, [1], labels, ties="index", topk=2, precision_ns=[1, 2, 3, 4])
    assert a.map == pytest.approx(b.map, abs=1e-15) == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert a.map_at_k == b.map_at_k == 1.0
    assert a.precision_at == pytest.approx(b.precision_at)
    default = evaluate_hamming(q, db, [1], labels)
    assert default.ties == "expected" and default.topk is None and default.precision_at == {}


# ----------------------------------------------------------------------------------------------
# Radius metrics


def test_radius_metrics_against_brute_force() -> None:
    rng = np.random.default_rng(11)
    q, db = _pm1(rng, 9, 6), _pm1(rng, 40, 6)
    q_labels, db_labels = rng.integers(0, 3, 9), rng.integers(-1, 3, 40)
    dist = _brute_distances(q, db)
    rel = _relevance(q_labels, db_labels)
    results = [evaluate_hamming(q, db, q_labels, db_labels, ties=t, chunk_size=7) for t in ("expected", "index")]
    for result in results:
        for radius in range(7):
            within = dist <= radius
            retrieved = within.sum()
            expected_p = (within & rel).sum() / retrieved if retrieved else None
            assert result.pr_radius["radius"][radius] == radius
            assert result.pr_radius["precision"][radius] == pytest.approx(expected_p, abs=TOL)
            assert result.pr_radius["recall"][radius] == pytest.approx((within & rel).sum() / rel.sum())
        within2 = dist <= 2
        per_query = [((within2[i] & rel[i]).sum() / within2[i].sum()) if within2[i].any() else 0.0
                     for i in range(9)]
        assert result.p_at_r2 == pytest.approx(np.mean(per_query), abs=TOL)
    assert results[0].p_at_r2 == results[1].p_at_r2
    assert results[0].pr_radius == results[1].pr_radius


# ----------------------------------------------------------------------------------------------
# Numerical accuracy at scale


@pytest.mark.parametrize(("a", "n"), [(0, 1), (0, 64), (0, 65), (3, 1000), (10, 10**6), (10**6, 1),
                                      (10**6, 2), (10**6, 65), (999_000, 1000), (0, 10**6), (63, 70)])
def test_harmonic_difference_matches_fsum(a: int, n: int) -> None:
    exact = math.fsum(1.0 / i for i in range(a + 1, a + n + 1))
    assert hamming.harmonic_difference(a, n) == pytest.approx(exact, rel=1e-14, abs=0)


@pytest.mark.parametrize(("n_before", "rel_before", "n", "r"),
                         [(0, 0, 1, 1), (10**6, 5000, 2, 1), (10**6, 12, 3, 3), (999_000, 10_000, 1000, 17),
                          (500_000, 0, 500_000, 5000), (10, 2, 200, 200), (123_456, 789, 70, 2)])
def test_expected_group_sum_is_accurate_at_large_n(n_before: int, rel_before: int, n: int, r: int) -> None:
    # Direct sum of the per-position expectations, exactly rounded.
    terms = (r / n * (rel_before + 1 + ((i - 1) * (r - 1) / (n - 1) if n > 1 else 0.0)) / (n_before + i)
             for i in range(1, n + 1))
    exact = math.fsum(terms)
    assert hamming.expected_group_sum(n_before, rel_before, n, r) == pytest.approx(exact, rel=1e-11)


def test_expected_at_a_million_items_is_accurate() -> None:
    # 2-bit codes, ~1e6 items in 3 tie groups: expected AP from direct exactly rounded sums.
    rng = np.random.default_rng(5)
    n_db = 1_000_000
    db = pack_codes(rng.integers(0, 2, (n_db, 2)).astype(np.int8))
    db_labels = rng.integers(0, 10, n_db)
    q = pack_codes(np.array([[1, 1], [0, 1]], dtype=np.int8))
    q_labels = np.array([3, 7])
    result = evaluate_hamming(q, db, q_labels, db_labels, bits=2, ties="expected", topk=300_000,
                              precision_ns=[250_000])
    dist = hamming.hamming_distances(q, db, 2)
    for i in range(2):
        n_before = rel_before = 0
        parts = []
        for d in range(3):
            n = int(np.count_nonzero(dist[i] == d))
            r = int(np.count_nonzero((dist[i] == d) & (db_labels == q_labels[i])))
            idx = np.arange(1, n + 1, dtype=np.float64)
            pair = 0.0 if n == 1 else (r - 1) / (n - 1)
            parts.append(r / n * (rel_before + 1 + (idx - 1) * pair) / (n_before + idx))
            n_before, rel_before = n_before + n, rel_before + r
        exact = math.fsum(np.concatenate(parts)) / rel_before
        assert result.ap[i] == pytest.approx(exact, rel=1e-10)
    assert 0.0 < result.map_at_k < 1.0


# ----------------------------------------------------------------------------------------------
# Input forms, published implementation, kernels


def test_input_forms_give_identical_results() -> None:
    rng = np.random.default_rng(2)
    bits = 100
    q, db = _pm1(rng, 7, bits), _pm1(rng, 50, bits)
    db[:5] = q[:5]
    q_labels, db_labels = rng.integers(0, 3, 7), rng.integers(-1, 3, 50)
    forms = [
        (q, db, None),
        ((q > 0).astype(np.int64), (db > 0).astype(np.float32), None),
        (q > 0, db > 0, None),
        (pack_codes(q), pack_codes(db), bits),
        (pad_packed(pack_codes(q), bits), pack_codes(db), bits),  # padded to 64-bit rows
        (q.astype(np.float64), pack_codes(db), bits),  # mixed: codes + packed
    ]
    for ties in ("expected", "index"):
        results = [evaluate_hamming(a, b, q_labels, db_labels, bits=nb, ties=ties, topk=9,
                                    precision_ns=[5, 20]).to_dict() for a, b, nb in forms]
        for other in results[1:]:
            assert other == results[0]


def test_index_map_equals_published_style_implementation() -> None:
    rng = np.random.default_rng(21)
    q, db = _pm1(rng, 60, 16), _pm1(rng, 1500, 16)
    q_labels, db_labels = rng.integers(0, 10, 60), rng.integers(0, 10, 1500)
    q_labels[0] = 99  # a query with no relevant item counts as AP 0 in both
    ours = evaluate_hamming(q, db, q_labels, db_labels, ties="index", topk=100, chunk_size=256)
    assert ours.map == pytest.approx(_published_map(q, db, q_labels, db_labels), abs=1e-12)
    assert ours.map_at_k == pytest.approx(_published_map(q, db, q_labels, db_labels, topk=100), abs=1e-12)
    assert mean_average_precision(q, db, q_labels, db_labels, ties="index") == ours.map
    assert mean_average_precision(q, db, q_labels, db_labels, ties="index", topk=100) == ours.map_at_k


@pytest.mark.parametrize("bits", [7, 8, 48, 64, 100, 130])
def test_hamming_kernel_matches_faiss_and_brute_force(bits: int) -> None:
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(bits)
    q, db = _pm1(rng, 13, bits), _pm1(rng, 41, bits)
    q_packed, db_packed = pack_codes(q), pack_codes(db)
    dist = hamming.hamming_distances(q_packed, db_packed, bits)
    assert dist.dtype == np.int32 and dist.shape == (13, 41)
    np.testing.assert_array_equal(dist, _brute_distances(q, db))
    index = faiss.IndexBinaryFlat(8 * q_packed.shape[1])  # faiss wants whole bytes; pad bits are 0
    index.add(db_packed)
    distances, ids = index.search(q_packed, 41)
    np.testing.assert_array_equal(np.take_along_axis(dist, ids, axis=1), distances)


def test_progress_reports_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    q, db, q_labels, db_labels = _pm1(rng, 3, 8), _pm1(rng, 10, 8), [0, 1, 0], rng.integers(0, 2, 10)

    def calls_of(ties: str) -> list[tuple[int, int, str]]:
        calls: list[tuple[int, int, str]] = []
        evaluate_hamming(q, db, q_labels, db_labels, ties=ties, chunk_size=4,
                         progress=lambda done, total, stage: calls.append((done, total, stage)))
        return calls

    assert calls_of("expected") == [(4, 10, "distances"), (8, 10, "distances"), (10, 10, "distances")]
    assert calls_of("index") == [(4, 10, "ranks"), (8, 10, "ranks"), (10, 10, "ranks")]  # one walk
    monkeypatch.setattr(metrics_module, "_INDEX_RECORD_BUDGET", 2)  # too small for any query: two passes
    assert calls_of("index") == [(4, 10, "distances"), (8, 10, "distances"), (10, 10, "distances"),
                                 (4, 10, "ranks"), (8, 10, "ranks"), (10, 10, "ranks")]


def test_to_dict_is_json_safe() -> None:
    rng = np.random.default_rng(1)
    result = evaluate_hamming(_pm1(rng, 5, 8), _pm1(rng, 300, 8), rng.integers(0, 3, 5),
                              rng.integers(0, 3, 300), topk=50)
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert summary["ties"] == "expected" and summary["topk"] == 50 and summary["bits"] == 8
    assert set(summary["precision_at"]) == {"100", "200", "300"}
    assert "relevant items retrieved" in summary["map_at_k_normalisation"]
    assert len(summary["pr_radius"]["precision"]) == 9
    assert "ap" not in summary and "ap_at_k" not in summary


# ----------------------------------------------------------------------------------------------
# Errors


def test_mismatched_code_lengths_name_both() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(CodeError, match=r"32 bits.*48 bits"):
        evaluate_hamming(_pm1(rng, 2, 32), _pm1(rng, 3, 48), [0, 1], [0, 1, 0])
    with pytest.raises(CodeError, match="4 bytes wide, database codes 6 bytes"):
        evaluate_hamming(pack_codes(_pm1(rng, 2, 32)), pack_codes(_pm1(rng, 3, 48)), [0, 1], [0, 1, 0], bits=32)
    with pytest.raises(CodeError, match="bits=16"):
        evaluate_hamming(_pm1(rng, 2, 32), pack_codes(_pm1(rng, 3, 16)), [0, 1], [0, 1, 0], bits=16)


def test_label_errors() -> None:
    rng = np.random.default_rng(0)
    q, db = _pm1(rng, 2, 8), _pm1(rng, 3, 8)
    with pytest.raises(DataError, match="2 labels for 3 codes"):
        evaluate_hamming(q, db, [0, 1], [0, 1])
    with pytest.raises(DataError, match="1-D"):
        evaluate_hamming(q, db, np.zeros((2, 2), dtype=int), [0, 1, 0])
    with pytest.raises(DataError, match="integers"):
        evaluate_hamming(q, db, [0.5, 1.0], [0, 1, 0])
    with pytest.raises(DataError, match="integers"):
        evaluate_hamming(q, db, ["a", "b"], [0, 1, 0])
    # Column vectors and integral floats are fine.
    a = evaluate_hamming(q, db, np.array([[0], [1]]), np.array([0.0, 1.0, 0.0]))
    b = evaluate_hamming(q, db, [0, 1], [0, 1, 0])
    assert a.map == b.map


def test_option_and_code_errors() -> None:
    rng = np.random.default_rng(0)
    q, db = _pm1(rng, 2, 8), _pm1(rng, 3, 8)
    labels = ([0, 1], [0, 1, 0])
    with pytest.raises(ConfigError, match="ties"):
        evaluate_hamming(q, db, *labels, ties="random")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="topk"):
            evaluate_hamming(q, db, *labels, topk=bad)
    with pytest.raises(ConfigError, match="chunk_size"):
        evaluate_hamming(q, db, *labels, chunk_size=0)
    with pytest.raises(ConfigError, match="precision_ns"):
        evaluate_hamming(q, db, *labels, precision_ns=[10, 0])
    nan_codes = q.astype(float)
    nan_codes[0, 0] = np.nan
    with pytest.raises(CodeError, match=r"query codes.*NaN"):
        evaluate_hamming(nan_codes, db, *labels)
    with pytest.raises(CodeError, match="database codes"):
        evaluate_hamming(q, db * 2, *labels)
    with pytest.raises(CodeError, match="2-D"):
        evaluate_hamming(q[0], db, [0], labels[1])
    with pytest.raises(DataError, match="empty"):
        evaluate_hamming(q, db[:0], labels[0], [])
    with pytest.raises(CodeError, match="positive integer"):
        evaluate_hamming(pack_codes(q), pack_codes(db), *labels, bits=0)


# ----------------------------------------------------------------------------------------------
# Dense retrieval metrics


def _dense_reference(query: np.ndarray, gallery: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray,
                     ks: tuple[int, ...]) -> dict:
    sims = query @ gallery.T
    cmc = np.zeros(len(ks))
    aps, inps, missing = [], [], 0
    for i in range(len(query)):
        order = np.argsort(-sims[i], kind="stable")
        good = np.flatnonzero(g_ids[order] == q_ids[i]) + 1  # 1-based ranks of the matches
        if good.size == 0:
            missing += 1
            aps.append(0.0)
            inps.append(0.0)
            continue
        cmc += np.array([good[0] <= k for k in ks], dtype=float)
        aps.append(np.mean(np.arange(1, good.size + 1) / good))
        inps.append(good.size / good[-1])
    out = {f"rank{k}": cmc[j] / len(query) for j, k in enumerate(ks)}
    out.update(map=np.mean(aps), minp=np.mean(inps), n_queries_without_relevant=missing)
    return out


def test_dense_metrics_match_argsort_reference() -> None:
    rng = np.random.default_rng(4)
    # Small integer embeddings: many exactly tied similarities, so the stable tie rule matters.
    query = rng.integers(-2, 3, (23, 4)).astype(np.float32)
    gallery = rng.integers(-2, 3, (57, 4)).astype(np.float32)
    q_ids = rng.integers(0, 8, 23)
    g_ids = rng.integers(0, 7, 57)  # id 7 never in the gallery: queries without matches
    ks = (1, 3, 5, 100)
    ours = dense_retrieval_metrics(query, gallery, q_ids, g_ids, ks=ks, chunk_size=5)
    reference = _dense_reference(query, gallery, q_ids, g_ids, ks)
    assert reference["n_queries_without_relevant"] > 0
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["n_queries"] == 23 and ours["n_gallery"] == 57


def test_dense_hand_example_for_minp() -> None:
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Similarities for query 0: [0.9, 0.8, 0.7, 0.1] -> matches (id 0) at ranks 2 and 4.
    gallery = np.array([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.1, 0.0]])
    g_ids = np.array([1, 0, 1, 0])
    result = dense_retrieval_metrics(query, gallery, [0, 5], g_ids, ks=(1, 2, 5))
    # Query 0: AP = (1/2 + 2/4) / 2 = 1/2, INP = 2 / 4; query 1 (id 5) has no match: 0, counted.
    assert result["map"] == pytest.approx(0.25)
    assert result["minp"] == pytest.approx(0.25)
    assert result["rank1"] == 0.0 and result["rank2"] == 0.5 and result["rank5"] == 0.5
    assert result["n_queries_without_relevant"] == 1
    assert set(result) == {"rank1", "rank2", "rank5", "map", "minp", "n_queries", "n_gallery",
                           "n_queries_without_relevant"}


def test_dense_errors() -> None:
    good = np.ones((2, 3))
    with pytest.raises(DataError, match="dims"):
        dense_retrieval_metrics(good, np.ones((4, 2)), [0, 1], [0, 1, 2, 3])
    with pytest.raises(DataError, match="NaN"):
        dense_retrieval_metrics(np.full((2, 3), np.nan), good, [0, 1], [0, 1])
    with pytest.raises(DataError, match="labels for"):
        dense_retrieval_metrics(good, good, [0, 1, 2], [0, 1])
    with pytest.raises(ConfigError, match="ks"):
        dense_retrieval_metrics(good, good, [0, 1], [0, 1], ks=(0,))


def test_dense_metrics_do_not_depend_on_the_memory_capped_chunking(monkeypatch):
    from crossret.retrieval import metrics as metrics_module

    rng = np.random.default_rng(5)
    query, gallery = rng.normal(size=(23, 4)), rng.normal(size=(40, 4))
    q_ids, g_ids = rng.integers(0, 6, 23), rng.integers(0, 6, 40)
    full = dense_retrieval_metrics(query, gallery, q_ids, g_ids)
    monkeypatch.setattr(metrics_module, "_DENSE_CHUNK_ENTRIES", 100)  # forces 2 queries per chunk
    assert dense_retrieval_metrics(query, gallery, q_ids, g_ids) == full


def test_index_rank_pass_counts_any_order_of_cut_offs() -> None:
    """``rel_at_n[q, t]`` counts relevant items with rank <= ns[t] whatever the order of ``ns``."""
    from crossret.retrieval import hamming
    from crossret.retrieval.packing import pack_codes, packed_to_words

    rng = np.random.default_rng(11)
    q, db = _pm1(rng, 6, 16), _pm1(rng, 90, 16)
    q_labels, db_labels = rng.integers(0, 3, 6).astype(np.int32), rng.integers(0, 3, 90).astype(np.int32)
    qw, dbw = packed_to_words(pack_codes(q), 16), packed_to_words(pack_codes(db), 16)
    hist = np.zeros((6, 2 * 17), dtype=np.int64)
    hamming.distance_histograms(qw, q_labels, dbw, db_labels, hist)
    rel = np.ascontiguousarray(hist[:, 17:])
    counts = hist[:, :17] + rel  # the kernel keeps non-relevant and relevant counts apart
    before = np.cumsum(counts, axis=1) - counts
    before_rel = np.cumsum(rel, axis=1) - rel

    def rel_at(ns: list[int]) -> np.ndarray:
        out = np.zeros((6, len(ns)), dtype=np.int64)
        hamming.index_rank_pass(qw, q_labels, dbw, db_labels, before, before_rel, np.zeros_like(counts),
                                np.zeros_like(counts), 0, np.array(ns, dtype=np.int64), np.zeros(6), np.zeros(6),
                                np.zeros(6, dtype=np.int64), out)
        return out

    ns = [50, 3, 90, 10, 1]
    relevant = _relevance(q_labels, db_labels)
    ranks = np.argsort(np.argsort(_brute_distances(q, db), axis=1, kind="stable"), axis=1) + 1
    expected = np.array([[int(((ranks[i] <= n) & relevant[i]).sum()) for n in ns] for i in range(6)])
    np.testing.assert_array_equal(rel_at(ns), expected)
    np.testing.assert_array_equal(rel_at(sorted(ns)), expected[:, np.argsort(ns, kind="stable")])
