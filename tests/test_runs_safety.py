"""Run directories and output files never destroy what crossret did not create (crossret.runs).

Each test drives the real command line (``crossret.cli.main`` in-process, as tests/test_cli.py does) on
small LSH runs of the built-in demo benchmark; the lock test holds a run directory from a second process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _cli import cli
from _couple_common import stop_after
from crossret import runs
from crossret.errors import ConfigError, FileFormatError, NumericalError
from crossret.experiment import RunConfig, run_experiment

LSH = ("run", "lsh", "--benchmark", "demo", "--bits", "8")


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry below ``root``: file bytes, link targets, and folders."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = path.read_bytes()
    return out


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def staging_siblings(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f".{run_dir.name}.crossret-*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished LSH run (8 bits), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("template") / "lsh"
    run_experiment(RunConfig(method="lsh", benchmark="demo", bits=8, out_dir=str(out)))
    assert (out / runs.MARKER).is_file() and (out / "metrics.json").is_file()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target, symlinks=True)
    return target


# ---------------------------------------------------------------------------------------------- folders
def test_a_users_folder_survives_run_and_overwrite(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "mine"
    for rel in ("checkpoints/checkpoint.pt", "codes/keep.npy", "plots/figure.png", "model.npz", "config.yaml",
                "run.log", "notes.txt"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(f"the user's {rel}".encode())
    before = tree(folder)
    for extra in ((), ("--overwrite",), ("--resume",)):
        code, _, err = cli(monkeypatch, capsys, *LSH, "--out", folder, *extra)
        assert code == 2
        assert "crossret did not create" in one_line_error(err)
        assert tree(folder) == before, extra
    assert staging_siblings(folder) == []


def test_an_empty_folder_is_adopted(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    code, _, err = cli(monkeypatch, capsys, *LSH, "--out", folder)
    assert code == 0, err
    assert runs.read_marker(folder)["kind"] == "hashing" and (folder / "metrics.json").is_file()


def test_root_home_and_files_are_refused(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    for out, message in (("/", "file-system root"), (home, "home directory"), ("~", None),
                         (a_file, "not a directory")):
        if out == "~":  # the shell expands it; the library sees the path itself
            out, message = str(Path("~").expanduser()), "home directory"
        code, _, err = cli(monkeypatch, capsys, *LSH, "--out", out)
        assert code == 2 and message in one_line_error(err), (out, err)
    assert list(home.iterdir()) == [] and a_file.read_text() == "mine"


def test_a_symlinked_run_directory_is_refused_for_writing(run_copy, tmp_path, monkeypatch, capsys):
    link = tmp_path / "link"
    link.symlink_to(run_copy, target_is_directory=True)
    before = tree(run_copy)
    code, _, err = cli(monkeypatch, capsys, *LSH, "--out", link, "--overwrite")
    assert code == 2 and "symbolic link" in one_line_error(err)
    assert tree(run_copy) == before


# ---------------------------------------------------------------------------------------------- output files
def test_index_build_refuses_existing_files(run_copy, tmp_path, monkeypatch, capsys):
    from crossret.retrieval.index import BinaryIndex

    # a file crossret did not write as an index: refused, even with --overwrite
    model = run_copy / "model.npz"
    saved = model.read_bytes()
    for extra in ((), ("--overwrite",)):
        code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--out", model, *extra)
        assert code == 2, err
        assert ("is not a crossret index" if extra else "already exists") in one_line_error(err)
        assert model.read_bytes() == saved
    user_file = tmp_path / "index.crbi"
    user_file.write_bytes(b"not an index")
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--out", user_file, "--overwrite")
    assert code == 2 and "never replaces files it did not write" in one_line_error(err)
    assert user_file.read_bytes() == b"not an index"

    # crossret's own index: refused without --overwrite, replaced with it
    index = tmp_path / "own.crbi"
    assert cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--out", index)[0] == 0
    first = index.read_bytes()
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--database", "single", "--out", index)
    assert code == 2 and "--overwrite" in one_line_error(err) and index.read_bytes() == first
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--database", "single", "--out", index,
                       "--overwrite")
    assert code == 0, err
    assert BinaryIndex.load(index).ntotal == len(np.load(run_copy / "codes" / "target_train_codes.npy"))


def test_encode_report_and_search_outputs(run_copy, tmp_path, monkeypatch, capsys):
    features = tmp_path / "features.npy"
    np.save(features, np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32))
    out = tmp_path / "codes.npy"
    encode = ("index", "encode", "--run", run_copy, "--features", features, "--out", out)
    assert cli(monkeypatch, capsys, *encode)[0] == 0
    code, _, err = cli(monkeypatch, capsys, *encode)
    assert code == 2 and "already exists" in one_line_error(err)
    assert cli(monkeypatch, capsys, *encode, "--overwrite")[0] == 0
    user_npy = tmp_path / "user.npy"
    np.save(user_npy, np.zeros(3))
    code, _, err = cli(monkeypatch, capsys, "index", "encode", "--run", run_copy, "--features", features, "--out",
                       user_npy, "--overwrite")
    assert code == 2 and "not a crossret packed-codes file" in one_line_error(err)

    # report: plots crossret wrote are replaced with --overwrite; a foreign PNG never
    assert cli(monkeypatch, capsys, "report", run_copy)[0] == 0
    plot = run_copy / "plots" / "pr_rank_cross.png"
    code, _, err = cli(monkeypatch, capsys, "report", run_copy)
    assert code == 2 and "already exists" in one_line_error(err)
    assert cli(monkeypatch, capsys, "report", run_copy, "--overwrite")[0] == 0
    plot.write_bytes(b"\x89PNG\r\n\x1a\n a picture of the user's")
    code, _, err = cli(monkeypatch, capsys, "report", run_copy, "--overwrite")
    assert code == 2 and "not a crossret plot" in one_line_error(err)
    assert plot.read_bytes().endswith(b"the user's")

    # search results
    index, queries, saved = tmp_path / "i.crbi", tmp_path / "q.npy", tmp_path / "hits.npz"
    np.save(queries, np.load(run_copy / "codes" / "queries_codes.npy")[:3])
    assert cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--out", index)[0] == 0
    search = ("index", "search", index, "--queries", queries, "--save")
    assert cli(monkeypatch, capsys, *search, saved)[0] == 0
    assert cli(monkeypatch, capsys, *search, saved)[0] == 2
    assert cli(monkeypatch, capsys, *search, saved, "--overwrite")[0] == 0
    code, _, err = cli(monkeypatch, capsys, *search, features, "--overwrite")
    assert code == 2 and "not a crossret search-results file" in one_line_error(err)


# ---------------------------------------------------------------------------------------------- the lock
HOLDER = textwrap.dedent("""
    import sys
    from crossret.runs import open_run
    handle = open_run(sys.argv[1], "hashing", overwrite=True)
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_a_second_process_is_refused_with_the_holders_pid(run_copy, monkeypatch, capsys):
    before = tree(run_copy)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for extra in ((), ("--overwrite",), ("--resume",)):
            code, _, err = cli(monkeypatch, capsys, *LSH, "--out", run_copy, *extra)
            assert code == 2, err
            assert f"in use by another crossret process (PID {holder.pid})" in one_line_error(err)
        with pytest.raises(ConfigError, match=f"PID {holder.pid}"):
            runs.open_run(run_copy, "hashing", overwrite=True)
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crash: its staging directory stays behind
        holder.wait(30)
    assert {k: v for k, v in tree(run_copy).items() if k != runs.LOCK} == \
        {k: v for k, v in before.items() if k != runs.LOCK}
    assert len(staging_siblings(run_copy)) == 1
    # the lock died with its holder; the next --overwrite also removes the dead run's staging directory
    code, _, err = cli(monkeypatch, capsys, *LSH, "--out", run_copy, "--overwrite")
    assert code == 0, err
    assert staging_siblings(run_copy) == []


# ---------------------------------------------------------------------------------------------- --overwrite
@pytest.mark.parametrize("failure", [NumericalError("training diverged"), KeyboardInterrupt()])
def test_a_failed_overwrite_keeps_the_old_run(run_copy, monkeypatch, capsys, failure):
    import crossret.experiment as experiment

    before = tree(run_copy)
    original = experiment.write_json_atomic

    def fail_at_metrics(path, obj):  # codes and model of the new run are written by now
        if Path(path).name == "metrics.json":
            raise failure
        return original(path, obj)

    monkeypatch.setattr(experiment, "write_json_atomic", fail_at_metrics)
    code, _, _ = cli(monkeypatch, capsys, "run", "itq", "--benchmark", "demo", "--bits", "16", "--out", run_copy,
                     "--overwrite")
    assert code == (130 if isinstance(failure, KeyboardInterrupt) else 2)
    after = tree(run_copy)
    assert {k: v for k, v in after.items() if k != runs.LOCK} == {k: v for k, v in before.items() if k != runs.LOCK}
    assert staging_siblings(run_copy) == []

    monkeypatch.setattr(experiment, "write_json_atomic", original)
    code, _, err = cli(monkeypatch, capsys, "run", "itq", "--benchmark", "demo", "--bits", "16", "--out", run_copy,
                       "--overwrite", "--json")
    assert code == 0, err
    assert np.load(run_copy / "codes" / "source_codes.npy").shape[1] == 16
    assert staging_siblings(run_copy) == []


def test_legacy_runs_are_read_but_not_replaced(run_copy, tmp_path, monkeypatch, capsys):
    (run_copy / runs.MARKER).unlink()
    (run_copy / runs.LOCK).unlink()
    assert cli(monkeypatch, capsys, "index", "build", "--run", run_copy, "--out", tmp_path / "i.crbi")[0] == 0
    assert cli(monkeypatch, capsys, "report", run_copy, "--out", tmp_path / "plots")[0] == 0
    before = tree(run_copy)
    for extra in (("--overwrite",), ("--resume",)):
        code, _, err = cli(monkeypatch, capsys, *LSH, "--out", run_copy, *extra)
        assert code == 2 and "older crossret" in one_line_error(err) and "delete an old run yourself" in err
    assert tree(run_copy) == before


# ---------------------------------------------------------------------------------------------- interrupted runs
COUPLE = {"epochs": 2, "warmup_epochs": 1, "batch_size": 64, "target_batch_size": 64, "hash_hidden": 32,
          "encoder_dim": 32}


def test_an_interrupted_couple_run_is_kept_without_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "couple"
    config = RunConfig(method="couple", benchmark="demo", bits=16, method_config=dict(COUPLE), out_dir=str(out))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=stop_after(1))
    checkpoint = (out / "checkpoints" / "checkpoint.pt").read_bytes()
    before = tree(out)
    sets = [arg for key, value in COUPLE.items() for arg in ("--set", f"{key}={value}")]
    code, _, err = cli(monkeypatch, capsys, "run", "couple", "--benchmark", "demo", "--bits", "16", *sets,
                       "--out", out)
    assert code == 2
    line = one_line_error(err)
    assert "interrupted run" in line and "--resume" in line and "--overwrite" in line
    assert tree(out) == before and (out / "checkpoints" / "checkpoint.pt").read_bytes() == checkpoint


# ---------------------------------------------------------------------------------------------- --resume
def interrupted(run_dir: Path) -> Path:
    """A finished run made to look interrupted: marked, no metrics.json."""
    (run_dir / "metrics.json").unlink()
    return run_dir


@pytest.mark.parametrize("name", ["run.log", "config.yaml", "codes", "checkpoints", "model.npz"])
def test_resume_refuses_symlinks_out_of_the_run(run_copy, tmp_path, monkeypatch, capsys, name):
    run_dir = interrupted(run_copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("do not touch")
    target = outside / "precious.txt" if name in ("run.log", "config.yaml", "model.npz") else outside
    entry = run_dir / name
    if entry.is_dir():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)
    entry.symlink_to(target)
    before_outside, before_run = tree(outside), tree(run_dir)
    code, _, err = cli(monkeypatch, capsys, *LSH, "--out", run_dir, "--resume")
    assert code == 2
    line = one_line_error(err)
    assert name in line and "symbolic link" in line
    assert tree(outside) == before_outside
    assert {k: v for k, v in tree(run_dir).items() if k != runs.LOCK} == \
        {k: v for k, v in before_run.items() if k != runs.LOCK}


def test_the_run_log_is_never_opened_through_a_link(tmp_path):
    outside = tmp_path / "outside.log"
    outside.write_text("mine\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.log").symlink_to(outside)
    with pytest.raises(FileFormatError, match="symbolic link"):
        runs.attach_run_log(tmp_path / "run")
    assert outside.read_text() == "mine\n"


@pytest.mark.parametrize("content", [b"[" * 100_000, b"\xff\xfe not utf-8", b"- a list\n- not a mapping\n",
                                     b"key: [unclosed\n  nested: {"])
def test_resume_with_a_hostile_config_is_one_line_error(run_copy, monkeypatch, capsys, content):
    run_dir = interrupted(run_copy)
    (run_dir / "config.yaml").write_bytes(content)
    before = tree(run_dir)
    code, _, err = cli(monkeypatch, capsys, *LSH, "--out", run_dir, "--resume")
    assert code == 2
    line = one_line_error(err)
    assert "config.yaml" in line
    assert {k: v for k, v in tree(run_dir).items() if k != runs.LOCK} == \
        {k: v for k, v in before.items() if k != runs.LOCK}


def test_resume_continues_an_interrupted_run_in_place(run_copy, monkeypatch, capsys):
    run_dir = interrupted(run_copy)
    (run_dir / ".stale.npy.abcd1234.tmp").write_bytes(b"left by a killed write")
    code, _, err = cli(monkeypatch, capsys, *LSH, "--out", run_dir, "--resume")
    assert code == 0, err
    assert (run_dir / "metrics.json").is_file() and not (run_dir / ".stale.npy.abcd1234.tmp").exists()
    assert runs.read_marker(run_dir)["kind"] == "hashing"


# ---------------------------------------------------------------------------------------------- the module
def test_model_file_lookup(run_copy, tmp_path):
    assert runs.find_model_file(run_copy) == run_copy / "model.npz"
    (run_copy / "model.pt").write_bytes(b"second")
    with pytest.raises(Exception, match="several model files"):
        runs.find_model_file(run_copy)
    (run_copy / "model.pt").unlink()
    outside = tmp_path / "elsewhere.npz"
    (run_copy / "model.npz").rename(outside)
    (run_copy / "model.npz").symlink_to(outside)
    with pytest.raises(FileFormatError, match="symbolic link"):
        runs.find_model_file(run_copy)
    (run_copy / "model.npz").unlink()
    assert runs.find_model_file(run_copy) is None


def test_resume_and_overwrite_exclude_each_other_and_kinds_must_match(run_copy):
    with pytest.raises(ConfigError, match="exclude each other"):
        runs.check_run_target(run_copy, "hashing", overwrite=True, resume=True)
    interrupted(run_copy)
    with pytest.raises(ConfigError, match="holds a hashing run"):
        runs.open_run(run_copy, "gckd", resume=True)


def test_overwrite_without_an_atomic_exchange_renames_twice(run_copy, monkeypatch, capsys):
    """Where renameat2(RENAME_EXCHANGE) is missing, the old run is renamed aside and the new one in; a
    failure of the second rename puts the old run back."""
    monkeypatch.setattr(runs, "_exchange", lambda a, b: False)
    before = tree(run_copy)
    real_rename = os.rename

    def failing(src, dst):
        if Path(src).name.startswith(f".{run_copy.name}.crossret-new-") and Path(dst) == run_copy:
            raise OSError(28, "No space left on device", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    code, _, err = cli(monkeypatch, capsys, "run", "itq", "--benchmark", "demo", "--bits", "16", "--out", run_copy,
                       "--overwrite")
    assert code == 2, err
    assert {k: v for k, v in tree(run_copy).items() if k != runs.LOCK} == \
        {k: v for k, v in before.items() if k != runs.LOCK}
    assert staging_siblings(run_copy) == []
    monkeypatch.setattr(os, "rename", real_rename)
    code, _, err = cli(monkeypatch, capsys, "run", "itq", "--benchmark", "demo", "--bits", "16", "--out", run_copy,
                       "--overwrite")
    assert code == 0, err
    assert np.load(run_copy / "codes" / "source_codes.npy").shape[1] == 16
    assert staging_siblings(run_copy) == []
