"""numba's kernel cache lives in a user cache directory (crossret.kernel_cache), never beside the source."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from crossret import kernel_cache
from crossret.kernel_cache import configure_numba_cache, default_cache_dir

SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------------ resolution rules
def test_default_dir_precedence(tmp_path: Path) -> None:
    home = Path.home()
    assert default_cache_dir({}) == home / ".cache" / "crossret" / "numba"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "crossret" / "numba"
    both = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CROSSRET_CACHE_DIR": str(tmp_path / "own")}
    assert default_cache_dir(both) == tmp_path / "own" / "numba"
    # the XDG specification: a relative XDG_CACHE_HOME is invalid and ignored; empty values are unset
    assert default_cache_dir({"XDG_CACHE_HOME": "relative/cache"}) == home / ".cache" / "crossret" / "numba"
    assert default_cache_dir({"CROSSRET_CACHE_DIR": "", "XDG_CACHE_HOME": ""}) == home / ".cache" / "crossret" / "numba"
    # NUMBA_CACHE_DIR is not crossret's choice: configure_numba_cache keeps it, default_cache_dir ignores it
    assert default_cache_dir({"NUMBA_CACHE_DIR": str(tmp_path)}) == home / ".cache" / "crossret" / "numba"


@pytest.fixture
def no_numba(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """configure_numba_cache as if numba were imported with no cache directory set (a stand-in config)."""
    config = types.SimpleNamespace(CACHE_DIR="")
    monkeypatch.setattr(kernel_cache, "_numba_config", lambda: config)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)  # restored after the test, whatever configure sets
    return config


def test_sets_numba_cache_dir_and_creates_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             no_numba: types.SimpleNamespace) -> None:
    monkeypatch.setenv("CROSSRET_CACHE_DIR", str(tmp_path / "cache"))
    path = configure_numba_cache()
    assert path == tmp_path / "cache" / "numba" and path.is_dir()
    assert os.environ["NUMBA_CACHE_DIR"] == str(path)
    assert no_numba.CACHE_DIR == str(path)  # numba imported first: its config gets the directory too
    assert configure_numba_cache() == path  # idempotent


def test_user_numba_cache_dir_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      no_numba: types.SimpleNamespace) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("CROSSRET_CACHE_DIR", str(tmp_path / "cache"))
    assert configure_numba_cache() == tmp_path / "mine"
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")
    assert no_numba.CACHE_DIR == ""  # numba reads the user's variable itself
    assert not (tmp_path / "cache").exists()  # crossret's directory is not even created


def test_numba_own_setting_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   no_numba: types.SimpleNamespace) -> None:
    no_numba.CACHE_DIR = str(tmp_path / "from-config")  # e.g. a .numba_config.yaml
    monkeypatch.setenv("CROSSRET_CACHE_DIR", str(tmp_path / "cache"))
    assert configure_numba_cache() == tmp_path / "from-config"
    assert "NUMBA_CACHE_DIR" not in os.environ


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's directory pointed at a fresh folder."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _uncreatable(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return blocker / "cache"  # mkdir fails for any user, root included


def test_falls_back_to_a_private_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_tmp: Path,
                                          no_numba: types.SimpleNamespace) -> None:
    monkeypatch.setenv("CROSSRET_CACHE_DIR", str(_uncreatable(tmp_path)))
    path = configure_numba_cache()
    assert path == private_tmp / f"crossret-numba-{os.getuid()}"
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
    assert os.environ["NUMBA_CACHE_DIR"] == str(path)


@pytest.mark.parametrize("kind", ["open-to-all", "symlink"])
def test_temp_fallback_refuses_a_dir_others_could_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        private_tmp: Path, no_numba: types.SimpleNamespace,
                                                        kind: str) -> None:
    # numba unpickles what it finds in its cache: a directory someone else controls is never used
    shared = private_tmp / f"crossret-numba-{os.getuid()}"
    if kind == "open-to-all":
        shared.mkdir()
        shared.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir()
        shared.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("CROSSRET_CACHE_DIR", str(_uncreatable(tmp_path)))
    path = configure_numba_cache()
    assert path is not None and path != shared and path.parent == private_tmp
    assert path.name.startswith("crossret-numba-") and not os.lstat(path).st_mode & 0o077


def test_never_raises_when_nothing_is_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               no_numba: types.SimpleNamespace) -> None:
    monkeypatch.setenv("CROSSRET_CACHE_DIR", str(_uncreatable(tmp_path)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a-file"))  # the per-user temp dir fails too

    def refuse(*args: object, **kwargs: object) -> str:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert configure_numba_cache() is None
    assert "NUMBA_CACHE_DIR" not in os.environ  # numba falls back to its own locations
    assert no_numba.CACHE_DIR == ""


# ------------------------------------------------------------------------------ in a fresh interpreter
_PROBE = """
import json, sys
if sys.argv[1] == "numba-first":
    import numba  # imported before crossret: crossret must still move the cache
import numpy as np
from crossret.retrieval import hamming
from crossret.graph import diffusion
hamming.hamming_distances(np.zeros((2, 8), np.uint8), np.full((3, 8), 255, np.uint8), 64)
print(json.dumps({"hamming": hamming._distance_kernel.stats.cache_path,
                  "diffusion": diffusion._block_cg_kernel.stats.cache_path,
                  "misses": sum(hamming._distance_kernel.stats.cache_misses.values())}))
"""


def _probe(env: dict[str, str], mode: str = "plain") -> dict[str, object]:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "CROSSRET_CACHE_DIR")}
    return {**env, **values}


@pytest.mark.parametrize("mode", ["plain", "numba-first"])
def test_compiled_kernels_land_in_the_user_cache(tmp_path: Path, mode: str) -> None:
    report = _probe(_env(CROSSRET_CACHE_DIR=str(tmp_path)), mode)
    cache = tmp_path / "numba"
    for module in ("hamming", "diffusion"):
        # the directory numba reads and writes for these kernels: not src/crossret/**/__pycache__
        assert Path(report[module]).parent == cache, report
        assert SRC not in Path(report[module]).parents
    assert report["misses"] == 1  # compiled here, then saved:
    index = list(cache.rglob("hamming._distance_kernel-*.nbi"))
    assert len(index) == 1 and list(index[0].parent.glob("hamming._distance_kernel-*.nbc"))


def test_user_numba_cache_dir_is_used(tmp_path: Path) -> None:
    report = _probe(_env(NUMBA_CACHE_DIR=str(tmp_path / "mine"), CROSSRET_CACHE_DIR=str(tmp_path / "cache")))
    assert Path(report["hamming"]).parent == tmp_path / "mine"
    assert list((tmp_path / "mine").rglob("*.nbi")) and not (tmp_path / "cache").exists()
