"""Persistent search indexes built on faiss: :class:`BinaryIndex` (Hamming) and :class:`DenseIndex`
(inner product / cosine).

Binary index kinds (the ``kind`` argument):

``"flat"``
    Exhaustive, exact. No parameters, no training. The codes are stored in a faiss
    ``IndexBinaryFlat`` (so saved files are unchanged) but searched by crossret's numba kernels
    (:func:`crossret.retrieval.hamming.hamming_topk`), exact and ordered by (distance, position)
    with no heap: while k is a small share of the database, blocks of queries share each pass over
    a cache-sized database tile with a vectorised threshold test, keeping a bounded candidate buffer
    per query; otherwise one pass counts a histogram of distances, whose cumulative counts give the
    k-th distance, and a second pass places the items up to it by counting sort. Speed against
    faiss: docs/scale.md. Few queries split the database across threads instead of the queries.
    ``range_search`` and factory strings such as ``"BFlat"`` still use faiss (query blocks of 1024,
    faiss' default is 32; see ``_FLAT_QUERY_BATCH``).
``"ivf"``
    ``IndexBinaryIVF`` over a flat binary quantizer. Parameters: ``nlist`` (default
    ``round(4·sqrt(N))`` clipped to ``[1, N // 39]`` so faiss' k-means gets >= 39 points per
    centroid), ``nprobe`` (default ``min(8, nlist)``). Needs training; ``from_packed`` trains on the
    codes it indexes. Approximate unless ``nprobe == nlist``.
``"hnsw"``
    ``IndexBinaryHNSW``. Parameters: ``M`` (default 32), ``efConstruction`` (40), ``efSearch`` (64).
    Approximate; no ``range_search``.
``"multihash"``
    ``IndexBinaryMultiHash`` (multi-index hashing): ``nhash`` hash tables, each keyed by ``b``
    consecutive code bits; a query's candidates are the items that share a bucket with it in at least
    one table after flipping up to ``nflip`` of those ``b`` bits, ranked by their exact distance.
    Parameters: ``b`` (default ``min(16, bits)``), ``nhash`` (default ``bits // b``), ``nflip``
    (default 0; search-time). ``nhash · b`` must not exceed the real code length (padding bits are
    zero in every code, so a table over them would put every item in one bucket). No training.
    Approximate: results are exact distances of a subset of the database, so they can only be
    farther than the exact ones or missing (``-1``) when fewer than ``k`` candidates turn up.
any other string
    A raw faiss binary factory string (``"BIVF1024"``, ``"BHNSW32"``, ``"BFlat"``, ...) passed to
    ``faiss.index_binary_factory``. Accepted parameters: ``nprobe`` (IVF) and ``efSearch`` (HNSW).

Guarantees (all kinds):

* Code lengths that are not a multiple of 64 are zero-padded internally (``pad_packed``) so the
  64-bit kernels run; distances are unchanged. Inputs are validated with ``check_packed``.
* Results of each query are sorted by ``(distance, position)``, where *position* is the order in
  which items were added (``0 .. ntotal-1``). Without user ids, position is the returned id.
* ``flat`` search is exact *including ties*: the ``k`` results are the first ``k`` items of the
  database ordered by ``(distance, position)`` — by construction of both kernels (the items kept
  at the k-th distance are the first ones in position order); checked against a brute force
  and against faiss' ``IndexBinaryFlat`` in the tests. Other kinds' faiss results are re-sorted.
* ``k > ntotal`` (including an empty index): missing slots hold id ``-1`` and distance
  :data:`MISSING_DISTANCE` (``int32`` max) for binary, score ``-inf`` for dense indexes, at the
  end of each row. Searching an IVF index that was never trained raises :class:`ConfigError`.
* ``range_search(q, radius)`` returns every item with distance ``<= radius`` (faiss' own binary
  range search is ``< radius``; the radius is shifted by one). Exact for ``flat``; for ``ivf`` only
  the probed lists are searched, for ``multihash`` only the hash candidates.

File format (both index types; never pickle): the checksummed container of
:mod:`crossret.storage.sealed`, written atomically as one file::

    magic (8 bytes)  b"CRBINIDX" | b"CRDNSIDX"
    format version   uint32 little-endian
    header length    uint64 little-endian
    header           UTF-8 JSON (format_version, kind, sizes, params, sha256 of the payload, ...)
    payload          faiss serialized index, then the user ids (int64 little-endian) if any
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from crossret.errors import CodeError, ConfigError, DataError, FileFormatError
from crossret.limits import MAX_BITS, check_memory, check_result_slots
from crossret.retrieval.packing import BIT_ORDER, check_packed, packed_width, pad_packed, padded_bits
from crossret.storage.sealed import Container, Wording

__all__ = [
    "FORMAT_VERSION",
    "INDEX_MAGICS",
    "MISSING_DISTANCE",
    "MISSING_ID",
    "BinaryIndex",
    "DenseIndex",
    "read_index_header",
]

FORMAT_VERSION = 1
MISSING_ID = -1
MISSING_DISTANCE = int(np.iinfo(np.int32).max)
MISSING_SCORE = float("-inf")

_BINARY_MAGIC = b"CRBINIDX"
_DENSE_MAGIC = b"CRDNSIDX"
#: The first bytes of every index file crossret writes (binary, dense).
INDEX_MAGICS: tuple[bytes, ...] = (_BINARY_MAGIC, _DENSE_MAGIC)

_HNSW_DEFAULTS = {"M": 32, "efConstruction": 40, "efSearch": 64}
# faiss layout (fourcc) each built-in kind serializes to (factory strings may give any of them).
_BINARY_LAYOUTS = {"flat": "IBxF", "ivf": "IBwF", "hnsw": "IBHf", "multihash": "IBHm"}
_DENSE_LAYOUTS = {"flat": "IxFI", "hnsw": "IHNf"}
_MULTIHASH_MAX_B = 64  # faiss reads each hash key as one 64-bit word
# Queries per block of faiss' exhaustive binary search (faiss' default is 32). Each block runs one
# OpenMP parallel region per 65,536 database codes, so with 32 a search of 300 queries over 1M codes
# forks and joins 160 times; on a busy machine every join waits for the slowest, descheduled thread.
# 1024 joins 32 times fewer (measured in docs/scale.md, "Exact search speed") with the same per-query
# scan order, so results and tie order are unchanged.
_FLAT_QUERY_BATCH = 1024
# Parameters that may be 0 (all others must be >= 1).
_ZERO_OK_PARAMS = {"nflip"}


def _tune_flat(index: Any) -> Any:
    """Give an exhaustive binary index larger query blocks (see ``_FLAT_QUERY_BATCH``)."""
    if type(index).__name__ == "IndexBinaryFlat":
        index.query_batch_size = _FLAT_QUERY_BATCH
    return index


def _faiss() -> Any:
    # Imported lazily: ``import crossret.retrieval`` must stay cheap.
    import faiss

    return faiss


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer (number of results per query), got {k!r}")
    return int(k)


def _check_int_param(name: str, value: Any, minimum: int = 1) -> int:
    # faiss stores its parameters as C ints: larger values raise OverflowError deep inside the wrapper.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not minimum <= value <= _INT32_MAX:
        raise ConfigError(f"index parameter {name} must be an integer >= {minimum} (and below 2**31), got {value!r}")
    return int(value)


# Bytes per IVF list at build and training time: the float centroid faiss' binary k-means keeps per bit,
# the binary centroid and the list's two empty vectors.
_IVF_BYTES_PER_LIST_BIT = 4
_IVF_BYTES_PER_LIST = 64
# Bytes per item of an HNSW graph for each unit of M: 2·M level-0 neighbours of 4 bytes (upper levels
# add a few percent).
_HNSW_BYTES_PER_M = 9


def _check_param_sizes(params: dict[str, int], padded_bits: int, default_b: int = 64) -> None:
    """Refuse index parameters that would allocate without bound or make a search never end, before
    faiss sees them: HNSW ``M`` / ``efConstruction`` / ``efSearch`` beyond the largest value a saved
    index may hold, a multi-hash ``nflip`` that probes more keys than that, and ``nlist`` lists that do
    not fit in memory."""
    from crossret.retrieval._faiss_format import MAX_EF, MAX_FLIP_PROBES, flip_probes

    for name in ("M", "efConstruction", "efSearch"):
        if params.get(name, 0) > MAX_EF:
            raise ConfigError(f"index parameter {name}={params[name]} is far beyond any useful value (at most "
                              f"{MAX_EF}; typical: 16-512)")
    if "nflip" in params and flip_probes(min(params.get("b", default_b), 64), params["nflip"]) > MAX_FLIP_PROBES:
        raise ConfigError(f"index parameter nflip={params['nflip']} would probe more than {MAX_FLIP_PROBES} hash "
                          "keys per table and query; use nflip <= 3")
    if "nlist" in params:
        nlist = params["nlist"]
        check_memory(nlist * (_IVF_BYTES_PER_LIST_BIT * padded_bits + _IVF_BYTES_PER_LIST),
                     f"index parameter nlist={nlist}: the IVF lists", "use fewer lists (nlist)")


def requested_nlist(kind: str, params: dict[str, Any]) -> int | None:
    """The IVF list count a kind and its parameters ask for (``nlist``, or ``BIVF<nlist>`` in a factory
    string); ``None`` when it is not an IVF kind or the count is left to the default."""
    if kind == "ivf":
        nlist = params.get("nlist")
        return int(nlist) if isinstance(nlist, (int, np.integer)) and not isinstance(nlist, bool) else None
    match = re.search(r"IVF(\d+)", kind)
    return int(match.group(1)) if match else None


def _check_factory_sizes(kind: str, padded_bits: int) -> None:
    """The sizes spelled inside a faiss factory string (``BIVF<nlist>``, ``BHNSW<M>``, ...), checked as
    the named parameters are, before faiss allocates them."""
    from crossret.retrieval._faiss_format import MAX_EF

    for match in re.finditer(r"([A-Za-z]*)(\d+)", kind):
        prefix, value = match.group(1), int(match.group(2))
        if value > _INT32_MAX:
            raise ConfigError(f"index kind {kind!r}: {value} does not fit faiss' 32-bit sizes")
        if prefix.endswith("IVF"):
            _check_param_sizes({"nlist": value}, padded_bits)
        elif prefix.endswith("HNSW"):
            _check_param_sizes({"M": value}, padded_bits)
        elif value > MAX_EF:
            raise ConfigError(f"index kind {kind!r}: {value} is far beyond any useful size (at most {MAX_EF})")


def _check_ids(ids: Any, n: int, existing: np.ndarray | None) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise ConfigError(f"ids: expected a 1-D array of {n} ids (one per added item), got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ConfigError(f"ids: expected integer ids, got dtype {ids.dtype}")
    if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise ConfigError("ids: values do not fit in int64")
    ids = ids.astype(np.int64)
    if ids.size and ids.min() < 0:
        # -1 marks a missing result, so negative user ids would be ambiguous.
        raise ConfigError("ids: user ids must be >= 0 (-1 marks a missing result)")
    all_ids = ids if existing is None else np.concatenate([existing, ids])
    if np.unique(all_ids).size != all_ids.size:
        raise ConfigError("ids: user ids must be unique across the index")
    return ids


def check_ids_mode(mode: bool | None, use_ids: bool) -> None:
    """The id rule of every index: all adds pass ids or none do (``mode`` = what the first add did)."""
    if mode is not None and mode != use_ids:
        raise ConfigError(
            "ids: pass ids to every add() of this index or to none of them "
            f"(this index {'uses' if mode else 'does not use'} user ids)"
        )


def _sort_rows(keys_primary: np.ndarray, internal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (primary key, internal id); padded slots (id -1) go last."""
    missing = internal < 0
    # The missing flag is the most significant key so padding stays at the end whatever its key.
    order = np.lexsort((internal, keys_primary, missing), axis=1)
    return np.take_along_axis(keys_primary, order, 1), np.take_along_axis(internal, order, 1)


_INT32_MAX = int(np.iinfo(np.int32).max)
_ID_BITS = 36  # ids below 2**36 (68.7e9 items) and distances below 2**26 share one int64 sort key
_INT64_MAX = np.iinfo(np.int64).max


def _sort_binary_rows(dist: np.ndarray, internal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_sort_rows` for Hamming results: rows sorted by (distance, id), missing (id -1) last.

    Packs both keys into one int64, ``distance << 36 | id``, and sorts values in place: cheaper than
    the lexsort and its gathers, which matters when a search over a small database takes only
    milliseconds. Falls back to the lexsort for out-of-range values.
    """
    if internal.size == 0 or int(internal.max()) >= 1 << _ID_BITS or int(dist.max()) >= 1 << (62 - _ID_BITS):
        dist = np.where(internal < 0, MISSING_DISTANCE, dist).astype(np.int32)
        return _sort_rows(dist, internal)
    key = (dist.astype(np.int64) << _ID_BITS) | internal
    missing = internal < 0
    if missing.any():  # faiss fills missing slots inconsistently (HNSW uses int32 min): send them last
        key[missing] = _INT64_MAX
    key.sort(axis=1)
    missing = key == _INT64_MAX
    out_dist = np.where(missing, MISSING_DISTANCE, key >> _ID_BITS).astype(np.int32)
    out_ids = np.where(missing, -1, key & ((1 << _ID_BITS) - 1))
    return out_dist, out_ids


def _pad_results(values: np.ndarray, internal: np.ndarray, k: int, missing: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows of fewer than ``k`` results padded to ``k`` with ``(missing, -1)``."""
    short = k - values.shape[1]
    if short <= 0:
        return values, internal
    n = values.shape[0]
    return (np.concatenate([values, np.full((n, short), missing, values.dtype)], axis=1),
            np.concatenate([internal, np.full((n, short), MISSING_ID, np.int64)], axis=1))


def _check_graph_memory(index: Any, n_new: int) -> None:
    """Adding ``n_new`` items to an HNSW index allocates ``~2·M`` neighbour slots per item: refuse an
    ``M`` whose graph cannot fit in memory before faiss grows it."""
    hnsw = getattr(index, "hnsw", None)
    if hnsw is None or not n_new:
        return
    m = int(hnsw.nb_neighbors(1))
    total = int(index.ntotal) + n_new
    item_bytes = getattr(index, "code_size", None) or 4 * int(index.d)  # binary codes / float vectors
    check_memory(total * (_HNSW_BYTES_PER_M * m + int(item_bytes)),
                 f"an HNSW graph of {total} items with M={m}", "use a smaller M")


# --------------------------------------------------------------------------------------------
# file framing


_INDEX_WORDING = Wording(
    missing="{path}: no such index file",
    unreadable="{path}: cannot read the index file ({exc})",
    bad_magic="{path}: not a crossret index file (bad magic bytes)",
    short_prefix="{path}: truncated — the file ends inside the fixed-size prefix",
    newer_version=("{path}: written by a newer crossret format version {version} (this crossret reads up to "
                   "{newest}); upgrade crossret"),
    invalid_version="{path}: invalid format version {version}",
    short_payload="{path}: truncated — the payload has {present} of {declared} bytes; rebuild or re-copy it",
    checksum="{path}: checksum mismatch — the file was altered or corrupted",
)
_INDEX_FIELDS = (("format_version", int), ("kind", str), ("ntotal", int), ("params", dict), ("payload_bytes", int),
                 ("faiss_bytes", int), ("ids_bytes", int), ("sha256", str))
_SIBLINGS = ((_BINARY_MAGIC, "{path}: this is a binary crossret index; load it with BinaryIndex.load"),
             (_DENSE_MAGIC, "{path}: this is a dense crossret index; load it with DenseIndex.load"))
# The file of each index type (crossret.storage.sealed); a header is a few hundred bytes, anything
# far larger is garbage.
_CONTAINERS = {
    magic: Container(magic=magic, version=FORMAT_VERSION, fields=_INDEX_FIELDS, what="index",
                     version_field="format_version", max_header_bytes=1 << 24,
                     siblings=tuple(s for s in _SIBLINGS if s[0] != magic), wording=_INDEX_WORDING)
    for magic in (_BINARY_MAGIC, _DENSE_MAGIC)
}


def _check_index_header(path: Path, header: dict[str, Any], _version: int) -> None:
    """The header checks of an index file beyond the container's: consistent payload sizes, a kind."""
    if header["faiss_bytes"] + header["ids_bytes"] != header["payload_bytes"] or min(
        header["faiss_bytes"], header["ids_bytes"], header["ntotal"]
    ) < 0:
        raise FileFormatError(f"{path}: garbage header — inconsistent payload sizes")
    if not header["kind"]:
        raise FileFormatError(f"{path}: garbage header — empty index kind")


def read_index_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a saved index (either type), without loading or verifying the payload."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = _DENSE_MAGIC if handle.read(len(_DENSE_MAGIC)) == _DENSE_MAGIC else _BINARY_MAGIC
            size = os.fstat(handle.fileno()).st_size
            header, _ = _CONTAINERS[magic].read_header(path, handle, size, check=_check_index_header)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read the index file ({exc})") from exc
    header["index_type"] = "dense" if magic == _DENSE_MAGIC else "binary"
    return header


def _split_payload(path: Path, header: dict[str, Any], payload: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    faiss_part = np.frombuffer(payload, dtype=np.uint8, count=header["faiss_bytes"])
    if not header["ids_bytes"]:
        return faiss_part, None
    if header["ids_bytes"] != 8 * header["ntotal"]:
        raise FileFormatError(f"{path}: the stored id map does not have one id per item")
    ids = np.frombuffer(payload, dtype="<i8", offset=header["faiss_bytes"]).astype(np.int64)
    if ids.size and (ids.min() < 0 or np.unique(ids).size != ids.size):
        raise FileFormatError(f"{path}: the stored user ids are negative or repeated")
    return faiss_part, ids


def _check_payload(path: Path, faiss_part: np.ndarray, kind: str, kinds: dict[str, str], dense: bool
                   ) -> dict[str, Any]:
    """The faiss payload's structure (``_faiss_format``) before faiss reads it; its type must be the
    one ``kind`` builds (factory strings: any layout crossret writes)."""
    from crossret.retrieval._faiss_format import FaissLayoutError, check_binary_payload, check_dense_payload

    try:
        info = (check_dense_payload if dense else check_binary_payload)(faiss_part)
    except FaissLayoutError as exc:
        raise FileFormatError(f"{path}: the faiss payload is corrupt or not written by crossret ({exc})") from None
    if kind in kinds and info["type"] != kinds[kind]:
        raise FileFormatError(f"{path}: header says kind {kind!r} but the payload holds a faiss {info['type']} "
                              "index; the file is corrupt")
    return info


def _check_stored_params(path: Path, params: dict[str, Any], allowed: set[str]) -> dict[str, int]:
    """Parameters from a file's header: known names, integers, and no value that makes the first search
    allocate gigabytes (efSearch) or never end (nflip: every key within nflip of b bits is probed)."""
    from crossret.retrieval._faiss_format import MAX_EF, MAX_FLIP_PROBES, flip_probes

    unknown = sorted(set(params) - allowed)
    if unknown:
        raise FileFormatError(f"{path}: garbage header — unknown parameter(s) {', '.join(map(str, unknown))}")
    try:
        checked = {name: _check_int_param(name, value, 0 if name in _ZERO_OK_PARAMS else 1)
                   for name, value in params.items()}
    except ConfigError as exc:
        raise FileFormatError(f"{path}: garbage header — {exc}") from None
    too_large = [name for name in ("efSearch", "efConstruction", "M") if checked.get(name, 0) > MAX_EF]
    if "nflip" in checked and flip_probes(checked.get("b", 64), checked["nflip"]) > MAX_FLIP_PROBES:
        too_large.append("nflip")
    if too_large:
        raise FileFormatError(f"{path}: garbage header — parameter(s) {', '.join(too_large)} far beyond any "
                              f"useful value ({checked})")
    return checked


# --------------------------------------------------------------------------------------------
# shared behaviour


class _FaissIndex:
    """Shared state: the faiss index, an optional user-id map and the save/load plumbing."""

    _MAGIC: ClassVar[bytes]
    _faiss_index: Any
    _ids: np.ndarray | None
    _ids_mode: bool | None  # None until the first add decides whether user ids are used
    kind: str
    params: dict[str, Any]

    @property
    def ntotal(self) -> int:
        """Number of indexed items."""
        return 0 if self._faiss_index is None else int(self._faiss_index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether the index can accept items (always true for flat and HNSW kinds)."""
        return self._faiss_index is not None and bool(self._faiss_index.is_trained)

    @property
    def needs_training(self) -> bool:
        """True until :meth:`train` has been called on a kind that needs it (IVF)."""
        return not self.is_trained

    def __len__(self) -> int:
        return self.ntotal

    def _register_ids(self, ids: Any, n: int) -> None:
        use_ids = ids is not None
        if self.ntotal == 0:  # nothing indexed yet: the first non-empty add decides the mode
            self._ids, self._ids_mode = None, None
        check_ids_mode(self._ids_mode, use_ids)
        if use_ids:
            checked = _check_ids(ids, n, self._ids)
            self._ids = checked if self._ids is None else np.concatenate([self._ids, checked])
        self._ids_mode = use_ids

    def _map_ids(self, internal: np.ndarray) -> np.ndarray:
        if self._ids is None:
            return internal
        return np.where(internal >= 0, self._ids[np.maximum(internal, 0)], MISSING_ID)

    def _require_searchable(self) -> None:
        if not self.is_trained:
            raise ConfigError(
                f"this {self.kind!r} index is not trained; call train() (or build it with a from_* "
                "constructor) before adding or searching"
            )

    def _header(self) -> dict[str, Any]:
        raise NotImplementedError

    def _serialize(self) -> np.ndarray:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (one file, atomically). Returns the path."""
        self._require_searchable()
        faiss_bytes = self._serialize().tobytes()
        ids_bytes = b"" if self._ids is None else self._ids.astype("<i8").tobytes()
        header = self._header()
        header.update(
            kind=self.kind,
            ntotal=self.ntotal,
            params=dict(self.params),
            faiss_version=str(_faiss().__version__),
            faiss_bytes=len(faiss_bytes),
            ids_bytes=len(ids_bytes),
        )
        path = Path(path)
        _CONTAINERS[self._MAGIC].write(path, header, faiss_bytes + ids_bytes)
        return path


# --------------------------------------------------------------------------------------------
# binary index


class BinaryIndex(_FaissIndex):
    """Hamming-distance index over packed binary codes (see the module docstring for kinds)."""

    _MAGIC = _BINARY_MAGIC
    _BUILTIN_PARAMS: ClassVar[dict[str, set[str]]] = {
        "flat": set(),
        "ivf": {"nlist", "nprobe"},
        "hnsw": {"M", "efConstruction", "efSearch"},
        "multihash": {"nhash", "b", "nflip"},
    }
    _FACTORY_PARAMS: ClassVar[set[str]] = {"nprobe", "efSearch"}
    # Parameters that set_params may change on a built index.
    _SEARCH_PARAMS: ClassVar[set[str]] = {"nprobe", "efSearch", "nflip"}

    def __init__(self, bits: int, kind: str = "flat", **params: Any) -> None:
        """An empty index for ``bits``-bit codes. ``params`` are the kind's parameters."""
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0:
            raise CodeError(f"code length must be a positive integer, got {bits!r}")
        if bits > MAX_BITS:
            raise CodeError(f"code length {bits} exceeds the longest supported code length of {MAX_BITS} bits")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"index kind must be a non-empty string, got {kind!r}")
        self.bits = int(bits)
        self.padded_bits = padded_bits(self.bits)
        self.kind = kind
        self._ids = None
        self._ids_mode = None
        allowed = self._BUILTIN_PARAMS.get(kind, self._FACTORY_PARAMS)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for index kind {kind!r}; "
                f"accepted: {', '.join(sorted(allowed)) or 'none'}"
            )
        self.params = {name: _check_int_param(name, value, 0 if name in _ZERO_OK_PARAMS else 1)
                       for name, value in params.items()}
        _check_param_sizes(self.params, self.padded_bits, default_b=min(16, self.bits))
        if kind not in self._BUILTIN_PARAMS:
            _check_factory_sizes(kind, self.padded_bits)
        self._faiss_index = self._build(None)

    # -- construction

    def _build(self, n_train: int | None) -> Any:
        """Create the faiss index; ``None`` when it needs the training-set size (ivf without nlist)."""
        faiss = _faiss()
        d = self.padded_bits
        if self.kind == "flat":
            return _tune_flat(faiss.IndexBinaryFlat(d))
        if self.kind == "ivf":
            if "nlist" not in self.params:
                if n_train is None:
                    return None
                self.params["nlist"] = self.default_nlist(n_train)
            nlist = self.params["nlist"]
            self.params.setdefault("nprobe", min(8, nlist))
            # faiss' Python wrapper keeps a reference to the quantizer for the index's lifetime.
            index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(d), d, nlist)
            index.nprobe = self.params["nprobe"]
            return index
        if self.kind == "hnsw":
            for name, value in _HNSW_DEFAULTS.items():
                self.params.setdefault(name, value)
            index = faiss.IndexBinaryHNSW(d, self.params["M"])
            index.hnsw.efConstruction = self.params["efConstruction"]
            index.hnsw.efSearch = self.params["efSearch"]
            return index
        if self.kind == "multihash":
            return self._build_multihash(d)
        try:
            index = faiss.index_binary_factory(d, self.kind)
        except RuntimeError as exc:
            raise ConfigError(
                f"unknown index kind {self.kind!r}: not one of flat, ivf, hnsw and not a valid faiss "
                f"binary factory string such as 'BIVF1024' or 'BHNSW32' ({str(exc).splitlines()[-1]})"
            ) from None
        self._apply_search_params(index)
        return _tune_flat(index)

    def _build_multihash(self, d: int) -> Any:
        b = self.params.setdefault("b", min(16, self.bits))
        if b > min(self.bits, _MULTIHASH_MAX_B):
            raise ConfigError(f"multihash: b={b} bits per hash key exceeds the {self.bits}-bit code length "
                              f"(or faiss' limit of {_MULTIHASH_MAX_B}); choose b <= {min(self.bits, 64)}")
        nhash = self.params.setdefault("nhash", max(1, self.bits // b))
        if nhash * b > self.bits:
            raise ConfigError(
                f"multihash: nhash·b = {nhash}·{b} = {nhash * b} exceeds the {self.bits}-bit code length; "
                "tables over the zero padding would hold every item in one bucket — lower nhash or b"
            )
        nflip = self.params.setdefault("nflip", 0)
        if nflip > b:
            raise ConfigError(f"multihash: nflip={nflip} cannot exceed b={b} (the bits of one hash key)")
        index = _faiss().IndexBinaryMultiHash(d, nhash, b)
        index.nflip = nflip
        return index

    @staticmethod
    def default_nlist(n: int) -> int:
        """Default IVF list count for ``n`` training codes: ``round(4·sqrt(n))`` within ``[1, n // 39]``."""
        return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39)))

    def _apply_search_params(self, index: Any) -> None:
        if "nprobe" in self.params:
            if not hasattr(index, "nprobe"):
                raise ConfigError(f"nprobe applies to IVF indexes only, not to kind {self.kind!r}")
            index.nprobe = self.params["nprobe"]
        if "efSearch" in self.params:
            if not hasattr(index, "hnsw"):
                raise ConfigError(f"efSearch applies to HNSW indexes only, not to kind {self.kind!r}")
            index.hnsw.efSearch = self.params["efSearch"]
        if "nflip" in self.params:
            if not hasattr(index, "nflip"):
                raise ConfigError(f"nflip applies to multi-hash indexes only, not to kind {self.kind!r}")
            if self.params["nflip"] > int(index.b):
                raise ConfigError(f"nflip={self.params['nflip']} cannot exceed b={int(index.b)}")
            index.nflip = self.params["nflip"]

    def set_params(self, **params: Any) -> None:
        """Change search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW, ``nflip`` for
        multi-hash)."""
        unknown = sorted(set(params) - self._SEARCH_PARAMS)
        if unknown:
            raise ConfigError(f"only nprobe, efSearch and nflip can be changed after building, not {unknown}")
        checked = {name: _check_int_param(name, value, 0 if name in _ZERO_OK_PARAMS else 1)
                   for name, value in params.items()}
        _check_param_sizes({"b": self.params.get("b", 64), **checked}, self.padded_bits)
        old = dict(self.params)
        self.params.update(checked)
        if self._faiss_index is not None:
            try:
                self._apply_search_params(self._faiss_index)
            except ConfigError:
                self.params = old
                self._apply_search_params(self._faiss_index)  # undo a partly applied update
                raise

    @classmethod
    def from_packed(cls, codes: np.ndarray, bits: int, kind: str = "flat", *, ids: Any = None,
                    **params: Any) -> BinaryIndex:
        """Build an index holding ``codes`` (uint8, packed); trains on them when the kind needs it."""
        index = cls(bits, kind, **params)
        if not index.is_trained:
            index.train(codes)
        index.add(codes, ids=ids)
        return index

    # -- input checks

    def _prepare(self, packed: np.ndarray, name: str) -> np.ndarray:
        packed = np.asarray(packed)
        if packed.ndim == 2 and packed.dtype == np.uint8:
            width = packed.shape[1]
            if width not in (packed_width(self.bits), self.padded_bits // 8):
                raise CodeError(
                    f"{name}: rows have {width} bytes (codes of up to {8 * width} bits) but the index "
                    f"holds {self.bits}-bit codes ({packed_width(self.bits)} bytes per row); "
                    "the code lengths do not match"
                )
        checked = check_packed(packed, self.bits, allow_padding=True, name=name)
        return pad_packed(checked, self.bits)

    # -- mutation

    def train(self, packed: np.ndarray) -> None:
        """Train the coarse quantizer (IVF kinds). A no-op for kinds that need no training."""
        codes = self._prepare(packed, "training codes")
        if self._faiss_index is None:
            self._faiss_index = self._build(codes.shape[0])
        if self._faiss_index.is_trained:
            return
        # faiss' binary k-means works on float copies of the training codes
        check_memory(codes.shape[0] * self.padded_bits * 4, f"training {self.kind!r} on {codes.shape[0]} codes",
                     "train on a smaller sample (train_size)")
        nlist = int(getattr(self._faiss_index, "nlist", 1))
        if codes.shape[0] < nlist:
            raise ConfigError(
                f"{self.kind!r} index needs at least nlist={nlist} training codes, got {codes.shape[0]}; "
                "pass fewer lists (nlist=...) or more codes"
            )
        self._faiss_index.train(codes)

    def add(self, packed: np.ndarray, ids: Any = None) -> None:
        """Add packed codes. ``ids`` (int64, unique, >= 0) are returned by search instead of positions."""
        codes = self._prepare(packed, "codes")
        self._require_searchable()
        _check_graph_memory(self._faiss_index, codes.shape[0])
        self._register_ids(ids, codes.shape[0])
        if codes.shape[0]:
            self._faiss_index.add(codes)

    # -- search

    def search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` nearest codes per query: ``(distances int32 (Q, k), ids int64 (Q, k))``."""
        k = _check_k(k)
        queries = self._prepare(packed_queries, "query codes")
        self._require_searchable()
        check_result_slots(k, queries.shape[0], self.ntotal)
        if queries.shape[0] == 0:
            return np.empty((0, k), np.int32), np.empty((0, k), np.int64)
        if self.kind == "flat":
            dist, internal = self._flat_search(queries, k)
        else:
            # faiss sizes its per-query heaps (HNSW: candidate lists) by k: never ask for more than it holds.
            found = min(k, self.ntotal)
            if found:
                dist, internal = self._faiss_index.search(queries, found)
                dist, internal = _sort_binary_rows(dist, internal.astype(np.int64, copy=False))
            else:
                dist, internal = np.empty((queries.shape[0], 0), np.int32), np.empty((queries.shape[0], 0), np.int64)
            dist, internal = _pad_results(dist, internal, k, MISSING_DISTANCE)
        return dist, self._map_ids(internal)

    def _flat_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of the ``flat`` kind with crossret's numba kernels (``hamming_topk``).

        The codes stay in faiss' ``IndexBinaryFlat`` (the saved format is unchanged) and are read in
        place through a zero-copy view of its storage. Results are already in (distance, position)
        order with ``-1`` / :data:`MISSING_DISTANCE` padding. The thread count is capped by faiss'
        OpenMP setting of the calling thread, so ``faiss.omp_set_num_threads`` (the service's
        ``search_threads``) keeps limiting exact search as it did when faiss ran it.
        """
        from crossret.retrieval.hamming import hamming_topk

        faiss = _faiss()
        n = self.ntotal
        q_words = queries.view("<u8")
        if n == 0:
            db_words = np.empty((0, q_words.shape[1]), np.uint64)
        else:
            raw = self._faiss_index
            db_words = faiss.rev_swig_ptr(raw.xb.data(), n * raw.code_size).reshape(n, -1).view("<u8")
        return hamming_topk(q_words, db_words, k, threads=faiss.omp_get_max_threads())

    def range_search(self, packed_queries: np.ndarray, radius: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All items within Hamming distance ``<= radius``.

        Returns ``(lims int64 (Q+1,), distances int32, ids int64)``: the results of query ``i`` are
        ``[lims[i]:lims[i+1]]``, sorted by ``(distance, position)``.
        """
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ConfigError(f"radius must be a non-negative integer Hamming distance, got {radius!r}")
        queries = self._prepare(packed_queries, "query codes")
        self._require_searchable()
        if hasattr(self._faiss_index, "hnsw"):
            raise ConfigError(f"range_search is not supported by the HNSW kind {self.kind!r}; use flat or ivf")
        if queries.shape[0] == 0:
            return np.zeros(1, np.int64), np.empty(0, np.int32), np.empty(0, np.int64)
        # faiss keeps distances strictly below its radius; +1 makes the bound inclusive.
        faiss_radius = int(min(radius, self.padded_bits)) + 1
        lims, dist, internal = self._faiss_index.range_search(queries, faiss_radius)
        lims = lims.astype(np.int64)
        dist = dist.astype(np.int32)
        internal = internal.astype(np.int64)
        query_of = np.repeat(np.arange(queries.shape[0]), np.diff(lims))
        order = np.lexsort((internal, dist, query_of))
        return lims, dist[order], self._map_ids(internal[order])

    # -- persistence

    def _header(self) -> dict[str, Any]:
        return {"index_type": "binary", "bits": self.bits, "padded_bits": self.padded_bits,
                "bit_order": BIT_ORDER}

    def _serialize(self) -> np.ndarray:
        return _faiss().serialize_index_binary(self._faiss_index)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BinaryIndex:
        """Load an index written by :meth:`save`, verifying magic, version, sizes and checksum."""
        path = Path(path)
        header, payload = _CONTAINERS[cls._MAGIC].read(path, check=_check_index_header)
        bits, pbits = header.get("bits"), header.get("padded_bits")
        if not isinstance(bits, int) or bits <= 0 or pbits != padded_bits(bits):
            raise FileFormatError(f"{path}: garbage header — invalid bits/padded_bits ({bits!r}, {pbits!r})")
        if header.get("bit_order") != BIT_ORDER:
            raise FileFormatError(f"{path}: unsupported bit order {header.get('bit_order')!r}")
        faiss_part, ids = _split_payload(path, header, payload)
        kind = header["kind"]
        params = _check_stored_params(path, header["params"], cls._BUILTIN_PARAMS.get(kind, cls._FACTORY_PARAMS))
        _check_payload(path, faiss_part, kind, _BINARY_LAYOUTS, dense=False)
        faiss = _faiss()
        try:
            # faiss' Python wrapper returns the concrete (downcast) class already.
            index = faiss.deserialize_index_binary(faiss_part)
        except RuntimeError as exc:
            raise FileFormatError(f"{path}: the faiss payload cannot be read ({exc})") from None
        if not index.is_trained:
            raise FileFormatError(f"{path}: the stored index is not trained (crossret saves trained indexes only)")
        if index.d != pbits or index.ntotal != header["ntotal"]:
            raise FileFormatError(
                f"{path}: header says {pbits} padded bits and {header['ntotal']} items but the stored "
                f"index has {index.d} bits and {index.ntotal} items"
            )
        _tune_flat(index)  # a search-time setting: faiss does not store it
        obj = cls.__new__(cls)
        obj.bits, obj.padded_bits, obj.kind = bits, pbits, kind
        obj.params = params
        obj._faiss_index = index
        obj._ids = ids
        obj._ids_mode = ids is not None if index.ntotal else None
        try:
            obj._apply_search_params(index)
        except ConfigError as exc:
            raise FileFormatError(f"{path}: stored parameters do not fit the index ({exc})") from None
        return obj

    # -- backend protocol (crossret.retrieval.backend.IndexBackend)

    def stored_items(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every stored code and its user id, in position order: ``(codes uint8 (ntotal,
        packed_width(bits)), ids int64 (ntotal,) or None when positions are the ids)``.

        Kinds that keep a flat copy of the codes (HNSW, multi-hash) read it directly; IVF kinds read
        through a direct map, which this adds to the in-memory index. Raises :class:`ConfigError`
        when the faiss index cannot give its codes back.
        """
        self._require_searchable()
        raw = self._faiss_index
        n = int(raw.ntotal)
        source = raw.storage if hasattr(raw, "storage") else raw
        try:
            codes = source.reconstruct_n(0, n)
        except RuntimeError:
            try:
                source.make_direct_map(True)
                codes = source.reconstruct_n(0, n)
            except (RuntimeError, AttributeError) as exc:
                raise ConfigError(f"index kind {self.kind!r}: cannot read back its codes ({exc})") from None
        codes = np.asarray(codes, dtype=np.uint8).reshape(n, -1)
        ids = None if self._ids is None else self._ids.copy()
        return np.ascontiguousarray(codes[:, : packed_width(self.bits)]), ids

    def close(self) -> None:
        """Nothing to release (the index lives in this process); part of the backend protocol."""

    def __enter__(self) -> BinaryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BinaryIndex(bits={self.bits}, kind={self.kind!r}, ntotal={self.ntotal}, params={self.params})"


# --------------------------------------------------------------------------------------------
# dense index


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a dense index's metadata."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


class DenseIndex(_FaissIndex):
    """Inner-product index for real-valued embeddings; ``normalize=True`` makes it cosine similarity.

    Kinds: ``"flat"`` (``IndexFlatIP``, exact) and ``"hnsw"`` (``IndexHNSWFlat`` with inner product;
    parameters ``M``, ``efConstruction``, ``efSearch``). Search returns ``(scores float32, ids
    int64)``, best first; ties in score come in position order; missing slots are ``(-inf, -1)``.

    ``meta``: an optional JSON object stored in the file's header and read back by :meth:`load`
    (e.g. what the items are: a GCKD gallery's image paths); ``None`` stores nothing.
    """

    _MAGIC = _DENSE_MAGIC
    _KIND_PARAMS: ClassVar[dict[str, set[str]]] = {"flat": set(), "hnsw": set(_HNSW_DEFAULTS)}

    def __init__(self, dim: int, kind: str = "flat", normalize: bool = False, **params: Any) -> None:
        """An empty index for ``dim``-dimensional embeddings."""
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise DataError(f"embedding dimension must be a positive integer, got {dim!r}")
        if kind not in self._KIND_PARAMS:
            raise ConfigError(f"unknown dense index kind {kind!r}; choose 'flat' or 'hnsw'")
        unknown = sorted(set(params) - self._KIND_PARAMS[kind])
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for dense kind {kind!r}; "
                f"accepted: {', '.join(sorted(self._KIND_PARAMS[kind])) or 'none'}"
            )
        self.dim = int(dim)
        self.kind = kind
        self.normalize = bool(normalize)
        self.meta: dict[str, Any] | None = None
        self._ids = None
        self._ids_mode = None
        self.params = {name: _check_int_param(name, value) for name, value in params.items()}
        _check_param_sizes(self.params, 0)
        faiss = _faiss()
        if kind == "flat":
            self._faiss_index = faiss.IndexFlatIP(self.dim)
        else:
            for name, value in _HNSW_DEFAULTS.items():
                self.params.setdefault(name, value)
            self._faiss_index = faiss.IndexHNSWFlat(self.dim, self.params["M"], faiss.METRIC_INNER_PRODUCT)
            self._faiss_index.hnsw.efConstruction = self.params["efConstruction"]
            self._faiss_index.hnsw.efSearch = self.params["efSearch"]

    @classmethod
    def from_embeddings(cls, x: np.ndarray, kind: str = "flat", normalize: bool = False, *,
                        ids: Any = None, **params: Any) -> DenseIndex:
        """Build an index holding the rows of ``x`` (N × dim)."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise DataError(f"embeddings: expected a 2-D array (items x dim), got shape {x.shape}")
        index = cls(x.shape[1], kind, normalize, **params)
        index.add(x, ids=ids)
        return index

    def set_params(self, **params: Any) -> None:
        """Change ``efSearch`` of an HNSW index."""
        if self.kind != "hnsw" or set(params) - {"efSearch"}:
            raise ConfigError("only efSearch of an 'hnsw' dense index can be changed after building")
        if "efSearch" in params:
            ef_search = _check_int_param("efSearch", params["efSearch"])
            _check_param_sizes({"efSearch": ef_search}, 0)
            self.params["efSearch"] = ef_search
            self._faiss_index.hnsw.efSearch = ef_search

    def _prepare(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2:
            raise DataError(f"{name}: expected a 2-D array (items x {self.dim}), got shape {x.shape}")
        if x.dtype.kind not in "fiu":
            raise DataError(f"{name}: expected real-valued numbers, got dtype {x.dtype}")
        if x.shape[1] != self.dim:
            raise DataError(f"{name}: have dimension {x.shape[1]} but the index holds {self.dim}-d embeddings")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{name}: contain NaN or inf (or values too large for float32)")
        if self.normalize and x.shape[0]:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if np.any(norms == 0):
                raise DataError(f"{name}: contain all-zero rows, which cannot be L2-normalised (normalize=True)")
            x = x / norms
        return x

    def add(self, x: np.ndarray, ids: Any = None) -> None:
        """Add embeddings (N × dim). ``ids`` (int64, unique, >= 0) are returned by search."""
        x = self._prepare(x, "embeddings")
        _check_graph_memory(self._faiss_index, x.shape[0])
        self._register_ids(ids, x.shape[0])
        if x.shape[0]:
            self._faiss_index.add(x)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` best items per query by inner product: ``(scores float32 (Q, k), ids int64 (Q, k))``."""
        k = _check_k(k)
        q = self._prepare(queries, "queries")
        check_result_slots(k, q.shape[0], self.ntotal)
        if q.shape[0] == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        found = min(k, self.ntotal)  # faiss sizes its per-query heaps by k
        if not found:
            return _pad_results(np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64), k,
                                MISSING_SCORE)
        scores, internal = self._faiss_index.search(q, found)
        internal = internal.astype(np.int64, copy=False)
        neg, internal = _sort_rows(-scores, internal)
        scores = np.where(internal < 0, MISSING_SCORE, -neg).astype(np.float32)
        scores, internal = _pad_results(scores, internal, k, MISSING_SCORE)
        return scores, self._map_ids(internal)

    def _header(self) -> dict[str, Any]:
        header: dict[str, Any] = {"index_type": "dense", "dim": self.dim, "metric": "inner_product",
                                  "normalize": self.normalize}
        if self.meta is not None:
            if not isinstance(self.meta, dict):
                raise ConfigError("DenseIndex.meta must be a dict (a JSON object) or None, got "
                                  f"{type(self.meta).__name__}")
            try:
                json.dumps(self.meta, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"DenseIndex.meta must hold JSON values only ({exc})") from None
            header["meta"] = self.meta
            # The payload's SHA-256 does not cover the header: the metadata (gallery paths, model digest) gets
            # its own, so a damaged entry is refused instead of naming the wrong image.
            header["meta_sha256"] = _meta_digest(self.meta)
        return header

    def _serialize(self) -> np.ndarray:
        return _faiss().serialize_index(self._faiss_index)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DenseIndex:
        """Load a dense index written by :meth:`save`, verifying magic, version, sizes and checksum."""
        path = Path(path)
        header, payload = _CONTAINERS[cls._MAGIC].read(path, check=_check_index_header)
        dim, normalize = header.get("dim"), header.get("normalize")
        if not isinstance(dim, int) or dim <= 0 or not isinstance(normalize, bool):
            raise FileFormatError(f"{path}: garbage header — invalid dim/normalize ({dim!r}, {normalize!r})")
        meta = header.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise FileFormatError(f"{path}: garbage header — 'meta' is not a JSON object")
        if meta is not None and header.get("meta_sha256") != _meta_digest(meta):
            raise FileFormatError(f"{path}: the metadata does not match its checksum (a damaged file); rebuild the "
                                  "index")
        if header["kind"] not in cls._KIND_PARAMS:
            raise FileFormatError(f"{path}: unknown dense index kind {header['kind']!r}")
        faiss_part, ids = _split_payload(path, header, payload)
        params = _check_stored_params(path, header["params"], cls._KIND_PARAMS[header["kind"]])
        _check_payload(path, faiss_part, header["kind"], _DENSE_LAYOUTS, dense=True)
        faiss = _faiss()
        try:
            index = faiss.deserialize_index(faiss_part)
        except RuntimeError as exc:
            raise FileFormatError(f"{path}: the faiss payload cannot be read ({exc})") from None
        if not index.is_trained:
            raise FileFormatError(f"{path}: the stored index is not trained (crossret saves trained indexes only)")
        if index.d != dim or index.ntotal != header["ntotal"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise FileFormatError(
                f"{path}: header says {dim}-d inner-product index with {header['ntotal']} items but the "
                f"stored index has d={index.d}, {index.ntotal} items, metric {index.metric_type}"
            )
        obj = cls.__new__(cls)
        obj.dim, obj.kind, obj.normalize = dim, header["kind"], normalize
        obj.meta = meta
        obj.params = params
        obj._faiss_index = index
        obj._ids = ids
        obj._ids_mode = ids is not None if index.ntotal else None
        if obj.kind == "hnsw" and isinstance(obj.params.get("efSearch"), int):
            index.hnsw.efSearch = obj.params["efSearch"]
        return obj

    def __repr__(self) -> str:
        return (f"DenseIndex(dim={self.dim}, kind={self.kind!r}, normalize={self.normalize}, "
                f"ntotal={self.ntotal})")

