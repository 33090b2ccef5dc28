"""The query-blocked Hamming kernels at sizes that exercise their blocking.

The other metric and index tests use databases of at most a few hundred items. These use enough
items for several database tiles, query blocks, candidate-buffer cuts, the guessed starting bound
(and its fallback) and the database-chunk split of few queries, on tie-heavy codes, and compare
every output exactly with a brute force computed another way (``np.bitwise_count`` + a stable
argsort or ``np.bincount``).
"""

from __future__ import annotations

import numpy as np
import pytest

from crossret.errors import DataError
from crossret.retrieval import hamming
from crossret.retrieval.metrics import evaluate_hamming

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")
_SIZE_RULE = hamming.uses_threshold_scan  # before the fixture below replaces it


def _words(rng: np.random.Generator, n: int, n_words: int, pool: int | None = None) -> np.ndarray:
    """Random uint64 codes; with ``pool``, drawn from ``pool`` distinct codes (many exact ties)."""
    if pool is None:
        return rng.integers(0, 2**63, (n, n_words), dtype=np.int64).view(np.uint64) * np.uint64(2) + \
            rng.integers(0, 2, (n, n_words)).astype(np.uint64)
    base = _words(rng, pool, n_words)
    return np.ascontiguousarray(base[rng.integers(0, pool, n)])


def _distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    out = np.zeros((q.shape[0], db.shape[0]), np.int64)
    for w in range(q.shape[1]):
        out += np.bitwise_count(q[:, w][:, None] ^ db[:, w][None, :])
    return out


def _topk_reference(q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = _distances(q, db)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    kept = order.shape[1]
    out_d = np.full((q.shape[0], k), np.iinfo(np.int32).max, np.int32)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    out_d[:, :kept] = np.take_along_axis(dist, order, axis=1)
    out_i[:, :kept] = order
    return out_d, out_i


@pytest.fixture(params=["threshold-scan", "counting"], autouse=True)
def topk_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every search test through both top-k kernels (the size rule would pick one per case)."""
    monkeypatch.setattr(hamming, "uses_threshold_scan", lambda *args: request.param == "threshold-scan")
    return request.param


def test_the_size_rule_takes_the_scan_only_for_a_small_share_of_the_database() -> None:
    rule, share, smallest = _SIZE_RULE, hamming._SCAN_MAX_SHARE, hamming._SCAN_MIN_DATABASE
    assert share * 1000 >= smallest
    few = hamming._QUERY_BLOCK  # enough to share a multi-word tile copy, fewer than "many"
    assert few < hamming._SCAN_MANY_QUERIES
    for n_words in (1, 2, 4):  # the same share at every code length
        assert rule(few, share * 1000, n_words, 1000) and not rule(few, share * 1000 - 1, n_words, 1000)
    assert not rule(1000, smallest - 1, 1, 1) and rule(1000, smallest, 1, 1)
    assert not rule(1, share * 1000, 2, 10)  # multi-word codes need queries to share the tile copy
    assert rule(hamming._QUERY_BLOCK, share * 1000, 4, 10)
    # Many queries take the scan up to a larger share; fewer than that many keep the small share.
    many, wide = hamming._SCAN_MANY_QUERIES, hamming._SCAN_MAX_SHARE_MANY
    assert wide < share
    for n_words in (1, 4):
        assert rule(many, wide * 1000, n_words, 1000) and not rule(many, wide * 1000 - 1, n_words, 1000)
        assert not rule(many - 1, wide * 1000, n_words, 1000)


def _assert_topk(q: np.ndarray, db: np.ndarray, k: int, **kwargs: object) -> None:
    got_d, got_i = hamming.hamming_topk(q, db, k, **kwargs)
    ref_d, ref_i = _topk_reference(q, db, k)
    np.testing.assert_array_equal(got_d, ref_d)
    np.testing.assert_array_equal(got_i, ref_i)


@pytest.mark.parametrize("n_words", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 10, 1000])
def test_topk_on_tie_heavy_codes_matches_a_stable_sort(n_words: int, k: int) -> None:
    rng = np.random.default_rng(10 * n_words + k)
    db = _words(rng, 20_000, n_words, pool=12)  # tiles of the database and ties at every distance
    q = np.concatenate([_words(rng, 20, n_words, pool=12), _words(rng, 17, n_words)])  # 3 query blocks
    _assert_topk(q, db, k)
    _assert_topk(q, db, k, threads=1)


@pytest.mark.parametrize("n_words", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 10, 600])
def test_topk_over_several_query_blocks_matches_a_stable_sort(n_words: int, k: int) -> None:
    # Two full query blocks of the scan and a partial one; codes drawn from a pool (hits come in
    # runs, so the scan switches between its counting-only and its storing passes) and fresh codes.
    rng = np.random.default_rng(100 * n_words + k)
    block = hamming.search_query_block(n_words, k)
    db = _words(rng, 70_000, n_words, pool=40)
    db[rng.random(70_000) < 0.5] = _words(rng, 1, n_words)[0] ^ np.uint64(1)  # long runs of one code
    q = np.concatenate([_words(rng, block, n_words, pool=40), _words(rng, block + 7, n_words)])
    _assert_topk(q, db, k)


def test_the_search_query_block_shrinks_as_candidate_buffers_grow() -> None:
    assert hamming.search_query_block(1, 10) == hamming._SEARCH_BLOCK_MAX
    assert hamming.search_query_block(4, 100_000) == hamming._QUERY_BLOCK
    sizes = [hamming.search_query_block(1, k) for k in (1, 100, 300, 1000, 10_000, 100_000)]
    assert sizes == sorted(sizes, reverse=True)
    for k in (1, 100, 300, 1000, 10_000):  # within the buffer budget unless at the smallest block
        block = hamming.search_query_block(1, k)
        assert block == hamming._QUERY_BLOCK or block * hamming.candidate_capacity(k) * 16 <= hamming._CANDIDATE_BYTES


def test_topk_with_k_beyond_the_database_pads_after_every_item() -> None:
    rng = np.random.default_rng(3)
    db = _words(rng, 17_000, 1, pool=5)
    q = _words(rng, 18, 1)
    _assert_topk(q, db, 20_000)


def test_topk_cuts_its_candidate_buffer_many_times_exactly() -> None:
    # Distances that fall along the database: every item beats the bound of the one before, so the
    # buffer fills and is cut back over and over.
    rng = np.random.default_rng(4)
    n = 30_000
    ones = np.minimum(np.arange(n)[::-1] // 500, 63)
    db = np.array([(1 << int(c)) - 1 for c in ones], dtype=np.uint64).reshape(-1, 1)
    q = np.zeros((18, 1), np.uint64)
    q[1::2] = _words(rng, 9, 1)
    for k in (1, 300, 2_000):
        _assert_topk(q, db, k)


@pytest.mark.parametrize("many_queries", [True, False])
def test_topk_recovers_when_the_guessed_bound_is_too_tight(many_queries: bool) -> None:
    # The sampled items (strided for a block of many queries, the first ones for a few) are copies of
    # query 0, so its guess keeps only distance 0; fewer than k items are that close, and it is redone.
    rng = np.random.default_rng(5)
    q = _words(rng, 18 if many_queries else 1, 1)
    db = _words(rng, 40_000, 1)
    size, stride = hamming.bound_sample(len(db), 1, many_queries, k=6_000)
    assert size >= hamming._SAMPLE_MIN and (stride > 1) == many_queries
    db[:size * stride:stride] = q[0]
    for k in (size + 1, 6_000):
        assert hamming.bound_sample(len(db), 1, many_queries, k=k) == (size, stride)
        _assert_topk(q, db, k)
        _assert_topk(q[:1], db, k, threads=1)


def test_the_starting_bound_sample_count_keeps_the_risk_of_a_rescan_small() -> None:
    from scipy.stats import poisson

    for lam in (0.001, 0.16, 1.0, 7.5, 16.4, 65.0, 99.0, 250.0, 4000.0):
        goal = hamming._sample_goal(lam)
        assert poisson.sf(goal - 1, lam) <= hamming._BOUND_RISK  # P(X >= goal)
        if lam <= 100:  # and the smallest such count, where the tail is summed exactly
            assert poisson.sf(goal - 2, lam) > hamming._BOUND_RISK


def test_few_queries_split_across_chunks_merge_in_position_order() -> None:
    rng = np.random.default_rng(6)
    n = 2 * hamming._TOPK_MIN_CHUNK + 1_001  # enough for two chunks per query
    db = _words(rng, n, 2, pool=9)
    q = _words(rng, 1, 2, pool=9)
    for k in (1, 10, 5_000):
        _assert_topk(q, db, k)  # split across chunks when numba has two or more threads
        _assert_topk(q, db, k, threads=1)  # one task per query block


# ----------------------------------------------------------------------------------------------
# Metric kernels


def _histogram_reference(q: np.ndarray, q_labels: np.ndarray, db: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    n_dist = 64 * q.shape[1] + 1
    dist = _distances(q, db)
    slot = dist + n_dist * (q_labels[:, None] == db_labels[None, :])
    return np.stack([np.bincount(row, minlength=2 * n_dist) for row in slot])


@pytest.mark.parametrize("n_words", [1, 2, 3])
def test_distance_histograms_match_bincount_over_chunks(n_words: int) -> None:
    rng = np.random.default_rng(n_words)
    n = 3 * hamming._EVAL_TILE + 123
    n_q = hamming._EVAL_BLOCK + 35  # a full query block and a partial one
    db = _words(rng, n, n_words, pool=20)
    q = _words(rng, n_q, n_words, pool=20)
    db_labels = rng.integers(0, 3, n).astype(np.int32)
    q_labels = rng.integers(0, 3, n_q).astype(np.int32)
    hist = np.zeros((n_q, 2 * (64 * n_words + 1)), np.int64)
    for start in range(0, n, 5_000):  # chunks that cut through tiles
        hamming.distance_histograms(q, q_labels, db[start:start + 5_000], db_labels[start:start + 5_000], hist)
    np.testing.assert_array_equal(hist, _histogram_reference(q, q_labels, db, db_labels))


def _index_ap_reference(q: np.ndarray, q_labels: np.ndarray, db: np.ndarray, db_labels: np.ndarray, topk: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """AP and AP@k with ties broken by database position: stable argsort, then cumulative sums."""
    dist = _distances(q, db)
    ap, ap_k = np.zeros(len(q)), np.zeros(len(q))
    for i in range(len(q)):
        rel = (db_labels == q_labels[i])[np.argsort(dist[i], kind="stable")]
        precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        if rel.any():
            ap[i] = precision[rel].mean()
        if rel[:topk].any():
            ap_k[i] = precision[:topk][rel[:topk]].mean()
    return ap, ap_k


@pytest.mark.parametrize("n_words", [1, 2])
@pytest.mark.parametrize("classes", [1, 2, 500])
def test_index_rule_matches_a_stable_sort_at_several_tiles(classes: int, n_words: int) -> None:
    # 1 class: every item is relevant; 500: almost none is. Enough queries for two query blocks.
    rng = np.random.default_rng(classes + n_words)
    n, bits, n_q = 2 * hamming._EVAL_TILE + 777, 64 * n_words, hamming._EVAL_BLOCK + 9
    db = _words(rng, n, n_words, pool=15)
    q = _words(rng, n_q, n_words, pool=15)
    db_labels = rng.integers(0, classes, n)
    q_labels = rng.integers(0, classes, n_q)
    to_pm1 = np.unpackbits(q.view(np.uint8), axis=1, bitorder="little").astype(np.int8) * 2 - 1
    db_pm1 = np.unpackbits(db.view(np.uint8), axis=1, bitorder="little").astype(np.int8) * 2 - 1
    result = evaluate_hamming(to_pm1, db_pm1, q_labels, db_labels, bits=bits, ties="index", topk=100,
                              chunk_size=3_001)
    ap, ap_k = _index_ap_reference(q, q_labels, db, db_labels, 100)
    np.testing.assert_allclose(result.ap, ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.ap_at_k, ap_k, rtol=0, atol=1e-12)


@pytest.mark.parametrize("budget", [None, 700, 10**9])
def test_one_pass_index_rule_equals_the_two_pass_route(budget: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    # budget None: too small for any query, so every query takes the two-pass route; 700: several
    # query blocks of the one-pass walk; 10**9: one block. Every value must be identical.
    from crossret.retrieval import metrics

    rng = np.random.default_rng(9)
    n = 9_000
    db = np.unpackbits(_words(rng, n, 1, pool=30).view(np.uint8), axis=1).astype(np.int8) * 2 - 1
    q = np.unpackbits(_words(rng, 40, 1, pool=30).view(np.uint8), axis=1).astype(np.int8) * 2 - 1
    db_labels, q_labels = rng.integers(-1, 40, n), rng.integers(0, 40, 40)

    def evaluate() -> object:
        return evaluate_hamming(q, db, q_labels, db_labels, ties="index", topk=50, precision_ns=[1, 10, 500],
                                chunk_size=2_500)

    monkeypatch.setattr(metrics, "_INDEX_RECORD_BUDGET", 1)
    reference = evaluate()
    if budget is not None:
        monkeypatch.setattr(metrics, "_INDEX_RECORD_BUDGET", budget)
    result = evaluate()
    np.testing.assert_array_equal(result.ap, reference.ap)
    np.testing.assert_array_equal(result.ap_at_k, reference.ap_at_k)
    assert result.precision_at == reference.precision_at and result.recall_at == reference.recall_at
    assert result.pr_radius == reference.pr_radius and result.p_at_r2 == reference.p_at_r2


def test_scoring_refuses_a_recorded_distance_out_of_range_and_ignores_unused_slots() -> None:
    # Slots past a query's records may hold anything (the buffers are reused uninitialised); a
    # distance inside the records outside 0..L is refused, never used as an index.
    seen = np.zeros((2, 65), np.int64)
    seen[:, 3] = 4
    offsets = np.array([0, 3], np.int64)
    n_rec = np.array([2, 1], np.int64)
    rec_d = np.array([3, 3, -7, 3, 10**9, 10**9], np.int64)  # slot 2 and slots 4-5 are unused garbage
    rec_s = np.array([0, 2, 5, 1, 0, 0], np.int64)
    rel, ap_sum, _, _, _ = hamming.index_records_score(seen, offsets, n_rec, rec_d, rec_s, 10, np.array([1, 4]))
    assert rel[:, 3].tolist() == [2, 1]
    # Query 0: relevant at ranks 1 and 3 of the 4 items at d = 3 -> precisions 1/1 and 2/3.
    np.testing.assert_allclose(ap_sum, [1 + 2 / 3, 1 / 2])
    for bad in (-1, 65):
        broken = rec_d.copy()
        broken[1] = bad
        with pytest.raises(DataError, match="outside the record arrays"):
            hamming.index_records_score(seen, offsets, n_rec, broken, rec_s, 10, np.array([1, 4]))


def test_index_rule_switching_between_sparse_and_dense_tiles_matches_a_stable_sort() -> None:
    # Relevant items rare in some tiles (counted by the histogram lanes) and dense in others (walked),
    # alternating within one chunk and across chunks, so the lanes are folded in mid-walk.
    rng = np.random.default_rng(11)
    tile = hamming._EVAL_TILE
    n = 5 * tile + 333
    db = _words(rng, n, 1, pool=25)
    q = _words(rng, 70, 1, pool=25)
    q_labels = rng.integers(0, 2, 70)
    db_labels = rng.integers(2, 1000, n)  # nobody's label: sparse
    for start in (tile, 3 * tile + 100):  # two dense stretches of one tile each
        db_labels[start:start + tile] = rng.integers(0, 2, tile)
    db_labels[rng.random(n) < 0.002] = 0  # a few relevant items inside the sparse tiles too
    to_pm1 = np.unpackbits(q.view(np.uint8), axis=1, bitorder="little").astype(np.int8) * 2 - 1
    db_pm1 = np.unpackbits(db.view(np.uint8), axis=1, bitorder="little").astype(np.int8) * 2 - 1
    result = evaluate_hamming(to_pm1, db_pm1, q_labels, db_labels, bits=64, ties="index", topk=300,
                              chunk_size=3 * tile - 5)
    ap, ap_k = _index_ap_reference(q, q_labels, db, db_labels, 300)
    np.testing.assert_allclose(result.ap, ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.ap_at_k, ap_k, rtol=0, atol=1e-12)


def test_metric_query_blocks_give_every_thread_an_equal_share() -> None:
    for n_q in (1, 7, 63, 64, 65, 400, 10_000):
        for threads in (1, 2, 3, 8):
            block = hamming._eval_block(n_q, threads)
            assert 1 <= block <= hamming._EVAL_BLOCK
            n_blocks = -(-n_q // block)
            if threads > 1 and n_q >= threads:
                per_thread = -(-n_blocks // threads)  # blocks the busiest thread takes
                assert per_thread * block <= -(-n_q // threads) + block - 1  # never a whole extra block
    assert hamming._eval_block(400, 2) == 50  # 8 blocks of 50, not 7 of 64 (one thread idle at the end)


def _threaded_search_in_child(q: np.ndarray, db: np.ndarray, out: object) -> None:
    out.put(hamming.hamming_topk(q, db, 5, threads=2))  # type: ignore[attr-defined]


def test_worker_threads_are_kept_per_thread_count_and_made_anew_after_fork(topk_kernel: str) -> None:
    import multiprocessing

    if topk_kernel != "threshold-scan":
        pytest.skip("the worker pool runs the threshold scan; the counting kernels use numba's own threads")

    assert hamming._worker_pool(2) is hamming._worker_pool(2)
    assert hamming._worker_pool(3) is not hamming._worker_pool(2)
    assert hamming._worker_pool(3)._max_workers == 3
    rng = np.random.default_rng(8)
    q, db = _words(rng, 200, 1), _words(rng, 1 << 14, 1)  # 4 query blocks: tasks for the pool
    expected = hamming.hamming_topk(q, db, 5, threads=2)  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_threaded_search_in_child, args=(q, db, out))
    child.start()
    try:
        got = out.get(timeout=60)  # a child waiting on the parent's (absent) worker threads would hang here
        child.join(timeout=60)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_small_k_cuts_its_buffer_every_few_offers() -> None:
    # The buffer holds k + max(k // 2, _CUT_BATCH) candidates: at small k the bound tightens after a
    # few offers; at large k after half of k.
    assert hamming.candidate_capacity(1) == 1 + hamming._CUT_BATCH
    assert hamming.candidate_capacity(10) == 10 + hamming._CUT_BATCH
    assert hamming.candidate_capacity(1000) == 1500
