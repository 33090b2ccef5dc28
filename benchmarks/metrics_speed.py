"""Speed of the Hamming-ranking metrics (``crossret.retrieval.metrics.evaluate_hamming``).

Random ``--bits``-bit codes, ``--queries`` x ``--database`` items, ``--labels`` classes. Measures:

* the JIT compile time of the numba kernels (a cold, private numba cache directory by default);
* ``evaluate_hamming`` with ``ties="expected"`` and ``ties="index"`` (after a warm-up call, best of
  ``--repeat`` runs), with ``topk`` and the default precision@N list;
* the per-query sort implementation most published hashing code uses (±1 inner product in numpy,
  stable argsort, cumulative sum -> AP), timed on ``--baseline-queries`` queries and extrapolated
  per query to the full query set; its per-query AP is checked against the ``index`` run;
* peak RSS (``resource.getrusage``) after each stage: the metrics keep only ``Q x 2 (L + 1)`` counts
  and one database chunk, so memory stays far below a ``Q x N`` matrix.

Writes ``benchmarks/results/metrics_speed.json`` and ``.md`` (``metrics_speed_quick.*`` with
``--quick``)::

    python benchmarks/metrics_speed.py            # 10k x 1M, 64 bits (~1 min)
    python benchmarks/metrics_speed.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 1024


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _published_style_ap(q_pm1: Any, db_pm1_f32: Any, q_labels: Any, db_labels: Any, bits: int) -> Any:
    """Per-query AP the way most published code computes it (full distance row + sort)."""
    import numpy as np

    aps = np.zeros(q_pm1.shape[0])
    for i in range(q_pm1.shape[0]):
        hamm = 0.5 * (bits - db_pm1_f32 @ q_pm1[i].astype(np.float32))
        order = np.argsort(hamm, kind="stable")
        gnd = db_labels[order] == q_labels[i]
        n_rel = int(gnd.sum())
        if n_rel == 0:
            continue
        ranks = np.flatnonzero(gnd) + 1.0
        aps[i] = float(np.mean(np.arange(1, n_rel + 1) / ranks))
    return aps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=None, help="database rows per chunk")
    parser.add_argument("--baseline-queries", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per tie rule (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run: 500 x 50,000")
    parser.add_argument("--use-numba-cache", action="store_true",
                        help="use the package's numba cache (compile time then means cache load)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.database, args.baseline_queries = 500, 50_000, 20

    if not args.use_numba_cache:
        # Must happen before numba is imported, so that the compile time is a real cold compile.
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="crossret-numba-")

    import numba
    import numpy as np

    from crossret._io import write_json_atomic, write_text_atomic
    from crossret.retrieval.metrics import DEFAULT_CHUNK_SIZE, evaluate_hamming
    from crossret.retrieval.packing import pack_codes, unpack_codes

    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    n_q, n_db, bits = args.queries, args.database, args.bits
    load_start = _load()
    rss = {"start": _peak_rss_mib()}

    rng = np.random.default_rng(args.seed)
    q_packed = pack_codes(rng.integers(0, 2, (n_q, bits), dtype=np.int8))
    db_packed = np.empty((n_db, (bits + 7) // 8), dtype=np.uint8)
    for start in range(0, n_db, 1 << 18):  # generate in slices: never an N x L int8 matrix
        stop = min(start + (1 << 18), n_db)
        db_packed[start:stop] = pack_codes(rng.integers(0, 2, (stop - start, bits), dtype=np.int8))
    q_labels = rng.integers(0, args.labels, n_q)
    db_labels = rng.integers(0, args.labels, n_db)
    rss["after_data"] = _peak_rss_mib()

    # Compile (cold numba cache) on a tiny problem, then time the real runs.
    compile_seconds = {}
    for ties in ("expected", "index"):
        t0 = time.perf_counter()
        evaluate_hamming(q_packed[:3], db_packed[:50], q_labels[:3], db_labels[:50], bits=bits,
                         ties=ties, topk=5)
        compile_seconds[ties] = time.perf_counter() - t0
    rss["after_compile"] = _peak_rss_mib()

    kwargs = {"bits": bits, "topk": args.topk, "chunk_size": chunk_size}
    timings: dict[str, list[float]] = {}
    cpu_timings: dict[str, list[float]] = {}
    results = {}
    for ties in ("expected", "index"):
        timings[ties], cpu_timings[ties] = [], []
        for _ in range(max(1, args.repeat)):
            t0, c0 = time.perf_counter(), time.process_time()
            results[ties] = evaluate_hamming(q_packed, db_packed, q_labels, db_labels, ties=ties, **kwargs)
            timings[ties].append(time.perf_counter() - t0)
            # CPU seconds of all threads: cpu / wall ~ the number of cores we actually got.
            cpu_timings[ties].append(time.process_time() - c0)
        rss[f"after_{ties}"] = _peak_rss_mib()

    # Published-style baseline on a subset, extrapolated per query.
    n_base = min(args.baseline_queries, n_q)
    db_f32 = unpack_codes(db_packed, bits).astype(np.float32)
    q_pm1 = unpack_codes(q_packed[:n_base], bits)
    t0 = time.perf_counter()
    base_ap = _published_style_ap(q_pm1, db_f32, q_labels[:n_base], db_labels, bits)
    base_seconds = time.perf_counter() - t0
    del db_f32
    rss["after_baseline"] = _peak_rss_mib()
    base_per_query = base_seconds / n_base
    base_extrapolated = base_per_query * n_q
    ap_diff = float(np.max(np.abs(base_ap - results["index"].ap[:n_base])))
    map_subset_ours = float(results["index"].ap[:n_base].mean())
    map_subset_base = float(base_ap.mean())

    best = {ties: min(times) for ties, times in timings.items()}
    pairs = n_q * n_db
    report: dict[str, Any] = {
        "benchmark": "metrics_speed",
        "config": {
            "queries": n_q, "database": n_db, "bits": bits, "labels": args.labels, "topk": args.topk,
            "chunk_size": chunk_size, "baseline_queries": n_base, "repeat": args.repeat, "seed": args.seed,
            "quick": bool(args.quick), "cold_numba_cache": not args.use_numba_cache,
        },
        "machine": {
            "cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "load_average_start": load_start, "load_average_end": _load(),
        },
        "compile_seconds": compile_seconds,
        "evaluate_hamming_seconds": {
            ties: {"best": best[ties], "all": timings[ties], "cpu_seconds_all_threads": cpu_timings[ties],
                   "ns_per_pair": best[ties] / pairs * 1e9,
                   "cpu_ns_per_pair": min(cpu_timings[ties]) / pairs * 1e9,
                   "cores_used": min(cpu_timings[ties]) / best[ties]}
            for ties in timings
        },
        "baseline": {
            "description": "per query: float32 ±1 inner product (numpy), stable argsort, cumsum -> AP",
            "queries_timed": n_base, "seconds": base_seconds, "seconds_per_query": base_per_query,
            "extrapolated_seconds_full": base_extrapolated,
        },
        "speedup_vs_baseline": {ties: base_extrapolated / best[ties] for ties in best},
        "agreement": {
            "max_abs_ap_difference_index_vs_baseline": ap_diff,
            "map_subset_index": map_subset_ours, "map_subset_baseline": map_subset_base,
        },
        "map": {ties: results[ties].map for ties in results},
        "map_at_k": {ties: results[ties].map_at_k for ties in results},
        "peak_rss_mib": rss,
        "state_mib": {
            "histograms": n_q * 2 * (bits + 1) * 8 / 2**20,
            "one_chunk_words": min(chunk_size, n_db) * -(-bits // 64) * 8 / 2**20,
            "q_by_n_float64_matrix_avoided": pairs * 8 / 2**20,
        },
    }

    stem = "metrics_speed_quick" if args.quick else "metrics_speed"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / f"{stem}.json", report)
    write_text_atomic(args.out_dir / f"{stem}.md", _markdown(report))
    print(_markdown(report))
    return report


def _markdown(r: dict[str, Any]) -> str:
    c, m = r["config"], r["machine"]
    ev = r["evaluate_hamming_seconds"]
    rows = [
        "| implementation | wall s (full Q) | wall ns / (query, item) | CPU ns / pair | cores used "
        "| speed-up vs baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for ties in ("expected", "index"):
        rows.append(f"| `evaluate_hamming(ties=\"{ties}\")` | {ev[ties]['best']:.2f} | "
                    f"{ev[ties]['ns_per_pair']:.2f} | {ev[ties]['cpu_ns_per_pair']:.2f} | "
                    f"{ev[ties]['cores_used']:.2f} | {r['speedup_vs_baseline'][ties]:.0f}x |")
    b = r["baseline"]
    rows.append(f"| per-query sort baseline (extrapolated from {b['queries_timed']} queries) | "
                f"{b['extrapolated_seconds_full']:.0f} | "
                f"{b['seconds_per_query'] / c['database'] * 1e9:.2f} | | | 1x |")
    rss = r["peak_rss_mib"]
    lines = [
        "# Hamming-ranking metrics speed",
        "",
        f"{c['queries']:,} queries x {c['database']:,} database items, {c['bits']}-bit random codes, "
        f"{c['labels']} labels, topk={c['topk']}, chunk {c['chunk_size']:,} rows. "
        f"Machine: {m['cpu_count']} CPUs ({m['numba_threads']} numba threads), numpy {m['numpy']}, "
        f"numba {m['numba']}, Python {m['python']}; load average {m['load_average_start']} at start, "
        f"{m['load_average_end']} at the end (the machine is shared: timings include contention).",
        "",
        *rows,
        "",
        f"JIT compile (cold cache, first call): expected {r['compile_seconds']['expected']:.1f} s, "
        f"index {r['compile_seconds']['index']:.1f} s (index reuses the pass-1 kernel).",
        "",
        f"Agreement on the timed subset: max |AP(index) - AP(baseline)| = "
        f"{r['agreement']['max_abs_ap_difference_index_vs_baseline']:.2e}; MAP "
        f"{r['agreement']['map_subset_index']:.6f} vs {r['agreement']['map_subset_baseline']:.6f}.",
        "",
        f"MAP@all: expected {r['map']['expected']:.6f}, index {r['map']['index']:.6f}; "
        f"MAP@{c['topk']}: expected {r['map_at_k']['expected']:.6f}, index {r['map_at_k']['index']:.6f}.",
        "",
        f"Peak RSS (MiB): at start (interpreter + imports) {rss['start']:.0f}, "
        f"after data {rss['after_data']:.0f}, after JIT compile {rss['after_compile']:.0f}, "
        f"after expected {rss['after_expected']:.0f}, "
        f"after index {rss['after_index']:.0f} (the baseline, run last, reaches {rss['after_baseline']:.0f}). "
        f"Metric state: {r['state_mib']['histograms']:.1f} MiB of histograms + "
        f"{r['state_mib']['one_chunk_words']:.1f} MiB per chunk, versus "
        f"{r['state_mib']['q_by_n_float64_matrix_avoided']:,.0f} MiB for a Q x N float64 matrix.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
