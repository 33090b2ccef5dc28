"""`crossret --help` and every command's `--help` start without the heavy packages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("numpy", "torch", "transformers", "faiss", "sklearn", "scipy", "numba", "torch_geometric", "fastapi",
         "uvicorn", "pymilvus", "matplotlib")

# Walks the click tree typer builds from crossret.cli.app, asks every group and command for --help in this
# one process, then reports the command paths and which heavy top-level packages were imported.
_WALK = """
import io, json, sys, contextlib
import typer.main
from crossret.cli import app

root = typer.main.get_command(app)
paths, failures = [], []

def walk(command, path):
    paths.append(path)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        try:
            command.main(args=["--help"], prog_name=" ".join(path), standalone_mode=False)
        except SystemExit as exc:
            if exc.code not in (0, None):
                failures.append([path, exc.code])
    if "Usage:" not in buffer.getvalue():
        failures.append([path, "no usage text"])
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        walk(sub, [*path, name])

walk(root, ["crossret"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
print(json.dumps({"paths": paths, "failures": failures, "heavy": heavy}))
"""


def _walk_helps() -> dict:
    result = subprocess.run([sys.executable, "-c", _WALK, ",".join(HEAVY)], capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_command_help_imports_no_heavy_package() -> None:
    report = _walk_helps()
    paths = {" ".join(p) for p in report["paths"]}
    # the walk reached the groups and commands (a new command is covered without editing this test)
    assert {"crossret", "crossret run", "crossret report", "crossret index", "crossret index build",
            "crossret gckd", "crossret gckd adapt", "crossret serve"} <= paths
    assert report["failures"] == []
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["gckd", "pretrain", "--help"]])
def test_real_help_process_imports_no_heavy_package(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "crossret", *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage:" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "crossret" in imported  # the import log was read
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))


def test_method_names_in_help_match_the_registry() -> None:
    from crossret.hashing import registry

    for name in registry.BUILTIN_METHODS:  # imports every built-in method module
        assert registry.method_class(name).name == name
    assert set(registry.BUILTIN_METHODS) <= set(registry.available_methods())


def test_metric_defaults_are_the_metrics_modules() -> None:
    from crossret.retrieval import _defaults, metrics

    assert metrics.TIE_RULES is _defaults.TIE_RULES
    assert metrics.DEFAULT_PRECISION_NS is _defaults.DEFAULT_PRECISION_NS
