"""Atomic file writes: write to a temporary file in the same directory, fsync, then rename.

A crash mid-write leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path``; on clean exit it replaces ``path`` atomically."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w' only")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: toggling the process umask later would race with other threads.
_UMASK = _read_umask()


def _umask() -> int:
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
    write_text_atomic(path, yaml.safe_dump(to_jsonable(obj), sort_keys=False))


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file (never pickles: ``allow_pickle=False``)."""
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples recursively into JSON/YAML-safe values."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, float) and not math.isfinite(obj):  # NaN and inf are not valid JSON
        return None
    return obj


def read_yaml_mapping(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (a run's ``config.yaml``); clear :class:`FileFormatError`
    naming the file when it cannot be read, parsed, or is not a mapping."""
    import yaml

    from crossret.errors import FileFormatError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise FileFormatError(f"{path}: cannot read {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: not a {what} (expected a mapping)")
    return data


def load_npy(path: str | os.PathLike, what: str, *, mmap: bool = False, missing: str | None = None,
             hint: str = "") -> np.ndarray:
    """One ``.npy`` array (never pickles; memory-mapped read-only with ``mmap``), with errors that name
    ``what`` and the file: :class:`DataError` when it is missing (``missing`` replaces the message) or
    unreadable (``hint`` is appended), or holds an ``.npz`` archive instead of one array."""
    from crossret.errors import DataError  # errors imports nothing from here; local to keep _io leaf-light

    path = Path(path)
    if not path.is_file():
        raise DataError(missing or f"{what}: file not found: {path}")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{what}: {path} is not a readable .npy file ({exc}){hint}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise DataError(f"{what}: {path} is not a single-array .npy file")
    return array
