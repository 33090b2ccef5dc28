"""The interface every hashing method implements (methods are found by name in :mod:`crossret.hashing.registry`).

A method is configured by a dataclass (serialisable to YAML), fitted on the labelled source and
the *unlabelled* target training set, and then encodes any features to ±1 int8 codes.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import numpy as np

from crossret.data.domain import Domain
from crossret.errors import ConfigError
from crossret.lazy_exports import lazy_getattr
from crossret.limits import check_bits, check_memory
from crossret.progress import ProgressFn as ProgressFn  # re-exported for method modules
from crossret.progress import no_progress as no_progress  # re-exported for method modules

# encode_real hands back one real value per row and bit (float64 at worst), then the int8 code
_ENCODE_BYTES_PER_BIT = 9


class HashMethod(abc.ABC):
    """Base class of hashing methods.

    Subclasses set ``name`` and ``config_class`` and implement :meth:`fit` and :meth:`encode_real`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    # Whether fit() trains data-parallel under torchrun (docs/distributed.md); the others refuse to run there.
    data_parallel: ClassVar[bool] = False
    # Whether fit() needs source labels; LSH and ITQ learn from features alone.
    uses_source_labels: ClassVar[bool] = True

    def __init__(self, bits: int, seed: int = 0, config: Any | None = None) -> None:
        if not isinstance(bits, int):
            raise ConfigError(f"--bits must be a positive integer, got {bits!r}")
        self.bits = check_bits(bits)
        self.seed = int(seed)
        self.config = config if config is not None else self.config_class()
        self.input_dim: int | None = None
        self.diagnostics: dict[str, Any] = {}

    def check_sizes(self, source: Domain, target: Domain) -> None:
        """Refuse options whose allocations on these domains cannot fit in memory (a :class:`ConfigError`
        naming the option), before anything is allocated or written: :meth:`fit` calls it first, and
        ``run_experiment`` before it creates the run directory. Methods add their own structures (and
        read ``target`` only if they train on it; :meth:`encode` checks every set it encodes)."""
        n = source.n
        check_memory(n * self.bits * _ENCODE_BYTES_PER_BIT, f"{self.name}: encoding {n} rows to {self.bits}-bit codes",
                     "use fewer --bits")

    @abc.abstractmethod
    def fit(self, source: Domain, target: Domain, progress: ProgressFn = no_progress) -> HashMethod:
        """Learn from labelled ``source`` and unlabelled ``target`` (its labels are all -1)."""

    @abc.abstractmethod
    def encode_real(self, features: np.ndarray, domain: str = "target") -> np.ndarray:
        """Real-valued outputs ``(N, bits)`` whose sign is the code (``domain``: see :meth:`encode`)."""

    def encode(self, features: np.ndarray, domain: str = "target") -> np.ndarray:
        """±1 int8 codes ``(N, bits)``; ``sign(0) = +1``.

        ``domain`` names where the features come from, ``"target"`` (the default: queries and any new
        data of the adapted domain) or ``"source"`` (e.g. the labelled source as a cross-domain
        database). Methods with per-domain input statistics (COUPLE's ``center_per_domain``) normalise
        each domain with its own; the others ignore it.
        """
        from crossret.retrieval.packing import binarize

        check_domain(domain)
        features = self._check_features(features)
        check_memory(features.shape[0] * self.bits * _ENCODE_BYTES_PER_BIT, f"{self.name}: encoding "
                     f"{features.shape[0]} rows to {self.bits}-bit codes",
                     "use fewer --bits or encode in batches (crossret index encode)")
        return binarize(self.encode_real(features, domain=domain))

    def _check_features(self, features: np.ndarray) -> np.ndarray:
        from crossret.data.domain import check_features
        from crossret.errors import DataError

        if self.input_dim is None:
            raise ConfigError(f"{self.name}: call fit() before encode()")
        array = np.asarray(features)
        if array.ndim != 2 or array.shape[1] != self.input_dim:
            raise DataError(
                f"{self.name}: expected features of shape (N, {self.input_dim}), got {array.shape}"
            )
        if array.shape[0] == 0:  # encoding nothing is valid (an empty query batch)
            return np.empty((0, self.input_dim), np.float32)
        # One rule for every entry point: dtype, float32 range, NaN/inf with the offending row numbers.
        return check_features(array, f"{self.name}.encode")

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


DOMAINS = ("target", "source")


def check_domain(domain: str) -> str:
    """``domain`` if it is one of :data:`DOMAINS`, else a :class:`ConfigError` listing them."""
    if domain not in DOMAINS:
        raise ConfigError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    return domain


# The registry functions' previous import path, kept for one release (use crossret.hashing.registry);
# resolved on first use so that this module never imports the registry.
__getattr__ = lazy_getattr("crossret.hashing.base", {name: "crossret.hashing.registry" for name in (
    "make_method", "register", "available_methods")})
