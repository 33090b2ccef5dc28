"""An in-memory stand-in for the parts of ``pymilvus`` that :mod:`crossret.retrieval.milvus` uses.

:func:`install` puts it in ``sys.modules["pymilvus"]`` (so the tests need neither pymilvus nor a server)
and "starts" servers at the given URIs; a client for any other URI fails as an unreachable server does.
Collections live in :data:`SERVERS` and outlive clients, as on a real server, so an index built by one
command can be opened by the next. Searches behave as Milvus documents them, and adversarially where it
leaves freedom: equal distances come back in *reverse* position order (Milvus orders ties arbitrarily),
a range search keeps ``distance < radius`` and then the ``limit`` nearest, and ``limit`` above 16384 is
refused.
"""

from __future__ import annotations

import json
import re
import sys
import types
from typing import Any

import numpy as np

MAX_LIMIT = 16384
#: uri -> database name -> collection name -> collection
SERVERS: dict[str, dict[str, dict[str, _Collection]]] = {}
#: pymilvus versions differ in how ``query`` returns a BINARY_VECTOR: bytes, or a list holding them.
CODE_AS_LIST = {"value": False}


class DataType:
    INT64 = "INT64"
    BINARY_VECTOR = "BINARY_VECTOR"


class _Field:
    def __init__(self, name: str, dtype: str, *, is_primary: bool = False, description: str = "",
                 dim: int | None = None) -> None:
        self.name, self.dtype, self.is_primary, self.description = name, dtype, is_primary, description
        self.params = {} if dim is None else {"dim": dim}


class _Schema:
    def __init__(self, *, auto_id: bool = False, enable_dynamic_field: bool = False, description: str = "") -> None:
        self.description = description
        self.fields: list[_Field] = []

    def add_field(self, name: str, dtype: str, **kwargs: Any) -> None:
        self.fields.append(_Field(name, dtype, **kwargs))


class _IndexParams:
    def __init__(self) -> None:
        self.indexes: list[dict[str, Any]] = []

    def add_index(self, **kwargs: Any) -> None:
        self.indexes.append(kwargs)


class _Collection:
    def __init__(self, schema: _Schema) -> None:
        self.schema = schema
        self.rows: dict[int, dict[str, Any]] = {}
        self.index: dict[str, Any] | None = None
        self.loaded = False


class MilvusException(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_WINDOW = re.compile(r"^pos >= (\d+)(?: and pos < (\d+))?$")


def _matches(filter_text: str) -> Any:
    if not filter_text:
        return lambda pos: True
    match = _WINDOW.match(filter_text)
    if match is None:
        raise MilvusException(f"the fake does not parse filter {filter_text!r}")
    lo, hi = int(match.group(1)), match.group(2)
    return lambda pos: pos >= lo and (hi is None or pos < int(hi))


class MilvusClient:
    """Just the MilvusClient methods crossret calls, over :data:`SERVERS`."""

    create_schema = staticmethod(lambda **kwargs: _Schema(**kwargs))

    def __init__(self, uri: str = "", token: str = "", db_name: str = "", timeout: float | None = None,
                 **_: Any) -> None:
        if uri not in SERVERS:
            raise MilvusException(f"Fail connecting to server on {uri}, illegal connection params or server "
                                  "unavailable")
        self.uri, self.token = uri, token
        self.collections = SERVERS[uri].setdefault(db_name or "default", {})
        self.closed = False

    def _get(self, name: str) -> _Collection:
        if self.closed:
            raise MilvusException("the client is closed")
        if name not in self.collections:
            raise MilvusException(f"collection not found[collection={name}]")
        return self.collections[name]

    def has_collection(self, name: str, **_: Any) -> bool:
        return name in self.collections

    def drop_collection(self, name: str, **_: Any) -> None:
        self.collections.pop(name, None)

    def create_collection(self, name: str, schema: _Schema | None = None, **_: Any) -> None:
        if name in self.collections:
            raise MilvusException(f"collection {name} already exists")
        assert schema is not None
        self.collections[name] = _Collection(schema)

    def prepare_index_params(self) -> _IndexParams:
        return _IndexParams()

    def create_index(self, name: str, index_params: _IndexParams, **_: Any) -> None:
        self._get(name).index = dict(index_params.indexes[0])

    def list_indexes(self, name: str, **_: Any) -> list[str]:
        return ["code"] if self._get(name).index is not None else []

    def describe_index(self, name: str, index_name: str, **_: Any) -> dict[str, Any]:
        coll = self._get(name)
        assert coll.index is not None
        n = len(coll.rows)
        return {**coll.index.get("params", {}), "index_type": coll.index["index_type"], "state": "Finished",
                "pending_index_rows": 0, "total_rows": n, "indexed_rows": n}

    def describe_collection(self, name: str, **_: Any) -> dict[str, Any]:
        coll = self._get(name)
        return {"description": coll.schema.description,
                "fields": [{"name": f.name, "params": dict(f.params)} for f in coll.schema.fields]}

    def load_collection(self, name: str, **_: Any) -> None:
        self._get(name).loaded = True

    def flush(self, name: str, **_: Any) -> None:
        self._get(name)

    def insert(self, name: str, rows: list[dict[str, Any]], **_: Any) -> dict[str, int]:
        coll = self._get(name)
        for row in rows:
            coll.rows[int(row["pos"])] = {"pos": int(row["pos"]), "uid": int(row["uid"]), "code": bytes(row["code"])}
        return {"insert_count": len(rows)}

    def query(self, name: str, filter: str = "", output_fields: list[str] | None = None, limit: int | None = None,
              **_: Any) -> list[dict[str, Any]]:
        coll = self._get(name)
        if not coll.loaded:
            raise MilvusException("collection not loaded")
        fields = list(output_fields or [])
        if fields == ["count(*)"]:
            return [{"count(*)": len(coll.rows)}]
        keep = _matches(filter)
        # Rows in no particular order (here: reversed), as a server may return them.
        rows = [row for pos, row in sorted(coll.rows.items(), reverse=True) if keep(pos)]
        if limit is not None:
            rows = rows[:limit]
        out = []
        for row in rows:
            item = {"pos": row["pos"]}
            for f in fields:
                item[f] = [row[f]] if f == "code" and CODE_AS_LIST["value"] else row[f]
            out.append(item)
        return out

    def search(self, name: str, data: list[bytes], filter: str = "", limit: int = 10,
               output_fields: list[str] | None = None, search_params: dict[str, Any] | None = None,
               **_: Any) -> list[list[dict[str, Any]]]:
        coll = self._get(name)
        if not coll.loaded:
            raise MilvusException("collection not loaded")
        if limit > MAX_LIMIT or len(data) > MAX_LIMIT:
            raise MilvusException(f"topk [{limit}] is invalid, it should be in range [1, {MAX_LIMIT}]")
        params = (search_params or {}).get("params", {})
        radius = params.get("radius")
        keep = _matches(filter)
        positions = np.array([pos for pos in sorted(coll.rows) if keep(pos)], dtype=np.int64)
        codes = np.array([np.frombuffer(coll.rows[pos]["code"], np.uint8) for pos in positions.tolist()],
                         dtype=np.uint8).reshape(len(positions), -1)
        answers = []
        for query in data:
            q = np.frombuffer(query, np.uint8)
            dist = np.unpackbits(codes ^ q, axis=1).sum(axis=1) if len(positions) else np.zeros(0, np.int64)
            chosen = np.flatnonzero(dist < radius) if radius is not None else np.arange(len(positions))
            # Nearest first; equal distances latest position first (Milvus promises no tie order).
            order = chosen[np.lexsort((-positions[chosen], dist[chosen]))][:limit]
            hits = []
            for i in order.tolist():
                pos = int(positions[i])
                entity = {f: coll.rows[pos][f] for f in (output_fields or [])}
                hits.append({"id": pos, "distance": float(dist[i]), "entity": entity})
            answers.append(hits)
        return answers

    def close(self) -> None:
        self.closed = True


def install(monkeypatch: Any, *uris: str) -> types.ModuleType:
    """Install the fake as ``pymilvus`` for one test, with empty servers at ``uris``."""
    module = types.ModuleType("pymilvus")
    module.__version__ = "2.4.0"  # type: ignore[attr-defined]
    module.MilvusClient = MilvusClient  # type: ignore[attr-defined]
    module.DataType = DataType  # type: ignore[attr-defined]
    module.MilvusException = MilvusException  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pymilvus", module)
    monkeypatch.setattr(sys.modules[__name__], "SERVERS", {uri: {} for uri in uris})
    monkeypatch.setitem(CODE_AS_LIST, "value", False)
    return module


def collection_meta(uri: str, name: str, db_name: str = "default") -> dict[str, Any]:
    """crossret's metadata of a fake collection (from its description)."""
    return json.loads(SERVERS[uri][db_name][name].schema.description)
