"""What the search service holds and does, free of any web framework.

A :class:`Snapshot` is one loaded database: an index (a :class:`~crossret.retrieval.backend.IndexBackend`:
a local :class:`~crossret.retrieval.BinaryIndex` or a Milvus collection), the packed
codes of its items (for search by item id), their labels when known, and the run's fitted model
(to encode raw feature vectors). :class:`ServiceState` owns the current snapshot, answers queries
against it and can :meth:`~ServiceState.reload` a new one: the new snapshot is built completely
first, then swapped in under a lock, so every request works on exactly one snapshot — the old one
or the new one, never a mix.

Everything a request can get wrong raises :class:`RequestError` (an HTTP status, a short kind and a
message naming the problem); loading a bad run directory or index raises the usual
:class:`~crossret.errors.CrossretError` subclasses. Nothing here writes a file or prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import CodeError, ConfigError, CrossretError, DataError, FileFormatError
from crossret.storage.safe_read import load_npy

__all__ = [
    "CODE_FORMATS",
    "DATABASES",
    "Query",
    "RequestError",
    "ServiceLimits",
    "ServiceState",
    "Snapshot",
    "check_deadline",
    "load_snapshot",
    "timeout_error",
]

#: ``--database`` choice -> the run's ``codes/<name>_codes.npy`` (cross: the source; single: the target train set).
DATABASES = {"cross": "source", "single": "target_train"}

#: How query codes may be written (documented in docs/serve.md).
CODE_FORMATS = {
    "code": "list of L integers, all ±1 or all 0/1 (bit j of the code is element j)",
    "hex": "packed code as 2*ceil(L/8) hex digits: byte i holds bits 8i..8i+7, least significant bit first "
           "(faiss bit order; numpy.packbits(bits, bitorder='little').tobytes().hex())",
}

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_QUERY_KINDS = ("features", "code", "hex", "id")

#: Largest accepted ``request_timeout`` (one day): a timeout is meant to bound a request, not to disable it.
MAX_REQUEST_TIMEOUT = 86_400.0

#: Queries searched per index call when a request has a deadline: between chunks the deadline is checked,
#: so a request that timed out stops computing soon after (its answer was already a 503).
_SEARCH_CHUNK = 256


class RequestError(CrossretError):
    """A request the service refuses: ``status`` (HTTP 4xx, or 503 for a timeout), ``kind`` (machine-readable),
    message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.kind = kind
        self.message = message


def timeout_error(timeout: float) -> RequestError:
    """The 503 answer for a request that did not finish within the service's request timeout."""
    return RequestError(503, "timeout", f"the request did not finish within the service's request timeout of "
                        f"{timeout:g} s (the service is busy, or the request is too large); retry later, or send "
                        "fewer queries or a smaller k")


def check_deadline(deadline: float | None, timeout: float) -> None:
    """Raise :func:`timeout_error` once ``time.monotonic()`` has passed ``deadline`` (None: no deadline)."""
    if deadline is not None and time.monotonic() > deadline:
        raise timeout_error(timeout)


def _default_max_concurrent() -> int:
    return max(2, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what one request may ask for and how long it may take (exceeding one is a 4xx/503 error).

    max_k: most results per query (k is also capped by the index size).
    max_batch: most queries in one request (checked while the body is parsed).
    max_body_bytes: largest request body; larger bodies get 413 before any parsing.
    max_results: most results in one response (queries x k), bounding the response size.
    request_timeout: seconds from the moment a request's head has arrived until its answer is ready:
        a body not received by then gets 408, a search not finished by then 503 (error ``timeout``).
    max_concurrent: most requests parsed and searched at once; the others wait for a slot (within
        ``request_timeout``). Bounds the CPU and memory a burst of large requests can take.
    """

    max_k: int = 1000
    max_batch: int = 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_results: int = 200_000
    request_timeout: float = 30.0
    max_concurrent: int = field(default_factory=_default_max_concurrent)

    def validate(self) -> ServiceLimits:
        for name, minimum in (("max_k", 1), ("max_batch", 1), ("max_body_bytes", 64), ("max_results", 1),
                              ("max_concurrent", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfigError(f"service limit {name} must be an integer >= {minimum}, got {value!r}")
        timeout = self.request_timeout
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating))
                or not math.isfinite(timeout) or not 0 < timeout <= MAX_REQUEST_TIMEOUT):
            raise ConfigError(f"service limit request_timeout must be a number of seconds in (0, "
                              f"{MAX_REQUEST_TIMEOUT:g}], got {timeout!r}")
        return self

    def to_dict(self) -> dict[str, int | float]:
        return {k: (float(v) if k == "request_timeout" else int(v)) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Query:
    """One query of a batch: ``kind`` is ``features``, ``code``, ``hex`` or ``id``; ``where`` names it
    in error messages (e.g. ``features[3]`` or ``queries[3].hex``)."""

    kind: str
    value: Any
    where: str
    exclude_self: bool = False


# --------------------------------------------------------------------------------------------
# snapshot


@dataclass
class Snapshot:
    """One loaded database, immutable once built (requests only read it)."""

    index: Any  # an IndexBackend (crossret.retrieval.backend)
    bits: int
    codes: np.ndarray  # packed uint8 (N, ceil(bits/8)), row = index position
    item_ids: np.ndarray | None  # the index's own ids per position; None: item id == position
    labels: np.ndarray | None  # int64 per position, -1 = unknown; None: no labels for this database
    model: Any | None  # fitted HashMethod, or None (no feature search)
    meta: dict[str, Any]
    generation: int = 0
    # Encoding goes through torch/numpy code that flips process-wide settings (torch thread count);
    # one encode at a time keeps concurrent requests from racing on them. Searches need no lock.
    encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _sorted_ids: np.ndarray | None = field(default=None, repr=False)
    _sorted_pos: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.item_ids is not None:
            order = np.argsort(self.item_ids, kind="stable")
            self._sorted_ids, self._sorted_pos = self.item_ids[order], order.astype(np.int64)

    @property
    def size(self) -> int:
        return int(self.codes.shape[0])

    @property
    def feature_dim(self) -> int | None:
        return None if self.model is None else int(self.model.input_dim)

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Index positions of item ids; ``-1`` where an id is not in the database."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._sorted_ids is None:
            return np.where((ids >= 0) & (ids < self.size), ids, -1)
        assert self._sorted_pos is not None
        slot = np.clip(np.searchsorted(self._sorted_ids, ids), 0, max(self.size - 1, 0))
        found = self._sorted_ids[slot] == ids
        return np.where(found, self._sorted_pos[slot], -1)


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return load_npy(path, what, missing=f"{path}: missing {what}; is this a finished crossret run directory?")
    except DataError as exc:
        if not path.is_file():
            raise
        raise FileFormatError(str(exc)) from exc


def _load_model(run_dir: Path) -> Any | None:
    """The run's fitted method (``model.npz`` / ``model.pt``), or None when the run saved none."""
    from crossret.hashing.registry import load_method
    from crossret.runs import find_model_file

    path = find_model_file(run_dir)
    return None if path is None else load_method(path)


def _stored_items(index: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Packed codes and ids of every item of an opened index, in position order (for search by item id)."""
    try:
        return index.stored_items()
    except ConfigError as exc:
        raise FileFormatError(f"{exc}; search by item id needs them — serve the run directory without "
                              "--index") from None


def _run_meta(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("method", "benchmark", "bits", "seed", "split_seed", "ties", "map_cross", "map_single",
            "n_queries", "n_source", "n_target_train", "train_seconds")
    return {k: metrics[k] for k in keys if k in metrics}


def load_snapshot(run_dir: str | Path | None, *, database: str = "cross", index: str | Path | None = None,
                  kind: str = "flat", generation: int = 0, backend: str = "local",
                  backend_options: dict[str, Any] | None = None) -> Snapshot:
    """Load a finished run directory (model, database codes and labels) and/or a saved index.

    Without ``index`` a local ``kind`` index is built over the run's ``database`` codes (item id = row
    of ``codes/<source|target_train>_codes.npy``). With ``index`` (opened by
    :func:`crossret.retrieval.backend.open_index` with ``backend`` and ``backend_options``; for
    ``milvus`` a ``collection`` option may stand in for the locator file) its items and ids are
    served; labels come from the run's database when the index holds exactly those codes in the same
    order.
    """
    from crossret.retrieval.backend import check_backend, open_index
    from crossret.retrieval.index import BinaryIndex
    from crossret.retrieval.packing import as_pm1, pack_codes

    if database not in DATABASES:
        raise ConfigError(f"database must be one of {', '.join(DATABASES)}, got {database!r}")
    backend = check_backend(backend)
    options = dict(backend_options or {})
    located = index is not None or (backend != "local" and options.get("collection") is not None)
    if backend != "local" and not located:
        raise ConfigError(f"--backend {backend}: give --index LOCATOR (the file `crossret index build --backend "
                          f"{backend}` wrote) or --collection NAME")
    if run_dir is None and not located:
        raise ConfigError("give a run directory, an index file (--index), or both")
    meta: dict[str, Any] = {"database": database if run_dir is not None else None, "run": None,
                            "run_dir": None, "index_file": None, "labels_note": None}
    bits: int | None = None
    run_codes = run_labels = None
    model = None
    if run_dir is not None:
        from crossret.experiment import read_run_metrics
        from crossret.runs import run_file

        run_path = Path(run_dir)
        if not run_path.is_dir():
            raise DataError(f"{run_path}: not a directory; give a run directory written by `crossret run`")
        metrics = read_run_metrics(run_path)
        bits = metrics.get("bits")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
            raise FileFormatError(f"{run_path / 'metrics.json'}: missing or invalid 'bits' ({bits!r})")
        name = DATABASES[database]
        codes_file = run_file(run_path, "codes", f"{name}_codes.npy")
        labels_file = run_file(run_path, "codes", f"{name}_labels.npy")
        try:
            pm1 = as_pm1(_load_npy(codes_file, f"{database}-domain database codes"),
                         name=f"{run_path}/codes/{name}_codes.npy")
        except CodeError as exc:
            raise FileFormatError(str(exc)) from None
        if pm1.shape[1] != bits:
            raise FileFormatError(f"{run_path}/codes/{name}_codes.npy: {pm1.shape[1]}-bit codes but the run has "
                                  f"{bits} bits")
        run_codes = pack_codes(pm1) if pm1.shape[0] else np.zeros((0, (bits + 7) // 8), np.uint8)
        labels = _load_npy(labels_file, f"{database}-domain database labels")
        if labels.ndim != 1 or labels.shape[0] != pm1.shape[0] or labels.dtype.kind not in "iu":
            raise FileFormatError(f"{run_path}/codes/{name}_labels.npy: expected {pm1.shape[0]} integer labels, "
                                  f"got shape {labels.shape} dtype {labels.dtype}")
        run_labels = labels.astype(np.int64)
        model = _load_model(run_path)
        if model is not None and model.bits != bits:
            raise FileFormatError(f"{run_path}: the model makes {model.bits}-bit codes but the run has {bits} bits")
        meta.update(run=_run_meta(metrics), run_dir=run_path.name)

    if located:
        index_path = Path(index) if index is not None else None
        built = open_index(index_path, backend=backend, **options)
        try:
            # A collection opened without a locator file is named by the collection.
            label = str(index_path) if index_path is not None else f"collection {built.collection!r}"
            if bits is not None and built.bits != bits:
                raise ConfigError(f"{label}: holds {built.bits}-bit codes but the run has {bits}-bit codes; "
                                  "serve an index built from this run")
            bits = int(built.bits)
            codes, item_ids = _stored_items(built)
        except BaseException:
            built.close()
            raise
        labels_out = None
        if run_codes is not None:
            if run_codes.shape == codes.shape and np.array_equal(run_codes, codes):
                labels_out = run_labels
            else:
                meta["labels_note"] = (f"the index does not hold the run's {database}-domain codes in their order; "
                                       "labels are not served")
        meta["index_file"] = index_path.name if index_path is not None else built.collection
    else:
        assert bits is not None and run_codes is not None
        built = BinaryIndex.from_packed(run_codes, bits, kind=kind)
        codes, item_ids, labels_out = run_codes, None, run_labels
    if codes.shape[0] == 0:
        built.close()
        raise DataError("the database holds no codes; nothing to search")
    meta["kind"] = built.kind
    return Snapshot(index=built, bits=int(bits), codes=codes, item_ids=item_ids, labels=labels_out, model=model,
                    meta=meta, generation=generation)


# --------------------------------------------------------------------------------------------
# request handling


def _short(value: Any, limit: int = 40) -> str:
    """``str(value)`` cut to ``limit`` characters: error messages stay short whatever a client sends."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))



def check_k(k: Any, limits: ServiceLimits, available: int, what: str, n_queries: int, unit: str) -> int:
    """``k`` of a request as an int, or a 422 :class:`RequestError`: an integer in ``[1, max_k]``, at most
    ``available`` (``what`` names that bound), and ``n_queries × k`` within ``max_results``."""
    if not _is_int(k):
        raise RequestError(422, "invalid_k", f"k must be an integer, got {_short(repr(k))}")
    k = int(k)
    if k < 1:
        raise RequestError(422, "invalid_k", f"k must be >= 1, got {_short(k)}")
    if k > limits.max_k:
        raise RequestError(422, "invalid_k", f"k={_short(k)} exceeds the service limit max_k={limits.max_k}")
    if k > available:
        raise RequestError(422, "invalid_k", f"k={k} exceeds {what}")
    if k * n_queries > limits.max_results:
        raise RequestError(422, "too_many_results",
                           f"{n_queries} {unit} x k={k} = {k * n_queries} results exceeds the limit of "
                           f"{limits.max_results} results per response; lower k or split the batch")
    return k

class ServiceState:
    """The service's current snapshot, its limits, and the query logic.

    ``run_dir``/``database``/``index``/``kind`` are as in :func:`load_snapshot`. ``search_threads``:
    faiss OpenMP threads per search (set in each thread that searches; ``None`` leaves faiss' default).
    """

    def __init__(self, run_dir: str | Path | None, *, database: str = "cross", index: str | Path | None = None,
                 kind: str = "flat", limits: ServiceLimits | None = None, search_threads: int | None = 1,
                 backend: str = "local", backend_options: dict[str, Any] | None = None) -> None:
        self.limits = (limits or ServiceLimits()).validate()
        if backend == "milvus":
            from crossret.retrieval.milvus import MAX_TOPK

            # exclude_self searches k + 1 results.
            if self.limits.max_k + 1 > MAX_TOPK:
                raise ConfigError(f"max_k={self.limits.max_k} (--max-k): the milvus backend returns at most {MAX_TOPK} "
                                  f"results per query; use --max-k {MAX_TOPK - 1} or less")
        if search_threads is not None and (not _is_int(search_threads) or search_threads < 1):
            raise ConfigError(f"search_threads must be an integer >= 1 or None, got {search_threads!r}")
        self.search_threads = search_threads
        self._thread_settings = threading.local()
        self._sources = {"run_dir": run_dir, "database": database, "index": index, "kind": kind}
        # Where indexes come from stays fixed across reloads.
        self._backend = {"backend": backend, "backend_options": dict(backend_options or {})}
        self._lock = threading.Lock()
        self._snapshot = load_snapshot(run_dir, database=database, index=index, kind=kind, generation=0,
                                       **self._backend)

    # -- snapshot management

    def snapshot(self) -> Snapshot:
        """The current snapshot; a request takes it once and uses only it."""
        with self._lock:
            return self._snapshot

    def reload(self, run_dir: str | Path | None = None, *, database: str | None = None,
               index: str | Path | None = None, kind: str | None = None) -> dict[str, Any]:
        """Load a new snapshot (arguments default to the current sources) and swap it in atomically.

        The new snapshot is built outside the lock, so requests keep being served by the old one
        meanwhile; if loading fails the old one stays and the error propagates. Returns :meth:`info`.
        """
        sources = dict(self._sources)
        for key, value in (("run_dir", run_dir), ("database", database), ("index", index), ("kind", kind)):
            if value is not None:
                sources[key] = value
        with self._lock:
            generation = self._snapshot.generation + 1
        fresh = load_snapshot(sources["run_dir"], database=sources["database"], index=sources["index"],
                              kind=sources["kind"], generation=generation, **self._backend)
        with self._lock:
            # Keep generations increasing even if two reloads race.
            fresh.generation = max(generation, self._snapshot.generation + 1)
            self._snapshot, self._sources = fresh, sources
        return self.info()

    # -- read-only views

    def health(self) -> dict[str, Any]:
        snap = self.snapshot()
        return {"status": "ok", "size": snap.size, "bits": snap.bits, "generation": snap.generation}

    def info(self) -> dict[str, Any]:
        from crossret import __version__

        snap = self.snapshot()
        run = snap.meta.get("run") or {}
        return {
            "service": "crossret",
            "version": __version__,
            "bits": snap.bits,
            "size": snap.size,
            "kind": snap.meta.get("kind"),
            "method": run.get("method"),
            "database": snap.meta.get("database"),
            "feature_dim": snap.feature_dim,
            "feature_search": snap.model is not None,
            "labels_known": snap.labels is not None,
            "labels_note": snap.meta.get("labels_note"),
            "item_ids": "index ids" if snap.item_ids is not None else "positions (row of the database codes)",
            "run_dir": snap.meta.get("run_dir"),
            "index_file": snap.meta.get("index_file"),
            "run": snap.meta.get("run"),
            "generation": snap.generation,
            "limits": self.limits.to_dict(),
            "code_formats": dict(CODE_FORMATS),
        }

    # -- search

    def search(self, queries: Sequence[Query], k: Any, *, return_codes: bool = False,
               deadline: float | None = None, snapshot: Snapshot | None = None) -> dict[str, Any]:
        """Answer a batch of queries against one snapshot: per query the ``k`` nearest items by Hamming
        distance (ties by index position), their distances and labels.

        ``deadline`` (a ``time.monotonic()`` value): checked between the stages of the work and between
        chunks of the search; once passed, the search stops with a 503 ``timeout`` :class:`RequestError`.
        ``snapshot``: answer from this snapshot (one the caller took with :meth:`snapshot`) rather than
        the current one.
        """
        snap = snapshot if snapshot is not None else self.snapshot()
        timeout = float(self.limits.request_timeout)
        check_deadline(deadline, timeout)
        queries = list(queries)
        self._check_batch(len(queries))
        excluding = any(q.exclude_self for q in queries)
        k = self._check_k(k, snap, excluding, len(queries))
        packed, self_ids = self._encode_queries(snap, queries)
        check_deadline(deadline, timeout)
        k_search = min(k + 1, snap.size) if excluding else k
        self._limit_search_threads()
        if deadline is None or len(queries) <= _SEARCH_CHUNK:
            distances, ids = snap.index.search(packed, k_search)
        else:
            parts = []
            for start in range(0, len(queries), _SEARCH_CHUNK):
                check_deadline(deadline, timeout)
                parts.append(snap.index.search(packed[start:start + _SEARCH_CHUNK], k_search))
            distances = np.concatenate([d for d, _ in parts])
            ids = np.concatenate([i for _, i in parts])
        check_deadline(deadline, timeout)
        results = []
        for row, query in enumerate(queries):
            keep = ids[row] >= 0  # approximate kinds may find fewer than k items
            if query.exclude_self:
                keep &= ids[row] != self_ids[row]
            row_ids, row_dist = ids[row][keep][:k], distances[row][keep][:k]
            result: dict[str, Any] = {"ids": row_ids.tolist(), "distances": row_dist.tolist(),
                                      "labels": self._labels_of(snap, row_ids)}
            if return_codes:
                result["query_hex"] = packed[row].tobytes().hex()
            results.append(result)
        return {"k": k, "bits": snap.bits, "size": snap.size, "generation": snap.generation, "results": results}

    def _limit_search_threads(self) -> None:
        """Cap faiss' OpenMP threads in the calling thread (the setting is per thread).

        A server runs many small searches at once and concurrent requests already use the cores; an
        OpenMP team per small search mostly waits for its threads (docs/scale.md, "Threads").
        """
        if self.search_threads is None or getattr(self._thread_settings, "threads", None) == self.search_threads:
            return
        import faiss

        faiss.omp_set_num_threads(self.search_threads)
        self._thread_settings.threads = self.search_threads

    def _check_batch(self, n: int) -> None:
        if n == 0:
            raise RequestError(422, "empty_batch", "the request holds no queries; send at least one")
        if n > self.limits.max_batch:
            raise RequestError(422, "batch_too_large",
                               f"batch of {n} queries exceeds the limit of {self.limits.max_batch} queries per "
                               "request; split it")

    def _check_k(self, k: Any, snap: Snapshot, excluding: bool, n_queries: int) -> int:
        available = snap.size - 1 if excluding else snap.size
        what = "the index size: it holds " + str(available) + (" other items (exclude_self)" if excluding else " items")
        return check_k(k, self.limits, available, what, n_queries, "queries")

    def _encode_queries(self, snap: Snapshot, queries: list[Query]) -> tuple[np.ndarray, np.ndarray]:
        """Packed query codes ``(Q, ceil(L/8))`` and, per query, the item id it excludes (or -2)."""
        from crossret.retrieval.packing import packed_width

        width = packed_width(snap.bits)
        packed = np.zeros((len(queries), width), dtype=np.uint8)
        self_ids = np.full(len(queries), -2, dtype=np.int64)  # -2 matches no result (missing slots are -1)
        groups: dict[str, list[int]] = {kind: [] for kind in _QUERY_KINDS}
        for row, query in enumerate(queries):
            if query.kind not in groups:
                raise RequestError(422, "invalid_query", f"{query.where}: unknown query kind {query.kind!r}")
            if query.exclude_self and query.kind != "id":
                raise RequestError(422, "invalid_query",
                                   f"{query.where}: exclude_self applies to queries by item id only")
            groups[query.kind].append(row)
        if groups["features"]:
            rows = groups["features"]
            packed[rows] = self._encode_features(snap, [queries[r] for r in rows])
        if groups["code"]:
            rows = groups["code"]
            packed[rows] = self._pack_code_lists(snap, [queries[r] for r in rows])
        for row in groups["hex"]:
            packed[row] = self._parse_hex(snap, queries[row])
        if groups["id"]:
            rows = groups["id"]
            ids = [queries[r].value for r in rows]
            for r, value in zip(rows, ids, strict=True):
                if not _is_int(value):
                    raise RequestError(422, "invalid_id", f"{queries[r].where}: an item id is an integer, "
                                       f"got {_short(repr(value))}")
                if value < 0:
                    raise RequestError(422, "invalid_id", f"{queries[r].where}: item ids are >= 0, got {_short(value)}")
            # Ids beyond int64 cannot exist in the index; map them to an impossible id before numpy sees them.
            as_int = np.array([v if v <= np.iinfo(np.int64).max else -1 for v in ids], dtype=np.int64)
            positions = snap.positions_of(as_int)
            unknown = [(queries[r].where, v) for r, v, p in zip(rows, ids, positions, strict=True) if p < 0]
            if unknown:
                shown = ", ".join(f"{where}={_short(value)}" for where, value in unknown[:5])
                more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
                valid = "the index's own ids" if snap.item_ids is not None else f"ids 0..{snap.size - 1}"
                raise RequestError(404, "unknown_id", f"unknown item id(s): {shown}{more}; the database has "
                                   f"{snap.size} items ({valid})")
            packed[rows] = snap.codes[positions]
            self_ids[rows] = as_int
        return packed, self_ids

    def _encode_features(self, snap: Snapshot, queries: list[Query]) -> np.ndarray:
        from crossret.retrieval.packing import pack_codes

        if snap.model is None:
            raise RequestError(422, "no_model", "search by features needs the run's fitted model, and this service "
                               "has none (started from an index alone, or the run saved no model.*); send codes")
        dim = snap.feature_dim
        for query in queries:
            value = query.value
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise RequestError(422, "invalid_features", f"{query.where}: expected a list of {dim} numbers")
            if len(value) != dim:
                raise RequestError(422, "dimension_mismatch",
                                   f"{query.where}: has {len(value)} values but the model expects feature vectors "
                                   f"of dimension {dim}")
        try:
            raw = np.asarray([q.value for q in queries])
        except (TypeError, ValueError, OverflowError):
            raw = np.asarray([["?"]])
        # Strings, booleans, nested lists and mixed objects all end up with a non-numeric dtype.
        if raw.ndim != 2 or raw.dtype.kind not in "iuf":
            raise RequestError(422, "invalid_features", "feature vectors must hold numbers only")
        matrix = raw.astype(np.float64)
        bad = ~np.isfinite(matrix) | (np.abs(matrix) > _FLOAT32_MAX)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise RequestError(422, "non_finite", f"{queries[row].where}[{col}] = {float(matrix[row, col])!r}: "
                               "feature values must be finite numbers within float32 range")
        with snap.encode_lock:
            try:
                codes = snap.model.encode(matrix.astype(np.float32))
            except DataError as exc:  # the model's own checks, e.g. values its normaliser cannot take
                raise RequestError(422, "invalid_features", str(exc)) from None
        return pack_codes(codes)

    def _pack_code_lists(self, snap: Snapshot, queries: list[Query]) -> np.ndarray:
        from crossret.retrieval.packing import pack_codes

        for query in queries:
            value = query.value
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise RequestError(422, "invalid_code", f"{query.where}: expected a list of {snap.bits} integers")
            if len(value) != snap.bits:
                raise RequestError(422, "code_length",
                                   f"{query.where}: has {len(value)} values but the index holds {snap.bits}-bit codes")
        try:
            matrix = np.asarray([q.value for q in queries])
        except (TypeError, ValueError, OverflowError):
            matrix = np.asarray([[0.5]])
        if matrix.ndim != 2 or matrix.dtype.kind not in "iu":
            raise RequestError(422, "invalid_code", "codes must be lists of small integers (±1 or 0/1)")
        plus_minus = np.all((matrix == 1) | (matrix == -1), axis=1)
        zero_one = np.all((matrix == 0) | (matrix == 1), axis=1)
        bad = np.flatnonzero(~(plus_minus | zero_one))
        if bad.size:
            row = int(bad[0])
            found = sorted(set(np.unique(matrix[row]).tolist()))[:6]
            raise RequestError(422, "invalid_code",
                               f"{queries[row].where}: values must be all ±1 or all 0/1, found {found}")
        return pack_codes(np.where(matrix > 0, 1, -1))

    def _parse_hex(self, snap: Snapshot, query: Query) -> np.ndarray:
        from crossret.retrieval.packing import check_packed, packed_width

        width = packed_width(snap.bits)
        text = query.value
        if not isinstance(text, str):
            raise RequestError(422, "invalid_hex", f"{query.where}: expected a hex string")
        if len(text) != 2 * width:
            raise RequestError(422, "code_length",
                               f"{query.where}: has {len(text)} hex digits but a {snap.bits}-bit code takes "
                               f"{2 * width} ({width} bytes)")
        if not all(c in string.hexdigits for c in text):  # bytes.fromhex alone would skip spaces
            raise RequestError(422, "invalid_hex", f"{query.where}: not a hex string (digits 0-9, a-f only)")
        row = np.frombuffer(bytes.fromhex(text), dtype=np.uint8).reshape(1, width)
        try:
            check_packed(row, snap.bits, name=query.where)
        except CodeError as exc:
            raise RequestError(422, "invalid_hex", str(exc)) from None
        return row[0]

    @staticmethod
    def _labels_of(snap: Snapshot, ids: np.ndarray) -> list[int | None] | None:
        if snap.labels is None:
            return None
        positions = snap.positions_of(ids)
        labels = snap.labels[positions]
        return [int(v) if v >= 0 else None for v in labels.tolist()]
