"""The GCKD benchmark's protocol v3 path end to end at toy sizes: generic pre-training, one (source, seed)
job, rows recorded with ``synth_version`` 3 and resumed, and the summary JSON written (benchmarks/gckd.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
_NAME = "gckd_benchmark_v3_e2e"
_SPEC = importlib.util.spec_from_file_location(_NAME, BENCHMARKS / "gckd.py")
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_NAME] = bench  # the worker processes unpickle run_synth by module name
_SPEC.loader.exec_module(bench)

TOY = {"pretrain_epochs": 1, "adapt_epochs": 1, "train_ids": 6, "test_ids": 3, "images_per_id": 2, "rerank_k": 3,
       "generic": {**bench.SYNTH_V3["generic"], "n_ids": 16, "n_test_ids": 3, "epochs": 1, "vocab_size": 200,
                   "batch": {"ids_per_batch": 8, "pairs_per_id": 2}},
       "train": {**bench.SYNTH_V3["train"], "ids_per_batch": 3, "pairs_per_id": 2, "target_batch": 4,
                 "memory_size": 8}}


def test_v3_benchmark_records_resumes_and_summarises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TOY.items():
        monkeypatch.setitem(bench.SYNTH_V3, key, value)
    monkeypatch.setattr(bench, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("CROSSRET_BENCH_NUMERICS", "native")
    out = tmp_path / "results" / "gckd"
    out.parent.mkdir()
    args = ["--protocol", "v3", "--settings", "C->I", "--seeds", "3", "--out", str(out)]
    assert bench.main([*args, "--variants", "source-only", "gckd"]) == 0
    assert len(list((tmp_path / "cache").glob("gckd-generic-*/report.json"))) == 1  # the cache it was given
    runs_path = tmp_path / "results" / "gckd_runs.jsonl"
    rows = bench._read_runs(runs_path)
    assert [(r["setting"], r["variant"], r["seed"], r["synth_version"]) for r in rows] == [
        ("C->I", "source-only", 3, 3), ("C->I", "gckd", 3, 3)]
    _, digest = bench.generic_spec(3)
    assert all(bench.current_v3(r, digest) and "environment" in r and r["host"] for r in rows)
    configs = {r["variant"]: r["config"] for r in rows}
    assert configs["gckd"]["alpha"] == configs["source-only"]["alpha"] == 0.4  # ALBEF's momentum distillation
    assert configs["source-only"]["kd_weight"] == 0 and configs["gckd"]["kd_weight"] == 1.0
    assert all(r["itm"] and r["itc"] and r["source_test_itc"] for r in rows)
    assert rows[0]["synthetic"] == {"train_ids": 6, "test_ids": 3, "images_per_id": 2}
    summary = json.loads((out.parent / "gckd_v3_summary.json").read_text())
    assert summary["protocol"] == "v3" and summary["seeds"] == 1 and summary["settings"] == ["C->I"]
    gckd = summary["variants"]["gckd"]
    assert list(gckd) == ["itm_map", "itc_map", "delta_itm", "delta_itc"]
    # one pair: the interval is the difference itself
    delta = 100 * (rows[1]["itc"]["map"] - rows[0]["itc"]["map"])
    assert gckd["delta_itc"]["mean"] == pytest.approx(delta) and gckd["delta_itc"]["ci95"] == pytest.approx([delta] * 2)
    assert gckd["itm_map"] == pytest.approx(100 * rows[1]["itm"]["map"])
    # Resume: the recorded runs are not redone; only the new variant is run.
    assert bench.main([*args, "--variants", "source-only", "gckd", "no-cmkd"]) == 0
    again = bench._read_runs(runs_path)
    assert again[:2] == rows and [r["variant"] for r in again[2:]] == ["no-cmkd"]
    assert again[2]["config"]["kd_weight"] == 0.0
    assert (out.parent / "gckd_v3.md").read_text().count("| no-cmkd |") >= 1
    # The generic model is named by its weights: the report and every row carry the digest of its tensors.
    report_path = next((tmp_path / "cache").glob("gckd-generic-*/report.json"))
    report = json.loads(report_path.read_text())
    run_dir = Path(report["run_dir"])
    assert len(report["weights"]) == 12 and report["weights"] == bench.generic_weights(run_dir)
    assert {r["generic_weights"] for r in again} == {report["weights"]}
    # the digest follows the tensors, not the file: other training state leaves it, one changed weight moves it
    from crossret.storage.sealed import save_torch
    from crossret.textimage.gckd import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint

    path = run_dir / "checkpoints" / "checkpoint.pt"
    state = read_checkpoint(path)
    state["history"] = [*state["history"], {"epoch": 99}]
    save_torch(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert bench.generic_weights(run_dir) == report["weights"]
    name = sorted(state["model"])[0]
    state["model"][name] = state["model"][name] + 1e-6
    save_torch(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    assert bench.generic_weights(run_dir) != report["weights"]
    # Another build of the same spec (other weights): its rows are redone, the earlier ones tabulated apart.
    report_path.write_text(json.dumps({**report, "weights": bench.generic_weights(run_dir)}))
    assert bench.main([*args, "--variants", "source-only", "gckd"]) == 0
    third = bench._read_runs(runs_path)
    assert third[:3] == again and [r["variant"] for r in third[3:]] == ["source-only", "gckd"]
    assert {r["generic_weights"] for r in third[3:]} == {bench.generic_weights(run_dir)}
    text = (out.parent / "gckd_v3.md").read_text()
    assert "(another build of it: weights " + report["weights"] + ")" in text
