"""The GCKD benchmark's summary over the six synthetic settings (benchmarks/gckd.py), on made-up runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # gckd.py imports _repro, _bootstrap
_SPEC = importlib.util.spec_from_file_location(
    "gckd_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "gckd.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def _row(variant: str, seed: int, setting: str, value: float, version: int = bench.SYNTH_VERSION) -> dict:
    return {"part": "synth", "synth_version": version, "variant": variant, "seed": seed, "setting": setting,
            "itc": {"map": value, "rank1": 0.0, "minp": 0.0}}


def test_overview_averages_settings_per_seed_then_seeds_and_pairs_wins() -> None:
    rows = []
    for seed in (0, 1):
        for i, setting in enumerate(bench.SETTINGS):
            rows.append(_row("source-only", seed, setting, 0.10 + 0.01 * i))
            # gckd: +0.02 on every setting of seed 0, -0.01 on the first two settings of seed 1, else +0.03
            delta = 0.02 if seed == 0 else (-0.01 if i < 2 else 0.03)
            rows.append(_row("gckd", seed, setting, 0.10 + 0.01 * i + delta))
    rows.append(_row("gckd", 2, "C->I", 0.9))  # seed 2 lacks five settings: not averaged
    rows.append(_row("gckd", 0, "C->I", 0.0, version=1))  # an older protocol's run: ignored
    overview = {o["variant"]: o for o in bench.synth_overview(rows)}
    gckd = overview["gckd"]
    assert gckd["seeds"] == [0, 1]
    base = sum(0.10 + 0.01 * i for i in range(6)) / 6
    assert gckd["itc_map_per_seed"] == pytest.approx([base + 0.02, base + (2 * -0.01 + 4 * 0.03) / 6])
    assert gckd["delta_vs_source_only"] == pytest.approx((0.02 + (2 * -0.01 + 4 * 0.03) / 6) / 2)
    assert (gckd["wins_vs_source_only"], gckd["pairs"]) == (6 + 4, 12)
    assert overview["source-only"]["delta_vs_source_only"] == pytest.approx(0.0)
    lines = bench._overview_lines(rows)
    assert any(line.startswith("| **gckd** |") and "10/12" in line for line in lines)
