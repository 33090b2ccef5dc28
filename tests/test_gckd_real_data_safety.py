"""The real-data GCKD path: an ``--init`` checkpoint against the vocabulary (refused without its own,
taken from a crossret run automatically), ``--max-tokens`` (stored, truncating, bounded by the position
table), strict and ``--no-strict`` loading, ``--workers`` (identical batches and models), the warning for
a random ALBEF-base, the tiny preset's training defaults, ``gckd synth --image-size`` and resuming a run
written before these options existed.

Checkpoints are small fakes in ALBEF's key layout (``torch.save({"model": state_dict})``): nothing is
downloaded."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from _cli import cli
from crossret.cli import main
from crossret.data.person import ImageTransform, build_train_pairs, load_person_dataset
from crossret.data.synthetic_person import generate_person_datasets
from crossret.errors import ConfigError, DataError
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.checkpoint import (
    albef_checkpoint_shapes,
    compare_albef_shapes,
    load_albef_checkpoint,
    model_to_albef_state,
)
from crossret.textimage.pipeline import (
    TINY_TRAIN_DEFAULTS,
    GckdRunConfig,
    _resume_view,
    build_model,
    evaluate_run,
    plan_init,
)
from crossret.textimage.search import GckdEncoder
from crossret.textimage.streams import PersonTrainingData
from crossret.textimage.tokenize import CaptionTokenizer

pytest.importorskip("transformers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# ALBEF-base with small widths and depths: the `base` preset's code path at a tiny model's cost.
SMALL_BASE = {"image_size": [32, 16], "patch_size": 8, "vision_width": 32, "vision_depth": 1, "vision_heads": 2,
              "text_width": 32, "text_heads": 2, "text_intermediate": 64, "text_layers": 1, "fusion_layers": 1,
              "embed_dim": 16}
SMALL_BASE_ARGS = [arg for key, value in SMALL_BASE.items() for arg in
                   ("--model-set", f"{key}={value}".replace(" ", ""))]
QUICK = ["--set", "epochs=1", "--set", "memory_size=16", "--set", "target_batch=4", "--rerank-k", "0"]


def _vocab_file(path: Path, size: int) -> Path:
    path.write_text("\n".join(SPECIAL + [f"tok{i}" for i in range(size - len(SPECIAL))]) + "\n", encoding="utf-8")
    return path


def _fake_albef(path: Path, config: AlbefConfig, *, drop: tuple[str, ...] = (),
                extra: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    """An ALBEF-layout checkpoint as ALBEF's own code writes it: {"model": state_dict}, no crossret metadata."""
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in model_to_albef_state(AlbefModel(config)).items() if k not in drop}
    state.update(extra or {})
    torch.save({"model": state}, path)
    return path


def _one_error_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gckd_real_data")
    generate_person_datasets(root, styles=("cuhk-pedes", "rstpreid"), n_train_ids=6, n_test_ids=3, images_per_id=2,
                             image_size=(32, 16), seed=5)
    return root


@pytest.fixture(scope="module")
def fakes(data: Path) -> dict[str, Path]:
    """A 500-token vocabulary, tiny ALBEF-layout checkpoints with a 500-row embedding table (plain, with an
    extra head and a missing key, with a wrongly shaped projection) and a small-`base` one."""
    root = data / "fakes"
    root.mkdir()
    tiny = AlbefConfig.tiny(vocab_size=500, max_position=40)
    return {
        "vocab500": _vocab_file(root / "vocab500.txt", 500),
        "vocab499": _vocab_file(root / "vocab499.txt", 499),
        "tiny500": _fake_albef(root / "tiny500.pth", tiny),
        "heads": _fake_albef(root / "heads.pth", tiny, drop=("itm_head.bias",),
                             extra={"itm_head2.weight": torch.zeros(2, 32)}),
        "badshape": _fake_albef(root / "badshape.pth", tiny, extra={"text_proj.weight": torch.zeros(8, 32)}),
        "base500": _fake_albef(root / "base500.pth", AlbefConfig.base(**SMALL_BASE, vocab_size=500)),
    }


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Through the command line: a tiny pre-training with --max-tokens 12 and the tiny defaults, then 1-epoch
    adaptations from it with the defaults, with --workers 2 and with the paper's lr 1e-5."""
    root = tmp_path_factory.mktemp("gckd_real_runs")
    mp = pytest.MonkeyPatch()
    outputs: dict[str, tuple[str, str]] = {}

    def run(name: str, *args: str) -> Path:  # `cli` needs the function-scoped capsys; this is module-scoped
        out, err = io.StringIO(), io.StringIO()
        mp.setattr(sys, "argv", ["crossret", *args, "--out", str(root / name)])
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = int(exc.code or 0)
        assert code == 0, err.getvalue()
        outputs[name] = (out.getvalue(), err.getvalue())
        return root / name

    source, target = str(data / "CUHK-PEDES"), str(data / "RSTPReid")
    try:
        pre = run("pre", "gckd", "pretrain", "--source", source, "--target", target, "--max-tokens", "12", *QUICK)
        adapt_args = ["gckd", "adapt", "--source", source, "--target", target, "--init", str(pre), "--max-tokens",
                      "12", *QUICK]
        adapt = run("adapt", *adapt_args)
        workers = run("adapt_workers", *adapt_args, "--workers", "2")
        slow = run("adapt_lr1e-5", *adapt_args, "--set", "lr=1e-5", "--set", "head_lr=1e-4")
    finally:
        mp.undo()
    return {"pre": pre, "adapt": adapt, "workers": workers, "slow": slow, "output": outputs}


# ------------------------------------------------------------------------------------------ vocabulary vs --init
def test_init_file_without_vocab_is_refused(data: Path, fakes: dict[str, Path], tmp_path: Path, monkeypatch,
                                            capsys) -> None:
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--init", fakes["tiny500"], *QUICK))
    assert "500-token word-embedding table" in line and "pass --vocab" in line and str(fakes["tiny500"]) in line
    assert not out.exists()


def test_init_file_with_a_vocab_of_another_size_is_refused(data: Path, fakes: dict[str, Path], tmp_path: Path,
                                                           monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--init", fakes["tiny500"], "--vocab", fakes["vocab499"], *QUICK))
    assert f"--vocab {fakes['vocab499']} has 499 tokens" in line and "has 500 rows" in line
    assert not out.exists()


def test_init_file_with_its_vocab_loads(data: Path, fakes: dict[str, Path], tmp_path: Path, monkeypatch,
                                        capsys) -> None:
    config = GckdRunConfig(stage="pretrain", source_dir=str(data / "CUHK-PEDES"), init=str(fakes["tiny500"]),
                           vocab=str(fakes["vocab500"]))
    plan = plan_init(config)
    assert plan.kind == "albef" and plan.vocab == fakes["vocab500"] and plan.albef is not None
    assert (plan.albef.vocab_size, plan.albef.max_position) == (500, 40)  # sized from the checkpoint's tables
    model, info = build_model(config, plan=plan)
    saved = torch.load(fakes["tiny500"], weights_only=True)["model"]
    assert torch.equal(model.text.embeddings.word_embeddings.weight,
                       saved["text_encoder.bert.embeddings.word_embeddings.weight"])
    assert info["kind"] == "albef" and info["missing_keys"] == [] and info["unexpected_keys"] == []

    out = tmp_path / "run"
    code, _, stderr = cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out", out,
                          "--init", fakes["tiny500"], "--vocab", fakes["vocab500"], *QUICK)
    assert code == 0, stderr
    assert "warning:" not in stderr
    assert (out / "vocab.txt").read_bytes() == fakes["vocab500"].read_bytes()
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["init"]["kind"] == "albef" and written["init"]["vocab"] == "--vocab"
    assert written["albef"]["vocab_size"] == 500


def test_model_of_a_run_takes_that_runs_vocab(runs: dict[str, Any], data: Path, tmp_path: Path, monkeypatch,
                                              capsys) -> None:
    out = tmp_path / "run"
    code, _, stderr = cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out", out,
                          "--init", runs["pre"] / "model.pt", "--max-tokens", "12", *QUICK)
    assert code == 0, stderr
    assert (out / "vocab.txt").read_bytes() == (runs["pre"] / "vocab.txt").read_bytes()
    init = yaml.safe_load((out / "config.yaml").read_text())["init"]
    assert init["kind"] == "albef" and init["vocab"] == f"the run directory of --init {runs['pre'] / 'model.pt'}"


def test_init_run_with_another_vocab_is_refused(runs: dict[str, Any], data: Path, fakes: dict[str, Path],
                                                tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "adapt", "--source", data / "CUHK-PEDES", "--target",
                                data / "RSTPReid", "--out", out, "--init", runs["pre"], "--vocab", fakes["vocab500"],
                                "--max-tokens", "12", *QUICK))
    assert f"--vocab {fakes['vocab500']} differs from the vocabulary the --init run" in line
    assert "drop --vocab" in line and not out.exists()


# ------------------------------------------------------------------------------------------ --max-tokens
def test_max_tokens_is_stored_and_truncates_captions(runs: dict[str, Any], data: Path) -> None:
    saved = yaml.safe_load((runs["pre"] / "config.yaml").read_text())
    assert saved["run"]["max_tokens"] == 12
    long_caption = " ".join(["woman red coat black bag"] * 12)  # 60 words
    encoder = GckdEncoder.from_run(runs["pre"])
    ids, mask = encoder.tokenizer([long_caption, "a man"])
    assert ids.shape == (2, 12) and mask[0].tolist() == [1] * 12 and int(mask[1].sum()) < 12
    assert ids[0, 0] == encoder.tokenizer.cls_token_id and ids[0, -1] == encoder.tokenizer.sep_token_id
    # gckd eval uses the run's value unless given one
    assert evaluate_run(runs["pre"], data / "CUHK-PEDES", rerank_k=0)["max_tokens"] == 12
    assert evaluate_run(runs["pre"], data / "CUHK-PEDES", rerank_k=0, max_tokens=20)["max_tokens"] == 20
    # a 40-token tokenizer (the default) on the same caption: exactly 40
    tok = CaptionTokenizer.from_vocab(runs["pre"] / "vocab.txt", max_length=40)
    assert tok([long_caption]).input_ids.shape == (1, 40)


def test_max_tokens_beyond_the_position_table_is_refused(runs: dict[str, Any], data: Path, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    max_position = yaml.safe_load((runs["pre"] / "config.yaml").read_text())["albef"]["max_position"]
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "eval", runs["pre"], "--data", data / "CUHK-PEDES",
                                "--max-tokens", max_position + 1))
    assert f"max_tokens={max_position + 1} (--max-tokens) exceeds the {max_position} position embeddings" in line
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--model", "base", "--max-tokens", "513", *QUICK))
    assert "max_tokens=513 (--max-tokens) exceeds the 512 position embeddings of --model base" in line
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "adapt", "--source", data / "CUHK-PEDES", "--target",
                                data / "RSTPReid", "--out", out, "--init", runs["pre"], *QUICK))  # default 40 > 32
    assert f"max_tokens=40 (--max-tokens) exceeds the {max_position} position embeddings of the --init run" in line
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--max-tokens", "1", *QUICK))
    assert "max_tokens=1 (--max-tokens): must be an integer in [2, 4096]" in line
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--max-tokens", 10**12, *QUICK))  # tiny grows its table: bounded here
    assert "max_tokens=1000000000000 (--max-tokens): must be an integer in [2, 4096]" in line
    assert not out.exists()


# ------------------------------------------------------------------------------------------ strict / --no-strict
def test_strict_refuses_missing_and_unexpected_keys(data: Path, fakes: dict[str, Path], tmp_path: Path,
                                                    monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--init", fakes["heads"], "--vocab", fakes["vocab500"], *QUICK))
    assert "1 missing (itm_head.bias), 1 unexpected (itm_head2.weight)" in line and "pass --no-strict" in line
    assert not out.exists()


def test_non_strict_loads_and_lists_the_keys(data: Path, fakes: dict[str, Path], tmp_path: Path, monkeypatch,
                                             capsys, caplog) -> None:
    config = GckdRunConfig(stage="pretrain", source_dir=str(data / "CUHK-PEDES"), init=str(fakes["heads"]),
                           vocab=str(fakes["vocab500"]), init_strict=False)
    with caplog.at_level(logging.WARNING, logger="crossret"):
        model, info = build_model(config)
    assert info["missing_keys"] == ["itm_head.bias"] and info["unexpected_keys"] == ["itm_head2.weight"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "itm_head.bias" in warned[0] and "itm_head2.weight" in warned[0]
    saved = torch.load(fakes["heads"], weights_only=True)["model"]
    assert torch.equal(model.itm_head.weight, saved["itm_head.weight"])  # the shared keys are loaded

    out = tmp_path / "run"
    code, stdout, stderr = cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                               out, "--init", fakes["heads"], "--vocab", fakes["vocab500"], "--no-strict", *QUICK)
    assert code == 0, stderr
    assert f"--init {fakes['heads']}: 1 missing keys (random initialisation): itm_head.bias" in stdout
    assert f"--init {fakes['heads']}: 1 unexpected keys (ignored): itm_head2.weight" in stdout
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "itm_head.bias" in warnings[0] and "itm_head2.weight" in warnings[0]
    assert "WARNING --init" in (out / "run.log").read_text()
    init = yaml.safe_load((out / "config.yaml").read_text())["init"]
    assert init["strict"] is False and init["missing_keys"] == ["itm_head.bias"]
    assert init["unexpected_keys"] == ["itm_head2.weight"]


def test_shape_mismatch_is_refused_even_non_strict(data: Path, fakes: dict[str, Path], tmp_path: Path,
                                                   monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--init", fakes["badshape"], "--vocab", fakes["vocab500"], "--no-strict", *QUICK))
    assert "text_proj.weight: checkpoint (8, 32) vs model (16, 32)" in line and "--model-set" in line
    assert not out.exists()


def test_compare_albef_shapes_reports_exact_keys(fakes: dict[str, Path]) -> None:
    config = AlbefConfig.tiny(vocab_size=500, max_position=40)
    shapes, meta = albef_checkpoint_shapes(fakes["heads"])
    assert meta == {} and shapes["text_encoder.bert.embeddings.word_embeddings.weight"] == (500, 32)
    report = compare_albef_shapes(shapes, config)
    assert (report.missing, report.unexpected, report.mismatched) == (["itm_head.bias"], ["itm_head2.weight"], [])
    # one of two tied names is enough; a pos_embed of another grid is interpolated, not a mismatch
    shapes = dict(albef_checkpoint_shapes(fakes["tiny500"])[0])
    del shapes["text_encoder.cls.predictions.decoder.weight"]
    shapes["visual_encoder.pos_embed"] = (1, 1 + 6 * 3, 32)
    report = compare_albef_shapes(shapes, config)
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], [])
    # and the same checkpoint loads with load_albef_checkpoint (strict)
    assert load_albef_checkpoint(fakes["tiny500"], config).missing_keys == []


# ------------------------------------------------------------------------------------------ --workers
def test_worker_batches_equal_in_process_batches(data: Path) -> None:
    source = build_train_pairs(load_person_dataset(None, data / "CUHK-PEDES"))
    target = build_train_pairs(load_person_dataset(None, data / "RSTPReid"))
    tokenizer = CaptionTokenizer.from_vocab(_vocab_file(data / "vocab_workers.txt", 50), max_length=16)

    def make(workers: int) -> PersonTrainingData:
        return PersonTrainingData(source, tokenizer, ImageTransform.train((32, 16), flip_prob=0.5), target=target,
                                  ids_per_batch=3, pairs_per_id=2, target_batch=4, seed=3, workers=workers)

    plain, parallel = make(0), make(2)
    try:
        for epoch in (0, 1, 0):  # the same workers serve every epoch
            before = torch.get_rng_state()
            got = list(parallel.batches(epoch))
            assert torch.equal(torch.get_rng_state(), before)  # the loader leaves torch's global RNG alone
            expected = list(plain.batches(epoch))
            assert len(got) == len(expected) > 0
            for a, b in zip(expected, got, strict=True):
                for name, x, y in zip(a._fields, a, b, strict=True):
                    assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), (epoch, name)
    finally:
        parallel.close()


def test_a_corrupt_image_in_a_worker_is_a_one_line_data_error(data: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "CUHK-PEDES"
    shutil.copytree(data / "CUHK-PEDES", root)
    source = build_train_pairs(load_person_dataset(None, root))
    broken = Path(source.image_paths[int(source.image_index[0])])
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 40)
    tokenizer = CaptionTokenizer.from_vocab(_vocab_file(tmp_path / "vocab.txt", 50), max_length=16)
    for workers in (0, 2):
        stream = PersonTrainingData(source, tokenizer, ImageTransform.train((32, 16)), ids_per_batch=3,
                                    pairs_per_id=2, seed=3, workers=workers)
        try:
            with pytest.raises(DataError) as caught:
                list(stream.batches(0))
        finally:
            stream.close()
        message = str(caught.value)
        assert message.startswith(f"{broken}: cannot decode the image") and "\n" not in message, (workers, message)


def test_workers_give_the_same_run(runs: dict[str, Any]) -> None:
    history = [json.loads((runs[name] / "metrics.json").read_text())["history"] for name in ("adapt", "workers")]
    assert history[0] == history[1]
    a, b = _params(runs["adapt"]), _params(runs["workers"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((runs["workers"] / "config.yaml").read_text())["run"]
    assert saved["workers"] == 2


def test_workers_are_validated(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out",
                                out, "--workers", "-1", *QUICK))
    assert "workers (--workers) must be an integer in [0," in line and "got -1" in line
    with pytest.raises(ConfigError, match=r"workers \(--workers\)"):
        GckdRunConfig(source_dir="x", stage="pretrain", workers=10**9).validate()
    assert not out.exists()


# ------------------------------------------------------------------------------------------ random ALBEF-base
def test_random_base_model_is_warned_about(data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    code, _, stderr = cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out", out,
                          "--model", "base", *SMALL_BASE_ARGS, *QUICK)
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, stderr
    assert "--model base without --init" in warnings[0] and "randomly initialised" in warnings[0]
    assert "--init ALBEF_4M.pth" in warnings[0]
    assert "WARNING --model base without --init" in (out / "run.log").read_text()


def test_no_random_base_warning_for_tiny_or_with_init(runs: dict[str, Any], data: Path, fakes: dict[str, Path],
                                                      tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    assert all("warning:" not in err for _, err in runs["output"].values())  # tiny runs
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="crossret"):
        code, _, stderr = cli(monkeypatch, capsys, "gckd", "pretrain", "--source", data / "CUHK-PEDES", "--out", out,
                              "--model", "base", *SMALL_BASE_ARGS, "--init", fakes["base500"], "--vocab",
                              fakes["vocab500"], *QUICK)
    assert code == 0, stderr
    assert "warning:" not in stderr
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e-5  # base keeps the paper's


# ------------------------------------------------------------------------------------------ tiny defaults
def test_tiny_defaults_are_recorded_and_base_keeps_the_papers() -> None:
    tiny = GckdRunConfig(stage="adapt", source_dir="s", target_dir="t").training_config()
    base = GckdRunConfig(stage="adapt", source_dir="s", target_dir="t", model="base").training_config()
    assert (tiny.lr, tiny.head_lr) == (TINY_TRAIN_DEFAULTS["lr"], TINY_TRAIN_DEFAULTS["head_lr"]) == (1e-3, 1e-3)
    assert (base.lr, base.head_lr) == (1e-5, 1e-4)
    explicit = GckdRunConfig(stage="pretrain", source_dir="s", train={"lr": 2e-4}).training_config()
    assert (explicit.lr, explicit.head_lr, explicit.kd_weight) == (2e-4, 1e-3, 0.0)


def test_one_tiny_adapt_epoch_with_the_defaults_moves_the_weights(runs: dict[str, Any]) -> None:
    assert yaml.safe_load((runs["pre"] / "config.yaml").read_text())["train"]["lr"] == 1e-3
    adapted = yaml.safe_load((runs["adapt"] / "config.yaml").read_text())
    assert (adapted["train"]["lr"], adapted["train"]["head_lr"]) == (1e-3, 1e-3) and adapted["run"]["train"] == {
        "epochs": 1, "memory_size": 16, "target_batch": 4}
    before = _params(runs["pre"])
    for key in ("text_proj.weight", "visual_encoder.blocks.0.attn.qkv.weight",
                "text_encoder.bert.encoder.layer.0.attention.self.query.weight"):
        change = {name: float((_params(runs[name])[key] - before[key]).norm() / before[key].norm())
                  for name in ("adapt", "slow")}
        assert change["adapt"] > 0.01, (key, change)  # > 1 % relative change in one short epoch
        assert change["slow"] < 0.005, (key, change)  # what lr 1e-5 did


# ------------------------------------------------------------------------------------------ resume, synth
def test_resume_accepts_runs_written_before_the_new_options() -> None:
    config = GckdRunConfig(stage="pretrain", source_dir="s")
    old = {k: v for k, v in config.to_dict().items() if k not in ("init_strict", "workers")}
    assert _resume_view(old) == _resume_view(config.to_dict())
    assert _resume_view({**config.to_dict(), "workers": 4}) == _resume_view(config.to_dict())
    assert _resume_view({**old, "max_tokens": 64}) != _resume_view(config.to_dict())
    assert _resume_view({**old, "init_strict": False}) != _resume_view(config.to_dict())


def test_synth_image_size(tmp_path: Path, monkeypatch, capsys) -> None:
    from PIL import Image

    code, _, stderr = cli(monkeypatch, capsys, "gckd", "synth", tmp_path / "d", "--train-ids", 2, "--test-ids", 1,
                          "--images-per-id", 1, "--image-size", 64, 32)
    assert code == 0, stderr
    dataset = load_person_dataset(None, tmp_path / "d" / "CUHK-PEDES")
    sizes = {Image.open(p).size[::-1] for p in dataset.image_paths}
    assert {h for h, _ in sizes} == {64}
    line = _one_error_line(*cli(monkeypatch, capsys, "gckd", "synth", tmp_path / "e", "--image-size", 100000, 32))
    assert "image_size (--image-size)" in line and not (tmp_path / "e").exists()
