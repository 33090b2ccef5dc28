"""Domains and protocol splits: the objects every method and metric works on.

A :class:`Domain` is a validated ``(features, labels)`` pair. A :class:`RetrievalSplit` is what a
protocol yields (docs/benchmarks.md, "Protocols"): the labelled source, the target training set (labels
kept *only* for evaluation), the target queries, and the two databases:

* cross-domain database  = source,
* single-domain database = target-train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossret.errors import DataError

UNKNOWN_LABEL = -1


def check_features(value: Any, where: str, what: str = "", unit: str = "sample") -> np.ndarray:
    """Validated float32 C-contiguous ``(N, d)`` features: numeric, 2-D, non-empty, within the float32
    range (a larger finite value would silently become inf) and finite. ``what`` prefixes the noun in
    messages (``"image"`` → "image features"); ``unit`` names a row ("sample", "pair")."""
    noun = f"{what} features" if what else "features"
    array = np.asarray(value)
    if array.ndim != 2:
        raise DataError(f"{where}: {noun} must be a 2-D array ({unit}s x dims), got shape {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{where}: the {'domain' if unit == 'sample' else 'set'} is empty (0 {unit}s)")
    if array.shape[1] == 0:
        raise DataError(f"{where}: {noun} have 0 dimensions")
    if array.dtype.kind not in "fiub":
        raise DataError(f"{where}: {noun} must be numeric, got dtype {array.dtype}")
    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        limit = np.finfo(np.float32).max
        too_big = np.isfinite(array) & (np.abs(array) > limit)
        if too_big.any():
            raise DataError(f"{where}: {noun} have values beyond the float32 range (|x| > {limit:.3g}) in "
                            f"{int(too_big.any(axis=1).sum())} {unit}(s); rescale the features")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise DataError(f"{where}: {rows.size} {unit}(s) have NaN or inf {noun} ({describe_rows(rows)}); "
                        "clean or drop them before use")
    return array


def describe_rows(rows: np.ndarray, limit: int = 10) -> str:
    """``"rows 3, 7"`` / ``"row 3"`` / ``"rows 0, 1, …, 9 and 5 more"``: 0-based row indices for messages."""
    rows = np.asarray(rows).reshape(-1)
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" and {rows.size - limit} more" if rows.size > limit else ""
    return f"row{'s' if rows.size != 1 else ''} {shown}{more}"


MAX_CLASS_ID = (1 << 20) - 1  # classifier heads and per-class seed matrices are sized max id + 1


def class_count(labels: np.ndarray, where: str) -> int:
    """``max label + 1``, the number of classifier outputs a method allocates for ``labels`` (ids ``>= 0``).
    Ids above :data:`MAX_CLASS_ID` are refused: they would allocate a head of that size (out of memory)."""
    top = int(np.max(labels))
    if top > MAX_CLASS_ID:
        raise DataError(f"{where}: label id {top} is too large (ids must be < {MAX_CLASS_ID + 1}: a classifier of "
                        f"max id + 1 outputs is allocated); renumber the classes to 0..C-1, e.g. with "
                        "np.unique(labels, return_inverse=True)")
    return top + 1


def check_labels(value: Any, where: str, n: int, unit: str = "sample") -> np.ndarray:
    """Validated int64 ``(n,)`` labels (``N×1`` / ``1×N`` accepted): integers, ``>= 0`` or -1 (unknown)."""
    labels = np.asarray(value)
    labels = labels.reshape(-1) if labels.ndim == 2 and 1 in labels.shape else labels
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D (or N x 1 / 1 x N), got shape {np.shape(value)}")
    if labels.shape[0] != n:
        raise DataError(f"{where}: {labels.shape[0]} labels for {n} {unit}s; there must be exactly one label per "
                        f"{unit}")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
            raise DataError(f"{where}: labels must be integers, found non-integer or NaN values")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    # Range before the int64 cast: a float 1e20 or a uint64 above 2^63 would wrap to a negative label.
    if labels.size and labels.dtype.kind in "fu" and (
            int(labels.max()) > np.iinfo(np.int64).max if labels.dtype.kind == "u" else labels.max() >= 2.0 ** 63):
        raise DataError(f"{where}: labels must be integers below 2^63, found {float(labels.max()):.6g}; renumber the "
                        "classes 0..C-1")
    labels = labels.astype(np.int64)
    if (labels < UNKNOWN_LABEL).any():
        raise DataError(f"{where}: labels must be >= 0 (or -1 for unknown), found {int(labels.min())}")
    return np.ascontiguousarray(labels)


@dataclass(frozen=True, eq=False)
class Domain:
    """A collection of items: ``features`` float32 ``(N, d)``, ``labels`` int64 ``(N,)`` (-1 = unknown).

    Construction validates and converts; errors name ``origin`` (usually the file it came from).
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    origin: str = ""

    def __post_init__(self) -> None:
        where = self.origin or self.name
        features = check_features(self.features, where)
        labels = check_labels(self.labels, where, features.shape[0])
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "labels", labels)

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def is_labelled(self) -> bool:
        return bool((self.labels >= 0).all())

    @property
    def classes(self) -> np.ndarray:
        """Sorted known class ids (excluding -1)."""
        return np.unique(self.labels[self.labels >= 0])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, n={self.n}, dim={self.dim}, classes={self.classes.size})"

    # ------------------------------------------------------------------ derived domains
    def subset(self, index: np.ndarray, name: str | None = None) -> Domain:
        index = np.asarray(index)
        return Domain(name or self.name, self.features[index], self.labels[index], self.origin)

    def with_features(self, features: np.ndarray, name: str | None = None) -> Domain:
        """Same items and labels, new features (e.g. after preprocessing)."""
        return Domain(name or self.name, features, self.labels, self.origin)

    def without_labels(self) -> Domain:
        """The same items with every label set to -1: what a training method may see of the target."""
        return Domain(self.name, self.features, np.full(self.n, UNKNOWN_LABEL, dtype=np.int64), self.origin)

    def require_labels(self, min_classes: int = 2) -> Domain:
        """Raise unless every item is labelled and there are at least ``min_classes`` classes."""
        where = self.origin or self.name
        if not self.is_labelled:
            raise DataError(f"{where}: {int((self.labels < 0).sum())} item(s) have unknown labels (-1); "
                            "this role needs every item labelled")
        if self.classes.size < min_classes:
            raise DataError(
                f"{where}: {self.classes.size} class(es) present; retrieval by label needs at least "
                f"{min_classes} classes"
            )
        return self


@dataclass(frozen=True, eq=False)
class RetrievalSplit:
    """What a protocol yields. ``target_train.labels`` are for evaluation only: methods receive
    :meth:`training_target` (labels removed)."""

    source: Domain
    target_train: Domain
    queries: Domain
    benchmark: str
    protocol: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dims = {self.source.dim, self.target_train.dim, self.queries.dim}
        if len(dims) != 1:
            raise DataError(
                f"{self.benchmark}: feature sizes differ (source {self.source.dim}, target "
                f"{self.target_train.dim}, queries {self.queries.dim}); source and target must be "
                "described by the same features"
            )

    @property
    def cross_database(self) -> Domain:
        """Database for cross-domain retrieval (target queries against the labelled source)."""
        return self.source

    @property
    def single_database(self) -> Domain:
        """Database for single-domain retrieval (target queries against the target training set)."""
        return self.target_train

    def training_target(self) -> Domain:
        """The target training set as a method may see it: features only, labels -1."""
        return self.target_train.without_labels()

    def summary(self) -> dict[str, Any]:
        return {
            **self.protocol,
            "benchmark": self.benchmark,
            "source": {"name": self.source.name, "n": self.source.n},
            "target_train": {"name": self.target_train.name, "n": self.target_train.n},
            "queries": {"n": self.queries.n},
            "dim": self.source.dim,
            "classes": int(np.union1d(self.source.classes, self.queries.classes).size),
        }
