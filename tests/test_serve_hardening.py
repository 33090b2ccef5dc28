"""Hardening of the search service (crossret.serve): hostile bodies and limits on every endpoint, the
request timeout and the server's bounds on slow clients, no route that reaches the file system,
snapshot consistency under concurrent reloads, and a schemathesis run against the OpenAPI schema."""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the search service needs the 'serve' extra: pip install 'crossret[serve]'")
pytest.importorskip("httpx", reason="fastapi.testclient needs httpx: pip install 'crossret[serve]'")

from fastapi.testclient import TestClient

from crossret.errors import ConfigError
from crossret.experiment import RunConfig, run_experiment
from crossret.retrieval import BinaryIndex, pack_codes
from crossret.serve import ServiceLimits, create_app
from crossret.serve.app import ROUTES, AdmissionMiddleware, ServerSettings, connection_cap, server_config
from crossret.serve.state import Query, RequestError

BITS = 20
SIZE = 898  # the demo benchmark's source domain (the cross-domain database)
DIM = 64
LIMITS = ServiceLimits(max_k=50, max_batch=8, max_body_bytes=4 * 1024 * 1024, max_results=200,
                       request_timeout=20.0, max_concurrent=2)
_JSON = {"content-type": "application/json"}
_C = [1, -1] * (BITS // 2)
_F = [0.25] * DIM
_HEX = "a5f00f"  # a valid 20-bit code: the last byte's high digit is 0


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def itq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve_hardening") / "itq"
    run_experiment(RunConfig(method="itq", benchmark="demo", bits=BITS, out_dir=str(out),
                             method_config={"n_iter": 5}))
    return out


@pytest.fixture(scope="module")
def app(itq_run: Path) -> Any:
    return create_app(itq_run, limits=LIMITS)


@pytest.fixture(scope="module")
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def _error(response: Any, status: int, kind: str) -> str:
    """Assert a small JSON error answer of this status and kind; return its detail."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    assert len(response.content) < 1000, len(response.content)  # nothing a client sent is echoed at length
    payload = response.json()
    assert set(payload) == {"error", "detail"} and payload["error"] == kind, payload
    assert payload["detail"]
    return payload["detail"]


# ------------------------------------------------------------------------------------------- 1. limits
_BIG = str(10**1000).encode()
_HUGE = b"1" + b"0" * 4999  # beyond Python's int-from-string limit (4300 digits) and jiter's
_N = 1_000_000

# (name, path, raw body, status, error kind). Bodies up to ~3.5 MB: inside the 4 MiB limit, so they are parsed.
HOSTILE = [
    *[(f"k=1e308 {path}", path, body, 422, "invalid_request") for path, body in [
        ("/search/ids", b'{"ids": [1], "k": 1e308}'), ("/search/codes", b'{"hex": ["a5f00f"], "k": 1e308}'),
        ("/search/features", b'{"features": [[' + b"0.5," * 63 + b'0.5]], "k": 1e308}'),
        ("/search", b'{"queries": [{"id": 1}], "k": 1e308}')]],
    *[(f"k=10**1000 {path}", path, body, 422, "invalid_k") for path, body in [
        ("/search/ids", b'{"ids": [1], "k": ' + _BIG + b"}"),
        ("/search/codes", b'{"hex": ["a5f00f"], "k": ' + _BIG + b"}"),
        ("/search/features", b'{"features": [[' + b"0.5," * 63 + b'0.5]], "k": ' + _BIG + b"}"),
        ("/search", b'{"queries": [{"id": 1}], "k": ' + _BIG + b"}")]],
    ("k=-10**1000", "/search/ids", b'{"ids": [1], "k": -' + _BIG + b"}", 422, "invalid_k"),
    ("k=10**5000", "/search", b'{"queries": [{"id": 1}], "k": ' + _HUGE + b"}", 400, "invalid_json"),
    ("id=10**4299", "/search/ids", b'{"ids": [1' + b"0" * 4299 + b"]}", 404, "unknown_id"),
    ("mixed id=10**4299", "/search", b'{"queries": [{"id": 1' + b"0" * 4299 + b"}]}", 404, "unknown_id"),
    ("mixed id=-10**4298", "/search", b'{"queries": [{"id": -1' + b"0" * 4298 + b"}]}", 422, "invalid_id"),
    ("code value 10**4299", "/search/codes", b'{"codes": [[1' + b"0" * 4299 + b",1" * 19 + b"]]}", 422,
     "invalid_code"),
    ("mixed code value 2**64", "/search", b'{"queries": [{"code": [18446744073709551616' + b",1" * 19 + b"]}]}",
     422, "invalid_code"),
    ("feature 10**4299", "/search/features", b'{"features": [[1' + b"0" * 4299 + b",0" * 63 + b"]]}", 422,
     "invalid_request"),
    ("1e6 nested lists", "/search/ids", b'{"ids": ' + b"[" * _N + b"]" * _N + b"}", 422, "too_many_values"),
    ("1e6 nested lists, mixed", "/search", b'{"queries": [{"code": ' + b"[" * _N + b"]" * _N + b"}]}", 422,
     "too_many_values"),
    ("1e6 unclosed lists", "/search/features", b"[" * _N, 422, "too_many_values"),
    ("deep nesting", "/search/codes", b'{"codes": ' + b"[" * 2 + b"[" * 300 + b"]" * 302 + b"}",
     422, "too_many_values"),
    ("1e5 nested objects, mixed", "/search", b'{"queries": [' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"]}",
     422, "too_many_values"),
    ("1e6 ids", "/search/ids", b'{"ids": [' + b"0," * (_N - 1) + b"0]}", 422, "too_many_values"),
    ("1e6 features in one row", "/search/features", b'{"features": [[' + b"0," * (_N - 1) + b"0]]}", 422,
     "too_many_values"),
    ("1e6 features in one mixed query", "/search", b'{"queries": [{"features": [' + b"0," * (_N - 1) + b"0]}]}",
     422, "too_many_values"),
    ("5e5 empty rows", "/search/features", b'{"features": [' + b"[]," * 500_000 + b"[]]}", 422, "too_many_values"),
    ("5e5 empty queries", "/search", b'{"queries": [' + b"{}," * 500_000 + b"{}]}", 422, "too_many_values"),
    ("3 MB hex string", "/search/codes", b'{"hex": ["' + b"a" * 3_000_000 + b'"]}', 422, "code_length"),
    ("3 MB hex string, mixed", "/search", b'{"queries": [{"hex": "' + b"f" * 3_000_000 + b'"}]}', 422, "code_length"),
    ("3 MB field name", "/search/ids", b'{"' + b"x" * 3_000_000 + b'": 1, "ids": [1]}', 422, "invalid_request"),
    ("3 MB field name in a query", "/search", b'{"queries": [{"' + b"x" * 3_000_000 + b'": 1}]}', 422,
     "invalid_request"),
    ("3 MB string as k", "/search/ids", b'{"ids": [1], "k": "' + b"9" * 3_000_000 + b'"}', 422, "invalid_request"),
    ("hex too short", "/search/codes", b'{"hex": ["a5f0"]}', 422, "code_length"),
    ("hex too long", "/search/codes", b'{"hex": ["a5f00f00"]}', 422, "code_length"),
    ("hex odd length, mixed", "/search", b'{"queries": [{"hex": "a5f00"}]}', 422, "code_length"),
    ("hex empty, mixed", "/search", b'{"queries": [{"hex": ""}]}', 422, "code_length"),
    ("hex of non-ASCII digits", "/search/codes", '{"hex": ["a5\u0660\u0661ff"]}'.encode(), 422, "invalid_hex"),
    ("hex with spaces", "/search/codes", b'{"hex": ["a5 00f"]}', 422, "invalid_hex"),
    ("hex with a bit past 20", "/search", b'{"queries": [{"hex": "a5f01f"}]}', 422, "invalid_hex"),
    ("mixed batch over max_batch", "/search", json.dumps({"queries": [{"id": i} for i in range(9)]}).encode(), 422,
     "batch_too_large"),
    ("mixed batch, k over max_k", "/search", b'{"queries": [{"id": 1}], "k": 51}', 422, "invalid_k"),
    ("mixed batch, queries x k over max_results", "/search",
     json.dumps({"queries": [{"id": i} for i in range(5)], "k": 41}).encode(), 422, "too_many_results"),
    ("mixed batch, k = size with exclude_self and a hex query", "/search",
     b'{"queries": [{"hex": "a5f00f"}, {"id": 3, "exclude_self": true}], "k": 898}', 422, "invalid_k"),
    ("mixed batch, feature vector too short", "/search", b'{"queries": [{"id": 2}, {"features": [1.0, 2.0]}]}', 422,
     "dimension_mismatch"),
    ("mixed batch, code too long", "/search", json.dumps({"queries": [{"code": [1] * 21}]}).encode(), 422,
     "code_length"),
]


@pytest.mark.parametrize(("path", "body", "status", "kind"), [pytest.param(*case[1:], id=case[0]) for case in HOSTILE])
def test_hostile_bodies_get_a_small_4xx_quickly(client: TestClient, path: str, body: bytes, status: int,
                                                kind: str) -> None:
    assert len(body) < LIMITS.max_body_bytes  # within the byte limit: these reach the parser
    start = time.perf_counter()
    response = client.post(path, content=body, headers=_JSON)
    elapsed = time.perf_counter() - start
    _error(response, status, kind)
    assert elapsed < 5.0, elapsed  # ~0.05 s each here; parsing 1e6 values took 1-10 s and up to 0.5 GB before


_BATCHES = {  # per endpoint: a valid request of n queries
    "/search": lambda n, k: {"queries": [{"id": i} if i % 2 else {"hex": _HEX} for i in range(n)], "k": k},
    "/search/features": lambda n, k: {"features": [_F] * n, "k": k},
    "/search/codes": lambda n, k: {"codes": [_C] * n, "k": k},
    "/search/ids": lambda n, k: {"ids": list(range(n)), "k": k},
}


@pytest.mark.parametrize("path", list(_BATCHES))
def test_every_endpoint_enforces_the_limits(client: TestClient, path: str) -> None:
    make = _BATCHES[path]
    ok = client.post(path, json=make(LIMITS.max_batch, 25))  # 8 x 25 = max_results exactly
    assert ok.status_code == 200 and len(ok.json()["results"]) == LIMITS.max_batch
    assert "batch of 9 queries" in _error(client.post(path, json=make(9, 1)), 422, "batch_too_large")
    assert "no queries" in _error(client.post(path, json=make(0, 1)), 422, "empty_batch")
    assert "max_k=50" in _error(client.post(path, json=make(1, 51)), 422, "invalid_k")
    assert ">= 1" in _error(client.post(path, json=make(1, 0)), 422, "invalid_k")
    assert "200 results" in _error(client.post(path, json=make(5, 41)), 422, "too_many_results")
    _error(client.post(path, json=make(1, 2.0)), 422, "invalid_request")  # 2.0 is not an integer
    big = json.dumps(make(1, 1))[:-1].encode() + b', "pad": "' + b" " * LIMITS.max_body_bytes + b'"}'
    assert "4194304 bytes" in _error(client.post(path, content=big, headers=_JSON), 413, "body_too_large")


def _asgi(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes],
          stall: bool = False) -> tuple[int, dict[bytes, bytes], bytes, float]:
    """Drive the ASGI app directly (headers exactly as given); ``stall``: the body never finishes."""
    import anyio

    sent: list[dict[str, Any]] = []

    async def main() -> None:
        queue = list(chunks)

        async def receive() -> dict[str, Any]:
            if queue:
                return {"type": "http.request", "body": queue.pop(0), "more_body": bool(queue) or stall}
            if stall:
                await anyio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        await app(scope, receive, send)

    start = time.perf_counter()
    anyio.run(main)
    elapsed = time.perf_counter() - start
    head = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return head["status"], dict(head["headers"]), body, elapsed


@pytest.mark.parametrize(("length", "status", "kind"), [
    (b"9" * 5000, 413, "body_too_large"),  # a valid number too long for int(): no ValueError -> 500
    (b"99999999999999999999", 413, "body_too_large"),
    (b"1_0", 400, "invalid_content_length"),  # int() would take it
    (b"+5", 400, "invalid_content_length"),
    (b"-5", 400, "invalid_content_length"),
    (b"0x10", 400, "invalid_content_length"),
    (b"", 400, "invalid_content_length"),
])
def test_malformed_or_huge_content_length(app: Any, length: bytes, status: int, kind: str) -> None:
    for method, path in (("POST", "/search/ids"), ("GET", "/info")):
        got, _, body, _ = _asgi(app, method, path, [(b"content-type", b"application/json"),
                                                    (b"content-length", length)], [b'{"ids": [1]}'])
        assert got == status and json.loads(body)["error"] == kind


# ------------------------------------------------------------------------------------------- 2. timeouts
def test_limits_validate_the_timeout_and_concurrency(app: Any) -> None:
    for bad in (0, -1.0, float("nan"), float("inf"), True, "5", 86_401):
        with pytest.raises(ConfigError, match="request_timeout"):
            ServiceLimits(request_timeout=bad).validate()
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="max_concurrent"):
            ServiceLimits(max_concurrent=bad).validate()
    defaults = ServiceLimits()
    assert defaults.request_timeout == 30.0 and 2 <= defaults.max_concurrent <= 8
    limits = TestClient(app).get("/info").json()["limits"]
    assert limits == {"max_k": 50, "max_batch": 8, "max_body_bytes": 4 * 1024 * 1024, "max_results": 200,
                      "request_timeout": 20.0, "max_concurrent": 2}


def test_a_body_that_never_finishes_gets_408(itq_run: Path) -> None:
    app = create_app(itq_run, limits=ServiceLimits(request_timeout=0.4))
    status, headers, body, elapsed = _asgi(app, "POST", "/search/ids", [(b"content-type", b"application/json")],
                                           [b'{"ids": [1'], stall=True)
    assert status == 408 and json.loads(body)["error"] == "body_timeout" and "0.4 s" in json.loads(body)["detail"]
    assert headers[b"connection"] == b"close"
    assert 0.35 < elapsed < 3.0, elapsed


class _Gate:
    """Makes a snapshot's index search block until released (or ``hold`` seconds pass); counts calls."""

    def __init__(self, index: Any, monkeypatch: pytest.MonkeyPatch, hold: float = 20.0) -> None:
        self.release = threading.Event()
        self.calls = 0
        self.finished = 0
        original = index.search

        def slow(packed: np.ndarray, k: int) -> Any:
            self.calls += 1
            self.release.wait(hold)
            self.finished += 1
            return original(packed, k)

        monkeypatch.setattr(index, "search", slow)


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_slow_search_answers_503_at_the_deadline_and_the_service_recovers(itq_run: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(itq_run, limits=ServiceLimits(request_timeout=0.5, max_concurrent=2))
    state, slots = app.state.service, app.state.work_slots
    gate = _Gate(state.snapshot().index, monkeypatch)
    with TestClient(app) as client:
        start = time.perf_counter()
        response = client.post("/search/ids", json={"ids": [1, 2], "k": 3})
        elapsed = time.perf_counter() - start
        detail = _error(response, 503, "timeout")
        assert "0.5 s" in detail and "retry" in detail and response.headers["retry-after"] == "1"
        assert 0.45 < elapsed < 3.0, elapsed  # answered at the deadline, not when the search ends
        assert gate.calls == 1 and gate.finished == 0 and slots.running == 1  # the worker is still stuck
        # Meanwhile the service answers: liveness and info never wait for a worker.
        assert client.get("/health").status_code == 200 and client.get("/info").status_code == 200
        gate.release.set()
        _wait_for(lambda: slots.running == 0)  # the abandoned worker saw its deadline and stopped
        assert gate.finished == 1
        ok = client.post("/search/ids", json={"ids": [1, 2], "k": 3})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 2


def test_requests_queue_for_a_compute_slot_within_their_deadline(itq_run: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(itq_run, limits=ServiceLimits(request_timeout=0.5, max_concurrent=1))
    slots = app.state.work_slots
    gate = _Gate(app.state.service.snapshot().index, monkeypatch)
    with TestClient(app) as client:
        _error(client.post("/search/ids", json={"ids": [1]}), 503, "timeout")
        assert slots.running == 1  # the timed-out search still holds the only slot ...
        gate.release.clear()
        calls = gate.calls
        start = time.perf_counter()
        _error(client.post("/search/codes", json={"hex": [_HEX]}), 503, "timeout")  # ... so this one waits, then 503
        assert gate.calls == calls and time.perf_counter() - start > 0.4  # it never started searching
        gate.release.set()
        _wait_for(lambda: slots.running == 0)
        assert client.post("/search/codes", json={"hex": [_HEX]}).status_code == 200


def test_search_stops_at_its_deadline_between_chunks(itq_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(itq_run, limits=ServiceLimits(max_batch=1000, max_results=10_000, request_timeout=0.2))
    state = app.state.service
    queries = [Query("id", i, f"ids[{i}]") for i in range(700)]  # 3 chunks of <= 256 queries
    with pytest.raises(RequestError) as caught:
        state.search(queries, 5, deadline=time.monotonic() - 1)
    assert caught.value.status == 503 and caught.value.kind == "timeout"
    gate = _Gate(state.snapshot().index, monkeypatch, hold=0.3)  # each chunk takes 0.3 s > the 0.2 s left
    with pytest.raises(RequestError, match="request timeout"):
        state.search(queries, 5, deadline=time.monotonic() + 0.2)
    assert gate.calls == 1  # stopped after the first chunk, not after all three
    answer = state.search(queries, 5, deadline=time.monotonic() + 60)  # chunked search = one search
    monkeypatch.undo()
    assert answer == state.search(queries, 5)


def test_server_settings_and_uvicorn_config(app: Any) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    from uvicorn.protocols.http.h11_impl import H11Protocol

    defaults = ServerSettings()
    assert (defaults.keep_alive_timeout, defaults.header_timeout, defaults.max_connections, defaults.max_requests,
            defaults.backlog, defaults.max_header_bytes, defaults.shutdown_timeout) == (5.0, 5.0, 2048, 128, 256,
                                                                                        16384, 10.0)
    config = server_config(app, port=0, settings=ServerSettings(keep_alive_timeout=2, header_timeout=3,
                                                                max_connections=7, max_requests=5, backlog=9,
                                                                max_header_bytes=4096))
    assert isinstance(config, uvicorn.Config)
    # uvicorn's own cap (limit_concurrency) counts idle connections too: it is off, the protocol caps connections.
    assert (config.timeout_keep_alive, config.limit_concurrency, config.backlog, config.h11_max_incomplete_event_size,
            config.timeout_graceful_shutdown, config.access_log) == (2, None, 9, 4096, 10.0, False)
    assert isinstance(config.http, type) and issubclass(config.http, H11Protocol)
    assert isinstance(config.app, AdmissionMiddleware) and config.app.max_requests == 5 and config.app.app is app
    for bad in (ServerSettings(header_timeout=0), ServerSettings(keep_alive_timeout=float("inf")),
                ServerSettings(max_connections=1), ServerSettings(max_requests=0), ServerSettings(max_header_bytes=10)):
        with pytest.raises(ConfigError, match="server setting"):
            bad.validate()


def test_cli_passes_the_timeout_and_server_bounds(itq_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import crossret.serve.app as app_module
    from crossret.cli import app as cli

    served: dict[str, Any] = {}
    monkeypatch.setattr(app_module, "run_server", lambda service, **kwargs: served.update(service=service, **kwargs))
    result = CliRunner().invoke(cli, ["serve", str(itq_run), "--request-timeout", "2.5", "--max-concurrent", "3",
                                      "--max-connections", "9", "--max-requests", "4", "--port", "0"])
    assert result.exit_code == 0, result.output
    limits = served["service"].state.service.limits
    assert (limits.request_timeout, limits.max_concurrent) == (2.5, 3)
    settings = served["settings"]
    assert (settings.max_connections, settings.max_requests, settings.header_timeout) == (9, 4, 5.0)
    assert CliRunner().invoke(cli, ["serve", str(itq_run), "--port", "0"]).exit_code == 0
    assert (served["settings"].max_connections, served["settings"].max_requests) == (2048, 128)
    for bad in (["--request-timeout", "0"], ["--request-timeout", "nan"], ["--max-concurrent", "0"],
                ["--max-connections", "1"], ["--max-requests", "0"]):
        assert CliRunner().invoke(cli, ["serve", str(itq_run), *bad]).exit_code != 0
    assert "--request-timeout" in CliRunner().invoke(cli, ["serve", "--help"]).output


@contextlib.contextmanager
def _serving(app: Any, settings: ServerSettings) -> Iterator[tuple[Any, tuple[str, int]]]:
    """``app`` under the real server configuration, on a loopback port (a thread of this process): the
    ``uvicorn.Server`` and its address."""
    uvicorn = pytest.importorskip("uvicorn")
    config = server_config(app, host="127.0.0.1", port=0, log_level="critical", settings=settings)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started)
    try:
        yield server, server.servers[0].sockets[0].getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def _live(app: Any, settings: ServerSettings) -> Iterator[tuple[str, int]]:
    """``app`` under the real server configuration, on a loopback port: its address."""
    with _serving(app, settings) as (_, address):
        yield address


def _closed_within(conn: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Read until the server closes the connection; return what it sent and when it closed."""
    conn.settimeout(seconds)
    start, received = time.perf_counter(), b""
    with contextlib.suppress(ConnectionResetError):
        while data := conn.recv(65536):
            received += data
    return received, time.perf_counter() - start


_GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.slow  # waits out real header and keep-alive timeouts
def test_live_server_cuts_off_slow_and_idle_clients(itq_run: Path) -> None:
    app = create_app(itq_run, limits=ServiceLimits(request_timeout=0.6))
    settings = ServerSettings(keep_alive_timeout=0.5, header_timeout=0.6, max_header_bytes=4096)
    with _live(app, settings) as address:
        # A connection that never sends a request, and one that sends half a request head: closed at 0.6 s.
        with socket.create_connection(address) as silent, socket.create_connection(address) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            for conn in (silent, slow):
                received, elapsed = _closed_within(conn, 5.0)
                assert received == b"" and elapsed < 4.0
        # Trickling the head byte by byte does not extend the deadline (uvicorn's keep-alive timer alone would).
        with socket.create_connection(address) as trickle:
            start = time.perf_counter()
            with contextlib.suppress(OSError):
                for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200:
                    trickle.sendall(bytes([byte]))
                    time.sleep(0.02)
            received, _ = _closed_within(trickle, 5.0)
            assert received == b"" and time.perf_counter() - start < 5.0
        # An idle keep-alive connection: answered, then closed after 0.5 s.
        with socket.create_connection(address) as idle:
            idle.sendall(_GET_HEALTH)
            received, elapsed = _closed_within(idle, 5.0)
            assert received.startswith(b"HTTP/1.1 200") and elapsed < 4.0
        # A head that grows past max_header_bytes before it is complete: refused by the server (h11 bounds the
        # buffered part of a head; a complete head that arrives in one read of <= 256 KiB passes).
        with socket.create_connection(address) as big:
            big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000)
            received, _ = _closed_within(big, 5.0)
            assert received.startswith(b"HTTP/1.1 400")
        with socket.create_connection(address) as huge:
            with contextlib.suppress(OSError):
                huge.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 400_000 + b"\r\n\r\n")
            received, _ = _closed_within(huge, 5.0)
            assert received.startswith(b"HTTP/1.1 400")
        # A body that stops arriving: 408 with the JSON error at the request timeout.
        with socket.create_connection(address) as partial:
            partial.sendall(b"POST /search/ids HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"ids\": [1")
            received, elapsed = _closed_within(partial, 5.0)
            assert received.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in received and elapsed < 4.0
        # Several requests on one connection within the deadlines: all answered.
        with socket.create_connection(address) as keep:
            keep.settimeout(5.0)
            for _ in range(3):
                keep.sendall(_GET_HEALTH)
                answer = b""
                while not answer.endswith(b"}"):  # the head and the JSON body may come in separate reads
                    answer += keep.recv(65536)
                assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer


_PARTIAL_POST = (b"POST /search/ids HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"ids\": [1")  # a request in progress: its body never ends


def _answer(conn: socket.socket) -> bytes:
    """What the server sends until it closes ``conn`` (or 10 s pass)."""
    return _closed_within(conn, 10.0)[0]


def test_live_server_caps_connections(itq_run: Path) -> None:
    import httpx

    app = create_app(itq_run, limits=LIMITS)
    settings = ServerSettings(max_connections=3, header_timeout=30, keep_alive_timeout=30)
    with _serving(app, settings) as (server, address):
        url = f"http://{address[0]}:{address[1]}"
        # Idle connections at the cap: a new one closes the longest-idle, and is served.
        held = [socket.create_connection(address) for _ in range(3)]
        try:
            _wait_for(lambda: len(server.server_state.connections) >= 3)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            assert _closed_within(held[0], 5.0)[0] == b""  # the oldest was shed
            held[1].sendall(_GET_HEALTH)  # the others still work
            assert held[1].recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for conn in held:
                conn.close()
        # Every connection with a request in progress: a new connection is refused with a JSON 503, then closed.
        busy = [socket.create_connection(address) for _ in range(3)]
        try:
            for conn in busy:
                conn.sendall(_PARTIAL_POST)
            _wait_for(lambda: server.config.app.in_progress == 3)
            with socket.create_connection(address) as extra:
                extra.sendall(_GET_HEALTH)
                received = _answer(extra)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
            assert json.loads(body)["error"] == "overloaded" and "3 connections" in json.loads(body)["detail"]
        finally:
            for conn in busy:
                conn.close()
        _wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200)


def test_live_server_caps_requests_in_progress_not_health(itq_run: Path) -> None:
    import httpx

    app = create_app(itq_run, limits=LIMITS)
    with _serving(app, ServerSettings(max_requests=2)) as (server, address):
        url = f"http://{address[0]}:{address[1]}"
        busy = [socket.create_connection(address) for _ in range(2)]
        try:
            for conn in busy:
                conn.sendall(_PARTIAL_POST)
            _wait_for(lambda: server.config.app.in_progress == 2)
            refused = httpx.post(f"{url}/search/ids", json={"ids": [1]}, timeout=10)
            _error(refused, 503, "overloaded")
            assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
            # Bodiless reads are not counted: liveness and info answer while the requests are saturated.
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            assert httpx.get(f"{url}/info", timeout=10).status_code == 200
        finally:
            for conn in busy:
                conn.close()
        _wait_for(lambda: server.config.app.in_progress == 0)
        assert httpx.post(f"{url}/search/ids", json={"ids": [1]}, timeout=10).status_code == 200


def test_connection_cap_fits_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    resource = pytest.importorskip("resource")
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert connection_cap(2048) == 1024 - 64 and connection_cap(100) == 100
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert connection_cap(2048) == 2048


# ------------------------------------------------------------------------------------------- 2b. idle connections
class _Hog:
    """A bounded hostile client: holds ``n_idle`` connections that never send a byte and ``n_slow`` that trickle
    a request head one byte per tick (slow loris), and reopens any the server closes (at most ``reopen_per_s``
    a second). Stops on exit, or by itself after ``limit_s``."""

    _HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000

    def __init__(self, address: tuple[str, int], n_idle: int, n_slow: int, reopen_per_s: float = 200.0,
                 limit_s: float = 30.0) -> None:
        self.address, self.reopen_per_s, self.limit_s = address, reopen_per_s, limit_s
        self.slots: list[list[Any]] = [["idle", None, 0] for _ in range(n_idle)] + [
            ["slow", None, 0] for _ in range(n_slow)]
        self.opened = self.closed_by_server = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, slot: list[Any]) -> None:
        try:
            conn = socket.create_connection(self.address, timeout=5)
        except OSError:
            return
        conn.setblocking(False)
        slot[1], slot[2] = conn, 0
        self.opened += 1

    def _lost(self, slot: list[Any]) -> None:
        slot[1].close()
        slot[1] = None
        self.closed_by_server += 1

    def _tick(self, budget: float) -> float:
        for slot in self.slots:
            kind, conn, sent = slot
            if conn is None:
                if budget >= 1:
                    self._open(slot)
                    budget -= 1
                continue
            try:
                if kind == "slow" and sent < len(self._HEAD):
                    conn.send(self._HEAD[sent:sent + 1])
                    slot[2] += 1
                if conn.recv(65536) == b"":
                    self._lost(slot)
            except BlockingIOError:
                pass  # open, nothing to read
            except OSError:
                self._lost(slot)
        return budget

    def _run(self) -> None:
        end, budget, last = time.monotonic() + self.limit_s, 0.0, time.monotonic()
        while not self.stop.wait(0.05) and time.monotonic() < end:
            now = time.monotonic()
            budget = min(budget + (now - last) * self.reopen_per_s, self.reopen_per_s)
            last = now
            budget = self._tick(budget)

    @property
    def held(self) -> int:
        return sum(slot[1] is not None for slot in self.slots)

    def __enter__(self) -> _Hog:
        for slot in self.slots:
            self._open(slot)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for slot in self.slots:
            if slot[1] is not None:
                slot[1].close()


def _well_behaved(address: tuple[str, int], rounds: int) -> list[float]:
    """``rounds`` x (a new connection: GET /health, then POST /search on the same keep-alive connection); every
    answer must be 200. Returns each request's latency."""
    import http.client

    latencies = []
    for i in range(rounds):
        conn = http.client.HTTPConnection(*address, timeout=10)
        try:
            for method, path, body in (("GET", "/health", None),
                                       ("POST", "/search", json.dumps({"queries": [{"id": i}, {"hex": _HEX}],
                                                                       "k": 3}))):
                start = time.perf_counter()
                conn.request(method, path, body=body, headers=_JSON if body else {})
                response = conn.getresponse()
                payload = response.read()
                latencies.append(time.perf_counter() - start)
                assert response.status == 200, (i, method, path, response.status, payload[:200])
                if path == "/search":
                    assert len(json.loads(payload)["results"]) == 2
        finally:
            conn.close()
    return latencies


@pytest.mark.parametrize("case", ["defaults", "cap_reached"])
def test_idle_and_slow_connections_do_not_starve_real_requests(itq_run: Path, case: str) -> None:
    """190 connections that never finish a request head (160 silent, 30 slow loris; reopened when closed) must
    not make the service refuse a well-behaved client: with the default settings (the connection cap is not the
    binding limit), and with a cap far below the held connections (idle ones are closed to make room)."""
    app = create_app(itq_run, limits=LIMITS)
    if case == "defaults":
        settings, reopen_per_s = ServerSettings(), 200.0
    else:  # long timeouts: only the cap acts; the hog keeps ~60 connections more than the cap churning
        settings, reopen_per_s = ServerSettings(max_connections=32, header_timeout=30, keep_alive_timeout=30), 20.0
    with _serving(app, settings) as (server, address), _Hog(address, n_idle=160, n_slow=30,
                                                             reopen_per_s=reopen_per_s) as hog:
        _wait_for(lambda: len(server.server_state.connections) >= min(150, settings.max_connections))
        end = time.monotonic() + 3.0
        while case == "cap_reached" and hog.opened <= 200 and time.monotonic() < end:
            time.sleep(0.05)  # let the churn start: the hog's connections closed to make room, and reopened
        time.sleep(0.3)  # the slow heads are under way
        latencies = _well_behaved(address, rounds=10)
        assert max(latencies) < 3.0, latencies  # bounded: nobody waited for a hog's connection to time out
        if case == "defaults":
            assert hog.held >= 150 and len(server.server_state.connections) >= 150  # held open all along
        else:
            assert hog.closed_by_server > 0 and hog.opened > 200  # shed, and reopened
            assert len(server.server_state.connections) <= settings.max_connections + 8


# ------------------------------------------------------------------------------------------- 3. no file system
_ALLOWED_FIELDS = {"features", "codes", "hex", "ids", "queries", "code", "id", "k", "return_codes", "exclude_self"}


def test_routes_are_the_documented_ones_and_take_no_parameters(app: Any) -> None:
    from fastapi.routing import APIRoute
    from starlette.routing import Route

    seen = set()
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__} (a mount?)"
        assert "{" not in route.path and not route.param_convertors, route.path
        for method in route.methods or ():
            seen.add((method, route.path))
        if isinstance(route, APIRoute):
            dep = route.dependant
            assert not (dep.path_params or dep.query_params or dep.header_params or dep.cookie_params
                        or dep.body_params), route.path
    assert seen - {("HEAD", path) for _, path in ROUTES} == set(ROUTES)


def _walk(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _walk(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _walk(value)


def test_openapi_schema_has_no_path_like_input(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {(method.upper(), path) for path, ops in schema["paths"].items() for method in ops} == set(ROUTES) - {
        ("GET", "/openapi.json")}
    components = schema["components"]["schemas"]
    request_models = set()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert not op.get("parameters"), (method, path)  # no path, query, header or cookie parameters
            for status in ("400", "413"):
                assert op["responses"][status]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}
            if method == "post":
                body = op["requestBody"]
                assert body["required"] and list(body["content"]) == ["application/json"]
                request_models.add(body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1])
                assert {"408", "413", "415", "422", "503"} <= set(op["responses"])
    assert request_models == {"BatchRequest", "FeaturesRequest", "CodesRequest", "IdsRequest"}
    for name in [*request_models, "QueryItem"]:
        for node in _walk(components[name]):
            names = set(node.get("properties", {}))
            assert names <= _ALLOWED_FIELDS, names - _ALLOWED_FIELDS
            assert node.get("format") not in ("binary", "uri", "path")
            if node.get("type") == "string":  # the only strings are hex codes, pattern-bound
                assert node["pattern"] == "^[0-9a-fA-F]{4}0[0-9a-fA-F]$" and node["maxLength"] == 6
        assert components[name].get("additionalProperties") is False


def test_no_request_reaches_the_file_system(client: TestClient, itq_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import crossret.serve.state as state_module

    opened: list[str] = []
    real_open = builtins.open

    def watch_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a request loaded something: {args}")

    monkeypatch.setattr(builtins, "open", watch_open)
    monkeypatch.setattr(state_module, "load_snapshot", refuse)
    monkeypatch.setattr(BinaryIndex, "load", refuse)
    monkeypatch.setattr(np, "load", refuse)
    target = str(itq_run)
    for path in ("/search", "/search/ids", "/search/codes", "/search/features"):
        for field in ("run_dir", "path", "index", "file", "database"):
            _error(client.post(path, json={field: target, "ids": [1]}), 422, "invalid_request")
    for path in ("/reload", "/search/reload", f"/files{target}", "/static/x", "/docs", "/redoc"):
        for method in ("GET", "POST"):
            assert client.request(method, path, json={"run_dir": target}).status_code in (404, 405)
    # Query strings are not parameters of any route: ignored, the answer is the same.
    assert client.get("/info", params={"run_dir": "/", "index": "/etc/passwd"}).json() == client.get("/info").json()
    plain = client.post("/search/ids", json={"ids": [1]}).json()
    assert client.post("/search/ids", params={"run_dir": "/"}, json={"ids": [1]}).json() == plain
    assert opened == []


# ------------------------------------------------------------------------------------------- 4. reload
def test_reload_under_load_never_mixes_snapshots(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    # Two indexes that differ in everything a response shows: code length, size, ids, neighbours.
    a_codes = np.where(rng.random((300, 20)) < 0.5, 1, -1)
    b_codes = np.where(rng.random((500, 32)) < 0.5, 1, -1)
    BinaryIndex.from_packed(pack_codes(a_codes), 20, ids=np.arange(300) * 10 + 7).save(tmp_path / "a.crbi")
    BinaryIndex.from_packed(pack_codes(b_codes), 32).save(tmp_path / "b.crbi")
    app = create_app(None, index=tmp_path / "a.crbi", limits=LIMITS)
    state = app.state.service
    requests = [("GET", "/info", None), ("GET", "/health", None),
                ("POST", "/search/ids", {"ids": [7, 17, 27], "k": 6, "exclude_self": True, "return_codes": True}),
                ("POST", "/search", {"queries": [{"id": 37}, {"id": 47, "exclude_self": True}], "k": 4,
                                     "return_codes": True})]

    def strip(body: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in body.items() if key != "generation"}

    with TestClient(app) as client:
        def ask(i: int) -> tuple[int, dict[str, Any]]:
            method, path, body = requests[i]
            response = client.request(method, path, json=body)
            return response.status_code, response.json()

        expected = {0: [strip(ask(i)[1]) for i in range(len(requests))]}
        state.reload(index=tmp_path / "b.crbi")
        expected[1] = [strip(ask(i)[1]) for i in range(len(requests))]
        state.reload(index=tmp_path / "a.crbi")
        for i in range(len(requests)):
            assert expected[0][i] != expected[1][i]  # a mix would show
        assert expected[0][0]["bits"] == 20 and expected[1][0]["bits"] == 32

        reloads, stop = 150, threading.Event()
        problems: list[Any] = []
        seen: collections.Counter[tuple[int, int]] = collections.Counter()

        def hammer(offset: int) -> None:
            last, i = -1, offset
            while not stop.is_set():
                status, body = ask(i % len(requests))
                generation = body.get("generation", -1)
                if status != 200 or strip(body) != expected[generation % 2][i % len(requests)] or generation < last:
                    problems.append((requests[i % len(requests)][1], status, body))
                seen[(i % len(requests), generation % 2)] += 1
                last, i = generation, i + 1

        threads = [threading.Thread(target=hammer, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        try:
            # Generations 3, 4, ...: odd -> b, even -> a. At least `reloads` swaps, and on until every request
            # kind has met both indexes often (or 60 s have passed).
            end, n = time.monotonic() + 60, 0
            while n < reloads or (min(seen[(i, p)] for i in range(len(requests)) for p in (0, 1)) < 10
                                  and time.monotonic() < end):
                state.reload(index=tmp_path / ("b.crbi" if n % 2 == 0 else "a.crbi"))
                n += 1
                time.sleep(0.002)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert problems == [], problems[:3]
    assert state.info()["generation"] == 2 + n and n >= reloads
    for i in range(len(requests)):  # every kind of request saw both snapshots, many times
        assert seen[(i, 0)] >= 10 and seen[(i, 1)] >= 10, seen


# ------------------------------------------------------------------------------------------- 5. schemathesis
EXAMPLES = 25  # per operation and generation mode: ~200 requests, ~10-20 s


def _intify(body: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; the service (strict) does not. Positive examples send 3."""
    def one(value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value

    def many(values: Any) -> Any:
        return [one(v) for v in values] if isinstance(values, list) else values

    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key, fix in (("k", one), ("ids", many), ("codes", lambda rows: [many(r) for r in rows]
                                                  if isinstance(rows, list) else rows)):
        if key in body:
            body[key] = fix(body[key])
    if isinstance(body.get("queries"), list):
        body["queries"] = [{key: (one(v) if key == "id" else many(v) if key == "code" else v) for key, v in q.items()}
                           if isinstance(q, dict) else q for q in body["queries"]]
    return body


def _runner(operation: Any, mode: Any, checks: list[Any], counts: collections.Counter[tuple[str, str, int]],
            failures: list[str]) -> Any:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        if mode == GenerationMode.POSITIVE:
            case.body = _intify(case.body)
        response = case.call()
        counts[(operation.path, mode.value, response.status_code)] += 1
        try:
            case.validate_response(response, checks=checks)
        except Exception as exc:  # collected, so that every operation runs; reported by the test
            failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}"[:2000])

    return run


@pytest.mark.slow
def test_schemathesis_openapi_contract(app: Any) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.config import SchemathesisConfig
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    # An explicit config (no schemathesis.toml is read); no constants mined from the loaded Python modules (that
    # pool depends on which modules earlier tests imported); hypothesis is derandomized below.
    config = SchemathesisConfig.from_dict({"seed": 0, "analysis": {"constants": {"enabled": False}}})
    random.seed(0)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == set(ROUTES) - {("GET", "/openapi.json")}
    counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
    failures: list[str] = []
    for operation in operations:
        # A GET without parameters has one request and no invalid variant.
        for mode in [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method == "post" else []):
            _runner(operation, mode, checks, counts, failures)()
    total = sum(counts.values())
    by_class = collections.Counter(f"{status // 100}xx" for (_, _, status) in counts.elements())
    print(f"\nschemathesis: {total} requests, {dict(sorted(by_class.items()))}, by operation/mode/status: "
          f"{dict(sorted(counts.items()))}")
    assert failures == [], "\n\n".join(failures[:5])
    assert by_class["5xx"] == 0
    assert total >= 8 * EXAMPLES // 2  # 4 POST operations x 2 modes, well filled
    for path in ("/search", "/search/features", "/search/codes", "/search/ids"):
        def tally(mode: str, accept: Any, path: str = path) -> int:
            return sum(n for (p, m, status), n in counts.items() if p == path and m == mode and accept(status))

        positive, accepted = tally("positive", lambda s: True), tally("positive", lambda s: s == 200)
        negative, rejected = tally("negative", lambda s: True), tally("negative", lambda s: 400 <= s < 500)
        assert accepted >= 0.8 * positive, (path, counts)  # the schema describes requests the service takes
        assert negative and rejected == negative, (path, counts)  # and everything it refuses is a 4xx
