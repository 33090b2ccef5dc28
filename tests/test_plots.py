"""Report plots: PNGs are written (atomically, valid, non-trivial) and bad input fails clearly."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossret.errors import ConfigError, DataError
from crossret.report import plot_map_vs_bits, plot_pr_curves, plot_precision_at_n, write_run_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _setting_curves(rng: np.random.Generator, bits: int) -> dict[str, Any]:
    recall = np.sort(rng.random(bits + 1))
    precision: list[float | None] = list(np.sort(rng.random(bits + 1))[::-1])
    precision[:3] = [None, None, None]  # nothing retrieved at the smallest radii
    ns = list(range(100, 1001, 100))
    return {
        "pr_radius": {"radius": list(range(bits + 1)), "precision": precision, "recall": recall.tolist()},
        "pr_rank": {"n": ns, "precision": np.linspace(0.8, 0.4, 10).tolist(),
                    "recall": np.linspace(0.05, 0.6, 10).tolist()},
    }


def make_metrics(method: str = "itq", bits: int = 16, settings: tuple[str, ...] = ("cross", "single"),
                 seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    curves = {s: _setting_curves(rng, bits) for s in settings}
    return {
        "method": method, "benchmark": "digits-m2u", "bits": bits, "ties": "expected",
        "curves": curves,
        "precision_at": {s: {str(n): p for n, p in zip(c["pr_rank"]["n"], c["pr_rank"]["precision"], strict=True)}
                         for s, c in curves.items()},
        **{f"map_{s}": 0.4 for s in settings},
    }


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is suspiciously small ({len(data)} bytes)"


def test_write_run_plots_both_settings(tmp_path: Path) -> None:
    metrics = json.loads(json.dumps(make_metrics()))  # exactly what metrics.json round-trips to
    paths = write_run_plots(metrics, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{kind}_{s}.png" for kind in ("pr_radius", "pr_rank", "precision_at_n")
                           for s in ("cross", "single"))
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert_png(path)
    # Atomic writes leave no temporary files behind.
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == names


def test_write_run_plots_cross_only_and_nan_points(tmp_path: Path) -> None:
    metrics = make_metrics(settings=("cross",))
    metrics["curves"]["cross"]["pr_rank"]["recall"][4] = float("nan")
    paths = write_run_plots(metrics, tmp_path)
    assert sorted(p.name for p in paths) == ["pr_radius_cross.png", "pr_rank_cross.png",
                                             "precision_at_n_cross.png"]
    for path in paths:
        assert_png(path)


def test_all_points_undefined_still_writes_a_figure(tmp_path: Path) -> None:
    metrics = make_metrics(settings=("cross",))
    radius = metrics["curves"]["cross"]["pr_radius"]
    radius["precision"] = [None] * len(radius["precision"])
    path = plot_pr_curves([metrics], tmp_path / "empty.png")
    assert_png(path, min_bytes=1000)


def test_none_points_are_skipped_not_plotted_as_zero(tmp_path: Path) -> None:
    # Same figure whether the undefined points are None or simply absent.
    metrics = make_metrics(settings=("cross",))
    trimmed = copy.deepcopy(metrics)
    curve = trimmed["curves"]["cross"]["pr_radius"]
    for key in ("radius", "precision", "recall"):
        curve[key] = curve[key][3:]
    a = plot_pr_curves([metrics], tmp_path / "a.png").read_bytes()
    b = plot_pr_curves([trimmed], tmp_path / "b.png").read_bytes()
    assert a == b


def test_several_runs_and_map_vs_bits(tmp_path: Path) -> None:
    runs = [make_metrics(m, b, seed=i) for i, (m, b) in enumerate([("lsh", 16), ("itq", 16), ("itq", 64)])]
    for by in ("radius", "rank"):
        assert_png(plot_pr_curves(runs, tmp_path / f"pr_{by}.png", setting="single", by=by))
    assert_png(plot_precision_at_n(runs, tmp_path / "pn.png"))
    rows = [{"method": m, "bits": b, "map_cross": 0.1 * b / 16, "map_single": None, "benchmark": "digits-m2u"}
            for m in ("lsh", "itq") for b in (16, 32, 64)]
    assert_png(plot_map_vs_bits(rows, tmp_path / "map.png"))
    assert_png(plot_map_vs_bits(rows, tmp_path / "map_single.png", setting="single"), min_bytes=1000)


def test_precision_at_falls_back_on_rank_curve(tmp_path: Path) -> None:
    metrics = make_metrics(settings=("cross",))
    del metrics["precision_at"]
    assert_png(plot_precision_at_n([metrics], tmp_path / "pn.png"))


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no runs"):
        plot_pr_curves([], tmp_path / "x.png")
    with pytest.raises(DataError, match="no runs"):
        plot_map_vs_bits([], tmp_path / "x.png")
    with pytest.raises(DataError, match="sequence of metrics dicts"):
        plot_pr_curves(make_metrics(), tmp_path / "x.png")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="'single'"):
        plot_pr_curves([make_metrics(settings=("cross",))], tmp_path / "x.png", setting="single")
    with pytest.raises(ConfigError, match="setting"):
        plot_precision_at_n([make_metrics()], tmp_path / "x.png", setting="both")
    with pytest.raises(ConfigError, match="by must be"):
        plot_pr_curves([make_metrics()], tmp_path / "x.png", by="distance")
    broken = make_metrics()
    broken["curves"]["cross"]["pr_radius"]["recall"].pop()
    with pytest.raises(DataError, match="different lengths"):
        plot_pr_curves([broken], tmp_path / "x.png")
    with pytest.raises(DataError, match="nothing to plot"):
        write_run_plots({"method": "itq"}, tmp_path)
    with pytest.raises(DataError, match="map_cross"):
        plot_map_vs_bits([{"method": "itq", "bits": 16}], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())  # failures write nothing


def test_plots_do_not_touch_pyplot_backend(tmp_path: Path) -> None:
    before = "matplotlib.pyplot" in sys.modules
    write_run_plots(make_metrics(settings=("cross",)), tmp_path)
    assert ("matplotlib.pyplot" in sys.modules) == before
