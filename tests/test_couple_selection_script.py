"""``benchmarks/couple_selection.py``: the label-free criteria and the analysis of how well they choose."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
selection = pytest.importorskip("couple_selection")


def _random_predictions(n: int = 7, c: int = 4, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(n, c)) * 2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_entropy_at_its_extremes():
    c = 5
    assert selection.prediction_entropy(np.full((6, c), 1.0 / c)) == pytest.approx(math.log(c))
    assert selection.prediction_entropy(np.eye(c)[np.arange(10) % c]) == pytest.approx(0.0, abs=1e-9)


def test_the_im_criterion_is_couples_training_term_at_its_extremes():
    import torch

    c = 5
    balanced = torch.from_numpy(60.0 * np.eye(c)[np.arange(10) % c])  # near one-hot logits, every class used
    collapsed = torch.from_numpy(60.0 * np.eye(c)[np.zeros(10, dtype=int)])
    # confident and diverse: -H(mean) = -log C; confident but collapsed on one class, or uniform: 0
    assert float(selection._information_maximisation(balanced)) == pytest.approx(-math.log(c), abs=1e-9)
    assert float(selection._information_maximisation(collapsed)) == pytest.approx(0.0, abs=1e-9)
    assert float(selection._information_maximisation(torch.zeros(6, c, dtype=torch.float64))) == pytest.approx(
        0.0, abs=1e-12)


def test_snd_and_reverse_knn_reject_non_finite_inputs_by_name():
    from crossret.errors import DataError

    bad = _random_predictions()
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match="SND: predictions contain NaN"):
        selection.soft_neighbourhood_density(bad)
    good = np.ones((4, 3))
    with pytest.raises(DataError, match="reverse 5-NN: target features contain NaN"):
        selection.reverse_accuracy(np.where(np.eye(4, 3) > 0, np.inf, 1.0), np.arange(4) % 2, good, np.arange(4) % 2,
                                   "knn")


def test_soft_neighbourhood_density_matches_a_per_sample_definition():
    for seed in range(4):
        p = _random_predictions(seed=seed)
        expected = []
        for i in range(len(p)):
            unit = [row / math.sqrt(sum(v * v for v in row)) for row in p]
            sims = [sum(a * b for a, b in zip(unit[i], unit[j], strict=True)) / 0.05
                    for j in range(len(p)) if j != i]
            top = max(sims)
            weights = [math.exp(s - top) for s in sims]
            total = sum(weights)
            expected.append(-sum(w / total * math.log(w / total) for w in weights))
        assert selection.soft_neighbourhood_density(p) == pytest.approx(sum(expected) / len(expected), rel=1e-10)


def test_soft_neighbourhood_density_of_identical_predictions_is_uniform_over_the_others():
    p = np.tile([[0.7, 0.2, 0.1]], (9, 1))
    assert selection.soft_neighbourhood_density(p) == pytest.approx(math.log(8))


def test_reverse_accuracy_rewards_labels_that_fit_the_input_structure():
    rng = np.random.default_rng(1)
    centres = np.eye(3) * 10
    labels = np.repeat(np.arange(3), 20)
    target = centres[labels] + rng.normal(size=(60, 3))
    source = centres[labels] + rng.normal(size=(60, 3))
    for kind in ("lr", "knn", "hamming"):
        x_t, x_s = (np.sign(target - 5), np.sign(source - 5)) if kind == "hamming" else (target, source)
        assert selection.reverse_accuracy(x_t, labels, x_s, labels, kind) == 1.0
        # consistently wrong labels (a permutation) fit the structure but name the wrong classes
        assert selection.reverse_accuracy(x_t, (labels + 1) % 3, x_s, labels, kind) == 0.0
    assert selection.reverse_accuracy(target, np.zeros(60, dtype=int), source, labels, "lr") == 0.0
    with pytest.raises(ValueError, match="kind must be"):
        selection.reverse_accuracy(target, labels, source, labels, "svm")


def _row(config: str, seed: int, map_cross: float, **criteria: float) -> dict:
    return {"config": config, "task": "dev-x", "seed": seed, "map_cross": map_cross, **criteria}


def test_analysis_orients_each_criterion_and_picks_per_seed():
    rows = [
        _row("default", 0, 0.50, ent=1.0, agree=0.2), _row("default", 1, 0.60, ent=0.9, agree=0.3),
        _row("default", 2, 0.70, ent=0.7, agree=0.1),
        _row("other", 0, 0.40, ent=1.2, agree=0.9), _row("other", 1, 0.65, ent=0.75, agree=0.8),
        _row("other", 2, 0.55, ent=0.95, agree=0.7),
    ]
    (entry,) = selection.analyse(rows)
    assert entry["default_map"] == pytest.approx(0.6)
    assert entry["oracle_map"] == pytest.approx((0.50 + 0.65 + 0.70) / 3)
    assert entry["mean_of_configs_map"] == pytest.approx(sum(r["map_cross"] for r in rows) / 6)
    ent = entry["criteria"]["ent"]  # lower entropy is better: it ranks the runs exactly as MAP does
    assert ent["rho_runs"] == pytest.approx(1.0)
    assert ent["rho_seeds"] == pytest.approx(1.0)
    assert ent["picked"] == ["default", "other", "default"]
    assert ent["picked_map"] == pytest.approx(entry["oracle_map"])
    agree = entry["criteria"]["agree"]  # picks "other" on every seed
    assert agree["picked"] == ["other"] * 3
    assert agree["picked_map"] == pytest.approx((0.40 + 0.65 + 0.55) / 3)
    assert agree["rho_configs"] is None  # two configurations: Spearman undefined, not a fake ±1
    assert "snd" not in entry["criteria"]  # a criterion no row has is left out


def test_markdown_lists_every_criterion_and_marks_undefined_correlations():
    rows = [_row("default", s, 0.5 + 0.1 * s, ent=1.0 - 0.1 * s) for s in range(3)]
    text = selection.markdown(selection.analyse(rows))
    assert "## dev-x (3 runs, seeds 0, 1, 2)" in text
    assert "| ent | +1.00 | – | +1.00 | 60.0 | default×3 |" in text


def test_benchmark_runs_file_helpers_deliver_every_run_and_survive_a_cut_line(tmp_path: Path):
    couple = pytest.importorskip("couple")
    path = tmp_path / "runs.jsonl"
    seen: list[dict] = []
    jobs = [{"task": "t", "seed": s} for s in range(5)]
    # dict(job) is a picklable worker that echoes the job
    couple.run_jobs(dict, jobs, 2, path, seen, describe=lambda row: f"seed {row['seed']}",
                    prepare=lambda row: {**row, "prepared": True})
    assert all(r["prepared"] for r in seen)
    assert sorted(r["seed"] for r in seen) == list(range(5))
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"task": "t", "se')  # a write cut by an interruption
    assert sorted(r["seed"] for r in couple._read_runs(path)) == list(range(5))
