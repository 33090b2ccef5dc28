"""Locality-sensitive hashing with random hyperplanes (sign random projections).

Charikar, "Similarity estimation techniques from rounding algorithms", STOC 2002: for a Gaussian
random vector ``w``, ``P[sign(w·x) != sign(w·y)] = θ(x, y) / π``. The fraction of differing bits
between two codes is therefore an unbiased estimate of their angle over π. Data-independent except
for the centring (and optional standardisation), which use training features only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossret.data.domain import Domain
from crossret.errors import ConfigError, DataError
from crossret.hashing.base import HashMethod
from crossret.hashing.persistence import PersistentMethod
from crossret.hashing.preprocessing import FeatureNormalizer, bit_balance
from crossret.limits import check_memory
from crossret.progress import ProgressFn, no_progress


@dataclass
class LSHConfig:
    """LSH options.

    center: subtract the training mean (source ∪ target-train) so hyperplanes pass through the
        data's centre; without it non-negative features (pixels, ReLU activations) share most bits.
    standardize: also divide by the training standard deviation per feature, so that features
        with a large range do not dominate the angle.
    use_target: include the unlabelled target-train features in the statistics.
    """

    center: bool = True
    standardize: bool = False
    use_target: bool = True

    def validate(self) -> None:
        for key in ("center", "standardize", "use_target"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"lsh: {key} must be true or false, got {getattr(self, key)!r}")


class LSH(PersistentMethod, HashMethod):
    """Random-hyperplane LSH (Charikar 2002): ``b = sign(W^T (x - μ) / σ)``, ``W ~ N(0, I)`` seeded."""

    name = "lsh"
    uses_source_labels = False
    config_class = LSHConfig
    storage = "npz"

    def __init__(self, bits: int, seed: int = 0, config: LSHConfig | None = None) -> None:
        super().__init__(bits, seed, config)
        self.config.validate()
        self.normalizer: FeatureNormalizer | None = None
        self.projection: np.ndarray | None = None

    def fit(self, source: Domain, target: Domain, progress: ProgressFn = no_progress) -> LSH:
        start = time.perf_counter()
        self.check_sizes(source, target)
        progress(0, 1, "lsh: fitting")
        parts = [source.features]
        if self.config.use_target:
            if target.dim != source.dim:
                raise DataError(f"lsh: source has {source.dim} features, target {target.dim}")
            parts.append(target.features)
        train = np.concatenate(parts, axis=0)
        self.normalizer = FeatureNormalizer(center=self.config.center, scale=self.config.standardize)
        self.normalizer.fit(train)
        rng = np.random.default_rng(self.seed)
        self.projection = rng.standard_normal((source.dim, self.bits))
        self.input_dim = source.dim
        self.diagnostics = {
            "n_train": int(train.shape[0]),
            "train_bit_balance": bit_balance(self.encode(train)),
            "feature_rescale": self.normalizer.global_scale,
            "fit_seconds": time.perf_counter() - start,
        }
        progress(1, 1, "lsh: done")
        return self

    def check_sizes(self, source: Domain, target: Domain) -> None:
        super().check_sizes(source, target)
        n = source.n + (target.n if self.config.use_target else 0)
        # the projection, and the projected training data for the bit balance
        check_memory(8 * (source.dim + n) * self.bits, f"lsh: {self.bits}-bit codes of {n} x {source.dim} features",
                     "use fewer --bits")

    def encode_real(self, features: np.ndarray, domain: str = "target") -> np.ndarray:
        # One normaliser for both domains: ``domain`` does not change the codes.
        features = self._check_features(features)
        assert self.normalizer is not None and self.projection is not None  # set with input_dim
        return self.normalizer.transform(features) @ self.projection

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        assert self.normalizer is not None and self.projection is not None
        return {**self.normalizer.state(), "projection": self.projection}, {}

    def _set_state(self, arrays: dict[str, np.ndarray], state_dict: dict[str, Any]) -> None:
        self.normalizer = FeatureNormalizer.from_state(arrays)
        projection = np.asarray(arrays["projection"], dtype=np.float64)
        if projection.shape != (self.input_dim, self.bits) or self.normalizer.dim != self.input_dim:
            raise ValueError(f"projection shape {projection.shape} != ({self.input_dim}, {self.bits})")
        self.projection = projection
