"""Milvus backend for Hamming search: :class:`MilvusBinaryIndex` (optional extra ``milvus``).

The :class:`crossret.retrieval.backend.IndexBackend` protocol (backend name ``"milvus"``) with the
codes held in a Milvus collection instead of a local faiss index, so a database can outgrow one
machine and be shared by several processes. ``pymilvus`` is imported only when an index is made
(``import crossret`` never needs it); install it with ``pip install 'crossret[milvus]'``. See
docs/milvus.md.

Kinds: ``"flat"`` is Milvus ``BIN_FLAT`` (exhaustive, exact); ``"ivf"`` is ``BIN_IVF_FLAT`` with
``nlist`` (default :meth:`BinaryIndex.default_nlist` of the first added batch) and ``nprobe``
(default ``min(8, nlist)``), exact when ``nprobe == nlist``. The metric is ``HAMMING``.

Collection layout: ``pos`` (INT64 primary key: the insertion position ``0 .. ntotal-1``), ``uid``
(INT64 user id, ``-1`` when the index uses positions as ids) and ``code`` (``BINARY_VECTOR``; Milvus
requires a dimension that is a multiple of 8, so a ``bits``-bit code is stored in
``packed_width(bits)`` bytes with the unused high bits zero, which leaves distances unchanged).
crossret's metadata (bits, kind, bit order) is JSON in the collection description; :meth:`connect`
reads it back.

Persistence: the collection is the index. :meth:`~MilvusBinaryIndex.save` flushes it and writes a
*locator* file, a small JSON object (``{"crossret": "milvus-collection", "version": 1, "uri": ...,
"db_name": ..., "collection": ..., "bits": ..., "kind": ...}``, never the token) that
:meth:`~MilvusBinaryIndex.load` reads to connect again.

Guarantees:

* Inputs are validated by ``BinaryIndex``'s own check (rows of ``packed_width(bits)`` bytes or
  zero-padded to 64 bits, no bits set past ``bits``); rows are stored at ``packed_width(bits)``.
* Results of each query are sorted by ``(distance, position)``. Milvus orders equal distances
  arbitrarily and, when the group at the k-th distance does not fit in k, returns an arbitrary part
  of it. With ``exact_ties=True`` (default) Milvus is asked for more than k results (again with a
  larger limit, then window by window over positions, until the k-th distance's group is complete)
  and its earliest positions are kept, so ``flat`` (and ``ivf`` with ``nprobe == nlist``) return
  exactly what ``BinaryIndex`` ``flat`` returns, ids included. With ``exact_ties=False`` one request
  of limit k is made: distances are still exact, ids inside the last group are Milvus's choice.
* ``range_search(q, radius)`` returns every item with distance ``<= radius`` in the same order
  (``ivf``: of the probed lists only), as ``BinaryIndex.range_search``.
* ``k > ntotal``: missing slots hold id ``-1`` and distance ``MISSING_DISTANCE`` at the end of a row.
* ``k`` is at most :data:`MAX_TOPK` (16384, Milvus's limit).

One writer per collection: positions are assigned from the count this object holds.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from crossret.errors import CodeError, ConfigError, CrossretError, FileFormatError
from crossret.extras import install_command, require
from crossret.retrieval.index import (
    MISSING_DISTANCE,
    MISSING_ID,
    BinaryIndex,
    _check_ids,
    _check_int_param,
    _check_k,
    check_ids_mode,
)
from crossret.retrieval.packing import BIT_ORDER, packed_width, padded_bits
from crossret.storage.atomic import write_bytes_atomic

__all__ = [
    "DEFAULT_URI",
    "LOCATOR_FORMAT",
    "LOCATOR_PREFIX",
    "MAX_TOPK",
    "MilvusBackendError",
    "MilvusBinaryIndex",
    "MilvusConnectionError",
    "read_locator",
]

DEFAULT_URI = "http://127.0.0.1:19530"
MAX_TOPK = 16384  # Milvus rejects limit > 16384 (and nq > 16384) per search request
INSTALL_HINT = install_command("milvus")

_META_TAG = "crossret.binary_index"
_META_VERSION = 1
_NO_UID = -1  # stored in ``uid`` when the index uses positions as ids
_MAX_REQUEST_BYTES = 16 << 20  # insert payload per request, well below Milvus's gRPC limits
_MAX_HITS_PER_REQUEST = 1 << 18  # nq * limit per search request, bounds the response size
_RANGE_QUERIES_PER_REQUEST = 256
_RANGE_FIRST_LIMIT = 1024  # hits asked per query in a range search's first request
_GIVEN_CLIENT = "<given client>"  # ``uri`` of an index opened on a caller's client
LOCATOR_FORMAT = "milvus-collection"  # the "crossret" tag of a locator file (MilvusBinaryIndex.save)
_LOCATOR_VERSION = 1
#: The first bytes of every locator file (json.dumps with indent=2 keeps the key order it is given).
LOCATOR_PREFIX = b'{\n  "crossret": "milvus-collection"'
_MAX_LOCATOR_BYTES = 1 << 16
_CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class MilvusBackendError(CrossretError):
    """The Milvus server refused or failed an operation (the message carries the server's reason)."""


class MilvusConnectionError(MilvusBackendError, ConnectionError):
    """The Milvus server cannot be reached."""


def _pymilvus() -> Any:
    """Import pymilvus on first use; a :class:`~crossret.errors.MissingExtraError` (an ``ImportError``) with
    the install command when it is missing."""
    require("milvus", "pymilvus", load=True)
    import pymilvus

    return pymilvus


def _pymilvus_minor(pymilvus: Any) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", str(getattr(pymilvus, "__version__", "")))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _server_message(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).strip()


def _make_client(uri: str | None, host: str | None, port: int | None, token: str, db_name: str,
                 timeout: float | None) -> tuple[Any, str]:
    """Open a MilvusClient; returns (client, uri)."""
    if uri is not None and (host is not None or port is not None):
        raise ConfigError("pass either uri=... or host=/port=..., not both")
    if uri is None:
        if port is not None and (isinstance(port, bool) or not isinstance(port, (int, np.integer))
                                 or not 0 < port < 65536):
            raise ConfigError(f"port must be an integer in 1..65535, got {port!r}")
        uri = f"http://{host or '127.0.0.1'}:{port or 19530}"
    elif not isinstance(uri, str) or not uri:
        raise ConfigError(f"uri must be a non-empty string such as {DEFAULT_URI!r}, got {uri!r}")
    pymilvus = _pymilvus()
    extra: dict[str, Any] = {}
    if _pymilvus_minor(pymilvus) == (2, 5):
        # pymilvus 2.5 shares one connection among clients of the same URI and close() removes it for
        # all of them; a private alias keeps closing one index from breaking another.
        extra["alias"] = f"crossret-{uuid.uuid4().hex}"
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token, db_name=db_name, timeout=timeout, **extra)
    except Exception as exc:  # pymilvus raises MilvusException, grpc errors or plain ones by version
        raise MilvusConnectionError(
            f"cannot connect to a Milvus server at {uri} ({_server_message(exc)}); start one (see docs/milvus.md) "
            "or pass the right uri=/host=/port="
        ) from exc
    return client, uri


def _check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"collection name must start with a letter or '_' and hold only letters, digits and '_' "
            f"(at most 255 characters), got {name!r}"
        )
    return name


def _crossret_meta(info: dict[str, Any]) -> dict[str, Any] | None:
    """crossret's metadata from a collection description, or None when crossret did not make it."""
    try:
        meta = json.loads(info.get("description") or "")
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and meta.get("tag") == _META_TAG else None


def _code_bytes(value: Any, width: int, collection: str) -> bytes:
    """A ``BINARY_VECTOR`` value as read back by ``query``: pymilvus versions give ``bytes`` or a
    one-element list holding them."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (bytes, bytearray)):
        value = value[0]
    data = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
    if data is None or len(data) != width:
        raise MilvusBackendError(f"collection {collection!r}: a stored code is not {width} bytes "
                                 f"({type(value).__name__}); it was not written by crossret")
    return data


def read_locator(path: str | os.PathLike) -> dict[str, Any]:
    """The fields of a locator file written by :meth:`MilvusBinaryIndex.save` (checked, not connected)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_LOCATOR_BYTES + 1)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such Milvus locator file") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read the Milvus locator file ({exc})") from exc
    if data.startswith((b"CRBINIDX", b"CRDNSIDX")):
        raise FileFormatError(f"{path}: is a crossret index file, not a Milvus locator; open it with the 'local' "
                              "backend (--backend local)")
    try:
        if len(data) > _MAX_LOCATOR_BYTES:
            raise ValueError(f"more than {_MAX_LOCATOR_BYTES} bytes; a locator is a few hundred")
        record = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise FileFormatError(f"{path}: not a crossret Milvus locator file ({exc})") from None
    if not isinstance(record, dict) or record.get("crossret") != LOCATOR_FORMAT:
        raise FileFormatError(f"{path}: not a crossret Milvus locator file (no {LOCATOR_FORMAT!r} tag)")
    if record.get("version") != _LOCATOR_VERSION:
        raise FileFormatError(f"{path}: unsupported Milvus locator version {record.get('version')!r} (this crossret "
                              f"reads version {_LOCATOR_VERSION})")
    uri, db_name, bits = record.get("uri"), record.get("db_name"), record.get("bits")
    if (uri is not None and not isinstance(uri, str)) or not isinstance(db_name, str) \
            or isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0 \
            or not isinstance(record.get("collection"), str) or not _NAME_RE.match(record["collection"]):
        raise FileFormatError(f"{path}: garbage Milvus locator — invalid uri, db_name, collection or bits")
    return record


class MilvusBinaryIndex:
    """Hamming-distance index over packed binary codes stored in a Milvus collection.

    Implements :class:`crossret.retrieval.backend.IndexBackend` (backend name ``"milvus"``).
    """

    _KINDS: ClassVar[dict[str, tuple[str, set[str]]]] = {
        "flat": ("BIN_FLAT", set()),
        "ivf": ("BIN_IVF_FLAT", {"nlist", "nprobe"}),
    }

    def __init__(self, bits: int, kind: str = "flat", *, collection: str | None = None,
                 uri: str | None = None, host: str | None = None, port: int | None = None,
                 token: str = "", db_name: str = "", client: Any = None, overwrite: bool | str = False,
                 timeout: float | None = None, batch_size: int = 10_000, exact_ties: bool = True,
                 consistency_level: str = "Session", **params: Any) -> None:
        """Create a new collection for ``bits``-bit codes and connect to it.

        ``collection`` defaults to a fresh ``crossret_<hex>`` name; an existing collection of that
        name is an error unless ``overwrite`` is ``True`` (drop it) or ``"crossret"`` (drop it only when
        crossret made it). Open existing ones with :meth:`connect` or :meth:`load`.
        ``client`` reuses an open ``pymilvus.MilvusClient`` instead of ``uri``/``host``/``port``.
        ``consistency_level`` of reads: ``"Session"`` sees every write made through this process;
        ``"Strong"`` also sees other clients' latest writes but waits for the server's next time tick
        on every request (docs/milvus.md).
        ``params``: ``nlist`` and ``nprobe`` for ``kind="ivf"``.
        """
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits <= 0:
            raise CodeError(f"code length must be a positive integer, got {bits!r}")
        if kind not in self._KINDS:
            raise ConfigError(f"unknown Milvus index kind {kind!r}; choose 'flat' (BIN_FLAT) or 'ivf' (BIN_IVF_FLAT)")
        allowed = self._KINDS[kind][1]
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} for Milvus index kind {kind!r}; "
                f"accepted: {', '.join(sorted(allowed)) or 'none'}"
            )
        checked = {name: _check_int_param(name, value) for name, value in params.items()}
        if overwrite not in (False, True, "crossret"):
            raise ConfigError(f"overwrite must be False, True or 'crossret', got {overwrite!r}")
        name = _check_collection_name(collection) if collection is not None else f"crossret_{uuid.uuid4().hex[:16]}"
        self._init_state(int(bits), kind, checked, name, batch_size, exact_ties, timeout, consistency_level)
        self._open(client, uri, host, port, token, db_name)
        try:
            self._create(overwrite)
        except BaseException:
            self.close()
            raise

    # -- construction helpers

    def _init_state(self, bits: int, kind: str, params: dict[str, int], name: str, batch_size: Any,
                    exact_ties: bool, timeout: float | None, consistency_level: str) -> None:
        if consistency_level not in _CONSISTENCY_LEVELS:
            raise ConfigError(f"consistency_level must be one of {', '.join(_CONSISTENCY_LEVELS)}, "
                              f"got {consistency_level!r}")
        self.bits = bits
        # Duck-typed attribute used by BinaryIndex._prepare (accepts 64-bit padded rows too).
        self.padded_bits = padded_bits(bits)
        self.dim = 8 * packed_width(bits)  # Milvus needs a multiple of 8
        self.kind = kind
        self.params = dict(params)
        self.collection = name
        self.batch_size = _check_int_param("batch_size", batch_size)
        self.exact_ties = bool(exact_ties)
        self.timeout = timeout
        self.consistency_level = consistency_level
        self.uri = ""
        self.db_name = ""
        self._client: Any = None
        self._owns_client = False
        self._dropped = False
        self._has_index = False
        self._loaded = False
        self._ntotal = 0
        self._ids_mode: bool | None = None
        self._known_uids: np.ndarray | None = None  # cache of stored user ids, for uniqueness checks

    def _open(self, client: Any, uri: str | None, host: str | None, port: int | None, token: str,
              db_name: str) -> None:
        if client is not None:
            if uri is not None or host is not None or port is not None:
                raise ConfigError("pass either client=... or uri=/host=/port=..., not both")
            self._client, self.uri, self._owns_client = client, _GIVEN_CLIENT, False
        else:
            self._client, self.uri = _make_client(uri, host, port, token, db_name, self.timeout)
            self._owns_client = True
        self.db_name = db_name

    def _metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"tag": _META_TAG, "version": _META_VERSION, "bits": self.bits,
                                "kind": self.kind, "bit_order": BIT_ORDER}
        if "nprobe" in self.params:
            meta["nprobe"] = self.params["nprobe"]
        return meta

    def _create(self, overwrite: bool | str) -> None:
        pymilvus = _pymilvus()
        if self._call("has_collection", self._client.has_collection, self.collection):
            if not overwrite:
                raise ConfigError(
                    f"collection {self.collection!r} already exists at {self.uri}; open it with "
                    "MilvusBinaryIndex.connect(...) or pass overwrite=True (--overwrite) to replace it"
                )
            if overwrite == "crossret" and _crossret_meta(self._describe()) is None:
                raise ConfigError(f"collection {self.collection!r} at {self.uri} was not created by crossret; it is "
                                  "not replaced: choose another collection name")
            self._call("drop_collection", self._client.drop_collection, self.collection)
        schema = pymilvus.MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=json.dumps(self._metadata(), sort_keys=True)
        )
        schema.add_field("pos", pymilvus.DataType.INT64, is_primary=True, description="insertion position")
        schema.add_field("uid", pymilvus.DataType.INT64, description="user id, -1 when positions are the ids")
        schema.add_field("code", pymilvus.DataType.BINARY_VECTOR, dim=self.dim,
                         description=f"{self.bits}-bit code, {BIT_ORDER}")
        self._call("create_collection", self._client.create_collection, self.collection, schema=schema,
                   consistency_level="Strong", timeout=self.timeout)
        if self.kind == "flat" or "nlist" in self.params:
            self._create_index()

    def _create_index(self) -> None:
        """Create the vector index (IVF without nlist waits for the first add, which picks nlist)."""
        index_type = self._KINDS[self.kind][0]
        index_params = self._client.prepare_index_params()
        extra = {"nlist": self.params["nlist"]} if self.kind == "ivf" else {}
        index_params.add_index(field_name="code", index_type=index_type, metric_type="HAMMING", params=extra)
        if self.kind == "ivf":
            self.params.setdefault("nprobe", min(8, self.params["nlist"]))
        self._call("create_index", self._client.create_index, self.collection, index_params, timeout=self.timeout)
        self._has_index = True

    def _ensure_loaded(self) -> None:
        """Load the collection into the query nodes on first need.

        Loading late lets :meth:`from_packed` insert, flush and index first, so the sealed segments are
        served with their index at once instead of after Milvus's growing-to-sealed handoff.
        """
        if not self._loaded:
            self._call("load_collection", self._client.load_collection, self.collection, timeout=self.timeout)
            self._loaded = True

    @classmethod
    def connect(cls, collection: str, *, bits: int | None = None, uri: str | None = None,
                host: str | None = None, port: int | None = None, token: str = "", db_name: str = "",
                client: Any = None, timeout: float | None = None, batch_size: int = 10_000,
                exact_ties: bool = True, consistency_level: str = "Session", **params: Any) -> MilvusBinaryIndex:
        """Open an existing collection made by this class. ``bits``, when given, must match it.

        ``params`` may set ``nprobe`` (IVF) for this connection.
        """
        name = _check_collection_name(collection)
        obj = cls.__new__(cls)
        obj._init_state(1, "flat", {}, name, batch_size, exact_ties, timeout, consistency_level)
        obj._open(client, uri, host, port, token, db_name)
        try:
            obj._attach(bits, params)
        except BaseException:
            obj.close()
            raise
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, collection: str | None = None, uri: str | None = None,
             host: str | None = None, port: int | None = None, token: str = "", db_name: str | None = None,
             client: Any = None, **options: Any) -> MilvusBinaryIndex:
        """Connect to the collection a locator file names (written by :meth:`save`), or to ``collection``.

        The locator gives the collection, server address, database and code length; ``collection``,
        ``uri`` (or ``host``/``port``/``client``) and ``db_name`` replace what it says. The token is
        never stored: pass ``token`` when the server needs one. ``options`` go to :meth:`connect`
        (``timeout``, ``batch_size``, ``exact_ties``, ``consistency_level``, ``nprobe``).
        """
        bits = None
        if path is not None:
            record = read_locator(path)
            if collection is None or collection == record["collection"]:
                collection, bits = record["collection"], int(record["bits"])
            if uri is None and host is None and port is None and client is None:
                uri = record["uri"]
                if uri is None:
                    raise ConfigError(f"{path}: the locator records no server address (the index was saved through "
                                      "a client object); pass uri=...")
            if db_name is None:
                db_name = record["db_name"]
        elif collection is None:
            raise ConfigError("give a locator file written by MilvusBinaryIndex.save (crossret index build --backend "
                              "milvus) or the collection name (collection=..., --collection)")
        index = cls.connect(collection, bits=bits, uri=uri, host=host, port=port, token=token,
                            db_name=db_name or "", client=client, **options)
        return index

    def save(self, path: str | os.PathLike) -> Path:
        """Make the collection durable and write a locator file naming it; returns the path.

        The codes stay on the server: :meth:`flush` seals them (and waits for the index), then ``path``
        gets a small JSON file (atomically) with the collection, server address (``uri``), database
        and code length, which :meth:`load` reads back. The token is not written.
        """
        self._require_open()
        self.flush()
        record = {"crossret": LOCATOR_FORMAT, "version": _LOCATOR_VERSION,
                  "uri": None if self.uri == _GIVEN_CLIENT else self.uri, "db_name": self.db_name,
                  "collection": self.collection, "bits": self.bits, "kind": self.kind}
        text = json.dumps(record, indent=2) + "\n"
        path = Path(path)
        write_bytes_atomic(path, text.encode("utf-8"))
        return path

    def _attach(self, bits: int | None, params: dict[str, Any]) -> None:
        if not self._call("has_collection", self._client.has_collection, self.collection):
            raise ConfigError(
                f"no collection {self.collection!r} at {self.uri}; create it with "
                f"MilvusBinaryIndex(bits, collection={self.collection!r}) or from_packed(...)"
            )
        info = self._describe()
        meta = _crossret_meta(info)
        if meta is None:
            raise ConfigError(f"collection {self.collection!r} at {self.uri} was not created by crossret's "
                              "MilvusBinaryIndex (no crossret metadata in its description)")
        if meta.get("version") != _META_VERSION or meta.get("bit_order") != BIT_ORDER:
            raise ConfigError(f"collection {self.collection!r}: unsupported crossret metadata {meta}")
        if meta.get("kind") not in self._KINDS:
            raise ConfigError(f"collection {self.collection!r}: unknown index kind {meta.get('kind')!r}")
        stored_bits = meta.get("bits")
        if isinstance(stored_bits, bool) or not isinstance(stored_bits, int) or stored_bits <= 0:
            raise ConfigError(f"collection {self.collection!r}: invalid bits in its metadata ({stored_bits!r})")
        fields = {f["name"]: f for f in info.get("fields", [])}
        dim = int((fields.get("code") or {}).get("params", {}).get("dim", -1))
        if set(fields) != {"pos", "uid", "code"} or dim != 8 * packed_width(stored_bits):
            raise ConfigError(f"collection {self.collection!r}: its fields do not match a {stored_bits}-bit "
                              f"crossret binary index (fields {sorted(fields)}, code dim {dim})")
        if bits is not None and bits != stored_bits:
            raise CodeError(f"collection {self.collection!r} holds {stored_bits}-bit codes but bits={bits!r} "
                            "was asked for; the code lengths do not match")
        self.bits, self.kind = stored_bits, meta["kind"]
        self.padded_bits, self.dim = padded_bits(stored_bits), dim
        allowed = {"nprobe"} if self.kind == "ivf" else set()
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(f"only nprobe can be set when connecting to a {self.kind!r} collection, not {unknown}")
        if "nprobe" in meta:
            self.params["nprobe"] = int(meta["nprobe"])
        self.params.update({name: _check_int_param(name, value) for name, value in params.items()})
        indexes = self._call("list_indexes", self._client.list_indexes, self.collection)
        if indexes:
            described = self._call("describe_index", self._client.describe_index, self.collection, indexes[0])
            if self.kind == "ivf":
                self.params["nlist"] = int(described["nlist"])
                self.params.setdefault("nprobe", min(8, self.params["nlist"]))
            self._has_index = True
            self._ntotal = self._count()
        if self._ntotal:
            first = self._call("query", self._client.query, self.collection, filter="pos >= 0",
                               output_fields=["uid"], limit=1, timeout=self.timeout,
                               consistency_level=self.consistency_level)
            self._ids_mode = bool(first) and int(first[0]["uid"]) != _NO_UID

    @classmethod
    def from_packed(cls, codes: np.ndarray, bits: int, kind: str = "flat", *, ids: Any = None, flush: bool = True,
                    **kwargs: Any) -> MilvusBinaryIndex:
        """Create a collection holding ``codes`` (uint8, packed). ``kwargs`` go to the constructor.

        ``flush=True`` seals the data and waits until Milvus has indexed it (IVF search then uses
        the index rather than a scan of growing segments).
        """
        index = cls(bits, kind, **kwargs)
        try:
            index.add(codes, ids=ids)
            if flush and index.ntotal:
                index.flush()
            if index._has_index:
                index._ensure_loaded()
        except BaseException:
            index.close()
            raise
        return index

    # -- server calls

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a client call, turning pymilvus errors into crossret errors that name the collection."""
        try:
            return fn(*args, **kwargs)
        except CrossretError:
            raise
        except Exception as exc:
            message = _server_message(exc)
            where = f"collection {self.collection!r} at {self.uri}"
            lowered = message.lower()
            if any(s in lowered for s in ("unavailable", "connect", "deadline exceeded", "not ready")):
                raise MilvusConnectionError(f"Milvus {what} failed, server unreachable ({where}): {message}") from exc
            raise MilvusBackendError(f"Milvus {what} failed ({where}): {message}") from exc

    def _describe(self) -> dict[str, Any]:
        return self._call("describe_collection", self._client.describe_collection, self.collection)

    def _require_open(self) -> None:
        if self._dropped:
            raise ConfigError(f"collection {self.collection!r} was dropped; create a new MilvusBinaryIndex")
        if self._client is None:
            raise ConfigError(f"this MilvusBinaryIndex ({self.collection!r}) is closed; connect() again")

    def _count(self) -> int:
        self._ensure_loaded()
        rows = self._call("count", self._client.query, self.collection, filter="",
                          output_fields=["count(*)"], timeout=self.timeout,
                          consistency_level=self.consistency_level)
        return int(rows[0]["count(*)"])

    # -- properties

    @property
    def ntotal(self) -> int:
        """Number of indexed items (as counted by this object)."""
        return self._ntotal

    def __len__(self) -> int:
        return self._ntotal

    # -- input checks

    def _prepare(self, packed: np.ndarray, name: str) -> np.ndarray:
        """Validate like BinaryIndex, then trim the 64-bit padding back to Milvus's byte width."""
        padded = BinaryIndex._prepare(self, packed, name)  # type: ignore[arg-type]  # same rules, no duplicate
        return np.ascontiguousarray(padded[:, : self.dim // 8])

    # -- mutation

    def add(self, packed: np.ndarray, ids: Any = None) -> None:
        """Add packed codes in batches. ``ids`` (int64, unique, >= 0) are returned by search instead of positions."""
        codes = self._prepare(packed, "codes")
        self._require_open()
        n = codes.shape[0]
        uids = self._register_ids(ids, n)
        if not n:
            return
        if not self._has_index:
            self.params["nlist"] = BinaryIndex.default_nlist(n)
            self._create_index()
        rows_per_request = max(1, min(self.batch_size, _MAX_REQUEST_BYTES // (codes.shape[1] + 16)))
        start = self._ntotal
        done = 0
        try:
            for lo in range(0, n, rows_per_request):
                hi = min(n, lo + rows_per_request)
                rows = [
                    {"pos": start + i, "uid": int(uids[i]) if uids is not None else _NO_UID, "code": codes[i].tobytes()}
                    for i in range(lo, hi)
                ]
                result = self._call("insert", self._client.insert, self.collection, rows, timeout=self.timeout)
                count = int(result.get("insert_count", hi - lo)) if isinstance(result, dict) else hi - lo
                if count != hi - lo:
                    raise MilvusBackendError(f"Milvus inserted {count} of {hi - lo} rows into {self.collection!r}")
                done = hi
        finally:
            # Keep the local view equal to what the server holds, also after a failed batch.
            self._ntotal = start + done
            if uids is not None and done:
                known = self._known_uids
                self._known_uids = uids[:done] if known is None else np.concatenate([known, uids[:done]])
            if not self._ntotal:
                self._ids_mode = None

    def _register_ids(self, ids: Any, n: int) -> np.ndarray | None:
        """The BinaryIndex id rules: all adds with ids or none, ids unique across the collection."""
        use_ids = ids is not None
        if self._ntotal == 0:  # nothing stored yet: the first non-empty add decides the mode
            self._ids_mode, self._known_uids = None, None
        check_ids_mode(self._ids_mode, use_ids)
        checked = None
        if use_ids:
            checked = _check_ids(ids, n, self._stored_uids())
        self._ids_mode = use_ids
        return checked

    def _stored_uids(self) -> np.ndarray | None:
        """User ids already in the collection (fetched once after connect, then kept up to date)."""
        if self._ntotal == 0:
            return None
        if self._known_uids is None:
            fetched = np.empty(self._ntotal, dtype=np.int64)
            for lo, hi, rows in self._iter_rows(["uid"]):
                fetched[lo:hi] = [int(r["uid"]) for r in rows]
            self._known_uids = fetched
        return self._known_uids

    def _iter_rows(self, fields: list[str]) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
        """Rows in position order, fetched by position window (positions are 0 .. ntotal-1)."""
        self._ensure_loaded()
        step = MAX_TOPK
        for lo in range(0, self._ntotal, step):
            hi = min(self._ntotal, lo + step)
            rows = self._call("query", self._client.query, self.collection, filter=f"pos >= {lo} and pos < {hi}",
                              output_fields=["pos", *fields], timeout=self.timeout,
                              consistency_level=self.consistency_level)
            rows = sorted(rows, key=lambda r: int(r["pos"]))
            if len(rows) != hi - lo:
                raise MilvusBackendError(f"collection {self.collection!r}: positions {lo}..{hi - 1} hold "
                                         f"{len(rows)} rows, expected {hi - lo} (was it written by two clients?)")
            yield lo, hi, rows

    def flush(self, wait_for_index: bool = True, timeout: float = 120.0) -> None:
        """Seal the inserted data to storage and (by default) wait until Milvus has indexed it."""
        self._require_open()
        self._call("flush", self._client.flush, self.collection, timeout=self.timeout)
        if not wait_for_index or not self._has_index:
            return
        deadline = time.monotonic() + timeout
        while True:
            info = self._call("describe_index", self._client.describe_index, self.collection, "code")
            state = str(info.get("state", ""))
            if "fail" in state.lower():
                reason = info.get("index_state_fail_reason", info)
                raise MilvusBackendError(f"Milvus failed to index {self.collection!r}: {reason}")
            if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("total_rows", 0)) >= self._ntotal:
                return
            if time.monotonic() > deadline:
                raise MilvusBackendError(f"Milvus did not finish indexing {self.collection!r} within {timeout:g} s "
                                         f"(indexed {info.get('indexed_rows')} of {info.get('total_rows')} rows)")
            time.sleep(0.2)

    def set_params(self, **params: Any) -> None:
        """Change ``nprobe`` of an IVF index (for this object's searches)."""
        if self.kind != "ivf" or set(params) - {"nprobe"}:
            raise ConfigError("only nprobe of an 'ivf' Milvus index can be changed after building")
        if "nprobe" in params:
            self.params["nprobe"] = _check_int_param("nprobe", params["nprobe"])

    # -- search

    def search(self, packed_queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` nearest codes per query: ``(distances int32 (Q, k), ids int64 (Q, k))``, as BinaryIndex."""
        k = _check_k(k)
        if k > MAX_TOPK:
            raise ConfigError(f"k={k} is above Milvus's limit of {MAX_TOPK} results per query; ask for fewer "
                              "or use crossret.retrieval.BinaryIndex (faiss), which has no such limit")
        queries = self._prepare(packed_queries, "query codes")
        self._require_open()
        nq = queries.shape[0]
        dist = np.full((nq, k), MISSING_DISTANCE, dtype=np.int32)
        ids = np.full((nq, k), MISSING_ID, dtype=np.int64)
        if nq == 0 or self._ntotal == 0 or not self._has_index:
            return dist, ids
        self._ensure_loaded()
        # With exact ties, ask for more than k so that the last distance group of the top k is usually
        # complete in the first answer; rows where it is not are asked again with a larger limit.
        limit = min(MAX_TOPK, max(2 * k, k + 32)) if self.exact_ties else k
        pending = np.arange(nq)
        while pending.size:
            retry = []
            per_request = max(1, min(MAX_TOPK, _MAX_HITS_PER_REQUEST // limit))
            for lo in range(0, pending.size, per_request):
                rows = pending[lo : lo + per_request]
                answers = self._search_request(queries[rows], limit, "")
                for r, hits in zip(rows, answers, strict=True):
                    hits.sort()  # (distance, position, uid): the BinaryIndex order
                    top = hits[:k]
                    boundary_open = self.exact_ties and len(hits) == limit and len(top) == k and \
                        hits[-1][0] == top[-1][0]
                    if boundary_open and limit < MAX_TOPK:
                        retry.append(r)  # the group at the k-th distance may go on past `limit`
                        continue
                    if boundary_open:
                        top = self._complete_boundary(queries[r], top)
                    m = len(top)
                    dist[r, :m] = [d for d, _, _ in top]
                    ids[r, :m] = [u if self._ids_mode else p for _, p, u in top]
            pending = np.asarray(retry, dtype=np.int64)
            limit = min(MAX_TOPK, 4 * limit)
        return dist, ids

    def _search_params(self, radius: int | None = None) -> dict[str, Any]:
        inner: dict[str, Any] = {"nprobe": self.params["nprobe"]} if self.kind == "ivf" else {}
        if radius is not None:
            inner["radius"] = radius + 1  # Milvus keeps HAMMING distances < radius
        return {"metric_type": "HAMMING", "params": inner}

    def _search_request(self, queries: np.ndarray, limit: int, where: str,
                        radius: int | None = None) -> list[list[tuple[int, int, int]]]:
        """One Milvus search (a range search with ``radius``); per query a list of (distance, position,
        uid) hits."""
        out_fields = ["uid"] if self._ids_mode else []
        result = self._call(
            "search", self._client.search, self.collection, data=[q.tobytes() for q in queries], filter=where,
            limit=limit, output_fields=out_fields, search_params=self._search_params(radius), timeout=self.timeout,
            consistency_level=self.consistency_level,
        )
        parsed = []
        for row in result:
            hits = []
            for hit in row:
                uid = int(hit["entity"]["uid"]) if self._ids_mode else _NO_UID
                hits.append((round(float(hit["distance"])), int(hit["id"]), uid))
            parsed.append(hits)
        return parsed

    def _complete_boundary(self, query: np.ndarray, top: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """The top k when more than MAX_TOPK items lie within the k-th distance (rare: mass ties).

        Every item closer than the k-th distance ``b`` is already in ``top`` (the answer held MAX_TOPK
        items, all within ``b``); the earliest positions at exactly ``b`` are read window by window: a
        window of MAX_TOPK positions holds at most MAX_TOPK items, so each windowed answer is complete.
        """
        b = top[-1][0]
        closer = [hit for hit in top if hit[0] < b]
        need = len(top) - len(closer)
        found: list[tuple[int, int, int]] = []
        for lo in range(0, self._ntotal, MAX_TOPK):
            window = self._search_request(query[None, :], MAX_TOPK, f"pos >= {lo} and pos < {lo + MAX_TOPK}")[0]
            found.extend(hit for hit in window if hit[0] == b)
            if len(found) >= need:
                break
        found.sort()
        return closer + found[:need]

    def range_search(self, packed_queries: np.ndarray, radius: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All items within Hamming distance ``<= radius``, as :meth:`BinaryIndex.range_search`.

        Returns ``(lims int64 (Q+1,), distances int32, ids int64)``: the results of query ``i`` are
        ``[lims[i]:lims[i+1]]``, sorted by ``(distance, position)``. Uses Milvus's range search (the
        ``radius`` search parameter; for ``HAMMING`` it keeps ``distance < radius``, so ``radius + 1``
        is sent), which still returns at most ``limit`` hits per query: a query whose answer fills the
        limit is asked again with a larger one, and past :data:`MAX_TOPK` window by window over
        positions (a window of ``MAX_TOPK`` positions holds at most ``MAX_TOPK`` items, so each
        windowed answer is complete). Exact for ``flat``; ``ivf`` searches its ``nprobe`` lists only.
        """
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ConfigError(f"radius must be a non-negative integer Hamming distance, got {radius!r}")
        queries = self._prepare(packed_queries, "query codes")
        self._require_open()
        nq = queries.shape[0]
        found: list[list[tuple[int, int, int]]] = [[] for _ in range(nq)]
        if nq and self._ntotal and self._has_index:
            self._ensure_loaded()
            radius = int(min(radius, self.dim))  # no distance exceeds the stored width
            limit = min(MAX_TOPK, _RANGE_FIRST_LIMIT)
            pending = np.arange(nq)
            while pending.size:
                retry = []
                per_request = max(1, min(_RANGE_QUERIES_PER_REQUEST, _MAX_HITS_PER_REQUEST // limit))
                for lo in range(0, pending.size, per_request):
                    rows = pending[lo : lo + per_request]
                    answers = self._search_request(queries[rows], limit, "", radius=radius)
                    for r, hits in zip(rows, answers, strict=True):
                        if len(hits) < limit:
                            found[r] = hits
                        elif limit < MAX_TOPK:
                            retry.append(r)
                        else:
                            found[r] = self._range_windows(queries[r], radius)
                pending = np.asarray(retry, dtype=np.int64)
                limit = min(MAX_TOPK, 4 * limit)
        lims = np.zeros(nq + 1, dtype=np.int64)
        dist_parts: list[int] = []
        id_parts: list[int] = []
        for r, hits in enumerate(found):
            # The bound is checked here too, so the answer does not depend on whether a server keeps
            # distance < radius (documented) or <= radius.
            kept = sorted(hit for hit in hits if hit[0] <= radius)
            lims[r + 1] = lims[r] + len(kept)
            dist_parts.extend(d for d, _, _ in kept)
            id_parts.extend(u if self._ids_mode else p for _, p, u in kept)
        return lims, np.asarray(dist_parts, dtype=np.int32), np.asarray(id_parts, dtype=np.int64)

    def _range_windows(self, query: np.ndarray, radius: int) -> list[tuple[int, int, int]]:
        """Every item within ``radius`` of one query, read window by window over positions."""
        hits: list[tuple[int, int, int]] = []
        for lo in range(0, self._ntotal, MAX_TOPK):
            hits.extend(self._search_request(query[None, :], MAX_TOPK, f"pos >= {lo} and pos < {lo + MAX_TOPK}",
                                             radius=radius)[0])
        return hits

    # -- contents

    def stored_items(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every stored code and its user id, in position order: ``(codes uint8 (ntotal,
        packed_width(bits)), ids int64 (ntotal,) or None when positions are the ids)``, read from the
        server window by window."""
        self._require_open()
        width = self.dim // 8
        codes = np.zeros((self._ntotal, width), dtype=np.uint8)
        uids = np.empty(self._ntotal, dtype=np.int64) if self._ids_mode else None
        fields = ["uid", "code"] if self._ids_mode else ["code"]
        for lo, hi, rows in self._iter_rows(fields):
            block = b"".join(_code_bytes(row["code"], width, self.collection) for row in rows)
            codes[lo:hi] = np.frombuffer(block, dtype=np.uint8).reshape(hi - lo, width)
            if uids is not None:
                uids[lo:hi] = [int(row["uid"]) for row in rows]
        return codes, uids

    # -- lifecycle

    def drop(self) -> None:
        """Delete the collection and its data from the server; the object cannot be used afterwards."""
        self._require_open()
        self._call("drop_collection", self._client.drop_collection, self.collection, timeout=self.timeout)
        self._dropped = True
        self._ntotal = 0

    def close(self) -> None:
        """Close the connection (a client passed in by the caller is left open). Idempotent."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            try:
                client.close()
            except Exception:  # closing a dead channel must not mask the caller's error
                pass

    def __enter__(self) -> MilvusBinaryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"MilvusBinaryIndex(bits={self.bits}, kind={self.kind!r}, collection={self.collection!r}, "
                f"uri={self.uri!r}, ntotal={self._ntotal}, params={self.params})")
