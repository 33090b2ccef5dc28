"""The HTTP layer of the search service: a FastAPI app over a :class:`~crossret.serve.state.ServiceState`.

Endpoints (all JSON; see docs/serve.md): ``GET /health``, ``GET /info``, ``GET /openapi.json``,
``POST /search`` (a mixed batch), ``POST /search/features``, ``POST /search/codes``,
``POST /search/ids``; for a GCKD run (:func:`create_text_app`) ``POST /search/text`` instead of the
``/search*`` routes. The app is read-only: no endpoint writes anything, no route has path or query
parameters, and no request value reaches the file system.

Every refusal is a 4xx (or 503) response ``{"error": KIND, "detail": MESSAGE}``. Bodies larger than
``limits.max_body_bytes`` get 413 from an ASGI middleware before anything parses them, and a body
not received within ``limits.request_timeout`` gets 408. Parsing and searching run in worker threads
(at most ``limits.max_concurrent`` at once) so a large request never blocks the event loop; a request
whose answer is not ready by its deadline gets 503 ``timeout`` at once, and its worker stops at its
next check of the deadline. :func:`run_server` adds the server-side bounds
(:class:`ServerSettings`): a deadline for request heads, a cap on requests in progress
(:class:`AdmissionMiddleware`, 503 ``overloaded``), and a connection cap that sheds idle connections
before it refuses anyone, so that idle or slow connections cannot crowd out real requests.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``Request``,
# imported inside build_app so that this module imports without the extra) at definition time.
import asyncio
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossret.errors import ConfigError
from crossret.extras import install_command, require
from crossret.serve.state import (
    _FLOAT32_MAX,
    Query,
    RequestError,
    ServiceLimits,
    ServiceState,
    timeout_error,
)

logger = logging.getLogger("crossret.serve")

INSTALL_HINT = install_command("serve")

#: Where the middleware leaves a request's deadline (a ``time.monotonic()`` value) in the ASGI scope.
DEADLINE_KEY = "crossret.deadline"

#: The routes the service has (method, path); tests assert that there are no others.
ROUTES = (("GET", "/health"), ("GET", "/info"), ("GET", "/openapi.json"), ("POST", "/search"),
          ("POST", "/search/features"), ("POST", "/search/codes"), ("POST", "/search/ids"))
#: The routes of a text-search service (:func:`create_text_app`, a GCKD run).
TEXT_ROUTES = (("GET", "/health"), ("GET", "/info"), ("GET", "/openapi.json"), ("POST", "/search/text"))

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def require_serve_extra(*, server: bool = False) -> None:
    """Raise :class:`~crossret.errors.MissingExtraError` with the install command when the ``serve`` extra
    is missing (``server``: uvicorn too, not only the app's packages)."""
    require("serve", "fastapi", "pydantic", *(["uvicorn"] if server else []), load=True)


def create_app(run_dir: str | Path | None, *, database: str = "cross", index: str | Path | None = None,
               kind: str = "flat", limits: ServiceLimits | None = None, search_threads: int | None = 1,
               backend: str = "local", backend_options: dict[str, Any] | None = None) -> Any:
    """A FastAPI app serving a finished run directory (and/or a saved index).

    ``database``: ``cross`` (the source codes) or ``single`` (the target-train codes). ``index``: serve
    this saved index instead of building a ``kind`` index over the run's codes; ``backend`` names where
    it lives and ``backend_options`` how to reach it (:func:`crossret.retrieval.backend.open_index`:
    a ``.crbi`` file for ``local``; a locator file and/or ``collection``, ``uri``, ... for ``milvus``).
    ``limits``: request
    bounds, the request timeout and the compute concurrency (:class:`ServiceLimits`). ``search_threads``:
    faiss threads per search (1: concurrent requests use the cores; ``None``: faiss' default). The service state
    (with :meth:`~crossret.serve.state.ServiceState.reload`) is ``app.state.service``.
    Loading errors raise before any app exists.
    """
    require_serve_extra()
    state = ServiceState(run_dir, database=database, index=index, kind=kind, limits=limits,
                         search_threads=search_threads, backend=backend, backend_options=backend_options)
    return build_app(state)


# --------------------------------------------------------------------------------------------
# errors


def _error_body(kind: str, message: str) -> dict[str, str]:
    return {"error": kind, "detail": message}


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    text = text or "body"
    # A field name comes from the client: never echo a megabyte of it back.
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


# pydantic error types -> what the field must be (plain JSON words rather than pydantic's "valid array").
_TYPE_WORDS = {"list_type": "a list", "float_type": "a number", "int_type": "an integer",
               "int_from_float": "an integer", "bool_type": "true or false", "string_type": "a string"}


def _validation_error(exc: Any, fields: list[str], max_batch: int) -> RequestError:
    """A pydantic ValidationError -> one RequestError whose message names each offending field."""
    from crossret.serve.schemas import BATCH_FIELDS

    errors = exc.errors(include_url=False, include_input=False)
    if any(err["type"] == "json_invalid" for err in errors):
        detail = next(err["msg"] for err in errors if err["type"] == "json_invalid")
        return RequestError(400, "invalid_json", f"the request body is not valid JSON ({detail})")
    for err in errors:  # the batch bounds are checked while parsing; report them like the library does
        if len(err["loc"]) == 1 and err["loc"][0] in BATCH_FIELDS:
            if err["type"] == "too_long":
                n = err.get("ctx", {}).get("actual_length")
                return RequestError(422, "batch_too_large",
                                    f"batch of {n} queries exceeds the limit of {max_batch} queries per request; "
                                    "split it")
            if err["type"] == "too_short":
                return RequestError(422, "empty_batch", "the request holds no queries; send at least one")
    parts = []
    for err in errors[:3]:
        where, kind = _format_loc(tuple(err["loc"])), err["type"]
        if kind == "extra_forbidden":
            parts.append(f"unknown field {where!r} (accepted: {', '.join(fields)})")
        elif kind == "missing":
            parts.append(f"missing required field {where!r}")
        elif kind == "model_type" and not err["loc"]:
            parts.append("the request body must be a JSON object")
        elif kind == "model_type":
            parts.append(f"{where}: must be a JSON object")
        elif kind == "finite_number":
            parts.append(f"{where}: must be a finite number (NaN and Infinity are not accepted)")
        elif kind in _TYPE_WORDS:
            parts.append(f"{where}: must be {_TYPE_WORDS[kind]}")
        else:
            parts.append(f"{where}: {err['msg']}")
    more = f" (and {len(errors) - 3} more errors)" if len(errors) > 3 else ""
    return RequestError(422, "invalid_request", "; ".join(parts) + more)


def _prescan(body: bytes, max_batch: int, per_query: int) -> None:
    """Refuse, before parsing, a body with far more JSON values than any valid request can hold.

    Parsing costs time and memory per JSON value (~40x the body size for a long list of numbers, and
    seconds for millions of small arrays), while a valid request is small: at most ``max_batch``
    queries of ``per_query`` numbers each (the feature dimension or the code length), one array or
    object per query, and a few flags. No valid string holds '[', '{' or ',', so counting these bytes
    (C speed) bounds the values from above without false refusals. The bounds are twice the most a
    valid request holds, so a batch only a little too large still gets its precise error from parsing.
    """
    containers = body.count(b"[") + body.count(b"{")
    if containers > 4 * max_batch + 4:
        raise RequestError(422, "too_many_values",
                           f"the body holds {containers} JSON arrays/objects; a request of at most {max_batch} "
                           f"queries holds at most {2 * max_batch + 2}; split it")
    separators = body.count(b",")
    if separators > 2 * max_batch * (per_query + 2) + 16:
        raise RequestError(422, "too_many_values",
                           f"the body holds more than {separators} JSON values; a request of at most {max_batch} "
                           f"queries of {per_query} values each holds at most {max_batch * (per_query + 2) + 8}; "
                           "split it, or check the length of each query")


def _parse(model: Any, body: bytes, max_batch: int) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc, list(model.model_fields), max_batch) from None


def _check_json_content_type(headers: Any) -> None:
    content_type = headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        shown = content_type if len(content_type) <= 80 else f"{content_type[:60]}..."
        raise RequestError(415, "unsupported_media_type",
                           f"send the body as JSON with 'Content-Type: application/json' (got {shown or 'none'})")


def _dump(payload: Any) -> bytes:
    """JSON bytes of an answer (the encoding starlette's JSONResponse uses), made in the worker thread."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------------------------
# body size limit and body deadline


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` with 413 before they are parsed, and bodies that do not arrive
    within ``timeout`` seconds with 408 (pure ASGI).

    Each request gets a deadline ``timeout`` seconds after its head arrived (``scope[DEADLINE_KEY]``;
    the endpoints answer 503 once it has passed). A declared ``Content-Length`` over the limit is
    refused without reading a byte; otherwise the body is read in chunks, counting, and refused as soon
    as the count passes the limit (chunked uploads declare no length). A body within the limit is
    replayed to the app unchanged.
    """

    def __init__(self, app: Any, max_bytes: int, timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, kind: str,
                      message: str) -> None:
        from starlette.responses import JSONResponse

        response = JSONResponse(_error_body(kind, message), status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import anyio

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = time.monotonic() + self.timeout
        scope[DEADLINE_KEY] = deadline
        too_large = (f"request body exceeds the limit of {self.max_bytes} bytes; send fewer or smaller queries "
                     "(see GET /info for the limits)")
        declared = [value for key, value in scope.get("headers", []) if key.lower() == b"content-length"]
        if declared:
            text = declared[0].strip()
            if not text or not text.isdigit():  # bytes.isdigit: ASCII digits only (no sign, '_' or spaces)
                await self._refuse(scope, receive, send, 400, "invalid_content_length",
                                   "the Content-Length header is not a non-negative integer")
                return
            if len(text) > 18 or int(text) > self.max_bytes:
                shown = text.decode() if len(text) <= 20 else f"{len(text)} digits"
                await self._refuse(scope, receive, send, 413, "body_too_large", f"{too_large} (Content-Length: "
                                   f"{shown})")
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = None
            with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)):
                message = await receive()
            if message is None:
                await self._refuse(scope, receive, send, 408, "body_timeout",
                                   f"the request body did not arrive within the request timeout of {self.timeout:g} "
                                   "s; send it at once")
                return
            if message["type"] == "http.disconnect":
                return  # the client went away; nothing to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send, 413, "body_too_large", too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect as usual

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------------
# bounded, deadline-aware compute


def _to_thread_kwargs() -> dict[str, bool]:
    import inspect

    import anyio.to_thread

    params = inspect.signature(anyio.to_thread.run_sync).parameters
    return {"abandon_on_cancel": True} if "abandon_on_cancel" in params else {"cancellable": True}


class WorkSlots:
    """At most ``n`` request computations run at once; a slot stays taken until its thread really ends.

    :meth:`run` waits for a slot and runs ``func`` in a worker thread, both within the deadline. When
    the deadline passes first it raises the 503 ``timeout`` error at once; the thread (which cannot be
    killed) keeps its slot until it returns — ``func`` checks the deadline itself and stops early — so
    requests that time out cannot pile up unbounded work. One semaphore per event loop (uvicorn runs one).
    """

    def __init__(self, n: int, timeout: float) -> None:
        self.n = int(n)
        self.timeout = float(timeout)
        self._semaphores: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = weakref.WeakKeyDictionary()
        self._thread_kwargs = _to_thread_kwargs()
        self._running = 0
        self._count_lock = threading.Lock()

    @property
    def running(self) -> int:
        """Computations whose threads have started and not yet returned (answered or abandoned)."""
        return self._running

    def _semaphore(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.n)
        return loop, semaphore

    async def run(self, func: Callable[[], Any], deadline: float) -> Any:
        import anyio
        import anyio.to_thread

        loop, semaphore = self._semaphore()
        lock = threading.Lock()
        stage = ["waiting"]  # -> "running" (the thread took it) or "dropped" (cancelled before it started)

        def release_from_thread() -> None:
            try:
                loop.call_soon_threadsafe(semaphore.release)
            except RuntimeError:  # the event loop is gone (server shut down): nothing waits for the slot
                pass

        def job() -> Any:
            with lock:
                if stage[0] == "dropped":
                    return None
                stage[0] = "running"
            with self._count_lock:
                self._running += 1
            try:
                return func()
            finally:
                with self._count_lock:
                    self._running -= 1
                release_from_thread()

        with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)):
            await semaphore.acquire()
            try:
                return await anyio.to_thread.run_sync(job, **self._thread_kwargs)
            except BaseException:
                with lock:
                    if stage[0] == "waiting":  # never started: its slot is free now
                        stage[0] = "dropped"
                        semaphore.release()
                raise
        raise timeout_error(self.timeout)


# --------------------------------------------------------------------------------------------
# OpenAPI


def _non_null(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an ``X | None`` property schema (the property itself otherwise)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def _hex_pattern(bits: int) -> str:
    """A regular expression for exactly the valid packed codes: the right length, and no bit set past ``bits``."""
    width = (bits + 7) // 8
    rest = bits - 8 * (width - 1)  # bits used in the last byte, 1..8
    digit = "[0-9a-fA-F]"
    if rest == 8:
        last = digit * 2
    elif rest > 4:  # the high digit holds bits 4..rest-1
        last = f"[0-{2 ** (rest - 4) - 1}]{digit}"
    else:
        last = "0" + ("[0-9a-fA-F]" if rest == 4 else f"[0-{2 ** rest - 1}]")
    return f"^{digit}{{{2 * (width - 1)}}}{last}$"


def _document_request_schemas(components: dict[str, Any], limits: ServiceLimits, snap: Any) -> None:
    """Add the rules the service checks (k, ids, feature dimension, code form, one kind per query) to
    the request schemas.

    pydantic's schemas say what parses; these say what the current snapshot accepts, so generated
    requests (and clients) can aim at valid ones. Every rule added here is enforced with a 4xx; some
    checks stay out of the schema (queries x k <= max_results, k <= size - 1 with exclude_self, which
    ids an index holds, values a model refuses).
    """
    width = 2 * ((snap.bits + 7) // 8)
    hex_schema = {"type": "string", "minLength": width, "maxLength": width, "pattern": _hex_pattern(snap.bits),
                  "description": f"packed {snap.bits}-bit code: {width} hex digits, least significant bit first, "
                                 "bits past the code length 0 (see GET /info code_formats)"}
    code_schema = {"type": "array", "minItems": snap.bits, "maxItems": snap.bits,
                   "items": {"type": "integer", "minimum": -1, "maximum": 1},
                   "anyOf": [{"items": {"enum": [-1, 1]}}, {"items": {"enum": [0, 1]}}],
                   "description": f"{snap.bits} values, all ±1 or all 0/1"}
    feature_schema: dict[str, Any] = {"type": "array", "items": {"type": "number", "minimum": -_FLOAT32_MAX,
                                                                 "maximum": _FLOAT32_MAX}}
    if snap.feature_dim is not None:
        feature_schema.update(minItems=snap.feature_dim, maxItems=snap.feature_dim,
                              description=f"{snap.feature_dim} finite numbers (float32 range)")
    else:
        feature_schema["description"] = "this service has no model: feature search is refused (422 no_model)"
    id_schema: dict[str, Any] = {"type": "integer", "minimum": 0}
    if snap.item_ids is None:
        id_schema["maximum"] = snap.size - 1
    given = {"not": {"type": "null"}}
    for name in ("BatchRequest", "FeaturesRequest", "CodesRequest", "IdsRequest", "QueryItem"):
        props = components[name]["properties"]
        if "k" in props:
            props["k"].update(minimum=1, maximum=min(limits.max_k, snap.size))
    components["FeaturesRequest"]["properties"]["features"]["items"] = feature_schema
    codes = components["CodesRequest"]
    _non_null(codes["properties"]["codes"])["items"] = code_schema
    _non_null(codes["properties"]["hex"])["items"] = hex_schema
    codes["oneOf"] = [{"required": ["codes"], "properties": {"codes": given, "hex": {"type": "null"}}},
                      {"required": ["hex"], "properties": {"hex": given, "codes": {"type": "null"}}}]
    components["IdsRequest"]["properties"]["ids"]["items"] = id_schema
    item = components["QueryItem"]
    kinds = {"features": feature_schema, "code": code_schema, "hex": hex_schema, "id": id_schema}
    for kind, schema in kinds.items():
        item["properties"][kind]["anyOf"][0] = schema
    item["oneOf"] = [{"required": [kind], "properties": {
        **{other: ({"type": "null"} if other != kind else given) for other in kinds},
        **({} if kind == "id" else {"exclude_self": {"const": False}})}} for kind in kinds]
    item["description"] = ("exactly one of features, code, hex or id (the others absent or null); exclude_self "
                           "only with id")


def _openapi_schema(app: Any, limits: ServiceLimits, snap: Any, models: dict[str, Any]) -> dict[str, Any]:
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models.values():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    _document_request_schemas(components, limits, snap)
    return schema


# --------------------------------------------------------------------------------------------
# the app




def _cached_openapi(app: Any, state: Any, build: Any) -> None:
    """Serve ``build(snapshot)`` as the app's OpenAPI schema: the request schemas follow the snapshot being
    served, so the schema is rebuilt (~0.1 s) once per snapshot generation, not per request."""
    cache: dict[str, Any] = {}
    lock = threading.Lock()

    def openapi() -> dict[str, Any]:
        snap = state.snapshot()
        with lock:
            if cache.get("generation") != snap.generation:
                cache.update(generation=snap.generation, schema=build(snap))
            return cache["schema"]

    app.openapi = openapi

def _status_routes(app: Any, state: Any, health_model: Any, health_doc: str, info_model: Any, info_doc: str) -> None:
    """``GET /health`` and ``GET /info`` of a service: ``state.health()`` / ``state.info()`` as JSON."""
    from fastapi.responses import JSONResponse

    @app.get("/health", response_class=JSONResponse, description=health_doc,
             responses={200: {"model": health_model}, **_responses(400, 408, 413)})
    async def health() -> JSONResponse:
        return JSONResponse(state.health())

    @app.get("/info", response_class=JSONResponse, description=info_doc,
             responses={200: {"model": info_model}, **_responses(400, 408, 413)})
    async def info() -> JSONResponse:
        return JSONResponse(state.info())

def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    from crossret.serve.schemas import ErrorResponse

    words = {400: "invalid JSON, or a malformed Content-Length header",
             404: "an item id that is not in the database",
             408: "the body did not arrive within the request timeout",
             413: "the body is larger than max_body_bytes",
             415: "the body is not sent as application/json",
             422: "the request is invalid (the message names the field and the problem)",
             503: "the request did not finish within the request timeout (error 'timeout'), or, under "
                  "run_server, the server has its maximum of requests in progress (error 'overloaded')"}
    return {status: {"model": ErrorResponse, "description": words[status]} for status in statuses}


def _new_app(state: Any, description: str) -> tuple[Any, "WorkSlots"]:
    """A FastAPI app with the service's body limit, compute slots and error answers (no routes yet)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from crossret import __version__

    limits = state.limits
    slots = WorkSlots(limits.max_concurrent, limits.request_timeout)
    # The machine-readable schema is served (GET /openapi.json, read-only); the interactive docs pages are not.
    app = FastAPI(title="crossret search", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", description=description)
    app.state.service = state
    app.state.work_slots = slots
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, timeout=limits.request_timeout)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(limits.request_timeout / 10)))} if exc.status == 503 else None
        return JSONResponse(_error_body(exc.kind, exc.message), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        path = request.url.path if len(request.url.path) <= 80 else f"{request.url.path[:60]}..."
        messages = {404: f"no endpoint {path!r}; see docs/serve.md",
                    405: f"{request.method} is not allowed on {path!r}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse(_error_body(kinds.get(exc.status_code, "http_error"), message),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Reached only through a bug: log it, and keep internals out of the response.
        logger.exception("internal error while serving a request")
        return JSONResponse(_error_body("internal", "internal server error; see the server log"), status_code=500)

    return app, slots


def build_app(state: ServiceState) -> Any:
    """The FastAPI app over an existing service state."""
    from fastapi import Request
    from fastapi.responses import Response

    from crossret.serve import schemas

    limits = state.limits
    models = schemas.request_models(limits.max_batch)
    app, slots = _new_app(state, "Read-only Hamming k-NN search over a crossret run's database; see docs/serve.md. "
                                 "Request schemas describe the snapshot being served (its code length, feature "
                                 "dimension and size).")

    _cached_openapi(app, state, lambda snap: _openapi_schema(app, limits, snap, models))

    async def answer(request: Request, path: str, to_queries: Callable[[Any], list[Query]]) -> Response:
        _check_json_content_type(request.headers)
        body = await request.body()
        deadline = request.scope.get(DEADLINE_KEY) or time.monotonic() + limits.request_timeout
        model = models[path]

        def work() -> bytes:
            snap = state.snapshot()  # one snapshot for the checks and the search
            _prescan(body, limits.max_batch, max(snap.feature_dim or 0, snap.bits))
            parsed = _parse(model, body, limits.max_batch)
            return _dump(state.search(to_queries(parsed), parsed.k, return_codes=parsed.return_codes,
                                      deadline=deadline, snapshot=snap))

        return Response(await slots.run(work, deadline), media_type="application/json")

    search_errors = (400, 404, 408, 413, 415, 422, 503)
    body_errors = (400, 408, 413, 415, 422, 503)  # no item ids: no 404

    def _body(path: str) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{models[path].__name__}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

    _status_routes(app, state, schemas.HealthResponse, "Liveness: status, index size, code length, snapshot "
                   "generation.", schemas.InfoResponse, "Code length, size, index kind, method, database, limits "
                   "and the run's metadata.")

    @app.post("/search", response_class=Response, openapi_extra=_body("/search"),
              responses={200: {"model": schemas.SearchResponse}, **_responses(*search_errors)})
    async def search(request: Request) -> Response:
        """A mixed batch: each query is one of features / code / hex / id."""
        return await answer(request, "/search", _batch_queries)

    @app.post("/search/features", response_class=Response, openapi_extra=_body("/search/features"),
              responses={200: {"model": schemas.SearchResponse}, **_responses(*body_errors)})
    async def search_features(request: Request) -> Response:
        """Raw feature vectors, encoded by the run's model."""
        return await answer(request, "/search/features",
                            lambda p: [Query("features", row, f"features[{i}]") for i, row in enumerate(p.features)])

    @app.post("/search/codes", response_class=Response, openapi_extra=_body("/search/codes"),
              responses={200: {"model": schemas.SearchResponse}, **_responses(*body_errors)})
    async def search_codes(request: Request) -> Response:
        """Codes as ±1/0-1 lists (``codes``) or packed hex strings (``hex``)."""
        return await answer(request, "/search/codes", _code_queries)

    @app.post("/search/ids", response_class=Response, openapi_extra=_body("/search/ids"),
              responses={200: {"model": schemas.SearchResponse}, **_responses(*search_errors)})
    async def search_ids(request: Request) -> Response:
        """Database items by id: each item's own code is the query."""
        return await answer(request, "/search/ids", lambda p: [
            Query("id", value, f"ids[{i}]", p.exclude_self) for i, value in enumerate(p.ids)])

    return app


def create_text_app(run_dir: str | Path, *, gallery: str | Path | None = None, split: str = "test",
                    index: str | Path | None = None, limits: ServiceLimits | None = None, device: str = "cpu") -> Any:
    """A FastAPI app serving text → image search with a GCKD run's model (``POST /search/text``).

    The gallery is ``split`` of the person dataset folder ``gallery`` (encoded at start-up) or a gallery
    ``index`` file built with this run (``crossret index build --run RUN --gallery DATA``). Loading
    errors raise before any app exists; the state (:class:`~crossret.serve.text.TextSearchState`) is
    ``app.state.service``.
    """
    require_serve_extra()
    from crossret.serve.text import TextSearchState

    return build_text_app(TextSearchState(run_dir, gallery=gallery, split=split, index=index, limits=limits,
                                          device=device))


def build_text_app(state: Any) -> Any:
    """The FastAPI app over an existing :class:`~crossret.serve.text.TextSearchState`."""
    from fastapi import Request
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import Response

    from crossret.serve import schemas
    from crossret.serve.text import MAX_TEXT_CHARS

    limits = state.limits
    model = schemas.text_request_models(limits.max_batch, MAX_TEXT_CHARS)["/search/text"]
    app, slots = _new_app(state, "Read-only text-to-image search over a gallery with a GCKD run's model (ITC "
                                 "score); see docs/serve.md. The request schema describes the gallery being served.")

    def text_schema(snap: Any) -> dict[str, Any]:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["k"].update(minimum=1, maximum=min(limits.max_k, snap.size))
        body["properties"]["texts"]["items"]["description"] = (
            f"a caption (at most {MAX_TEXT_CHARS} characters, at least one word)")
        components[model.__name__] = body
        return schema

    _cached_openapi(app, state, text_schema)

    _status_routes(app, state, schemas.TextHealthResponse, "Liveness: status, gallery size, embedding dimension, "
                   "snapshot generation.", schemas.TextInfoResponse, "Gallery size, embedding dimension, index kind, "
                   "run, gallery and limits.")

    @app.post("/search/text", response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}},
              responses={200: {"model": schemas.TextSearchResponse}, **_responses(400, 408, 413, 415, 422, 503)})
    async def search_text(request: Request) -> Response:
        """Captions: each answered with the k best gallery images by ITC score."""
        _check_json_content_type(request.headers)
        body = await request.body()
        deadline = request.scope.get(DEADLINE_KEY) or time.monotonic() + limits.request_timeout

        def work() -> bytes:
            snap = state.snapshot()
            parsed = _parse(model, body, limits.max_batch)
            return _dump(state.search(parsed.texts, parsed.k, deadline=deadline, snapshot=snap))

        return Response(await slots.run(work, deadline), media_type="application/json")

    return app


def _code_queries(parsed: Any) -> list[Query]:
    if (parsed.codes is None) == (parsed.hex is None):
        raise RequestError(422, "invalid_request", "give exactly one of 'codes' (lists of ±1 or 0/1) or 'hex' "
                           "(packed hex strings)")
    if parsed.codes is not None:
        return [Query("code", row, f"codes[{i}]") for i, row in enumerate(parsed.codes)]
    return [Query("hex", text, f"hex[{i}]") for i, text in enumerate(parsed.hex)]


def _batch_queries(parsed: Any) -> list[Query]:
    queries = []
    for i, item in enumerate(parsed.queries):
        given = [name for name in ("features", "code", "hex", "id") if getattr(item, name) is not None]
        if len(given) != 1:
            found = f"found {', '.join(given)}" if given else "found none"
            raise RequestError(422, "invalid_query", f"queries[{i}]: give exactly one of 'features', 'code', "
                               f"'hex' or 'id' ({found})")
        queries.append(Query(given[0], getattr(item, given[0]), f"queries[{i}].{given[0]}", item.exclude_self))
    return queries


# --------------------------------------------------------------------------------------------
# the server


@dataclass(frozen=True)
class ServerSettings:
    """How the HTTP server bounds its clients: uvicorn settings, a deadline for request heads, a
    connection cap that sheds idle connections first, and a cap on requests in progress.

    The rule is to bound the work, not the sockets: a connection without a request in progress (an
    idle keep-alive connection, or one whose request head is still arriving) costs a file descriptor
    and at most ``max_header_bytes``, and never makes the service refuse a request.

    keep_alive_timeout: an idle keep-alive connection is closed after this many seconds.
    header_timeout: a connection must deliver a complete request head (request line and headers)
        within this many seconds of opening, or of its previous answer; otherwise it is closed
        (slow-header clients). The body is bounded by ``ServiceLimits.request_timeout`` (408).
    max_connections: most open connections. At the cap, a new connection closes the connection that
        has waited longest without a request in progress (idle, or an incomplete head) and takes its
        place; only when every open connection has a request in progress is the new one refused
        (``503 overloaded``, JSON, then closed). Lowered to fit the process's open-file limit.
    max_requests: most requests in progress (from a complete head to the end of the answer); a
        request beyond it gets ``503 overloaded`` (JSON, ``Retry-After``, connection closed) before
        its body is read. GET and HEAD requests without a body (``/health``, ``/info``) are not
        counted: they hold no body and no compute slot.
    backlog: most connections waiting to be accepted by the operating system.
    max_header_bytes: largest request head; a larger one gets ``400`` from the server and is closed.
    shutdown_timeout: on shutdown, requests still running after this many seconds are cancelled.
    """

    keep_alive_timeout: float = 5.0
    header_timeout: float = 5.0
    max_connections: int = 2048
    max_requests: int = 128
    backlog: int = 256
    max_header_bytes: int = 16 * 1024
    shutdown_timeout: float = 10.0

    def validate(self) -> "ServerSettings":
        for name in ("keep_alive_timeout", "header_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ConfigError(f"server setting {name} must be a positive number of seconds, got {value!r}")
        for name, minimum in (("max_connections", 2), ("max_requests", 1), ("backlog", 1),
                              ("max_header_bytes", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"server setting {name} must be an integer >= {minimum}, got {value!r}")
        return self


#: File descriptors kept out of the connection cap (the listening socket, the run's files, logs, threads).
_RESERVED_FDS = 64


def connection_cap(max_connections: int) -> int:
    """``max_connections``, lowered to fit the open-file limit (``ulimit -n``) less a reserve.

    A connection beyond the limit would not be refused by the server but fail in ``accept()``, and
    stay queued in the backlog, unanswered: the cap has to bind first.
    """
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - no resource module (Windows)
        return max_connections
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return max_connections
    return max(2, min(max_connections, soft - _RESERVED_FDS))


def _overloaded(message: str) -> bytes:
    return json.dumps(_error_body("overloaded", message), separators=(",", ":")).encode()


class AdmissionMiddleware:
    """At most ``max_requests`` requests in progress; beyond it ``503 overloaded`` at once (pure ASGI).

    A request is in progress from its complete head until its answer is sent, body reception and the
    wait for a compute slot included; a refused one gets ``Retry-After`` and ``Connection: close``
    before a byte of its body is read. GET and HEAD requests that declare no body are not counted (and
    never refused): they cost no body and no compute slot. One counter per app; uvicorn runs the app
    on one event loop, so a plain integer suffices.
    """

    def __init__(self, app: Any, max_requests: int, retry_after: int = 1) -> None:
        self.app = app
        self.max_requests = int(max_requests)
        self.retry_after = int(retry_after)
        self.in_progress = 0

    @staticmethod
    def _bodiless_read(scope: Scope) -> bool:
        if scope.get("method") not in ("GET", "HEAD"):
            return False
        for key, value in scope.get("headers", []):
            key = key.lower()
            if key == b"transfer-encoding" or (key == b"content-length" and value.strip() != b"0"):
                return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._bodiless_read(scope):
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests:
            body = _overloaded(f"the service has its maximum of {self.max_requests} requests in progress; retry "
                               f"in {self.retry_after} s")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"retry-after", str(self.retry_after).encode()), (b"connection", b"close")]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


def _bounded_h11_protocol(settings: ServerSettings, max_connections: int) -> Any:
    """uvicorn's h11 protocol with a request-head deadline and a connection cap that sheds idle connections.

    * **Head deadline.** uvicorn bounds idle keep-alive connections but not a client that connects and
      then sends its head slowly (or never): a timer is armed when a connection opens and after each
      answer, and disarmed once a request's head has been parsed; when it fires, the connection is closed.
    * **Connection cap.** uvicorn's own cap (``limit_concurrency``) counts every open connection, idle
      ones included, and answers 503 to each request beyond it: a client holding that many idle
      connections shut everyone else out. Here the connections without a request in progress are kept
      in the order they became idle; a connection that arrives at the cap closes the longest-idle one
      (as nginx reuses keep-alive connections when it runs out) and is only refused, with a JSON 503,
      when every open connection has a request in progress — and those are bounded by ``max_requests``.

    One set of connections per call (per server). Returns None when uvicorn's internals are not as
    expected (then plain h11 and uvicorn's cap are used).
    """
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover - uvicorn without h11
        return None
    needed = ("connection_made", "connection_lost", "handle_events", "on_response_complete")
    if not all(hasattr(H11Protocol, name) for name in needed):  # pragma: no cover - another uvicorn layout
        return None

    header_timeout = settings.header_timeout
    connections: set[Any] = set()  # open, and counted against the cap
    idle: dict[Any, None] = {}  # open without a request in progress, longest-waiting first (insertion order)
    body = _overloaded(f"the server holds its maximum of {max_connections} connections, each with a request in "
                       "progress; retry in 1 s")
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
               b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    last_warning = [-math.inf]

    class BoundedH11Protocol(H11Protocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None
        _gone = False

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            if self._gone or self.transport is None or self.transport.is_closing():
                return
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)
            idle[self] = None  # the newest idle connection: the last to be shed

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            idle.pop(self, None)

        def _waiting_for_head(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def _shed(self) -> None:
            """Close this connection (it has no request in progress) and free its place at once."""
            self._disarm_head_timer()
            connections.discard(self)
            if not self.transport.is_closing():
                self.transport.close()

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._waiting_for_head():
                self._shed()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(connections) >= max_connections:
                if idle:
                    next(iter(idle))._shed()
                else:
                    self._gone = True
                    now = time.monotonic()
                    if now - last_warning[0] > 10:
                        last_warning[0] = now
                        logger.warning("refusing connections: all %d open connections have a request in progress",
                                       max_connections)
                    transport.write(refusal)
                    transport.close()
                    return
            connections.add(self)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._gone = True
            self._disarm_head_timer()
            connections.discard(self)
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting_for_head():
                self._disarm_head_timer()

        def on_response_complete(self) -> None:
            # Armed first: a pipelined request handled inside the call below disarms it again.
            self._arm_head_timer()
            super().on_response_complete()

    return BoundedH11Protocol


def server_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  settings: ServerSettings | None = None) -> Any:
    """The ``uvicorn.Config`` that :func:`run_server` serves ``app`` with (``app`` wrapped in
    :class:`AdmissionMiddleware`)."""
    require_serve_extra(server=True)
    import uvicorn

    settings = (settings or ServerSettings()).validate()
    cap = connection_cap(settings.max_connections)
    if cap < settings.max_connections:
        logger.warning("max_connections lowered from %d to %d to fit the open-file limit (ulimit -n)",
                       settings.max_connections, cap)
    protocol = _bounded_h11_protocol(settings, cap)
    if protocol is None:  # pragma: no cover
        logger.warning("this uvicorn version does not allow a request-head timeout; idle and slow-header clients "
                       "are bounded by uvicorn's connection cap only")
    return uvicorn.Config(AdmissionMiddleware(app, settings.max_requests), host=host, port=port, log_level=log_level,
                          access_log=False, http=protocol or "h11", timeout_keep_alive=settings.keep_alive_timeout,
                          # uvicorn's cap counts idle connections too: used only without the protocol above.
                          limit_concurrency=None if protocol is not None else cap, backlog=settings.backlog,
                          h11_max_incomplete_event_size=settings.max_header_bytes,
                          timeout_graceful_shutdown=settings.shutdown_timeout)


def run_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               settings: ServerSettings | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted (one process: the index lives in its memory)."""
    import uvicorn

    uvicorn.Server(server_config(app, host=host, port=port, log_level=log_level, settings=settings)).run()
