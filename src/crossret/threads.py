"""One thread policy for the libraries crossret drives: torch, BLAS, faiss (OpenMP) and numba.

Each library keeps its own thread count, and two of them can silently share one: faiss calls OpenMP,
and when torch was imported first (it loads its ``libgomp`` globally) faiss' OpenMP *is* torch's, so
``torch.set_num_threads(1)`` around a training loop also puts every faiss search inside it on one
thread. This module owns those settings per *phase* of the work:

=================  ===========================================  ==================================
phase              what runs                                    libraries set
=================  ===========================================  ==================================
``train``          torch training of the hashing networks       torch
``linear_algebra`` PCA / ITQ / SVD (numpy, scipy, scikit-learn) BLAS (threadpoolctl)
``graph_search``   faiss kNN of the graph builders              faiss (OpenMP, and its BLAS)
``search``         index search (faiss, crossret's top-k)       faiss, numba
``evaluate``       Hamming metrics (numba kernels)              numba
=================  ===========================================  ==================================

:func:`use_threads` sets them for a block and restores every library's previous setting afterwards,
also of loaded libraries the phase does not set, since one library can move another's: where they
share torch's OpenMP runtime, faiss' and torch's counts are one setting, and numba's OpenMP threading
layer sets that count to its pool size when its threads start.

Counts come from, highest precedence first: the ``threads`` argument (a method's ``num_threads``
option), ``CROSSRET_THREADS_<PHASE>`` (e.g. ``CROSSRET_THREADS_LINEAR_ALGEBRA``), ``CROSSRET_THREADS``
(every phase), and :data:`DEFAULT_THREADS` (chosen by measurement, docs/scale.md).

Libraries are imported only when a phase needs them (``import crossret`` stays light). The OpenMP and
numba settings belong to the calling thread; torch's and BLAS' are process-wide, so a block is meant
for the thread that does the phase's work.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from crossret.errors import ConfigError

__all__ = ["DEFAULT_THREADS", "ENV_ALL", "PHASES", "ThreadPolicy", "env_name", "usable_cpus", "use_threads"]

PHASES: tuple[str, ...] = ("train", "linear_algebra", "graph_search", "search", "evaluate")
ENV_ALL = "CROSSRET_THREADS"

# Per phase: a count, or "cores" for every CPU this process may run on. linear_algebra, graph_search and
# evaluate: the better worst case of 1 vs 2 threads over the machine as it was and with extra load
# (benchmarks/threads.py, docs/scale.md). train: small MLPs train fastest on one torch thread
# (docs/architecture.md). search: not measured here; faiss' and numba's own default (every core).
DEFAULT_THREADS: dict[str, int | Literal["cores"]] = {
    "train": 1,
    "linear_algebra": 1,
    "graph_search": 1,
    "search": "cores",
    "evaluate": "cores",
}

_LIBRARIES: dict[str, tuple[str, ...]] = {
    "train": ("torch",),
    "linear_algebra": ("blas",),
    "graph_search": ("faiss",),
    "search": ("numba", "faiss"),  # numba first: starting its threads moves the OpenMP count
    "evaluate": ("numba",),
}


def env_name(phase: str) -> str:
    """The environment variable of one phase: ``CROSSRET_THREADS_<PHASE>``."""
    return f"{ENV_ALL}_{phase.upper()}"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _bound() -> int:
    from crossret.limits import max_threads  # imports numpy: only when a count is checked

    return max_threads()


def _check_count(value: Any, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= _bound():
        raise ConfigError(f"{name} must be an integer from 1 to {_bound()} ({usable_cpus()} CPUs here), got "
                          f"{value!r}; {fix}")
    return int(value)


def _parse_env(name: str, raw: str) -> int:
    text = raw.strip()
    value: Any = int(text) if text.isascii() and text.isdigit() else raw
    return _check_count(value, name, f"set {name} to a thread count or unset it")


@dataclass(frozen=True)
class ThreadPolicy:
    """Thread counts per phase; ``None`` is the phase's default (:data:`DEFAULT_THREADS`)."""

    train: int | None = None
    linear_algebra: int | None = None
    graph_search: int | None = None
    search: int | None = None
    evaluate: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None:
                _check_count(value, f"ThreadPolicy.{field.name}", "give a thread count or None (the default)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ThreadPolicy:
        """The policy the environment asks for: ``CROSSRET_THREADS_<PHASE>``, else ``CROSSRET_THREADS``.

        Raises :class:`ConfigError` naming the variable for a value that is not a thread count, and for
        a ``CROSSRET_THREADS_*`` variable that names no phase (a typo would otherwise be ignored).
        """
        env = os.environ if environ is None else environ
        known = {env_name(phase) for phase in PHASES}
        for name in env:
            if name.startswith(ENV_ALL + "_") and name not in known:
                raise ConfigError(f"unknown variable {name}: the thread phases are "
                                  f"{', '.join(env_name(p) for p in PHASES)}; rename or unset it")
        every = env.get(ENV_ALL, "").strip()
        shared = _parse_env(ENV_ALL, every) if every else None
        counts: dict[str, int | None] = {}
        for phase in PHASES:
            raw = env.get(env_name(phase), "").strip()
            counts[phase] = _parse_env(env_name(phase), raw) if raw else shared
        return cls(**counts)

    def threads(self, phase: str) -> int:
        """The thread count of ``phase`` (its default resolved against this machine)."""
        _check_phase(phase)
        value = getattr(self, phase)
        if value is None:
            default = DEFAULT_THREADS[phase]
            value = usable_cpus() if default == "cores" else default
        return int(value)


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ConfigError(f"unknown thread phase {phase!r}; choose one of {', '.join(PHASES)}")


# ---------------------------------------------------------------------------------------- libraries
# A getter returns the current count of an already imported library (None when it is not imported: it
# never imports one); a setter imports its library if needed and sets the calling thread's count.


def _torch_get() -> int | None:
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None and hasattr(torch, "get_num_threads") else None


def _torch_set(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _faiss_get() -> int | None:
    faiss = sys.modules.get("faiss")
    return int(faiss.omp_get_max_threads()) if faiss is not None and hasattr(faiss, "omp_get_max_threads") else None


def _faiss_set(n: int) -> None:
    import faiss

    if faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)


def _numba_get() -> int | None:
    numba = sys.modules.get("numba")
    if numba is None or not hasattr(numba, "get_num_threads"):
        return None
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", True):
        # Not started yet: reading the count would start numba's threads (which moves the OpenMP count
        # of the calling thread, see the module docstring); until then it is the pool size.
        return int(numba.config.NUMBA_NUM_THREADS)
    return int(numba.get_num_threads())


def _numba_set(n: int) -> None:
    if "numba" not in sys.modules:
        from crossret.kernel_cache import configure_numba_cache

        configure_numba_cache()  # before numba reads its configuration
    import numba

    n = min(n, int(numba.config.NUMBA_NUM_THREADS))  # numba cannot exceed the pool it started with
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


# Restored in the order of use_threads' exit: faiss before torch (with a shared OpenMP runtime faiss' count
# is torch's too), numba last.
_GETTERS: dict[str, Callable[[], int | None]] = {"torch": _torch_get, "faiss": _faiss_get, "numba": _numba_get}
_SETTERS: dict[str, Callable[[int], None]] = {"faiss": _faiss_set, "torch": _torch_set, "numba": _numba_set}


def _blas_limit(n: int) -> Callable[[], None]:
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(limits=n, user_api="blas")
    return limits.restore_original_limits


@contextlib.contextmanager
def use_threads(phase: str, threads: int | None = None, *, policy: ThreadPolicy | None = None) -> Iterator[int]:
    """Run a block with ``phase``'s thread counts (see the module docstring); yields the count.

    ``threads``: an explicit count (e.g. a method's ``num_threads``), ahead of the policy. ``policy``:
    default :meth:`ThreadPolicy.from_env`. On exit BLAS, then faiss, torch and numba get back the
    settings they had on entry (each library that was imported on entry).
    """
    _check_phase(phase)
    if threads is not None:
        n = _check_count(threads, f"{phase} threads", "give a thread count")
    else:
        n = (policy if policy is not None else ThreadPolicy.from_env()).threads(phase)
    before = {name: get() for name, get in _GETTERS.items()}
    restore_blas: Callable[[], None] | None = None
    try:
        for library in _LIBRARIES[phase]:
            if library == "blas":
                restore_blas = _blas_limit(n)
            else:
                _SETTERS[library](n)
        yield n
    finally:
        if restore_blas is not None:
            restore_blas()
        # faiss first: where faiss shares torch's OpenMP runtime, torch's count is that runtime's too.
        for name in ("faiss", "torch", "numba"):
            previous = before[name]
            if previous is not None and _GETTERS[name]() != previous:
                _SETTERS[name](previous)
