"""Packed-code files and indexes at scale: code files larger than memory, indexes built in batches.

* :func:`open_features` maps a feature file (``.npy`` memory-mapped, or a raw ``np.memmap``) without
  reading it.
* A packed-codes file is a ``.npy`` of uint8 rows (faiss bit order,
  :func:`~crossret.retrieval.packing.pack_codes`) with a JSON sidecar ``<path>.json`` recording the code
  length, which a packed file cannot carry (a 6-byte row may hold 41 to 48 bits);
  :func:`read_packed_codes` reads one. Writing one by encoding features with a fitted method is
  :func:`crossret.hashing.encoding.encode_to_packed`.
* :func:`build_index_from_packed` builds a :class:`~crossret.retrieval.index.BinaryIndex` from a
  packed-codes file (or array) in chunks; IVF kinds are trained on a seeded random sample.
* :func:`recall_at_k` measures an approximate index against the exact flat index.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import CodeError, ConfigError, DataError, FileFormatError
from crossret.progress import ProgressFn, no_progress
from crossret.retrieval.index import BinaryIndex, _check_k, requested_nlist
from crossret.retrieval.packing import BIT_ORDER, packed_width
from crossret.storage.safe_read import load_npy

__all__ = [
    "DEFAULT_ADD_BATCH",
    "PackedCodesFile",
    "build_index_from_packed",
    "open_features",
    "read_packed_codes",
    "recall_at_k",
    "sidecar_path",
]

DEFAULT_ADD_BATCH = 1 << 20
SIDECAR_FORMAT = "crossret-packed-codes"
# IVF training sample: this many codes per list (faiss' k-means warns below 39 and subsamples
# above 256 anyway; 64 keeps training at 1M+ codes to seconds on a few cores).
TRAIN_POINTS_PER_LIST = 64
_MAX_SIDECAR_BYTES = 1 << 20


@dataclass
class PackedCodesFile:
    """A packed-codes ``.npy`` written by :func:`crossret.hashing.encoding.encode_to_packed`."""

    path: Path
    n: int
    bits: int
    width: int
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a packed-codes file: ``codes.npy`` -> ``codes.npy.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------------------------
# features


def open_features(path: str | os.PathLike, *, shape: tuple[int, int] | None = None,
                  dtype: Any = np.float32, offset: int = 0) -> np.ndarray:
    """Open a feature matrix without reading it: a ``.npy`` memory-mapped read-only, or a raw binary
    file as an ``np.memmap`` of the given ``shape``/``dtype`` (``shape`` given = raw file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"features: file not found: {path}")
    if shape is not None:
        try:
            return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=tuple(shape), offset=offset)
        except (ValueError, TypeError, OverflowError, OSError) as exc:
            raise DataError(f"features: cannot map {path} as a raw {dtype} array of shape "
                            f"{shape} at offset {offset} ({exc})") from exc
    return load_npy(path, "features", mmap=True, hint="; for a raw binary file give its shape and dtype")


# --------------------------------------------------------------------------------------------
# packed-codes files


def read_packed_codes(path: str | os.PathLike, bits: int | None = None) -> tuple[np.ndarray, int]:
    """A packed-codes ``.npy`` memory-mapped read-only, and its code length.

    The length comes from ``bits`` or else from the sidecar written by
    :func:`crossret.hashing.encoding.encode_to_packed`;
    when both exist they must agree.
    """
    path = Path(path)
    codes = load_npy(path, "codes", mmap=True)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise CodeError(f"codes: {path} does not hold packed codes (a 2-D uint8 array); got "
                        f"{getattr(codes, 'dtype', '?')} {getattr(codes, 'shape', '?')}")
    recorded = _sidecar_bits(path, codes)
    if bits is None:
        if recorded is None:
            raise ConfigError(f"codes: {path} holds packed uint8 codes and has no sidecar "
                              f"{sidecar_path(path).name}; give the code length (bits / --bits)")
        bits = recorded
    elif recorded is not None and recorded != bits:
        raise CodeError(f"codes: {path} holds {recorded}-bit codes (per {sidecar_path(path).name}) but "
                        f"{bits} bits were given")
    return codes, int(bits)


def _sidecar_bits(path: Path, codes: np.ndarray) -> int | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        if side.stat().st_size > _MAX_SIDECAR_BYTES:
            raise ValueError(f"{side.stat().st_size} bytes; a sidecar is a few hundred")
        record = json.loads(side.read_text(encoding="utf-8"))
        bits, n, width = (record[key] for key in ("bits", "n", "width"))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise FileFormatError(f"{side}: not a readable packed-codes sidecar ({exc})") from exc
    if record.get("format") != SIDECAR_FORMAT or record.get("bit_order") != BIT_ORDER:
        raise FileFormatError(f"{side}: not a crossret packed-codes sidecar (format/bit order)")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (bits, n, width)) or bits < 1:
        raise FileFormatError(f"{side}: bits, n and width must be integers (bits >= 1), got {bits!r}, {n!r}, "
                              f"{width!r}")
    if (n, width) != codes.shape:
        raise FileFormatError(f"{side}: describes {n} x {width} codes but {path.name} holds {codes.shape}; "
                              "the two files do not belong together")
    if packed_width(bits) != width:
        raise FileFormatError(f"{side}: {bits}-bit codes take {packed_width(bits)} bytes per row, not {width}")
    return bits


# --------------------------------------------------------------------------------------------
# batched index build


def check_build_input(codes: Any, bits: int | None, batch_size: Any, ids: Any
                      ) -> tuple[np.ndarray, int, np.ndarray | None]:
    """The inputs of an index build, checked the same way for every backend: ``codes`` (a packed-codes
    file, read memory-mapped, or a packed uint8 array ``(N, bytes)``) with its ``bits``, a positive
    ``batch_size`` and ``ids`` (``(N,)`` or None). Returns ``(codes, bits, ids)``."""
    if isinstance(codes, (str, os.PathLike)):
        codes, bits = read_packed_codes(codes, bits)
    elif bits is None:
        raise ConfigError("bits: the code length is needed for packed codes given as an array")
    codes = np.asarray(codes) if not isinstance(codes, np.ndarray) else codes
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise CodeError(f"codes: expected packed uint8 codes (items x bytes), got {codes.dtype} {codes.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (int(codes.shape[0]),):
            raise ConfigError(f"ids: expected {codes.shape[0]} ids (one per code), got shape {ids.shape}")
    return codes, int(bits), ids


def build_index_from_packed(codes: Any, bits: int | None = None, kind: str = "flat", *,
                            batch_size: int = DEFAULT_ADD_BATCH, train_size: int | None = None,
                            seed: int = 0, ids: Any = None, progress: ProgressFn = no_progress,
                            **params: Any) -> BinaryIndex:
    """Build a :class:`BinaryIndex` from packed codes, adding ``batch_size`` rows at a time.

    ``codes``: a path to a packed-codes ``.npy`` (memory-mapped; ``bits`` from its sidecar when not
    given) or a uint8 array. Kinds and ``params`` as :class:`BinaryIndex` (``flat``, ``ivf``,
    ``hnsw``, ``multihash`` or a faiss factory string). IVF kinds are trained on ``train_size``
    codes drawn without replacement with ``seed`` (default ``min(N, 64 · nlist)``); the default
    ``nlist`` is chosen from the full size N, not the sample.
    """
    codes, bits, ids = check_build_input(codes, bits, batch_size, ids)
    n = int(codes.shape[0])
    if kind == "ivf" and "nlist" not in params:
        params["nlist"] = BinaryIndex.default_nlist(n)
    nlist = requested_nlist(kind, params)
    if nlist is not None and nlist > n:
        raise ConfigError(f"nlist={nlist} exceeds the {n} codes to index; an IVF index needs at least one training "
                          f"code per list: use nlist <= {n} (default: {BinaryIndex.default_nlist(n)})")
    index = BinaryIndex(bits, kind, **params)
    if not index.is_trained:
        nlist = int(getattr(index._faiss_index, "nlist", 1))
        m = min(n, train_size if train_size is not None else TRAIN_POINTS_PER_LIST * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))  # sorted: mmap reads in order
        progress(0, n, f"training {kind} on {m} codes")
        index.train(np.asarray(codes[rows]))
    progress(0, n, f"adding codes ({kind})")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        index.add(np.asarray(codes[start:stop]), ids=None if ids is None else ids[start:stop])
        progress(stop, n, f"adding codes ({kind})")
    return index


# --------------------------------------------------------------------------------------------
# recall


def recall_at_k(index: BinaryIndex, exact_index: BinaryIndex, queries: np.ndarray, k: int, *,
                per_query: bool = False) -> float | np.ndarray:
    """Recall@k of ``index`` against the exact flat ``exact_index`` over the same codes.

    A returned item is a hit when its distance is ``<=`` the exact k-th distance of the query: with
    ties at the k-th distance any of the tied items is a correct k-th neighbour, so an approximate
    result that picks a different tied item is not penalised. Recall = hits / min(k, N) per query,
    averaged (or the per-query array with ``per_query``). This relies on the distances an index
    returns being exact Hamming distances, which holds for every faiss binary index (they store the
    full codes); missing results (id -1) are misses.
    """
    if exact_index.kind not in ("flat", "BFlat"):
        raise ConfigError(f"recall_at_k: the reference must be an exact flat index, not kind {exact_index.kind!r}")
    if index.bits != exact_index.bits or index.ntotal != exact_index.ntotal:
        raise ConfigError(
            f"recall_at_k: the indexes differ ({index.bits} bits, {index.ntotal} codes vs {exact_index.bits} bits, "
            f"{exact_index.ntotal} codes); build both over the same codes"
        )
    if exact_index.ntotal == 0:
        raise ConfigError("recall_at_k: the indexes are empty")
    kk = min(_check_k(k), exact_index.ntotal)
    d_exact, _ = exact_index.search(queries, kk)
    d_approx, ids = index.search(queries, kk)
    hits = ((ids >= 0) & (d_approx <= d_exact[:, -1:])).sum(axis=1)
    recall = hits / kk
    return recall if per_query else float(recall.mean()) if recall.size else float("nan")
