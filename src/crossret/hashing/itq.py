"""Iterative Quantization (ITQ).

Gong, Lazebnik, Gordo, Perronnin, "Iterative Quantization: A Procrustean Approach to Learning
Binary Codes for Large-Scale Image Retrieval", TPAMI 35(12), 2013.

Centre the training data, project it with PCA to ``L`` dimensions (``V = X W``), then find the
orthogonal rotation ``R`` minimising the quantization loss ``Q(B, R) = ||B − V R||_F²`` by
alternating (§3 of the paper):

* fix ``R``: ``B = sign(V R)``;
* fix ``B``: orthogonal Procrustes, ``SVD(Bᵀ V) = S Ω Ŝᵀ`` → ``R = Ŝ Sᵀ``.

Each half-step minimises ``Q`` over its variable exactly, so ``Q`` is non-increasing; the
iteration starts from a seeded random orthogonal matrix. Codes are ``sign((x − μ) W R)``.

ITQ is unsupervised, so it fits on source ∪ target-train features (labels are never read).

Degenerate data: constant features centre to exactly 0 and drop out of the PCA (the rank counts only
directions with variance); when *every* training row is the same point there is no direction at all,
and the projection is 0: every item gets the all-(+1) code (``pca_rank`` 0 in the diagnostics). Feature
magnitudes far from 1 (1e30, 1e-30) are handled by the normaliser's power-of-two rescale, which leaves
the codes unchanged.

**More bits than the data's rank** (``L > r``, e.g. 128 bits on 64-d features, or ``L > n − 1``):
PCA gives only ``r`` informative directions. ``overflow`` chooses what the other ``L − r`` bits are
(recorded in ``diagnostics["overflow"]``):

* ``"padded"`` (default): zero-pad the PCA projection to ``L`` dimensions and run ITQ with an
  ``L × L`` rotation. ``V R`` then uses ``r`` orthonormal rows of ``R`` — an over-complete tight
  frame of the PCA space, learned by the same Procrustes iteration, so the extra bits are chosen
  to be well quantized rather than arbitrary.
* ``"random-projection"``: ITQ on the ``r`` PCA dimensions; the extra bits are signs of seeded
  Gaussian projections of the PCA space (LSH inside the informative subspace).
* ``"rotations"``: ITQ on the ``r`` dimensions; each further block of ``≤ r`` bits is the PCA space
  under an independent seeded random rotation.

``padded`` is the default, chosen on held-out *source* retrieval (no target labels; the comparison
is in docs/benchmarks.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA

from crossret.data.domain import Domain
from crossret.errors import ConfigError, DataError
from crossret.hashing.base import HashMethod
from crossret.hashing.persistence import PersistentMethod
from crossret.hashing.preprocessing import FeatureNormalizer, bit_balance
from crossret.limits import check_memory
from crossret.progress import ProgressFn, no_progress
from crossret.threads import use_threads

OVERFLOW_CHOICES = ("padded", "random-projection", "rotations")

# PCA directions whose variance is below this fraction of the largest are numerically zero (the
# data's rank is lower than the feature size): their signs would be rounding noise.
_RANK_TOL = 1e-10


@dataclass
class ITQConfig:
    """ITQ options.

    n_iter: alternating iterations (the paper uses 50; the loss has flattened well before).
    standardize: z-score each feature with training statistics before PCA (the paper only
        centres; useful when features have very different ranges, e.g. SURF histograms).
    use_target: include the unlabelled target-train features in the fit (source ∪ target).
    overflow: how bits beyond the data's rank are made — ``padded``, ``random-projection`` or
        ``rotations`` (see the module docstring).
    """

    n_iter: int = 50
    standardize: bool = False
    use_target: bool = True
    overflow: str = "padded"

    def validate(self) -> None:
        if not isinstance(self.n_iter, int) or isinstance(self.n_iter, bool) or self.n_iter < 0:
            raise ConfigError(f"itq: n_iter must be an integer >= 0, got {self.n_iter!r}")
        for key in ("standardize", "use_target"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"itq: {key} must be true or false, got {getattr(self, key)!r}")
        if self.overflow not in OVERFLOW_CHOICES:
            raise ConfigError(f"itq: overflow must be one of {', '.join(OVERFLOW_CHOICES)}, got {self.overflow!r}")


def random_orthogonal(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed random orthogonal ``dim × dim`` matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    # Multiplying columns by sign(diag(r)) makes the distribution uniform (Mezzadri 2007).
    return q * np.where(np.diag(r) >= 0, 1.0, -1.0)


def _sign(values: np.ndarray) -> np.ndarray:
    return np.where(values >= 0, 1.0, -1.0)


def itq_rotation(v: np.ndarray, n_iter: int, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Run ITQ on projected data ``v`` (n × k); returns the k × k rotation and the loss history.

    ``history[i]`` is ``||B_i − V R_i||² / (n k)`` with ``B_i = sign(V R_i)`` — the loss after the
    B-step of iteration ``i`` (``history[-1]`` is for the returned ``R``). Non-increasing.
    """
    n, k = v.shape
    rotation = random_orthogonal(k, rng)
    history: list[float] = []
    for _ in range(n_iter):
        projected = v @ rotation
        codes = _sign(projected)
        history.append(float(np.square(codes - projected).sum() / (n * k)))
        # Procrustes: maximise tr(Bᵀ V R) over orthogonal R.
        u, _, wt = np.linalg.svd(codes.T @ v)
        rotation = wt.T @ u.T
    projected = v @ rotation
    history.append(float(np.square(_sign(projected) - projected).sum() / (n * k)))
    return rotation, history


class ITQ(PersistentMethod, HashMethod):
    """Iterative Quantization (Gong et al., TPAMI 2013) on source ∪ target-train features."""

    name = "itq"
    uses_source_labels = False
    config_class = ITQConfig
    storage = "npz"

    def __init__(self, bits: int, seed: int = 0, config: ITQConfig | None = None) -> None:
        super().__init__(bits, seed, config)
        self.config.validate()
        self.normalizer: FeatureNormalizer | None = None
        # encode_real(x) = normalizer(x) @ projection - offset   (PCA and rotation folded together)
        self.projection: np.ndarray | None = None
        self.offset: np.ndarray | None = None
        self.rotation: np.ndarray | None = None  # the ITQ rotation (for inspection and tests)
        self.loss_history: list[float] = []

    def fit(self, source: Domain, target: Domain, progress: ProgressFn = no_progress) -> ITQ:
        # PCA and the Procrustes SVDs are BLAS work: the linear-algebra thread count (crossret.threads).
        with use_threads("linear_algebra"):
            return self._fit(source, target, progress)

    def _fit(self, source: Domain, target: Domain, progress: ProgressFn) -> ITQ:
        start = time.perf_counter()
        cfg = self.config
        parts = [source.features]
        if cfg.use_target:
            if target.dim != source.dim:
                raise DataError(f"itq: source has {source.dim} features, target {target.dim}")
            parts.append(target.features)
        self.check_sizes(source, target)
        train = np.concatenate(parts, axis=0)
        n, dim = train.shape
        if n < 2:
            raise DataError("itq: needs at least 2 training samples")
        rng = np.random.default_rng(self.seed)
        progress(0, cfg.n_iter + 1, "itq: PCA")

        self.normalizer = FeatureNormalizer(center=True, scale=cfg.standardize)
        x = self.normalizer.fit_transform(train)
        if not x.any():
            # Every training row is the same point (constant features centre to exactly 0): there is no
            # direction to learn. PCA would divide 0 by 0; instead the projection is 0, so every item
            # (training or not) gets the all-(+1) code by the sign(0) = +1 rule.
            return self._fit_without_variance(n, dim, start, progress)
        n_components = min(self.bits, n, dim)
        # svd_solver="full" is exact and deterministic; randomized only when the problem is big.
        solver = "full" if min(n, dim) <= 2048 else "randomized"
        pca = PCA(n_components=n_components, svd_solver=solver, random_state=self.seed)
        pca.fit(x)
        variances = pca.explained_variance_
        rank = int((variances > _RANK_TOL * max(float(variances[0]), 1e-300)).sum())
        rank = max(rank, 1)
        components = pca.components_[:rank].T  # dim × rank
        v = (x - pca.mean_) @ components

        def report(i: int, loss: float) -> None:
            progress(i, cfg.n_iter + 1, f"itq: iteration {i}/{cfg.n_iter} loss {loss:.4f}")

        extra = self.bits - rank
        overflow = "none" if extra == 0 else cfg.overflow
        if overflow == "padded":
            padded = np.zeros((n, self.bits))
            padded[:, :rank] = v
            rotation, history = itq_rotation(padded, cfg.n_iter, rng)
            # Only the first `rank` rows of R touch the data.
            subspace_map = rotation[:rank]  # rank × bits, orthonormal rows
        else:
            rotation, history = itq_rotation(v, cfg.n_iter, rng)
            blocks = [rotation]
            while extra > 0:
                width = min(extra, rank)
                if overflow == "random-projection":
                    blocks.append(rng.standard_normal((rank, width)))
                else:  # "rotations"
                    blocks.append(random_orthogonal(rank, rng)[:, :width])
                extra -= width
            subspace_map = np.concatenate(blocks, axis=1)
        for i, loss in enumerate(history[:-1]):
            if i % 10 == 0:
                report(i + 1, loss)

        self.rotation = rotation
        self.loss_history = history
        self.projection = components @ subspace_map
        self.offset = pca.mean_ @ self.projection
        self.input_dim = dim
        codes = self.encode(train)
        self.diagnostics = {
            "n_train": int(n),
            "pca_rank": rank,
            "overflow": overflow,
            "overflow_bits": int(self.bits - rank),
            "explained_variance": float(pca.explained_variance_ratio_[:rank].sum()),
            "feature_rescale": self.normalizer.global_scale,
            "quantization_loss_first": history[0],
            "quantization_loss_last": history[-1],
            "iterations": cfg.n_iter,
            "train_bit_balance": bit_balance(codes),
            "fit_seconds": time.perf_counter() - start,
        }
        progress(cfg.n_iter + 1, cfg.n_iter + 1, f"itq: done, loss {history[-1]:.4f}")
        return self

    def check_sizes(self, source: Domain, target: Domain) -> None:
        super().check_sizes(source, target)
        n, dim = source.n + (target.n if self.config.use_target else 0), source.dim
        # float64 working arrays: the projected data and its codes (and their copies in the rotation
        # updates), the rotation and the projection
        r = self.bits if self.config.overflow == "padded" else min(self.bits, n, dim)
        check_memory(8 * (4 * n * r + 4 * r * r + 2 * dim * self.bits),
                     f"itq: {self.bits}-bit codes of {n} x {dim} training features", "use fewer --bits")

    def _fit_without_variance(self, n: int, dim: int, start: float, progress: ProgressFn) -> ITQ:
        """The degenerate fit of :meth:`fit` when all training rows are identical (documented there)."""
        self.rotation = np.eye(self.bits)
        self.loss_history = [1.0]  # ||B − 0||² / (n L) with B = sign(0) = +1
        self.projection = np.zeros((dim, self.bits))
        self.offset = np.zeros(self.bits)
        self.input_dim = dim
        assert self.normalizer is not None
        self.diagnostics = {
            "n_train": int(n),
            "pca_rank": 0,
            "overflow": "none",
            "overflow_bits": int(self.bits),
            "explained_variance": 0.0,
            "quantization_loss_first": 1.0,
            "quantization_loss_last": 1.0,
            "iterations": 0,
            "train_bit_balance": 0.5,
            "feature_rescale": self.normalizer.global_scale,
            "degenerate": "all training rows are identical: every code is all +1",
            "fit_seconds": time.perf_counter() - start,
        }
        progress(self.config.n_iter + 1, self.config.n_iter + 1, "itq: done (no variance in the training data)")
        return self

    def encode_real(self, features: np.ndarray, domain: str = "target") -> np.ndarray:
        # One normaliser for both domains: ``domain`` does not change the codes.
        features = self._check_features(features)
        assert self.normalizer is not None and self.projection is not None and self.offset is not None
        return self.normalizer.transform(features) @ self.projection - self.offset

    def _get_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        assert self.normalizer is not None and self.projection is not None and self.offset is not None
        assert self.rotation is not None
        arrays = {
            **self.normalizer.state(),
            "projection": self.projection,
            "offset": self.offset,
            "rotation": self.rotation,
            "loss_history": np.asarray(self.loss_history, dtype=np.float64),
        }
        return arrays, {}

    def _set_state(self, arrays: dict[str, np.ndarray], state_dict: dict[str, Any]) -> None:
        self.normalizer = FeatureNormalizer.from_state(arrays)
        projection = np.asarray(arrays["projection"], dtype=np.float64)
        offset = np.asarray(arrays["offset"], dtype=np.float64)
        if projection.shape != (self.input_dim, self.bits) or offset.shape != (self.bits,):
            raise ValueError(f"projection {projection.shape} / offset {offset.shape} do not match the header")
        if self.normalizer.dim != self.input_dim:
            raise ValueError("normaliser size does not match input_dim")
        self.projection, self.offset = projection, offset
        self.rotation = np.asarray(arrays["rotation"], dtype=np.float64)
        self.loss_history = [float(v) for v in arrays["loss_history"]]
