"""Index backends: one protocol for where packed binary codes are stored and searched, chosen by name.

:class:`IndexBackend` is what the command line, the search service and library code need from a
Hamming index. Two backends implement it; ``--backend NAME`` (and ``backend=`` below) picks one:

``"local"`` (default)
    :class:`crossret.retrieval.index.BinaryIndex`: faiss index kinds (``flat`` searched by
    crossret's numba kernels, ``ivf``, ``hnsw``, ``multihash``, factory strings) in this process.
    ``save`` writes one checksummed ``.crbi`` file, ``load`` reads it back.
``"milvus"``
    :class:`crossret.retrieval.milvus.MilvusBinaryIndex`: a Milvus collection (kinds ``flat`` and
    ``ivf``; the ``milvus`` extra). ``save`` flushes the collection and writes a JSON *locator*
    file naming it; ``load`` connects to the collection a locator names, or to ``collection=``.

Both take packed uint8 codes (:func:`crossret.retrieval.packing.as_packed`), return ids that are
insertion positions unless ids were given to ``add``, and order each query's results by
``(distance, position)`` with ``-1`` / ``MISSING_DISTANCE`` padding; ``flat`` gives the same top k on
both, ties included. Nothing here imports faiss or pymilvus until an index is made.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from crossret.errors import ConfigError, FileFormatError
from crossret.extras import require
from crossret.progress import ProgressFn, no_progress

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "IndexBackend",
    "build_index",
    "check_backend",
    "create_index",
    "get_backend",
    "open_index",
    "refuse_locator",
]

#: Backend name -> (module, class). The order is the order choices are listed in messages.
_CLASSES: dict[str, tuple[str, str]] = {
    "local": ("crossret.retrieval.index", "BinaryIndex"),
    "milvus": ("crossret.retrieval.milvus", "MilvusBinaryIndex"),
}
BACKENDS: tuple[str, ...] = tuple(_CLASSES)
DEFAULT_BACKEND = "local"


@runtime_checkable
class IndexBackend(Protocol):
    """A Hamming index over packed binary codes of ``bits`` bits.

    Shapes: ``packed`` is uint8 ``(N, ceil(bits/8))`` (or zero-padded to 64 bits); results of
    ``search`` are ``(distances int32 (Q, k), ids int64 (Q, k))``, of ``range_search``
    ``(lims int64 (Q+1,), distances int32, ids int64)`` with query ``i``'s items at
    ``[lims[i]:lims[i+1]]`` (every item at distance ``<= radius``).
    """

    bits: int
    kind: str
    params: dict[str, Any]

    @property
    def ntotal(self) -> int:
        """Number of stored items."""
        ...

    def add(self, packed: np.ndarray, ids: Any = None) -> None:
        """Append codes; ``ids`` (unique int64 >= 0, on every add or none) replace positions in results."""
        ...

    def search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items per query."""
        ...

    def range_search(self, packed_queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every item within Hamming distance ``radius`` of each query."""
        ...

    def stored_items(self) -> tuple[np.ndarray, np.ndarray | None]:
        """All codes ``(ntotal, ceil(bits/8))`` and ids (None: positions) in position order."""
        ...

    def save(self, path: str | os.PathLike) -> Path:
        """Persist the index and write ``path`` (the index file, or a locator naming where it lives)."""
        ...

    @classmethod
    def load(cls, path: str | os.PathLike) -> IndexBackend:
        """Open what :meth:`save` wrote."""
        ...

    def close(self) -> None:
        """Release connections (a no-op for an index in this process)."""
        ...


def check_backend(name: Any) -> str:
    """``name`` when it is a backend name, else a one-line :class:`ConfigError` listing the choices."""
    if not isinstance(name, str) or name not in _CLASSES:
        raise ConfigError(f"--backend {name!r}: unknown index backend; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend(name: str) -> type:
    """The index class of backend ``name``; :class:`~crossret.errors.MissingExtraError` for ``milvus``
    without pymilvus."""
    name = check_backend(name)
    if name == "milvus":
        require("milvus", "pymilvus")
    module, attr = _CLASSES[name]
    return getattr(importlib.import_module(module), attr)


def _no_options(backend: str, options: dict[str, Any], what: str) -> None:
    if options:
        raise ConfigError(f"the {backend} backend takes no {what} ({', '.join(sorted(options))}); they apply to "
                          "--backend milvus")


def refuse_locator(path: str | os.PathLike) -> None:
    """A :class:`FileFormatError` when ``path`` is a Milvus locator file given where a local index file
    belongs (the local reader would only say "bad magic bytes"); nothing for any other file."""
    from crossret.retrieval.milvus import LOCATOR_PREFIX

    try:
        with open(path, "rb") as handle:
            head = handle.read(len(LOCATOR_PREFIX))
    except OSError:
        return  # the reader reports a missing or unreadable file in its own words
    if head == LOCATOR_PREFIX:
        raise FileFormatError(f"{path}: is a Milvus locator file, not a local index file; open it with --backend "
                              "milvus")


def open_index(location: str | os.PathLike | None = None, *, backend: str = DEFAULT_BACKEND,
               **options: Any) -> IndexBackend:
    """Open a saved index: ``location`` is what ``save`` wrote (a ``.crbi`` file; for ``milvus`` a
    locator file, or None with ``collection=``). ``options`` (``milvus`` only): ``collection``,
    ``uri``, ``host``, ``port``, ``token``, ``db_name``, ``client``, ``timeout``, ``exact_ties``,
    ``consistency_level``, ``nprobe``; they replace what a locator says."""
    cls = get_backend(backend)
    if backend == "local":
        _no_options(backend, options, "connection options")
        if location is None:
            raise ConfigError("give the index file to open (the local backend reads a .crbi file)")
        refuse_locator(location)
        return cls.load(location)
    return cls.load(location, **options)


def create_index(bits: int, kind: str = "flat", *, backend: str = DEFAULT_BACKEND, **options: Any) -> IndexBackend:
    """A new, empty index for ``bits``-bit codes. ``options``: the kind's parameters, and for ``milvus``
    the connection and collection options of :class:`~crossret.retrieval.milvus.MilvusBinaryIndex`."""
    return get_backend(backend)(bits, kind, **options)


def build_index(codes: Any, bits: int | None = None, kind: str = "flat", *, backend: str = DEFAULT_BACKEND,
                params: dict[str, Any] | None = None, batch_size: int | None = None, train_size: int | None = None,
                seed: int = 0, ids: Any = None, progress: ProgressFn = no_progress, **options: Any) -> IndexBackend:
    """An index holding packed ``codes`` (a packed-codes ``.npy`` path, memory-mapped, or a uint8
    array), added ``batch_size`` rows at a time (default ``DEFAULT_ADD_BATCH``).

    ``params``: the kind's parameters; IVF's default ``nlist`` comes from the full size N on both
    backends. ``local``: :func:`crossret.retrieval.streaming.build_index_from_packed` (IVF trained on
    a sample of ``train_size`` codes drawn with ``seed``). ``milvus``: a new collection (``options``
    as :class:`~crossret.retrieval.milvus.MilvusBinaryIndex`), flushed and loaded when built; Milvus
    trains IVF lists itself, so ``train_size`` is refused and ``seed`` unused.
    """
    from crossret.retrieval.streaming import DEFAULT_ADD_BATCH, build_index_from_packed, check_build_input

    params = dict(params or {})
    batch_size = DEFAULT_ADD_BATCH if batch_size is None else batch_size
    cls = get_backend(backend)
    if backend == "local":
        _no_options(backend, options, "connection options")
        return build_index_from_packed(codes, bits, kind, batch_size=batch_size, train_size=train_size, seed=seed,
                                       ids=ids, progress=progress, **params)
    if train_size is not None:
        raise ConfigError("train_size (--train-size) applies to the local backend; Milvus trains its IVF lists itself")
    codes, bits, ids = check_build_input(codes, bits, batch_size, ids)
    n = int(codes.shape[0])
    if kind == "ivf" and "nlist" not in params and n:
        from crossret.retrieval.index import BinaryIndex

        params["nlist"] = BinaryIndex.default_nlist(n)
    both = sorted(set(options) & set(params))
    if both:
        raise ConfigError(f"{', '.join(both)}: given both as an index parameter and as a {backend} option")
    index = cls(bits, kind, **options, **params)
    try:
        progress(0, n, f"adding codes ({kind}, {backend})")
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            index.add(np.asarray(codes[start:stop]), ids=None if ids is None else ids[start:stop])
            progress(stop, n, f"adding codes ({kind}, {backend})")
        if n:
            index.flush()
    except BaseException:
        index.close()
        raise
    return index
