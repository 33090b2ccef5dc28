"""Pseudo-label refinement by class centroids (spherical k-means seeded with the current labels).

Given target features ``f_i`` (rows, l2-normalised here) and pseudo-labels ``y_i`` (from COUPLE's
diffusion), iterate

    c_k = normalise( Σ_{i: y_i = k} f_i )          (class centroid, one per class present)
    y_i = argmax_k cos(f_i, c_k)

until no label changes or ``max_iterations`` passes: k-means on the unit sphere whose clusters start
at, and keep the names of, the pseudo-classes. This is SHOT's self-supervised pseudo-labelling (Liang
et al., ICML 2020, §3.3) and CAN's source-initialised spherical k-means (Kang et al., CVPR 2019),
with hard labels as the initial assignment. Errors scattered across a well-formed target cluster are
outvoted by its majority; a class's confidence is the margin ``cos(f_i, c_(1)) − cos(f_i, c_(2))``
between the nearest and the second-nearest centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from crossret.errors import DataError
from crossret.graph.knn import unit_rows


@dataclass
class CentroidRefinement:
    """Outcome of :func:`refine_by_centroids`.

    labels: ``(n,)`` int64 refined labels. margin: ``(n,)`` float64, cosine to the nearest centroid
    minus cosine to the second nearest (``−1`` stands in for a missing second class), in ``[0, 2]``.
    iterations: assignment passes made. converged: the last pass changed no label.
    """

    labels: np.ndarray
    margin: np.ndarray
    iterations: int
    converged: bool


def refine_by_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int,
                        max_iterations: int = 10) -> CentroidRefinement:
    """Spherical k-means started from ``labels`` (see the module doc).

    Args:
        features: ``(n, d)`` finite features (cosine geometry: rows are normalised; an all-zero row
            has no direction, adds nothing to a centroid and keeps its label).
        labels: ``(n,)`` integer labels in ``[0, num_classes)``: the initial assignment.
        num_classes: ``C``. A class that no sample carries has no centroid and is never assigned;
            a class that loses every member keeps its last centroid (standard k-means practice).
        max_iterations: bound on the assignment passes (``≥ 1``).
    """
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] == 0:
        raise DataError(f"centroid refinement: expected a non-empty (n, d) feature matrix, got shape {f.shape}")
    y = np.asarray(labels)
    if y.shape != (f.shape[0],):
        raise DataError(f"centroid refinement: {f.shape[0]} feature rows but labels of shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"centroid refinement: labels must be integers, got dtype {y.dtype}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise DataError(f"centroid refinement: num_classes must be a positive integer, got {num_classes!r}")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"centroid refinement: labels must lie in [0, {num_classes}), "
                        f"got values in [{y.min()}, {y.max()}]")
    if (isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer))
            or max_iterations < 1):
        raise DataError(f"centroid refinement: max_iterations must be an integer >= 1, got {max_iterations!r}")
    unit = unit_rows(f, "features", owner="centroid refinement")
    n = unit.shape[0]
    directionless = ~unit.any(axis=1)
    current = y.astype(np.int64)
    centroids = np.zeros((num_classes, unit.shape[1]))
    present = np.zeros(num_classes, dtype=bool)
    converged = False
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        # Class sums as one sparse (C, n) one-hot product: no loop over samples or classes.
        members = sp.csr_matrix((np.ones(n), (current, np.arange(n))), shape=(num_classes, n))
        sums = np.asarray(members @ unit)
        norms = np.linalg.norm(sums, axis=1)
        occupied = norms > 0
        centroids[occupied] = sums[occupied] / norms[occupied, None]
        present |= occupied  # an emptied class keeps its last centroid
        similarity = unit @ centroids.T
        similarity[:, ~present] = -np.inf
        updated = np.where(directionless, current, similarity.argmax(axis=1)).astype(np.int64)
        converged = bool(np.array_equal(updated, current))
        current = updated
        if converged:
            break
    # Margins against the centroids the final labels were assigned by.
    top2 = -np.sort(-similarity, axis=1)[:, :2]
    first = np.where(np.isfinite(top2[:, 0]), top2[:, 0], 0.0)
    second = top2[:, 1] if top2.shape[1] > 1 else np.full(n, -1.0)
    second = np.where(np.isfinite(second), second, -1.0)
    return CentroidRefinement(current, np.where(directionless, 0.0, first - second), iterations, converged)

