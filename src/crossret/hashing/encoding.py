"""Encoding feature files with a fitted method, batch by batch, into code files on disk.

:func:`encode_to_packed` streams a feature file (``.npy`` opened memory-mapped, or a raw
``np.memmap``) through a fitted :class:`~crossret.hashing.base.HashMethod` in batches and writes the
packed codes (faiss bit order, :func:`~crossret.retrieval.packing.pack_codes`) to a ``.npy`` file.
Memory is O(batch): one batch of features and its codes. The output is written to a temporary file
that replaces ``out_path`` only when every batch succeeded (a bad batch leaves no output and raises
an error naming its rows). A JSON sidecar ``<out_path>.json`` records the code length, which a
packed file cannot carry (a 6-byte row may hold 41 to 48 bits); reading such files back is
:func:`crossret.retrieval.streaming.read_packed_codes`.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import CodeError, ConfigError, DataError
from crossret.hashing.base import check_domain
from crossret.progress import ProgressFn, no_progress
from crossret.retrieval.packing import BIT_ORDER, pack_codes, packed_width
from crossret.retrieval.streaming import SIDECAR_FORMAT, PackedCodesFile, open_features, sidecar_path
from crossret.storage.atomic import atomic_open, write_json_atomic

__all__ = ["DEFAULT_ENCODE_BATCH", "encode_to_file", "encode_to_packed"]

DEFAULT_ENCODE_BATCH = 65_536


def _check_feature_matrix(features: Any) -> np.ndarray:
    if not isinstance(features, np.ndarray):
        features = np.asarray(features)
    if features.ndim != 2:
        raise DataError(f"features: expected a 2-D array (items x dims), got shape {features.shape}")
    if features.dtype.kind not in "fiu":
        raise DataError(f"features: expected real-valued numbers, got dtype {features.dtype}")
    return features


def encode_to_packed(method: Any, features: Any, out_path: str | os.PathLike, *,
                     batch_size: int = DEFAULT_ENCODE_BATCH, progress: ProgressFn = no_progress,
                     meta: dict[str, Any] | None = None, domain: str = "target") -> PackedCodesFile:
    """Encode ``features`` with a fitted ``method`` batch by batch into packed codes at ``out_path``.

    ``features``: an array (typically ``np.load(path, mmap_mode="r")`` or an ``np.memmap``) or a
    path to a ``.npy`` file (memory-mapped). Rows are read ``batch_size`` at a time, checked for
    NaN/inf (the error names the rows), encoded with ``method.encode`` and packed; memory stays
    O(batch_size). The ``.npy`` appears at ``out_path`` only when every batch succeeded; the sidecar
    ``<out_path>.json`` (bits, rows, method, domain, ``meta``) is written after it. ``domain``
    (``target`` | ``source``) is passed to ``method.encode``: a model with per-domain input statistics
    (COUPLE) encodes a source-domain database with ``domain="source"``.
    """
    return encode_to_file(method, features, out_path, batch_size=batch_size, progress=progress, meta=meta,
                          domain=domain, packed=True)


def encode_to_file(method: Any, features: Any, out_path: str | os.PathLike, *,
                   batch_size: int = DEFAULT_ENCODE_BATCH, progress: ProgressFn = no_progress,
                   meta: dict[str, Any] | None = None, domain: str = "target", packed: bool = True) -> PackedCodesFile:
    """:func:`encode_to_packed`, or with ``packed=False`` the same streamed encoding into ±1 int8 rows
    ``(N, bits)`` (the sidecar then records ``"packed": false``). One code path for ``crossret encode``
    and ``crossret index encode``."""
    check_domain(domain)
    if isinstance(features, (str, os.PathLike)):
        source: str | None = str(features)
        features = open_features(features)
    else:
        source = None
    features = _check_feature_matrix(features)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    bits = int(method.bits)
    input_dim = getattr(method, "input_dim", None)
    if input_dim is None:
        raise ConfigError(f"{getattr(method, 'name', 'method')}: not fitted; load or fit a method before encoding")
    if features.shape[1] != input_dim:
        raise DataError(f"features have {features.shape[1]} dimensions but the method expects {input_dim}")
    n, width = int(features.shape[0]), packed_width(bits)
    dtype, row_width = (np.uint8, width) if packed else (np.int8, bits)
    out_path = Path(out_path)
    side = sidecar_path(out_path)
    t0 = time.perf_counter()
    progress(0, n, "encoding")
    with atomic_open(out_path, "wb") as handle:
        # The .npy header is written first (the shape is known), then each batch is appended, so
        # nothing larger than a batch is ever held in memory.
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n, row_width)})
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            rows = _encode_batch(method, features, start, stop, bits, domain, packed)
            handle.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
            progress(stop, n, "encoding")
        # Drop a stale sidecar before the new codes replace the old ones: a file and a sidecar that
        # disagree would be worse than a file without one.
        with contextlib.suppress(FileNotFoundError):
            side.unlink()
    seconds = time.perf_counter() - t0
    record = {
        "format": SIDECAR_FORMAT, "bits": bits, "n": n, "width": width, "bit_order": BIT_ORDER, "packed": packed,
        "method": getattr(method, "name", type(method).__name__), "features": source, "domain": domain,
        "batch_size": int(batch_size), "seconds": round(seconds, 4), **(meta or {}),
    }
    write_json_atomic(side, record)
    return PackedCodesFile(path=out_path, n=n, bits=bits, width=width, seconds=seconds, meta=record)


def _encode_batch(method: Any, features: np.ndarray, start: int, stop: int, bits: int, domain: str,
                  packed: bool = True) -> np.ndarray:
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
        batch = np.asarray(features[start:stop], dtype=np.float32)
    finite = np.isfinite(batch).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"features rows {start}..{stop - 1}: {bad.size} row(s) contain NaN or inf (or values beyond "
            f"float32 range), first at row {start + int(bad[0])}; no codes were written"
        )
    codes = method.encode(batch, domain=domain)
    if codes.shape != (stop - start, bits):
        raise CodeError(f"method returned codes of shape {codes.shape} for rows {start}..{stop - 1}; "
                        f"expected {(stop - start, bits)}")
    return pack_codes(codes) if packed else codes
