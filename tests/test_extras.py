"""Optional extras: the core install is what hashing needs, and a missing extra is one clear line.

The subprocess tests hide the optional packages behind an import hook, as if they were not installed,
and run the CLI as a shell would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from crossret.errors import CrossretError, MissingExtraError
from crossret.extras import EXTRAS, install_command, missing_extra, require

REPO = Path(__file__).resolve().parents[1]

# Everything the extras provide that the core install does not (pillow and pydantic come with the core's
# matplotlib and typer, so hiding them would not simulate a real install).
HIDDEN = ("transformers", "tokenizers", "torch_geometric", "fastapi", "uvicorn", "starlette", "httpx",
          "pymilvus", "milvus", "atheris")

_HIDE = textwrap.dedent(f"""
    import sys

    HIDDEN = {HIDDEN!r}

    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Hide())
""")

# module -> the distribution that provides it, as pyproject.toml names it
_DISTRIBUTIONS = {"transformers": "transformers", "tokenizers": "tokenizers", "torch_geometric": "torch-geometric",
                  "PIL": "pillow", "fastapi": "fastapi", "pydantic": "pydantic", "uvicorn": "uvicorn",
                  "pymilvus": "pymilvus", "atheris": "atheris"}


def _run_hidden(code: str, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", _HIDE + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _cli_hidden(commands: list[list[str]], *, cwd: Path) -> tuple[list[dict], list[str]]:
    """Run ``crossret`` commands in one process without the extras: exit code, stdout and stderr of each;
    then import the GCKD modules there: the MissingExtraError of each."""
    result = _run_hidden(f"""
        import contextlib, io, json, traceback
        from crossret.cli import main

        results = []
        for args in {commands!r}:
            out, err, code = io.StringIO(), io.StringIO(), 0
            sys.argv = ["crossret", *args]
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main()
                except SystemExit as exc:
                    code = exc.code or 0
                except BaseException:
                    code = "uncaught"
                    err.write(traceback.format_exc())
            results.append({{"code": code, "out": out.getvalue(), "err": err.getvalue()}})

        from crossret.errors import MissingExtraError

        errors = []
        for module in ("crossret.textimage.gckd", "crossret.textimage.propagation"):
            try:
                __import__(module)
            except MissingExtraError as exc:
                errors.append(f"{{exc.extra}}: {{exc}}")
        print(json.dumps([results, errors]))
    """, cwd=cwd)
    assert result.returncode == 0, result.stderr
    results, errors = json.loads(result.stdout.strip().splitlines()[-1])
    return results, errors


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    with open(REPO / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower() for req in requirements}


# --------------------------------------------------------------------------------------------
# the helper


def test_missing_extra_error_is_a_crossret_error_and_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(MissingExtraError) as info:
        require("gckd")
    error = info.value
    assert isinstance(error, CrossretError) and isinstance(error, ImportError)
    assert error.extra == "gckd" and error.name == "transformers"
    assert str(error) == ("GCKD needs the 'gckd' extra (transformers is not installed): "
                          "pip install 'crossret[gckd]'")
    with pytest.raises(MissingExtraError, match="transformers"):
        require("gckd", "transformers", load=True)


def test_require_passes_for_installed_modules_and_rejects_unknown_extras() -> None:
    require("gckd", "numpy")
    require("gckd", "numpy", load=True)
    with pytest.raises(ValueError, match="unknown extra"):
        require("nope")


def test_a_broken_install_is_told_apart_from_a_missing_one() -> None:
    cause = ModuleNotFoundError("No module named 'torch_sparse'", name="torch_sparse")
    message = str(missing_extra("gckd", "torch_geometric.nn", cause))
    assert "torch_geometric.nn cannot be imported: No module named 'torch_sparse'" in message
    assert message.endswith(install_command("gckd"))
    missing = ModuleNotFoundError("No module named 'torch_geometric'", name="torch_geometric")
    assert "(torch_geometric is not installed)" in str(missing_extra("gckd", "torch_geometric.nn", missing))


def test_api_entry_points_raise_missing_extra_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from crossret.textimage.tokenize import train_wordpiece_vocab

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'crossret\[gckd\]'"):
        train_wordpiece_vocab(["a person in a red coat"] * 4, tmp_path / "vocab.txt", vocab_size=40)
    from crossret.retrieval.milvus import MilvusBinaryIndex

    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'crossret\[milvus\]'"):
        MilvusBinaryIndex(64)


# --------------------------------------------------------------------------------------------
# pyproject.toml


def test_core_install_is_the_hashing_stack_and_extras_cover_every_optional_module() -> None:
    project = _project()
    core = _names(project["dependencies"])
    assert core == {"torch", "numpy", "scipy", "scikit-learn", "faiss-cpu", "numba", "llvmlite", "threadpoolctl",
                    "h5py", "typer", "rich", "matplotlib", "pyyaml"}
    extras = project["optional-dependencies"]
    assert {"gckd", "serve", "milvus", "fuzz", "dev", "all"} <= set(extras)
    for name, extra in EXTRAS.items():
        listed = _names(extras[name])
        for module in extra.modules:
            assert _DISTRIBUTIONS[module] in listed, f"{module} of extra {name!r} is not in pyproject's {name!r}"
    assert extras["all"] == ["crossret[gckd,serve,milvus]"]


def test_constraints_pin_every_package_and_keep_the_cpu_torch() -> None:
    lines = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert all(line.count("==") == 1 and ";" not in line for line in lines), "constraints must be exact pins"
    pins = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1] for line in lines}
    assert pins["torch"] == "2.13.0"  # no local label: matches the CPU wheel installed first
    assert not {"pip", "setuptools", "wheel", "crossret"} & set(pins)
    project = _project()
    wanted = _names(project["dependencies"]) | {name for key in ("gckd", "serve", "milvus", "fuzz", "dev")
                                                 for name in _names(project["optional-dependencies"][key])}
    assert wanted <= set(pins), f"not pinned: {sorted(wanted - set(pins))}"


def test_ci_runs_the_readme_commands() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    install = 'pip install torch==2.13.0 && pip install -c constraints.txt -e ".[all,dev]" && crossret demo'
    assert f"```bash\n{install}\n```" in readme
    assert "```bash\npython -m pytest -q\n```" in readme
    assert ci.rstrip().splitlines()[-1] == "python -m pytest -q"
    assert 'pip install torch==2.13.0\n' in ci and '-e ".[all,dev]"' in ci and "-c constraints.txt" in ci
    assert "CROSSRET_LATEST" in ci and "CROSSRET_LATEST=1 bash .ci/run" in readme


# --------------------------------------------------------------------------------------------
# without the extras: the hashing path works, the rest says what to install


def test_hashing_imports_pull_in_no_optional_package() -> None:
    code = """
        import crossret, crossret.hashing, crossret.retrieval, crossret.data, crossret.graph, crossret.report
        import crossret.experiment, crossret.cli, crossret.serve, crossret.textimage
        from crossret.retrieval import MilvusBinaryIndex
        optional = ("transformers", "tokenizers", "torch_geometric", "PIL", "fastapi", "uvicorn", "pymilvus",
                    "atheris")
        print(sorted(name for name in optional if name in sys.modules))
    """
    result = subprocess.run([sys.executable, "-c", "import sys\n" + textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_without_extras_runs_hashing_and_names_the_missing_extra(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, shift in (("src", 0.0), ("tgt", 1.0)):
        np.savez(tmp_path / f"{name}.npz", features=(rng.normal(size=(60, 16)) + shift).astype(np.float32),
                 labels=np.arange(60) % 3)
    (run, synth, serve), api_errors = _cli_hidden([
        ["run", "lsh", "--source", "src.npz", "--target", "tgt.npz", "--bits", "16", "--out", "runs/lsh", "--json"],
        ["gckd", "synth", "data"],
        ["serve", "runs/lsh"],
    ], cwd=tmp_path)
    assert run["code"] == 0, run["err"]
    assert json.loads(run["out"].strip().splitlines()[-1])["method"] == "lsh"
    assert (tmp_path / "runs" / "lsh" / "metrics.json").is_file()

    for result, extra, feature in ((synth, "gckd", "GCKD"), (serve, "serve", "the search service")):
        assert result["code"] == 2, result
        lines = result["err"].strip().splitlines()
        assert len(lines) == 1, result["err"]
        assert lines[0].startswith(f"error: {feature} needs the '{extra}' extra (")
        assert lines[0].endswith(f": pip install 'crossret[{extra}]'")
    assert not (tmp_path / "data").exists()

    assert api_errors == ["gckd: GCKD needs the 'gckd' extra (torch_geometric is not installed): "
                          "pip install 'crossret[gckd]'"] * 2
