"""Retrieval metrics: Hamming ranking of binary codes, and dense (embedding) retrieval.

Hamming ranking (docs/benchmarks.md, "Metrics")
-----------------------------------------------
Relevance is "same label"; a database label of -1 (unknown) is never relevant. The database is
streamed in chunks of ``chunk_size`` rows; per query only the counts per Hamming distance are kept,
``n[q, d]`` (items at distance ``d``) and ``r[q, d]`` (relevant items at distance ``d``), so memory
is ``O(Q (L + 1))`` plus ``O(chunk)`` words -- never a ``Q x N`` matrix.

* ``map`` (MAP@all): mean over queries of ``AP = (1/R) sum_{relevant i} precision@rank(i)`` over the
  whole ranked database, ``R`` = # relevant items of the query.
* ``map_at_k`` (DA-hashing convention): ``AP@k = (1/R_k) sum_{relevant i, rank(i) <= k}
  precision@rank(i)`` with ``R_k`` = # relevant items retrieved in the top ``k`` (0 if ``R_k = 0``).
* A query with no relevant item has AP = AP@k = 0; it is counted in ``n_queries_without_relevant``.
* Tie rules (items at equal distance): ``expected`` (default) -- the exact expectation when each tie
  group is in uniformly random order, from the counts alone; ``index`` -- ties broken by database
  order (a stable sort), computed by a second streaming pass.
* ``precision_at[N]``: mean over queries of (# relevant in the top N) / N (expectation under
  ``expected``); ``recall_at[N]``: mean over queries with ``R > 0`` of (# relevant in the top N) / R.
  Values of N above the database size are left out.
* ``pr_radius`` (PWCF convention, pooled over (query, item) pairs): for radius ``rho = 0..L``,
  ``precision(rho) = sum_q sum_{d <= rho} r[q, d] / sum_q sum_{d <= rho} n[q, d]`` (None when nothing
  is retrieved) and ``recall(rho) = sum_q sum_{d <= rho} r[q, d] / sum_q R_q``.
* ``p_at_r2``: mean over queries of the precision of the items within radius 2 (0 when none).

Dense retrieval (text-to-image person re-id)
--------------------------------------------
:func:`dense_retrieval_metrics`: inner-product ranking; CMC Rank-k, mAP, and mINP
(``INP = R / rank of the last relevant item``, Ye et al., TPAMI 2021).
:func:`ranking_metrics`: the same metrics for any score matrix, given whole or as a callable that
yields it in query chunks (e.g. ITM re-ranked scores, :mod:`crossret.textimage.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossret.data.domain import UNKNOWN_LABEL
from crossret.errors import CodeError, ConfigError, DataError
from crossret.progress import ProgressFn
from crossret.retrieval import hamming
from crossret.retrieval._defaults import DEFAULT_PRECISION_NS, TIE_RULES
from crossret.retrieval.packing import as_packed, packed_to_words
from crossret.threads import use_threads

DEFAULT_CHUNK_SIZE = 262_144
_DENSE_CHUNK_ENTRIES = 1 << 22
MAP_AT_K_NORMALISATION = "relevant items retrieved in the top k (DA-hashing convention)"


@dataclass
class HammingEvaluation:
    """Result of :func:`evaluate_hamming` (see the module docstring for the definitions).

    ``ap`` / ``ap_at_k`` are per-query arrays ``(Q,)``; everything else is a summary. ``to_dict``
    gives the JSON-safe summary (no per-query arrays).
    """

    bits: int
    ties: str
    topk: int | None
    n_queries: int
    n_database: int
    n_queries_without_relevant: int
    map: float
    ap: np.ndarray
    map_at_k: float | None
    ap_at_k: np.ndarray | None
    precision_at: dict[int, float]
    recall_at: dict[int, float | None]
    pr_radius: dict[str, list]
    p_at_r2: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: floats, ints, lists and string keys only."""
        return {
            "bits": int(self.bits),
            "ties": self.ties,
            "topk": None if self.topk is None else int(self.topk),
            "n_queries": int(self.n_queries),
            "n_database": int(self.n_database),
            "n_queries_without_relevant": int(self.n_queries_without_relevant),
            "map": float(self.map),
            "map_at_k": None if self.map_at_k is None else float(self.map_at_k),
            "map_at_k_normalisation": None if self.topk is None else MAP_AT_K_NORMALISATION,
            "precision_at": {str(n): float(v) for n, v in self.precision_at.items()},
            "recall_at": {str(n): (None if v is None else float(v)) for n, v in self.recall_at.items()},
            "pr_radius": {key: [None if v is None else (int(v) if key == "radius" else float(v))
                                for v in values] for key, values in self.pr_radius.items()},
            "p_at_r2": float(self.p_at_r2),
        }


# ----------------------------------------------------------------------------------------------
# Input checking


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _prepare_codes(query_codes: Any, db_codes: Any, bits: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    if bits is not None and (not _is_int(bits) or bits <= 0):
        raise CodeError(f"bits must be a positive integer, got {bits!r}")
    q_array = np.asarray(query_codes)
    db_array = np.asarray(db_codes)
    try:
        # A uint8 array is packed when bits is given; any other array is a code matrix (as_packed "api").
        q_packed, q_bits = as_packed(q_array, bits, name="query codes")
        db_packed, db_bits = as_packed(db_array, bits, name="database codes")
    except CodeError as exc:
        both_packed = bits is not None and q_array.dtype == np.uint8 and db_array.dtype == np.uint8
        if both_packed and q_array.ndim == 2 and db_array.ndim == 2 and q_array.shape[1] != db_array.shape[1]:
            # Name both lengths: a width mismatch is nearly always codes of two different lengths.
            raise CodeError(
                f"{exc} (query codes are {q_array.shape[1]} bytes wide, database codes "
                f"{db_array.shape[1]} bytes wide); query and database code lengths must match"
            ) from None
        raise
    if q_bits != db_bits:
        raise CodeError(
            f"query codes have {q_bits} bits but database codes have {db_bits} bits; "
            "encode both with the same code length"
        )
    if q_packed.shape[0] == 0:
        raise DataError("there are no query codes (0 rows)")
    if db_packed.shape[0] == 0:
        raise DataError("the database is empty (0 rows)")
    return q_packed, db_packed, q_bits


def _as_labels(labels: Any, n: int, name: str) -> np.ndarray:
    """1-D integer labels, one per row -> int64 ``(n,)``; ``N x 1`` / ``1 x N`` are flattened."""
    array = np.asarray(labels)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise DataError(f"{name}: labels must be 1-D (one per code), got shape {np.shape(labels)}")
    if array.shape[0] != n:
        raise DataError(f"{name}: {array.shape[0]} labels for {n} codes; give exactly one label per code")
    if array.dtype.kind in "ib":
        return array.astype(np.int64)
    if array.dtype.kind == "u":
        if array.size and array.max() > np.iinfo(np.int64).max:
            raise DataError(f"{name}: labels above 2**63 - 1 do not fit in int64")
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or np.any(array != np.round(array)):
            raise DataError(f"{name}: labels must be integers (found NaN, inf or fractional values)")
        if array.size and np.abs(array).max() >= 2.0**63:
            raise DataError(f"{name}: labels beyond +-2**63 do not fit in int64")
        return array.astype(np.int64)
    raise DataError(f"{name}: labels must be integers, got dtype {array.dtype}")


def _label_codes(q_labels: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to int32 codes such that ``relevant <=> codes equal``.

    Queries get codes ``>= 0``; database items with label -1 get code -1, which no query has, so
    the kernels need no special case for unknown labels.
    """
    valid = db_labels != UNKNOWN_LABEL
    _, inverse = np.unique(np.concatenate([q_labels, db_labels[valid]]), return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int32)
    q_codes = np.ascontiguousarray(inverse[: q_labels.shape[0]])
    db_codes = np.full(db_labels.shape[0], -1, dtype=np.int32)
    db_codes[valid] = inverse[q_labels.shape[0]:]
    return q_codes, db_codes


def _check_options(ties: str, topk: int | None, precision_ns: Sequence[int], chunk_size: int) -> list[int]:
    if ties not in TIE_RULES:
        raise ConfigError(f"ties must be one of {', '.join(TIE_RULES)}; got {ties!r}")
    if topk is not None and (not _is_int(topk) or topk < 1):
        raise ConfigError(f"topk must be a positive integer or None, got {topk!r}")
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    ns = list(precision_ns)
    for n in ns:
        if not _is_int(n) or n < 1:
            raise ConfigError(f"precision_ns must hold positive integers, got {n!r}")
    return sorted({int(n) for n in ns})


def rank_grid(n_database: int, points: int = 100) -> list[int]:
    """The ranks at which the P-R curve by rank is evaluated: about ``points`` log-spaced ranks from 1 to
    ``n_database``, both included, rounded to integers without repeats."""
    if not _is_int(n_database) or n_database < 1:
        raise ConfigError(f"n_database must be a positive integer, got {n_database!r}")
    if not _is_int(points) or points < 2:
        raise ConfigError(f"points must be an integer >= 2, got {points!r}")
    grid = np.unique(np.rint(np.geomspace(1, int(n_database), int(points))).astype(np.int64))
    return [int(n) for n in grid]


# ----------------------------------------------------------------------------------------------
# Hamming ranking


def evaluate_hamming(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    bits: int | None = None,
    ties: str = "expected",
    topk: int | None = None,
    precision_ns: Sequence[int] = DEFAULT_PRECISION_NS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: ProgressFn | None = None,
) -> HammingEvaluation:
    """Rank the database by Hamming distance for every query and compute the retrieval metrics.

    Args:
        query_codes: ``(Q, L)`` ±1 / {0,1} / bool codes, or packed uint8 ``(Q, ceil(L/8))`` with
            ``bits=L`` (faiss bit order, see :mod:`crossret.retrieval.packing`).
        db_codes: ``(N, L)`` codes or ``(N, ceil(L/8))`` packed, same convention.
        query_labels: ``(Q,)`` integer labels. db_labels: ``(N,)``; -1 is never relevant.
        bits: code length; required for packed input, inferred from the shape otherwise.
        ties: ``"expected"`` (exact expectation over random orders of tied items) or ``"index"``
            (ties broken by database order).
        topk: also compute MAP@k (normalised by the relevant items retrieved in the top k).
        precision_ns: the N of precision@N / recall@N; N above the database size is skipped.
        chunk_size: database rows per streaming chunk (memory ``O(Q L + chunk)``).
        progress: called as ``progress(rows_done, n_database, stage)`` after every chunk, with
            stage ``"distances"`` (the counting pass of ``ties="expected"``) or ``"ranks"`` (the walk of
            ``ties="index"``, over every block of queries; when one query's label has more relevant
            items than a block can record, ``index`` takes two passes, ``"distances"`` then ``"ranks"``).

    Raises:
        CodeError: malformed codes or query/database code lengths that differ.
        DataError: labels that are not 1-D integers with one per code; empty inputs.
        ConfigError: bad ``ties``, ``topk``, ``precision_ns`` or ``chunk_size``.
    """
    ns_all = _check_options(ties, topk, precision_ns, chunk_size)
    q_packed, db_packed, bits = _prepare_codes(query_codes, db_codes, bits)
    n_q, n_db = q_packed.shape[0], db_packed.shape[0]
    q_lab, db_lab = _label_codes(_as_labels(query_labels, n_q, "query labels"),
                                 _as_labels(db_labels, n_db, "database labels"))
    ns = np.asarray([n for n in ns_all if n <= n_db], dtype=np.int64)
    # AP@k with k >= N is AP@all; clipping also keeps k inside int64 for the kernels.
    k_eff = n_db if topk is None else min(int(topk), n_db)

    q_words = np.ascontiguousarray(packed_to_words(q_packed, bits))
    n_dist = bits + 1

    def chunks() -> Any:
        for start in range(0, n_db, chunk_size):
            stop = min(start + chunk_size, n_db)
            words = np.ascontiguousarray(packed_to_words(db_packed[start:stop], bits))
            yield stop, words, db_lab[start:stop]

    # The numba kernels run in the "evaluate" phase of crossret.threads: its thread count, and torch /
    # faiss restored afterwards (numba's OpenMP layer resets their shared count when its threads start).
    with use_threads("evaluate"):
        relevant = _relevant_per_query(q_lab, db_lab)
        if ties == "index" and relevant.max(initial=0) + 1 <= _INDEX_RECORD_BUDGET:
            counts, rel_counts, ap, ap_k, rel_at_n = _index_one_pass(q_words, q_lab, chunks, relevant, k_eff, ns,
                                                                     n_dist, n_db, progress)
        else:
            # Pass 1: per-distance counts (non-relevant in the first half of a row, relevant in the second).
            hist = np.zeros((n_q, 2 * n_dist), dtype=np.int64)
            for stop, words, labels in chunks():
                hamming.distance_histograms(q_words, q_lab, words, labels, hist)
                if progress is not None:
                    progress(stop, n_db, "distances")
            rel_counts = np.ascontiguousarray(hist[:, n_dist:])
            counts = hist[:, :n_dist] + rel_counts
            del hist
            if ties == "expected":
                ap, ap_k, rel_at_n = hamming.expected_rank_metrics(counts, rel_counts, k_eff, ns)
            else:
                ap, ap_k, rel_at_n = _index_pass(q_words, q_lab, chunks, counts, rel_counts, k_eff, ns,
                                                 n_db, progress)
        n_rel = rel_counts.sum(axis=1)

    has_rel = n_rel > 0
    precision_at = {int(n): float(np.mean(rel_at_n[:, t] / n)) for t, n in enumerate(ns)}
    recall_at: dict[int, float | None] = {
        int(n): (float(np.mean(rel_at_n[has_rel, t] / n_rel[has_rel])) if has_rel.any() else None)
        for t, n in enumerate(ns)
    }
    return HammingEvaluation(
        bits=bits,
        ties=ties,
        topk=None if topk is None else int(topk),
        n_queries=n_q,
        n_database=n_db,
        n_queries_without_relevant=int(np.count_nonzero(~has_rel)),
        map=float(ap.mean()),
        ap=ap,
        map_at_k=None if topk is None else float(ap_k.mean()),
        ap_at_k=None if topk is None else ap_k,
        precision_at=precision_at,
        recall_at=recall_at,
        pr_radius=_pr_by_radius(counts, rel_counts),
        p_at_r2=_precision_within_radius(counts, rel_counts, 2),
    )


# Records (distance, items before it at that distance) the one-pass index rule keeps per query block;
# 16 bytes each, so 64 MiB. A query whose label has more relevant items takes the two-pass route.
_INDEX_RECORD_BUDGET = 1 << 22


def _relevant_per_query(q_lab: np.ndarray, db_lab: np.ndarray) -> np.ndarray:
    """Relevant database items of every query (label codes equal; -1 is nobody's)."""
    known = db_lab[db_lab >= 0]
    per_label = np.bincount(known, minlength=int(q_lab.max(initial=-1)) + 1) if known.size else None
    out = np.zeros(q_lab.shape[0], np.int64)
    if per_label is not None:
        inside = q_lab < per_label.size
        out[inside] = per_label[q_lab[inside]]
    return out


def _index_one_pass(q_words: np.ndarray, q_lab: np.ndarray, chunks: Callable[[], Any], relevant: np.ndarray,
                    k_eff: int, ns: np.ndarray, n_dist: int, n_db: int, progress: ProgressFn | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tie rule ``index`` in one walk of the database per block of queries
    (:func:`crossret.retrieval.hamming.index_records_walk`): blocks are cut so that their records fit
    ``_INDEX_RECORD_BUDGET``. Returns ``(counts, rel_counts, ap, ap_at_k, rel_at_n)``; progress reports
    stage ``"ranks"`` over all blocks."""
    n_q = q_words.shape[0]
    counts = np.zeros((n_q, n_dist), np.int64)
    rel_counts = np.zeros((n_q, n_dist), np.int64)
    ap = np.zeros(n_q)
    ap_k = np.zeros(n_q)
    rel_at_n = np.zeros((n_q, ns.shape[0]))
    slots = relevant + 1
    ends = np.cumsum(slots)
    starts: list[int] = [0]
    while starts[-1] < n_q:  # greedy blocks of consecutive queries within the budget
        base = ends[starts[-1] - 1] if starts[-1] else 0
        stop = int(np.searchsorted(ends, base + _INDEX_RECORD_BUDGET, side="right"))
        starts.append(max(stop, starts[-1] + 1))
    n_blocks = len(starts) - 1
    # One pair of record buffers for every block, uninitialised: the walk writes each record before
    # the scoring reads it, and fresh zeroed buffers per block cost page faults of their own.
    largest = max(int(slots[starts[b]:starts[b + 1]].sum()) for b in range(n_blocks)) if n_blocks else 0
    rec_d_all, rec_s_all = np.empty(largest, np.int64), np.empty(largest, np.int64)
    for b in range(n_blocks):
        q0, q1 = starts[b], starts[b + 1]
        offsets = np.concatenate([[0], np.cumsum(slots[q0:q1])[:-1]]).astype(np.int64)
        size = int(slots[q0:q1].sum())
        rec_d, rec_s = rec_d_all[:size], rec_s_all[:size]
        n_rec = np.zeros(q1 - q0, np.int64)
        seen = np.zeros((q1 - q0, n_dist), np.int64)
        block_words, block_lab = np.ascontiguousarray(q_words[q0:q1]), np.ascontiguousarray(q_lab[q0:q1])
        for stop, words, labels in chunks():
            hamming.index_records_walk(block_words, block_lab, words, labels, seen, offsets, n_rec, rec_d, rec_s)
            if progress is not None:
                progress(int(n_db * (b + stop / n_db) / n_blocks), n_db, "ranks")
        rel, ap_sum, apk_sum, n_rel_topk, first = hamming.index_records_score(seen, offsets, n_rec, rec_d, rec_s,
                                                                              k_eff, ns)
        n_rel = rel.sum(axis=1)
        counts[q0:q1], rel_counts[q0:q1] = seen, rel
        ap[q0:q1] = np.divide(ap_sum, n_rel, out=np.zeros(q1 - q0), where=n_rel > 0)
        ap_k[q0:q1] = np.divide(apk_sum, n_rel_topk, out=np.zeros(q1 - q0), where=n_rel_topk > 0)
        rel_at_n[q0:q1] = first
    return counts, rel_counts, ap, ap_k, rel_at_n


def _index_pass(q_words: np.ndarray, q_lab: np.ndarray, chunks: Callable[[], Any], counts: np.ndarray,
                rel_counts: np.ndarray, k_eff: int, ns: np.ndarray, n_db: int,
                progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tie rule ``index``: second streaming pass; returns ``(ap, ap_at_k, rel_at_n)``."""
    n_q = counts.shape[0]
    # Items / relevant items at strictly smaller distances: the rank offset of each tie group.
    before = np.ascontiguousarray(np.cumsum(counts, axis=1) - counts)
    before_rel = np.ascontiguousarray(np.cumsum(rel_counts, axis=1) - rel_counts)
    seen = np.zeros_like(counts)
    seen_rel = np.zeros_like(counts)
    ap_sum = np.zeros(n_q)
    apk_sum = np.zeros(n_q)
    n_rel_topk = np.zeros(n_q, dtype=np.int64)
    rel_at_n = np.zeros((n_q, ns.shape[0]), dtype=np.int64)
    for stop, words, labels in chunks():
        hamming.index_rank_pass(q_words, q_lab, words, labels, before, before_rel, seen, seen_rel,
                                k_eff, ns, ap_sum, apk_sum, n_rel_topk, rel_at_n)
        if progress is not None:
            progress(stop, n_db, "ranks")
    n_rel = rel_counts.sum(axis=1)
    ap = np.divide(ap_sum, n_rel, out=np.zeros(n_q), where=n_rel > 0)
    ap_k = np.divide(apk_sum, n_rel_topk, out=np.zeros(n_q), where=n_rel_topk > 0)
    return ap, ap_k, rel_at_n.astype(np.float64)


def _pr_by_radius(counts: np.ndarray, rel_counts: np.ndarray) -> dict[str, list]:
    """Pooled precision / recall of "retrieve everything within radius rho", rho = 0..L."""
    retrieved = np.cumsum(counts.sum(axis=0))
    relevant = np.cumsum(rel_counts.sum(axis=0))
    total_relevant = int(rel_counts.sum())
    precision = [float(rel) / float(ret) if ret > 0 else None for rel, ret in zip(relevant, retrieved, strict=True)]
    recall = [float(rel) / total_relevant if total_relevant > 0 else None for rel in relevant]
    return {"radius": list(range(counts.shape[1])), "precision": precision, "recall": recall}


def _precision_within_radius(counts: np.ndarray, rel_counts: np.ndarray, radius: int) -> float:
    """Mean over queries of (# relevant within ``radius``) / (# within ``radius``); 0 if none."""
    within = counts[:, : radius + 1].sum(axis=1)
    rel_within = rel_counts[:, : radius + 1].sum(axis=1)
    per_query = np.divide(rel_within, within, out=np.zeros(counts.shape[0]), where=within > 0)
    return float(per_query.mean())


def mean_average_precision(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    bits: int | None = None,
    ties: str = "expected",
    topk: int | None = None,
) -> float:
    """MAP@all, or MAP@k when ``topk`` is given (see :func:`evaluate_hamming`)."""
    result = evaluate_hamming(query_codes, db_codes, query_labels, db_labels, bits=bits, ties=ties,
                              topk=topk, precision_ns=())
    return result.map if topk is None else float(result.map_at_k)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Dense retrieval


ScoreChunkFn = Callable[[int, int], Any]
"""``fn(start, stop) -> (stop - start, G)`` scores of queries ``start .. stop - 1`` against the gallery."""


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """A key whose *ascending* stable sort is the descending order of ``scores`` (exactly, no overflow).

    Floats are negated (exact; ``-0.0 == 0.0`` keeps them tied); integers are bit-complemented,
    ``~x = -x - 1`` (signed) or ``max - x`` (unsigned), which is strictly decreasing and cannot
    overflow the way ``-x`` does at ``INT_MIN`` or for unsigned types.
    """
    if scores.dtype.kind == "f":
        return -scores
    if scores.dtype.kind == "b":
        scores = scores.astype(np.int8)
    return ~scores


def _check_score_chunk(chunk: Any, start: int, stop: int, n_g: int, name: str) -> np.ndarray:
    sim = np.asarray(chunk)
    if sim.shape != (stop - start, n_g):
        raise DataError(
            f"{name} for queries {start}..{stop - 1} have shape {sim.shape}, expected ({stop - start}, {n_g}) "
            "(one row per query, one column per gallery item)"
        )
    if sim.dtype.kind not in "fiub":
        raise DataError(f"{name}: expected numeric values, got dtype {sim.dtype}")
    if sim.dtype.kind == "f":
        nan_rows = np.flatnonzero(np.isnan(sim).any(axis=1))
        if nan_rows.size:
            raise DataError(
                f"{name} contain NaN (first in the row of query {start + int(nan_rows[0])}); NaN cannot be "
                "ranked -- check the model outputs / embeddings for NaN"
            )
    return sim


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks_list = list(ks)
    if not ks_list or any(not _is_int(k) or k < 1 for k in ks_list):
        raise ConfigError(f"ks must be positive integers, got {ks_list!r}")
    return ks_list


def _check_chunk_size(chunk_size: int) -> None:
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _own_length_ids(ids: Any, name: str) -> np.ndarray:
    """1-D integer ids of their own length (``N x 1`` / ``1 x N`` flattened); empty -> DataError."""
    array = np.asarray(ids)
    n = int(array.size) if array.ndim == 2 and 1 in array.shape else (int(array.shape[0]) if array.ndim else 0)
    labels = _as_labels(ids, n, name)
    if labels.shape[0] == 0:
        raise DataError(f"{name}: empty (0 ids); there is nothing to rank")
    return labels


def _ranking_core(chunk_fn: ScoreChunkFn, q_ids: np.ndarray, g_ids: np.ndarray, ks_list: list[int],
                  chunk_size: int, name: str) -> dict[str, Any]:
    """Shared by :func:`ranking_metrics` and :func:`dense_retrieval_metrics` (definitions there).

    ``chunk_fn(start, stop)`` gives the ``(stop - start, G)`` scores; rows are requested in
    increasing, contiguous, non-overlapping ranges covering ``0 .. Q - 1`` exactly once.
    """
    n_q, n_g = q_ids.shape[0], g_ids.shape[0]
    positions = np.arange(1, n_g + 1, dtype=np.float64)
    # 0-based position of the first match; -1 marks "no match" so that no k can count it.
    first = np.full(n_q, -1, dtype=np.int64)
    ap = np.zeros(n_q)
    inp = np.zeros(n_q)
    n_rel = np.zeros(n_q, dtype=np.int64)
    # Several (chunk x G) temporaries live at once; cap a chunk at ~4M entries so memory stays bounded
    # for large galleries too (the caller's chunk_size is an upper bound).
    chunk_size = max(1, min(chunk_size, _DENSE_CHUNK_ENTRIES // n_g))
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        sim = _check_score_chunk(chunk_fn(start, stop), start, stop, n_g, name)
        # A stable ascending sort of the descending key = descending score with ties in gallery order.
        order = np.argsort(_descending_key(sim), axis=1, kind="stable")
        del sim
        matches = g_ids[order] == q_ids[start:stop, None]
        rel = matches.sum(axis=1)
        hits = np.cumsum(matches, axis=1)
        ap_sum = np.where(matches, hits / positions, 0.0).sum(axis=1)
        last = n_g - 1 - np.argmax(matches[:, ::-1], axis=1)
        found = rel > 0
        ap[start:stop] = np.divide(ap_sum, rel, out=np.zeros(stop - start), where=found)
        inp[start:stop] = np.where(found, rel / (last + 1.0), 0.0)
        first[start:stop] = np.where(found, np.argmax(matches, axis=1), -1)
        n_rel[start:stop] = rel
    result: dict[str, Any] = {f"rank{k}": float(np.mean((first >= 0) & (first < k))) for k in ks_list}
    result.update(
        map=float(ap.mean()),
        minp=float(inp.mean()),
        n_queries=int(n_q),
        n_gallery=int(n_g),
        n_queries_without_relevant=int(np.count_nonzero(n_rel == 0)),
    )
    return result


def ranking_metrics(
    scores: np.ndarray | ScoreChunkFn,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Rank-k / mAP / mINP of an arbitrary query x gallery score matrix, streamed in query chunks.

    Args:
        scores: either the ``(Q, G)`` score array (numeric; higher = more similar), or a callable
            ``fn(start, stop) -> (stop - start, G)`` array giving the rows of queries
            ``start .. stop - 1``, so that the caller never materialises ``Q x G`` at once. The
            callable is called once per chunk, in order, with ``stop - start <= chunk_size`` (and at
            most ~4M entries per chunk).
        query_ids: ``(Q,)`` integer identities. gallery_ids: ``(G,)``.
        ks: the k of Rank-k (positive integers; k above ``G`` simply gives the hit rate at ``G``).
        chunk_size: upper bound on the queries per chunk.

    Each query ranks the gallery by descending score, ties kept in gallery order (a stable sort;
    ``-0.0`` ties ``0.0``, integer scores are ranked exactly). A gallery item is relevant iff its id
    equals the query id. With ``pos_1 < ... < pos_R`` the 1-based ranks of the ``R`` relevant items:

    * ``rank{k}`` (CMC): fraction of queries with ``pos_1 <= k``;
    * ``map``: mean over queries of ``AP = (1/R) sum_{i=1..R} i / pos_i``;
    * ``minp``: mean over queries of ``INP = R / pos_R`` (Ye et al., TPAMI 2021).

    Queries with no relevant item score 0 on all three and are counted in
    ``n_queries_without_relevant``; also returned: ``n_queries``, ``n_gallery``. Memory is
    ``O(chunk x G)``; the output keys are those of :func:`dense_retrieval_metrics`.

    Raises:
        DataError: ids that are not 1-D integers, empty ids, scores (or a chunk) of the wrong shape,
            non-numeric scores, NaN scores.
        ConfigError: bad ``ks`` or ``chunk_size``.
    """
    ks_list = _check_ks(ks)
    _check_chunk_size(chunk_size)
    q_ids = _own_length_ids(query_ids, "query ids")
    g_ids = _own_length_ids(gallery_ids, "gallery ids")
    if callable(scores):
        chunk_fn: ScoreChunkFn = scores
    else:
        matrix = np.asarray(scores)
        if matrix.shape != (q_ids.shape[0], g_ids.shape[0]):
            raise DataError(
                f"scores have shape {matrix.shape} but there are {q_ids.shape[0]} query ids and "
                f"{g_ids.shape[0]} gallery ids; scores must be (queries, gallery)"
            )
        if matrix.dtype.kind not in "fiub":
            raise DataError(f"scores: expected numeric values, got dtype {matrix.dtype}")

        def chunk_fn(start: int, stop: int) -> np.ndarray:
            return matrix[start:stop]

    return _ranking_core(chunk_fn, q_ids, g_ids, ks_list, chunk_size, "scores")


def dense_retrieval_metrics(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Text-to-image style retrieval metrics over the whole gallery.

    Similarity ``s[q, g] = <query_emb[q], gallery_emb[g]>`` (normalise the embeddings first for
    cosine), computed at most ``chunk_size`` queries at a time and at most ~4M (query, item) entries
    per chunk (memory ``O(min(chunk_size x G, 4M))``). Each query
    ranks the gallery by descending similarity, ties kept in gallery order (stable). A gallery item
    is relevant when its id equals the query id. With ``pos_1 < ... < pos_R`` the (1-based) ranks of
    the relevant items:

    * ``rank{k}`` (CMC): fraction of queries with ``pos_1 <= k``;
    * ``map``: mean of ``AP = (1/R) sum_i i / pos_i``;
    * ``minp``: mean of ``INP = R / pos_R`` (Ye et al., TPAMI 2021).

    Queries with no relevant gallery item score 0 on all three and are counted in
    ``n_queries_without_relevant``. Shapes: ``query_emb (Q, d)``, ``gallery_emb (G, d)``,
    ``query_ids (Q,)``, ``gallery_ids (G,)``. Same core as :func:`ranking_metrics`.
    """
    query = np.asarray(query_emb)
    gallery = np.asarray(gallery_emb)
    for name, emb in (("query embeddings", query), ("gallery embeddings", gallery)):
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise DataError(f"{name}: expected a non-empty 2-D array (items x dims), got shape {emb.shape}")
        if emb.dtype.kind not in "fiub":
            raise DataError(f"{name}: expected numeric values, got dtype {emb.dtype}")
        if not np.isfinite(emb).all():
            raise DataError(f"{name}: contains NaN or inf")
    if query.shape[1] != gallery.shape[1]:
        raise DataError(
            f"query embeddings have {query.shape[1]} dims but gallery embeddings have {gallery.shape[1]}"
        )
    q_ids = _as_labels(query_ids, query.shape[0], "query ids")
    g_ids = _as_labels(gallery_ids, gallery.shape[0], "gallery ids")
    ks_list = _check_ks(ks)
    _check_chunk_size(chunk_size)

    dtype = np.result_type(query.dtype, gallery.dtype, np.float32)
    query = query.astype(dtype, copy=False)
    gallery_t = np.ascontiguousarray(gallery.astype(dtype, copy=False).T)

    def similarities(start: int, stop: int) -> np.ndarray:
        return query[start:stop] @ gallery_t

    return _ranking_core(similarities, q_ids, g_ids, ks_list, chunk_size, "similarities")


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PRECISION_NS",
    "TIE_RULES",
    "HammingEvaluation",
    "dense_retrieval_metrics",
    "evaluate_hamming",
    "mean_average_precision",
    "rank_grid",
    "ranking_metrics",
]
