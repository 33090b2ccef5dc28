"""`crossret report RUN...` over several runs: group means over seeds on the runs' dense rank grid, MAP vs
bits with the sample std over seeds, and the refusals (no --out, mixed data, existing plots)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from _cli import cli
from crossret.data import load_benchmark
from crossret.experiment import RunConfig, run_experiment
from crossret.report import overlay
from crossret.report.overlay import draw_overlay_plot, plan_overlay_plots
from crossret.report.table import group_runs
from crossret.runs import _is_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS, BITS, SEEDS = ("lsh", "itq"), (16, 32), (0, 1)
MULTI_FILES = {f"{kind}_{setting}.png" for kind in ("pr_rank", "precision_at_n", "map_vs_bits")
               for setting in ("cross", "single")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int, int], Path]:
    """lsh and itq on the demo benchmark at 16 and 32 bits, seeds 0 and 1."""
    root = tmp_path_factory.mktemp("runs")
    split = load_benchmark("demo", None)
    out = {}
    for method in METHODS:
        for bits in BITS:
            for seed in SEEDS:
                path = root / f"{method}-{bits}-{seed}"
                run_experiment(RunConfig(method=method, benchmark="demo", bits=bits, seed=seed, out_dir=str(path)),
                               split=split)
                out[(method, bits, seed)] = path
    return out


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _record_draws(monkeypatch: pytest.MonkeyPatch) -> dict[str, overlay.DrawnPlot]:
    """Record what every figure drawn through the CLI holds, by file name."""
    drawn: dict[str, overlay.DrawnPlot] = {}
    real = overlay.draw_overlay_plot

    def recording(plot: overlay.OverlayPlot) -> overlay.DrawnPlot:
        result = real(plot)
        drawn[result.path.name] = result
        return result

    monkeypatch.setattr(overlay, "draw_overlay_plot", recording)
    return drawn


def _by_label(drawn: overlay.DrawnPlot) -> dict[str, overlay.Series]:
    labels = [s.label for s in drawn.series]
    assert len(set(labels)) == len(labels)
    return {s.label: s for s in drawn.series}


def test_report_overlays_group_means_over_seeds(runs, tmp_path, monkeypatch, capsys) -> None:
    drawn = _record_draws(monkeypatch)
    out = tmp_path / "plots"
    code, stdout, stderr = cli(monkeypatch, capsys, "report", *runs.values(), "--out", out)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == MULTI_FILES == set(drawn)
    assert {Path(line).name for line in stdout.splitlines()} == MULTI_FILES
    for path in out.iterdir():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
        assert _is_plot(path)

    metrics = {key: _metrics(path) for key, path in runs.items()}
    for setting in ("cross", "single"):
        pr = _by_label(drawn[f"pr_rank_{setting}.png"])
        at_n = _by_label(drawn[f"precision_at_n_{setting}.png"])
        assert set(pr) == set(at_n) == {f"{m}, {b} b" for m in METHODS for b in BITS}
        for method in METHODS:
            for bits in BITS:
                members = [metrics[(method, bits, seed)] for seed in SEEDS]
                curves = [m["curves"][setting]["pr_rank"] for m in members]
                assert curves[0]["n"] == curves[1]["n"] and len(curves[0]["n"]) > 50  # the dense grid
                series = pr[f"{method}, {bits} b"]
                np.testing.assert_allclose(series.x, np.mean([c["recall"] for c in curves], axis=0), rtol=1e-12)
                np.testing.assert_allclose(series.y, np.mean([c["precision"] for c in curves], axis=0), rtol=1e-12)
                # precision@N: the grid's ranks and the requested N, averaged over the seeds
                tables = [dict(zip(c["n"], c["precision"], strict=True)) for c in curves]
                for table, m in zip(tables, members, strict=True):
                    table.update({int(n): p for n, p in m["precision_at"][setting].items()})
                ns = sorted(tables[0])
                assert {100, 500, 800} <= set(ns) and len(ns) > len(curves[0]["n"])
                series = at_n[f"{method}, {bits} b"]
                assert series.x == [float(n) for n in ns]
                np.testing.assert_allclose(series.y, [np.mean([t[n] for t in tables]) for n in ns], rtol=1e-12)

        lines = _by_label(drawn[f"map_vs_bits_{setting}.png"])
        assert set(lines) == set(METHODS)
        for method in METHODS:
            values = np.array([[metrics[(method, bits, seed)][f"map_{setting}"] for seed in SEEDS] for bits in BITS])
            assert lines[method].x == [float(b) for b in BITS]
            np.testing.assert_allclose(lines[method].y, values.mean(axis=1), rtol=1e-12)
            np.testing.assert_allclose(lines[method].yerr, values.std(axis=1, ddof=1), rtol=1e-9)
            assert all(e > 0 for e in lines[method].yerr)


def test_one_seed_has_no_error_bar(runs, tmp_path) -> None:
    dirs = [runs[("lsh", 16, 0)], runs[("lsh", 32, 0)], runs[("lsh", 32, 1)]]
    plots = {p.path.name: p for p in plan_overlay_plots(group_runs(dirs), tmp_path)}
    drawn = draw_overlay_plot(plots["map_vs_bits_cross.png"])
    (line,) = drawn.series
    assert line.label == "lsh" and line.x == [16.0, 32.0]
    values32 = [_metrics(d)["map_cross"] for d in dirs[1:]]
    assert line.y[0] == pytest.approx(_metrics(dirs[0])["map_cross"], rel=1e-12)
    assert line.yerr[0] is None
    assert line.yerr[1] == pytest.approx(statistics.stdev(values32), rel=1e-9)
    # a group of one run is drawn as that run's own curve
    curve = _metrics(dirs[0])["curves"]["cross"]["pr_rank"]
    pr = {s.label: s for s in draw_overlay_plot(plots["pr_rank_cross.png"]).series}
    np.testing.assert_allclose(pr["lsh, 16 b"].x, curve["recall"], rtol=1e-12)
    np.testing.assert_allclose(pr["lsh, 16 b"].y, curve["precision"], rtol=1e-12)


def test_one_run_keeps_its_plots(runs, tmp_path, monkeypatch, capsys) -> None:
    run = runs[("itq", 16, 0)]
    code, stdout, stderr = cli(monkeypatch, capsys, "report", run)
    assert code == 0, stderr
    expected = {f"{kind}_{s}.png" for kind in ("pr_radius", "pr_rank", "precision_at_n") for s in ("cross", "single")}
    assert {p.name for p in (run / "plots").iterdir()} == expected
    assert [Path(line) for line in stdout.splitlines()] == [run / "plots" / name for name in
                                                           ("pr_radius_cross.png", "pr_rank_cross.png",
                                                            "precision_at_n_cross.png", "pr_radius_single.png",
                                                            "pr_rank_single.png", "precision_at_n_single.png")]
    code, _, stderr = cli(monkeypatch, capsys, "report", run, "--out", tmp_path / "one")
    assert code == 0, stderr
    assert {p.name for p in (tmp_path / "one").iterdir()} == expected


def test_several_runs_need_out(runs, monkeypatch, capsys) -> None:
    first, second = runs[("lsh", 16, 0)], runs[("itq", 32, 1)]
    code, _, stderr = cli(monkeypatch, capsys, "report", first, second)
    assert code == 2 and "--out" in stderr and "Traceback" not in stderr
    assert not (first / "plots").exists() and not (second / "plots").exists()


def test_mixing_data_is_refused(runs, tmp_path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    np.savez(tmp_path / "s.npz", features=rng.normal(size=(120, 8)), labels=labels)
    np.savez(tmp_path / "t.npz", features=rng.normal(size=(120, 8)), labels=labels)
    custom = tmp_path / "custom"
    run_experiment(RunConfig(method="lsh", bits=16, source=str(tmp_path / "s.npz"), target=str(tmp_path / "t.npz"),
                             n_queries=20, out_dir=str(custom)))
    out = tmp_path / "plots"
    code, _, stderr = cli(monkeypatch, capsys, "report", runs[("lsh", 16, 0)], custom, "--out", out)
    assert code == 2 and "different data" in stderr
    assert "demo" in stderr and "s.npz" in stderr and "t.npz" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_plots_need_overwrite(runs, tmp_path, monkeypatch, capsys) -> None:
    dirs = [runs[("lsh", 16, 0)], runs[("lsh", 16, 1)]]
    out = tmp_path / "plots"
    assert cli(monkeypatch, capsys, "report", *dirs, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dirs.append(runs[("itq", 16, 0)])  # another figure content, same files
    code, _, stderr = cli(monkeypatch, capsys, "report", *dirs, "--out", out)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, _, stderr = cli(monkeypatch, capsys, "report", *dirs, "--out", out, "--overwrite")
    assert code == 0, stderr
    assert all((out / name).read_bytes() != data for name, data in before.items())
    # a file crossret did not write is never replaced
    (out / "map_vs_bits_single.png").write_bytes(PNG_MAGIC + b"not ours")
    code, _, stderr = cli(monkeypatch, capsys, "report", *dirs, "--out", out, "--overwrite")
    assert code == 2 and "not a crossret plot" in stderr
    assert (out / "map_vs_bits_single.png").read_bytes() == PNG_MAGIC + b"not ours"
