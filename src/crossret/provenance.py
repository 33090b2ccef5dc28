"""Provenance of a run: package versions, the source checkout's commit, the command line.

Recorded under ``provenance`` in ``metrics.json``. Every lookup is best effort: a value that cannot
be found is ``None``, and nothing here raises.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# package key -> distribution names to try (the first installed one wins)
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "crossret": ("crossret",),
    "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "sklearn": ("scikit-learn",),
    "numba": ("numba",),
}
# module whose __version__ is used when no distribution metadata is found (e.g. a conda faiss)
_MODULES = {"faiss": "faiss", "torch": "torch", "numpy": "numpy", "scipy": "scipy", "sklearn": "sklearn",
            "numba": "numba"}
_GIT_TIMEOUT_S = 5.0


def package_versions() -> dict[str, str | None]:
    """Installed versions of crossret and the numerical packages it runs on (``None``: not found)."""
    versions: dict[str, str | None] = {}
    for key, names in _DISTRIBUTIONS.items():
        version = None
        for name in names:
            try:
                version = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
            except Exception:  # a broken installation's metadata
                continue
        if version is None and key in _MODULES and _MODULES[key] in sys.modules:
            version = getattr(sys.modules[_MODULES[key]], "__version__", None)
        if version is None and key == "crossret":
            from crossret import __version__

            version = __version__
        versions[key] = None if version is None else str(version)
    return versions


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S,
                                check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_checkout(package_dir: str | Path | None = None) -> dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of the git checkout crossret runs from, both ``None`` when it is not
    run from one (an installed wheel, no git). The package's ``__init__.py`` must be tracked by that
    checkout, so a wheel installed in a virtual environment inside some repository does not count."""
    if package_dir is None:
        package_dir = Path(__file__).resolve().parent
    package_dir = Path(package_dir)
    none: dict[str, Any] = {"git_commit": None, "git_dirty": None}
    if not package_dir.is_dir() or _git(["ls-files", "--error-unmatch", "__init__.py"], package_dir) is None:
        return none
    commit = _git(["rev-parse", "HEAD"], package_dir)
    if not commit:
        return none
    status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def collect_provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """Versions, source checkout and ``command`` (the command line, as given by the caller; ``None``
    when the run did not come from a command line)."""
    return {
        "versions": package_versions(),
        **source_checkout(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": None if command is None else [str(part) for part in command],
    }
