"""Start-up cost of a command that runs numba kernels: cold (empty kernel cache) vs after ``crossret warmup``.

Times ``crossret eval-codes`` end to end, each run a fresh ``python -m crossret`` process, on small
random inputs (``--queries`` x ``--database`` codes of ``--bits`` bits, 10 classes) made in a temporary
directory, with the kernel cache in a private empty directory (``CROSSRET_CACHE_DIR``; a
``NUMBA_CACHE_DIR`` of the caller is removed from the children's environment):

* **cold**: the first run, which compiles the kernels it needs;
* **warmup**: ``crossret warmup`` in a fresh cache directory (compiles every kernel group);
* **warm**: ``--repeat`` runs after that warm-up (median and all runs).

Each run records its wall time and its CPU time (user + system, which a busy machine inflates far less
than the wall time). Also recorded: ``crossret --help`` (start-up without numpy or numba), the 1-minute load average
before and after each stage, Python / numba / numpy versions, CPU count and the cache directory.
Writes ``benchmarks/results/startup_speed.json`` and ``.md``::

    python benchmarks/startup_speed.py           # 200 x 2,000 codes of 64 bits, warm median of 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_WARM_SECONDS = 1.0


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        return None


def _timed(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one fresh process: wall seconds, its CPU seconds (user + system: what the load average does not
    inflate) and the load average around it."""
    before = _load1()
    cpu_before = _children_cpu()
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "load1_before": before,
            "load1_after": _load1()}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _inputs(folder: Path, queries: int, database: int, bits: int) -> dict[str, Path]:
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "query-codes": np.where(rng.random((queries, bits)) < 0.5, -1, 1).astype(np.int8),
        "db-codes": np.where(rng.random((database, bits)) < 0.5, -1, 1).astype(np.int8),
        "query-labels": rng.integers(0, 10, queries),
        "db-labels": rng.integers(0, 10, database),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = folder / f"{name}.npy"
        np.save(paths[name], array)
    return paths


def _versions() -> dict[str, str]:
    import numba
    import numpy

    return {"python": platform.python_version(), "numba": numba.__version__, "numpy": numpy.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--database", type=int, default=2_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    python = [sys.executable, "-m", "crossret"]
    with tempfile.TemporaryDirectory(prefix="crossret-startup-") as tmp:
        folder = Path(tmp)
        paths = _inputs(folder, args.queries, args.database, args.bits)
        eval_argv = [*python, "eval-codes", *(a for name, path in paths.items() for a in (f"--{name}", str(path))),
                     "--json"]
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}

        def fresh_cache(name: str) -> dict[str, str]:
            cache = folder / name
            shutil.rmtree(cache, ignore_errors=True)
            return {**env, "CROSSRET_CACHE_DIR": str(cache)}

        help_run = _timed([*python, "--help"], fresh_cache("help-cache"))
        cold_env = fresh_cache("cold-cache")
        cold = _timed(eval_argv, cold_env)
        warm_env = fresh_cache("warm-cache")
        warmup = _timed([*python, "warmup", "--json"], warm_env)
        warm_runs = [_timed(eval_argv, warm_env) for _ in range(args.repeat)]
        cached_files = sorted(p.name for p in (folder / "warm-cache").rglob("*.nbi"))

    warm_median = statistics.median(r["seconds"] for r in warm_runs)
    warm_cpu_median = statistics.median(r["cpu_seconds"] for r in warm_runs)
    result = {
        "command": f"crossret eval-codes ({args.queries} queries x {args.database} items, {args.bits} bits, --json)",
        "inputs": {"queries": args.queries, "database": args.database, "bits": args.bits},
        "help": help_run,
        "cold": cold,
        "warmup": warmup,
        "warm_runs": warm_runs,
        "warm_median_seconds": warm_median,
        "warm_median_cpu_seconds": warm_cpu_median,
        "target_warm_seconds": TARGET_WARM_SECONDS,
        "warm_meets_target": warm_median < TARGET_WARM_SECONDS,
        "cache_dir": "CROSSRET_CACHE_DIR=<temporary directory>, kernels in $CROSSRET_CACHE_DIR/numba",
        "cache_index_files_after_warmup": len(cached_files),
        "versions": _versions(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "niceness": os.nice(0),
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "startup_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / "startup_speed.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict[str, Any]) -> str:
    def row(name: str, run: dict[str, Any]) -> str:
        return (f"| {name} | {run['seconds']:.2f} | {run['cpu_seconds']:.2f} | {run['load1_before']} | "
                f"{run['load1_after']} |")

    v = r["versions"]
    lines = [
        "# Start-up speed: numba kernel cache",
        "",
        f"`{r['command']}`, each run a fresh process. Python {v['python']}, numba {v['numba']}, numpy "
        f"{v['numpy']}; {r['cpus']} CPUs; niceness {r['niceness']}. Cache: {r['cache_dir']}.",
        "",
        "| run | wall s | CPU s | load1 before | load1 after |",
        "|---|---:|---:|---:|---:|",
        row("`crossret --help` (no numpy, no numba)", r["help"]),
        row("eval-codes, cold (empty cache: compiles)", r["cold"]),
        row("`crossret warmup` (every kernel group, empty cache)", r["warmup"]),
        *(row(f"eval-codes, warm run {i + 1}", run) for i, run in enumerate(r["warm_runs"])),
        "",
        f"Warm median: **{r['warm_median_seconds']:.2f} s** wall, {r['warm_median_cpu_seconds']:.2f} s CPU (target "
        f"< {r['target_warm_seconds']:.0f} s wall: {'met' if r['warm_meets_target'] else 'not met'}); cold / warm = "
        f"{r['cold']['seconds'] / r['warm_median_seconds']:.1f}x. Cache index files after the warm-up: "
        f"{r['cache_index_files_after_warmup']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
