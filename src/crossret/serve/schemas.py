"""Request and response bodies of the search service (pydantic, strict).

Strict mode is what makes "validate every input" cheap and exact: a boolean or a string is never
taken for a number, ``1.0`` is not an integer, NaN/Infinity are refused, and unknown fields are an
error rather than silently ignored. Semantic checks (dimensions, code lengths, k bounds, ids) live
in :mod:`crossret.serve.state` so the library API gets them too.

:func:`request_models` builds the request models a service parses with: the same fields, with the
batch size bounded by the service's ``max_batch`` *while parsing* (a 6 MB list of ids is refused
after counting it, before a million Python objects exist) and every list failing fast on its first
bad element (one error, not a million; pydantic >= 2.8). The response models document the answers in the OpenAPI
schema; the service builds its answers as plain dicts.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

DEFAULT_K = 10

# Stop validating a list at its first bad element (pydantic >= 2.8; older versions report every one).
_FAIL_FAST: dict[str, Any] = {"fail_fast": True} if "fail_fast" in inspect.signature(Field).parameters else {}

#: Fields that hold the queries of a request (their list length is the batch size).
BATCH_FIELDS = ("features", "codes", "hex", "ids", "queries", "texts")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FeaturesRequest(_Body):
    """``POST /search/features``: raw feature vectors, encoded by the run's model."""

    features: list[list[float]]
    k: int = DEFAULT_K
    return_codes: bool = False


class CodesRequest(_Body):
    """``POST /search/codes``: exactly one of ``codes`` (±1 or 0/1 lists) or ``hex`` (packed codes)."""

    codes: list[list[int]] | None = None
    hex: list[str] | None = None
    k: int = DEFAULT_K
    return_codes: bool = False


class IdsRequest(_Body):
    """``POST /search/ids``: database items whose own codes are the queries."""

    ids: list[int]
    k: int = DEFAULT_K
    exclude_self: bool = False
    return_codes: bool = False


class QueryItem(_Body):
    """One query of ``POST /search``: exactly one of ``features``, ``code``, ``hex`` or ``id``."""

    features: list[float] | None = None
    code: list[int] | None = None
    hex: str | None = None
    id: int | None = None
    exclude_self: bool = False


class BatchRequest(_Body):
    """``POST /search``: a mixed batch of queries answered with one snapshot."""

    queries: list[QueryItem]
    k: int = DEFAULT_K
    return_codes: bool = False


def _row(item: Any) -> Any:
    """One query's list (a feature vector, a code): fails on its first bad element."""
    return Annotated[list[item], Field(**_FAIL_FAST)]


def _batch(item: Any, max_batch: int) -> Any:
    """The list of queries: 1..max_batch elements, counted before its elements are built."""
    return Annotated[list[item], Field(min_length=1, max_length=max_batch, **_FAIL_FAST)]


def request_models(max_batch: int) -> dict[str, type[BaseModel]]:
    """The request models of a service whose batches hold at most ``max_batch`` queries, by endpoint path."""
    config = _Body.model_config
    query_item = create_model(
        "QueryItem", __config__=config, __doc__=QueryItem.__doc__,
        features=(_row(float) | None, None), code=(_row(int) | None, None), hex=(str | None, None),
        id=(int | None, None), exclude_self=(bool, False))
    features = create_model("FeaturesRequest", __config__=config, __doc__=FeaturesRequest.__doc__,
                            features=(_batch(_row(float), max_batch), ...), k=(int, DEFAULT_K),
                            return_codes=(bool, False))
    codes = create_model("CodesRequest", __config__=config, __doc__=CodesRequest.__doc__,
                         codes=(_batch(_row(int), max_batch) | None, None), hex=(_batch(str, max_batch) | None, None),
                         k=(int, DEFAULT_K), return_codes=(bool, False))
    ids = create_model("IdsRequest", __config__=config, __doc__=IdsRequest.__doc__,
                       ids=(_batch(int, max_batch), ...), k=(int, DEFAULT_K), exclude_self=(bool, False),
                       return_codes=(bool, False))
    batch = create_model("BatchRequest", __config__=config, __doc__=BatchRequest.__doc__,
                         queries=(_batch(query_item, max_batch), ...), k=(int, DEFAULT_K), return_codes=(bool, False))
    return {"/search": batch, "/search/features": features, "/search/codes": codes, "/search/ids": ids}


class TextRequest(_Body):
    """``POST /search/text`` (a GCKD run): captions, each answered with the ``k`` best gallery images."""

    texts: list[str]
    k: int = DEFAULT_K


def text_request_models(max_batch: int, max_chars: int) -> dict[str, type[BaseModel]]:
    """The request model of a text-search service: 1..``max_batch`` captions of at most ``max_chars``
    characters each, counted while parsing."""
    text = Annotated[str, Field(max_length=max_chars)]
    model = create_model("TextRequest", __config__=_Body.model_config, __doc__=TextRequest.__doc__,
                         texts=(_batch(text, max_batch), ...), k=(int, DEFAULT_K))
    return {"/search/text": model}


# --------------------------------------------------------------------------------------------
# responses (documentation: the OpenAPI schema; the service answers with plain dicts)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorResponse(_Answer):
    """Every refusal: a machine-readable kind and a message naming the field and the problem."""

    error: str
    detail: str


class HealthResponse(_Answer):
    """``GET /health``."""

    status: Literal["ok"]
    size: int
    bits: int
    generation: int


class InfoResponse(_Answer):
    """``GET /info``: what is served, from where, and the limits."""

    service: Literal["crossret"]
    version: str
    bits: int
    size: int
    kind: str
    method: str | None
    database: str | None
    feature_dim: int | None
    feature_search: bool
    labels_known: bool
    labels_note: str | None
    item_ids: str
    run_dir: str | None
    index_file: str | None
    run: dict[str, Any] | None
    generation: int
    limits: dict[str, int | float]
    code_formats: dict[str, str]


class SearchResult(_Answer):
    """One query's answer: nearest items first (Hamming distance, ties by index position)."""

    ids: list[int]
    distances: list[int]
    labels: list[int | None] | None
    query_hex: str | None = Field(None, description="the query's packed code; present with return_codes")


class SearchResponse(_Answer):
    """Every search endpoint: one result per query, in request order."""

    k: int
    bits: int
    size: int
    generation: int
    results: list[SearchResult]


class TextHealthResponse(_Answer):
    """``GET /health`` of a text-search service."""

    status: Literal["ok"]
    size: int
    dim: int
    generation: int


class TextInfoResponse(_Answer):
    """``GET /info`` of a text-search service: the run, the gallery and the limits."""

    service: Literal["crossret"]
    version: str
    search: str
    size: int
    dim: int
    kind: str
    run_dir: str | None
    index_file: str | None
    gallery: str | None
    split: str | None
    generation: int
    limits: dict[str, int | float]
    max_text_chars: int


class TextSearchResult(_Answer):
    """One caption's answer: best ITC score first (ties by gallery position)."""

    text: str
    ids: list[int] = Field(description="gallery positions (the order of the split's images)")
    scores: list[float] = Field(description="ITC scores: cosine similarity of the caption and image embeddings")
    paths: list[str]
    person_ids: list[int] | None


class TextSearchResponse(_Answer):
    """``POST /search/text``: one result per caption, in request order."""

    k: int
    size: int
    generation: int
    results: list[TextSearchResult]
