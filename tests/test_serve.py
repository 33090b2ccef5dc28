"""The search service (crossret.serve): results against an independent brute force, encoding, search by
id, batches, and every validation error. Runs on small ITQ / source-only runs of the ``demo`` benchmark."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the search service needs the 'serve' extra: pip install 'crossret[serve]'")
pytest.importorskip("httpx", reason="fastapi.testclient needs httpx: pip install 'crossret[serve]'")

from fastapi.testclient import TestClient

from crossret.data import load_benchmark
from crossret.errors import ConfigError, CrossretError, MissingExtraError
from crossret.experiment import RunConfig, run_experiment
from crossret.hashing.registry import load_method
from crossret.retrieval import BinaryIndex, pack_codes
from crossret.serve import ServiceLimits, create_app

BITS = 20  # not a multiple of 8: exercises the padding bits of the hex format
LIMITS = ServiceLimits(max_k=2000, max_batch=8, max_body_bytes=64 * 1024, max_results=400)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def split() -> Any:
    return load_benchmark("demo", None)


@pytest.fixture(scope="module")
def itq_run(tmp_path_factory: pytest.TempPathFactory, split: Any) -> Path:
    out = tmp_path_factory.mktemp("serve") / "itq"
    run_experiment(RunConfig(method="itq", benchmark="demo", bits=BITS, out_dir=str(out),
                             method_config={"n_iter": 5}), split=split)
    return out


@pytest.fixture(scope="module")
def client(itq_run: Path) -> TestClient:
    return TestClient(create_app(itq_run, limits=LIMITS))


@pytest.fixture(scope="module")
def db(itq_run: Path) -> dict[str, np.ndarray]:
    """The cross-domain database as the run wrote it (±1 codes, labels)."""
    return {"codes": np.load(itq_run / "codes" / "source_codes.npy"),
            "labels": np.load(itq_run / "codes" / "source_labels.npy")}


def _post(client: TestClient, path: str, body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _brute_force(query_pm1: np.ndarray, db_pm1: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by Hamming distance computed from the ±1 codes directly, ties by database position."""
    distances = (query_pm1[:, None, :] != db_pm1[None, :, :]).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(db_pm1.shape[0]), distances.shape), distances), axis=1)[:, :k]
    return np.take_along_axis(distances, order, 1), order


def _hex(pm1: np.ndarray) -> list[str]:
    """Packed hex of ±1 rows, written independently of crossret's packing (bit j -> byte j//8, bit j%8)."""
    out = []
    for row in pm1:
        data = bytearray((len(row) + 7) // 8)
        for j, value in enumerate(row):
            if value > 0:
                data[j // 8] |= 1 << (j % 8)
        out.append(data.hex())
    return out


# ------------------------------------------------------------------------------------------- basics
def test_health_and_info(client: TestClient, db: dict[str, np.ndarray]) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok", "size": len(db["codes"]), "bits": BITS, "generation": 0}
    info = client.get("/info").json()
    assert (info["bits"], info["size"], info["kind"], info["method"], info["database"]) == (
        BITS, len(db["codes"]), "flat", "itq", "cross")
    assert info["feature_dim"] == 64 and info["feature_search"] and info["labels_known"]
    assert info["run"]["benchmark"] == "demo" and info["limits"] == LIMITS.to_dict()
    assert set(info["code_formats"]) == {"code", "hex"}


def test_search_by_codes_equals_brute_force_and_index(client: TestClient, db: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    queries = np.where(rng.random((6, BITS)) < 0.5, 1, -1).astype(np.int8)
    queries[0] = db["codes"][17]  # a query with exact matches (ties at distance 0)
    k = 50
    body = _post(client, "/search/codes", {"codes": queries.tolist(), "k": k})
    want_dist, want_ids = _brute_force(queries, db["codes"], k)
    index_dist, index_ids = BinaryIndex.from_packed(pack_codes(db["codes"]), BITS).search(pack_codes(queries), k)
    assert body["k"] == k and len(body["results"]) == len(queries)
    for row, result in enumerate(body["results"]):
        assert result["distances"] == want_dist[row].tolist()  # distance for distance
        assert result["ids"] == want_ids[row].tolist()  # flat search: ties by position, exactly
        assert result["ids"] == index_ids[row].tolist() and result["distances"] == index_dist[row].tolist()
        assert result["labels"] == db["labels"][want_ids[row]].tolist()


def test_code_formats_agree(client: TestClient, db: dict[str, np.ndarray]) -> None:
    queries = db["codes"][[3, 400, 897]]
    as_pm1 = _post(client, "/search/codes", {"codes": queries.tolist(), "k": 7, "return_codes": True})
    as_01 = _post(client, "/search/codes", {"codes": (queries > 0).astype(int).tolist(), "k": 7})
    as_hex = _post(client, "/search/codes", {"hex": _hex(queries), "k": 7})
    assert [r["query_hex"] for r in as_pm1["results"]] == _hex(queries)
    for a, b, c in zip(as_pm1["results"], as_01["results"], as_hex["results"], strict=True):
        assert a["ids"] == b["ids"] == c["ids"] and a["distances"] == b["distances"] == c["distances"]


def test_search_by_features_encodes_like_the_model(client: TestClient, itq_run: Path, split: Any) -> None:
    features = split.queries.features[:5]
    model = load_method(itq_run / "model.npz")
    codes = model.encode(features)
    assert np.array_equal(codes, np.load(itq_run / "codes" / "queries_codes.npy")[:5])  # the run's own encoding
    body = _post(client, "/search/features", {"features": features.tolist(), "k": 10, "return_codes": True})
    assert [r["query_hex"] for r in body["results"]] == _hex(codes)
    by_code = _post(client, "/search/codes", {"codes": codes.tolist(), "k": 10})
    assert body["results"] == [{**r, "query_hex": h} for r, h in zip(by_code["results"], _hex(codes), strict=True)]


def test_search_by_features_with_a_torch_model(tmp_path: Path, split: Any) -> None:
    out = tmp_path / "so"
    run_experiment(RunConfig(method="source-only", benchmark="demo", bits=16, out_dir=str(out),
                             method_config={"epochs": 1, "hash_hidden": 0}), split=split)
    client = TestClient(create_app(out, database="single", limits=LIMITS))
    features = split.queries.features[:4]
    codes = load_method(out / "model.pt").encode(features)
    body = _post(client, "/search/features", {"features": features.tolist(), "k": 5, "return_codes": True})
    assert [r["query_hex"] for r in body["results"]] == _hex(codes)
    want_dist, want_ids = _brute_force(codes, np.load(out / "codes" / "target_train_codes.npy"), 5)
    assert [r["ids"] for r in body["results"]] == want_ids.tolist()
    assert [r["distances"] for r in body["results"]] == want_dist.tolist()


def test_search_by_id_equals_search_with_its_code(client: TestClient, db: dict[str, np.ndarray]) -> None:
    ids = [0, 17, 450, 897]
    by_id = _post(client, "/search/ids", {"ids": ids, "k": 12})
    by_code = _post(client, "/search/codes", {"codes": db["codes"][ids].tolist(), "k": 12})
    assert by_id["results"] == by_code["results"]
    excluded = _post(client, "/search/ids", {"ids": ids, "k": 12, "exclude_self": True})
    wider = _post(client, "/search/codes", {"codes": db["codes"][ids].tolist(), "k": 13})
    for item, got, ref in zip(ids, excluded["results"], wider["results"], strict=True):
        assert item not in got["ids"] and len(got["ids"]) == 12
        keep = [j for j, i in enumerate(ref["ids"]) if i != item][:12]
        assert got["ids"] == [ref["ids"][j] for j in keep]
        assert got["distances"] == [ref["distances"][j] for j in keep]


def test_batch_equals_singles(client: TestClient, db: dict[str, np.ndarray], split: Any) -> None:
    features = split.queries.features[:2].tolist()
    code = db["codes"][5].tolist()
    mixed = [{"features": features[0]}, {"code": code}, {"hex": _hex(db["codes"][[9]])[0]},
             {"id": 33, "exclude_self": True}, {"features": features[1]}, {"id": 34}]
    batch = _post(client, "/search", {"queries": mixed, "k": 9})["results"]
    singles = [_post(client, "/search", {"queries": [q], "k": 9})["results"][0] for q in mixed]
    assert batch == singles
    typed = [_post(client, "/search/features", {"features": [features[0]], "k": 9})["results"][0],
             _post(client, "/search/codes", {"codes": [code], "k": 9})["results"][0],
             _post(client, "/search/codes", {"hex": _hex(db["codes"][[9]]), "k": 9})["results"][0],
             _post(client, "/search/ids", {"ids": [33], "k": 9, "exclude_self": True})["results"][0],
             _post(client, "/search/features", {"features": [features[1]], "k": 9})["results"][0],
             _post(client, "/search/ids", {"ids": [34], "k": 9})["results"][0]]
    assert batch == typed
    typed_batch = _post(client, "/search/ids", {"ids": [33, 34, 33], "k": 9})["results"]
    assert typed_batch == [_post(client, "/search/ids", {"ids": [i], "k": 9})["results"][0] for i in (33, 34, 33)]


def test_single_domain_database(itq_run: Path) -> None:
    client = TestClient(create_app(itq_run, database="single", limits=LIMITS))
    codes = np.load(itq_run / "codes" / "target_train_codes.npy")
    labels = np.load(itq_run / "codes" / "target_train_labels.npy")
    assert client.get("/info").json()["database"] == "single"
    body = _post(client, "/search/codes", {"codes": codes[:3].tolist(), "k": 4})
    want_dist, want_ids = _brute_force(codes[:3], codes, 4)
    assert [r["ids"] for r in body["results"]] == want_ids.tolist()
    assert [r["distances"] for r in body["results"]] == want_dist.tolist()
    assert [r["labels"] for r in body["results"]] == labels[want_ids].tolist()


def test_saved_index(itq_run: Path, tmp_path: Path, db: dict[str, np.ndarray]) -> None:
    packed = pack_codes(db["codes"])
    BinaryIndex.from_packed(packed, BITS, "hnsw").save(tmp_path / "db.crbi")
    client = TestClient(create_app(itq_run, index=tmp_path / "db.crbi", limits=LIMITS))
    info = client.get("/info").json()
    assert info["kind"] == "hnsw" and info["index_file"] == "db.crbi" and info["labels_known"]
    by_id = _post(client, "/search/ids", {"ids": [5], "k": 3})["results"][0]
    assert by_id["distances"][0] == 0 and by_id["labels"] == db["labels"][by_id["ids"]].tolist()

    # An index of other codes, with its own ids: served, ids are the index's, labels unknown.
    other = packed[::-1].copy()
    BinaryIndex.from_packed(other, BITS, ids=np.arange(len(other)) * 10 + 7).save(tmp_path / "other.crbi")
    client = TestClient(create_app(itq_run, index=tmp_path / "other.crbi", limits=LIMITS))
    info = client.get("/info").json()
    assert not info["labels_known"] and "labels are not served" in info["labels_note"]
    result = _post(client, "/search/ids", {"ids": [17], "k": 2})["results"][0]
    assert result["labels"] is None and result["distances"][0] == 0 and result["ids"][0] % 10 == 7
    assert client.post("/search/ids", json={"ids": [3], "k": 2}).status_code == 404

    # Index alone: no model, so feature search is refused with a reason.
    alone = TestClient(create_app(None, index=tmp_path / "db.crbi", limits=LIMITS))
    assert alone.get("/info").json()["feature_search"] is False
    response = alone.post("/search/features", json={"features": [[0.0] * 64]})
    assert response.status_code == 422 and response.json()["error"] == "no_model"

    BinaryIndex.from_packed(pack_codes(np.ones((4, 32))), 32).save(tmp_path / "bits32.crbi")
    with pytest.raises(ConfigError, match="32-bit"):
        create_app(itq_run, index=tmp_path / "bits32.crbi")


def test_startup_errors(tmp_path: Path, itq_run: Path) -> None:
    with pytest.raises(CrossretError, match=r"metrics\.json"):
        create_app(tmp_path)
    with pytest.raises(ConfigError, match="database"):
        create_app(itq_run, database="both")
    with pytest.raises(ConfigError, match="max_k"):
        create_app(itq_run, limits=ServiceLimits(max_k=0))
    with pytest.raises(ConfigError, match="run directory"):
        create_app(None)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch, itq_run: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'crossret\[serve\]'") as info:
        create_app(itq_run)
    assert info.value.extra == "serve" and isinstance(info.value, ImportError)


def test_cli_serve_is_registered() -> None:
    from typer.testing import CliRunner

    from crossret.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--database", "--index", "--max-k", "--max-batch", "--max-body-bytes",
                   "--request-timeout", "--max-concurrent", "--max-connections"):
        assert option in result.output


# ------------------------------------------------------------------------------------------- validation
_F = [0.5] * 64
_C = [1] * BITS
_JSON = {"content-type": "application/json"}

# (name, path, body (dict -> JSON; bytes -> raw), headers, status, error kind, words the message must contain)
VALIDATION = [
    ("feature dimension", "/search/features", {"features": [[0.5] * 63]}, None, 422, "dimension_mismatch",
     ["63", "dimension 64"]),
    ("ragged features", "/search/features", {"features": [_F, _F[:10]]}, None, 422, "dimension_mismatch",
     ["features[1]", "10 values"]),
    ("feature as string", "/search/features", {"features": [["0.5"] * 64]}, None, 422, "invalid_request",
     ["features[0][0]", "number"]),
    ("feature as boolean", "/search/features", {"features": [[True] * 64]}, None, 422, "invalid_request",
     ["features[0][0]", "number"]),
    ("feature NaN", "/search/features", b'{"features": [[NaN' + b", 0.5" * 63 + b"]]}", _JSON, 422,
     "invalid_request", ["features[0][0]", "finite"]),
    ("feature Infinity", "/search/features", b'{"features": [[0.5, -Infinity' + b", 0.5" * 62 + b"]]}", _JSON,
     422, "invalid_request", ["features[0][1]", "finite"]),
    ("feature beyond float32", "/search/features", {"features": [[*_F[:5], 1e39, *_F[6:]]]}, None, 422,
     "non_finite", ["features[0][5]", "float32"]),
    ("features not a matrix", "/search/features", {"features": _F}, None, 422, "invalid_request",
     ["features[0]", "list"]),
    ("code length", "/search/codes", {"codes": [[1] * 19]}, None, 422, "code_length", ["19 values", "20-bit"]),
    ("code value 2", "/search/codes", {"codes": [[2, *_C[1:]]]}, None, 422, "invalid_code", ["codes[0]", "±1"]),
    ("code mixes -1, 0, 1", "/search/codes", {"codes": [[-1, 0, *_C[2:]]]}, None, 422, "invalid_code",
     ["codes[0]", "0/1"]),
    ("code as float", "/search/codes", {"codes": [[1.0] * BITS]}, None, 422, "invalid_request",
     ["codes[0][0]", "integer"]),
    ("hex length", "/search/codes", {"hex": ["ffff"]}, None, 422, "code_length", ["hex[0]", "6"]),
    ("hex digits", "/search/codes", {"hex": ["ffffzz"]}, None, 422, "invalid_hex", ["hex[0]", "hex"]),
    ("hex padding bits", "/search/codes", {"hex": ["fffff1"]}, None, 422, "invalid_hex", ["hex[0]", "20-bit"]),
    ("codes and hex", "/search/codes", {"codes": [_C], "hex": ["ffff0f"]}, None, 422, "invalid_request",
     ["exactly one", "codes", "hex"]),
    ("neither codes nor hex", "/search/codes", {"k": 3}, None, 422, "invalid_request", ["exactly one"]),
    ("k = 0", "/search/codes", {"codes": [_C], "k": 0}, None, 422, "invalid_k", ["k must be >= 1"]),
    ("k negative", "/search/codes", {"codes": [_C], "k": -4}, None, 422, "invalid_k", ["k must be >= 1"]),
    ("k above max_k", "/search/codes", {"codes": [_C], "k": 2001}, None, 422, "invalid_k", ["max_k=2000"]),
    ("k above index size", "/search/codes", {"codes": [_C], "k": 899}, None, 422, "invalid_k",
     ["index size", "898"]),
    ("k not an integer", "/search/codes", {"codes": [_C], "k": 2.5}, None, 422, "invalid_request",
     ["k", "integer"]),
    ("k as string", "/search/codes", {"codes": [_C], "k": "5"}, None, 422, "invalid_request", ["k", "integer"]),
    ("k as boolean", "/search/codes", {"codes": [_C], "k": True}, None, 422, "invalid_request", ["k", "integer"]),
    ("k with exclude_self = size", "/search/ids", {"ids": [1], "k": 898, "exclude_self": True}, None, 422,
     "invalid_k", ["897 other items"]),
    ("batch too large", "/search/codes", {"codes": [_C] * 9}, None, 422, "batch_too_large", ["9 queries", "8"]),
    ("empty batch", "/search/codes", {"codes": []}, None, 422, "empty_batch", ["no queries"]),
    ("too many results", "/search/codes", {"codes": [_C] * 5, "k": 100}, None, 422, "too_many_results",
     ["500 results", "400"]),
    ("unknown item id", "/search/ids", {"ids": [3, 898]}, None, 404, "unknown_id", ["ids[1]=898", "0..897"]),
    ("huge item id", "/search/ids", {"ids": [10**30]}, None, 404, "unknown_id", [str(10**30)]),
    ("negative item id", "/search/ids", {"ids": [-1]}, None, 422, "invalid_id", ["ids[0]", ">= 0"]),
    ("item id as string", "/search/ids", {"ids": ["3"]}, None, 422, "invalid_request", ["ids[0]", "integer"]),
    ("unknown field", "/search/codes", {"codes": [_C], "radius": 2}, None, 422, "invalid_request",
     ["unknown field 'radius'"]),
    ("unknown field in a query", "/search", {"queries": [{"id": 1, "bits": 3}]}, None, 422, "invalid_request",
     ["unknown field 'queries[0].bits'"]),
    ("missing field", "/search/ids", {"k": 3}, None, 422, "invalid_request", ["missing required field 'ids'"]),
    ("query with two kinds", "/search", {"queries": [{"id": 1, "code": _C}]}, None, 422, "invalid_query",
     ["queries[0]", "exactly one", "code, id"]),
    ("query with no kind", "/search", {"queries": [{}]}, None, 422, "invalid_query", ["queries[0]", "none"]),
    ("exclude_self without id", "/search", {"queries": [{"code": _C, "exclude_self": True}]}, None, 422,
     "invalid_query", ["queries[0].code", "exclude_self"]),
    ("body not an object", "/search/ids", [1, 2], None, 422, "invalid_request", ["JSON object"]),
    ("invalid JSON", "/search/ids", b'{"ids": [1,', _JSON, 400, "invalid_json", ["not valid JSON"]),
    ("empty body", "/search/ids", b"", _JSON, 400, "invalid_json", ["not valid JSON"]),
    ("not JSON content type", "/search/ids", b"ids=1", {"content-type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", ["application/json", "x-www-form-urlencoded"]),
    ("body over the limit", "/search/codes", {"codes": [_C] * 2000}, None, 413, "body_too_large",
     ["65536 bytes"]),
    ("bad Content-Length", "/search/ids", b"{}", {**_JSON, "content-length": "-5"}, 400, "invalid_content_length",
     ["Content-Length"]),
    ("unknown endpoint", "/search/everything", {"ids": [1]}, None, 404, "not_found", ["/search/everything"]),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "kind", "words"),
                         [pytest.param(*case[1:], id=case[0]) for case in VALIDATION])
def test_validation_errors(client: TestClient, path: str, body: Any, headers: dict[str, str] | None, status: int,
                           kind: str, words: list[str]) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers=headers)
    else:
        response = client.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["error"] == kind
    for word in words:
        assert word in payload["detail"], (word, payload["detail"])


@pytest.fixture(scope="module")
def live_server(itq_run: Path) -> Any:
    """The app under a real uvicorn server on a loopback port (a thread of this process)."""
    uvicorn = pytest.importorskip("uvicorn", reason="pip install 'crossret[serve]'")
    server = uvicorn.Server(uvicorn.Config(create_app(itq_run, limits=LIMITS), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    assert server.started
    yield server.servers[0].sockets[0].getsockname()[:2]
    server.should_exit = True
    thread.join(timeout=10)


def _raw_request(address: tuple[str, int], head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request head and body chunks over a raw socket; return what the server answers."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(head)
        for chunk in chunks:
            conn.sendall(chunk)
        received = b""
        while b"\r\n\r\n" not in received or b'"}' not in received:
            data = conn.recv(65536)
            if not data:
                break
            received += data
    return received


def test_oversize_body_is_refused_before_it_is_read(live_server: tuple[str, int]) -> None:
    # Declared too large: answered at once, without a byte of body being sent.
    head = (b"POST /search/ids HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n")
    answer = _raw_request(live_server, head, [])
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer
    # Chunked (no length): 68 KiB of a body that never ends; the server must answer once it passes 64 KiB
    # (waiting for the end would time out here). Sending no more than that keeps unread data (and a
    # connection reset) out of the way of the answer.
    head = (b"POST /search/ids HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
    answer = _raw_request(live_server, head, [chunk] * 17)
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer


def test_live_server_answers_like_the_test_client(live_server: tuple[str, int], client: TestClient) -> None:
    import httpx

    body = {"ids": [1, 2, 3], "k": 5, "exclude_self": True}
    with httpx.Client(base_url=f"http://{live_server[0]}:{live_server[1]}") as http:
        live = http.post("/search/ids", json=body)
        assert live.status_code == 200 and live.json() == client.post("/search/ids", json=body).json()
        assert http.post("/search/ids", json={"ids": [5000]}).status_code == 404


def test_wrong_method(client: TestClient) -> None:
    response = client.get("/search")
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"
    assert client.post("/health", json={}).status_code == 405


def test_garbage_never_gives_500(client: TestClient) -> None:
    rng = np.random.default_rng(7)
    values: list[Any] = [None, True, 0, -1, 2**70, 1.5, "x", "", [], {}, [[]], [None], [[1.0, "a"]], {"a": 1},
                         "ff" * 3, [_C], [[0.1] * 64], [_F, _F]]
    keys = ["features", "codes", "hex", "ids", "queries", "k", "exclude_self", "return_codes", "id", "code"]
    for _ in range(150):
        body = {str(rng.choice(keys)): values[int(rng.integers(len(values)))] for _ in range(int(rng.integers(1, 4)))}
        path = str(rng.choice(["/search", "/search/features", "/search/codes", "/search/ids"]))
        response = client.post(path, json=body)
        assert response.status_code < 500, (path, body, response.text)
        if response.status_code != 200:
            assert response.json()["detail"]
    huge = b"9" * 5000  # beyond Python's int/str conversion limit
    for raw in (b"\xff\xfe", b"null", b"[]", b'"s"', b"1e999", b'{"ids": [1]}' * 2, b"{" * 5000,
                b'{"ids": [1], "k": ' + huge + b"}", b'{"ids": [' + huge + b"]}", b'{"ids": [-' + huge + b"]}"):
        response = client.post("/search/ids", content=raw, headers=_JSON)
        assert 400 <= response.status_code < 500, (raw[:20], response.text)


# ------------------------------------------------------------------------------------------- state
def test_read_only(itq_run: Path, client: TestClient) -> None:
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in itq_run.rglob("*")}
    _post(client, "/search/ids", {"ids": [1, 2], "k": 3})
    client.get("/info")
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in itq_run.rglob("*")}
    assert before == after


def test_reload_swaps_atomically(itq_run: Path) -> None:
    app = create_app(itq_run, limits=LIMITS)
    client = TestClient(app)
    state = app.state.service
    sizes = {"cross": len(np.load(itq_run / "codes" / "source_codes.npy")),
             "single": len(np.load(itq_run / "codes" / "target_train_codes.npy"))}
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            body = client.post("/search/ids", json={"ids": [0, 1], "k": 3}).json()
            seen.append((body["generation"], body["size"]))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for database in ("single", "cross", "single"):
            info = state.reload(database=database)
            assert info["size"] == sizes[database]
    finally:
        stop.set()
        thread.join()
    assert state.info()["generation"] == 3
    expected = {0: sizes["cross"], 1: sizes["single"], 2: sizes["cross"], 3: sizes["single"]}
    assert seen and all(expected[generation] == size for generation, size in seen)
    with pytest.raises(CrossretError):
        state.reload(run_dir=itq_run / "missing")
    assert state.info()["generation"] == 3 and state.info()["database"] == "single"  # the old snapshot stays
    assert json.loads(json.dumps(state.info()))  # info stays JSON-serialisable
