"""Feature normalisation fitted on training data only.

Every baseline (and COUPLE later) standardises its inputs with statistics of the data it *trains*
on — never of the queries or the database it is evaluated on — so that encoding a query never
depends on which other queries happen to be encoded with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossret.errors import ConfigError, DataError

# Features whose training standard deviation is below this are treated as constant: dividing by
# a ~0 std would blow their (noise) values up to the scale of informative features.
_MIN_STD = 1e-8


@dataclass
class FeatureNormalizer:
    """Affine per-feature normaliser ``x -> (x - mean) / scale``.

    ``center`` subtracts the training mean, ``scale`` divides by the training standard deviation
    (a z-score, as sklearn's ``StandardScaler``; constant features keep scale 1). Unlike
    ``StandardScaler`` the fitted statistics are plain arrays, so they are saved with a method
    (:meth:`state` / :meth:`from_state`) without pickling.
    """

    center: bool = True
    scale: bool = False
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> FeatureNormalizer:
        """Compute the statistics of ``features`` (the *training* data)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise DataError(f"normaliser: expected a non-empty 2-D feature matrix, got shape {x.shape}")
        dim = x.shape[1]
        # Statistics in float64: a float32 running sum over ~1e5 rows loses digits of the mean.
        self.mean_ = x.mean(axis=0) if self.center else np.zeros(dim)
        if self.scale:
            std = x.std(axis=0)
            self.scale_ = np.where(std > _MIN_STD, std, 1.0)
        else:
            self.scale_ = np.ones(dim)
        return self

    @property
    def fitted(self) -> bool:
        return self.mean_ is not None and self.scale_ is not None

    @property
    def dim(self) -> int:
        if self.mean_ is None:
            raise ConfigError("normaliser: call fit() first")
        return int(self.mean_.shape[0])

    def transform(self, features: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """Apply the training statistics to any features (queries, database, training data)."""
        if self.mean_ is None or self.scale_ is None:
            raise ConfigError("normaliser: call fit() before transform()")
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise DataError(f"normaliser: expected features (N, {self.mean_.shape[0]}), got {x.shape}")
        return ((x - self.mean_) / self.scale_).astype(dtype, copy=False)

    def fit_transform(self, features: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        return self.fit(features).transform(features, dtype=dtype)

    # ------------------------------------------------------------------ persistence
    def state(self, prefix: str = "norm_") -> dict[str, np.ndarray]:
        """The fitted statistics as named arrays (for an npz / tensor dict)."""
        if self.mean_ is None or self.scale_ is None:
            raise ConfigError("normaliser: call fit() before saving")
        return {
            f"{prefix}mean": np.asarray(self.mean_, dtype=np.float64),
            f"{prefix}scale": np.asarray(self.scale_, dtype=np.float64),
            f"{prefix}flags": np.array([self.center, self.scale], dtype=np.bool_),
        }

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], prefix: str = "norm_") -> FeatureNormalizer:
        """Inverse of :meth:`state`; raises ``KeyError``/``ValueError`` on malformed input (the
        loader turns them into a :class:`~crossret.errors.FileFormatError` naming the file)."""
        mean = np.asarray(arrays[f"{prefix}mean"], dtype=np.float64)
        scale = np.asarray(arrays[f"{prefix}scale"], dtype=np.float64)
        flags = np.asarray(arrays[f"{prefix}flags"], dtype=np.bool_)
        if mean.ndim != 1 or scale.shape != mean.shape or flags.shape != (2,):
            raise ValueError("normaliser statistics have inconsistent shapes")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("normaliser statistics are not finite / positive")
        return cls(center=bool(flags[0]), scale=bool(flags[1]), mean_=mean, scale_=scale)


def bit_balance(codes: np.ndarray) -> float:
    """Mean over bits of |fraction of +1 − 0.5|: 0 = every bit halves the data, 0.5 = constant bits.

    A cheap health number for any hash function, reported in the methods' diagnostics.
    """
    codes = np.asarray(codes)
    return float(np.abs((codes > 0).mean(axis=0) - 0.5).mean())
