"""``benchmarks/couple_dev.py``: which recorded runs count as today's defaults, and the paired deltas."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from crossret.hashing.couple import CoupleConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
couple_dev = pytest.importorskip("couple_dev")


def _row(tag: str, seed: int, map_cross: float, config: dict, task: str = "dev-m2opt") -> dict:
    return {"tag": tag, "task": task, "bits": 64, "seed": seed, "overrides": {}, "map_cross": map_cross,
            "map_single": 0.0, "selected_accuracy": None, "pseudo_label_accuracy": None, "method_config": config}


def test_a_row_that_predates_a_setting_runs_with_its_old_behaviour():
    today = dataclasses.asdict(CoupleConfig())
    assert couple_dev._differences(today) == {}
    older = {k: v for k, v in today.items() if k != "center_per_domain"}  # recorded before the setting existed
    assert couple_dev._differences(older) == {"center_per_domain": False}
    assert couple_dev._differences({**today, "k_cross": 5}) == {"k_cross": 5}


def test_paired_delta_is_against_todays_defaults_on_the_same_seeds():
    today = dataclasses.asdict(CoupleConfig())
    older = {k: v for k, v in today.items() if k != "center_per_domain"}
    rows = [_row("new", 0, 0.60, today), _row("new", 1, 0.50, today),
            _row("old", 0, 0.55, older), _row("old", 1, 0.52, older), _row("old", 2, 0.90, older)]
    summary = {entry["tag"]: entry for entry in couple_dev.summarise(rows)}
    old = summary["old"]["dev-m2opt"]
    assert old["paired_seeds"] == 2  # seed 2 has no default run to pair with
    assert old["paired_delta"] == pytest.approx(((0.55 - 0.60) + (0.52 - 0.50)) / 2)
    assert old["paired_wins"] == 1
    assert "paired_delta" not in summary["new"]["dev-m2opt"]
    assert summary["old"]["differs_from_current_defaults"] == {"center_per_domain": False}
