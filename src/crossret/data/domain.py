"""Domains and protocol splits: the objects every method and metric works on.

A :class:`Domain` is a validated ``(features, labels)`` pair. A :class:`RetrievalSplit` is what a
protocol yields (DESIGN "Data conventions"): the labelled source, the target training set (labels
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
        features = np.asarray(self.features)
        labels = np.asarray(self.labels)
        if features.ndim != 2:
            raise DataError(f"{where}: features must be a 2-D array (samples x dims), got shape {features.shape}")
        if features.shape[0] == 0:
            raise DataError(f"{where}: the domain is empty (0 samples)")
        if features.shape[1] == 0:
            raise DataError(f"{where}: features have 0 dimensions")
        if features.dtype.kind not in "fiub":
            raise DataError(f"{where}: features must be numeric, got dtype {features.dtype}")
        if features.dtype.kind == "f" and features.dtype.itemsize > 4:
            # Finite values too large for float32 would silently become inf; say so instead.
            limit = np.finfo(np.float32).max
            too_big = np.isfinite(features) & (np.abs(features) > limit)
            if too_big.any():
                raise DataError(
                    f"{where}: features have values beyond the float32 range (|x| > {limit:.3g}) in "
                    f"{int(too_big.any(axis=1).sum())} sample(s); rescale the features"
                )
        features = np.ascontiguousarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            bad = int((~np.isfinite(features)).any(axis=1).sum())
            raise DataError(
                f"{where}: {bad} sample(s) have NaN or inf features; clean or drop them before use"
            )
        labels = labels.reshape(-1) if labels.ndim == 2 and 1 in labels.shape else labels
        if labels.ndim != 1:
            raise DataError(f"{where}: labels must be 1-D (or N x 1 / 1 x N), got shape {np.shape(self.labels)}")
        if labels.shape[0] != features.shape[0]:
            raise DataError(
                f"{where}: {labels.shape[0]} labels for {features.shape[0]} samples; "
                "there must be exactly one label per sample"
            )
        if labels.dtype.kind == "f":
            if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
                raise DataError(f"{where}: labels must be integers, found non-integer or NaN values")
        elif labels.dtype.kind not in "iub":
            raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if (labels < UNKNOWN_LABEL).any():
            raise DataError(f"{where}: labels must be >= 0 (or -1 for unknown), found {int(labels.min())}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "labels", np.ascontiguousarray(labels))

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
