"""COUPLE development tasks: where every default of ``couple`` was chosen, away from the reported targets.

    python benchmarks/couple_dev.py --data-dir ../shared/data --tag k10 --set k_target=10 --set k_source=10
    python benchmarks/couple_dev.py --tables-only

Tasks (no reported benchmark's *target* appears in them):

* ``dev-m2opt``: source = the 2,000 MNIST digits of ``MNIST_vs_USPS.mat``; target = scikit-learn's
  bundled optdigits (1,797 8×8 digits, no download) upsampled to 16×16 by bilinear zoom;
* ``dev-u2opt``: source = the 1,800 USPS digits of the same file; target = optdigits16;
* ``dev-m200opt``: source = 200 of the MNIST digits (20 per class, a fixed draw), target = optdigits16:
  the small-source regime of Office-Caltech's DSLR (157) and Webcam (295) sources.

500 optdigits images are queries (split seed 313), the rest is target-train. USPS is a reported
*target* of digits M→U, but here it is only a labelled *source*: its labels are what a source gives
any method; nothing measured on it as a target enters a choice.

Each invocation runs one configuration (``--set`` overrides on top of the ``couple`` defaults) under
a ``--tag``, on both tasks and every seed, appends the rows to ``results/couple_dev_runs.jsonl`` and
rewrites ``results/couple_dev.{json,md}`` (one line per tag: cross MAP per task, pseudo-label
accuracy of the selected set and of all targets at the last refresh; the JSON names the runs file
instead of copying every run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _repro
from couple import _read_configs, _read_runs, compact_row, expand_row, run_jobs  # same runs-file format
from crossret.storage.atomic import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("dev-m2opt", "dev-u2opt", "dev-m200opt")
MEAN_TASKS = ("dev-m2opt", "dev-u2opt")  # the "mean" column (the small-source task has its own column)
SMALL_SOURCE_PER_CLASS = 20
DEV_SPLIT_SEED = 313
DEV_QUERIES = 500
# Settings added after rows were recorded, with the behaviour of the runs that predate them.
BEFORE_THE_SETTING_EXISTED: dict[str, Any] = {"center_per_domain": False}


def optdigits16():
    """scikit-learn's optdigits (bundled with the package) as 16×16 images in [0, 1], flattened."""
    import numpy as np
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    from crossret.data.domain import Domain

    digits = load_digits()
    images = np.clip(np.stack([zoom(im / 16.0, 2, order=1) for im in digits.images]), 0.0, 1.0)
    return Domain("optdigits16", images.reshape(len(images), -1), digits.target.astype(np.int64), "sklearn")


def dev_split(task: str, data_dir: str):
    """The split of a development task (see the module doc)."""
    import numpy as np

    from crossret.data import load_benchmark
    from crossret.data.benchmarks import make_split
    from crossret.data.domain import Domain

    digits = load_benchmark("digits-m2u", data_dir)
    if task == "dev-m2opt":
        source = digits.source
    elif task == "dev-m200opt":
        picker = np.random.default_rng(DEV_SPLIT_SEED)
        keep = np.sort(np.concatenate([
            picker.choice(np.flatnonzero(digits.source.labels == c), SMALL_SOURCE_PER_CLASS, replace=False)
            for c in np.unique(digits.source.labels)]))
        source = Domain("mnist200", digits.source.features[keep], digits.source.labels[keep])
    elif task == "dev-u2opt":  # USPS = the whole target side of digits M→U, used as a labelled source
        source = Domain("usps", np.concatenate([digits.target_train.features, digits.queries.features]),
                        np.concatenate([digits.target_train.labels, digits.queries.labels]))
    else:
        raise ValueError(f"unknown development task {task!r}; valid: {', '.join(TASKS)}")
    return make_split(source, optdigits16(), benchmark=task, n_queries=DEV_QUERIES, split_seed=DEV_SPLIT_SEED)


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    from crossret.experiment import RunConfig, run_experiment

    split = dev_split(job["task"], job["data_dir"])
    # A check or a regeneration re-runs a recorded row with its recorded resolved config.
    config = RunConfig(method="couple", benchmark=job["task"], bits=job["bits"], seed=job["seed"],
                       method_config=dict(job.get("method_config", job["overrides"])))
    result = run_experiment(config, split=split)
    metrics = result.metrics
    quality = result.method.label_report(split.target_train.labels).get("selection_quality", [])
    last = quality[-1] if quality else {}
    return {"tag": job["tag"], "task": job["task"], "bits": job["bits"], "seed": job["seed"],
            "overrides": job["overrides"], "map_cross": metrics["map_cross"], "map_single": metrics["map_single"],
            "selected_accuracy": last.get("selected_accuracy"),
            "pseudo_label_accuracy": last.get("pseudo_label_accuracy"),
            "train_seconds": metrics["train_seconds"], "method_config": metrics["method_config"],
            "environment": _repro.environment()}


CHECK_KEYS = ("tag", "task", "bits", "seed")
CHECK_FIELDS = ("map_cross", "map_single", "selected_accuracy", "pseudo_label_accuracy")


def check(rows: list[dict[str, Any]], n: int, seed: int, data_dir: str, jobs: int) -> int:
    """Re-run ``n`` sampled recorded runs with their recorded resolved configs and compare them exactly
    (``results/couple_dev_check.{json,md}``); 0 when every sampled run reproduces, 1 otherwise."""
    sample = _repro.sample_rows(rows, n, seed, strata=lambda r: (r["tag"], r["task"]))
    fresh = _repro.rerun(run_one, [_rerun_job(r, data_dir) for r in sample], jobs, describe=lambda row: (
        f"check {row['tag']} {row['task']} seed {row['seed']}: MAP cross {100 * row['map_cross']:.2f}"))
    comparisons = _repro.compare_rows(sample, fresh, CHECK_KEYS, CHECK_FIELDS)
    payload, text = _repro.check_report("benchmarks/couple_dev.py", comparisons, ["not recorded"], CHECK_FIELDS)
    write_json_atomic(RESULTS / "couple_dev_check.json", payload)
    write_text_atomic(RESULTS / "couple_dev_check.md", text)
    print(text, file=sys.stderr)
    return 0 if payload["reproduced"] == payload["checked"] else 1


def _rerun_job(row: dict[str, Any], data_dir: str) -> dict[str, Any]:
    """The job that re-runs a recorded row: its keys, its overrides (the tag's meaning) and its resolved
    config, with the value a setting added later had in the runs that predate it."""
    return {**{k: row[k] for k in CHECK_KEYS}, "overrides": row["overrides"], "data_dir": data_dir,
            "method_config": {**BEFORE_THE_SETTING_EXISTED, **row["method_config"]}}


def regenerate(rows: list[dict[str, Any]], runs_path: Path, data_dir: str, jobs: int) -> list[dict[str, Any]]:
    """Re-run every recorded row from this code with its recorded config, into a sibling
    ``*.regenerating.jsonl`` (an interrupted regeneration resumes there). Once every row is redone, the
    fresh rows replace the runs file in the recorded order, and are returned."""
    partial = runs_path.with_suffix(".regenerating.jsonl")
    fresh = _read_rows(partial)
    done = {tuple(r[k] for k in CHECK_KEYS) for r in fresh}
    todo = [_rerun_job(r, data_dir) for r in rows if tuple(r[k] for k in CHECK_KEYS) not in done]
    run_jobs(run_one, todo, jobs, partial, fresh, prepare=_compact, describe=lambda row: (
        f"regenerated {row['tag']:24s} {row['task']} seed {row['seed']}: MAP cross {100 * row['map_cross']:.2f}"))
    by_key = {tuple(r[k] for k in CHECK_KEYS): r for r in fresh}
    ordered = [by_key[tuple(r[k] for k in CHECK_KEYS)] for r in rows]
    write_text_atomic(runs_path, "".join(json.dumps(_compact(r)) + "\n" for r in ordered))
    partial.unlink()
    return [_expand(r) for r in ordered]


CONFIGS_PATH = RESULTS / "couple_dev_configs.json"  # digest -> resolved method config / environment


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the runs file stores it: its config and environment by digest, recorded once in
    ``CONFIGS_PATH`` (written before the row that refers to it). Rows in memory stay expanded."""
    if "method_config_id" in row:
        return row
    configs = _read_configs(CONFIGS_PATH)
    compact = compact_row(row, configs)
    write_json_atomic(CONFIGS_PATH, configs)
    return compact


def _expand(row: dict[str, Any]) -> dict[str, Any]:
    return expand_row(row, _read_configs(CONFIGS_PATH)) if "method_config_id" in row else row


def _read_rows(path: Path) -> list[dict[str, Any]]:
    configs = _read_configs(CONFIGS_PATH)
    return [expand_row(r, configs) for r in _read_runs(path)]


def _parse(items: list[str]) -> dict[str, Any]:
    from crossret.cli import _parse_overrides

    return _parse_overrides(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default $CROSSRET_DATA)")
    parser.add_argument("--tag", default="default", help="name of this configuration in the table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="couple config override (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--tables-only", action="store_true")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="re-run N sampled recorded runs with their recorded configs and compare them exactly "
                        "(writes results/couple_dev_check.*; exit 1 when one moved); nothing else is run or written")
    parser.add_argument("--check-seed", type=int, default=0, help="seed of the --check sample")
    parser.add_argument("--regenerate", action="store_true",
                        help="re-run every recorded row with its recorded config from this code and replace the "
                        "runs file once all are done (resumable), then rewrite the tables")
    args = parser.parse_args(argv)
    _repro.pin_numerics()

    runs_path = RESULTS / "couple_dev_runs.jsonl"
    rows = _read_rows(runs_path)
    if args.check:
        from crossret.data import resolve_data_dir

        return check(rows, args.check, args.check_seed, str(resolve_data_dir(args.data_dir)), args.jobs)
    if args.regenerate:
        from crossret.data import resolve_data_dir

        rows = regenerate(rows, runs_path, str(resolve_data_dir(args.data_dir)), args.jobs)
    elif not args.tables_only:
        from crossret.data import resolve_data_dir

        data_dir = str(resolve_data_dir(args.data_dir))
        overrides = _parse(args.overrides)
        done = {(r["tag"], r["task"], r["bits"], r["seed"]) for r in rows}
        jobs = [{"tag": args.tag, "task": t, "bits": args.bits, "seed": s, "overrides": overrides,
                 "data_dir": data_dir} for t in args.tasks for s in args.seeds
                if (args.tag, t, args.bits, s) not in done]

        run_jobs(run_one, jobs, args.jobs, runs_path, rows, prepare=_compact, describe=lambda row: (
            f"{row['tag']:24s} {row['task']} seed {row['seed']}: MAP cross {100 * row['map_cross']:.2f} "
            f"selected acc {row['selected_accuracy']} all {row['pseudo_label_accuracy']} "
            f"({row['train_seconds']:.0f}s)"))
        rows = [_expand(r) for r in rows]
    summary = summarise(rows)
    write_json_atomic(RESULTS / "couple_dev.json", {"script": "benchmarks/couple_dev.py",
                                                     "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                     "summary": summary,
                                                     # every run is in the runs file; not copied here
                                                     "runs_file": runs_path.name, "runs": len(rows),
                                                     "configs_file": CONFIGS_PATH.name})
    write_text_atomic(RESULTS / "couple_dev.md", markdown(summary))
    return 0


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reference = _reference_maps(rows)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["tag"], row["bits"]), []).append(row)
    out = []
    for (tag, bits), group in groups.items():  # insertion order = the order the tags were tried
        entry: dict[str, Any] = {"tag": tag, "bits": bits, "overrides": group[0]["overrides"],
                                 "differs_from_current_defaults": _differences(group[0]["method_config"])}
        for task in TASKS:
            runs = [r for r in group if r["task"] == task]
            if runs:
                entry[task] = {"map_cross": statistics.mean(r["map_cross"] for r in runs),
                               "seeds": sorted(r["seed"] for r in runs),
                               "selected_accuracy": _mean(r["selected_accuracy"] for r in runs),
                               "pseudo_label_accuracy": _mean(r["pseudo_label_accuracy"] for r in runs)}
                deltas = [r["map_cross"] - reference[(task, bits, r["seed"])] for r in runs
                          if (task, bits, r["seed"]) in reference]
                if deltas and entry["differs_from_current_defaults"]:
                    entry[task].update(paired_delta=statistics.mean(deltas), paired_wins=sum(d > 0 for d in deltas),
                                       paired_seeds=len(deltas))
        maps = [entry[t]["map_cross"] for t in MEAN_TASKS if t in entry]
        entry["mean_map_cross"] = statistics.mean(maps) if len(maps) == len(MEAN_TASKS) else None
        out.append(entry)
    return out


def _reference_maps(rows: list[dict[str, Any]]) -> dict[tuple[str, int, int], float]:
    """Mean cross MAP of the runs with today's default configuration, per (task, bits, seed): the
    reference of the paired differences (a tag is compared with the defaults on the same seeds only,
    because the seed spread of one configuration is larger than most differences between them)."""
    runs: dict[tuple[str, int, int], list[float]] = {}
    for row in rows:
        if not _differences(row["method_config"]):
            runs.setdefault((row["task"], row["bits"], row["seed"]), []).append(row["map_cross"])
    return {key: statistics.mean(values) for key, values in runs.items()}


def _differences(method_config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a recorded run that differ from today's ``couple`` defaults (a setting the row
    predates counts with the value such runs had, :data:`BEFORE_THE_SETTING_EXISTED`)."""
    import dataclasses

    from crossret.hashing.couple import CoupleConfig

    defaults = dataclasses.asdict(CoupleConfig())
    recorded = {**BEFORE_THE_SETTING_EXISTED, **method_config}
    return {k: v for k, v in recorded.items() if k in defaults and defaults[k] != v}


def _mean(values: Any) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept) if kept else None


def markdown(summary: list[dict[str, Any]]) -> str:
    def cell(entry: dict[str, Any], task: str) -> str:
        if task not in entry:
            return "-"
        e = entry[task]
        acc = "/".join(f"{100 * v:.0f}" if v is not None else "-"
                       for v in (e["selected_accuracy"], e["pseudo_label_accuracy"]))
        paired = (f"; Δ {100 * e['paired_delta']:+.2f}, {e['paired_wins']}/{e['paired_seeds']} better"
                  if "paired_delta" in e else "")
        return f"{100 * e['map_cross']:.2f} ({acc}; {len(e['seeds'])} seeds{paired})"

    lines = ["# COUPLE development tasks (MNIST/USPS → optdigits16)", "",
             "Cross-domain MAP@all (%) averaged over seeds; in brackets the pseudo-label accuracy (%) of the "
             "selected set / of all target-train samples at the last refresh, then Δ: the mean paired "
             "difference to the runs of today's defaults on the same seeds, and on how many of those seeds "
             "the tag was better. Each tag is one configuration; the "
             "third column lists how it differs from the *current* `couple` defaults. Written by "
             "`benchmarks/couple_dev.py`.", "",
             "| tag | bits | differs from current defaults | dev-m2opt | dev-u2opt | mean | dev-m200opt |",
             "|---|---:|---|---|---|---:|---|"]
    for e in summary:
        overrides = ", ".join(f"{k}={v}" for k, v in e["differs_from_current_defaults"].items()) or "(defaults)"
        mean = f"{100 * e['mean_map_cross']:.2f}" if e["mean_map_cross"] is not None else "-"
        lines.append(f"| {e['tag']} | {e['bits']} | {overrides} | {cell(e, 'dev-m2opt')} | "
                     f"{cell(e, 'dev-u2opt')} | {mean} | {cell(e, 'dev-m200opt')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
