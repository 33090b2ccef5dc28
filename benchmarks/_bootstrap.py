"""Paired differences with percentile-bootstrap confidence intervals (Efron & Tibshirani 1993, ch. 13).

Given paired differences ``d_1..d_n`` (a variant minus the baseline on the same setting and seed), the
statistic is the mean ``d̄``; the bootstrap draws ``B`` resamples of ``n`` indices with replacement
(``idx`` of shape (B, n)), takes each resample's mean ``m_b = mean(d[idx[b]])`` and reports the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``m_1..m_B`` (linear interpolation between order
statistics, numpy's default) as the interval. The generator is seeded, so an interval is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95


def bootstrap_means(diffs: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The ``resamples`` bootstrap means of ``diffs`` (n,) → (resamples,); indices from
    ``np.random.default_rng(seed).integers(0, n, size=(resamples, n))``."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"need a non-empty 1-d array of differences, got shape {d.shape}")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    return d[idx].mean(axis=1)


def paired_ci(diffs: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, Any]:
    """``{"mean": d̄, "ci95": [lo, hi], "n": n}``: the mean paired difference and its percentile-bootstrap
    interval at ``level`` (the key stays ``ci95`` for the benchmark's schema)."""
    d = np.asarray(diffs, dtype=np.float64)
    means = bootstrap_means(d, resamples, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)], "n": int(d.size)}


def paired_differences(values: Mapping[tuple[Any, ...], float], baseline: Mapping[tuple[Any, ...], float]
                       ) -> tuple[list[tuple[Any, ...]], np.ndarray]:
    """The keys both mappings have (sorted) and ``values[key] - baseline[key]`` for each, (n,)."""
    keys = sorted(set(values) & set(baseline))
    return keys, np.asarray([values[k] - baseline[k] for k in keys], dtype=np.float64)
