"""Atomic file writes, and the cleanup of the temporaries that killed writes leave behind.

A write goes to a temporary file in the target's directory, is fsynced, then renamed over the target
(and the directory fsynced), so a crash mid-write leaves either the old file or the new one, never a
truncated mix.

The temporary is ``.<target name>.<8 random characters>.tmp``. A process killed before the rename
(SIGKILL, power loss) cannot remove it: the target still holds its previous, complete version and
every reader ignores the temporary, but it stays — for a checkpoint, a multi-GB copy per crash.
:func:`remove_stale_temporaries` removes them when a run resumes. The writer and the cleaner build
the name from the same parts (``_TEMPORARY_*`` below), so they cannot drift apart.

Importing this module does not import numpy or yaml; the functions that need them import them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "atomic_open",
    "fsync_directory",
    "is_temporary_name",
    "remove_stale_temporaries",
    "save_npy_atomic",
    "to_jsonable",
    "umask",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
    "write_yaml_atomic",
]

# ``.<name>.<random>.tmp``: hidden, next to its target. tempfile.mkstemp puts 8 characters of its
# alphabet [a-z0-9_] between the prefix and the suffix.
_TEMPORARY_LEAD = "."
_TEMPORARY_SEPARATOR = "."
_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_RANDOM = "[a-z0-9_]{8}"
_TEMPORARY = re.compile(f"^{re.escape(_TEMPORARY_LEAD)}.+{re.escape(_TEMPORARY_SEPARATOR)}"
                        f"{_TEMPORARY_RANDOM}{re.escape(_TEMPORARY_SUFFIX)}$")


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one :func:`atomic_open` gives its temporary files."""
    return _TEMPORARY.match(name) is not None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path``; on clean exit it replaces ``path`` atomically."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w' only")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_TEMPORARY_LEAD}{path.name}{_TEMPORARY_SEPARATOR}",
                                   suffix=_TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:
        _name_target(exc, path, None)
        raise
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            _name_target(exc, path, tmp)
        raise


def _name_target(exc: OSError, path: Path, tmp: str | None) -> None:
    """Make a failed system call name the file the caller asked for: a full disk (ENOSPC) reported by
    ``write``/``fsync`` carries no file name, and a failure on the temporary (``tmp``; ``None``: while
    creating it) names a hidden file the caller never heard of. Errors without an errno are left as
    they are."""
    if exc.errno is not None and (exc.filename is None or tmp is None or os.fspath(exc.filename) == tmp):
        exc.filename = os.fspath(path)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (POSIX: the entry lives in the directory, not the file);
    without it a power cut can lose the rename, or persist renames out of order."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: toggling the process umask later would race with other threads.
_UMASK = _read_umask()


def umask() -> int:
    """The process umask (read once, at import)."""
    return _UMASK


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_yaml_atomic(path: str | os.PathLike, obj: Any) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(to_jsonable(obj), sort_keys=False))


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file (never pickles: ``allow_pickle=False``)."""
    import numpy as np

    with atomic_open(path, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples recursively into JSON/YAML-safe values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    np = sys.modules.get("numpy")  # no numpy object can exist before numpy is imported
    if np is not None:
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.generic):
            return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not math.isfinite(obj):  # NaN and inf are not valid JSON
        return None
    return obj


def remove_stale_temporaries(*directories: str | os.PathLike) -> list[Path]:
    """Delete the leftover temporary files of atomic writes directly inside ``directories`` (not below;
    missing directories are skipped); returns what was removed. Call it only where no other process
    is writing: at the start of a (resumed) run, on the rank that writes the files."""
    removed = []
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if is_temporary_name(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(Path(entry.path))
    return removed
