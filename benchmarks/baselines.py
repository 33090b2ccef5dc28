"""Run the baselines (LSH, ITQ, source-only) on every benchmark whose data is present.

Code lengths 16/32/64/128 bits (digits also 48/96). Writes ``benchmarks/results/baselines.json``
(every row with protocol, split seed, bits, tie rule and method config) and ``baselines.md``.

    python benchmarks/baselines.py --data-dir ../shared/data [--seeds 0 1 2] [--only digits]

No model selection of any kind happens here: every method runs with its default config.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _repro
from crossret.data import list_benchmarks, load_benchmark, resolve_data_dir
from crossret.experiment import RunConfig, run_experiment
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("lsh", "itq", "source-only")
BITS = (16, 32, 64, 128)
DIGITS_BITS = (16, 32, 48, 64, 96, 128)


CHECK_KEYS = ("benchmark", "method", "bits", "seed")
CHECK_FIELDS = ("map_cross", "map_single", "p_at_r2_cross", "p_at_r2_single", "precision_at_100_cross")


def bits_for(name: str) -> tuple[int, ...]:
    return DIGITS_BITS if name.startswith("digits") else BITS


def run_row(job: dict[str, Any], split: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One (benchmark, method, bits, seed) run: its result row and its full metrics."""
    if split is None:
        split = load_benchmark(job["benchmark"], job["data_dir"])
    config = RunConfig(method=job["method"], benchmark=job["benchmark"], bits=job["bits"], seed=job["seed"],
                       ties=job["ties"])
    metrics = run_experiment(config, split=split).metrics
    row = {
        "benchmark": job["benchmark"], "method": job["method"], "bits": job["bits"], "seed": job["seed"],
        "split_seed": metrics["split_seed"], "ties": metrics["ties"],
        "map_cross": metrics["map_cross"], "map_single": metrics["map_single"],
        "p_at_r2_cross": metrics["p_at_r2"]["cross"],
        "p_at_r2_single": metrics["p_at_r2"]["single"],
        "precision_at_100_cross": metrics["precision_at"]["cross"].get("100"),
        "train_seconds": metrics["train_seconds"],
    }
    return row, metrics


def _check_worker(job: dict[str, Any]) -> dict[str, Any]:
    return run_row(job)[0]


def check(recorded: dict[str, Any], n: int, seed: int, data_dir: str, out: Path) -> int:
    """Re-run ``n`` sampled rows of a results JSON and compare them exactly (``<out>_check.{json,md}``);
    0 when every sampled row reproduces, 1 otherwise."""
    sample = _repro.sample_rows(recorded["rows"], n, seed, strata=lambda r: (r["benchmark"].split("-")[0],
                                                                              r["method"]))
    fresh = _repro.rerun(_check_worker, [{**{k: r[k] for k in CHECK_KEYS}, "ties": r["ties"], "data_dir": data_dir}
                                         for r in sample], 1, describe=lambda row: (
        f"check {row['benchmark']} {row['method']} {row['bits']}b seed {row['seed']}: "
        f"MAP cross {100 * row['map_cross']:.2f}"))
    comparisons = _repro.compare_rows(sample, fresh, CHECK_KEYS, CHECK_FIELDS)
    payload, text = _repro.check_report("benchmarks/baselines.py", comparisons,
                                        [recorded.get("environment", "not recorded")], CHECK_FIELDS)
    write_json_atomic(out.parent / f"{out.name}_check.json", payload)
    write_text_atomic(out.parent / f"{out.name}_check.md", text)
    print(text, file=sys.stderr)
    return 0 if payload["reproduced"] == payload["checked"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default $CROSSRET_DATA)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="method seeds (mean is reported)")
    parser.add_argument("--only", default="", help="run only benchmarks whose name contains this text")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ties", default="expected", choices=("expected", "index"))
    parser.add_argument("--out", default=str(RESULTS / "baselines"), help="output path without extension")
    parser.add_argument("--plots-from", default=None, help="only redraw the plots from an existing results JSON")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="re-run N sampled rows of <out>.json and compare them exactly (writes <out>_check.*; "
                        "exit 1 when one moved); nothing else is run or written")
    parser.add_argument("--check-seed", type=int, default=0, help="seed of the --check sample")
    args = parser.parse_args(argv)
    _repro.pin_numerics()
    if args.plots_from:
        import json

        rows = json.loads(Path(args.plots_from).read_text())["rows"]
        for path in write_plots(rows, Path(args.out).parent):
            print(f"wrote {path}", file=sys.stderr)
        return 0

    data_dir = resolve_data_dir(args.data_dir)
    if args.check:
        import json

        recorded = json.loads(Path(args.out).with_suffix(".json").read_text())
        return check(recorded, args.check, args.check_seed, str(data_dir), Path(args.out))
    names = [i.name for i in list_benchmarks(data_dir) if i.present and args.only in i.name]
    rows: list[dict[str, Any]] = []
    # Recorded once each (they are the same for every row of a benchmark / method).
    protocols: dict[str, Any] = {}
    method_configs: dict[str, Any] = {}
    started = time.time()
    for name in names:
        split = load_benchmark(name, data_dir)
        for bits in bits_for(name):
            for method in args.methods:
                for seed in args.seeds:
                    job = {"benchmark": name, "method": method, "bits": bits, "seed": seed, "ties": args.ties}
                    row, metrics = run_row(job, split)
                    protocols[name] = metrics["protocol"]
                    method_configs[method] = metrics["method_config"]
                    rows.append(row)
                    print(f"{name:28s} {method:12s} {bits:4d}b seed {seed}: MAP cross "
                          f"{100 * metrics['map_cross']:6.2f}  single {100 * metrics['map_single']:6.2f}  "
                          f"({metrics['train_seconds']:.1f}s)", file=sys.stderr, flush=True)
    payload = {
        "script": "benchmarks/baselines.py",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": round(time.time() - started, 1),
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        # CPU, pinned numerics and package versions: what else decides the floats (benchmarks/_repro.py).
        "environment": _repro.environment(),
        "seeds": args.seeds, "ties": args.ties,
        "map_definition": "MAP@all in [0,1]; relevance = same label; the tables show percent",
        "protocols": protocols,
        "method_configs": method_configs,
        "rows": rows,
    }
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown(rows, args))
    for path in write_plots(rows, out.parent):
        print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (benchmark, method, bits): MAP averaged over seeds."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["benchmark"], row["method"], row["bits"]), []).append(row)
    return [{"benchmark": b, "method": m, "bits": bits,
             "map_cross": statistics.mean(r["map_cross"] for r in group),
             "map_single": statistics.mean(r["map_single"] for r in group)}
            for (b, m, bits), group in sorted(groups.items())]


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """MAP vs bits (mean over seeds) for the digits tasks and the Office-Caltech mean, both settings."""
    from crossret.report.plots import plot_map_vs_bits

    means = mean_rows(rows)
    office = [dict(r, benchmark="office-caltech-surf (mean of 12 tasks)") for r in
              mean_rows([dict(r, benchmark="office") for r in rows if r["benchmark"].startswith("office-caltech")])]
    panels = {name: [r for r in means if r["benchmark"] == name] for name in ("digits-m2u", "digits-u2m")}
    panels["office-caltech-mean"] = office
    written = []
    for name, selected in panels.items():
        for setting in ("cross", "single"):
            if selected:
                written.append(plot_map_vs_bits(selected, out_dir / f"baselines_{name}_{setting}.png", setting))
    return written


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One table per retrieval setting: rows = benchmark x method, columns = code lengths (mean over
    seeds), plus the mean over the Office-Caltech tasks."""
    all_bits = sorted({r["bits"] for r in rows})
    lines = [
        "# Baselines: MAP@all (%)",
        "",
        f"Seeds {args.seeds} (mean), tie rule `{args.ties}`, split seed 313, default method configs; "
        "written by `benchmarks/baselines.py`. Cross = target queries vs source database; single = target "
        "queries vs target-train database. See docs/benchmarks.md for the protocols.",
        "",
    ]

    def cell(selected: list[dict[str, Any]], key: str) -> str:
        return f"{100 * statistics.mean(r[key] for r in selected):.2f}" if selected else "-"

    for setting in ("cross", "single"):
        key = f"map_{setting}"
        lines += [f"## {setting}-domain retrieval", "",
                  "| benchmark | method | " + " | ".join(f"{b}" for b in all_bits) + " |",
                  "|---|---|" + "---:|" * len(all_bits)]
        benchmarks = sorted({r["benchmark"] for r in rows})
        methods = sorted({r["method"] for r in rows})
        for name in benchmarks:
            for method in methods:
                cells = [cell([r for r in rows if r["benchmark"] == name and r["method"] == method
                               and r["bits"] == b], key) for b in all_bits]
                lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
        office = [r for r in rows if r["benchmark"].startswith("office-caltech")]
        if office:
            for method in methods:
                cells = [cell([r for r in office if r["method"] == method and r["bits"] == b], key)
                         for b in all_bits]
                lines.append(f"| **office-caltech mean** | {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
