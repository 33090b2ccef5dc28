"""Shared pieces of the COUPLE tests: a tiny configuration, Gaussian domains, fit helpers."""

from __future__ import annotations

import numpy as np

from crossret.data.domain import Domain
from crossret.hashing.couple import Couple, CoupleConfig

TINY = {"epochs": 4, "warmup_epochs": 1, "graph_every": 1, "batch_size": 32, "target_batch_size": 32,
        "hash_hidden": 32, "encoder_dim": 32}
BITS = 16


def tiny(**overrides) -> CoupleConfig:
    return CoupleConfig(**{**TINY, **overrides})


def gaussian_domains(seed: int = 0, n_per_class: int = 20, dim: int = 16, shift: float = 1.5):
    """3 well-separated Gaussian classes; the target is the same classes shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, size=(3, dim))
    labels = np.repeat(np.arange(3), n_per_class)
    xs = centres[labels] + rng.standard_normal((labels.size, dim))
    xt = centres[labels] + rng.standard_normal((labels.size, dim)) + shift
    return Domain("src", xs, labels), Domain("tgt", xt, labels.copy())


def fit_codes(source, target, config: CoupleConfig, seed: int = 0, **attrs) -> tuple[Couple, np.ndarray]:
    method = Couple(BITS, seed=seed, config=config)
    for key, value in attrs.items():
        setattr(method, key, value)
    method.fit(source, target)
    return method, method.encode_real(target.features)


def stop_after(epoch: int):
    """A progress callback that interrupts training after ``epoch`` completed epochs."""

    def progress(step, total, message=""):
        if message.startswith("couple:") and step == epoch:
            raise KeyboardInterrupt

    return progress


def without_timings(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if "seconds" not in k} for record in log]
