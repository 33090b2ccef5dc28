"""COUPLE and its ablations on every benchmark whose data is present, next to the baselines.

    python benchmarks/couple.py --data-dir ../shared/data [--seeds 0 1 2] [--only digits]
        [--variants couple no-diffusion ...] [--bits 64] [--jobs 2]

Variants (config switches of the ``couple`` method, everything else at its default):

* ``couple``          the full method;
* ``no-diffusion``    classifier confidence selects the target set (``selection=classifier``);
* ``no-walks``        1-NN pairing inside the batch instead of random walks (``pairing=nearest``);
* ``no-low-mixup``    input-level Mixup off; ``no-high-mixup``: feature-level Mixup off;
* ``no-target-ce``    no pseudo-label cross-entropy on the target (``target_ce_weight=0``);
* ``pooled-centering`` inputs centred on the pooled mean of both domains (``center_per_domain=false``)
                      instead of each domain on its own mean;
* ``paper-defaults``  k = 3 inside each domain and one global top-50 % ranking, as the paper lists
                      (crossret's defaults use 10 and a per-class top 50 %, chosen on dev tasks);
* ``centroid-refine`` a candidate, not an ablation: every refresh's pseudo-labels refined by spherical
                      k-means on the target encoder features (``label_refine=centroids``, session 9);
* ``ema-endpoints``   a candidate, not an ablation: mean-teacher weights (``ema_decay=0.99``) and
                      walk-endpoint Mixup pairs, the best option on the dev tasks (docs/couple.md).

Every finished run is appended to ``<out>_runs.jsonl`` as soon as it ends (its resolved method config
and protocol as digests into ``<out>_configs.json``, which holds each distinct record once), so an interrupted
benchmark continues where it stopped (``--fresh`` starts over). The tables (mean ± std over seeds)
are written to ``<out>.json`` / ``<out>.md``; baselines come from ``results/baselines.json``.
No model selection of any kind happens here: every run trains for the configured epochs and is
evaluated once at the end; target labels only enter the metrics and the pseudo-label report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import _repro
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS: dict[str, dict[str, Any]] = {
    "couple": {},
    "no-diffusion": {"selection": "classifier"},
    "no-walks": {"pairing": "nearest"},
    "no-low-mixup": {"mixup_low": False},
    "no-high-mixup": {"mixup_high": False},
    "no-target-ce": {"target_ce_weight": 0.0},
    "pooled-centering": {"center_per_domain": False},
    # The paper's listed values for what crossret's defaults change (chosen on benchmarks/couple_dev.py).
    "paper-defaults": {"k_target": 3, "k_source": 3, "select_balance": False},
    # Not the default: an option tried on the dev tasks (8 seeds, docs/couple.md), run on the benchmark to
    # report it; whether it becomes the default rests on the dev tasks alone.
    "ema-endpoints": {"ema_decay": 0.99, "mix_pairs": "endpoints"},
    # Not the default either: SHOT/CAN-style centroid refinement (dev-task numbers in docs/couple.md).
    "centroid-refine": {"label_refine": "centroids"},
}
BITS = (16, 32, 64, 128)
DIGITS_BITS = (16, 32, 48, 64, 96, 128)
PUBLISHED_DIGITS_AVERAGE = {"COUPLE": 68.53, "IDEA": 66.59, "PWCF": 52.60}


def bits_for(name: str) -> tuple[int, ...]:
    return DIGITS_BITS if name.startswith("digits") else BITS


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (benchmark, variant, bits, seed) run in a worker process; returns its result row."""
    from crossret.data import load_benchmark
    from crossret.experiment import RunConfig, run_experiment

    split = load_benchmark(job["benchmark"], job["data_dir"])
    # A check re-runs a recorded row with its recorded resolved config, whatever today's defaults are.
    overrides = job.get("method_config", VARIANTS[job["variant"]])
    config = RunConfig(method="couple", benchmark=job["benchmark"], bits=job["bits"], seed=job["seed"],
                       ties=job["ties"], method_config=dict(overrides))
    metrics = run_experiment(config, split=split).metrics
    report = metrics["diagnostics"].get("label_report", {}).get("selection_quality", [])
    last = report[-1] if report else {}
    return {
        "benchmark": job["benchmark"], "variant": job["variant"], "bits": job["bits"], "seed": job["seed"],
        "split_seed": metrics["split_seed"], "ties": metrics["ties"],
        "map_cross": metrics["map_cross"], "map_single": metrics["map_single"],
        "p_at_r2_cross": metrics["p_at_r2"]["cross"],
        "precision_at_100_cross": metrics["precision_at"]["cross"].get("100"),
        "final_selected": last.get("selected"), "final_selected_accuracy": last.get("selected_accuracy"),
        "final_pseudo_label_accuracy": last.get("pseudo_label_accuracy"),
        "train_seconds": metrics["train_seconds"],
        # The resolved method config and protocol are the same for hundreds of rows: the row keeps
        # their content digests and `<out>_configs.json` maps each digest to the full record once.
        "method_config": metrics["method_config"], "protocol": metrics["protocol"],
        # Where the run happened: train_seconds are only comparable between rows of the same host.
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "torch": _torch_version()},
        # CPU, pinned numerics and package versions: what else decides the floats (benchmarks/_repro.py).
        "environment": _repro.environment(),
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


# What a check compares (exactly), and what identifies a row.
CHECK_KEYS = ("benchmark", "variant", "bits", "seed")
CHECK_FIELDS = ("map_cross", "map_single", "p_at_r2_cross", "precision_at_100_cross", "final_selected",
                "final_selected_accuracy", "final_pseudo_label_accuracy")


def check(rows: list[dict[str, Any]], configs: dict[str, Any], n: int, seed: int, data_dir: str, jobs: int,
          out: Path) -> int:
    """Re-run ``n`` sampled recorded rows and compare them exactly; writes ``<out>_check.{json,md}``.
    Returns 0 when every sampled row reproduces, 1 otherwise."""
    sample = _repro.sample_rows(rows, n, seed, strata=lambda r: (r["benchmark"].split("-")[0], r["variant"]))
    fresh = _repro.rerun(run_one, [{**{k: r[k] for k in CHECK_KEYS}, "ties": r["ties"], "data_dir": data_dir,
                                    "method_config": configs[r["method_config_id"]]}
                                   for r in sample], jobs, describe=lambda row: (
        f"check {row['benchmark']} {row['variant']} {row['bits']}b seed {row['seed']}: "
        f"MAP cross {100 * row['map_cross']:.2f}"))
    comparisons = _repro.compare_rows(sample, fresh, CHECK_KEYS, CHECK_FIELDS)
    recorded_envs = sorted({r.get("environment_id", "not recorded") for r in sample})
    payload, text = _repro.check_report("benchmarks/couple.py", comparisons,
                                        [configs.get(e, e) for e in recorded_envs], CHECK_FIELDS)
    write_json_atomic(out.parent / f"{out.name}_check.json", payload)
    write_text_atomic(out.parent / f"{out.name}_check.md", text)
    print(text, file=sys.stderr)
    return 0 if payload["reproduced"] == payload["checked"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default $CROSSRET_DATA)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", default="", help="run only benchmarks whose name contains this text")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--bits", type=int, nargs="+", default=None, help="code lengths (default: all of each "
                        "benchmark's)")
    parser.add_argument("--ablation-bits", type=int, nargs="+", default=None,
                        help="run the ablation variants only at these code lengths (default: all)")
    parser.add_argument("--ties", default="expected", choices=("expected", "index"))
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    parser.add_argument("--out", default=str(RESULTS / "couple"), help="output path without extension")
    parser.add_argument("--fresh", action="store_true", help="ignore runs recorded by an earlier invocation")
    parser.add_argument("--tables-only", action="store_true", help="only rewrite the tables from the runs file")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="re-run N sampled recorded rows and compare them exactly (writes <out>_check.*; "
                        "exit 1 when one moved); nothing else is run or written")
    parser.add_argument("--check-seed", type=int, default=0, help="seed of the --check sample")
    args = parser.parse_args(argv)
    _repro.pin_numerics()

    from crossret.data import list_benchmarks, resolve_data_dir

    out = Path(args.out)
    runs_path = out.parent / f"{out.name}_runs.jsonl"
    configs_path = out.parent / f"{out.name}_configs.json"
    configs = _read_configs(configs_path)
    if args.check:  # --only narrows the sample to those benchmarks
        return check([r for r in _read_runs(runs_path) if args.only in r["benchmark"]], configs, args.check,
                     args.check_seed,
                     str(resolve_data_dir(args.data_dir)), args.jobs, out)
    if args.fresh and runs_path.exists():
        runs_path.unlink()
    rows = _read_runs(runs_path)
    started = time.time()
    if not args.tables_only:
        data_dir = str(resolve_data_dir(args.data_dir))
        names = [i.name for i in list_benchmarks(data_dir) if i.present and args.only in i.name
                 and i.name != "demo"]
        done = {(r["benchmark"], r["variant"], r["bits"], r["seed"]) for r in rows}
        jobs = []
        for name in names:
            for bits in args.bits or bits_for(name):
                if bits not in bits_for(name):
                    continue
                for variant in args.variants:
                    if variant != "couple" and args.ablation_bits and bits not in args.ablation_bits:
                        continue
                    for seed in args.seeds:
                        if (name, variant, bits, seed) not in done:
                            jobs.append({"benchmark": name, "variant": variant, "bits": bits, "seed": seed,
                                         "ties": args.ties, "data_dir": data_dir})
        # The full method everywhere first, then the ablations (an interrupted benchmark still has
        # the main table); digits before Office-Caltech inside each group.
        jobs.sort(key=lambda j: (j["variant"] != "couple", not j["benchmark"].startswith("digits")))
        print(f"{len(jobs)} runs to do ({len(rows)} already recorded in {runs_path})", file=sys.stderr)

        def compact(result: dict[str, Any]) -> dict[str, Any]:
            row = compact_row(result, configs)
            write_json_atomic(configs_path, configs)  # before the row that refers to it
            return row

        run_jobs(run_one, jobs, args.jobs, runs_path, rows, prepare=compact, describe=lambda row: (
            f"{row['benchmark']:28s} {row['variant']:14s} {row['bits']:4d}b seed {row['seed']}: "
            f"MAP cross {100 * row['map_cross']:6.2f} single {100 * row['map_single']:6.2f} "
            f"({row['train_seconds']:.1f}s)"))
    baselines = _read_baselines()
    payload = {
        "script": "benchmarks/couple.py",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds_this_invocation": round(time.time() - started, 1),
        "machine": {"python": platform.python_version(), "processor": platform.machine(),
                    "cpus": os.cpu_count()},
        "ties": args.ties,
        "variants": VARIANTS,
        "map_definition": "MAP@all in [0,1]; relevance = same label; the tables show percent",
        "summary": summarise(rows),
        "baselines": mean_baselines(baselines),
        "runs_file": runs_path.name,  # every run, one JSON line each (method_config_id / protocol_id)
        "configs_file": configs_path.name,  # digest -> resolved method config / protocol
    }
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown(rows, baselines))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


config_digest = _repro.digest


def compact_row(row: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    """Replace the row's full ``method_config`` / ``protocol`` by ``*_id`` digests, recording the full
    records in ``configs`` (digest → record)."""
    row = dict(row)
    for key in ("method_config", "protocol", "environment"):
        if key in row:
            record = row.pop(key)
            digest = config_digest(record)
            configs[digest] = record
            row[f"{key}_id"] = digest
    return row


def expand_row(row: dict[str, Any], configs: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`compact_row`: ``*_id`` digests replaced by the records they name (rows
    written before compaction pass through unchanged)."""
    row = dict(row)
    for key in ("method_config", "protocol", "environment"):
        if f"{key}_id" in row:
            row[key] = configs[row.pop(f"{key}_id")]
    return row


def _read_configs(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def run_jobs(worker: Callable[[dict[str, Any]], dict[str, Any]], jobs: list[dict[str, Any]], workers: int,
             runs_path: Path, rows: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str],
             prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """``worker(job)`` for every job in ``workers`` processes (one BLAS thread each). Each result, through
    ``prepare``, joins ``rows`` and the runs file as soon as its run ends (an interrupted benchmark keeps
    every run done), and ``describe(row)`` goes to stderr."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(worker, job) for job in jobs]):
            row = future.result() if prepare is None else prepare(future.result())
            rows.append(row)
            append_row(runs_path, row)
            print(describe(row), file=sys.stderr, flush=True)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One JSON line per finished run (a single short append; :func:`_read_runs` skips a cut last line)."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that run is simply redone
    return rows


def _read_baselines() -> list[dict[str, Any]]:
    path = RESULTS / "baselines.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds per (benchmark, variant, bits)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["benchmark"], row["variant"], row["bits"]), []).append(row)
    out = []
    for (name, variant, bits), group in sorted(groups.items()):
        cross, single = _stats([r["map_cross"] for r in group]), _stats([r["map_single"] for r in group])
        accuracies = [r["final_selected_accuracy"] for r in group if r.get("final_selected_accuracy") is not None]
        out.append({"benchmark": name, "variant": variant, "bits": bits, "seeds": sorted(r["seed"] for r in group),
                    "map_cross_mean": cross[0], "map_cross_std": cross[1],
                    "map_single_mean": single[0], "map_single_std": single[1],
                    "selected_accuracy_mean": statistics.mean(accuracies) if accuracies else None,
                    "train_seconds_mean": statistics.mean(r["train_seconds"] for r in group)})
    return out


def mean_baselines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["benchmark"], row["method"], row["bits"]), []).append(row)
    return [{"benchmark": b, "method": m, "bits": bits,
             "map_cross": statistics.mean(r["map_cross"] for r in g),
             "map_single": statistics.mean(r["map_single"] for r in g)} for (b, m, bits), g in sorted(groups.items())]


def markdown(rows: list[dict[str, Any]], baselines: list[dict[str, Any]]) -> str:
    summary = summarise(rows)
    base = mean_baselines(baselines)
    lines = ["# COUPLE and ablations: MAP@all (%)", "",
             "Mean ± std over seeds, tie rule `expected`, split seed 313, default configs (variants change "
             "one switch each; see `benchmarks/couple.py`). Baselines (mean over their seeds) from "
             "`results/baselines.json`. Written by `benchmarks/couple.py`.", ""]
    names = sorted({r["benchmark"] for r in summary})
    for setting in ("cross", "single"):
        lines += [f"## {setting}-domain retrieval", ""]
        for name in names:
            bits_list = sorted({r["bits"] for r in summary if r["benchmark"] == name})
            lines += [f"### {name}", "", "| method | " + " | ".join(str(b) for b in bits_list) + " | mean |",
                      "|---|" + "---:|" * (len(bits_list) + 1)]
            for method in sorted({r["method"] for r in base if r["benchmark"] == name}):
                vals = {r["bits"]: r[f"map_{setting}"] for r in base if r["benchmark"] == name
                        and r["method"] == method}
                cells = [f"{100 * vals[b]:.2f}" if b in vals else "-" for b in bits_list]
                mean = (f"{100 * statistics.mean(vals[b] for b in bits_list):.2f}"
                        if all(b in vals for b in bits_list) else "-")
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
            for variant in VARIANTS:
                entries = {r["bits"]: r for r in summary if r["benchmark"] == name and r["variant"] == variant}
                if not entries:
                    continue
                cells = [f"{100 * entries[b][f'map_{setting}_mean']:.2f} ± {100 * entries[b][f'map_{setting}_std']:.2f}"
                         if b in entries else "-" for b in bits_list]
                mean = (f"{100 * statistics.mean(entries[b][f'map_{setting}_mean'] for b in bits_list):.2f}"
                        if all(b in entries for b in bits_list) else "-")
                label = f"**{variant}**" if variant == "couple" else variant
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
            lines.append("")
    digits = [r for r in summary if r["benchmark"].startswith("digits") and r["variant"] == "couple"]
    if len(digits) == 2 * len(DIGITS_BITS):
        average = 100 * statistics.mean(r["map_cross_mean"] for r in digits)
        lines += ["## Digits target", "",
                  f"Cross-domain MAP averaged over both directions and six code lengths: **{average:.2f}** "
                  f"(published: COUPLE {PUBLISHED_DIGITS_AVERAGE['COUPLE']}, IDEA {PUBLISHED_DIGITS_AVERAGE['IDEA']}, "
                  f"PWCF {PUBLISHED_DIGITS_AVERAGE['PWCF']}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
