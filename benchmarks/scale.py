"""Retrieval at scale: Hamming search, approximate indexes, MAP evaluation, graph and service scaling.

    python benchmarks/scale.py                         # every part, full sizes (~20 min, 2 busy cores)
    python benchmarks/scale.py --parts search,map      # some parts (others keep their last results)
    python benchmarks/scale.py --quick                 # small smoke run -> results/scale_quick.*

Parts (``--parts``, comma separated):

``search``
    Exact Hamming top-k (k = 10 and 1000) of 10,000 random queries against 1M random codes at
    32/64/128/256 bits: ``crossret.retrieval.BinaryIndex`` (flat, crossret's query-blocked numba
    kernel) against faiss ``IndexBinaryFlat`` at its best query block size and OpenMP thread count
    (chosen per case on the first ``--faiss-tune-queries`` queries) and at its defaults, against the
    previous crossret kernel (``--baseline-commit``, loaded from git and timed in the same run; its
    results must be identical), against a numpy popcount scan (``np.bitwise_count`` of XORed 64-bit
    words + ``argpartition``; single-threaded, timed on a subset and scaled) and, at 64 bits, against
    the compute floor (XOR + popcount over a cache-resident tile, same threads). One and ten queries
    are timed apart (their database is split across threads; best of 50 interleaved rounds). Each
    method is timed ``--repeat`` times interleaved (best kept); the 1-minute load average is
    recorded before and after each case.
``ann``
    recall@k against queries/s of IVF (nprobe sweep), HNSW (efSearch sweep) and multi-hash (nflip
    sweep) at 1M 64-bit *clustered* codes (uniform random codes have no neighbourhood structure for
    an approximate index to use), recall counted with ties (``crossret.retrieval.recall_at_k``).
    Timed with ``--ann-threads`` faiss threads (default 1): on the shared 2-core machine two OpenMP
    threads made these millisecond searches erratic (e.g. nprobe 16 measured faster than nprobe 4).
``map``
    MAP@all over 10k queries x 1M items (64 bits, 100 labels): ``evaluate_hamming`` with both tie
    rules against per-query sorting (distance row, ``np.argsort(kind="stable")``, AP), in two
    flavours: published style (float32 ±1 inner product, float sort) and tuned numpy (popcount,
    uint8 distances, whose stable sort is a radix sort). The baselines are timed on a subset of
    queries and scaled; their APs are checked against the ``index`` rule on that subset.
``graph``
    ``measure_graph_scaling(sizes)`` from ``benchmarks/graph_scaling.py``.
``service``
    ``measure_service(None, n_codes, bits, seconds, concurrency)`` from ``benchmarks/serve_load.py``.

Writes ``benchmarks/results/scale.{json,md}``; parts not run keep their previous results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = ("search", "ann", "map", "graph", "service")
K = 100


# --------------------------------------------------------------------------------------------
# helpers


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def host_info() -> dict[str, Any]:
    """Machine and library versions recorded with every part."""
    import faiss
    import numba

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpus": os.cpu_count(), "cpus_usable": usable, "faiss_threads": faiss.omp_get_max_threads(),
        "numba_threads": numba.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "numpy": np.__version__, "faiss": faiss.__version__,
        "numba": numba.__version__, "load_average": _load(),
    }


def random_packed(rng: np.random.Generator, n: int, bits: int, chunk: int = 1 << 20) -> np.ndarray:
    """``n`` uniformly random packed codes, generated in slices (never an N x L int8 matrix)."""
    width = (bits + 7) // 8
    out = np.empty((n, width), np.uint8)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = rng.integers(0, 256, (stop - start, width), dtype=np.uint8)
    if bits % 8:
        out[:, -1] &= (1 << (bits % 8)) - 1
    return out


def clustered_packed(rng: np.random.Generator, n: int, bits: int, centres: np.ndarray, flip: float,
                     chunk: int = 1 << 18) -> np.ndarray:
    """Codes drawn around ``centres`` (0/1 rows) with each bit flipped with probability ``flip``."""
    out = np.empty((n, (bits + 7) // 8), np.uint8)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        c = centres[rng.integers(0, len(centres), stop - start)]
        noisy = c ^ (rng.random(c.shape) < flip).astype(np.uint8)
        out[start:stop] = np.packbits(noisy, axis=1, bitorder="little")
    return out


def _popcount_fn() -> Callable[[np.ndarray], np.ndarray]:
    """numpy popcount of uint64 words: ``np.bitwise_count`` (numpy >= 2) or a byte lookup table."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)

    def lut(words: np.ndarray) -> np.ndarray:
        return table[words.view(np.uint8)].reshape(*words.shape, 8).sum(-1, dtype=np.uint8)

    return lut


def numpy_topk(db_words: np.ndarray, q_words: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """Exact top-k distances by a numpy scan, one query at a time. Returns (distances, wall s, CPU s)."""
    popcount = _popcount_fn()
    out = np.empty((q_words.shape[0], k), np.int32)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, qw in enumerate(q_words):
        counts = popcount(db_words ^ qw)
        dist = counts[:, 0] if counts.shape[1] == 1 else counts.sum(axis=1, dtype=np.int32)
        part = np.argpartition(dist, k - 1)[:k]
        out[i] = np.sort(dist[part])
    return out, time.perf_counter() - t0, time.process_time() - c0


def time_interleaved(fns: dict[str, Callable[[], Any]], repeat: int, min_seconds: float = 0.2
                     ) -> dict[str, dict[str, Any]]:
    """Warm each function once, then time them ``repeat`` times in turn (contention hits all alike).

    A function faster than ``min_seconds`` is looped within each timing so that one timing spans at
    least that long (the per-call time is reported). CPU time of the process is kept as well: on a
    shared machine it shows the work done, while wall time includes waiting for a core.
    """
    loops = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        loops[name] = max(1, int(np.ceil(min_seconds / max(time.perf_counter() - t0, 1e-9))))
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(loops[name]):
                fn()
            wall[name].append((time.perf_counter() - t0) / loops[name])
            cpu[name].append((time.process_time() - c0) / loops[name])
    return {name: {"best": min(wall[name]), "median": float(np.median(wall[name])), "all": wall[name],
                   "cpu_best": min(cpu[name]), "loops": loops[name]} for name in fns}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# search


def _faiss_settings() -> list[tuple[int, int]]:
    """(query block size, OpenMP threads) pairs tried for faiss' best setting."""
    import faiss

    threads = sorted({1, faiss.omp_get_max_threads()})
    return [(block, t) for block in (32, 256, 1024, 4096) for t in threads]


def _faiss_search(index: Any, q: np.ndarray, k: int, block: int, threads: int) -> Any:
    import faiss

    previous = faiss.omp_get_max_threads()
    index.query_batch_size = block
    faiss.omp_set_num_threads(threads)
    try:
        return index.search(q, k)
    finally:
        faiss.omp_set_num_threads(previous)


def _best_faiss_setting(index: Any, q: np.ndarray, k: int) -> tuple[int, int, dict[str, float]]:
    """faiss' fastest (query block, threads) on these queries, best of 2 timings each."""
    timings = {}
    for block, threads in _faiss_settings():
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            _faiss_search(index, q, k, block, threads)
            best = min(best, time.perf_counter() - t0)
        timings[f"{block}x{threads}"] = best
    block, threads = (int(v) for v in min(timings, key=timings.get).split("x"))
    return block, threads, timings


def _popcount_floor_seconds(q_words: np.ndarray, pairs_per_query: int, threads: int, repeat: int) -> float:
    """Seconds for every query to XOR + popcount ``pairs_per_query`` cache-resident 64-bit codes (a
    128 KiB tile read over and over), on ``threads`` threads the way ours runs: the compute floor of
    a flat scan, with no memory traffic, no selection and no output."""
    import numba as nb

    from crossret.retrieval.hamming import _popcount64, _run_blocks, aligned_copy
    from crossret.retrieval.vector_width import prefer_wide_vectors

    @nb.njit(nogil=True)
    def floor_kernel(q, tile, reps, out, q0, q1):  # pragma: no cover - compiled
        prefer_wide_vectors()  # the same vector width as ours: the floor is what the CPU can do
        for i in range(q0, q1):
            total = np.int64(0)
            for r in range(reps):
                a = q[i] ^ np.uint64(r)  # a different word each pass: the sum cannot be hoisted
                for j in range(tile.shape[0]):
                    total += _popcount64(a ^ tile[j])
            out[i] = total

    # On a cache line: from the heap's 16-byte boundary the same loop takes 1.66x as long on this machine,
    # and the floor is what the CPU can do.
    tile = aligned_copy(np.random.default_rng(1).integers(0, 2**63, 1 << 14, dtype=np.int64).view(np.uint64))
    reps = max(1, pairs_per_query // tile.size)
    words = np.ascontiguousarray(q_words[:, 0])
    out = np.zeros(words.size, np.int64)
    _run_blocks(floor_kernel, words.size, threads, words[:threads * 2], tile, np.int64(1), out)  # compile
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _run_blocks(floor_kernel, words.size, threads, words, tile, np.int64(reps), out)
        best = min(best, time.perf_counter() - t0)
    return best * pairs_per_query / (reps * tile.size)


def part_search(args: argparse.Namespace) -> dict[str, Any]:
    import faiss
    import numba

    import _previous
    from crossret.retrieval import BinaryIndex
    from crossret.retrieval.packing import packed_to_words, pad_packed

    previous = None
    if args.baseline_commit != "none":
        previous = _previous.load_module_at(args.baseline_commit, "crossret/retrieval/hamming.py",
                                            "_previous_hamming")
    rng = np.random.default_rng(args.seed)
    # Warm up faiss' thread pool, the allocator, numpy and every kernel before anything is timed:
    # without this the first configuration measured was up to 3x slower for whichever ran first.
    warm = random_packed(np.random.default_rng(12345), 200_000, 64)
    warm_index = BinaryIndex.from_packed(warm, 64)
    for _ in range(3):
        warm_index.search(warm[:100], K)
        numpy_topk(packed_to_words(warm, 64), packed_to_words(warm[:5], 64), K)
    del warm, warm_index
    threads_ours = numba.get_num_threads()
    exact_rows = []
    for n in args.sizes:
        large = n > 2_000_000
        n_q = args.queries_large if large else args.queries
        n_np = min(n_q, args.numpy_queries_large if large else args.numpy_queries)
        repeat = args.repeat_large if large else args.repeat
        for bits in args.bits:
            db = random_packed(rng, n, bits)
            q = random_packed(rng, n_q, bits)
            ours = BinaryIndex.from_packed(db, bits)
            padded_db, padded_q = pad_packed(db, bits), pad_packed(q, bits)
            db_words, q_words = packed_to_words(db, bits), packed_to_words(q, bits)
            index = faiss.IndexBinaryFlat(padded_db.shape[1] * 8)
            index.add(padded_db)
            for k in args.ks:
                _log(f"search: {n:,} x {bits} bits, {n_q} queries, k={k}")
                load_before = _load()
                tune_q = padded_q[:min(n_q, args.faiss_tune_queries)]
                block, threads, tuning = _best_faiss_setting(index, tune_q, k)
                default_block, default_threads = 32, faiss.omp_get_max_threads()
                fns: dict[str, Callable[[], Any]] = {
                    "ours": lambda ours=ours, q=q, k=k: ours.search(q, k),
                    "faiss_best": lambda index=index, padded_q=padded_q, k=k, b=block, t=threads:
                        _faiss_search(index, padded_q, k, b, t),
                    "faiss_default": lambda index=index, padded_q=padded_q, k=k, b=default_block, t=default_threads:
                        _faiss_search(index, padded_q, k, b, t),
                }
                if previous is not None:
                    fns["previous_kernel"] = lambda q_words=q_words, db_words=db_words, k=k: \
                        previous.hamming_topk(q_words, db_words, k)
                timing = time_interleaved(fns, repeat)
                d_ours, i_ours = ours.search(q, k)
                same_as_previous = None
                if previous is not None:
                    d_prev, i_prev = previous.hamming_topk(q_words, db_words, k)
                    same_as_previous = bool(np.array_equal(d_prev, d_ours) and np.array_equal(i_prev, i_ours))
                d_np, np_seconds, _ = numpy_topk(db_words, q_words[:n_np], k)
                assert np.array_equal(d_np, d_ours[:n_np]), "numpy and BinaryIndex disagree on top-k distances"
                best = {name: t["best"] for name, t in timing.items()}
                row: dict[str, Any] = {
                    "n": n, "bits": bits, "queries": n_q, "k": k,
                    "seconds": best, "seconds_median": {name: t["median"] for name, t in timing.items()},
                    "cpu_seconds": {name: t["cpu_best"] for name, t in timing.items()},
                    "ns_per_pair_ours": best["ours"] / (n_q * n) * 1e9,
                    "faiss_best_setting": {"query_batch_size": block, "threads": threads},
                    "faiss_default_setting": {"query_batch_size": default_block, "threads": default_threads},
                    "faiss_tuning_seconds": tuning, "faiss_tuning_queries": int(tune_q.shape[0]),
                    "threads_ours": threads_ours,
                    "faiss_best_over_ours": best["faiss_best"] / best["ours"],
                    "faiss_default_over_ours": best["faiss_default"] / best["ours"],
                    "numpy_queries_timed": n_np, "numpy_seconds_scaled": np_seconds / n_np * n_q,
                    "numpy_over_ours": np_seconds / n_np * n_q / best["ours"],
                    "queries_per_second_ours": n_q / best["ours"],
                    "identical_to_previous_kernel": same_as_previous,
                    "load_before": load_before, "load_after": _load(),
                }
                if previous is not None:
                    row["previous_over_ours"] = best["previous_kernel"] / best["ours"]
                if bits == 64:
                    floor = _popcount_floor_seconds(q_words, n, threads_ours, repeat)
                    row["floor_seconds"] = floor
                    row["ours_over_floor"] = best["ours"] / floor
                exact_rows.append(row)
                _log(f"  {json.dumps(row, default=str)}")
            del ours, index, db, padded_db, db_words
    single = _single_query_rows(args, previous) if previous is not None else []
    return {"exact": exact_rows, "single_query": single, "baseline_commit": args.baseline_commit}


SINGLE_QUERY_REPEAT = 50  # interleaved rounds for calls of a few milliseconds: 3 let one stall decide a row


def _single_query_rows(args: argparse.Namespace, previous: Any) -> list[dict[str, Any]]:
    """Latency of one and of ten queries (the database split across threads) against the previous
    kernel and faiss' best setting, best of ``SINGLE_QUERY_REPEAT`` interleaved rounds: the single-query
    path must not get slower."""
    import faiss

    from crossret.retrieval.hamming import hamming_topk
    from crossret.retrieval.packing import packed_to_words, pad_packed

    rng = np.random.default_rng(args.seed + 7)
    n = max(args.sizes[0], 1)
    rows = []
    for bits in (64, 256):
        db = random_packed(rng, n, bits)
        db_words = packed_to_words(db, bits)
        index = faiss.IndexBinaryFlat(bits)
        index.add(pad_packed(db, bits))
        for n_q in (1, 10):
            q = random_packed(rng, n_q, bits)
            q_words = packed_to_words(q, bits)
            load_before = _load()
            padded_q = pad_packed(q, bits)
            block, threads, _ = _best_faiss_setting(index, padded_q, 10)
            timing = time_interleaved({
                "ours": lambda q_words=q_words, db_words=db_words: hamming_topk(q_words, db_words, 10),
                "previous_kernel": lambda q_words=q_words, db_words=db_words:
                    previous.hamming_topk(q_words, db_words, 10),
                "faiss_best": lambda index=index, padded_q=padded_q, b=block, t=threads:
                    _faiss_search(index, padded_q, 10, b, t),
            }, max(args.repeat, SINGLE_QUERY_REPEAT))
            best = {name: t["best"] for name, t in timing.items()}
            rows.append({"n": n, "bits": bits, "queries": n_q, "k": 10, "seconds": best,
                         "previous_over_ours": best["previous_kernel"] / best["ours"],
                         "faiss_best_over_ours": best["faiss_best"] / best["ours"],
                         "faiss_best_setting": {"query_batch_size": block, "threads": threads},
                         "load_before": load_before, "load_after": _load()})
            _log(f"  single: {json.dumps(rows[-1], default=str)}")
    return rows


def part_ann(args: argparse.Namespace) -> dict[str, Any]:
    return {**_approximate(args, np.random.default_rng(args.seed + 2)), "faiss_threads": args.ann_threads}


def _approximate(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    import faiss

    from crossret.retrieval.streaming import build_index_from_packed, recall_at_k

    n, bits, n_q = args.ann_size, 64, args.queries
    centres = rng.integers(0, 2, (args.ann_clusters, bits), dtype=np.uint8)
    db = clustered_packed(rng, n, bits, centres, args.ann_flip)
    q = clustered_packed(rng, n_q, bits, centres, args.ann_flip)
    setups: list[tuple[str, dict[str, Any], str, list[int]]] = [
        ("flat", {}, "", [0]),
        ("ivf", {"nlist": args.ann_nlist}, "nprobe", [1, 4, 16, 64]),
        ("hnsw", {"M": 16, "efConstruction": 40}, "efSearch", [128, 256, 512]),
        ("multihash", {"nhash": 4, "b": 16}, "nflip", [0, 1, 2]),
    ]
    rows, exact = [], None
    for kind, params, knob, values in setups:
        _log(f"approximate: building {kind} over {n:,} clustered codes")
        t0 = time.perf_counter()
        index = build_index_from_packed(db, bits, kind, seed=args.seed, **params)
        build = time.perf_counter() - t0
        if kind == "flat":
            exact = index
        for value in values:
            if knob:
                index.set_params(**{knob: value})
            default_threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(args.ann_threads)  # builds keep the default; only timing is pinned
            try:
                timing = time_interleaved({"search": lambda index=index: index.search(q, K)}, args.repeat)
            finally:
                faiss.omp_set_num_threads(default_threads)
            recall = recall_at_k(index, exact, q, K)
            rows.append({"kind": kind, "params": dict(index.params), "setting": f"{knob}={value}" if knob else "exact",
                         "build_seconds": build, "search_seconds": timing["search"]["best"],
                         "queries_per_second": n_q / timing["search"]["best"], f"recall_at_{K}": recall})
            _log(f"  {rows[-1]}")
    flat_qps = rows[0]["queries_per_second"]
    for row in rows:
        row["speedup_vs_flat"] = row["queries_per_second"] / flat_qps
    return {"n": n, "bits": bits, "queries": n_q, "k": K, "clusters": args.ann_clusters, "flip": args.ann_flip,
            "rows": rows}


# --------------------------------------------------------------------------------------------
# map


def _per_query_sort_ap(dist_row_fn: Callable[[int], np.ndarray], q_labels: np.ndarray, db_labels: np.ndarray,
                       n: int) -> tuple[np.ndarray, float]:
    """AP of the first ``n`` queries by sorting each distance row (stable: ties in database order)."""
    aps = np.zeros(n)
    t0 = time.perf_counter()
    for i in range(n):
        order = np.argsort(dist_row_fn(i), kind="stable")
        hits = np.flatnonzero(db_labels[order] == q_labels[i]) + 1.0
        if hits.size:
            aps[i] = float(np.mean(np.arange(1, hits.size + 1) / hits))
    return aps, time.perf_counter() - t0


def part_map(args: argparse.Namespace) -> dict[str, Any]:
    from crossret.retrieval.metrics import evaluate_hamming
    from crossret.retrieval.packing import packed_to_words, unpack_codes

    rng = np.random.default_rng(args.seed + 1)
    n_q, n_db, bits = args.map_queries, args.map_database, 64
    q, db = random_packed(rng, n_q, bits), random_packed(rng, n_db, bits)
    ql, dbl = rng.integers(0, args.map_labels, n_q), rng.integers(0, args.map_labels, n_db)
    # JIT compile on a tiny problem first so that the timings below are steady-state.
    for ties in ("expected", "index"):
        evaluate_hamming(q[:3], db[:50], ql[:3], dbl[:50], bits=bits, ties=ties)
    ours: dict[str, Any] = {}
    results = {}
    for ties in ("expected", "index"):
        _log(f"map: evaluate_hamming ties={ties}, {n_q:,} x {n_db:,}")
        t0 = time.perf_counter()
        results[ties] = evaluate_hamming(q, db, ql, dbl, bits=bits, ties=ties)
        ours[ties] = time.perf_counter() - t0

    n_sub = min(args.map_baseline_queries, n_q)
    popcount = _popcount_fn()
    db_words, q_words = packed_to_words(db, bits), packed_to_words(q, bits)
    _log(f"map: per-query sort baselines on {n_sub} queries")
    ap_tuned, tuned_s = _per_query_sort_ap(lambda i: popcount(db_words ^ q_words[i]).sum(axis=1, dtype=np.uint8)
                                           if db_words.shape[1] > 1 else popcount(db_words[:, 0] ^ q_words[i, 0]),
                                           ql, dbl, n_sub)
    db_f32 = unpack_codes(db, bits).astype(np.float32)
    q_f32 = unpack_codes(q[:n_sub], bits).astype(np.float32)
    ap_pub, pub_s = _per_query_sort_ap(lambda i: 0.5 * (bits - db_f32 @ q_f32[i]), ql, dbl, n_sub)
    ref = results["index"].ap[:n_sub]
    baselines = {
        "published_style": {"description": "float32 ±1 inner product per query, np.argsort(kind='stable') of the "
                            "float distance row, AP from the sorted labels", "seconds_subset": pub_s,
                            "seconds_scaled": pub_s / n_sub * n_q,
                            "max_abs_ap_diff_vs_index_rule": float(np.max(np.abs(ap_pub - ref))),
                            "map_subset": float(ap_pub.mean())},
        "numpy_popcount": {"description": "np.bitwise_count of XORed words (uint8 distance row), "
                           "np.argsort(kind='stable') — a radix sort for uint8 — AP from the sorted labels",
                           "seconds_subset": tuned_s, "seconds_scaled": tuned_s / n_sub * n_q,
                           "max_abs_ap_diff_vs_index_rule": float(np.max(np.abs(ap_tuned - ref))),
                           "map_subset": float(ap_tuned.mean())},
    }
    ratios = {f"{b}_over_{ties}": baselines[b]["seconds_scaled"] / ours[ties] for b in baselines for ties in ours}
    return {
        "queries": n_q, "database": n_db, "bits": bits, "labels": args.map_labels,
        "seconds_ours": ours, "map": {t: results[t].map for t in results},
        "map_subset_index_rule": float(ref.mean()), "baseline_queries_timed": n_sub,
        "baselines": baselines, "ratios": ratios,
    }


# --------------------------------------------------------------------------------------------
# parts provided by other scripts


def _import_benchmark(name: str, function: str) -> Callable[..., Any] | None:
    path = HERE / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_crossret_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function, None)


def _external(script: str, function: str, call: Callable[[Callable[..., Any]], Any]) -> dict[str, Any]:
    """Run another benchmark script's measuring function; a missing or failing one is recorded, not fatal."""
    try:
        fn = _import_benchmark(script, function)
    except Exception as exc:  # someone else's script: report whatever breaks
        return {"skipped": f"benchmarks/{script}.py cannot be imported ({type(exc).__name__}: {exc})"}
    if fn is None:
        return {"skipped": f"benchmarks/{script}.py has no {function}() yet"}
    try:
        return {"result": call(fn)}
    except Exception as exc:
        return {"skipped": f"{function}() failed ({type(exc).__name__}: {exc})"}


def part_graph(args: argparse.Namespace) -> dict[str, Any]:
    return {"sizes": args.graph_sizes,
            **_external("graph_scaling", "measure_graph_scaling", lambda fn: fn(args.graph_sizes))}


def part_service(args: argparse.Namespace) -> dict[str, Any]:
    config = {"n_codes": args.service_codes, "bits": args.service_bits, "seconds": args.service_seconds,
              "concurrency": args.service_concurrency}
    return {"config": config, **_external("serve_load", "measure_service", lambda fn: fn(
        None, args.service_codes, args.service_bits, args.service_seconds, args.service_concurrency))}


# --------------------------------------------------------------------------------------------
# targets and report


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, checked against the measured ratios (1M codes for the search targets)."""
    out: list[dict[str, Any]] = []
    search = parts.get("search", {})
    one_m = [r for r in search.get("exact", []) if r["n"] == 1_000_000 and "faiss_best_over_ours" in r]
    if one_m:
        worst = min(one_m, key=lambda r: r["faiss_best_over_ours"])
        out.append({"target": ">= 2x faiss IndexBinaryFlat at its best query block and thread count (1M codes, "
                    f"bits {sorted({r['bits'] for r in one_m})}, k {sorted({r['k'] for r in one_m})})",
                    "measured": f"lowest faiss/ours {worst['faiss_best_over_ours']:.2f}x at {worst['bits']} bits, "
                    f"k={worst['k']}", "met": worst["faiss_best_over_ours"] >= 2})
        floor_rows = [r for r in one_m if "ours_over_floor" in r]
        if floor_rows:
            high = max(floor_rows, key=lambda r: r["ours_over_floor"])
            out.append({"target": "64-bit search <= 1.3x the cache-resident XOR + popcount floor (1M codes)",
                        "measured": ", ".join(f"k={r['k']}: {r['ours_over_floor']:.2f}x" for r in floor_rows),
                        "met": high["ours_over_floor"] <= 1.3})
        slow = min(one_m, key=lambda r: r["numpy_over_ours"])
        out.append({"target": ">= 10x numpy popcount (1M codes, every bit length)",
                    "measured": f"lowest numpy/ours {slow['numpy_over_ours']:.1f}x at {slow['bits']} bits",
                    "met": slow["numpy_over_ours"] >= 10})
    single = search.get("single_query", [])
    if single:
        low = min(single, key=lambda r: r["previous_over_ours"])
        out.append({"target": "the one- and ten-query path no slower than the previous kernel",
                    "measured": f"lowest previous/ours {low['previous_over_ours']:.2f}x ({low['queries']} "
                    f"quer{'y' if low['queries'] == 1 else 'ies'}, {low['bits']} bits)",
                    "met": low["previous_over_ours"] >= 1.0})
    m = parts.get("map", {})
    if "ratios" in m:
        for ties in ("expected", "index"):
            for base in ("published_style", "numpy_popcount"):
                ratio = m["ratios"][f"{base}_over_{ties}"]
                out.append({"target": f"MAP ({ties} ties) >= 20x per-query sort ({base.replace('_', ' ')}), "
                            f"{m['queries']:,} x {m['database']:,}", "measured": f"{ratio:.1f}x", "met": ratio >= 20})
    return out


def _load_note(rows: list[dict[str, Any]]) -> str:
    """Whether the machine was quiet: every 1-minute load average before and after a measurement below
    half the usable CPUs (plus the measuring threads themselves)."""
    loads = [v[0] for r in rows for v in (r.get("load_before"), r.get("load_after")) if v]
    if not loads:
        return "Machine load not recorded."
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quiet = max(loads) <= usable + 0.5
    return (f"1-minute load average {min(loads):.2f}–{max(loads):.2f} across the measurements: "
            + ("a quiet machine (only the measuring threads)." if quiet else
               "**a loaded machine** (other jobs shared the cores; ratios under load differ from quiet ones)."))


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    parts = report["parts"]
    lines = ["# Retrieval at scale", "",
             "Written by `benchmarks/scale.py`; every ratio compares timings taken in the same run (best of the "
             "interleaved repeats). The machine is shared with other jobs, so absolute times carry contention.", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    lines.append("")
    s = parts.get("search")
    if s and "single_query" in s:
        h = s["host"]
        identical = ("identical to" if all(r.get("identical_to_previous_kernel") is not False for r in s["exact"])
                     else "NOT identical in every row (see the JSON) to")
        lines += ["## Exact Hamming search", "",
                  f"Random codes. {h['cpus_usable']} usable CPUs; ours on {h['numba_threads']} threads, faiss "
                  f"{h['faiss']} at its best query block size and OpenMP thread count for each case (chosen on "
                  f"the first queries from {', '.join(f'{b}x{t}' for b, t in _faiss_settings())} = block x "
                  f"threads) and at its defaults (32-query blocks, {h['faiss_threads']} threads); numpy "
                  f"{h['numpy']} single-threaded; Python {h['python']}. Part took {s['seconds']:.0f} s. "
                  f"{_load_note(s['exact'] + s['single_query'])}", "",
                  "| items | bits | k | queries | ours s | ns / pair | faiss best s (block x threads) "
                  "| faiss best / ours | faiss default / ours | previous kernel / ours | numpy / ours "
                  "| ours / floor | load before → after |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in s["exact"]:
            setting = r["faiss_best_setting"]
            previous = f"{r['previous_over_ours']:.2f}x" if "previous_over_ours" in r else "—"
            floor = f"{r['ours_over_floor']:.2f}x" if "ours_over_floor" in r else "—"
            lines.append(
                f"| {r['n']:,} | {r['bits']} | {r['k']} | {r['queries']:,} | {r['seconds']['ours']:.3f} | "
                f"{r['ns_per_pair_ours']:.3f} | {r['seconds']['faiss_best']:.3f} ({setting['query_batch_size']} x "
                f"{setting['threads']}) | {r['faiss_best_over_ours']:.2f}x | {r['faiss_default_over_ours']:.2f}x | "
                f"{previous} | {r['numpy_over_ours']:.1f}x | {floor} | {r['load_before'][0]} → "
                f"{r['load_after'][0]} |")
        lines += ["", "Times are wall seconds, best of the interleaved repeats. ns / pair = ours' time per (query, "
                  "item). Ours (kind `flat`) is crossret's query-blocked kernel (`hamming_topk`: blocks of up to 64 "
                  "queries share each pass over a cache-sized database tile; a store-free 512-bit XOR + "
                  "popcount + running-minimum test for any distance below the query's bound, per 256 items (per "
                  "64-item quarter from k = 64 on), and in a quarter with a hit a bit mask of the items below the "
                  "bound, whose items alone are offered; the bound starts from a strided sample of the database; "
                  "exact top k by a bounded candidate buffer, cut back to the top k every few offers at small k). "
                  "previous kernel = "
                  f"`hamming_topk` as of commit {s['baseline_commit']}, timed in the same run; its ids and distances "
                  f"are {identical} ours"
                  ". floor = every query XOR + popcounting a 128 KiB cache-resident tile of 64-bit codes, starting "
                  "on a cache line, as many times as the database has items, on ours' threads and vector width (no "
                  "memory traffic, no selection). numpy = "
                  "`np.bitwise_count` of XORed 64-bit words + `argpartition`, one query at a time, timed on "
                  f"{s['exact'][0]['numpy_queries_timed'] if s['exact'] else 0} queries and scaled.", ""]
        if s["single_query"]:
            lines += [f"Few queries (k = 10; the database is split across the threads; best of {SINGLE_QUERY_REPEAT} "
                      "interleaved rounds):", "",
                      "| items | bits | queries | ours ms | previous kernel ms | faiss best ms | previous / ours "
                      "| faiss best / ours | load before → after |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for r in s["single_query"]:
                t = r["seconds"]
                lines.append(f"| {r['n']:,} | {r['bits']} | {r['queries']} | {1e3 * t['ours']:.2f} | "
                             f"{1e3 * t['previous_kernel']:.2f} | {1e3 * t['faiss_best']:.2f} | "
                             f"{r['previous_over_ours']:.2f}x | {r['faiss_best_over_ours']:.2f}x | "
                             f"{r['load_before'][0]} → {r['load_after'][0]} |")
            lines.append("")
    a = parts.get("ann")
    if a:
        lines += [f"## Approximate indexes: recall@{a['k']} vs queries/s", "",
                  f"{a['n']:,} clustered {a['bits']}-bit codes ({a['clusters']} centres, each bit flipped with "
                  f"probability {a['flip']}), {a['queries']} queries from the same distribution. Recall counts an "
                  f"item as close as the exact {a['k']}-th neighbour as a hit. Every index (flat included) timed "
                  f"with {a['faiss_threads']} faiss thread(s); build times with the default threads. Part took "
                  f"{a['seconds']:.0f} s.", "",
                  "| kind | parameters | setting | build s | queries/s | speed-up vs flat | recall@k |",
                  "|---|---|---|---:|---:|---:|---:|"]
        recall_key = f"recall_at_{a['k']}"
        for r in a["rows"]:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            lines.append(f"| {r['kind']} | {params} | {r['setting']} | {r['build_seconds']:.1f} | "
                         f"{_fmt(r['queries_per_second'], 0)} | {r['speedup_vs_flat']:.1f}x | "
                         f"{r[recall_key]:.4f} |")
        lines.append("")
    m = parts.get("map")
    if m:
        lines += ["## MAP evaluation", "",
                  f"{m['queries']:,} queries x {m['database']:,} items, {m['bits']}-bit random codes, {m['labels']} "
                  f"labels, MAP@all. Part took {m['seconds']:.0f} s.", "",
                  "| implementation | seconds | ratio to ours (expected / index) |", "|---|---:|---:|"]
        for ties in ("expected", "index"):
            lines.append(f"| `evaluate_hamming(ties=\"{ties}\")` | {m['seconds_ours'][ties]:.1f} | — |")
        for name, b in m["baselines"].items():
            lines.append(f"| per-query sort, {name.replace('_', ' ')} (scaled from {m['baseline_queries_timed']} "
                         f"queries) | {b['seconds_scaled']:.0f} | {m['ratios'][f'{name}_over_expected']:.1f}x / "
                         f"{m['ratios'][f'{name}_over_index']:.1f}x |")
        lines += ["", *(f"* {name.replace('_', ' ')}: {b['description']}; max |AP − AP(index rule)| on the subset "
                        f"{b['max_abs_ap_diff_vs_index_rule']:.1e} (MAP {b['map_subset']:.6f} vs "
                        f"{m['map_subset_index_rule']:.6f})." for name, b in m["baselines"].items()),
                  f"* MAP@all: expected {m['map']['expected']:.6f}, index {m['map']['index']:.6f}.", ""]
    for name, title in (("graph", "Graph scaling"), ("service", "Service load")):
        p = parts.get(name)
        if p:
            lines += [f"## {title}", ""]
            if "skipped" in p:
                lines += [f"Skipped: {p['skipped']}.", ""]
                continue
            result = p["result"]
            rows = result.get("rows") if isinstance(result, dict) else None
            if rows:
                # scalar columns only (nested values, e.g. per-search recall, stay in the JSON)
                keys = [k for k, v in rows[0].items() if not isinstance(v, (dict, list))][:14]
                lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(str(r.get(k)) for k in keys) + " |" for r in rows]
                lines.append("")
            rest = {k: v for k, v in (result.items() if isinstance(result, dict) else []) if k != "rows"}
            scalars = {k: v for k, v in rest.items() if not isinstance(v, (dict, list))}
            nested = {k: v for k, v in rest.items() if k not in scalars}
            if scalars:
                lines += ["| quantity | value |", "|---|---:|"]
                lines += [f"| {k} | {_fmt(v, 3) if isinstance(v, float) else v} |" for k, v in scalars.items()]
                lines.append("")
            if nested:
                lines += ["```json", json.dumps(nested, default=str)[:3000], "```", ""]
    lines.append(f"Total time of the last invocation: {report['seconds_last_run']:.0f} s (parts: "
                 f"{', '.join(report['parts_last_run'])}).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--bits", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 1000], help="k of the exact search part")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--faiss-tune-queries", type=int, default=1000,
                        help="queries on which faiss' best query block size and thread count are chosen")
    parser.add_argument("--baseline-commit", default=None,
                        help="commit whose Hamming kernel is timed beside today's ('none' to skip; default: the "
                        "last commit before the sampled starting bound of the search scan)")
    parser.add_argument("--queries-large", type=int, default=100, help="queries at sizes above 2M")
    parser.add_argument("--numpy-queries", type=int, default=50)
    parser.add_argument("--numpy-queries-large", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--repeat-large", type=int, default=3)
    parser.add_argument("--ann-size", type=int, default=1_000_000)
    parser.add_argument("--ann-clusters", type=int, default=1000)
    parser.add_argument("--ann-flip", type=float, default=0.1)
    parser.add_argument("--ann-nlist", type=int, default=1024)
    parser.add_argument("--ann-threads", type=int, default=1, help="faiss threads while timing the ann part")
    parser.add_argument("--map-queries", type=int, default=10_000)
    parser.add_argument("--map-database", type=int, default=1_000_000)
    parser.add_argument("--map-labels", type=int, default=100)
    parser.add_argument("--map-baseline-queries", type=int, default=50)
    parser.add_argument("--graph-sizes", type=int, nargs="+", default=[10_000, 20_000, 50_000, 100_000])
    parser.add_argument("--service-codes", type=int, default=1_000_000)
    parser.add_argument("--service-bits", type=int, default=64)
    parser.add_argument("--service-seconds", type=float, default=10.0)
    parser.add_argument("--service-concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes; writes results/scale_quick.*")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.baseline_commit is None:
        import _previous

        args.baseline_commit = _previous.BEFORE_FREQUENT_CUTS
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.sizes, args.queries, args.queries_large, args.numpy_queries = [100_000], 100, 50, 20
        args.faiss_tune_queries = 50
        args.repeat, args.ann_size, args.ann_nlist, args.ann_clusters = 2, 50_000, 128, 200
        args.map_queries, args.map_database, args.map_baseline_queries = 1_000, 100_000, 20
        args.graph_sizes, args.service_codes, args.service_seconds = [2_000, 4_000], 50_000, 2.0

    from crossret.storage.atomic import write_json_atomic, write_text_atomic

    stem = "scale_quick" if args.quick else "scale"
    json_path = args.out_dir / f"{stem}.json"
    report: dict[str, Any] = {"benchmark": "scale", "parts": {}}
    if json_path.is_file():  # keep the results of parts not run this time
        try:
            report = json.loads(json_path.read_text(encoding="utf-8"))
        except ValueError:
            pass
    runners = {"search": part_search, "ann": part_ann, "map": part_map, "graph": part_graph,
               "service": part_service}
    report["parts"].get("search", {}).pop("approximate", None)  # older layout: now its own part
    start = time.perf_counter()
    for name in parts:
        host = host_info()
        t0 = time.perf_counter()
        result = runners[name](args)
        if "skipped" in result:
            _log(f"{name}: skipped — {result['skipped']}")
        result.update(host=host, seconds=time.perf_counter() - t0,
                      created=time.strftime("%Y-%m-%d %H:%M:%S"), quick=bool(args.quick))
        report["parts"][name] = result
        report["targets"] = targets(report["parts"])
        report["seconds_last_run"], report["parts_last_run"] = time.perf_counter() - start, parts
        # Written after every part so that a long run that is interrupted keeps what it measured.
        write_json_atomic(json_path, report)
        write_text_atomic(args.out_dir / f"{stem}.md", markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
