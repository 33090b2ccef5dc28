"""Plots that overlay several runs: one curve per group of runs, the mean over the group's seeds.

Groups are those of :func:`crossret.report.table.group_runs` (data, method, bits and configuration;
runs that differ only in the seed form one group). Per retrieval setting (``cross``, ``single``):

* ``pr_rank_<setting>.png``: P-R by rank position, one curve per group ("method, bits b"), the mean
  recall and mean precision at each rank of the dense grid the runs hold (``curves[setting]["pr_rank"]``);
* ``precision_at_n_<setting>.png``: precision@N against N (log scale), one curve per group, over the ranks of
  that grid together with the run's requested N (``precision_at[setting]``);
* ``map_vs_bits_<setting>.png``: MAP against code length, one line per (method, configuration), error
  bars the sample standard deviation over the seeds (``ddof=1``; none for a group of one run).

A point is drawn where every run of its group defines it. Runs of different data are refused.
:func:`plan_overlay_plots` computes every series first (so nothing is written when a run is unusable);
:func:`draw_overlay_plot` draws one figure and reads back the series its axes hold.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossret.errors import DataError
from crossret.report.plots import _SETTING_TITLES, SETTINGS, _new_figure, _note_if_empty, _number, _save

__all__ = ["DrawnPlot", "OverlayPlot", "Series", "draw_overlay_plot", "plan_overlay_plots", "write_overlay_plots"]

_KINDS = ("pr_rank", "precision_at_n", "map_vs_bits")


@dataclass(frozen=True)
class Series:
    """One curve of a figure: its legend label, coordinates and, for MAP vs bits, the error of each point
    (``None`` where no error bar is drawn)."""

    label: str
    x: list[float]
    y: list[float]
    yerr: list[float | None] | None = None


@dataclass(frozen=True)
class OverlayPlot:
    """One figure to write: its file, kind (``pr_rank``, ``precision_at_n``, ``map_vs_bits``), setting,
    data name and series."""

    path: Path
    kind: str
    setting: str
    data: str
    series: list[Series]


@dataclass(frozen=True)
class DrawnPlot:
    """A written figure and the series read back from its axes."""

    path: Path
    series: list[Series]


# ------------------------------------------------------------------ series


def _curve(run: Mapping[str, Any], setting: str) -> Mapping[str, Any]:
    """The ``pr_rank`` curve of a run (from :func:`read_run`) in ``setting``, its lists checked."""
    curves = run["metrics"].get("curves")
    curve = curves.get(setting, {}).get("pr_rank") if isinstance(curves, Mapping) else None
    if not isinstance(curve, Mapping):
        raise DataError(f"{run['run_dir']}: metrics.json has no curves[{setting!r}]['pr_rank']; run it again with "
                        "this crossret to get its curves")
    lists = [curve.get(field) for field in ("n", "precision", "recall")]
    if not all(isinstance(values, list) for values in lists) or len({len(values) for values in lists}) != 1:
        raise DataError(f"{run['run_dir']}: curves[{setting!r}]['pr_rank'] needs lists n, precision and recall of "
                        "one length; is metrics.json intact?")
    return curve


def _ranks(run: Mapping[str, Any], values: Sequence[Any], setting: str) -> list[int]:
    ranks = []
    for value in values:
        number = _number(value)
        if number is None or number != int(number) or number < 1:
            raise DataError(f"{run['run_dir']}: rank {value!r} in its {setting!r} curves is not a positive "
                            "integer; is metrics.json intact?")
        ranks.append(int(number))
    return ranks


def _mean_where_defined(columns: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Per position, the mean over runs; ``None`` where some run leaves it undefined."""
    return [statistics.fmean(col) if all(v is not None for v in col) else None  # type: ignore[arg-type]
            for col in zip(*columns, strict=True)]


def _same_ranks(members: Sequence[Mapping[str, Any]], ranks: Sequence[Sequence[int]], setting: str,
                what: str) -> None:
    for run, own in zip(members[1:], ranks[1:], strict=True):
        if list(own) != list(ranks[0]):
            raise DataError(f"{run['run_dir']}: its {what} ranks ({setting}) differ from those of "
                            f"{members[0]['run_dir']} in the same group; report runs of one protocol together")


def _pr_rank_series(group: Mapping[str, Any], setting: str, label: str) -> Series:
    members = group["runs"]
    curves = [_curve(run, setting) for run in members]
    _same_ranks(members, [_ranks(run, c["n"], setting) for run, c in zip(members, curves, strict=True)], setting,
                "pr_rank")
    recall = _mean_where_defined([[_number(v) for v in c["recall"]] for c in curves])
    precision = _mean_where_defined([[_number(v) for v in c["precision"]] for c in curves])
    points = [(r, p) for r, p in zip(recall, precision, strict=True) if r is not None and p is not None]
    return Series(label, [p[0] for p in points], [p[1] for p in points])


def _precision_table(run: Mapping[str, Any], setting: str) -> dict[int, float | None]:
    """Precision@N of a run over its rank grid and its requested N."""
    curve = _curve(run, setting)
    table = dict(zip(_ranks(run, curve["n"], setting), (_number(v) for v in curve["precision"]), strict=True))
    requested = run["metrics"].get("precision_at", {})
    requested = requested.get(setting) if isinstance(requested, Mapping) else None
    if isinstance(requested, Mapping):
        table.update(zip(_ranks(run, list(requested), setting), (_number(v) for v in requested.values()),
                         strict=True))
    return table


def _precision_series(group: Mapping[str, Any], setting: str, label: str) -> Series:
    members = group["runs"]
    tables = [_precision_table(run, setting) for run in members]
    _same_ranks(members, [sorted(t) for t in tables], setting, "precision@N")
    ns = sorted(tables[0])
    means = _mean_where_defined([[t[n] for n in ns] for t in tables])
    points = [(float(n), m) for n, m in zip(ns, means, strict=True) if m is not None]
    return Series(label, [p[0] for p in points], [p[1] for p in points])


def _map_values(group: Mapping[str, Any], setting: str) -> list[float]:
    values = []
    for run in group["runs"]:
        value = run["metrics"].get(f"map_{setting}")
        if _number(value) is None:
            raise DataError(f"{run['run_dir']}: map_{setting} in metrics.json is not a finite number; is the run "
                            "intact?")
        values.append(float(value))
    return values


def _map_series(groups: Sequence[Mapping[str, Any]], setting: str, label: str) -> Series:
    points = []
    for group in sorted(groups, key=lambda g: g["bits"]):
        values = _map_values(group, setting)
        std = statistics.stdev(values) if len(values) > 1 else None
        points.append((float(group["bits"]), statistics.fmean(values), std))
    return Series(label, [p[0] for p in points], [p[1] for p in points], [p[2] for p in points])


def _group_labels(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """``method, bits b``, with the configuration's id where two groups would share a label."""
    plain = [f"{g['method']}, {g['bits']} b" for g in groups]
    return [f"{label} [{g['config_id']}]" if plain.count(label) > 1 else label
            for label, g in zip(plain, groups, strict=True)]


def _check_one_data(groups: Sequence[Mapping[str, Any]]) -> str:
    first = groups[0]
    for group in groups[1:]:
        if group["data"] != first["data"]:
            raise DataError(f"runs of different data in one report: {first['data']} ({first['runs'][0]['run_dir']}) "
                            f"and {group['data']} ({group['runs'][0]['run_dir']}); report each data set separately")
    return str(first["data"])


def plan_overlay_plots(groups: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[OverlayPlot]:
    """The figures overlaying ``groups`` (from :func:`crossret.report.table.group_runs`) in ``out_dir``, with
    every series computed; a :class:`DataError` for runs of different data or unusable metrics."""
    groups = list(groups)
    if not groups:
        raise DataError("no runs to plot: pass at least one run directory")
    data = _check_one_data(groups)
    out_dir = Path(out_dir)
    labels = _group_labels(groups)
    curve_settings = [s for s in SETTINGS
                      if any(isinstance(run["metrics"].get("curves"), Mapping) and s in run["metrics"]["curves"]
                             for g in groups for run in g["runs"])]
    lines: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for group in groups:
        lines.setdefault((group["method"], group["config_id"]), []).append(group)
    methods = [method for method, _ in lines]
    plots = []
    for setting in SETTINGS:
        if setting in curve_settings:
            plots.append(OverlayPlot(out_dir / f"pr_rank_{setting}.png", "pr_rank", setting, data,
                                     [_pr_rank_series(g, setting, label) for g, label in zip(groups, labels,
                                                                                             strict=True)]))
            plots.append(OverlayPlot(out_dir / f"precision_at_n_{setting}.png", "precision_at_n", setting, data,
                                     [_precision_series(g, setting, label) for g, label in zip(groups, labels,
                                                                                               strict=True)]))
        series = [_map_series(members, setting, method if methods.count(method) == 1 else f"{method} [{config_id}]")
                  for (method, config_id), members in lines.items()]
        plots.append(OverlayPlot(out_dir / f"map_vs_bits_{setting}.png", "map_vs_bits", setting, data, series))
    return plots


# ------------------------------------------------------------------ drawing


def _read_back(ax: Any) -> list[Series]:
    """The labelled series the axes hold: plain lines, and error-bar lines with the half-length of each bar."""
    series = []
    bar_lines = set()
    for container in ax.containers:
        data_line, _, bar_collections = container.lines
        bar_lines.add(id(data_line))
        halves: dict[float, float] = {}
        for collection in bar_collections or ():
            for segment in collection.get_segments():
                if len(segment) == 2:  # a point without an error bar (NaN) holds an empty segment
                    (x, low), (_, high) = segment.tolist()
                    halves[float(x)] = (high - low) / 2
        xs = [float(x) for x in data_line.get_xdata()]
        series.append(Series(str(container.get_label()), xs, [float(y) for y in data_line.get_ydata()],
                             [halves.get(x) for x in xs]))
    for line in ax.get_lines():
        if id(line) in bar_lines or str(line.get_label()).startswith("_"):
            continue
        series.append(Series(str(line.get_label()), [float(x) for x in line.get_xdata()],
                             [float(y) for y in line.get_ydata()]))
    return series


def draw_overlay_plot(plot: OverlayPlot) -> DrawnPlot:
    """Draw and write one figure of :func:`plan_overlay_plots`; returns the series read back from its axes."""
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = [s for s in plot.series if s.x]
    for s in drawn:
        if plot.kind == "map_vs_bits":
            yerr = [math.nan if e is None else e for e in s.yerr or []]
            ax.errorbar(s.x, s.y, yerr=yerr if any(e is not None for e in s.yerr or []) else None, marker="o",
                        capsize=3, label=s.label)
        else:
            ax.plot(s.x, s.y, marker="." if len(s.x) < 80 else None, label=s.label)
    _note_if_empty(ax, len(drawn))
    where = _SETTING_TITLES[plot.setting]
    if plot.kind == "pr_rank":
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        title = "P-R by rank position"
    elif plot.kind == "precision_at_n":
        ax.set_xscale("log")
        ax.set_xlabel("N (number of top-ranked items, log scale)")
        ax.set_ylabel("precision@N")
        ax.set_ylim(-0.02, 1.02)
        title = "precision@N"
    else:
        bits = sorted({x for s in drawn for x in s.x})
        if bits:
            ax.set_xticks(bits)
            ax.set_xticklabels([f"{b:g}" for b in bits])
        ax.set_xlabel("code length (bits)")
        ax.set_ylabel(f"MAP ({where})")
        title = "MAP vs code length"
    ax.grid(True, alpha=0.3)
    what = "mean ± std over seeds" if plot.kind == "map_vs_bits" else "mean over seeds"
    ax.set_title(f"{title} — {plot.data} — {where}\n({what})", fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    series = _read_back(ax)
    return DrawnPlot(_save(fig, plot.path), series)


def write_overlay_plots(groups: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[DrawnPlot]:
    """Write every figure of :func:`plan_overlay_plots` (existing files are replaced: callers check them
    first with :func:`crossret.runs.check_output_file`)."""
    return [draw_overlay_plot(plot) for plot in plan_overlay_plots(groups, out_dir)]
