"""A short libFuzzer run (atheris) over every fuzz target owned by this project: ``fuzz/run.py``
in a subprocess, with an RSS limit (a huge allocation is a finding) and a per-input timeout (a
hang is a finding). Any finding makes libFuzzer exit non-zero and write the input it failed on.

The targets of one group share one process (the first input byte picks the target), so the
start-up (numpy, scipy, faiss, numba; torch for the person-data group) is paid once per group.
Longer campaigns: ``python fuzz/run.py TARGET -max_total_time=300`` (see ``fuzz/run.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("atheris", reason="atheris is not installed (pip install 'crossret[fuzz]'): the libFuzzer runs "
                    "are skipped")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "fuzz"))
from targets import TARGETS  # noqa: E402

LIGHT = [name for name, target in TARGETS.items() if target.owned and not target.heavy]
HEAVY = [name for name, target in TARGETS.items() if target.owned and target.heavy]
RUNS = {"light": 600, "heavy": 150}  # executions in all, seeds included


def _start(group: list[str], runs: int, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "CROSSRET_FUZZ_TMP": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    prefix = tmp_path / f"{group[0]}-"
    command = [sys.executable, str(REPO / "fuzz" / "run.py"), ",".join(group), f"-runs={runs}", "-seed=1",
               "-rss_limit_mb=2048", "-timeout=60", f"-artifact_prefix={prefix}", "-print_final_stats=1"]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_every_owned_target_runs_clean_under_libfuzzer(tmp_path: Path) -> None:
    assert LIGHT and HEAVY
    # Both groups at once: their start-ups overlap.
    runs = {"light": _start(LIGHT, RUNS["light"], tmp_path), "heavy": _start(HEAVY, RUNS["heavy"], tmp_path)}
    for group, process in runs.items():
        try:
            output, _ = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"the {group} fuzz run did not finish in 300 s:\n{output[-3000:]}")
        findings = sorted(p.name for p in tmp_path.iterdir()
                          if any(kind in p.name for kind in ("crash-", "timeout-", "oom-", "leak-")))
        assert process.returncode == 0, f"{group} targets: libFuzzer exit {process.returncode}, findings " \
                                        f"{findings}:\n{output[-4000:]}"
        assert f"Done {RUNS[group]} runs" in output, output[-2000:]
