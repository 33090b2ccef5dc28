"""Where numba keeps crossret's compiled kernels: a user cache directory, never the installed package.

crossret's kernels are ``@njit(cache=True)``. numba reads ``NUMBA_CACHE_DIR`` when it is imported and
picks each kernel's cache location when the kernel is defined; without that variable it writes beside
the source, into ``site-packages/crossret/**/__pycache__``: read-only in many installs (then every
process compiles every kernel again) and shared between the users of one environment.
:func:`configure_numba_cache` sets the variable before crossret's numba modules are imported
(``crossret.retrieval`` and ``crossret.graph`` call it first); a directory the user chose with
``NUMBA_CACHE_DIR`` is kept as it is.

This module imports nothing heavy: it runs while ``import crossret.retrieval`` does.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["configure_numba_cache", "default_cache_dir", "numba_cache_dir"]


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The cache directory crossret would choose: ``$CROSSRET_CACHE_DIR/numba``, else
    ``$XDG_CACHE_HOME/crossret/numba``, else ``~/.cache/crossret/numba`` (``NUMBA_CACHE_DIR`` is not
    consulted here). A relative ``XDG_CACHE_HOME`` is ignored, as the XDG specification says."""
    env = os.environ if environ is None else environ
    own = env.get("CROSSRET_CACHE_DIR")
    if own:
        return Path(own).expanduser() / "numba"
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "crossret" / "numba"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        home = Path(tempfile.gettempdir())
    return home / ".cache" / "crossret" / "numba"


def _usable(path: Path) -> bool:
    """Create ``path`` (owner-only permissions for what is created) and say whether files can be written there."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _private_temp_dir() -> Path | None:
    """A temporary cache directory only this user can write: ``$TMPDIR/crossret-numba-UID`` when it is a
    real directory owned by this user with no group/other permissions, else a fresh ``mkdtemp``.

    numba loads pickled code from its cache, so a directory another user could write is never used."""
    getuid = getattr(os, "getuid", None)
    base = Path(tempfile.gettempdir())
    if getuid is not None:
        shared = base / f"crossret-numba-{getuid()}"
        try:
            shared.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(shared)
            if (stat.S_ISDIR(info.st_mode) and info.st_uid == getuid() and not info.st_mode & 0o077
                    and os.access(shared, os.W_OK | os.X_OK)):
                return shared
        except OSError:
            pass
    try:
        return Path(tempfile.mkdtemp(prefix="crossret-numba-"))
    except OSError:
        return None


def _numba_config() -> object | None:
    """numba's config module when numba is already imported (never imports it)."""
    return sys.modules.get("numba.core.config")


def numba_cache_dir() -> Path | None:
    """The cache directory numba uses now: its setting when numba is imported, else ``NUMBA_CACHE_DIR``;
    ``None`` when neither is set (numba then writes beside the source)."""
    config = _numba_config()
    value = getattr(config, "CACHE_DIR", "") if config is not None else ""
    value = value or os.environ.get("NUMBA_CACHE_DIR", "")
    return Path(value) if value else None


def configure_numba_cache() -> Path | None:
    """Point numba's kernel cache at a user cache directory, unless the user chose one; returns it.

    A ``NUMBA_CACHE_DIR`` the user set (or numba's own setting, when numba was imported first with
    one) is kept and returned. Otherwise the directory of :func:`default_cache_dir` is created; when
    it cannot be (read-only home, no space) a private temporary directory is used. Never raises: at
    worst (``None``) numba falls back to its own locations. When numba is already imported the setting
    is also written into ``numba.core.config``, where kernels defined later look it up.
    """
    chosen = numba_cache_dir()
    if chosen is not None:
        return chosen
    path: Path | None = default_cache_dir()
    if not _usable(path):
        path = _private_temp_dir()
    if path is None:
        return None
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    config = _numba_config()
    if config is not None:
        config.CACHE_DIR = str(path)  # type: ignore[attr-defined]
    return path
