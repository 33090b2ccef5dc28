"""Feature normalisation fitted on training data only.

Every baseline (and COUPLE later) standardises its inputs with statistics of the data it *trains*
on — never of the queries or the database it is evaluated on — so that encoding a query never
depends on which other queries happen to be encoded with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossret.errors import ConfigError, DataError

# Features whose training standard deviation is below this (times the largest feature std when that
# is below 1, so that uniformly tiny data is still standardised) are treated as constant: dividing by
# a ~0 std would blow their (noise) values up to the scale of informative features.
_MIN_STD = 1e-8
# The normalised training data's RMS is kept inside [2^-20, 2^20] (about 1e-6 .. 1e6): outside it, a
# power of two brings it to [0.5, 1). Float32 networks overflow on inputs near 1e19 (BatchNorm squares
# them) and lose inputs near 1e-30 below BatchNorm's eps; a power of two is exact, so sign- and
# angle-based codes (LSH, ITQ) do not change, and data inside the window is not touched at all.
_RMS_WINDOW = (2.0 ** -20, 2.0 ** 20)
_CHUNK_VALUES = 1 << 22  # float64 values per temporary block (32 MiB)


@dataclass
class FeatureNormalizer:
    """Affine per-feature normaliser ``x -> (x - mean) / scale``.

    ``center`` subtracts the training mean, ``scale`` divides by the training standard deviation
    (a z-score, as sklearn's ``StandardScaler``). Unlike ``StandardScaler`` the fitted statistics are
    plain arrays, so they are saved with a method (:meth:`state` / :meth:`from_state`) without pickling.

    Numerical rules (``tests/test_numerical_robustness.py``):

    * a constant feature (all training values equal) keeps scale 1 and its mean is that value, so it
      normalises to exactly 0 on the training data (never 0/0, never rounding noise);
    * a training set whose normalised RMS lies outside ``[2^-20, 2^20]`` (e.g. features of magnitude
      1e30 or 1e-30) is multiplied by the power of two bringing the RMS to ``[0.5, 1)``, folded into
      ``scale_`` (so it is saved with the method) and reported as :attr:`global_scale`; data inside the
      window is untouched;
    * NaN/inf inputs are a :class:`DataError` naming the rows, and so is :meth:`transform` output that
      would overflow the requested dtype.
    """

    center: bool = True
    scale: bool = False
    mean_: np.ndarray | None = None
    scale_: np.ndarray | None = None
    # The power of two the magnitude rule divided by (1.0 = none); fit() sets it, for diagnostics.
    global_scale: float = 1.0

    def fit(self, features: np.ndarray) -> FeatureNormalizer:
        """Compute the statistics of ``features`` (the *training* data)."""
        x = _training_matrix(features)
        dim = x.shape[1]
        mean = _feature_means(x) if self.center else np.zeros(dim)
        if self.scale:
            low, high = x.min(axis=0), x.max(axis=0)
            constant = low == high
            std = x.std(axis=0)
            varying = std[~constant]
            floor = _MIN_STD * min(1.0, float(varying.max(initial=0.0)))
            scale = np.where(~constant & (std > floor), std, 1.0)
        else:
            scale = np.ones(dim)
        square_sum = _square_sum(x, mean, scale)
        self.global_scale = _window_scale(float(np.sqrt(square_sum / x.size)))
        self.mean_, self.scale_ = mean, scale * self.global_scale
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
        _require_finite(x, "normaliser: features")
        out = (x - self.mean_) / self.scale_
        if np.dtype(dtype).kind == "f" and np.dtype(dtype).itemsize < 8:
            limit = float(np.finfo(dtype).max)
            too_big = np.flatnonzero((np.abs(out) > limit).any(axis=1))
            if too_big.size:
                from crossret.data.domain import describe_rows

                raise DataError(
                    f"normaliser: {too_big.size} row(s) ({describe_rows(too_big)}) exceed the {np.dtype(dtype).name} "
                    f"range after normalisation (|x| up to {float(np.abs(out[too_big]).max()):.3g}): they are "
                    "far outside the scale of the training features; encode features of the same kind and scale "
                    "as the training data")
        return out.astype(dtype, copy=False)

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


def fit_per_domain(*domains: np.ndarray) -> list[FeatureNormalizer]:
    """One centring normaliser per domain: each domain's features minus *its own* training mean, with
    one shared (magnitude-rule) scale, so that the domains stay on the same scale.

    ``x -> x - mean_D`` for the features of domain ``D``: the first-order statistics of the domains
    are aligned before any learning (the input-level analogue of AdaBN, Li et al., ICLR-W 2017;
    CORAL, Sun et al., AAAI 2016, aligns the second order too). The same rules as
    :meth:`FeatureNormalizer.fit` hold per domain (constant features, NaN/inf, float64 statistics).
    """
    if not domains:
        raise DataError("normaliser: fit_per_domain needs at least one domain")
    matrices = [_training_matrix(x) for x in domains]
    if len({x.shape[1] for x in matrices}) != 1:
        raise DataError("normaliser: the domains' feature sizes differ "
                        f"({', '.join(str(x.shape[1]) for x in matrices)})")
    means = [_feature_means(x) for x in matrices]
    ones = np.ones(matrices[0].shape[1])
    square_sum = sum(_square_sum(x, mean, ones) for x, mean in zip(matrices, means, strict=True))
    global_scale = _window_scale(float(np.sqrt(square_sum / sum(x.size for x in matrices))))
    return [FeatureNormalizer(center=True, scale=False, mean_=mean, scale_=ones * global_scale,
                              global_scale=global_scale) for mean in means]


def _training_matrix(features: np.ndarray) -> np.ndarray:
    """``features`` as a finite, non-empty 2-D float64 matrix (statistics in float64: a float32 running
    sum over ~1e5 rows loses digits of the mean)."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"normaliser: expected a non-empty 2-D feature matrix, got shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise DataError(f"normaliser: features must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    _require_finite(x, "normaliser: training features")
    return x


def _feature_means(x: np.ndarray) -> np.ndarray:
    """Per-feature means; a constant feature's mean is exactly its value (it centres to exactly 0)."""
    low, high = x.min(axis=0), x.max(axis=0)
    mean = x.mean(axis=0)
    constant = low == high
    mean[constant] = low[constant]
    return mean


def _square_sum(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> float:
    """``sum(((x - mean) / scale)^2)`` in row chunks (no second n x d copy)."""
    total, rows = 0.0, max(1, _CHUNK_VALUES // x.shape[1])
    for lo in range(0, x.shape[0], rows):
        total += float(np.square((x[lo:lo + rows] - mean) / scale).sum())
    return total


def _window_scale(rms: float) -> float:
    """The power of two that brings an RMS outside ``[2^-20, 2^20]`` to ``[0.5, 1)``; 1.0 inside."""
    if rms > 0 and not _RMS_WINDOW[0] <= rms <= _RMS_WINDOW[1]:
        return float(2.0 ** np.frexp(rms)[1])  # rms / 2^e in [0.5, 1)
    return 1.0


def _require_finite(x: np.ndarray, what: str) -> None:
    """:class:`DataError` naming the rows of ``x`` that hold NaN or inf."""
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        from crossret.data.domain import describe_rows

        bad = np.flatnonzero(~finite)
        raise DataError(f"{what}: {bad.size} row(s) contain NaN or inf ({describe_rows(bad)}); clean or drop them")


def bit_balance(codes: np.ndarray) -> float:
    """Mean over bits of |fraction of +1 − 0.5|: 0 = every bit halves the data, 0.5 = constant bits.

    A cheap health number for any hash function, reported in the methods' diagnostics.
    """
    codes = np.asarray(codes)
    return float(np.abs((codes > 0).mean(axis=0) - 0.5).mean())
