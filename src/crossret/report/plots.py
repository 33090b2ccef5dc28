"""Report plots (PNG): P-R curves, precision@N and MAP vs code length.

Inputs are the metrics dicts a run writes (``metrics.json``), of which these parts are read::

    "curves": {"cross": {"pr_radius": {"radius": [...], "precision": [...], "recall": [...]},
                         "pr_rank": {"n": [...], "precision": [...], "recall": [...]}},
               "single": {...}},
    "precision_at": {"cross": {"100": 0.5, ...}, "single": {...}},
    "method": "itq", "benchmark": "digits-m2u", "bits": 64, "ties": "expected"

Undefined points (``None`` or NaN, e.g. the precision at a radius where nothing is retrieved) are
skipped. Figures are drawn with matplotlib's object API on an Agg canvas: no display, no pyplot
global state, no change of the process-wide backend. Files are written atomically, with the PNG
text ``Software: crossret VERSION``, by which ``crossret report --overwrite`` recognises its own plots
(:func:`crossret.runs.check_output_file`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crossret.errors import ConfigError, DataError
from crossret.storage.atomic import write_bytes_atomic

__all__ = ["SETTINGS", "plot_map_vs_bits", "plot_pr_curves", "plot_precision_at_n", "run_plot_files",
           "write_run_plots"]

SETTINGS = ("cross", "single")
_SETTING_TITLES = {"cross": "cross-domain database", "single": "single-domain database"}
_CURVE_KEYS = {"radius": "pr_radius", "rank": "pr_rank"}
_DPI = 120


# ------------------------------------------------------------------ helpers


def _new_figure(width: float = 6.0, height: float = 4.5) -> Any:
    # Imported lazily (matplotlib is slow to import) and via the object API so the caller's pyplot
    # backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    from crossret import __version__

    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight",
                metadata={"Software": f"crossret {__version__}"})
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _number(value: Any) -> float | None:
    """A finite float, or None for missing/undefined values (None, NaN, inf)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _points(xs: Sequence[Any], ys: Sequence[Any], what: str) -> tuple[list[float], list[float]]:
    """Pairs with both coordinates defined; lengths must agree."""
    if len(xs) != len(ys):
        raise DataError(f"{what}: the curve's lists have different lengths ({len(xs)} and {len(ys)})")
    pairs = [(x, y) for x, y in ((_number(a), _number(b)) for a, b in zip(xs, ys, strict=True))
             if x is not None and y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _check_runs(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(runs, Mapping) or isinstance(runs, (str, bytes)):
        raise DataError("runs must be a sequence of metrics dicts (wrap a single run in a list)")
    runs = list(runs)
    if not runs:
        raise DataError("no runs to plot: pass at least one metrics dict")
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise DataError(f"run {i}: expected a metrics dict, got {type(run).__name__}")
    return runs


def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")


def _label(run: Mapping[str, Any]) -> str:
    method = run.get("method", "?")
    bits = run.get("bits")
    return f"{method} ({bits} bits)" if bits is not None else str(method)


def _run_name(run: Mapping[str, Any], i: int) -> str:
    return f"run {i} ({_label(run)})"


def _curve(run: Mapping[str, Any], i: int, setting: str, key: str) -> Mapping[str, Any]:
    curves = run.get("curves")
    if not isinstance(curves, Mapping) or not isinstance(curves.get(setting), Mapping):
        raise DataError(f"{_run_name(run, i)}: no curves for the {setting!r} setting in its metrics")
    curve = curves[setting].get(key)
    if not isinstance(curve, Mapping):
        raise DataError(f"{_run_name(run, i)}: curves[{setting!r}] has no {key!r} curve")
    for field in ("precision", "recall"):
        if not isinstance(curve.get(field), Sequence):
            raise DataError(f"{_run_name(run, i)}: curves[{setting!r}][{key!r}] has no {field!r} list")
    return curve


def _shared(runs: Sequence[Mapping[str, Any]], key: str) -> Any:
    values = {str(run.get(key)) for run in runs if run.get(key) is not None}
    return values.pop() if len(values) == 1 else None


def _title(runs: Sequence[Mapping[str, Any]], what: str, setting: str | None) -> str:
    parts = [what]
    benchmark = _shared(runs, "benchmark")
    if benchmark:
        parts.append(benchmark)
    bits = _shared(runs, "bits")
    if bits and len(runs) == 1:
        parts.append(f"{bits} bits")
    if setting:
        parts.append(_SETTING_TITLES[setting])
    ties = _shared(runs, "ties")
    title = " — ".join(parts)
    return f"{title}\n(ties: {ties})" if ties else title


def _note_if_empty(ax: Any, drawn: int) -> None:
    if not drawn:
        # Still write the figure: a run where nothing is defined should not abort a report.
        ax.text(0.5, 0.5, "no defined points", ha="center", va="center", transform=ax.transAxes)


# ------------------------------------------------------------------ public plots


def plot_pr_curves(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike, setting: str = "cross",
                   by: str = "radius") -> Path:
    """Precision-recall curves, one per run ("method (bits)"), by Hamming radius or by rank position."""
    runs = _check_runs(runs)
    _check_setting(setting)
    if by not in _CURVE_KEYS:
        raise ConfigError(f"by must be 'radius' or 'rank', got {by!r}")
    key = _CURVE_KEYS[by]
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, run in enumerate(runs):
        curve = _curve(run, i, setting, key)
        recall, precision = _points(curve["recall"], curve["precision"], f"{_run_name(run, i)} {key}")
        if recall:
            ax.plot(recall, precision, marker="." if len(recall) < 80 else None, label=_label(run))
            drawn += 1
    _note_if_empty(ax, drawn)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    how = "Hamming radius" if by == "radius" else "rank position"
    ax.set_title(_title(runs, f"P-R by {how}", setting), fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _precision_at(run: Mapping[str, Any], i: int, setting: str) -> tuple[list[float], list[float]]:
    table = run.get("precision_at")
    if isinstance(table, Mapping) and isinstance(table.get(setting), Mapping):
        items = table[setting]
        try:
            ns = [int(n) for n in items]
        except (TypeError, ValueError):
            raise DataError(f"{_run_name(run, i)}: precision_at[{setting!r}] keys must be integers N") from None
        xs, ys = _points(ns, list(items.values()), f"{_run_name(run, i)} precision_at")
    else:
        # Fall back on the rank curve, which holds the same numbers.
        curve = _curve(run, i, setting, "pr_rank")
        if not isinstance(curve.get("n"), Sequence):
            raise DataError(f"{_run_name(run, i)}: no precision_at[{setting!r}] and no N list in its pr_rank curve")
        xs, ys = _points(curve["n"], curve["precision"], f"{_run_name(run, i)} pr_rank")
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[j] for j in order], [ys[j] for j in order]


def plot_precision_at_n(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                        setting: str = "cross") -> Path:
    """Precision@N against N, one line per run."""
    runs = _check_runs(runs)
    _check_setting(setting)
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, run in enumerate(runs):
        ns, precision = _precision_at(run, i, setting)
        if ns:
            ax.plot(ns, precision, marker="o", markersize=3, label=_label(run))
            drawn += 1
    _note_if_empty(ax, drawn)
    ax.set_xlabel("N (number of top-ranked items)")
    ax.set_ylabel("precision@N")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(_title(runs, "precision@N", setting), fontsize=10)
    if drawn:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_map_vs_bits(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                     setting: str = "cross") -> Path:
    """MAP against code length, one line per method. ``rows`` hold method, bits, map_cross/map_single."""
    rows = _check_runs(rows)
    _check_setting(setting)
    key = f"map_{setting}"
    series: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        if "method" not in row or "bits" not in row:
            raise DataError(f"row {i}: needs 'method' and 'bits' (got keys {sorted(row)})")
        if key not in row:
            raise DataError(f"row {i} ({_label(row)}): no {key!r} value")
        bits, value = _number(row["bits"]), _number(row[key])
        if bits is not None and value is not None:
            series.setdefault(str(row["method"]), []).append((bits, value))
    fig = _new_figure()
    ax = fig.add_subplot()
    all_bits: set[float] = set()
    for method, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        all_bits.update(p[0] for p in points)
    _note_if_empty(ax, len(series))
    if all_bits:
        ax.set_xticks(sorted(all_bits))
        ax.set_xticklabels([f"{b:g}" for b in sorted(all_bits)])
    ax.set_xlabel("code length (bits)")
    ax.set_ylabel(f"MAP ({_SETTING_TITLES[setting]})")
    ax.grid(True, alpha=0.3)
    benchmark = _shared(rows, "benchmark")
    ax.set_title(f"MAP vs code length{' — ' + benchmark if benchmark else ''}", fontsize=10)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def run_plot_files(metrics: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The files :func:`write_run_plots` writes for ``metrics`` into ``out_dir``, in order (so a caller
    can check them before anything is drawn)."""
    return [path for path, _ in _run_plot_plan(metrics, Path(out_dir))]


def write_run_plots(metrics: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write the P-R (radius, rank) and precision@N plots of one run for every setting it has.

    Files: ``pr_radius_<setting>.png``, ``pr_rank_<setting>.png``, ``precision_at_n_<setting>.png``
    (and ``training_diagnostics.png`` when the metrics hold per-epoch diagnostics).
    Returns the written paths.
    """
    return [draw(path) for path, draw in _run_plot_plan(metrics, Path(out_dir))]


def _run_plot_plan(metrics: Mapping[str, Any], out_dir: Path) -> list[tuple[Path, Any]]:
    """``(path, draw)`` pairs of a run's plots; ``draw(path)`` writes one."""
    if not isinstance(metrics, Mapping):
        raise DataError(f"metrics must be a dict (a run's metrics.json), got {type(metrics).__name__}")
    curves = metrics.get("curves")
    settings = [s for s in SETTINGS if isinstance(curves, Mapping) and isinstance(curves.get(s), Mapping)]
    if not settings:
        raise DataError("the metrics hold no curves for the 'cross' or 'single' setting; nothing to plot")
    plan: list[tuple[Path, Any]] = []
    for setting in settings:
        available = curves[setting]
        for by, key in _CURVE_KEYS.items():
            if key in available:
                plan.append((out_dir / f"{key}_{setting}.png",
                             lambda p, _s=setting, _by=by: plot_pr_curves([metrics], p, _s, _by)))
        plan.append((out_dir / f"precision_at_n_{setting}.png",
                     lambda p, _s=setting: plot_precision_at_n([metrics], p, _s)))
    diagnostics = metrics.get("diagnostics")
    if isinstance(diagnostics, Mapping) and isinstance(diagnostics.get("epochs"), list) and diagnostics["epochs"]:
        plan.append((out_dir / "training_diagnostics.png", lambda p: plot_training_diagnostics(diagnostics, p)))
    return plan


_LOSS_KEYS = ("loss_total", "loss_ce", "loss_target_ce", "loss_quant", "loss_relation", "loss_mix_low",
              "loss_mix_high")


def plot_training_diagnostics(diagnostics: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Per-epoch training diagnostics of an adaptive method (COUPLE's ``diagnostics``), four panels:
    loss terms; selected-set size and its pseudo-label accuracy (from ``label_report``, i.e. the
    target labels used for reporting only); cross-domain edges and targets reached; the fraction
    of diffusion mass that ends on target nodes."""
    epochs = diagnostics.get("epochs")
    if not isinstance(epochs, list) or not epochs or not all(isinstance(e, Mapping) for e in epochs):
        raise DataError("diagnostics hold no per-epoch records ('epochs'); nothing to plot")
    fig = _new_figure(11.0, 8.0)
    axes = fig.subplots(2, 2)
    ax = axes[0][0]
    for key in _LOSS_KEYS:
        xs, ys = _points([e.get("epoch") for e in epochs if key in e], [e.get(key) for e in epochs if key in e], key)
        positive = [(x, y) for x, y in zip(xs, ys, strict=True) if y > 0]
        if positive:
            ax.plot(*zip(*positive, strict=True), label=key.removeprefix("loss_"))
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title("loss terms (epoch means)")
    ax.legend(fontsize=7)

    refreshes = [e for e in epochs if "selected" in e]
    ax = axes[0][1]
    if refreshes:
        ax.plot([e["epoch"] for e in refreshes], [e["selected"] for e in refreshes], "o-", label="selected targets")
        ax.set_ylabel("targets")
    quality = diagnostics.get("label_report", {})
    rows = quality.get("selection_quality", []) if isinstance(quality, Mapping) else []
    rows = [r for r in rows if isinstance(r, Mapping) and _number(r.get("selected_accuracy")) is not None]
    if rows:
        twin = ax.twinx()
        twin.plot([r["epoch"] for r in rows], [r["selected_accuracy"] for r in rows], "s--", color="C3",
                  label="pseudo-label accuracy of the selected set")
        twin.plot([r["epoch"] for r in rows], [r["pseudo_label_accuracy"] for r in rows], "^:", color="C2",
                  label="pseudo-label accuracy, all targets")
        twin.set_ylim(0, 1)
        twin.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("epoch")
    ax.set_title("low-noise target set (accuracy: report only)")
    _note_if_empty(ax, len(refreshes))

    ax = axes[1][0]
    drawn = 0
    for key, label in (("graph_edges_cross", "cross-domain edges"), ("targets_reached", "targets reached"),
                       ("graph_targets_with_cross_edge", "targets with a cross edge")):
        points = [(e["epoch"], e[key]) for e in refreshes if _number(e.get(key)) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=label)
            drawn += 1
    ax.set_xlabel("epoch")
    ax.set_title("graph")
    if drawn:
        ax.legend(fontsize=7)
    _note_if_empty(ax, drawn)

    ax = axes[1][1]
    points = [(e["epoch"], e["diffusion_mass_to_target"]) for e in refreshes
              if _number(e.get("diffusion_mass_to_target")) is not None]
    if points:
        ax.plot(*zip(*points, strict=True), "o-")
        ax.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.set_title("fraction of diffusion mass on target nodes")
    _note_if_empty(ax, len(points))
    fig.tight_layout()
    return _save(fig, path)
