"""The GCKD benchmark's protocol v3 tables (benchmarks/gckd.py): paired percentile-bootstrap intervals
(benchmarks/_bootstrap.py) against references computed another way, and the exact summary JSON schema."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # gckd.py imports its helpers (_bootstrap, _repro) by name
_SPEC = importlib.util.spec_from_file_location("gckd_benchmark_v3", BENCHMARKS / "gckd.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)
import _bootstrap  # noqa: E402


def _slow_percentile_ci(diffs: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """Reference: the same index draws, means by a Python loop, quantiles by hand (linear interpolation
    between order statistics at position (B - 1) q)."""
    idx = np.random.default_rng(seed).integers(0, len(diffs), size=(resamples, len(diffs)))
    means = sorted(sum(diffs[i] for i in row) / len(diffs) for row in idx.tolist())

    def quantile(q: float) -> float:
        h = (len(means) - 1) * q
        lo = int(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    return quantile(0.025), quantile(0.975)


def test_bootstrap_matches_a_slow_reference() -> None:
    diffs = [0.3, -1.2, 2.5, 0.0, 1.1, -0.4, 3.3]
    got = _bootstrap.paired_ci(diffs, resamples=2000, seed=7)
    lo, hi = _slow_percentile_ci(diffs, 2000, 7)
    assert got["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert got["ci95"] == pytest.approx([lo, hi], abs=1e-12) and got["n"] == 7
    assert _bootstrap.paired_ci(diffs, resamples=2000, seed=7) == got  # fixed seed: reproducible
    assert _bootstrap.paired_ci(diffs, resamples=2000, seed=8)["ci95"] != got["ci95"]


def test_bootstrap_against_exact_enumeration() -> None:
    # n = 3: all 27 resamples are equally likely; the bootstrap distribution of the mean is exact.
    diffs = [0.0, 1.0, 5.0]
    exact = sorted(sum(c) / 3 for c in itertools.product(diffs, repeat=3))
    assert exact.count(0.0) == 1 and exact.count(5.0) == 1  # P = 1/27 = 3.7 % > 2.5 % at either end
    got = _bootstrap.paired_ci(diffs)  # 10,000 resamples, seed 0
    assert got["mean"] == 2.0 and got["ci95"] == [0.0, 5.0]
    means = _bootstrap.bootstrap_means(diffs)
    assert means.shape == (10_000,)
    for value in set(exact):  # Monte-Carlo frequencies near the exact probabilities
        assert np.mean(means == value) == pytest.approx(exact.count(value) / 27, abs=0.015)
    assert _bootstrap.paired_ci([0.7] * 5)["ci95"] == [pytest.approx(0.7)] * 2  # no spread, no interval
    with pytest.raises(ValueError):
        _bootstrap.paired_ci([])


def test_paired_differences_use_shared_keys_only() -> None:
    keys, diffs = _bootstrap.paired_differences({("a", 0): 3.0, ("a", 1): 5.0, ("b", 0): 1.0},
                                                {("a", 0): 1.0, ("b", 0): 2.0, ("c", 0): 9.0})
    assert keys == [("a", 0), ("b", 0)] and diffs.tolist() == [2.0, -1.0]


DIGEST = "abc123abc123"


def _row(variant: str, setting: str, seed: int, itc: float, itm: float, **extra: object) -> dict:
    p = bench.SYNTH_V3
    return {"part": "synth", "synth_version": 3, "setting": setting, "variant": variant, "seed": seed,
            "itc": {"map": itc, "rank1": 0.1, "rank5": 0.2, "rank10": 0.3, "minp": 0.05},
            "itm": {"map": itm, "rank1": 0.1, "rank5": 0.2, "rank10": 0.3, "minp": 0.05},
            "pseudo_pairs_per_step": 1.0, "pseudo_pair_precision": 0.1 if variant != "source-only" else None,
            "config": {"epochs": p["adapt_epochs"], **bench._adapt_settings(3, variant)},
            "pretrain_epochs": p["pretrain_epochs"],
            "rerank_k": p["rerank_k"], "generic_digest": DIGEST,
            "synthetic": {k: p[k] for k in ("train_ids", "test_ids", "images_per_id")}, **extra}


def _rows() -> list[dict]:
    rows = []
    for seed in (0, 1, 2):
        for i, setting in enumerate(bench.SETTINGS):
            base = 0.10 + 0.01 * i + 0.001 * seed
            rows.append(_row("source-only", setting, seed, base, base + 0.02))
            rows.append(_row("gckd", setting, seed, base + 0.01 * (i - 1), base + 0.005 * seed))
            rows.append(_row("no-cmkd", setting, seed, base - 0.002, base + 0.02))
    rows.append(_row("gckd", "C->I", 3, 0.9, 0.9, generic_digest="other"))  # another generic model: left out
    rows.append({**_row("gckd", "C->I", 4, 0.9, 0.9), "pretrain_epochs": 99})  # another v3 configuration
    rows.append({**_row("gckd", "C->I", 5, 0.9, 0.9), "synth_version": 2})  # a v2 row
    return rows


def test_v3_summary_schema_and_values() -> None:
    rows = _rows()
    summary = bench.v3_summary(rows, DIGEST)
    assert list(summary) == ["protocol", "seeds", "settings", "variants"]
    assert summary["protocol"] == "v3" and summary["seeds"] == 3 and summary["settings"] == list(bench.SETTINGS)
    assert list(summary["variants"]) == ["source-only", "gckd", "no-cmkd"]
    for entry in summary["variants"].values():
        assert list(entry) == ["itm_map", "itc_map", "delta_itm", "delta_itc"]
        for delta in ("delta_itm", "delta_itc"):
            assert list(entry[delta]) == ["mean", "ci95"] and len(entry[delta]["ci95"]) == 2
            assert entry[delta]["ci95"][0] <= entry[delta]["mean"] <= entry[delta]["ci95"][1]
    json.dumps(summary, allow_nan=False)  # plain JSON
    assert summary["variants"]["source-only"]["delta_itc"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    # gckd - source-only per (setting, seed), in %: ITC 1 * (i - 1); ITM 0.5 * seed - 2
    gckd = summary["variants"]["gckd"]
    itc_diffs = [1.0 * (i - 1) for _seed in range(3) for i in range(6)]
    assert gckd["delta_itc"]["mean"] == pytest.approx(np.mean(itc_diffs))
    ordered = [1.0 * (bench.SETTINGS.index(s) - 1) for s in sorted(bench.SETTINGS) for _seed in range(3)]
    assert gckd["delta_itc"]["ci95"] == pytest.approx(list(_slow_percentile_ci(ordered, 10_000, 0)))
    assert gckd["delta_itm"]["mean"] == pytest.approx(np.mean([0.5 * s - 2.0 for s in range(3)]))
    assert summary["variants"]["no-cmkd"]["delta_itc"]["mean"] == pytest.approx(-0.2)
    assert gckd["itc_map"] == pytest.approx(100 * np.mean([0.10 + 0.01 * i + 0.001 * s + 0.01 * (i - 1)
                                                          for s in range(3) for i in range(6)]))


def test_v3_markdown_puts_itm_first_and_tabulates_wiki(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wiki = [{"part": "wiki", "setting": "wiki 0-4 -> 5-9", "variant": v, "seed": s,
             "itc": {"map": 0.30 + (0.01 if v == "gckd" else 0.0) + 0.001 * s},
             "itm": {"map": 0.32 + 0.001 * s}, "pretrain_epochs": 20}
            for v in ("source-only", "gckd") for s in range(3)]
    monkeypatch.setitem(bench.SYNTH_V3, "test_ids", 12)  # keeps the caption-uniqueness pass short
    rows = [{**r, "synthetic": {**r["synthetic"], "test_ids": 12}} for r in _rows()] + wiki
    runs = tmp_path / "gckd_runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(bench, "generic_spec", lambda version=2: ({}, DIGEST))
    monkeypatch.setenv("CROSSRET_BENCH_NUMERICS", "native")
    assert bench.main(["--protocol", "v3", "--tables-only", "--out", str(tmp_path / "gckd")]) == 0
    summary = json.loads((tmp_path / "gckd_v3_summary.json").read_text())
    assert summary == json.loads(json.dumps(bench.v3_summary(rows, DIGEST)))
    text = (tmp_path / "gckd_v3.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    assert header.index("ITM") < header.index("ITC")
    assert "## Wikipedia" in text and "2 v3 rows of another v3 configuration are left out" in text
    wiki_part = text.split("## Wikipedia")[1]
    assert "| **gckd** | 32.10 | +0.00 [+0.00, +0.00] | 31.10 | +1.00 [+1.00, +1.00] | 3 |" in wiki_part
    full = json.loads((tmp_path / "gckd_v3.json").read_text())
    assert set(full["caption_uniqueness"]) == {"CUHK-PEDES", "ICFG-PEDES", "RSTPReid"}
    assert not (tmp_path / "gckd.json").exists()  # the v2 tables are not rewritten by a v3 invocation


def test_v2_and_recorded_configs_run_with_the_trainer_they_were_recorded_with() -> None:
    from crossret.textimage import gckd
    from crossret.textimage.gckd import GckdConfig

    legacy = getattr(gckd, "LEGACY_VALUES", {})
    runs = BENCHMARKS / "results" / "gckd_runs.jsonl"
    recorded = next(row["config"] for row in bench._read_runs(runs)
                    if row.get("synth_version") == 2 and row["variant"] == "gckd")
    filled = bench._legacy(recorded)
    assert {k: filled[k] for k in recorded} == recorded  # recorded values are kept ...
    assert {k: filled[k] for k in legacy if k not in recorded} == {k: v for k, v in legacy.items() if k not in recorded}
    config = GckdConfig.from_dict(filled)  # ... and the rest is the trainer of then
    if hasattr(GckdConfig, "from_recorded"):
        assert config == GckdConfig.from_recorded(recorded)
    # v3 variants: the six of every protocol first; optional ones only for fields the trainer has
    fields = bench._gckd_fields()
    assert list(bench.V3_VARIANTS)[:6] == list(bench.VARIANTS)
    assert all(set(change) <= fields for change in list(bench.V3_VARIANTS.values())[6:])


def test_v3_summary_names_only_the_six_variants_of_every_protocol() -> None:
    """Optional v3 variants (e.g. bank mining) go to gckd_v3.json and the tables, not to the summary."""
    rows = _rows() + [_row("gckd-bank-itm", s, seed, 0.5, 0.5) for s in bench.SETTINGS for seed in (0, 1, 2)]
    summary = bench.v3_summary(rows, DIGEST)
    assert list(summary["variants"]) == ["source-only", "gckd", "no-cmkd"]
    assert set(summary["variants"]) <= set(bench.VARIANTS)
    assert summary == bench.v3_summary(_rows(), DIGEST)


def test_v3_markdown_keeps_an_earlier_configuration_apart_and_labelled() -> None:
    """Rows of a superseded generic model get their own labelled paired table; neither set leaks into the other."""
    current = _rows()[:36]  # seeds 0 and 1 of today's configuration
    earlier = [_row(v, "C->I", seed, m, m, generic_digest="0ld") for seed in (0, 1)
               for v, m in (("source-only", 0.02 + 0.01 * seed), ("gckd", 0.05 + 0.01 * seed))]
    text = bench.v3_markdown(current + earlier, None, DIGEST)
    today, old = text.split("## Earlier v3 configuration (superseded): generic model 0ld")
    assert "4 v3 rows of another v3 configuration are left out" in today
    assert "1 settings × 2 seeds (4 runs)" in old
    # gckd - source-only = +3.00 mAP points on both seeds, under ITM and ITC; means over the two seeds
    assert "| **gckd** | 5.50 | +3.00 [+3.00, +3.00] | 5.50 | +3.00 [+3.00, +3.00] | 2 |" in old
    assert "| source-only | 2.50 |" in old
    today_gckd = next(line for line in today.splitlines() if line.startswith("| **gckd** |"))
    assert today_gckd.endswith("| 12 |")  # 6 settings x 2 seeds, the earlier rows not mixed in
    # a configuration without source-only rows has no pairs to show
    lonely = [_row("gckd", "C->I", 0, 0.9, 0.9, generic_digest="solo")]
    assert "generic model solo" not in bench.v3_markdown(current + lonely, None, DIGEST)


def test_module_effects_are_full_minus_ablation_with_bootstrap_intervals() -> None:
    """gckd − ablation per (setting, seed), in mAP points, against a hand computation and the slow bootstrap."""
    rows = _rows()  # gckd ITC = base + 0.01 (i - 1), ITM = base + 0.005 seed; no-cmkd = base - 0.002, base + 0.02
    effects = bench.module_effects([r for r in rows if r["generic_digest"] == DIGEST and r["synth_version"] == 3
                                    and r["pretrain_epochs"] == bench.SYNTH_V3["pretrain_epochs"]])
    assert list(effects) == ["no-cmkd"]  # the only ablation with rows
    itc = [100 * (0.01 * (i - 1) + 0.002) for i in range(6) for _seed in range(3)]
    itm = [100 * (0.005 * seed - 0.02) for _i in range(6) for seed in range(3)]
    assert effects["no-cmkd"]["itc"]["mean"] == pytest.approx(np.mean(itc))
    assert effects["no-cmkd"]["itm"]["mean"] == pytest.approx(np.mean(itm))
    assert effects["no-cmkd"]["itm"]["pairs"] == 18
    ordered = [100 * (0.01 * (bench.SETTINGS.index(s) - 1) + 0.002) for s in sorted(bench.SETTINGS) for _ in range(3)]
    assert effects["no-cmkd"]["itc"]["ci95"] == pytest.approx(list(_slow_percentile_ci(ordered, 10_000, 0)))
    text = bench.v3_markdown(rows, None, DIGEST)
    assert "| module removed | full − ablation, ITM [95 % CI] |" in text
    after = text.split("| module removed |")[1].splitlines()
    line = next(x for x in after if x.startswith("| no-cmkd | "))
    assert line.startswith(f"| no-cmkd | {np.mean(itm):+.2f} [") and line.endswith("| 18 |")


def test_target_term_settings_apply_to_adapting_variants_and_split_configurations(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The protocol's ``adapt`` settings go to every variant with a target term (its own change wins) and never to
    source-only; rows of other target-term settings are tabulated apart, paired with the shared source-only rows."""
    adapt = {"cd_itm_mining": "banks", "delta": 0.1}
    monkeypatch.setitem(bench.SYNTH_V3, "adapt", adapt)
    assert bench._adapt_settings(3, "source-only") == {}
    assert bench._adapt_settings(3, "no-memory") == adapt
    assert bench._adapt_settings(2, "gckd") == {}  # v2 has no such settings: it runs as recorded
    if "gckd-bank-itm" in bench.V3_VARIANTS:  # {"cd_itm_mining": "banks"}: the variant's own value is kept
        monkeypatch.setitem(bench.V3_VARIANTS, "gckd-bank-itm", {"cd_itm_mining": "batch"})
        assert bench._adapt_settings(3, "gckd-bank-itm") == {"cd_itm_mining": "batch", "delta": 0.1}

    def row(variant: str, seed: int, value: float, **config: object) -> dict:
        out = _row(variant, "C->I", seed, value, value)
        out["config"] = {**out["config"], **config}
        return out

    baseline = [row("source-only", seed, 0.02 + 0.01 * seed, cd_itm_mining="batch", delta=0.5) for seed in (0, 1)]
    today = [row("gckd", seed, 0.06 + 0.01 * seed, **adapt) for seed in (0, 1)]
    before = [row("gckd", seed, 0.05 + 0.01 * seed, cd_itm_mining="batch", delta=0.5) for seed in (0, 1)]
    rows = baseline + today + before
    assert [bench.current_v3(r, DIGEST) for r in rows] == [True] * 4 + [False] * 2
    text = bench.v3_markdown(rows, None, DIGEST)
    now, old = text.split("## Earlier v3 configuration (superseded): ")
    assert "2 v3 rows of another v3 configuration are left out" in now
    assert "| **gckd** | 6.50 | +4.00 [+4.00, +4.00] | 6.50 | +4.00 [+4.00, +4.00] | 2 |" in now
    assert old.splitlines()[0].endswith("ITM top-32, cd_itm_mining batch, delta 0.5")
    assert "1 settings × 2 seeds (4 runs)" in old  # the two earlier gckd rows with the two shared source-only rows
    assert "| **gckd** | 5.50 | +3.00 [+3.00, +3.00] | 5.50 | +3.00 [+3.00, +3.00] | 2 |" in old


def test_rows_of_another_build_of_the_generic_model_are_neither_done_nor_mixed() -> None:
    """The spec digest does not name a generic model: another thread count or CPU trains other weights. Rows
    name the weights they started from; rows recorded before that count as made by a generic model only when it
    has exactly the recorded model's spec, held-out mAP and final loss."""
    unnamed = bench.UNNAMED_V3_GENERIC
    legacy = {"digest": unnamed["digest"], "generic_test": {"map": unnamed["map"]}, "final_loss": unnamed["final_loss"]}
    rebuilt_same = {**legacy, "weights": "aaaaaaaaaaaa"}  # the same model rebuilt bit for bit (weights now named)
    rebuilt_other = {**legacy, "generic_test": {"map": 0.83}, "final_loss": 1.66, "weights": "bbbbbbbbbbbb"}
    old = _row("gckd", "C->I", 0, 0.05, 0.05, generic_digest=unnamed["digest"])
    assert "generic_weights" not in old
    new = {**_row("gckd", "C->I", 0, 0.07, 0.07, generic_digest=unnamed["digest"]), "generic_weights": "bbbbbbbbbbbb"}
    assert bench.row_generic(old, legacy) is None and bench.row_generic(old, rebuilt_same) == "aaaaaaaaaaaa"
    assert bench.row_generic(old, rebuilt_other) is None and bench.row_generic(new, legacy) == "bbbbbbbbbbbb"
    digest = unnamed["digest"]
    assert bench.current_v3(old, digest, legacy) and bench.current_v3(old, digest, rebuilt_same)
    assert not bench.current_v3(old, digest, rebuilt_other) and bench.current_v3(new, digest, rebuilt_other)
    assert not bench.current_v3(new, digest, legacy) and not bench.current_v3(new, digest, rebuilt_same)
    assert bench.current_v3(old, digest) and bench.current_v3(new, digest)  # no generic given: the spec only

    def rows(value: float, **extra: object) -> list[dict]:
        return [{**_row(v, "C->I", seed, m, m, generic_digest=digest), **extra}
                for seed in (0, 1) for v, m in (("source-only", value), ("gckd", value + 0.01 * (seed + 1)))]

    text = bench.v3_markdown(rows(0.02) + rows(0.04, generic_weights="bbbbbbbbbbbb"), rebuilt_other, digest)
    now, old_build = text.split("## Earlier v3 configuration (superseded): ")
    assert "4 v3 rows of another v3 configuration are left out" in now
    assert "| **gckd** | 5.50 | +1.50 [+1.00, +2.00] | 5.50 | +1.50 [+1.00, +2.00] | 2 |" in now  # 0.05, 0.06 vs 0.04
    assert old_build.startswith(f"generic model {digest} (another build of it), ")
    assert "| **gckd** | 3.50 | +1.50 [+1.00, +2.00] |" in old_build and "(4 runs)" in old_build
    summary = bench.v3_summary(rows(0.02) + rows(0.04, generic_weights="bbbbbbbbbbbb"), digest, rebuilt_other)
    assert summary["variants"]["gckd"]["itm_map"] == pytest.approx(5.5)
