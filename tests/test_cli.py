"""End-to-end tests of the ``crossret`` command line (through ``crossret.cli.main``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from crossret.cli import main

CONTRACT_KEYS = {"method", "benchmark", "bits", "seed", "ties", "map_cross", "map_single", "precision_at",
                 "p_at_r2", "train_seconds", "encode_seconds"}


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["crossret", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:  # typer exits at the end of every command
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- reference metrics
def hamming(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """±1 codes -> Hamming distances through the inner product, (L - q.db) / 2."""
    return ((q.shape[1] - q.astype(np.int64) @ db.astype(np.int64).T) // 2).astype(np.int64)


def reference_map_at_k_index(q, db, ql, dbl, k: int) -> float:
    """MAP@k with ties broken by database order: stable argsort, AP normalised by the relevant items
    retrieved in the top k (0 when none)."""
    dist = hamming(q, db)
    aps = []
    for i in range(len(q)):
        hits = (dbl == ql[i])[np.argsort(dist[i], kind="stable")][:k]
        ranks = np.flatnonzero(hits) + 1
        aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)) if len(ranks) else 0.0)
    return float(np.mean(aps))


def reference_map(q, db, ql, dbl, ties: str) -> float:
    """MAP written another way: ``index`` by a stable argsort per query; ``expected`` by an explicit
    loop over tie groups summing, for each relevant item, its expected precision over its uniformly
    random position y in the group: E = 1/n sum_y (R_before + 1 + y (r-1)/(n-1)) / (N_before + 1 + y).
    (The same expectation as the library's closed form, computed by direct sums; the enumeration of all
    tie orders that proves the formula itself is in test_metrics.py.)"""
    dist = hamming(q, db)
    aps = []
    for i in range(len(q)):
        rel = dbl == ql[i]
        total = rel.sum()
        if total == 0:
            aps.append(0.0)
            continue
        if ties == "index":
            order = np.argsort(dist[i], kind="stable")
            hits = rel[order]
            ranks = np.flatnonzero(hits) + 1
            aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
            continue
        ap = 0.0
        n_before = r_before = 0
        for d in np.unique(dist[i]):
            in_group = dist[i] == d
            n, r = int(in_group.sum()), int(rel[in_group].sum())
            if r:
                y = np.arange(n)
                extra = y * (r - 1) / (n - 1) if n > 1 else np.zeros(1)
                ap += r * np.mean((r_before + 1 + extra) / (n_before + 1 + y))
            n_before += n
            r_before += r
        aps.append(ap / total)
    return float(np.mean(aps))


# ----------------------------------------------------------------------------- run / demo
@pytest.fixture(scope="module")
def itq_run(tmp_path_factory):
    """One small ITQ run on the built-in demo benchmark, shared by several tests."""
    out_dir = tmp_path_factory.mktemp("runs") / "itq"
    mp = pytest.MonkeyPatch()
    argv = ["crossret", "run", "itq", "--benchmark", "demo", "--bits", "16", "--out", str(out_dir), "--json"]
    mp.setattr(sys, "argv", argv)
    try:
        main()
    except SystemExit as exc:
        assert not exc.code
    finally:
        mp.undo()
    return out_dir


def test_run_json_contract_and_run_directory(itq_run):
    metrics = json.loads((itq_run / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(metrics)
    assert metrics["method"] == "itq" and metrics["benchmark"] == "demo" and metrics["bits"] == 16
    assert metrics["ties"] == "expected" and metrics["split_seed"] == 313
    assert set(metrics["precision_at"]) == {"cross", "single"}
    assert 0.0 <= metrics["map_cross"] <= 1.0 and 0.0 <= metrics["map_single"] <= 1.0
    config = yaml.safe_load((itq_run / "config.yaml").read_text())
    assert config["method"] == "itq" and config["bits"] == 16
    assert config["resolved_method_config"] == metrics["method_config"]
    codes = np.load(itq_run / "codes" / "queries_codes.npy")
    assert codes.dtype == np.int8 and codes.shape[1] == 16 and set(np.unique(codes)) <= {-1, 1}
    assert (itq_run / "run.log").read_text().strip()
    assert not list(itq_run.rglob("*.tmp")), "atomic writes must leave no temporary files"


def test_run_metrics_match_independent_reference_and_eval_codes(itq_run, monkeypatch, capsys):
    metrics = json.loads((itq_run / "metrics.json").read_text())
    c = itq_run / "codes"
    q, ql = np.load(c / "queries_codes.npy"), np.load(c / "queries_labels.npy")
    for setting, name in (("cross", "source"), ("single", "target_train")):
        db, dbl = np.load(c / f"{name}_codes.npy"), np.load(c / f"{name}_labels.npy")
        assert metrics[f"map_{setting}"] == pytest.approx(reference_map(q, db, ql, dbl, "expected"), abs=1e-9)
    # eval-codes on the saved codes reproduces the run's numbers under both tie rules
    db, dbl = c / "source_codes.npy", c / "source_labels.npy"
    for ties in ("expected", "index"):
        code, out, err = cli(monkeypatch, capsys, "eval-codes", "--query-codes", c / "queries_codes.npy",
                             "--db-codes", db, "--query-labels", c / "queries_labels.npy", "--db-labels", dbl,
                             "--ties", ties, "--topk", "50", "--json")
        assert code == 0, err
        result = last_json(out)
        expected = reference_map(q, np.load(db), ql, np.load(dbl), ties)
        assert result["map"] == pytest.approx(expected, abs=1e-9)
        assert 0.0 <= result["map_at_k"] <= 1.0
        if ties == "index":
            assert result["map_at_k"] == pytest.approx(
                reference_map_at_k_index(q, np.load(db), ql, np.load(dbl), 50), abs=1e-9)


def test_run_refuses_to_overwrite_a_finished_run(itq_run, monkeypatch, capsys):
    before = (itq_run / "metrics.json").read_bytes()
    code, _, err = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "8", "--out", itq_run)
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert (itq_run / "metrics.json").read_bytes() == before


def test_demo_prints_a_table_of_the_three_baselines(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "demo", "--bits", "16", "--out", tmp_path, "--json")
    assert code == 0, err
    summary = last_json(out)
    assert [r["method"] for r in summary["results"]] == ["lsh", "itq", "source-only"]
    for row in summary["results"]:
        metrics = json.loads((tmp_path / row["method"] / "metrics.json").read_text())
        assert metrics["map_cross"] == row["map_cross"]
    code, out, _ = cli(monkeypatch, capsys, "demo", "--bits", "16", "--out", tmp_path / "again")
    assert code == 0 and "source-only" in out and "MAP" in out


def test_method_overrides_are_recorded_and_unknown_keys_refused(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "8",
                         "--out", tmp_path / "a", "--set", "standardize=true", "--json")
    assert code == 0, err
    assert last_json(out)["method_config"]["standardize"] is True
    code, _, err = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "8",
                       "--out", tmp_path / "b", "--set", "no_such_key=1")
    assert code == 2 and "no_such_key" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope", "--benchmark", "demo", "--bits", "8"], "unknown method"),
        (["run", "lsh", "--bits", "8"], "--benchmark"),
        (["run", "lsh", "--benchmark", "demo", "--source", "x.npz", "--bits", "8"], "either --benchmark"),
        (["run", "lsh", "--benchmark", "demo", "--bits", "0"], "positive integer"),
        (["run", "lsh", "--benchmark", "no-such-benchmark", "--bits", "8"], "no-such-benchmark"),
        (["run", "lsh", "--benchmark", "demo", "--bits", "8", "--n-queries", "5"], "fixed protocol"),
        (["run", "lsh", "--benchmark", "demo", "--bits", "8", "--set", "center"], "KEY=VALUE"),
        (["run", "lsh", "--source", "missing-s.npz", "--target", "missing-t.npz", "--bits", "8"], "missing-s.npz"),
    ],
)
def test_bad_run_options_give_one_clear_error(args, message, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, *args, "--out", tmp_path / "r")
    assert code == 2
    assert message in err
    assert not (tmp_path / "r").exists(), "a run that fails on bad input must not leave a run directory"


def test_eval_codes_rejects_mismatched_code_lengths(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "q.npy", rng.choice([-1, 1], size=(5, 16)).astype(np.int8))
    np.save(tmp_path / "db.npy", rng.choice([-1, 1], size=(9, 32)).astype(np.int8))
    np.save(tmp_path / "ql.npy", np.arange(5))
    np.save(tmp_path / "dl.npy", np.arange(9))
    code, _, err = cli(monkeypatch, capsys, "eval-codes", "--query-codes", tmp_path / "q.npy", "--db-codes",
                       tmp_path / "db.npy", "--query-labels", tmp_path / "ql.npy", "--db-labels",
                       tmp_path / "dl.npy")
    assert code == 2 and "16" in err and "32" in err
    code, _, err = cli(monkeypatch, capsys, "eval-codes", "--query-codes", tmp_path / "missing.npy",
                       "--db-codes", tmp_path / "db.npy", "--query-labels", tmp_path / "ql.npy",
                       "--db-labels", tmp_path / "dl.npy")
    assert code == 2 and "missing.npy" in err


def test_index_build_and_search_from_a_run(itq_run, tmp_path, monkeypatch, capsys):
    index_file = tmp_path / "source.crbi"
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", itq_run, "--database", "cross",
                       "--out", index_file)
    assert code == 0, err
    queries = itq_run / "codes" / "queries_codes.npy"
    code, out, err = cli(monkeypatch, capsys, "index", "search", index_file, "--queries", queries, "-k", "5",
                         "--json")
    assert code == 0, err
    result = last_json(out)
    q = np.load(queries)
    db = np.load(itq_run / "codes" / "source_codes.npy")
    brute = np.sort(hamming(q, db), axis=1)[:, :5]
    np.testing.assert_array_equal(np.asarray(result["distances"]), brute)
    ids = np.asarray(result["ids"])
    np.testing.assert_array_equal(hamming(q, db)[np.arange(len(q))[:, None], ids], brute)


def test_report_writes_png_plots(itq_run, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "report", itq_run, "--out", tmp_path / "plots")
    assert code == 0, err
    pngs = sorted(Path(tmp_path / "plots").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_benchmarks_lists_presence(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "benchmarks", "--data-dir", tmp_path, "--json")
    assert code == 0, err
    listed = {b["name"]: b["present"] for b in last_json(out)["benchmarks"]}
    assert listed["demo"] is True and listed["digits-m2u"] is False
    assert len(listed) == 1 + 2 + 12 + 6 + 12


def test_itq_on_digits_matches_reference_under_both_tie_rules(shared_data, tmp_path, monkeypatch, capsys):
    """The issue's acceptance command, checked against the independent reference to 1e-6."""
    for ties in ("expected", "index"):
        out_dir = tmp_path / ties
        code, out, err = cli(monkeypatch, capsys, "run", "itq", "--benchmark", "digits-m2u", "--bits", "64",
                             "--json", "--data-dir", shared_data, "--ties", ties, "--out", out_dir)
        assert code == 0, err
        metrics = last_json(out)
        assert CONTRACT_KEYS <= set(metrics) and metrics["ties"] == ties
        assert metrics["n_queries"] == 500 and metrics["n_source"] == 2000
        c = out_dir / "codes"
        q, ql = np.load(c / "queries_codes.npy"), np.load(c / "queries_labels.npy")
        for setting, name in (("cross", "source"), ("single", "target_train")):
            db, dbl = np.load(c / f"{name}_codes.npy"), np.load(c / f"{name}_labels.npy")
            assert metrics[f"map_{setting}"] == pytest.approx(reference_map(q, db, ql, dbl, ties), abs=1e-6)


def test_failed_overwrite_leaves_no_stale_finished_run(itq_run, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "ow"
    code, _, err = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "8", "--out", out_dir)
    assert code == 0, err
    assert (out_dir / "metrics.json").exists()
    (tmp_path / "broken.npz").write_bytes(b"not an npz file at all")
    code, _, err = cli(monkeypatch, capsys, "run", "lsh", "--source", tmp_path / "broken.npz", "--target",
                       tmp_path / "broken.npz", "--bits", "16", "--out", out_dir, "--overwrite")
    assert code == 2 and "broken.npz" in err
    # the failed run did not touch the finished one (it failed before the directory was prepared) ...
    assert json.loads((out_dir / "metrics.json").read_text())["bits"] == 8
    # ... and a successful overwrite replaces every file, codes included
    code, _, err = cli(monkeypatch, capsys, "run", "itq", "--benchmark", "demo", "--bits", "16", "--out", out_dir,
                       "--overwrite")
    assert code == 0, err
    assert json.loads((out_dir / "metrics.json").read_text())["bits"] == 16
    assert np.load(out_dir / "codes" / "source_codes.npy").shape[1] == 16
    assert not list(out_dir.glob("model.*")) or all(p.suffix == ".npz" for p in out_dir.glob("model.*"))


def test_unwritable_output_is_a_clean_error(itq_run, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", itq_run, "--out", "/dev/null/x.crbi")
    assert code == 2 and "cannot" in err and "Traceback" not in err


def test_custom_files_with_disjoint_classes_report_no_relevant_items(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", features=rng.normal(size=(150, 8)), labels=np.repeat([0, 1, 2], 50))
    np.savez(tmp_path / "t.npz", features=rng.normal(size=(40, 8)), labels=np.repeat([5, 6], 20))
    args = ["run", "lsh", "--source", tmp_path / "s.npz", "--target", tmp_path / "t.npz", "--bits", "8",
            "--n-queries", "10", "--out", tmp_path / "r", "--json"]
    code, out, err = cli(monkeypatch, capsys, *args)  # label sets that share no class: refused unless asked for
    assert code == 2 and "share no class" in err and "--allow-class-mismatch" in err
    assert not (tmp_path / "r").exists()
    code, out, err = cli(monkeypatch, capsys, *args, "--allow-class-mismatch")
    assert code == 0, err
    metrics = last_json(out)
    assert metrics["map_cross"] == 0.0 and metrics["queries_without_relevant"]["cross"] == 10
    assert metrics["recall_at"]["cross"]["100"] is None
    assert metrics["protocol"]["source_label_base"] == 0


def test_packed_codes_through_index_and_eval_codes(itq_run, tmp_path, monkeypatch, capsys):
    from crossret.retrieval.packing import pack_codes, pad_packed

    c = itq_run / "codes"
    q, db = np.load(c / "queries_codes.npy"), np.load(c / "source_codes.npy")
    np.save(tmp_path / "q.npy", pack_codes(q))
    np.save(tmp_path / "db_padded.npy", pad_packed(pack_codes(db), 16))
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", tmp_path / "db_padded.npy",
                       "--out", tmp_path / "i.crbi")
    assert code == 2 and "--bits" in err
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", tmp_path / "db_padded.npy", "--bits",
                       "16", "--kind", "hnsw", "--out", tmp_path / "i.crbi")
    assert code == 0, err
    code, out, err = cli(monkeypatch, capsys, "index", "search", tmp_path / "i.crbi", "--queries",
                         tmp_path / "q.npy", "-k", "3", "--json")
    assert code == 0, err
    assert np.asarray(last_json(out)["distances"]).shape == (len(q), 3)
    np.save(tmp_path / "db.npy", pack_codes(db))
    results = []
    for qfile, dbfile, extra in ((c / "queries_codes.npy", c / "source_codes.npy", []),
                                 (tmp_path / "q.npy", tmp_path / "db.npy", ["--bits", "16"])):
        code, out, err = cli(monkeypatch, capsys, "eval-codes", "--query-codes", qfile, "--db-codes", dbfile,
                             "--query-labels", c / "queries_labels.npy", "--db-labels", c / "source_labels.npy",
                             "--json", *extra)
        assert code == 0, err
        results.append(last_json(out)["map"])
    assert results[0] == results[1]


def test_corrupt_index_and_npy_files_are_refused(itq_run, tmp_path, monkeypatch, capsys):
    index_file = tmp_path / "x.crbi"
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", itq_run, "--out", index_file)
    assert code == 0, err
    data = bytearray(index_file.read_bytes())
    data[-3] ^= 0xFF
    index_file.write_bytes(bytes(data))
    code, _, err = cli(monkeypatch, capsys, "index", "search", index_file, "--queries",
                       itq_run / "codes" / "queries_codes.npy")
    assert code == 2 and "x.crbi" in err
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    code, _, err = cli(monkeypatch, capsys, "eval-codes", "--query-codes", tmp_path / "bad.npy", "--db-codes",
                       tmp_path / "bad.npy", "--query-labels", tmp_path / "bad.npy", "--db-labels",
                       tmp_path / "bad.npy")
    assert code == 2 and "bad.npy" in err


# ----------------------------------------------------------------------------- messages: Ctrl-C, full disk, user text
def test_ctrl_c_prints_one_interrupted_line_and_exits_130(tmp_path):
    """A real process interrupted with SIGINT mid-training: typer turns KeyboardInterrupt into a silent
    exit 130; the entry point says what happened, with no traceback."""
    import os
    import signal
    import subprocess
    import time

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    np.savez(tmp_path / "s.npz", features=x, labels=np.arange(60) % 3)
    np.savez(tmp_path / "t.npz", features=x + 0.1, labels=np.arange(60) % 3)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "crossret", "run", "couple", "--bits", "16", "--source", tmp_path / "s.npz",
         "--target", tmp_path / "t.npz", "--out", run_dir, "--set", "epochs=100000", "--set", "warmup_epochs=1",
         "--set", "hash_hidden=8", "--set", "encoder_dim=8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints").is_dir():  # training has started
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.splitlines() == ["interrupted: nothing after the last completed step was written"], err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt
def test_a_ctrl_c_swallowed_by_a_c_callback_still_stops_the_run_at_its_next_step(monkeypatch):
    """numba compiles through llvmlite's ctypes callbacks, and a KeyboardInterrupt raised inside one is
    printed as "ignored" and lost: the run went on training. The SIGINT handler remembers the
    interrupt, and every progress callback raises it again."""
    import ctypes
    import signal

    from crossret import cli as cli_module

    monkeypatch.setattr(cli_module, "_interrupt_requested", False)
    for enabled in (True, False):
        with cli_module._progress_bar(enabled) as progress:
            progress(1, 2, "working")  # no interrupt yet: nothing happens
    swallowing = ctypes.CFUNCTYPE(None)(lambda: cli_module._on_interrupt(signal.SIGINT, None))
    swallowing()  # the KeyboardInterrupt dies in the callback, as it did inside numba's compiler
    for enabled in (True, False):
        with pytest.raises(KeyboardInterrupt), cli_module._progress_bar(enabled) as progress:
            progress(2, 2, "working")


def test_a_swallowed_interrupt_is_not_reported_but_other_lost_exceptions_are(capsys, monkeypatch):
    # Once Ctrl-C was pressed, what the interrupted objects raise at collection is not reported either.
    import ctypes

    from crossret import cli as cli_module

    monkeypatch.setattr(cli_module, "_interrupt_requested", False)
    previous = sys.unraisablehook
    sys.unraisablehook = cli_module._quiet_lost_interrupts
    try:
        def interrupted() -> None:
            raise KeyboardInterrupt

        def broken() -> None:
            raise ValueError("lost in a callback")

        ctypes.CFUNCTYPE(None)(interrupted)()
        assert capsys.readouterr().err == ""
        ctypes.CFUNCTYPE(None)(broken)()
        assert "ValueError: lost in a callback" in capsys.readouterr().err
        monkeypatch.setattr(cli_module, "_interrupt_requested", True)
        ctypes.CFUNCTYPE(None)(broken)()
        assert capsys.readouterr().err == ""
    finally:
        sys.unraisablehook = previous


def test_main_installs_the_remembering_sigint_handler_only_over_python_s_own(monkeypatch):
    import signal

    from crossret import cli as cli_module

    installed = []
    monkeypatch.setattr(cli_module, "app", lambda: None)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append((signum, handler)))
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.default_int_handler)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    cli_module.main()
    assert installed == [(signal.SIGINT, cli_module._on_interrupt)]
    assert sys.unraisablehook is cli_module._quiet_lost_interrupts
    installed.clear()
    monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_IGN)  # someone chose otherwise
    cli_module.main()
    assert installed == []


def test_full_disk_error_names_the_file_being_written(itq_run, tmp_path, monkeypatch, capsys):
    import errno
    import os

    np.save(tmp_path / "q.npy", np.load(itq_run / "codes" / "queries_codes.npy")[:3])
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", itq_run, "--out", tmp_path / "flat.crbi")
    assert code == 0, err

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    save = tmp_path / "results.npz"
    code, out, err = cli(monkeypatch, capsys, "index", "search", tmp_path / "flat.crbi", "--queries",
                         tmp_path / "q.npy", "--save", save)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: cannot read or write {save}: No space left on device"]
    assert not save.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["flat.crbi", "q.npy"]


def test_user_text_is_printed_literally_not_as_markup_or_emoji(tmp_path, monkeypatch, capsys):
    """Paths holding rich markup ("[/b]" crashed the printer) or emoji codes (":x:" became an emoji)."""
    out_dir = tmp_path / "a[/b]b:x:[bold]"
    code, out, err = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "8", "--out", out_dir)
    assert code == 0, err
    assert f"run directory: {out_dir}" in out.replace("\n", "")
    missing = tmp_path / "x[/b]:x:.npz"
    code, out, err = cli(monkeypatch, capsys, "run", "lsh", "--bits", "8", "--source", missing, "--target", missing)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == [f"error: {missing}: file not found; check the path (relative paths are resolved "
                                f"from {Path.cwd()})"]
