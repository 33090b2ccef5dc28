"""Research tooling: provenance in metrics.json, re-runs from a saved config, `crossret table`, the slim
`run --json` line and the dense P-R-by-rank grid."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from _cli import cli
from crossret.data import load_benchmark
from crossret.experiment import RunConfig, run_experiment
from crossret.provenance import collect_provenance, source_checkout
from crossret.report.table import format_table, summarize_runs
from crossret.retrieval.metrics import evaluate_hamming, rank_grid


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """lsh with seeds 0, 1 and itq with seeds 0, 1, 2 on the demo benchmark (16 bits)."""
    root = tmp_path_factory.mktemp("runs")
    split = load_benchmark("demo", None)
    runs = {}
    for method, seeds in (("lsh", (0, 1)), ("itq", (0, 1, 2))):
        for seed in seeds:
            out = root / f"{method}-{seed}"
            run_experiment(RunConfig(method=method, benchmark="demo", bits=16, seed=seed, out_dir=str(out)),
                           split=split, command=["crossret", "run", method, "--seed", str(seed)])
            runs[(method, seed)] = out
    return runs


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_metrics_record_provenance(demo_runs: dict) -> None:
    provenance = _metrics(demo_runs[("itq", 1)])["provenance"]
    assert provenance["command"] == ["crossret", "run", "itq", "--seed", "1"]
    assert provenance["versions"]["numpy"] == np.__version__
    assert set(provenance["versions"]) >= {"crossret", "torch", "faiss", "numpy", "scipy", "sklearn", "numba"}
    commit = provenance["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)


def test_provenance_outside_a_checkout_is_none(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("")
    assert source_checkout(tmp_path) == {"git_commit": None, "git_dirty": None}
    assert collect_provenance()["command"] is None


def test_table_mean_and_sample_std_over_seeds(demo_runs: dict, monkeypatch, capsys) -> None:
    dirs = [demo_runs[key] for key in sorted(demo_runs)]
    code, stdout, stderr = cli(monkeypatch, capsys, "table", *dirs, "--format", "json")
    assert code == 0, stderr
    groups = {g["method"]: g for g in json.loads(stdout.strip().splitlines()[-1])}
    assert set(groups) == {"lsh", "itq"}
    for method, seeds in (("lsh", (0, 1)), ("itq", (0, 1, 2))):
        group = groups[method]
        assert group["n_runs"] == len(seeds) and group["bits"] == 16 and group["data"] == "demo"
        assert sorted(group["seeds"]) == list(seeds)
        for setting in ("cross", "single"):
            values = [_metrics(demo_runs[(method, s)])[f"map_{setting}"] for s in seeds]
            assert group[f"map_{setting}_mean"] == pytest.approx(sum(values) / len(values), abs=1e-15)
            mean = sum(values) / len(values)
            by_hand = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            assert group[f"map_{setting}_std"] == pytest.approx(by_hand, rel=1e-12)
            assert group[f"map_{setting}_std"] > 0
    single = summarize_runs([demo_runs[("lsh", 0)]])
    assert single[0]["n_runs"] == 1 and single[0]["map_cross_std"] == 0.0
    markdown = format_table(summarize_runs(dirs), "md")
    itq = groups["itq"]
    assert f"| demo | itq | 16 | {itq['config_id']} | 3 | {itq['map_cross_mean']:.4f} ± {itq['map_cross_std']:.4f}" \
        in markdown
    csv_lines = format_table(summarize_runs(dirs), "csv").splitlines()
    assert csv_lines[0].startswith("data,method,bits,config_id,n_runs,map_cross_mean")
    assert len(csv_lines) == 3


def test_table_separates_configurations(demo_runs: dict, tmp_path: Path) -> None:
    other = tmp_path / "itq-standardize"
    run_experiment(RunConfig(method="itq", benchmark="demo", bits=16, seed=0, out_dir=str(other),
                             method_config={"standardize": True}))
    groups = summarize_runs([demo_runs[("itq", 0)], demo_runs[("itq", 1)], other])
    assert [g["n_runs"] for g in groups] == [2, 1]
    assert groups[0]["config_id"] != groups[1]["config_id"]
    assert statistics.fmean([_metrics(demo_runs[("itq", s)])["map_cross"] for s in (0, 1)]) == pytest.approx(
        groups[0]["map_cross_mean"])


def test_table_refuses_a_directory_that_is_not_a_run(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, stderr = cli(monkeypatch, capsys, "table", tmp_path)
    assert code == 2 and "no metrics.json" in stderr


def _same_run(a: Path, b: Path) -> None:
    for name in ("queries", "source", "target_train"):
        assert np.array_equal(np.load(a / "codes" / f"{name}_codes.npy"), np.load(b / "codes" / f"{name}_codes.npy"))
    ma, mb = _metrics(a), _metrics(b)
    for key in ("map_cross", "map_single", "precision_at", "recall_at", "p_at_r2", "curves", "method_config"):
        assert ma[key] == mb[key], key


@pytest.mark.parametrize("args", [["itq", "--seed", "3"], ["couple", "--set", "epochs=2"]])
def test_run_again_from_saved_config(args: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, stderr = cli(monkeypatch, capsys, "run", *args, "--benchmark", "demo", "--bits", "16", "--out", first)
    assert code == 0, stderr
    code, stdout, stderr = cli(monkeypatch, capsys, "run", "--config", first / "config.yaml", "--out", again,
                               "--json")
    assert code == 0, stderr
    _same_run(first, again)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["provenance"]["command"][1:4] == ["run", "--config", str(first / "config.yaml")]
    assert _metrics(again)["seed"] == _metrics(first)["seed"]


def test_options_override_the_saved_config(demo_runs: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "seed5"
    code, _, stderr = cli(monkeypatch, capsys, "run", "--config", demo_runs[("itq", 0)], "--seed", "5",
                               "--set", "n_iter=7", "--out", out, "--json")
    assert code == 0, stderr
    metrics = _metrics(out)
    assert metrics["seed"] == 5 and metrics["method"] == "itq" and metrics["bits"] == 16
    assert metrics["method_config"]["n_iter"] == 7


def test_run_needs_method_and_bits_without_config(monkeypatch, capsys) -> None:
    code, _, stderr = cli(monkeypatch, capsys, "run", "--benchmark", "demo")
    assert code == 2 and "--config" in stderr


def test_run_json_line_names_the_metrics_file(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, stderr = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "16",
                               "--out", out, "--json")
    assert code == 0, stderr
    line = stdout.strip().splitlines()[-1]
    summary = json.loads(line)
    assert "curves" not in summary and "diagnostics" not in summary
    assert len(line) < 8000
    full = json.loads(Path(summary["metrics_file"]).read_text())
    assert "curves" in full and full["map_cross"] == summary["map_cross"]


def test_rank_grid() -> None:
    grid = rank_grid(1797)
    assert grid[0] == 1 and grid[-1] == 1797 and grid == sorted(set(grid))
    assert 70 <= len(grid) <= 100
    assert rank_grid(5) == [1, 2, 3, 4, 5]


def test_pr_by_rank_curve_is_exact_on_the_dense_grid(demo_runs: dict) -> None:
    run = demo_runs[("itq", 0)]
    metrics = _metrics(run)
    curve = metrics["curves"]["cross"]["pr_rank"]
    assert curve["n"] == rank_grid(metrics["n_source"])
    codes = run / "codes"
    evaluation = evaluate_hamming(np.load(codes / "queries_codes.npy"), np.load(codes / "source_codes.npy"),
                                  np.load(codes / "queries_labels.npy"), np.load(codes / "source_labels.npy"),
                                  precision_ns=curve["n"])
    assert curve["precision"] == [evaluation.precision_at[n] for n in curve["n"]]
    assert curve["recall"] == [evaluation.recall_at[n] for n in curve["n"]]
    # the contract's precision@N keys are unchanged by the grid
    assert set(metrics["precision_at"]["cross"]) <= {str(n) for n in range(100, 1001, 100)}
