"""Tables over finished runs: runs grouped by everything but the seed, MAP as mean ± std over seeds.

A group is one (data, method, bits, configuration) where the data is the benchmark name or the pair of
source/target files, and the configuration is the run's ``config.yaml`` without ``seed``, ``out_dir``,
``plots`` and ``data_dir`` (where the files were found), with the method's *resolved* configuration (so a
run given ``--set lr=1e-3`` and one that got the same value by default fall in one group). The std is the
sample standard deviation (``ddof=1``) over the group's runs, 0 for a group of one run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

from crossret.errors import DataError, FileFormatError

__all__ = ["FORMATS", "format_table", "group_runs", "read_run", "summarize_runs"]

FORMATS = ("md", "csv", "json")
_NOT_IDENTITY = ("seed", "out_dir", "plots", "data_dir", "method", "bits", "benchmark", "source", "target",
                 "method_config", "resolved_method_config")
_COLUMNS = ("data", "method", "bits", "config_id", "n_runs", "map_cross_mean", "map_cross_std", "map_single_mean",
            "map_single_std")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``{"run_dir", "config", "metrics"}`` of a finished hashing run (its ``config.yaml`` and ``metrics.json``)."""
    from crossret.runs import run_file
    from crossret.storage.safe_read import read_json_file, read_yaml_mapping

    metrics_path = run_file(run_dir, "metrics.json")
    if not metrics_path.is_file():
        raise DataError(f"{run_dir}: no metrics.json; is this a finished crossret run directory?")
    config_path = run_file(run_dir, "config.yaml")
    if not config_path.is_file():
        raise DataError(f"{run_dir}: no config.yaml; runs are grouped by their saved configuration")
    metrics = read_json_file(metrics_path, "metrics")
    if not isinstance(metrics, dict) or "map_cross" not in metrics or "map_single" not in metrics:
        raise FileFormatError(f"{metrics_path}: not the metrics of a hashing run (no map_cross / map_single)")
    config = read_yaml_mapping(config_path, "run config")
    config = config.get("run", config)
    if not isinstance(config, dict) or "method" not in config or "bits" not in config:
        raise FileFormatError(f"{config_path}: not a run config (no method / bits)")
    return {"run_dir": str(run_dir), "config": config, "metrics": metrics}


def _identity(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(data, configuration)`` of a run: what defines its group besides method and bits."""
    if config.get("benchmark") not in (None, "custom"):
        data = str(config["benchmark"])
    else:
        data = f"{config.get('source')} -> {config.get('target')}"
    rest = {key: value for key, value in config.items() if key not in _NOT_IDENTITY}
    method_config = config.get("resolved_method_config")
    rest["method_config"] = method_config if isinstance(method_config, dict) else config.get("method_config") or {}
    return data, rest


def _config_id(config: dict[str, Any]) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:8]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_runs(run_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Finished runs grouped by everything but the seed, in the order each group first appears.

    One dict per group: ``data``, ``method``, ``bits``, ``config_id`` (a short hash of ``config``),
    ``config`` (without data, method, bits and seed) and ``runs`` (:func:`read_run` of each member).
    """
    if not run_dirs:
        raise DataError("no run directories given")
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for run_dir in run_dirs:
        run = read_run(run_dir)
        data, rest = _identity(run["config"])
        key = (data, str(run["config"]["method"]), int(run["config"]["bits"]), _config_id(rest))
        group = groups.setdefault(key, {"data": data, "method": key[1], "bits": key[2], "config_id": key[3],
                                        "config": rest, "runs": []})
        group["runs"].append(run)
    return list(groups.values())


def summarize_runs(run_dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """One dict per group of finished runs (see :func:`group_runs`), in the order each group first appears.

    Keys: ``data``, ``method``, ``bits``, ``config_id`` (a short hash of ``config``), ``config``,
    ``n_runs``, ``seeds``, ``map_cross_mean``, ``map_cross_std``, ``map_single_mean``, ``map_single_std``
    (and ``map_at_K_*`` likewise when every run has them), ``run_dirs``.
    """
    rows = []
    for group in group_runs(run_dirs):
        members = group["runs"]
        row: dict[str, Any] = {key: group[key] for key in ("data", "method", "bits", "config_id", "config")}
        row["n_runs"] = len(members)
        row["seeds"] = [m["config"].get("seed") for m in members]
        metric_names = ["map_cross", "map_single"]
        metric_names += sorted(name for name in members[0]["metrics"]
                               if name.startswith("map_at_") and all(name in m["metrics"] for m in members))
        for name in metric_names:
            values = [m["metrics"][name] for m in members]
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
                raise FileFormatError(f"{members[0]['run_dir']}: {name} is not a number in every run of its group")
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([float(v) for v in values])
        row["run_dirs"] = [m["run_dir"] for m in members]
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], fmt: str = "md") -> str:
    """The groups of :func:`summarize_runs` as a Markdown table, CSV, or a JSON array (one object per group)."""
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return json.dumps(list(rows), separators=(",", ":"))
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for row in rows:
            writer.writerow([row[column] for column in _COLUMNS])
        return buffer.getvalue().rstrip("\n")
    lines = ["| data | method | bits | config | runs | MAP cross (mean ± std) | MAP single (mean ± std) |",
             "|---|---|---:|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['data']} | {row['method']} | {row['bits']} | {row['config_id']} | {row['n_runs']} | "
                     f"{row['map_cross_mean']:.4f} ± {row['map_cross_std']:.4f} | "
                     f"{row['map_single_mean']:.4f} ± {row['map_single_std']:.4f} |")
    return "\n".join(lines)

