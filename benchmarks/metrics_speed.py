"""Speed of the Hamming-ranking metrics (``crossret.retrieval.metrics.evaluate_hamming``).

Random ``--bits``-bit codes, ``--queries`` x ``--database`` items, ``--labels`` classes. Everything is
measured in one process, on one machine, in one run, so that the ratios compare like with like:

* the JIT compile time of the numba kernels (a cold, private numba cache directory by default);
* ``evaluate_hamming`` with ``ties="expected"`` and ``ties="index"`` (``topk`` and the default
  precision@N list) on today's kernels (query-blocked tiles, ``nogil`` kernels on Python threads) and
  on the previous kernels: those of ``--baseline-commit`` (default: the last commit before the sampled
  starting bound of the search scan; ``none`` skips them), loaded with ``benchmarks/_previous.py`` and swapped into
  ``crossret.retrieval.metrics`` for their runs. Both are compiled and warmed first; the timed runs
  are interleaved (new expected, previous expected, new index, previous index; ``--repeat`` rounds),
  best and median kept. The previous kernels' results must be identical to today's;
* two per-query sort baselines (numpy, one query at a time; BLAS may thread the matrix-vector
  product), timed on ``--baseline-queries`` queries and scaled per query to the full query set, each
  with its per-query AP checked against the ``index`` run:

  - "numpy popcount": ``np.bitwise_count`` of the XORed uint64 words, summed over words into a
    uint8 (uint16 above 255 bits) distance row, ``np.argsort(kind="stable")`` (a radix sort for
    uint8), AP from the sorted labels -- the straightforward fast numpy implementation;
  - "published style": float32 ±1 inner product, stable argsort of the float distances, AP -- what
    most published hashing code does;

* the 1-minute load average before and after every timed stage, and the share of the usable CPUs
  other processes took during it (``/proc/stat``), so that the result says whether the machine was
  quiet; the numba thread count and threading layer, versions, CPU model, usable cores;
* peak RSS (``resource.getrusage``) after each stage: the metrics keep only ``Q x 2 (L + 1)`` counts
  and one database chunk, so memory stays far below a ``Q x N`` matrix.

Writes ``benchmarks/results/metrics_speed.json`` and ``.md`` (``metrics_speed_quick.*`` with
``--quick``)::

    python benchmarks/metrics_speed.py            # 10k x 1M, 64 bits (a few minutes)
    python benchmarks/metrics_speed.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# The target: MAP (both tie rules) at least this many times faster than the numpy popcount
# baseline, at TARGET_SIZE (queries, database items).
TARGET_RATIO = 20.0
TARGET_SIZE = (10_000, 1_000_000)
TARGET_TEXT = "MAP >= 20x the numpy popcount + stable argsort baseline at 10k x 1M (both tie rules)"
# "Quiet": the 1-minute load average below this many runnable tasks per usable core, before and after
# every timed stage.
QUIET_LOAD_PER_CORE = 0.5
QUIET_OTHER_SHARE = 0.05  # quiet: other processes took at most this share of the CPUs in every stage
TIES = ("expected", "index")


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 1024


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on every platform
        return set(range(os.cpu_count() or 1))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not on every platform
        pass
    return platform.processor() or platform.machine()


def _busy_cpu_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent busy (everything but idle and iowait; steal included) on ``cpus``, from
    ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:  # pragma: no cover - not on every platform
        return None
    busy, found = 0, 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            if int(name[3:]) not in cpus:
                continue
            v = [int(x) for x in fields]
        except ValueError:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already in user)
        busy += v[0] + v[1] + v[2] + sum(v[5:8])
        found += 1
    return busy / os.sysconf("SC_CLK_TCK") if found else None


class _Stages:
    """Timed stages with the load around each: 1-minute load average before and after, and the share
    of the usable CPUs that other processes (and the hypervisor: steal) took during the stage."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus
        self.records: list[dict[str, Any]] = []

    @contextmanager
    def timed(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"stage": name, "load_before": _load()}
        busy0 = _busy_cpu_seconds(self.cpus)
        t0, c0 = time.perf_counter(), time.process_time()
        yield record
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        busy1 = _busy_cpu_seconds(self.cpus)
        others = None
        if busy0 is not None and busy1 is not None and wall > 0:
            others = min(1.0, max(0.0, (busy1 - busy0 - cpu) / (wall * len(self.cpus))))
        # CPU seconds of all threads: cpu / wall ~ the number of cores we actually got.
        record.update(wall_seconds=wall, cpu_seconds=cpu, load_after=_load(), other_processes_cpu_share=others)
        self.records.append(record)


@contextmanager
def _kernels(metrics_module: ModuleType, module: ModuleType | None) -> Iterator[None]:
    """Run ``evaluate_hamming`` on the kernels of ``module`` (None: today's) inside the block."""
    if module is None:
        yield
        return
    current, budget = metrics_module.hamming, getattr(metrics_module, "_INDEX_RECORD_BUDGET", None)
    metrics_module.hamming = module
    if budget is not None and not callable(getattr(module, "index_records_walk", None)):
        # Kernels that predate the one-pass index rule are timed on the two-pass route they had; later ones
        # take the same route as today's (forcing it on them doubled their time and made the ratio a lie).
        metrics_module._INDEX_RECORD_BUDGET = 0
    try:
        yield
    finally:
        metrics_module.hamming = current
        if budget is not None:
            metrics_module._INDEX_RECORD_BUDGET = budget


def _popcount_fn() -> Callable[[Any], Any]:
    """numpy popcount of uint64 words: ``np.bitwise_count`` (numpy >= 2) or a byte lookup table."""
    import numpy as np

    if hasattr(np, "bitwise_count"):
        return np.bitwise_count
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)

    def lut(words: Any) -> Any:
        return table[words.view(np.uint8)].reshape(*words.shape, 8).sum(-1, dtype=np.uint8)

    return lut


def _popcount_rows(db_packed: Any, q_packed: Any, bits: int) -> Callable[[int], Any]:
    """Query ``i`` -> its Hamming distance row by numpy popcount of the XORed uint64 words (uint8,
    uint16 above 255 bits)."""
    import numpy as np

    from crossret.retrieval.packing import packed_to_words

    popcount = _popcount_fn()
    db_words, q_words = packed_to_words(db_packed, bits), packed_to_words(q_packed, bits)
    if db_words.shape[1] == 1:  # one word: the popcount row is the distance row
        db_col, q_col = np.ascontiguousarray(db_words[:, 0]), q_words[:, 0]
        return lambda i: popcount(db_col ^ q_col[i])
    dist_dtype = np.uint8 if bits <= 255 else np.uint16
    return lambda i: popcount(db_words ^ q_words[i]).sum(axis=1, dtype=dist_dtype)


def _published_rows(db_packed: Any, q_packed: Any, bits: int) -> Callable[[int], Any]:
    """Query ``i`` -> its Hamming distance row as published code computes it: ``(L - <q, x>) / 2`` of
    float32 ±1 codes."""
    import numpy as np

    from crossret.retrieval.packing import unpack_codes

    db_f32 = unpack_codes(db_packed, bits).astype(np.float32)
    q_f32 = unpack_codes(q_packed, bits).astype(np.float32)
    return lambda i: 0.5 * (bits - db_f32 @ q_f32[i])


def _per_query_sort_ap(dist_row: Callable[[int], Any], q_labels: Any, db_labels: Any, n: int) -> Any:
    """AP of the first ``n`` queries by a stable sort of each full distance row (ties in database order,
    as the ``index`` tie rule)."""
    import numpy as np

    aps = np.zeros(n)
    for i in range(n):
        order = np.argsort(dist_row(i), kind="stable")
        hits = np.flatnonzero(db_labels[order] == q_labels[i]) + 1.0
        if hits.size:
            aps[i] = float(np.mean(np.arange(1, hits.size + 1) / hits))
    return aps


def _summary(walls: list[float], cpus: list[float], pairs: int) -> dict[str, Any]:
    best = min(walls)
    return {"best": best, "median": statistics.median(walls), "all": walls, "cpu_seconds_all_threads": cpus,
            "ns_per_pair": best / pairs * 1e9, "cpu_ns_per_pair": min(cpus) / pairs * 1e9,
            "cores_used": min(cpus) / best}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=None, help="database rows per chunk")
    parser.add_argument("--baseline-queries", type=int, default=50,
                        help="queries on which the per-query sort baselines are timed")
    parser.add_argument("--baseline-commit", default=None,
                        help="commit whose Hamming kernels are timed beside today's ('none' to skip; default: "
                        "the last commit before the sampled starting bound of the search scan)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="interleaved timed rounds per (kernels, tie rule); best and median are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small run: 500 x 50,000")
    parser.add_argument("--use-numba-cache", action="store_true",
                        help="use the package's numba cache (compile time then means cache load)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.database, args.baseline_queries = 500, 50_000, 20
    args.repeat = max(1, args.repeat)

    if not args.use_numba_cache:
        # Must happen before numba is imported, so that the compile time is a real cold compile.
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="crossret-numba-")

    import numba
    import numpy as np

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    import _previous
    import crossret.retrieval.metrics as metrics_module
    from crossret.retrieval.metrics import DEFAULT_CHUNK_SIZE, evaluate_hamming
    from crossret.retrieval.packing import pack_codes
    from crossret.storage.atomic import write_json_atomic, write_text_atomic

    if args.baseline_commit is None:
        args.baseline_commit = _previous.BEFORE_FREQUENT_CUTS
    previous: ModuleType | None = None
    previous_problem = None
    if args.baseline_commit != "none":
        try:
            previous = _previous.load_module_at(args.baseline_commit, "crossret/retrieval/hamming.py",
                                                "_previous_hamming")
        except Exception as exc:  # an old module that no longer imports against today's package
            print(f"previous kernels failed to import: {exc!r}", file=sys.stderr)
            previous_problem = f"import failed: {exc!r}"
        if previous is None and previous_problem is None:
            previous_problem = "git or the commit is unavailable (see stderr)"
        if previous is not None:
            missing = [f for f in ("distance_histograms", "index_rank_pass", "expected_rank_metrics")
                       if not callable(getattr(previous, f, None))]
            if missing:
                previous_problem = f"the previous module lacks {', '.join(missing)}"
                previous = None
    impls: dict[str, ModuleType | None] = {"new": None}
    if previous is not None:
        impls["previous"] = previous

    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    n_q, n_db, bits = args.queries, args.database, args.bits
    cpus = _usable_cpus()
    stages = _Stages(cpus)
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

    # Compile (cold numba cache) on a tiny problem, then warm up on a problem big enough to run on
    # every thread (thread pools started, caches touched), for each kernel set alike.
    compile_seconds: dict[str, dict[str, float]] = {}
    n_warm_q, n_warm_db = min(n_q, 64), min(n_db, 1 << 16)
    for impl, module in impls.items():
        compile_seconds[impl] = {}
        with _kernels(metrics_module, module):
            for ties in TIES:
                t0 = time.perf_counter()
                evaluate_hamming(q_packed[:3], db_packed[:50], q_labels[:3], db_labels[:50], bits=bits,
                                 ties=ties, topk=5)
                compile_seconds[impl][ties] = time.perf_counter() - t0
            for ties in TIES:
                evaluate_hamming(q_packed[:n_warm_q], db_packed[:n_warm_db], q_labels[:n_warm_q],
                                 db_labels[:n_warm_db], bits=bits, ties=ties, topk=args.topk, chunk_size=chunk_size)
    rss["after_compile"] = _peak_rss_mib()

    # Interleaved timed runs: new expected, previous expected, new index, previous index; repeated.
    kwargs = {"bits": bits, "topk": args.topk, "chunk_size": chunk_size}
    walls: dict[str, dict[str, list[float]]] = {impl: {t: [] for t in TIES} for impl in impls}
    cpu_s: dict[str, dict[str, list[float]]] = {impl: {t: [] for t in TIES} for impl in impls}
    results: dict[str, dict[str, Any]] = {impl: {} for impl in impls}
    for round_ in range(args.repeat):
        for ties in TIES:
            for impl, module in impls.items():
                with _kernels(metrics_module, module), stages.timed(f"{impl} {ties} (round {round_ + 1})") as rec:
                    results[impl][ties] = evaluate_hamming(q_packed, db_packed, q_labels, db_labels, ties=ties,
                                                           **kwargs)
                walls[impl][ties].append(rec["wall_seconds"])
                cpu_s[impl][ties].append(rec["cpu_seconds"])
    rss["after_kernels"] = _peak_rss_mib()
    try:
        # Set once numba's thread pool is started (a prange kernel, or numba.get_num_threads()).
        threading_layer = numba.threading_layer()
    except ValueError:
        threading_layer = "n/a"

    pairs = n_q * n_db
    timings = {impl: {t: _summary(walls[impl][t], cpu_s[impl][t], pairs) for t in TIES} for impl in impls}

    same_as_previous = None
    if previous is not None:
        same_as_previous = {}
        for ties in TIES:
            new, old = results["new"][ties], results["previous"][ties]
            same_as_previous[ties] = {
                "ap_identical": bool(np.array_equal(new.ap, old.ap)),
                "map_identical": bool(new.map == old.map),
                "ap_at_k_identical": bool(np.array_equal(new.ap_at_k, old.ap_at_k)),
                "precision_at_identical": bool(new.precision_at == old.precision_at),
                "max_abs_ap_difference": float(np.max(np.abs(new.ap - old.ap))),
            }

    # Per-query sort baselines on a subset, scaled per query to the full query set.
    n_base = min(args.baseline_queries, n_q)
    ref_ap = results["new"]["index"].ap[:n_base]
    dist_dtype = np.uint8 if bits <= 255 else np.uint16
    baselines: dict[str, dict[str, Any]] = {}
    for name, make_rows, description in (
        ("numpy_popcount", _popcount_rows,
         "per query: np.bitwise_count of the XORed uint64 words, summed into a "
         f"{np.dtype(dist_dtype).name} distance row, np.argsort(kind='stable') (a radix sort for uint8), AP "
         "from the sorted labels"),
        ("published_style", _published_rows,
         "per query: float32 ±1 inner product (numpy), np.argsort(kind='stable') of the float distance row, "
         "AP from the sorted labels (what most published hashing code does)"),
    ):
        dist_row = make_rows(db_packed, q_packed[:n_base], bits)  # the database in the baseline's layout
        with stages.timed(f"{name.replace('_', ' ')} baseline") as rec:
            base_ap = _per_query_sort_ap(dist_row, q_labels, db_labels, n_base)
        del dist_row  # frees the baseline's copy of the database
        baselines[name] = {"description": description, "ap": base_ap, "seconds": rec["wall_seconds"],
                           "cpu_seconds_all_threads": rec["cpu_seconds"]}
        rss[f"after_{name}"] = _peak_rss_mib()
    for b in baselines.values():
        ap = b.pop("ap")
        b.update(queries_timed=n_base, seconds_per_query=b["seconds"] / n_base,
                 seconds_scaled_full=b["seconds"] / n_base * n_q,
                 ns_per_pair=b["seconds"] / (n_base * n_db) * 1e9,
                 cpu_ns_per_pair=b["cpu_seconds_all_threads"] / (n_base * n_db) * 1e9,
                 cores_used=b["cpu_seconds_all_threads"] / b["seconds"] if b["seconds"] > 0 else None,
                 max_abs_ap_difference_vs_index_rule=float(np.max(np.abs(ap - ref_ap))),
                 map_subset=float(ap.mean()))

    ratios: dict[str, dict[str, float]] = {}
    ratios_median: dict[str, dict[str, float]] = {}
    for name in ("numpy_popcount", "published_style"):
        ratios[f"{name}_over_new"] = {t: baselines[name]["seconds_scaled_full"] / timings["new"][t]["best"]
                                      for t in TIES}
        ratios_median[f"{name}_over_new"] = {
            t: baselines[name]["seconds_scaled_full"] / timings["new"][t]["median"] for t in TIES}
    if previous is not None:
        ratios["previous_over_new"] = {t: timings["previous"][t]["best"] / timings["new"][t]["best"] for t in TIES}
        ratios_median["previous_over_new"] = {
            t: timings["previous"][t]["median"] / timings["new"][t]["median"] for t in TIES}
    at_target = (n_q, n_db) == TARGET_SIZE
    target_ratios = ratios["numpy_popcount_over_new"]
    targets = [{"target": TARGET_TEXT, "at_target_size": at_target, "ratios": target_ratios,
                "met": bool(at_target and all(r >= TARGET_RATIO for r in target_ratios.values()))}]

    n_cpus = len(cpus)
    threshold = QUIET_LOAD_PER_CORE * n_cpus
    loads = [(s["load_before"], s["load_after"]) for s in stages.records]
    others = [s["other_processes_cpu_share"] for s in stages.records if s["other_processes_cpu_share"] is not None]
    if others and len(others) == len(stages.records):
        # The direct measure: what other processes took of the CPUs while each stage ran (/proc/stat).
        quiet = max(others) <= QUIET_OTHER_SHARE
    elif any(a is None or b is None for a, b in loads):
        quiet = None
    else:
        quiet = all(a[0] < threshold and b[0] < threshold for a, b in loads)

    report: dict[str, Any] = {
        "benchmark": "metrics_speed",
        "config": {
            "queries": n_q, "database": n_db, "bits": bits, "labels": args.labels, "topk": args.topk,
            "chunk_size": chunk_size, "baseline_queries": n_base, "repeat": args.repeat, "seed": args.seed,
            "quick": bool(args.quick), "cold_numba_cache": not args.use_numba_cache,
            "baseline_commit": args.baseline_commit,
        },
        "machine": {
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": n_cpus,
            "numba_threads": numba.get_num_threads(), "numba_threading_layer": threading_layer,
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "load_average_start": load_start, "load_average_end": _load(),
        },
        "load": {
            "quiet": quiet, "quiet_rule": (f"other processes took at most {QUIET_OTHER_SHARE:.0%} of the usable CPUs "
                                           "during every timed stage (/proc/stat); where that is not measurable, "
                                           f"1-minute load average < {threshold:g} before and after every stage"),
            "max_load_1min": max((max(a[0], b[0]) for a, b in loads if a and b), default=None),
            "max_other_processes_cpu_share": max(others, default=None),
            "stages": stages.records,
        },
        "previous_kernels": {
            "commit": args.baseline_commit, "loaded": previous is not None, "problem": previous_problem,
            "identical_to_new": same_as_previous,
        },
        "compile_seconds": compile_seconds,
        "evaluate_hamming_seconds": timings,
        "baselines": baselines,
        "ratios": ratios,
        "ratios_by_median": ratios_median,
        "targets": targets,
        "map_subset_index_rule": float(ref_ap.mean()),
        "map": {impl: {t: results[impl][t].map for t in TIES} for impl in impls},
        "map_at_k": {impl: {t: results[impl][t].map_at_k for t in TIES} for impl in impls},
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


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if load is None else f"{load[0]:.2f}"


def _markdown(r: dict[str, Any]) -> str:
    c, m, ld = r["config"], r["machine"], r["load"]
    ev, base, ratios = r["evaluate_hamming_seconds"], r["baselines"], r["ratios"]
    prev = r["previous_kernels"]
    label = {"new": "today's kernels", "previous": f"previous kernels ({prev['commit']})"}
    rows = [
        "| implementation | tie rule | wall s, best (full Q) | wall s, median | wall ns / (query, item) "
        "| CPU ns / pair | cores used |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for ties in TIES:
        for impl in ev:
            e = ev[impl][ties]
            rows.append(f"| `evaluate_hamming`, {label[impl]} | {ties} | {e['best']:.2f} | {e['median']:.2f} | "
                        f"{e['ns_per_pair']:.2f} | {e['cpu_ns_per_pair']:.2f} | {e['cores_used']:.2f} |")
    names = {"numpy_popcount": "numpy popcount + stable argsort", "published_style": "published style (float32 ±1)"}
    for key, b in base.items():
        rows.append(f"| {names[key]}, scaled from {b['queries_timed']} queries | index (stable sort) | "
                    f"{b['seconds_scaled_full']:.1f} | | {b['ns_per_pair']:.2f} | {b['cpu_ns_per_pair']:.2f} | "
                    f"{'n/a' if b['cores_used'] is None else format(b['cores_used'], '.2f')} |")

    ratio_names = {"numpy_popcount_over_new": "numpy popcount / today's",
                   "published_style_over_new": "published style / today's",
                   "previous_over_new": f"previous kernels ({prev['commit']}) / today's"}
    ratio_rows = ["| ratio of wall times (best) | expected | index |", "|---|---:|---:|"]
    for key, vals in ratios.items():
        ratio_rows.append(f"| {ratio_names[key]} | {vals['expected']:.1f}x | {vals['index']:.1f}x |")

    t = r["targets"][0]
    target_ratios = ", ".join(f"{k} {v:.1f}x" for k, v in t["ratios"].items())
    if t["at_target_size"]:
        target_line = f"**Targets**: {t['target']}: met **{'yes' if t['met'] else 'no'}** ({target_ratios})."
    else:
        target_line = (f"**Targets**: {t['target']}: met **no** -- not evaluated, this run is "
                       f"{c['queries']:,} x {c['database']:,} (ratios at this size: {target_ratios}).")

    threshold = QUIET_LOAD_PER_CORE * m["usable_cores"]
    n_over = sum(1 for s in ld["stages"] if s["load_before"] and s["load_after"]
                 and max(s["load_before"][0], s["load_after"][0]) >= threshold)
    others = ld["max_other_processes_cpu_share"]
    others_text = "" if others is None else (
        f" Other processes (and steal) took at most {others:.0%} of the usable CPUs during a timed stage "
        "(/proc/stat).")
    if ld["quiet"] is None:
        verdict = "**Machine load: unknown** (no load average on this platform); timings may include contention."
    elif ld["quiet"] and others is not None:
        verdict = (f"**Machine: quiet** -- other processes took at most {others:.0%} of the usable CPUs during "
                   f"every timed stage (/proc/stat); the 1-minute load average (max {ld['max_load_1min']:.2f}) "
                   "is this benchmark's own threads.")
        others_text = ""
    elif ld["quiet"]:
        verdict = (f"**Machine: quiet** -- the 1-minute load average stayed below {threshold:g} "
                   f"({QUIET_LOAD_PER_CORE} per usable core) before and after every timed stage "
                   f"(max {ld['max_load_1min']:.2f}).")
    elif others is not None and others > QUIET_OTHER_SHARE:
        verdict = (f"**Machine: loaded** -- other processes took up to {others:.0%} of the usable CPUs during a "
                   "timed stage (/proc/stat); the timings include contention with other work, and this is not a "
                   "quiet-machine result.")
        others_text = ""
    else:
        verdict = (f"**Machine: loaded** -- the 1-minute load average was at or above {threshold:g} "
                   f"({QUIET_LOAD_PER_CORE} per usable core) before or after {n_over} of {len(ld['stages'])} timed "
                   f"stages (max {ld['max_load_1min']:.2f}); the timings include contention with other work, "
                   "and this is not a quiet-machine result.")
    verdict += (" The load average counts this benchmark's own threads too." + others_text)

    stage_rows = ["| stage | wall s | CPU s | load before | load after | other processes' CPU share |",
                  "|---|---:|---:|---:|---:|---:|"]
    for s in ld["stages"]:
        share = "n/a" if s["other_processes_cpu_share"] is None else f"{s['other_processes_cpu_share']:.0%}"
        stage_rows.append(f"| {s['stage']} | {s['wall_seconds']:.2f} | {s['cpu_seconds']:.2f} | "
                          f"{_fmt_load(s['load_before'])} | {_fmt_load(s['load_after'])} | {share} |")

    if not prev["loaded"]:
        prev_line = (f"Previous kernels: not timed ({prev['problem'] or 'skipped with --baseline-commit none'}).")
    else:
        parts = []
        for ties, s in prev["identical_to_new"].items():
            same = s["ap_identical"] and s["map_identical"]
            parts.append(f"{ties}: {'identical' if same else 'DIFFERENT'} (AP arrays equal: {s['ap_identical']}, "
                         f"MAP equal: {s['map_identical']}, AP@k equal: {s['ap_at_k_identical']}, "
                         f"max |dAP| {s['max_abs_ap_difference']:.1e})")
        prev_line = f"Previous kernels ({prev['commit']}) vs today's, results: " + "; ".join(parts) + "."

    agreement = "; ".join(
        f"{names[k]} max |AP - AP(index)| = {b['max_abs_ap_difference_vs_index_rule']:.2e} "
        f"(MAP {b['map_subset']:.6f})" for k, b in base.items())
    comp = r["compile_seconds"]
    comp_text = "; ".join(f"{label[impl]}: expected {v['expected']:.1f} s, index {v['index']:.1f} s"
                          for impl, v in comp.items())
    mp, mk = r["map"]["new"], r["map_at_k"]["new"]
    rss = r["peak_rss_mib"]
    lines = [
        "# Hamming-ranking metrics speed",
        "",
        f"{c['queries']:,} queries x {c['database']:,} database items, {c['bits']}-bit random codes, "
        f"{c['labels']} labels, topk={c['topk']}, chunk {c['chunk_size']:,} rows; {c['repeat']} interleaved "
        f"round(s) per (kernels, tie rule).",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores (of {m['cpu_count']}), "
        f"{m['numba_threads']} numba threads, numba threading layer {m['numba_threading_layer']} (only the "
        f"previous prange kernels run on it; today's kernels run on Python threads), numpy {m['numpy']}, "
        f"numba {m['numba']}, Python {m['python']}. Load average (1, 5, 15 min) {m['load_average_start']} at "
        f"start, {m['load_average_end']} at the end.",
        "",
        verdict,
        "",
        *rows,
        "",
        *ratio_rows,
        "",
        target_line,
        "",
        prev_line,
        "",
        f"Baselines vs the index rule on the {c['baseline_queries']} timed queries: {agreement}; "
        f"MAP of today's index rule on them {r['map_subset_index_rule']:.6f}.",
        "",
        f"MAP@all: expected {mp['expected']:.6f}, index {mp['index']:.6f}; "
        f"MAP@{c['topk']}: expected {mk['expected']:.6f}, index {mk['index']:.6f}.",
        "",
        f"JIT compile (cold cache, first call): {comp_text}.",
        "",
        "Load around each timed stage (1-minute load average):",
        "",
        *stage_rows,
        "",
        f"Peak RSS (MiB): at start (interpreter + imports) {rss['start']:.0f}, "
        f"after data {rss['after_data']:.0f}, after JIT compile {rss['after_compile']:.0f}, "
        f"after the kernel runs {rss['after_kernels']:.0f} (the baselines, run last, reach "
        f"{rss['after_numpy_popcount']:.0f} and {rss['after_published_style']:.0f}). "
        f"Metric state: {r['state_mib']['histograms']:.1f} MiB of histograms + "
        f"{r['state_mib']['one_chunk_words']:.1f} MiB per chunk, versus "
        f"{r['state_mib']['q_by_n_float64_matrix_avoided']:,.0f} MiB for a Q x N float64 matrix.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
