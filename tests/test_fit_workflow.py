"""Adapting to an unlabelled target: ``crossret fit`` / ``encode`` / ``evaluate``, ``crossret.fit`` /
``crossret.load``, per-file label bases and the class-overlap check."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import crossret
from _cli import cli
from crossret import runs
from crossret.data.readers import read_domain_pair
from crossret.errors import DataError
from crossret.experiment import RunConfig, load_split
from crossret.retrieval.packing import unpack_codes

DIM = 16


def _domains(seed: int = 0, n_per_class: int = 25, classes: int = 4, shift: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, size=(classes, DIM))
    labels = np.repeat(np.arange(classes), n_per_class)
    xs = (centres[labels] + rng.standard_normal((labels.size, DIM))).astype(np.float32)
    xt = (centres[labels] + rng.standard_normal((labels.size, DIM)) + shift).astype(np.float32)
    return xs, xt, labels


@pytest.fixture
def files(tmp_path):
    xs, xt, labels = _domains()
    np.savez(tmp_path / "src.npz", features=xs, labels=labels)
    np.savez(tmp_path / "tgt.npz", features=xt)  # features only: a truly unlabelled target
    np.savez(tmp_path / "tgt_labelled.npz", features=xt, labels=labels)
    return tmp_path


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[:, None, :] != b[None, :, :]).sum(axis=2)


def test_four_commands_on_a_features_only_target(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    assert cli(monkeypatch, capsys, "fit", "itq", "--source", "src.npz", "--target", "tgt.npz", "--bits", 32,
               "--out", "M")[0] == 0
    assert cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npz", "--domain", "target", "--out",
               "codes.npy")[0] == 0
    assert cli(monkeypatch, capsys, "index", "build", "--codes", "codes.npy", "--out", "idx.crbi")[0] == 0
    code, out, err = cli(monkeypatch, capsys, "index", "search", "idx.crbi", "--queries", "codes.npy", "-k", 5,
                         "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    codes = np.load(files / "codes.npy")
    assert codes.shape == (100, 32) and codes.dtype == np.int8 and set(np.unique(codes)) <= {-1, 1}
    distances, ids = np.array(result["distances"]), np.array(result["ids"])
    reference = _hamming(codes, codes)
    assert (distances[:, 0] == 0).all()  # every item finds itself (or an identical code) first
    np.testing.assert_array_equal(distances, np.sort(reference, axis=1)[:, :5])
    np.testing.assert_array_equal(np.take_along_axis(reference, ids, axis=1), distances)
    # the codes are the fitted model's codes of the target features
    np.testing.assert_array_equal(codes, crossret.load(files / "M").encode(np.load(files / "tgt.npz")["features"]))
    # the model directory: resolved config, model, log, label-free diagnostics, marked as a model run
    model_dir = files / "M"
    assert {"config.yaml", "model.npz", "run.log", "diagnostics.json"} <= {p.name for p in model_dir.iterdir()}
    assert runs.read_marker(model_dir)["kind"] == "model"
    assert "labels hidden" in (model_dir / "run.log").read_text()


def test_python_fit_save_load_round_trip(files, tmp_path):
    xs, xt, _labels = _domains()
    model = crossret.fit("itq", xs, xt, bits=24, seed=3)  # arrays: features with unknown labels
    assert (model.method, model.bits, model.path) == ("itq", 24, None)
    codes = model.encode(xt)
    assert codes.shape == (xt.shape[0], 24) and codes.dtype == np.int8
    saved = model.save(tmp_path / "saved")
    again = crossret.load(saved)
    np.testing.assert_array_equal(again.encode(xt), codes)
    np.testing.assert_array_equal(again.encode(files / "tgt.npz"), codes)  # a feature file works too
    # the same fit from files gives the same codes (same features, same seed)
    from_files = crossret.fit("itq", files / "src.npz", files / "tgt.npz", bits=24, seed=3)
    np.testing.assert_array_equal(from_files.encode(xt), codes)


def test_fit_never_shows_target_labels(files, monkeypatch):
    seen = {}
    from crossret.hashing.itq import ITQ

    original = ITQ.fit

    def spy(self, source, target, progress=None, **kwargs):
        seen["target_labels"] = target.labels.copy()
        return original(self, source, target)

    monkeypatch.setattr(ITQ, "fit", spy)
    crossret.fit("itq", files / "src.npz", files / "tgt_labelled.npz", bits=8)
    assert (seen["target_labels"] == -1).all()


def test_import_crossret_stays_light():
    code = "import sys, crossret; crossret.fit; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encode_packed_and_evaluate_against_a_reference(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    assert cli(monkeypatch, capsys, "fit", "lsh", "--source", "src.npz", "--target", "tgt.npz", "--bits", 16,
               "--out", "M")[0] == 0
    assert cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npz", "--out", "plain.npy")[0] == 0
    assert cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npz", "--out", "packed.npy", "--packed",
               "--batch-size", 7)[0] == 0
    plain = np.load("plain.npy")
    np.testing.assert_array_equal(unpack_codes(np.load("packed.npy"), 16), plain)
    assert json.loads((files / "packed.npy.json").read_text())["bits"] == 16
    # an existing output file is kept unless --overwrite
    code, _, err = cli(monkeypatch, capsys, "encode", "M", "--input", "tgt.npz", "--out", "plain.npy")
    assert code == 2 and "--overwrite" in err

    code, out, err = cli(monkeypatch, capsys, "evaluate", "M", "--queries", "tgt_labelled.npz", "--database",
                         "src.npz", "--database-domain", "source", "--ties", "index", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    # reference: AP over the database order stably sorted by Hamming distance (ties broken by index)
    model = crossret.load("M")
    xs, xt, labels = _domains()
    q, d = model.encode(xt), model.encode(xs, domain="source")
    order = np.argsort(_hamming(q, d), axis=1, kind="stable")
    aps = []
    for i in range(len(q)):
        relevant = labels[order[i]] == labels[i]
        ranks = np.flatnonzero(relevant) + 1
        aps.append(np.mean(np.arange(1, ranks.size + 1) / ranks))
    assert result["map"] == pytest.approx(float(np.mean(aps)), abs=1e-9)
    assert (result["n_queries"], result["n_database"]) == (100, 100)


@pytest.mark.parametrize("method,overrides", [("itq", []),
                                              ("couple", ["epochs=2", "warmup_epochs=1", "graph_every=1",
                                                          "batch_size=32", "target_batch_size=32",
                                                          "hash_hidden=32", "encoder_dim=32"])])
def test_fit_and_encode_give_the_codes_of_run(files, monkeypatch, capsys, method, overrides):
    """crossret run and crossret fit + encode train through the same step: same data, same seed, same bits."""
    monkeypatch.chdir(files)
    sets = [arg for item in overrides for arg in ("--set", item)]
    code, _, err = cli(monkeypatch, capsys, "run", method, "--source", "src.npz", "--target", "tgt_labelled.npz",
                       "--bits", 16, "--seed", 5, "--out", "R", *sets)
    assert code == 0, err
    split = load_split(RunConfig(method=method, bits=16, source="src.npz", target="tgt_labelled.npz"))
    np.savez("train.npz", features=split.target_train.features)
    np.save("queries.npy", split.queries.features)
    code, _, err = cli(monkeypatch, capsys, "fit", method, "--source", "src.npz", "--target", "train.npz", "--bits",
                       16, "--seed", 5, "--out", "M", *sets)
    assert code == 0, err
    for name, input_file, domain in (("queries", "queries.npy", "target"), ("source", "src.npz", "source")):
        assert cli(monkeypatch, capsys, "encode", "M", "--input", input_file, "--domain", domain, "--out",
                   f"{name}.codes.npy")[0] == 0
        np.testing.assert_array_equal(np.load(f"{name}.codes.npy"), np.load(f"R/codes/{name}_codes.npy"))


# ---------------------------------------------------------------------------------------------- bad input
def _gckd_run(path):
    with runs.open_run(path, "gckd") as handle:
        (handle.path / "metrics.json").write_text("{}")
        handle.commit()


def _incomplete_model(path, files):
    crossret.fit("itq", files / "src.npz", files / "tgt.npz", bits=8, out=path)
    (path / "model.npz").unlink()


@pytest.mark.parametrize("case,message", [
    ("dims", "features per sample but target bad.npz has 8"),
    ("empty", "empty"),
    ("single", "needs at least 2"),
    ("disjoint", "share no class"),
    ("few", "share only 1 of the 4 source classes"),
    ("cuda", "--device cuda"),
    ("unknown-base", "--target-label-base must be auto, 0 or 1"),
])
def test_fit_refuses_bad_input_and_writes_nothing(files, monkeypatch, capsys, case, message):
    monkeypatch.chdir(files)
    _xs, xt, labels = _domains()
    target, extra, method = "tgt.npz", [], "itq"
    if case == "dims":
        np.savez("bad.npz", features=xt[:, :8])
    elif case == "empty":
        np.savez("bad.npz", features=np.zeros((0, DIM), np.float32))
    elif case == "single":
        np.savez("bad.npz", features=xt[:1])
    elif case == "disjoint":
        np.savez("bad.npz", features=xt, labels=labels + 10)
    elif case == "few":
        np.savez("bad.npz", features=xt, labels=labels + 3)
    elif case == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        method, extra = "couple", ["--device", "cuda"]
    elif case == "unknown-base":
        extra = ["--target-label-base", "2"]
    if case in ("dims", "empty", "single", "disjoint", "few"):
        target = "bad.npz"
    code, _out, err = cli(monkeypatch, capsys, "fit", method, "--source", "src.npz", "--target", target, "--bits", 8,
                         "--out", "M", *extra)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (files / "M").exists()
    if case in ("disjoint", "few"):
        assert "{0, 1, 2, 3}" in err and "--allow-class-mismatch" in err  # both label sets and the way out
        code, _, err = cli(monkeypatch, capsys, "fit", method, "--source", "src.npz", "--target", target, "--bits",
                           8, "--out", "M", "--allow-class-mismatch")
        assert code == 0, err


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"),
    ("incomplete", "incomplete"),
    ("gckd", "holds a gckd run"),
    ("domain", "--domain must be target or source"),
])
def test_encode_refuses_bad_model_dirs(files, monkeypatch, capsys, case, message):
    monkeypatch.chdir(files)
    model, extra = files / "M", []
    if case == "incomplete":
        _incomplete_model(model, files)
    elif case == "gckd":
        _gckd_run(model)
    elif case == "domain":
        crossret.fit("itq", files / "src.npz", files / "tgt.npz", bits=8, out=model)
        extra = ["--domain", "query"]
    code, _out, err = cli(monkeypatch, capsys, "encode", model, "--input", "tgt.npz", "--out", "codes.npy", *extra)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (files / "codes.npy").exists()


def test_fit_refuses_a_finished_model_dir_without_overwrite(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    args = ["fit", "itq", "--source", "src.npz", "--target", "tgt.npz", "--bits", 8, "--out", "M"]
    assert cli(monkeypatch, capsys, *args)[0] == 0
    before = (files / "M" / "model.npz").read_bytes()
    code, _, err = cli(monkeypatch, capsys, *args[:-4], "--bits", 16, "--out", "M")
    assert code == 2 and "diagnostics.json" in err and "--overwrite" in err
    assert (files / "M" / "model.npz").read_bytes() == before
    assert cli(monkeypatch, capsys, *args[:-4], "--bits", 16, "--out", "M", "--overwrite")[0] == 0
    assert crossret.load(files / "M").bits == 16


# ---------------------------------------------------------------------------------------------- label bases
def test_per_file_label_bases(files, monkeypatch, capsys):
    _xs, xt, labels = _domains()
    np.savez(files / "tgt1.npz", features=xt, labels=labels + 1)  # a 1-based target next to a 0-based source
    source, target, bases = read_domain_pair(files / "src.npz", files / "tgt1.npz", target_label_base=1)
    np.testing.assert_array_equal(target.labels, labels)
    np.testing.assert_array_equal(source.labels, labels)
    assert bases == {"source_label_base": 0, "target_label_base": 1}
    with pytest.raises(DataError, match="label_base=1"):
        read_domain_pair(files / "src.npz", files / "tgt1.npz", label_base=1)  # --label-base = both files

    monkeypatch.chdir(files)
    code, out, err = cli(monkeypatch, capsys, "run", "itq", "--source", "src.npz", "--target", "tgt1.npz", "--bits",
                         8, "--out", "R", "--target-label-base", "1", "--json")
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["protocol"]["target_label_base"] == 1 and metrics["map_single"] > 0.5


def test_an_interrupted_couple_fit_resumes_to_the_uninterrupted_model(files):
    """A model directory is opened before training: COUPLE checkpoints into it every epoch, an interrupted
    fit is kept (refused without --resume or --overwrite) and --resume finishes it bit for bit."""
    config = {"epochs": 3, "warmup_epochs": 1, "graph_every": 1, "batch_size": 32, "target_batch_size": 32,
              "hash_hidden": 32, "encoder_dim": 32, "num_threads": 1}
    args = ("couple", files / "src.npz", files / "tgt.npz")
    whole = crossret.fit(*args, bits=16, config=config, out=files / "whole")

    def stop_after_two_epochs(step: int, total: int, message: str = "") -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        crossret.fit(*args, bits=16, config=config, out=files / "cut", progress=stop_after_two_epochs)
    assert (files / "cut" / "checkpoints").is_dir() and not (files / "cut" / "diagnostics.json").exists()
    with pytest.raises(crossret.CrossretError, match="--resume"):
        crossret.fit(*args, bits=16, config=config, out=files / "cut")
    with pytest.raises(crossret.CrossretError, match="different configuration"):
        crossret.fit(*args, bits=16, config={**config, "lr": 1e-3}, out=files / "cut", resume=True)
    resumed = crossret.fit(*args, bits=16, config=config, out=files / "cut", resume=True)
    assert resumed.hash_method.diagnostics["resumed_from_epoch"] == 2
    x = np.load(files / "tgt.npz")["features"]
    np.testing.assert_array_equal(resumed.encode(x), whole.encode(x))
    np.testing.assert_array_equal(crossret.load(files / "cut").encode(x), whole.encode(x))
