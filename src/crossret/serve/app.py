"""The HTTP layer of the search service: a FastAPI app over a :class:`~crossret.serve.state.ServiceState`.

Endpoints (all JSON; see docs/serve.md): ``GET /health``, ``GET /info``, ``POST /search`` (a mixed
batch), ``POST /search/features``, ``POST /search/codes``, ``POST /search/ids``. The app is
read-only: no endpoint writes anything and no request value reaches the file system.

Every refusal is a 4xx response ``{"error": KIND, "detail": MESSAGE}``. Bodies larger than
``limits.max_body_bytes`` get 413 from an ASGI middleware before anything parses them; parsing and
searching run in the thread pool so a large request never blocks the event loop.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``Request``,
# imported inside build_app so that this module imports without the extra) at definition time.
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from crossret.errors import ConfigError
from crossret.serve.state import Query, RequestError, ServiceLimits, ServiceState

logger = logging.getLogger("crossret.serve")

INSTALL_HINT = "pip install 'crossret[serve]'"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def require_serve_extra(*, server: bool = False) -> None:
    """Raise :class:`ConfigError` with the install command when the ``serve`` extra is missing."""
    modules = ["fastapi", "pydantic", *(["uvicorn"] if server else [])]
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"the search service needs the optional 'serve' dependencies ({name} is not "
                              f"installed): {INSTALL_HINT}") from None


def create_app(run_dir: str | Path | None, *, database: str = "cross", index: str | Path | None = None,
               kind: str = "flat", limits: ServiceLimits | None = None, search_threads: int | None = 1) -> Any:
    """A FastAPI app serving a finished run directory (and/or a saved ``.crbi`` index).

    ``database``: ``cross`` (the source codes) or ``single`` (the target-train codes). ``index``: serve
    this saved index instead of building a ``kind`` index over the run's codes. ``search_threads``:
    faiss threads per search (1: concurrent requests use the cores; ``None``: faiss' default). The service state
    (with :meth:`~crossret.serve.state.ServiceState.reload`) is ``app.state.service``.
    Loading errors raise before any app exists.
    """
    require_serve_extra()
    state = ServiceState(run_dir, database=database, index=index, kind=kind, limits=limits,
                         search_threads=search_threads)
    return build_app(state)


# --------------------------------------------------------------------------------------------
# errors


def _error_body(kind: str, message: str) -> dict[str, str]:
    return {"error": kind, "detail": message}


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


# pydantic error types -> what the field must be (plain JSON words rather than pydantic's "valid array").
_TYPE_WORDS = {"list_type": "a list", "float_type": "a number", "int_type": "an integer",
               "int_from_float": "an integer", "bool_type": "true or false", "string_type": "a string"}


def _validation_error(exc: Any, fields: list[str]) -> RequestError:
    """A pydantic ValidationError -> one RequestError whose message names each offending field."""
    errors = exc.errors(include_url=False, include_input=False)
    if any(err["type"] == "json_invalid" for err in errors):
        detail = next(err["msg"] for err in errors if err["type"] == "json_invalid")
        return RequestError(400, "invalid_json", f"the request body is not valid JSON ({detail})")
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


def _parse(model: Any, body: bytes) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc, list(model.model_fields)) from None


def _check_json_content_type(headers: Any) -> None:
    content_type = headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        shown = content_type or "none"
        raise RequestError(415, "unsupported_media_type",
                           f"send the body as JSON with 'Content-Type: application/json' (got {shown})")


# --------------------------------------------------------------------------------------------
# body size limit


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` with 413 before they are parsed (pure ASGI).

    A declared ``Content-Length`` over the limit is refused without reading a byte; otherwise the
    body is read in chunks, counting, and refused as soon as the count passes the limit (chunked
    uploads declare no length). A body within the limit is replayed to the app unchanged.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, kind: str,
                      message: str) -> None:
        from starlette.responses import JSONResponse

        response = JSONResponse(_error_body(kind, message), status_code=status, headers={"Connection": "close"})
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = (f"request body exceeds the limit of {self.max_bytes} bytes; send fewer or smaller queries "
                     "(see GET /info for the limits)")
        declared = [value for key, value in scope.get("headers", []) if key.lower() == b"content-length"]
        if declared:
            try:
                length = int(declared[0])
                if length < 0:
                    raise ValueError
            except ValueError:
                await self._refuse(scope, receive, send, 400, "invalid_content_length",
                                   "the Content-Length header is not a non-negative integer")
                return
            if length > self.max_bytes:
                await self._refuse(scope, receive, send, 413, "body_too_large",
                                   f"{too_large} (Content-Length: {length})")
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
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
# the app


def build_app(state: ServiceState) -> Any:
    """The FastAPI app over an existing service state."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from crossret import __version__
    from crossret.serve import schemas

    # No OpenAPI/docs routes: the service exposes exactly the endpoints documented in docs/serve.md.
    app = FastAPI(title="crossret search", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(_error_body(exc.kind, exc.message), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        messages = {404: f"no endpoint {request.url.path!r}; see docs/serve.md",
                    405: f"{request.method} is not allowed on {request.url.path!r}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return JSONResponse(_error_body(kinds.get(exc.status_code, "http_error"), message),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Reached only through a bug: log it, and keep internals out of the response.
        logger.exception("internal error while serving a request")
        return JSONResponse(_error_body("internal", "internal server error; see the server log"), status_code=500)

    async def answer(request: Request, model: Any, to_queries: Callable[[Any], list[Query]]) -> JSONResponse:
        _check_json_content_type(request.headers)
        body = await request.body()

        def work() -> dict[str, Any]:
            parsed = _parse(model, body)
            return state.search(to_queries(parsed), parsed.k, return_codes=parsed.return_codes)

        return JSONResponse(await run_in_threadpool(work))

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: status, index size, code length, snapshot generation."""
        return state.health()

    @app.get("/info")
    def info() -> dict[str, Any]:
        """Code length, size, index kind, method, database, limits and the run's metadata."""
        return state.info()

    @app.post("/search")
    async def search(request: Request) -> JSONResponse:
        """A mixed batch: each query is one of features / code / hex / id."""
        return await answer(request, schemas.BatchRequest, _batch_queries)

    @app.post("/search/features")
    async def search_features(request: Request) -> JSONResponse:
        """Raw feature vectors, encoded by the run's model."""
        return await answer(request, schemas.FeaturesRequest,
                            lambda p: [Query("features", row, f"features[{i}]") for i, row in enumerate(p.features)])

    @app.post("/search/codes")
    async def search_codes(request: Request) -> JSONResponse:
        """Codes as ±1/0-1 lists (``codes``) or packed hex strings (``hex``)."""
        return await answer(request, schemas.CodesRequest, _code_queries)

    @app.post("/search/ids")
    async def search_ids(request: Request) -> JSONResponse:
        """Database items by id: each item's own code is the query."""
        return await answer(request, schemas.IdsRequest, lambda p: [
            Query("id", value, f"ids[{i}]", p.exclude_self) for i, value in enumerate(p.ids)])

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


def run_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (one process: the index lives in its memory)."""
    require_serve_extra(server=True)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
