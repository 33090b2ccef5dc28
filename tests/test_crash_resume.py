"""Reliability: SIGKILL at seeded points of COUPLE and GCKD runs, resume from the same run directory, and
get bit for bit what an uninterrupted run gives.

One ``tests/_crash_driver.py`` subprocess runs both scenarios. It runs the real CLI (``crossret run
couple ...`` / ``crossret gckd adapt ...`` with the tiny ALBEF, the argv of ``python -m crossret``) in forked
child processes: first uninterrupted (the reference, recording the events it passes), then repeatedly with
``--resume`` on one run directory, each child killed with SIGKILL (it kills itself from a test-side
monkeypatch, so the kill lands exactly and deterministically) at an event drawn with a seeded
``random.Random`` from the reference's trace:

* mid-epoch, right after an optimizer step;
* inside a refresh: COUPLE's graph build / ℓ2 flow diffusion, GCKD's GMP kNN graph of a step;
* inside a checkpoint write, after the finished temporary file is written but before its rename, and
  right after the rename (the last epoch's included: training done, no result files yet);
* while the run files are written at the start (config.yaml, vocab.txt) and at the end (codes, model,
  metrics.json).

After every kill every file of the run directory must load (checkpoints and models through the
library's readers) and the directory must be consistent (a checkpoint always has its config.yaml next
to it; metrics.json only with every result file); leftover ``.*.tmp`` files of a killed write are
allowed there and must be gone once a resumed run has started. The final directory is compared with
the reference: codes files byte for byte, metrics.json (but wall-clock timings) value for value,
checkpoint and model state bit for bit. COUPLE also gets one kill from outside: the test sends SIGKILL
to a run the driver started, a seeded delay after its first checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DRIVER = Path(__file__).with_name("_crash_driver.py")
ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611
# one intra-op thread: these tiny models are much slower with two on a shared 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}

COUPLE_SETTINGS = {"epochs": 10, "warmup_epochs": 1, "graph_every": 2, "batch_size": 32, "target_batch_size": 32,
                   "hash_hidden": 32, "encoder_dim": 32}
GCKD_SETTINGS = {"epochs": 3, "lr": 1e-3, "head_lr": 1e-3, "ids_per_batch": 4, "pairs_per_id": 2, "target_batch": 8,
                 "memory_size": 32, "delta": 0.0}
CODE_FILES = [f"codes/{s}_{k}.npy" for s in ("queries", "source", "target_train") for k in ("codes", "labels")]


def _sets(settings: dict[str, Any]) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def _log_tail(work: Path, name: str) -> str:
    path = work / "logs" / f"{name}.log"
    return path.read_text(encoding="utf-8", errors="replace")[-2000:] if path.is_file() else ""


def _assert_clean(check: dict[str, Any], what: str) -> None:
    assert "checker_failed" not in check, f"{what}: {check.get('checker_failed')}"
    assert check["errors"] == {}, f"{what}: files that do not load: {check['errors']}"
    assert check["problems"] == [], f"{what}: inconsistent run directory: {check['problems']}"


def _assert_kills_and_result(report: dict[str, Any], work: Path, required: list[str]) -> None:
    """Every planned kill landed exactly at its event, every directory after a kill is sound, leftover
    temporaries are cleaned up, and the final run equals the reference bit for bit."""
    plan = report["plan"]
    trace_categories = report["trace_categories"]
    for category in required:
        assert trace_categories.get(category), f"the reference run passed no {category} event"
    attempts = report["attempts"]
    assert len(attempts) == len(plan) >= len(required)
    for attempt in attempts:
        name, target = attempt["name"], attempt["target"]
        assert "skipped" not in attempt, f"{name}: the run finished before the planned kill at {target}"
        assert attempt["exit"] == -signal.SIGKILL, \
            f"{name}: expected SIGKILL at {target}, exit {attempt['exit']}\n{_log_tail(work, name)}"
        assert attempt["last_event"] == target, f"{name}: killed at {attempt['last_event']}, planned {target}"
        _assert_clean(attempt["check"], f"after the kill at {target}")
    # a kill between a temporary file's write and its rename leaves it behind; the next resume removes it
    leftovers = [i for i, a in enumerate(attempts) if a["check"]["temporaries"]]
    assert leftovers, "no kill left a temporary file behind: the before-rename case was not exercised"
    for i in leftovers:
        after = (attempts[i + 1:] or [report["final"]])[0]
        stale = set(attempts[i]["check"]["temporaries"])
        assert not stale & set(after["check"]["temporaries"]), f"{stale} survived the next resume"

    final = report["final"]
    if "skipped" not in final:
        assert final["exit"] == 0, _log_tail(work, "final")
    _assert_clean(final["check"], "the finished run")
    assert final["check"]["finished"] and final["check"]["temporaries"] == []
    assert final["compare"], "nothing was compared"
    assert all(not d for d in final["compare"].values()), f"resumed run differs: {final['compare']}"


def _kinds(plan: list[list[Any]]) -> set[str]:
    return {f"ckpt-{e[2]}" if e[0] == "ckpt" else e[0] for e in plan}


def _assert_same_outputs(run: Path, reference: Path, keys: tuple[str, ...]) -> None:
    for rel in CODE_FILES if (reference / "codes").is_dir() else []:
        got, want = np.load(run / rel), np.load(reference / rel)
        assert got.dtype == want.dtype and np.array_equal(got, want), rel
        assert (run / rel).read_bytes() == (reference / rel).read_bytes(), rel
    got, want = (json.loads((d / "metrics.json").read_text(encoding="utf-8")) for d in (run, reference))
    for key in keys:
        assert got[key] == want[key], key


# ---------------------------------------------------------------------------------------------- the runs
def _couple_data(where: Path) -> tuple[Path, Path]:
    """3 Gaussian classes, 40 per class in 16-d; the target is shifted (as tests/test_couple.py)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 3.0, size=(3, 16))
    labels = np.repeat(np.arange(3), 40)
    xs = centres[labels] + rng.standard_normal((labels.size, 16))
    xt = centres[labels] + rng.standard_normal((labels.size, 16)) + 1.5
    where.mkdir(parents=True, exist_ok=True)
    np.savez(where / "source.npz", features=xs.astype(np.float32), labels=labels)
    np.savez(where / "target.npz", features=xt.astype(np.float32), labels=labels)
    return where / "source.npz", where / "target.npz"


def _kill_from_outside(pid_file: Path, exited: Path, out: Path, delay: float, driver: subprocess.Popen
                       ) -> dict[str, Any]:
    """SIGKILL the run the driver started for us (its pid in ``pid_file``) ``delay`` seconds after its first
    checkpoint appeared in ``out``. The driver reaps it only after our ``ready`` file, so the pid cannot
    belong to another process meanwhile."""
    deadline = time.monotonic() + 600
    while not pid_file.exists() or not (out / "checkpoints" / "checkpoint.pt").exists():
        if exited.exists():
            return {"error": "the run ended before its first checkpoint"}
        if driver.poll() is not None or time.monotonic() > deadline:
            return {"error": f"no checkpoint (driver exit {driver.poll()})"}
        time.sleep(0.002)
    time.sleep(delay)
    finished_before = exited.exists()
    os.kill(int(pid_file.read_text(encoding="utf-8")), signal.SIGKILL)
    return {"delay": delay, "ended_before_the_kill": finished_before}


COUPLE_REQUIRED = ["step", "refresh", "ckpt-before", "ckpt-after", "ckpt-after-last", "final"]
GCKD_REQUIRED = ["step", "graph", "ckpt-before", "ckpt-after-last", "final"]


@pytest.fixture(scope="module")
def crashes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One driver process runs both scenarios (the imports are paid once). First it starts a COUPLE run
    that this test kills from outside (SIGKILL after a seeded delay) and resumes it last."""
    root = tmp_path_factory.mktemp("crash")
    rng = random.Random(SEED)
    source, target = _couple_data(root / "data")
    couple_argv = ["run", "couple", "--source", str(source), "--target", str(target), "--bits", "16", "--seed", "3",
                   *_sets(COUPLE_SETTINGS), "--json"]
    persons = {name: root / name for name in ("cuhk-pedes", "rstpreid")}  # the driver generates them
    gckd_argv = ["gckd", "adapt", "--source", str(persons["cuhk-pedes"]), "--target", str(persons["rstpreid"]),
                 *_sets(GCKD_SETTINGS), "--rerank-k", "3", "--json"]
    external = root / "external"
    markers = {key: root / f"external.{key}" for key in ("pid", "exited", "ready")}
    plan = {"work": str(root / "work"), "report": str(root / "report.json"),
            "person_datasets": {name: str(path) for name, path in persons.items()},
            "person_dataset_options": {"n_train_ids": 8, "n_test_ids": 4, "images_per_id": 2, "seed": 3,
                                       "image_size": [32, 16]},
            "scenarios": {
                "couple": {"kind": "couple", "argv": couple_argv, "seed": rng.randrange(2**32),
                           "required": COUPLE_REQUIRED, "extra": 1, "startup": 2, "external": str(external),
                           **{f"external_{key}": str(path) for key, path in markers.items()}},
                "gckd": {"kind": "gckd", "argv": gckd_argv, "seed": rng.randrange(2**32), "required": GCKD_REQUIRED,
                         "extra": 0, "startup": 1},
            }}
    (root / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    started = time.monotonic()
    with open(root / "driver.log", "wb") as driver_log:
        driver = subprocess.Popen([sys.executable, str(DRIVER), str(root / "plan.json")], env=ENV, cwd=root,
                                  stdout=driver_log, stderr=subprocess.STDOUT)
        try:
            killed = _kill_from_outside(markers["pid"], markers["exited"], external, rng.uniform(0.0, 0.15), driver)
        finally:
            markers["ready"].write_text(json.dumps(killed), encoding="utf-8")
        try:
            driver.wait(timeout=900)
        finally:
            driver.kill()
            driver.wait()
    log = (root / "driver.log").read_text(encoding="utf-8", errors="replace")
    assert driver.returncode == 0, log[-4000:]
    report = json.loads((root / "report.json").read_text(encoding="utf-8"))
    report.update(root=root, external_kill=killed, wall_seconds=round(time.monotonic() - started, 1))
    print(f"crash/resume: {report['wall_seconds']} s wall, driver {report['seconds']} s "
          f"(imports {report['import_seconds']} s)")
    return report


# ---------------------------------------------------------------------------------------------- COUPLE
@pytest.mark.slow
def test_couple_sigkill_at_seeded_points_resumes_bit_exactly(crashes: dict[str, Any]) -> None:
    report = crashes["scenarios"]["couple"]
    work = crashes["root"] / "work" / "couple"
    assert "error" not in report, report["error"]
    assert {"step", "refresh", "ckpt-before", "ckpt-after", "file"} <= _kinds(report["plan"]), report["plan"]
    _assert_kills_and_result(report, work, COUPLE_REQUIRED)
    # killed while config.yaml is rewritten at the start of a resume, with a checkpoint on disk
    attempts = report["attempts"]
    assert any(a["target"][:3] == ["file", "config.yaml", "before"] and attempts[i - 1]["check"]["epoch"]
               for i, a in enumerate(attempts) if i), report["plan"]
    _assert_same_outputs(work / "run", work / "reference", ("map_cross", "map_single", "precision_at", "p_at_r2"))


@pytest.mark.slow
def test_couple_killed_from_outside_resumes_bit_exactly(crashes: dict[str, Any]) -> None:
    killed, report = crashes["external_kill"], crashes["scenarios"]["couple"]
    assert "error" not in killed and not killed["ended_before_the_kill"], killed
    assert report["external_run"]["exit"] == -signal.SIGKILL, report["external_run"]
    before = report["external_before"]
    _assert_clean(before, "after the external kill")
    assert before["epoch"] is not None and not before["finished"]
    final = report["external"]
    assert final["exit"] == 0, _log_tail(crashes["root"] / "work" / "couple", "external")
    _assert_clean(final["check"], "the resumed external run")
    assert all(not d for d in final["compare"].values()), final["compare"]
    work = crashes["root"] / "work" / "couple"
    _assert_same_outputs(crashes["root"] / "external", work / "reference",
                         ("map_cross", "map_single", "precision_at", "p_at_r2"))


# ---------------------------------------------------------------------------------------------- GCKD
@pytest.mark.slow
def test_gckd_sigkill_at_seeded_points_resumes_bit_exactly(crashes: dict[str, Any]) -> None:
    report = crashes["scenarios"]["gckd"]
    work = crashes["root"] / "work" / "gckd"
    assert "error" not in report, report["error"]
    assert {"step", "graph", "ckpt-before", "ckpt-after", "file"} <= _kinds(report["plan"]), report["plan"]
    _assert_kills_and_result(report, work, GCKD_REQUIRED)
    _assert_same_outputs(work / "run", work / "reference", ("evaluation", "history"))


# ---------------------------------------------------------------------------------------------- leftovers
@pytest.mark.slow
def test_resuming_trainers_remove_leftover_temporaries_of_their_checkpoints(crashes: dict[str, Any]) -> None:
    """Couple.fit / GckdTrainer.fit with resume=True (Python API, no run directory) clean their
    checkpoint directory too; other files stay."""
    trainers = crashes["trainers"]
    assert "error" not in trainers, trainers["error"]
    for name in ("couple", "gckd"):
        assert trainers[name] == {"stale_removed": True, "other_kept": True, "checkpoint_written": True}, name


def test_remove_stale_temporaries_takes_only_atomic_write_leftovers(tmp_path: Path) -> None:
    from crossret.storage.atomic import remove_stale_temporaries

    stale = [".checkpoint.pt.abcd_123.tmp", ".metrics.json.z9y8x7w6.tmp", ".a.b.c.00000000.tmp"]
    kept = ["checkpoint.pt", "notes.tmp", ".hidden", ".x.tmp", ".checkpoint.pt.ABCDEFGH.tmp",
            ".checkpoint.pt.abc.tmp", "checkpoint.pt.abcd1234.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # not a file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".deep.abcdefgh.tmp").write_bytes(b"x")  # not below
    (tmp_path / ".link.abcdefgh.tmp").symlink_to(tmp_path / "checkpoint.pt")  # a link is not removed
    removed = remove_stale_temporaries(tmp_path, tmp_path / "missing")
    assert sorted(p.name for p in removed) == sorted(stale)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {*kept, ".dir.abcdefgh.tmp", "sub", ".link.abcdefgh.tmp"}
    assert (tmp_path / "sub" / ".deep.abcdefgh.tmp").exists() and (tmp_path / "checkpoint.pt").exists()


def test_bit_for_bit_comparison_sees_one_flipped_bit() -> None:
    """The driver's comparison is exact: -0.0 is not 0.0, a NaN equals itself, types and keys count."""
    import torch

    from _crash_driver import diff, strip_timings

    def state() -> dict[str, Any]:
        return {"w": torch.zeros(3), "a": np.arange(3), "log": [{"loss": 1.5, "seconds": 0.1}, float("nan")],
                "rng": (1, "x"), "n": 0}

    assert diff(state(), state()) == []
    changed = state()
    changed["w"][1] = -0.0
    assert diff(state(), changed) == ["/w"]
    for key, value in (("a", np.arange(3, dtype=np.int32)), ("log", [{"loss": 1.5000001, "seconds": 0.1}, 0.0]),
                       ("n", 0.0), ("rng", (1, "y"))):
        assert diff(state(), {**state(), key: value}) != [], key
    assert diff(state(), {**state(), "extra": 1}) != []
    # wall-clock timings and the resume point are not compared
    assert strip_timings({"train_seconds": 1.0, "resumed_from_epoch": 2, "log": [{"seconds": 3, "x": 1}]}) == \
        {"log": [{"x": 1}]}
