"""COUPLE (crossret.hashing.couple): config validation, determinism, checkpoint/resume, persistence,
label hygiene, ablation switches, diagnostics, and the run/CLI integration (run_experiment --resume)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from _cli import cli
from _couple_common import BITS, TINY, fit_codes, gaussian_domains, stop_after, tiny, without_timings
from crossret.data import load_benchmark, make_split
from crossret.data.benchmarks import demo_domains
from crossret.data.domain import Domain
from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.experiment import RunConfig, run_experiment
from crossret.hashing import make_method
from crossret.hashing.couple import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    Couple,
    CoupleConfig,
    read_checkpoint,
)
from crossret.hashing.registry import load_method
from crossret.storage.sealed import save_torch

LOSS_KEYS = ("loss_total", "loss_ce", "loss_target_ce", "loss_target_im", "loss_coral", "loss_quant",
             "loss_relation", "loss_mix_low", "loss_mix_high")


# ---------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def domains():
    """(source, labelled target): 60 + 60 points in 16-d."""
    return gaussian_domains()


@pytest.fixture(scope="module")
def fitted(domains, tmp_path_factory):
    """The tiny COUPLE fitted once on the unlabelled target, checkpointing into a directory."""
    source, target = domains
    method = Couple(BITS, seed=0, config=tiny())
    method.checkpoint_dir = tmp_path_factory.mktemp("couple_ckpt")
    calls = []
    method.fit(source, target.without_labels(),
               progress=lambda s, t, m="": calls.append((s, t, m, torch.get_num_threads())))
    method.progress_calls = calls
    return method


def copy_checkpoint(method: Couple, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(method.checkpoint_dir / CHECKPOINT_NAME, where / CHECKPOINT_NAME)
    return where / CHECKPOINT_NAME


# ---------------------------------------------------------------------------------------- 1. config
BAD_VALUES = [
    ("selection", "graph"), ("solver", "cg"), ("select_rule", "top-k"), ("pairing", "random"),
    ("graph_features", "hash"), ("high_mixup_loss", "l1"), ("knn", "faiss"),
    ("ce_weight", -1.0), ("target_ce_weight", -0.5), ("quant_weight", -1), ("relation_weight", -100.0),
    ("low_mixup_weight", -0.1), ("high_mixup_weight", -1.0), ("target_fill", -3.0), ("weight_decay", -1e-6),
    ("lr", 0.0), ("lr", -1e-4), ("lr", float("nan")), ("relation_weight", float("inf")),
    ("quant_source_ratio", 1.5), ("relation_source_ratio", 1.01), ("mix_start", 1.2), ("mix_end", -0.1),
    ("select_ratio", 1.5), ("select_ratio", -0.1),
    ("epochs", 0), ("epochs", 2.0), ("epochs", True), ("graph_every", 0), ("walk_length", 0),
    ("batch_size", 1), ("target_batch_size", 1), ("warmup_epochs", -1), ("k_cross", -1), ("k_target", -1),
    ("k_source", -1), ("hash_hidden", -1), ("num_threads", -1), ("encoder_dim", 0), ("encoder_dim", 8.5),
    ("mixup_low", "yes"), ("mixup_high", 1), ("target_relation", None),
    ("diffusion_tol", 0.0), ("diffusion_tol", 2.0), ("disagreement_weight", 0.0), ("disagreement_weight", 1.5),
    ("lr", "0.001"), ("select_ratio", None), ("target_im_weight", -1.0), ("select_balance", "yes"),
]


BAD_VALUES += [  # the options added in session 7 (tests/test_couple_options.py tests their behaviour)
    ("select_ratio_end", 1.5), ("select_ratio_end", -0.01), ("select_ratio_end", float("nan")),
    ("select_ratio_end", "0.5"), ("select_ratio_end", True),
    ("select_agreement", "yes"), ("select_agreement", 1), ("select_agreement", None),
    ("target_seed_weight", -0.1), ("target_seed_weight", float("inf")), ("target_seed_weight", None),
    ("target_seed_weight", False),
    ("mix_pairs", "ends"), ("mix_pairs", None), ("mix_pairs", "Endpoints"),
    ("high_mixup_detach", 0), ("high_mixup_detach", "false"),
    ("ema_decay", 1.0), ("ema_decay", -0.1), ("ema_decay", 0.999999), ("ema_decay", float("nan")),
    ("ema_decay", True), ("ema_decay", "0.9"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_invalid_config_values_raise_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"couple: {key}\b"):
        CoupleConfig(**{key: value}).validate()
    # the constructor and the registry path validate too
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        Couple(BITS, config=CoupleConfig(**{key: value}))
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        make_method("couple", BITS, overrides={key: value})


def test_diffusion_selection_needs_cross_edges():
    with pytest.raises(ConfigError, match="k_cross"):
        CoupleConfig(selection="diffusion", k_cross=0).validate()
    # without diffusion, no cross edges is allowed
    assert CoupleConfig(selection="classifier", k_cross=0).validate().k_cross == 0


def test_boundary_values_are_accepted():
    config = CoupleConfig(select_ratio=0.0, warmup_epochs=0, hash_hidden=0, num_threads=0, batch_size=2,
                          target_batch_size=2, disagreement_weight=1e-6, diffusion_tol=1.0, mix_start=0.0,
                          mix_end=1.0, quant_source_ratio=1.0, relation_source_ratio=0.0, ce_weight=0,
                          k_target=0, k_source=0, encoder_dim=None)
    assert config.validate() is config
    assert CoupleConfig(select_ratio=1.0).validate().select_ratio == 1.0


def test_unknown_override_keys_are_refused_with_their_names():
    with pytest.raises(ConfigError, match="epoch, selection_rule") as info:
        make_method("couple", BITS, overrides={"epoch": 3, "selection_rule": "x", "lr": 1e-3})
    assert "known:" in str(info.value) and "select_rule" in str(info.value)
    method = make_method("couple", BITS, seed=5, overrides={"epochs": 3, "pairing": "nearest"})
    assert isinstance(method, Couple) and method.seed == 5
    assert (method.config.epochs, method.config.pairing, method.config.k_cross) == (3, "nearest", 3)


# ---------------------------------------------------------------------------------------- 2. determinism
def test_same_seed_gives_bit_identical_codes_and_other_seed_differs(domains, fitted):
    source, target = domains
    again, real = fit_codes(source, target.without_labels(), tiny())
    assert np.array_equal(real, fitted.encode_real(target.features))
    assert np.array_equal(again.encode(source.features), fitted.encode(source.features))
    assert without_timings(again.diagnostics["epochs"]) == without_timings(fitted.diagnostics["epochs"])
    _, other = fit_codes(source, target.without_labels(), tiny(), seed=1)
    assert not np.array_equal(np.sign(other), np.sign(real))


def test_fit_leaves_global_torch_state_alone(domains):
    source, target = domains
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Couple(BITS, config=tiny(epochs=2)).fit(source, target.without_labels())
    assert torch.equal(torch.rand(3), expected), "fit must not consume the caller's global torch RNG"
    assert torch.get_num_threads() == threads


def test_progress_is_reported_once_per_epoch(fitted):
    steps = [(s, t) for s, t, _, _ in fitted.progress_calls]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [c[2].split(" loss")[0] for c in fitted.progress_calls] == [f"couple: epoch {e}/4" for e in range(1, 5)]
    assert {c[3] for c in fitted.progress_calls} == {1}, "training runs with config.num_threads torch threads"
    assert "selected 30" in fitted.progress_calls[-1][2]


# ---------------------------------------------------------------------------------------- 3. resume
@pytest.mark.parametrize(("overrides", "interrupt_at"), [
    ({}, 2),
    # graph_every=3: the resumed epochs 3-4 reuse the restored graph/selection (no refresh at epoch 3)
    ({"graph_every": 3, "disagreement_weight": 0.1}, 2),
    ({"selection": "classifier", "pairing": "nearest"}, 3),
    ({}, 1),  # interrupted right after the warm-up: no selection in the checkpoint yet
])
def test_interrupted_and_resumed_fit_is_bit_identical(domains, tmp_path, overrides, interrupt_at):
    source, target = domains
    config = tiny(**overrides)
    full, full_real = fit_codes(source, target.without_labels(), config, checkpoint_dir=tmp_path / "full")

    first = Couple(BITS, seed=0, config=config)
    first.checkpoint_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        first.fit(source, target.without_labels(), progress=stop_after(interrupt_at))
    header = json.loads(read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["header"])
    assert header["epochs_done"] == interrupt_at

    resumed = Couple(BITS, seed=0, config=config)
    resumed.checkpoint_dir, resumed.resume = tmp_path / "cut", True
    epochs_seen = []
    resumed.fit(source, target.without_labels(), progress=lambda s, t, m="": epochs_seen.append(s))
    assert epochs_seen == list(range(interrupt_at + 1, 5)), "only the remaining epochs are trained"
    assert resumed.diagnostics["resumed_from_epoch"] == interrupt_at
    assert full.diagnostics["resumed_from_epoch"] == 0
    assert np.array_equal(resumed.encode_real(target.features), full_real)
    assert np.array_equal(resumed.encode(source.features), full.encode(source.features))
    assert without_timings(resumed.diagnostics["epochs"]) == without_timings(full.diagnostics["epochs"])
    assert len(resumed.selection_history) == len(full.selection_history)
    for got, want in zip(resumed.selection_history, full.selection_history, strict=True):
        assert got["epoch"] == want["epoch"]
        assert np.array_equal(got["selected"], want["selected"])
        assert np.array_equal(got["pseudo_labels"], want["pseudo_labels"])
    # the final checkpoints agree too (a resumed run can be resumed again)
    final = json.loads(read_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["header"])
    assert final["epochs_done"] == 4


def test_resume_without_checkpoint_or_without_flag_starts_over(domains, fitted, tmp_path):
    source, target = domains
    expected = fitted.encode_real(target.features)
    # resume=True but nothing to resume from: a fresh run
    fresh, real = fit_codes(source, target.without_labels(), tiny(), checkpoint_dir=tmp_path / "empty", resume=True)
    assert fresh.diagnostics["resumed_from_epoch"] == 0 and np.array_equal(real, expected)
    assert (tmp_path / "empty" / CHECKPOINT_NAME).is_file()
    # a complete checkpoint present but resume=False: retrains from scratch (same result), overwrites it
    copy_checkpoint(fitted, tmp_path / "full")
    again, real = fit_codes(source, target.without_labels(), tiny(), checkpoint_dir=tmp_path / "full")
    assert again.diagnostics["resumed_from_epoch"] == 0 and np.array_equal(real, expected)
    # resume from a finished checkpoint: nothing left to train, same codes, full epoch log
    done, real = fit_codes(source, target.without_labels(), tiny(), checkpoint_dir=tmp_path / "full", resume=True)
    assert done.diagnostics["resumed_from_epoch"] == 4
    assert np.array_equal(real, expected)
    assert without_timings(done.diagnostics["epochs"]) == without_timings(fitted.diagnostics["epochs"])
    assert [h["epoch"] for h in done.selection_history] == [2, 3, 4]


# ---------------------------------------------------------------------------------------- 4. resume refusals
@pytest.mark.parametrize("change", [{"config": {"epochs": 5}}, {"config": {"lr": 2e-4}}, {"seed": 1},
                                    {"bits": 32}])
def test_resume_refuses_a_checkpoint_of_another_configuration(domains, fitted, tmp_path, change):
    source, target = domains
    path = copy_checkpoint(fitted, tmp_path / "ck")
    method = Couple(change.get("bits", BITS), seed=change.get("seed", 0), config=tiny(**change.get("config", {})))
    method.checkpoint_dir, method.resume = tmp_path / "ck", True
    with pytest.raises(ConfigError, match="different configuration") as info:
        method.fit(source, target.without_labels())
    assert str(path) in str(info.value)
    changed = next(iter(change.get("config", change)))
    assert f"(differs: {changed})" in str(info.value), "the message names exactly the setting that differs"


def test_resume_of_an_older_versions_checkpoint_names_the_options_it_lacks(domains, fitted, tmp_path):
    """A checkpoint from before an option existed has no entry for it: the refusal says so."""
    source, target = domains
    path = copy_checkpoint(fitted, tmp_path / "ck")
    payload = read_checkpoint(path)
    header = json.loads(payload["header"])
    del header["config"]["ema_decay"], header["config"]["mix_pairs"]
    payload["header"] = json.dumps(header)
    save_torch(path, payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    method = Couple(BITS, seed=0, config=tiny())
    method.checkpoint_dir, method.resume = tmp_path / "ck", True
    with pytest.raises(ConfigError, match=r"\(not in the checkpoint \(written by an older crossret\): "
                                          r"ema_decay, mix_pairs\)"):
        method.fit(source, target.without_labels())


def test_resume_refuses_a_checkpoint_of_other_data(domains, fitted, tmp_path):
    source, target = domains
    path = copy_checkpoint(fitted, tmp_path / "ck")
    other_target = target.with_features(target.features + np.float32(0.01)).without_labels()
    permuted = Domain("src", source.features, np.roll(source.labels, 1))
    for src, tgt in ((source, other_target), (permuted, target.without_labels()),
                     (source.subset(np.arange(59)), target.without_labels())):
        method = Couple(BITS, seed=0, config=tiny())
        method.checkpoint_dir, method.resume = tmp_path / "ck", True
        with pytest.raises(ConfigError, match="different data") as info:
            method.fit(src, tgt)
        assert str(path) in str(info.value)
    # the target's labels are not part of the data fingerprint (they are never used)
    method = Couple(BITS, seed=0, config=tiny())
    method.checkpoint_dir, method.resume = tmp_path / "ck", True
    method.fit(source, target)
    assert method.diagnostics["resumed_from_epoch"] == 4


def _rewrite_checkpoint(path: Path, edit) -> None:
    payload = read_checkpoint(path)
    edit(payload)
    save_torch(path, payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)


def _set_header(key, value):
    def edit(payload):
        header = json.loads(payload["header"])
        header[key] = value
        payload["header"] = json.dumps(header)

    return edit


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", "truncated"),
    ("garbage", "not a COUPLE checkpoint"),
    ("empty", "truncated"),
    ("altered", "checksum mismatch"),
    ("legacy_altered", "checksum mismatch in member"),
    ("format", "not a COUPLE checkpoint"),
    ("version", "not a COUPLE checkpoint"),
    ("no_rng", "inconsistent"),
    ("bad_model", "inconsistent"),
])
def test_damaged_checkpoint_is_a_file_format_error_naming_the_file(domains, fitted, tmp_path, damage, message):
    source, target = domains
    path = copy_checkpoint(fitted, tmp_path / "ck")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "altered":  # one bit anywhere (here the last byte) fails the SHA-256 check
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "legacy_altered":  # a pre-container (bare torch.save) file: its zip CRC-32s are checked
        payload = read_checkpoint(path)
        torch.save(payload, path)
        legacy = bytearray(path.read_bytes())
        weight = next(iter(payload["model"].values())).numpy().tobytes()
        legacy[legacy.find(weight) + 3] ^= 1
        path.write_bytes(bytes(legacy))
    elif damage == "format":
        _rewrite_checkpoint(path, _set_header("format", "something.else"))
    elif damage == "version":
        _rewrite_checkpoint(path, _set_header("version", 99))
    elif damage == "no_rng":
        _rewrite_checkpoint(path, lambda p: p["arrays"].pop("torch_rng"))
    elif damage == "bad_model":
        _rewrite_checkpoint(path, lambda p: p["model"].pop(next(iter(p["model"]))))
    method = Couple(BITS, seed=0, config=tiny())
    method.checkpoint_dir, method.resume = tmp_path / "ck", True
    with pytest.raises(FileFormatError, match=message) as info:
        method.fit(source, target.without_labels())
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------- 5. persistence
@pytest.mark.parametrize("overrides", [{}, {"hash_hidden": 0, "encoder_dim": None, "epochs": 2}])
def test_save_load_round_trip_gives_identical_codes(domains, fitted, tmp_path, overrides):
    source, target = domains
    method = fitted if not overrides else Couple(BITS, seed=3, config=tiny(**overrides)).fit(
        source, target.without_labels())
    path = method.save(tmp_path / "model.pt")
    queries = np.random.default_rng(9).normal(size=(25, 16)).astype(np.float32)
    for loaded in (load_method(path), Couple.load(path)):
        assert isinstance(loaded, Couple)
        assert (loaded.bits, loaded.seed, loaded.input_dim) == (method.bits, method.seed, 16)
        assert loaded.config == method.config
        assert np.array_equal(loaded.encode(queries), method.encode(queries))
        assert np.array_equal(loaded.encode_real(target.features), method.encode_real(target.features))
        assert np.array_equal(loaded.predict(target.features), method.predict(target.features))
        assert loaded.diagnostics["resumed_from_epoch"] == 0
        assert len(loaded.diagnostics["epochs"]) == method.config.epochs


def test_encode_checks_its_input(fitted):
    with pytest.raises(DataError, match=r"couple: expected features of shape \(N, 16\)"):
        fitted.encode(np.zeros((4, 15), dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        fitted.encode(np.full((2, 16), np.nan))
    codes = fitted.encode(np.zeros((3, 16)))
    assert codes.dtype == np.int8 and codes.shape == (3, BITS) and set(np.unique(codes)) <= {-1, 1}
    unfitted = Couple(BITS, config=tiny())
    with pytest.raises(ConfigError, match="fit"):
        unfitted.encode(np.zeros((2, 16)))
    with pytest.raises(ConfigError, match="fit"):
        unfitted.save("never-written.pt")
    assert not Path("never-written.pt").exists()


def test_encode_of_zero_rows_gives_an_empty_code_array(fitted):
    codes = fitted.encode(np.zeros((0, 16), dtype=np.float32))
    assert codes.shape == (0, BITS) and codes.dtype == np.int8


def test_fit_rejects_unusable_domains(domains):
    source, target = domains
    method = Couple(BITS, config=tiny())
    with pytest.raises(DataError, match="unknown labels"):
        method.fit(source.without_labels(), target.without_labels())
    with pytest.raises(DataError, match="at least 2 training samples"):
        method.fit(source, target.subset(np.array([0])).without_labels())
    with pytest.raises(DataError, match="16-d but target features 8-d"):
        method.fit(source, Domain("t", target.features[:, :8], np.full(target.n, -1)))


# ---------------------------------------------------------------------------------------- 6. target labels
def test_target_labels_are_never_used_in_training(domains, fitted):
    source, target = domains
    expected = fitted.encode_real(target.features)
    rng = np.random.default_rng(7)
    for labels in (target.labels, rng.integers(0, 9, size=target.n), np.full(target.n, -1),
                   np.where(rng.random(target.n) < 0.5, -1, target.labels)):
        method, real = fit_codes(source, Domain("tgt", target.features, labels), tiny())
        assert np.array_equal(real, expected)
        assert all(np.array_equal(a["pseudo_labels"], b["pseudo_labels"])
                   for a, b in zip(method.selection_history, fitted.selection_history, strict=True))


# ---------------------------------------------------------------------------------------- 7. ablations
def test_classifier_selection_runs_no_diffusion(domains):
    source, target = domains
    method, _ = fit_codes(source, target.without_labels(), tiny(selection="classifier"))
    refreshes = [r for r in method.diagnostics["epochs"] if r["epoch"] > 1]
    assert len(refreshes) == 3
    for record, entry in zip(refreshes, method.selection_history, strict=True):
        assert "diffusion_rounds" not in record and "targets_reached" not in record
        # Every target is a candidate: the per-class top 50 % keeps round(0.5 * n_c) of each pseudo-class.
        assert record["selected"] == int(np.round(0.5 * np.bincount(entry["pseudo_labels"])).sum())
        assert record["graph_edges_cross"] > 0  # the walks still need the graph
    # no graph at all when neither diffusion nor walks need one
    method, _ = fit_codes(source, target.without_labels(), tiny(selection="classifier", pairing="nearest"))
    assert not any(k.startswith("graph_") for r in method.diagnostics["epochs"] for k in r)


def test_positive_rule_selects_exactly_the_saturated_targets(domains):
    source, target = domains
    method, _ = fit_codes(source, target.without_labels(), tiny(select_rule="positive"))
    records = [r for r in method.diagnostics["epochs"] if "selected" in r]
    assert len(records) == 3
    for record, history in zip(records, method.selection_history, strict=True):
        assert record["selected"] == record["targets_saturated"] == history["selected"].size
        assert record["targets_saturated"] <= record["targets_reached"] <= 60


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.0])
def test_select_ratio_bounds_the_selected_set(domains, ratio):
    source, target = domains
    method, _ = fit_codes(source, target.without_labels(), tiny(select_ratio=ratio, epochs=3))
    for record in method.diagnostics["epochs"][1:]:
        assert record["selected"] <= round(ratio * 60)
        assert record["selected"] == min(round(ratio * 60), record["targets_reached"])
    if ratio == 0.0:  # nothing selected: no target CE and nothing to mix
        assert all(r["loss_target_ce"] == 0.0 and r["loss_mix_low"] == 0.0 and r["mixed_samples"] == 0
                   for r in method.diagnostics["epochs"])


@pytest.mark.parametrize("pairing", ["random-walk", "nearest"])
def test_mixup_switches(domains, pairing):
    source, target = domains
    on, _ = fit_codes(source, target.without_labels(), tiny(pairing=pairing))
    off, _ = fit_codes(source, target.without_labels(), tiny(pairing=pairing, mixup_low=False, mixup_high=False))
    low_only, _ = fit_codes(source, target.without_labels(), tiny(pairing=pairing, mixup_high=False))
    assert on.diagnostics["epochs"][0]["loss_mix_low"] == 0.0  # warm-up: no selection yet
    assert any(r["loss_mix_low"] > 0 for r in on.diagnostics["epochs"])
    assert any(r["loss_mix_high"] > 0 for r in on.diagnostics["epochs"])
    assert any(r["mixed_samples"] > 0 for r in on.diagnostics["epochs"])
    assert all(r["loss_mix_low"] == 0.0 and r["loss_mix_high"] == 0.0 and r["mixed_samples"] == 0
               for r in off.diagnostics["epochs"])
    assert any(r["loss_mix_low"] > 0 for r in low_only.diagnostics["epochs"])
    assert all(r["loss_mix_high"] == 0.0 for r in low_only.diagnostics["epochs"])
    if pairing == "nearest":  # one mixed sample per selected batch target: at most the batch size per step
        steps = on.diagnostics["steps_per_epoch"]
        assert all(r["mixed_samples"] <= steps * 32 for r in on.diagnostics["epochs"])


def test_total_loss_is_the_weighted_sum_and_target_ce_weight_zero_still_trains(domains, fitted):
    source, target = domains
    weights = {"loss_ce": 1.0, "loss_target_ce": 0.0, "loss_quant": 1.0, "loss_relation": 100.0,
               "loss_mix_low": 0.1, "loss_mix_high": 1.0}
    method, real = fit_codes(source, target.without_labels(), tiny(target_ce_weight=0.0))
    for config_weights, model in ((weights, method), ({**weights, "loss_target_ce": 1.0}, fitted)):
        for record in model.diagnostics["epochs"]:
            combined = sum(w * record[k] for k, w in config_weights.items())
            assert record["loss_total"] == pytest.approx(combined, rel=1e-4, abs=1e-4)
    assert any(r["loss_target_ce"] > 0 for r in method.diagnostics["epochs"])  # logged, just not weighted
    assert not np.array_equal(real, fitted.encode_real(target.features))
    assert method.diagnostics["epochs"][0]["loss_total"] == fitted.diagnostics["epochs"][0]["loss_total"]


# ---------------------------------------------------------------------------------------- 8. label report
def test_label_report_matches_an_independent_count(domains, fitted):
    _, target = domains
    report = fitted.label_report(target.labels)
    rows = report["selection_quality"]
    refreshes = [r for r in fitted.diagnostics["epochs"] if "selected" in r]
    assert [row["epoch"] for row in rows] == [r["epoch"] for r in refreshes] == [2, 3, 4]
    for row, history, record in zip(rows, fitted.selection_history, refreshes, strict=True):
        chosen = [int(i) for i in history["selected"]]
        assert row["selected"] == record["selected"] == len(chosen)
        correct = sum(int(history["pseudo_labels"][i]) == int(target.labels[i]) for i in chosen)
        assert row["selected_accuracy"] == pytest.approx(correct / len(chosen))
        all_correct = sum(int(p) == int(y) for p, y in zip(history["pseudo_labels"], target.labels, strict=True))
        assert row["pseudo_label_accuracy"] == pytest.approx(all_correct / target.n)
    # on these well-separated blobs the selected pseudo-labels are mostly right
    assert rows[-1]["selected_accuracy"] >= 0.8


def test_label_report_by_hand():
    method = Couple(BITS, config=tiny())
    method.selection_history = [
        {"epoch": 3, "selected": np.array([0, 2]), "pseudo_labels": np.array([1, 0, 1, 1])},
        {"epoch": 5, "selected": np.array([], dtype=np.int64), "pseudo_labels": np.array([1, 1, 0, 1])},
    ]
    rows = method.label_report(np.array([1, 1, 0, 1]))["selection_quality"]
    assert rows == [
        {"epoch": 3, "selected": 2, "selected_accuracy": 0.5, "pseudo_label_accuracy": 0.5},
        {"epoch": 5, "selected": 0, "selected_accuracy": None, "pseudo_label_accuracy": 1.0},
    ]
    assert Couple(BITS, config=tiny()).label_report(np.array([0, 1])) == {"selection_quality": []}


# ---------------------------------------------------------------------------------------- 9. diagnostics
def test_diagnostics_record_every_epoch(domains, fitted):
    source, target = domains
    diag = fitted.diagnostics
    epochs = diag["epochs"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert (diag["n_source"], diag["n_target"], diag["num_classes"]) == (60, 60, 3)
    assert diag["steps_per_epoch"] == 2  # ceil(60 / 32)
    assert diag["final_losses"] == {k: epochs[-1][k] for k in LOSS_KEYS}
    codes = np.concatenate([fitted.encode(source.features, domain="source"), fitted.encode(target.features)])
    assert diag["train_bit_balance"] == pytest.approx(float(np.abs((codes > 0).mean(axis=0) - 0.5).mean()))
    warmup = epochs[0]
    assert not any(k.startswith(("graph_", "diffusion_")) for k in warmup) and "selected" not in warmup
    assert warmup["loss_target_ce"] == 0.0 and warmup["mixed_samples"] == 0
    for record in epochs:
        assert all(isinstance(record[k], float) and np.isfinite(record[k]) for k in LOSS_KEYS)
        assert record["loss_ce"] > 0 and record["loss_quant"] > 0
    for record in epochs[1:]:
        assert record["graph_nodes"] == source.n + target.n
        assert record["graph_edges_cross"] > 0 and record["graph_edges_target"] > 0
        assert record["graph_edges_source"] > 0
        assert 0.0 <= record["diffusion_mass_to_target"] <= 1.0 and record["diffusion_mass_to_target"] > 0
        assert record["diffusion_converged"] is True and record["diffusion_rounds"] >= 1
        assert 0 <= record["targets_saturated"] <= record["targets_reached"] <= target.n
        assert record["selected"] == min(30, record["targets_reached"])
        assert 0.0 <= record["classifier_agreement"] <= 1.0
    # the checkpoint holds the same log
    header = json.loads(read_checkpoint(fitted.checkpoint_dir / CHECKPOINT_NAME)["header"])
    assert header["epochs_done"] == 4 and header["seed"] == 0 and header["bits"] == BITS
    assert header["config"] == dataclasses.asdict(fitted.config)
    assert without_timings(header["epoch_log"]) == without_timings(epochs)


def test_push_solver_selects_like_the_active_set_solver(domains, fitted):
    source, target = domains
    push, _ = fit_codes(source, target.without_labels(), tiny(solver="push", epochs=2))
    exact = Couple(BITS, config=tiny(epochs=2)).fit(source, target.without_labels())
    assert push.diagnostics["epochs"][1]["diffusion_converged"] is True
    assert np.array_equal(push.selection_history[0]["selected"], exact.selection_history[0]["selected"])
    assert np.array_equal(push.selection_history[0]["pseudo_labels"], exact.selection_history[0]["pseudo_labels"])


def test_auto_neighbour_search_is_exact_on_small_data(domains, fitted):
    source, target = domains
    _, real = fit_codes(source, target.without_labels(), tiny(knn="exact"))
    assert fitted.config.knn == "auto"
    assert np.array_equal(real, fitted.encode_real(target.features))


# ---------------------------------------------------------------------------------------- run_experiment
@pytest.fixture(scope="module")
def demo_split():
    """A small slice of the always-available demo benchmark (every 6th image of each domain)."""
    source, target = demo_domains()
    return make_split(source.subset(np.arange(0, source.n, 6)), target.subset(np.arange(0, target.n, 6)),
                      benchmark="demo", query_fraction=0.1, split_seed=313)


def _run_config(out_dir: Path | None, **method_config) -> RunConfig:
    return RunConfig(method="couple", benchmark="demo", bits=BITS, method_config={**TINY, "epochs": 3,
                                                                                 **method_config},
                     out_dir=str(out_dir) if out_dir else None)


CODE_FILES = [f"{name}_{kind}.npy" for name in ("queries", "source", "target_train") for kind in ("codes", "labels")]


def test_run_experiment_resume_is_bit_identical_and_reports_labels(demo_split, tmp_path):
    full = run_experiment(_run_config(tmp_path / "full"), split=demo_split)
    assert (tmp_path / "full" / "checkpoints" / CHECKPOINT_NAME).is_file()

    run_dir = tmp_path / "cut"
    config = _run_config(run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, split=demo_split, progress=stop_after(2))
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / CHECKPOINT_NAME).is_file()
    saved_config = (run_dir / "config.yaml").read_text()

    # refusals leave the interrupted directory as it was
    for other, keys in ((_run_config(run_dir, epochs=4), "method_config, resolved_method_config"),
                        (dataclasses.replace(config, seed=1), "seed"),
                        (dataclasses.replace(config, bits=32, ties="index"), "bits, ties")):
        with pytest.raises(ConfigError, match="different configuration") as info:
            run_experiment(other, split=demo_split, resume=True)
        assert f"({keys} differ)" in str(info.value)
    assert (run_dir / "config.yaml").read_text() == saved_config
    assert (run_dir / "checkpoints" / CHECKPOINT_NAME).is_file()

    resumed = run_experiment(config, split=demo_split, resume=True)
    assert resumed.metrics["diagnostics"]["resumed_from_epoch"] == 2
    assert full.metrics["diagnostics"]["resumed_from_epoch"] == 0
    for name in CODE_FILES:
        assert np.array_equal(np.load(run_dir / "codes" / name), np.load(tmp_path / "full" / "codes" / name)), name
    assert resumed.metrics["map_cross"] == full.metrics["map_cross"]
    assert resumed.metrics["map_single"] == full.metrics["map_single"]
    assert "interrupted" in (run_dir / "run.log").read_text(), "resuming keeps the interrupted run's log"

    # the label report: one row per refresh, under diagnostics, also in metrics.json
    report = resumed.metrics["diagnostics"]["label_report"]
    assert report == full.metrics["diagnostics"]["label_report"]
    rows = report["selection_quality"]
    assert [r["epoch"] for r in rows] == [2, 3]
    labels = demo_split.target_train.labels
    for row, history in zip(rows, resumed.method.selection_history, strict=True):
        chosen = history["selected"]
        assert row["selected_accuracy"] == pytest.approx(float(np.mean(history["pseudo_labels"][chosen]
                                                                       == labels[chosen])))
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["diagnostics"]["label_report"] == report
    assert on_disk["diagnostics"]["resumed_from_epoch"] == 2

    # a finished run is not resumable
    with pytest.raises(ConfigError, match="finished run"):
        run_experiment(config, split=demo_split, resume=True)


def test_run_experiment_resume_needs_a_run_directory(demo_split, tmp_path):
    with pytest.raises(ConfigError, match="--resume needs the run directory"):
        run_experiment(_run_config(None), split=demo_split, resume=True)


def test_a_new_run_in_an_interrupted_directory_starts_over(demo_split, tmp_path):
    run_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_run_config(run_dir, epochs=2), split=demo_split, progress=stop_after(1))
    checkpoint = (run_dir / "checkpoints" / CHECKPOINT_NAME).read_bytes()
    # without --resume or --overwrite the interrupted run is kept
    with pytest.raises(ConfigError, match=r"interrupted run.*--resume.*--overwrite"):
        run_experiment(_run_config(run_dir, epochs=2, lr=2e-4), split=demo_split)
    assert (run_dir / "checkpoints" / CHECKPOINT_NAME).read_bytes() == checkpoint
    # --overwrite with a changed config replaces it, old checkpoint included
    result = run_experiment(_run_config(run_dir, epochs=2, lr=2e-4), split=demo_split, overwrite=True)
    assert result.metrics["diagnostics"]["resumed_from_epoch"] == 0
    assert result.method.config.lr == 2e-4
    header = json.loads(read_checkpoint(run_dir / "checkpoints" / CHECKPOINT_NAME)["header"])
    assert header["config"]["lr"] == 2e-4 and header["epochs_done"] == 2
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["method_config"]["lr"] == 2e-4


# ---------------------------------------------------------------------------------------- 10. CLI


def test_cli_run_couple_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    sets = ["--set", "epochs=2", "--set", "warmup_epochs=1", "--set", "batch_size=64", "--set",
            "target_batch_size=64", "--set", "hash_hidden=32", "--set", "encoder_dim=32"]
    code, stdout, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "16", *sets,
                            "--out", out, "--json")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    # The --json line holds the scalars and names metrics.json, which holds the diagnostics and curves.
    assert "diagnostics" not in summary and "curves" not in summary
    metrics = json.loads(Path(summary["metrics_file"]).read_text())
    assert summary["map_cross"] == metrics["map_cross"]
    assert 0.0 <= metrics["map_cross"] <= 1.0 and 0.0 <= metrics["map_single"] <= 1.0
    assert metrics["method"] == "couple" and metrics["bits"] == 16
    assert metrics["method_config"]["epochs"] == 2 and metrics["method_config"]["hash_hidden"] == 32
    assert len(metrics["diagnostics"]["epochs"]) == 2
    assert [r["epoch"] for r in metrics["diagnostics"]["label_report"]["selection_quality"]] == [2]
    assert (out / "checkpoints" / CHECKPOINT_NAME).is_file() and (out / "model.pt").is_file()
    codes = np.load(out / "codes" / "queries_codes.npy")
    queries = load_benchmark("demo", None).queries
    assert codes.shape == (queries.n, 16)
    assert np.array_equal(load_method(out / "model.pt").encode(queries.features), codes)

    # a finished run: --resume is refused
    code, _, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "16", *sets,
                       "--out", out, "--resume")
    assert code == 2 and "finished run" in err

    # make it look interrupted after training; a different configuration is refused in one line
    (out / "metrics.json").unlink()
    code, _, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "16", *sets,
                       "--set", "lr=0.001", "--out", out, "--resume")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.strip().startswith("error:")
    assert "different configuration" in err and "method_config" in err
    assert (out / "checkpoints" / CHECKPOINT_NAME).is_file()

    # the same options resume from the (complete) checkpoint and reproduce the codes
    code, stdout, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "16", *sets,
                            "--out", out, "--resume", "--json")
    assert code == 0, err
    resumed = json.loads(Path(json.loads(stdout.strip().splitlines()[-1])["metrics_file"]).read_text())
    assert resumed["diagnostics"]["resumed_from_epoch"] == 2
    assert resumed["map_cross"] == metrics["map_cross"]
    assert np.array_equal(np.load(out / "codes" / "queries_codes.npy"), codes)


def test_cli_resume_without_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "16", "--set",
                       "epochs=1", "--set", "hash_hidden=32", "--set", "encoder_dim=32", "--resume")
    assert code == 2 and "--resume needs the run directory" in err
    assert not (tmp_path / "runs").exists()


def test_cli_accepts_the_documented_exponent_float_override(tmp_path, monkeypatch, capsys):
    code, stdout, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "8", "--set",
                            "lr=1e-3", "--set", "epochs=1", "--set", "hash_hidden=16", "--set", "encoder_dim=16",
                            "--out", tmp_path / "r", "--json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["method_config"]["lr"] == 1e-3


# ---------------------------------------------------------------------------------------- selection helpers
def _select_top_by_loops(score, candidates, groups, ratio):
    """Reference: sort each group's candidates by (-score, index) in plain Python."""
    n = len(score)
    chosen = set()
    group_ids = [None] if groups is None else sorted(set(groups.tolist()))
    for g in group_ids:
        members = [i for i in range(n) if groups is None or groups[i] == g]
        budget = round(ratio * len(members))
        ranked = sorted((i for i in members if candidates[i]), key=lambda i: (-score[i], i))
        chosen.update(ranked[:budget])
    return np.array([i in chosen for i in range(n)])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("balanced", [False, True])
def test_select_top_matches_a_loop_reference(seed, ratio, balanced):
    from crossret.hashing.couple import _select_top

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    score = np.round(rng.random(n), 1)  # coarse values: many ties, broken by index
    candidates = rng.random(n) > 0.3
    groups = rng.integers(0, 4, n) if balanced else None
    got = _select_top(score, candidates, groups, ratio)
    np.testing.assert_array_equal(got, _select_top_by_loops(score, candidates, groups, ratio))
    assert not (got & ~candidates).any()


def test_balanced_selection_keeps_a_share_of_every_class():
    from crossret.hashing.couple import _select_top

    # class 0 holds all the confident targets; a global top half would take only class 0
    score = np.array([0.9, 0.95, 0.99, 0.97, 0.1, 0.2, 0.15, 0.05])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    everyone = np.ones(8, dtype=bool)
    assert set(np.flatnonzero(_select_top(score, everyone, None, 0.5))) == {0, 1, 2, 3}
    assert set(np.flatnonzero(_select_top(score, everyone, groups, 0.5))) == {2, 3, 5, 6}


def test_information_maximisation_against_a_hand_computation():
    from crossret.hashing.couple import _information_maximisation

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 1.0, 0.5]], dtype=torch.float64)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(axis=1, keepdims=True)
    mean_entropy = float(-(p * np.log(p)).sum(axis=1).mean())
    p_bar = p.mean(axis=0)
    expected = mean_entropy + float((p_bar * np.log(p_bar)).sum())
    assert float(_information_maximisation(logits)) == pytest.approx(expected, rel=1e-12)
    # one-hot confident predictions spread evenly over the classes: the minimum, -log C
    confident = torch.eye(3, dtype=torch.float64) * 60
    assert float(_information_maximisation(confident)) == pytest.approx(-np.log(3), abs=1e-9)
    # every sample confidently in one class: no diversity, loss 0
    collapsed = torch.tensor([[60.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    assert float(_information_maximisation(collapsed)) == pytest.approx(0.0, abs=1e-9)


def test_target_im_weight_enters_the_total_loss(domains):
    source, target = domains
    method, _ = fit_codes(source, target.without_labels(), tiny(target_im_weight=0.5, select_balance=True))
    weights = {"loss_ce": 1.0, "loss_target_ce": 1.0, "loss_target_im": 0.5, "loss_quant": 1.0,
               "loss_relation": 100.0, "loss_mix_low": 0.1, "loss_mix_high": 1.0}
    for record in method.diagnostics["epochs"]:
        combined = sum(w * record[k] for k, w in weights.items())
        assert record["loss_total"] == pytest.approx(combined, rel=1e-4, abs=1e-4)
        assert record["loss_target_im"] < 0  # H(mean p) > mean H(p) as soon as predictions differ


def test_coral_against_numpy_covariances():
    from crossret.hashing.couple import _coral

    rng = np.random.default_rng(3)
    f_s, f_t = rng.normal(size=(7, 4)), rng.normal(size=(5, 4)) * 2 + 1
    expected = ((np.cov(f_s, rowvar=False) - np.cov(f_t, rowvar=False)) ** 2).sum() / (4 * 4 * 4)
    got = float(_coral(torch.from_numpy(f_s), torch.from_numpy(f_t)))
    assert got == pytest.approx(expected, rel=1e-12)
    # a shift of the mean alone leaves the covariances, hence CORAL, unchanged
    assert float(_coral(torch.from_numpy(f_s), torch.from_numpy(f_s + 5.0))) == pytest.approx(0.0, abs=1e-12)
