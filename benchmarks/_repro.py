"""Reproducible result scripts: pinned CPU numerics, a recorded environment, and a check mode.

**Why pin.** The float kernels torch (MKL, oneDNN, ATen) and numpy/faiss (OpenBLAS) run are chosen
at load time from the CPU's instruction set. An AVX-512 machine and an AVX2 machine therefore round
differently, and a 70-epoch training run carries that along: the same seed, code and package
versions gave a digits COUPLE row 77.23 on one CPU and 78.36 on another. The result scripts therefore
run with one code path on every x86-64 CPU that has AVX2 (:data:`PINNED`), set through the
environment before any of those libraries loads (the script re-executes itself once when needed).
``CROSSRET_BENCH_NUMERICS=native`` turns the pinning off (each CPU's fastest kernels; rows are then
only comparable on the same CPU model).

**What a row records.** :func:`environment` (CPU model, the pinned settings, torch's CPU capability,
versions of every numeric package and the crossret commit); the scripts store it once per distinct
value, by digest.

**Check mode.** :func:`sample_rows` picks a seeded, stratified sample of recorded rows; the script
re-runs them and :func:`compare_rows` reports, per row, every metric that moved. A script's
``--check N`` exits 1 when any sampled row does not reproduce exactly.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

NUMERICS_VARIABLE = "CROSSRET_BENCH_NUMERICS"
# One code path per library on every AVX2 x86-64 CPU: MKL's conditional numerical reproducibility mode,
# ATen's AVX2 kernels, oneDNN capped at AVX2, OpenBLAS's Haswell kernels (numpy's and faiss's copies).
PINNED = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2",
          "OPENBLAS_CORETYPE": "Haswell"}
PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "faiss-cpu", "numba", "transformers", "torch-geometric")


def numerics_mode() -> str:
    mode = os.environ.get(NUMERICS_VARIABLE, "pinned")
    if mode not in ("pinned", "native"):
        raise SystemExit(f"error: {NUMERICS_VARIABLE}={mode!r}; use 'pinned' (default) or 'native'")
    return mode


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_numerics() -> None:
    """Re-execute this script with :data:`PINNED` in the environment unless it is already there (or the
    mode is ``native``). Call it first thing in ``main()``: the libraries read these variables once, when
    they load, so setting them later in the same process would change nothing."""
    if numerics_mode() == "native":
        return
    if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in _cpu_flags():
        raise SystemExit(f"error: pinned numerics need an x86-64 CPU with AVX2; set {NUMERICS_VARIABLE}=native "
                         "to run with this CPU's own kernels (rows then compare only on the same CPU model)")
    if all(os.environ.get(name) == value for name, value in PINNED.items()):
        return
    os.environ.update(PINNED)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("crossret", *PACKAGES):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict[str, Any]:
    """Everything that decides a row's floats besides its config: CPU, numerics mode, package versions."""
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except ImportError:
        capability = None
    return {"cpu": _cpu_model(), "machine": platform.machine(), "numerics": numerics_mode(),
            "pinned": {name: os.environ.get(name) for name in PINNED}, "torch_cpu_capability": capability,
            "python": platform.python_version(), "versions": _versions(), "commit": _git_commit()}


def digest(record: Any) -> str:
    """Stable short digest of a JSON-serialisable record (key order does not matter)."""
    import hashlib

    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def compact_row(row: dict[str, Any], records: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``row`` with each of ``keys`` replaced by ``<key>_id``, the :func:`digest` of its record; the records
    go to ``records`` (digest → record), stored once beside the runs file."""
    row = dict(row)
    for key in keys:
        if key in row:
            record = row.pop(key)
            records[digest(record)] = record
            row[f"{key}_id"] = digest(record)
    return row


def expand_row(row: dict[str, Any], records: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The inverse of :func:`compact_row` (rows that were never compacted pass through unchanged)."""
    row = dict(row)
    for key in keys:
        if f"{key}_id" in row:
            row[key] = records[row.pop(f"{key}_id")]
    return row


def sample_rows(rows: list[dict[str, Any]], n: int, seed: int, strata: Callable[[dict[str, Any]], Any]
                ) -> list[dict[str, Any]]:
    """``n`` rows drawn without replacement, round-robin over the groups ``strata(row)`` defines (so a
    small sample still touches every benchmark and variant), seeded."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(strata(row), []).append(row)
    rng = random.Random(seed)
    pools = [rng.sample(group, len(group)) for _, group in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    rng.shuffle(pools)
    picked: list[dict[str, Any]] = []
    while len(picked) < n and any(pools):
        for pool in pools:
            if pool and len(picked) < n:
                picked.append(pool.pop())
    return picked


def rerun(worker: Callable[[dict[str, Any]], dict[str, Any]], jobs: list[dict[str, Any]], workers: int,
          describe: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """``worker(job)`` for every job in ``workers`` processes; results in job order."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(worker, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            print(describe(future.result()), file=sys.stderr, flush=True)
    return [r for r in results if r is not None]


def compare_rows(recorded: Iterable[dict[str, Any]], fresh: Iterable[dict[str, Any]], keys: tuple[str, ...],
                 fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per pair: the identifying ``keys``, and for each of ``fields`` the recorded and fresh value when they
    differ (exact comparison: a reproduced row is equal to the last bit)."""
    out = []
    for old, new in zip(recorded, fresh, strict=True):
        moved = {f: {"recorded": old.get(f), "now": new.get(f)} for f in fields if old.get(f) != new.get(f)}
        out.append({**{k: old.get(k) for k in keys}, "reproduced": not moved, "moved": moved})
    return out


def check_report(script: str, comparisons: list[dict[str, Any]], recorded_environments: list[Any],
                 fields: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The JSON payload and a markdown table of a check run."""
    now = environment()
    moved = [c for c in comparisons if not c["reproduced"]]
    payload = {"script": script, "checked": len(comparisons), "reproduced": len(comparisons) - len(moved),
               "environment_now": now, "recorded_environments": recorded_environments, "rows": comparisons}
    lines = [f"# Reproduction check: {script}", "",
             f"{len(comparisons) - len(moved)} of {len(comparisons)} sampled rows reproduce exactly "
             f"(CPU now: {now['cpu']}, numerics {now['numerics']}).", "",
             "| row | reproduced | moved |", "|---|---|---|"]
    for c in comparisons:
        label = " ".join(str(c[k]) for k in c if k not in ("reproduced", "moved"))
        parts = []
        for f in fields:
            if f in c["moved"]:
                old, new = c["moved"][f]["recorded"], c["moved"][f]["now"]
                if isinstance(old, float) and isinstance(new, float):
                    parts.append(f"{f} {old:.6g} → {new:.6g}")
                else:
                    parts.append(f"{f} {old} → {new}")
        lines.append(f"| {label} | {'yes' if c['reproduced'] else 'no'} | {'; '.join(parts) or '-'} |")
    return payload, "\n".join(lines) + "\n"


def regenerating_path(runs_path: Path) -> Path:
    """The sibling file a regeneration writes its fresh rows to as they finish (``x_runs.jsonl`` →
    ``x_runs.regenerating.jsonl``); it resumes there when interrupted and goes once the runs file is replaced."""
    return runs_path.with_suffix(".regenerating.jsonl")


def regenerate_report(script: str, comparisons: list[dict[str, Any]], kept: list[dict[str, Any]],
                      fields: tuple[str, ...], headline: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The JSON payload and a markdown summary of a regeneration. ``comparisons``: :func:`compare_rows` of the
    recorded rows against their fresh versions, each with the ``headline`` fields' recorded and new values
    added under ``values``; ``kept``: the rows left as recorded (their keys and ``why``)."""
    moved = [c for c in comparisons if not c["reproduced"]]
    reasons: dict[str, int] = {}
    for row in kept:
        reasons[row["why"]] = reasons.get(row["why"], 0) + 1
    deltas = {f: [c["values"][f]["now"] - c["values"][f]["recorded"] for c in comparisons
                  if isinstance(c["values"][f]["now"], (int, float)) and isinstance(c["values"][f]["recorded"],
                                                                                    (int, float))]
              for f in headline}
    stats = {f: {"rows": len(d), "mean_abs_delta": sum(abs(x) for x in d) / len(d) if d else None,
                 "max_abs_delta": max((abs(x) for x in d), default=None)} for f, d in deltas.items()}
    payload = {"script": script, "environment_now": environment(), "regenerated": len(comparisons),
               "moved": len(moved), "unchanged": len(comparisons) - len(moved), "kept": len(kept),
               "kept_by_reason": reasons, "headline_deltas": stats, "rows": comparisons, "kept_rows": kept}
    lines = [f"# Regeneration: {script}", "",
             f"{len(comparisons)} rows re-run with their recorded configs: {len(moved)} moved, "
             f"{len(comparisons) - len(moved)} identical. {len(kept)} rows kept as recorded"
             + (": " + "; ".join(f"{n} {why}" for why, n in reasons.items()) if reasons else "") + ".", ""]
    for f, s in stats.items():
        if s["rows"]:
            lines.append(f"- {f}: mean |Δ| {s['mean_abs_delta']:.6g}, max |Δ| {s['max_abs_delta']:.6g} "
                         f"over {s['rows']} rows")
    if moved:
        keys = [k for k in moved[0] if k not in ("reproduced", "moved", "values")]
        lines += ["", f"| {' | '.join(keys)} | {' | '.join(headline)} | other fields that moved |",
                  "|" + "---|" * (len(keys) + len(headline) + 1)]
        for c in moved:
            cells = ["-" if c[k] is None else str(c[k]) for k in keys]
            for f in headline:
                old, new = c["values"][f]["recorded"], c["values"][f]["now"]
                cells.append(f"{old:.6g} → {new:.6g}" if isinstance(old, float) and isinstance(new, float)
                             else f"{old} → {new}")
            cells.append(", ".join(f for f in fields if f in c["moved"] and f not in headline) or "-")
            lines.append(f"| {' | '.join(cells)} |")
    return payload, "\n".join(lines) + "\n"
