"""End to end: tiny ALBEF through source pre-training, GCKD adaptation and evaluation on a generated
pair of synthetic datasets (CUHK-PEDES format → RSTPReid format), via the Python API and the CLI.

The pipeline's metrics are checked against the reference metric code on embeddings recomputed from the
saved model, and the ITM re-ranking against a per-query Python sort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crossret.cli import app
from crossret.data.person import ImageTransform, build_eval_view, load_image, load_person_dataset
from crossret.data.synthetic_person import generate_person_dataset
from crossret.errors import ConfigError
from crossret.retrieval.metrics import dense_retrieval_metrics
from crossret.textimage.albef import AlbefConfig
from crossret.textimage.checkpoint import load_albef_checkpoint
from crossret.textimage.pipeline import GckdRunConfig, evaluate_run, run_gckd
from crossret.textimage.tokenize import CaptionTokenizer

pytestmark = pytest.mark.slow

TRAIN = {"epochs": 1, "lr": 1e-3, "head_lr": 1e-3, "ids_per_batch": 4, "pairs_per_id": 2, "target_batch": 8,
         "memory_size": 32, "delta": 0.0}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    return {name: generate_person_dataset(name, root / name, n_train_ids=8, n_test_ids=4, images_per_id=2,
                                          seed=3, image_size=(32, 16))
            for name in ("cuhk-pedes", "rstpreid")}


@pytest.fixture(scope="module")
def runs(datasets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    pre = run_gckd(GckdRunConfig(stage="pretrain", source_dir=str(datasets["cuhk-pedes"]),
                                 target_dir=str(datasets["rstpreid"]), vocab_size=200, train=TRAIN, rerank_k=0),
                   root / "pre")
    adapt = run_gckd(GckdRunConfig(stage="adapt", source_dir=str(datasets["cuhk-pedes"]),
                                   target_dir=str(datasets["rstpreid"]), init=str(root / "pre"), train=TRAIN,
                                   rerank_k=5), root / "adapt")
    return {"root": root, "pre": pre, "adapt": adapt}


def test_run_directories_hold_everything(runs: dict) -> None:
    for name in ("pre", "adapt"):
        run = runs["root"] / name
        for item in ("config.yaml", "vocab.txt", "model.pt", "metrics.json", "run.log", "checkpoints/checkpoint.pt"):
            assert (run / item).is_file(), f"{name}: {item} missing"
    # the adapted model continued from the pre-trained one with the same vocabulary
    assert (runs["root"] / "pre" / "vocab.txt").read_bytes() == (runs["root"] / "adapt" / "vocab.txt").read_bytes()
    assert runs["adapt"]["init"]["kind"] == "run"
    history = runs["adapt"]["history"]
    assert len(history) == 1 and {"itc", "itm", "mlm", "prop", "kd", "cd_itm"} <= set(history[0])
    assert "kd" not in runs["pre"]["history"][0]  # pre-training has no target term


def _reference_embeddings(run: Path, data: Path) -> tuple[torch.nn.Module, CaptionTokenizer, object, dict]:
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    model = load_albef_checkpoint(run / "model.pt", AlbefConfig.from_dict(saved["albef"])).model.eval()
    tokenizer = CaptionTokenizer.from_vocab(run / "vocab.txt", max_length=saved["run"]["max_tokens"])
    view = build_eval_view(load_person_dataset(None, data), "test")
    transform = ImageTransform.eval(tuple(model.config.image_size))
    with torch.no_grad():
        images = torch.stack([transform(load_image(p)) for p in view.image_paths])
        image_tokens, image_feat = model.encode_image(images)
        texts = [tokenizer([c]) for c in view.captions]  # one at a time: no padding at all
        encoded = [model.encode_text(t.input_ids, t.attention_mask) for t in texts]
    return model, tokenizer, view, {"image_tokens": image_tokens, "image_feat": image_feat, "texts": texts,
                                    "encoded": encoded}


def test_metrics_match_the_reference_code(runs: dict, datasets: dict[str, Path]) -> None:
    model, _, view, ref = _reference_embeddings(runs["root"] / "adapt", datasets["rstpreid"])
    text_feat = torch.cat([e[1] for e in ref["encoded"]])
    expected = dense_retrieval_metrics(text_feat.numpy(), ref["image_feat"].numpy(), view.caption_person_ids,
                                       view.image_person_ids)
    got = runs["adapt"]["evaluation"]["itc"]
    for key in ("rank1", "rank5", "rank10", "map", "minp"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key

    # ITM re-ranking: per query, the ITC top-5 sorted by the ITM logit, then the rest by ITC
    k = 5
    sim = (text_feat @ ref["image_feat"].T).numpy()
    ap, r1 = [], []
    with torch.no_grad():
        for q, (tokens, text) in enumerate(zip(ref["encoded"], ref["texts"], strict=True)):
            top = sorted(range(sim.shape[1]), key=lambda g: (-sim[q, g], g))[:k]
            logits = model.itm_logits(tokens[0].expand(k, -1, -1), text.attention_mask.expand(k, -1),
                                      ref["image_tokens"][top])[:, 1]
            reranked = [top[i] for i in sorted(range(k), key=lambda i: (-float(logits[i]), -sim[q, top[i]], top[i]))]
            rest = sorted((g for g in range(sim.shape[1]) if g not in top), key=lambda g: (-sim[q, g], g))
            order = reranked + rest
            rel = [view.image_person_ids[g] == view.caption_person_ids[q] for g in order]
            hits = np.cumsum(rel)
            ap.append(sum(hits[i] / (i + 1) for i in range(len(rel)) if rel[i]) / sum(rel))
            r1.append(float(rel[0]))
    itm = runs["adapt"]["evaluation"]["itm"]
    # fp16 token storage in the pipeline vs float32 here: allow one flipped near-tie at most
    assert itm["map"] == pytest.approx(np.mean(ap), abs=0.02)
    assert itm["rank1"] == pytest.approx(np.mean(r1), abs=1.0 / len(r1) + 1e-9)


def test_evaluate_run_reproduces_the_run_metrics(runs: dict, datasets: dict[str, Path]) -> None:
    result = evaluate_run(runs["root"] / "adapt", datasets["rstpreid"], rerank_k=5)
    assert result["evaluation"]["itc"] == runs["adapt"]["evaluation"]["itc"]
    assert result["evaluation"]["itm"] == runs["adapt"]["evaluation"]["itm"]


def test_finished_run_is_not_overwritten(runs: dict, datasets: dict[str, Path]) -> None:
    before = (runs["root"] / "pre" / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_gckd(GckdRunConfig(stage="pretrain", source_dir=str(datasets["cuhk-pedes"]), train=TRAIN),
                 runs["root"] / "pre")
    assert (runs["root"] / "pre" / "metrics.json").read_bytes() == before


def test_cli_eval_and_errors(runs: dict, datasets: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["gckd", "eval", str(runs["root"] / "adapt"), "--data", str(datasets["rstpreid"]),
                                 "--rerank-k", "0", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    assert payload["evaluation"]["itc"] == runs["adapt"]["evaluation"]["itc"]
    assert "itm" not in payload["evaluation"]

    bad = runner.invoke(app, ["gckd", "adapt", "--source", str(datasets["cuhk-pedes"]), "--target",
                              str(datasets["rstpreid"]), "--out", str(tmp_path / "x"), "--set", "no_such_key=1"])
    assert bad.exit_code != 0
    assert "no_such_key" in str(bad.exception)
    assert not (tmp_path / "x").exists()  # nothing written for a bad config


def test_cli_pretrain_runs_and_prints_json(datasets: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["gckd", "pretrain", "--source", str(datasets["cuhk-pedes"]), "--out",
                                      str(tmp_path / "run"), "--set", "epochs=1", "--set", "memory_size=16",
                                      "--rerank-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.strip().splitlines()[-1])
    assert payload["stage"] == "pretrain" and payload["evaluated_on"].endswith(":test")
    assert payload["train_config"]["kd_weight"] == 0.0 and payload["train_config"]["memory_size"] == 16
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_cli_eval_rerank_score_options(runs: dict, datasets: dict[str, Path], tmp_path: Path) -> None:
    """``--rerank-score itm+itc`` with weight 0 re-ranks exactly as the ITM logit alone; a huge ITC weight
    ranks as ITC does; the choice is recorded; a bad choice is a ConfigError naming it."""
    runner = CliRunner()
    base = ["gckd", "eval", str(runs["root"] / "adapt"), "--data", str(datasets["rstpreid"]), "--rerank-k", "5",
            "--json"]

    def evaluation(*extra: str) -> dict:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])["evaluation"]

    itm_only = evaluation()
    zero = evaluation("--rerank-score", "itm+itc", "--rerank-itc-weight", "0")
    assert zero["itm"] == itm_only["itm"] == runs["adapt"]["evaluation"]["itm"]
    assert (itm_only["rerank_score"], zero["rerank_score"]) == ("itm", "itm+itc")
    huge = evaluation("--rerank-score", "itm+itc", "--rerank-itc-weight", "1e9")
    assert huge["itm"]["map"] == pytest.approx(huge["itc"]["map"], abs=1e-6)
    bad = runner.invoke(app, [*base, "--rerank-score", "itc"])  # `crossret` turns a ConfigError into exit 2
    assert isinstance(bad.exception, ConfigError) and "rerank_score='itc' must be one of" in str(bad.exception)


def test_delta_calibrated_on_the_source_is_the_one_the_adaptation_trains_with(
        runs: dict, datasets: dict[str, Path], tmp_path: Path) -> None:
    """``--delta-precision``: δ is computed from the starting model's features of the source's test split (this
    source has no val split), recorded in the metrics and used (cosine scale) by the training config."""
    import yaml

    from crossret.textimage.calibration import calibrate_delta

    out = tmp_path / "calibrated"
    set_args = [a for key, value in {**TRAIN, "cd_itm_mining": "banks"}.items() for a in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["gckd", "adapt", "--source", str(datasets["cuhk-pedes"]), "--target",
                                      str(datasets["rstpreid"]), "--init", str(runs["root"] / "pre"), "--out", str(out),
                                      "--rerank-k", "0", "--delta-precision", "0.3", *set_args])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    calibration = metrics["delta_calibration"]
    assert calibration["split"] == "cuhk-pedes:test" and calibration["precision"] == 0.3
    _, _, view, ref = _reference_embeddings(runs["root"] / "pre", datasets["cuhk-pedes"])
    expected = calibrate_delta(torch.cat([e[1] for e in ref["encoded"]]), ref["image_feat"], view.caption_person_ids,
                               view.image_person_ids, precision=0.3)
    assert calibration["delta"] == pytest.approx(expected.delta, abs=1e-5)
    assert (calibration["pairs"], calibration["mutual_pairs"], calibration["reached"]) == (
        expected.pairs, expected.mutual_pairs, expected.reached)
    trained = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (trained["delta"], trained["delta_on"]) == (calibration["delta"], "cosine")
    assert metrics["train_config"]["delta"] == calibration["delta"]
    assert "calibrated on cuhk-pedes:test" in result.output

    refused = CliRunner().invoke(app, ["gckd", "adapt", "--source", str(datasets["cuhk-pedes"]), "--target",
                                       str(datasets["rstpreid"]), "--init", str(runs["root"] / "pre"), "--out",
                                       str(tmp_path / "refused"), "--delta-precision", "0.3", "--delta-split", "val",
                                       *set_args])
    assert refused.exit_code != 0
    assert "--delta-split val: the source cuhk-pedes has no records in that split" in str(refused.exception)
    assert not (tmp_path / "refused").exists()
