"""Thread-count defaults of crossret.threads, chosen by measurement: 1 vs 2 threads per phase, quiet and loaded.

Three workloads, one per phase whose default is chosen here:

* ``linear_algebra``: ITQ fit (PCA + 50 Procrustes iterations) of 20,000 x 512 float32 features to 64 bits;
* ``graph_search``: exact faiss kNN graph search of 20,000 x 64 float32 vectors against themselves, k = 10
  (``crossret.graph.knn.knn_search``, as COUPLE's graph builder searches);
* ``evaluate``: ``evaluate_hamming`` of 1,000 x 200,000 packed 64-bit codes (ties ``expected``).

Each runs with 1 and with 2 threads of its phase (``CROSSRET_THREADS_<PHASE>``), ``--repeat`` times,
the two settings interleaved, under two conditions: the machine **as it is** (whatever else runs; the
1-minute load average is recorded before and after every measurement) and **loaded**, with
``--busy`` extra busy-looping processes (same niceness as this script) running throughout. Per
workload and setting: the median wall time per condition and the worst of the two; the better worst
case is the recommended default. Writes ``benchmarks/results/threads.json`` and ``.md``::

    nice python benchmarks/threads.py              # ~5 min on a 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETTINGS = (1, 2)
PHASE_OF = {"itq_fit": "linear_algebra", "knn_graph": "graph_search", "evaluate_hamming": "evaluate"}


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workloads(quick: bool) -> dict[str, Callable[[], object]]:
    import numpy as np

    from crossret.data.domain import Domain
    from crossret.graph.knn import knn_search
    from crossret.hashing.itq import ITQ
    from crossret.retrieval.metrics import evaluate_hamming
    from crossret.threads import use_threads

    rng = np.random.default_rng(0)
    n_itq, n_knn, n_db = (4_000, 4_000, 20_000) if quick else (20_000, 20_000, 200_000)
    # ITQ: features with a decaying spectrum (as real descriptors have), split into source and target
    basis = rng.standard_normal((512, 512)) * (0.97 ** np.arange(512))[:, None]
    features = (rng.standard_normal((n_itq, 512)) @ basis).astype(np.float32)
    half = n_itq // 2
    source = Domain("source", features[:half], rng.integers(0, 10, half))
    target = Domain("target", features[half:], np.full(n_itq - half, -1))
    vectors = rng.standard_normal((n_knn, 64)).astype(np.float32)
    q_codes = rng.integers(0, 256, (1_000, 8), dtype=np.uint8)
    db_codes = rng.integers(0, 256, (n_db, 8), dtype=np.uint8)
    q_labels, db_labels = rng.integers(0, 20, 1_000), rng.integers(0, 20, n_db)

    def evaluate() -> object:
        # metrics.py does not enter the phase itself yet: the block an evaluation would run in
        with use_threads("evaluate"):
            return evaluate_hamming(q_codes, db_codes, q_labels, db_labels, bits=64)

    return {
        "itq_fit": lambda: ITQ(64, seed=0).fit(source, target),
        "knn_graph": lambda: knn_search(vectors, vectors, 10, exclude_self=True),
        "evaluate_hamming": evaluate,
    }


def _measure(name: str, run: Callable[[], object], threads: int) -> dict[str, Any]:
    variable = f"CROSSRET_THREADS_{PHASE_OF[name].upper()}"
    os.environ[variable] = str(threads)
    try:
        load_before, cpu_before = _load1(), _cpu()
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        return {"workload": name, "threads": threads, "seconds": round(seconds, 3),
                "cpu_seconds": round(_cpu() - cpu_before, 3), "load1_before": load_before, "load1_after": _load1()}
    finally:
        del os.environ[variable]


def _busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(n)]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy-looping processes of the loaded condition")
    parser.add_argument("--quick", action="store_true", help="small inputs (a smoke run; not for defaults)")
    args = parser.parse_args()
    for variable in [v for v in os.environ if v.startswith("CROSSRET_THREADS")]:
        del os.environ[variable]  # the settings measured are the only ones in force

    workloads = _workloads(args.quick)
    for name, run in workloads.items():  # compile numba kernels, load faiss and BLAS once
        _measure(name, run, 1)
    runs: list[dict[str, Any]] = []
    started = time.time()
    for condition in ("as is", "loaded"):
        busy = _busy(args.busy) if condition == "loaded" else []
        try:
            if busy:
                time.sleep(2)  # let the busy loops reach the run queue
            for name, run in workloads.items():
                for _ in range(args.repeat):
                    for threads in SETTINGS:
                        runs.append({**_measure(name, run, threads), "condition": condition})
                        print(json.dumps(runs[-1]), flush=True)
        finally:
            _stop(busy)

    summary = _summary(runs)
    import faiss
    import numba
    import numpy
    import threadpoolctl
    import torch

    result = {
        "runs": runs,
        "summary": summary,
        "repeat": args.repeat,
        "busy_processes": args.busy,
        "quick": args.quick,
        "seconds_total": round(time.time() - started, 1),
        "cpus": os.cpu_count(),
        "niceness": os.nice(0),
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
                     "faiss": faiss.__version__, "numba": numba.__version__,
                     "threadpoolctl": threadpoolctl.__version__},
        "blas": [{k: info[k] for k in ("internal_api", "version", "threading_layer", "filepath") if k in info}
                 for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"],
    }
    stem = "threads_quick" if args.quick else "threads"
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(_markdown(result))
    print(_markdown(result))


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, phase in PHASE_OF.items():
        per_setting = {}
        for threads in SETTINGS:
            entry: dict[str, Any] = {}
            for condition in ("as is", "loaded"):
                mine = [r for r in runs if r["workload"] == name and r["threads"] == threads
                        and r["condition"] == condition]
                entry[condition] = {
                    "median_seconds": round(statistics.median(r["seconds"] for r in mine), 3),
                    "median_cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in mine), 3),
                    "load1_range": [min(r["load1_before"] for r in mine), max(r["load1_after"] for r in mine)],
                }
            entry["worst_seconds"] = max(entry[c]["median_seconds"] for c in ("as is", "loaded"))
            per_setting[threads] = entry
        best = min(SETTINGS, key=lambda t: per_setting[t]["worst_seconds"])
        summary[name] = {"phase": phase, "settings": per_setting, "better_worst_case": best}
    return summary


def _markdown(r: dict[str, Any]) -> str:
    v = r["versions"]
    lines = [
        "# Thread counts per phase: 1 vs 2 threads, as the machine is and loaded",
        "",
        f"{r['cpus']} CPUs, niceness {r['niceness']}; median of {r['repeat']} runs per cell (settings interleaved); "
        f"loaded = {r['busy_processes']} extra busy-looping processes. Python {v['python']}, numpy {v['numpy']}, "
        f"torch {v['torch']}, faiss {v['faiss']}, numba {v['numba']}."
        + (" **Quick run (small inputs): not for choosing defaults.**" if r["quick"] else ""),
        "",
        "| workload (phase) | threads | as is: s (CPU s) | load1 | loaded: s (CPU s) | load1 | worst s | "
        "better worst |",
        "|---|---:|---:|---|---:|---|---:|---|",
    ]
    for name, s in r["summary"].items():
        for threads, e in s["settings"].items():
            quiet, loaded = e["as is"], e["loaded"]
            lines.append(
                f"| {name} ({s['phase']}) | {threads} | {quiet['median_seconds']:.2f} "
                f"({quiet['median_cpu_seconds']:.2f}) "
                f"| {quiet['load1_range'][0]}–{quiet['load1_range'][1]} | {loaded['median_seconds']:.2f} "
                f"({loaded['median_cpu_seconds']:.2f}) | {loaded['load1_range'][0]}–{loaded['load1_range'][1]} "
                f"| {e['worst_seconds']:.2f} | {'**yes**' if int(threads) == s['better_worst_case'] else ''} |")
    lines += [
        "",
        "\"As is\" is not an idle machine: the 1-minute load average in the load1 columns (min before – max "
        "after over the cell's runs) shows what else ran. CPU s is the process's user + system time during the "
        "run (all its threads).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
