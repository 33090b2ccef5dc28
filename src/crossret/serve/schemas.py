"""Request bodies of the search service (pydantic, strict).

Strict mode is what makes "validate every input" cheap and exact: a boolean or a string is never
taken for a number, ``1.0`` is not an integer, NaN/Infinity are refused, and unknown fields are an
error rather than silently ignored. Semantic checks (dimensions, code lengths, k bounds, ids) live
in :mod:`crossret.serve.state` so the library API gets them too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

DEFAULT_K = 10


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
