"""Compile every numba kernel once, into the user cache, so that later processes only load them.

A crossret kernel is compiled the first time a process calls it with a new combination of argument
types, and the machine code is kept in numba's cache (:mod:`crossret.kernel_cache`); a process that
finds it there loads it instead of compiling it (docs/scale.md, "Kernel compilation").
:func:`compile_kernels` calls the public functions that reach each kernel on tiny inputs: codes of one
and of several 64-bit words (16, 64, 128 and 256 bits, in case a kernel specialises on the width), both
tie rules with MAP@k and precision@N, the top-k search with many queries and with one query (the path
that splits a query across threads and merges), the distance matrix, the flow diffusion's solver and the
multi-hash index check. ``crossret warmup`` runs it once after an install.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossret.progress import ProgressFn

__all__ = ["KERNEL_GROUPS", "compile_kernels"]

# Code lengths: 1 word (16, 64 bits), 2 and 4 words (128, 256 bits).
_BITS = (16, 64, 128, 256)
# One query over this many items, with >= 2 threads, takes the chunked top-k kernel (hamming_topk
# splits a query across threads above 2^18 query-item pairs, in chunks of >= 2^16 items).
_ONE_QUERY_ITEMS = 1 << 18


def _codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return np.where(rng.random((n, bits)) < 0.5, -1, 1).astype(np.int8)


def _evaluate(ties: str) -> Callable[[], None]:
    def run() -> None:
        from crossret.retrieval.metrics import evaluate_hamming

        rng = np.random.default_rng(0)
        for bits in _BITS:
            evaluate_hamming(_codes(rng, 8, bits), _codes(rng, 40, bits), rng.integers(0, 3, 8),
                             rng.integers(0, 3, 40), ties=ties, topk=5, precision_ns=(1, 10))
    return run


def _index_two_pass() -> None:
    """The two-pass index rule, which ``evaluate_hamming`` takes when a label has more relevant items
    than one block of its one-pass walk can record (a very large database)."""
    from crossret.retrieval import hamming

    rng = np.random.default_rng(6)
    for bits in _BITS:
        q, db = _words(rng, 8, bits), _words(rng, 40, bits)
        q_lab, db_lab = rng.integers(0, 3, 8).astype(np.int32), rng.integers(0, 3, 40).astype(np.int32)
        hist = np.zeros((8, 2 * (q.shape[1] * 64 + 1)), np.int64)
        hamming.distance_histograms(q, q_lab, db, db_lab, hist)
        shape = (8, hist.shape[1] // 2)
        state = [np.zeros(shape, np.int64) for _ in range(4)]
        hamming.index_rank_pass(q, q_lab, db, db_lab, *state, 5, np.array([1, 10], np.int64), np.zeros(8),
                                np.zeros(8), np.zeros(8, np.int64), np.zeros((8, 2), np.int64))


def _words(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    from crossret.retrieval.packing import pack_codes, packed_to_words

    return np.ascontiguousarray(packed_to_words(pack_codes(_codes(rng, n, bits)), bits))


def _topk_many() -> None:
    from crossret.retrieval.hamming import hamming_topk

    rng = np.random.default_rng(1)
    for bits in _BITS:
        hamming_topk(_words(rng, 16, bits), _words(rng, 64, bits), 5)


def _topk_one() -> None:
    """One query over 2^18 items on >= 2 numba threads: the kernel that splits a query across threads.

    With one numba thread (``NUMBA_NUM_THREADS=1``) that kernel is never used, and not compiled."""
    import numba

    from crossret.retrieval.hamming import hamming_topk

    rng = np.random.default_rng(2)
    previous = numba.get_num_threads()
    numba.set_num_threads(max(previous, min(2, numba.config.NUMBA_NUM_THREADS)))
    try:
        for bits in (64, 256):
            database = np.tile(_words(rng, 64, bits), (_ONE_QUERY_ITEMS // 64, 1))
            hamming_topk(_words(rng, 1, bits), database, 5)
    finally:
        numba.set_num_threads(previous)


def _distances() -> None:
    from crossret.retrieval.hamming import hamming_distances
    from crossret.retrieval.packing import pack_codes

    rng = np.random.default_rng(3)
    for bits in (64, 256):
        hamming_distances(pack_codes(_codes(rng, 4, bits)), pack_codes(_codes(rng, 6, bits)), bits)


def _diffusion() -> None:
    import scipy.sparse as sp

    from crossret.graph.diffusion import l2_flow_diffusion_active_set

    # A path 0-1-2-3 with more mass on node 0 than it holds: the active-set solver runs its CG kernel.
    adjacency = sp.csr_matrix(np.diag(np.ones(3), 1) + np.diag(np.ones(3), -1))
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    mass = np.zeros((4, 2))
    mass[0, 0] = mass[3, 1] = 3.0
    l2_flow_diffusion_active_set(adjacency, mass, degree)


def _multihash() -> None:
    """Saving and loading a multi-hash index checks its hash tables with a compiled scanner."""
    from crossret.retrieval.index import BinaryIndex
    from crossret.retrieval.packing import pack_codes

    rng = np.random.default_rng(4)
    index = BinaryIndex(32, kind="multihash", nhash=2, b=8)
    index.add(pack_codes(_codes(rng, 50, 32)))
    with tempfile.TemporaryDirectory(prefix="crossret-warmup-") as tmp:
        BinaryIndex.load(index.save(Path(tmp) / "warmup.crbi"))


# name -> what it compiles (by calling the public functions that use those kernels)
_GROUPS: dict[str, Callable[[], None]] = {
    "metrics, ties=expected": _evaluate("expected"),
    "metrics, ties=index": _evaluate("index"),
    "metrics, ties=index, two passes": _index_two_pass,
    "top-k search, many queries": _topk_many,
    "top-k search, one query": _topk_one,
    "distance matrix": _distances,
    "flow diffusion": _diffusion,
    "multi-hash index check": _multihash,
}
KERNEL_GROUPS: tuple[str, ...] = tuple(_GROUPS)


def compile_kernels(progress: ProgressFn | None = None) -> dict[str, float]:
    """Compile (or load from the cache) every numba kernel crossret uses; returns seconds per group.

    The first run after an install or an upgrade compiles and fills the cache; later runs, and every
    later process, load from it. ``progress(done, total, group)`` is called before each group and
    once at the end.
    """
    from crossret.kernel_cache import configure_numba_cache

    configure_numba_cache()
    seconds: dict[str, float] = {}
    total = len(_GROUPS)
    for done, (name, run) in enumerate(_GROUPS.items()):
        if progress is not None:
            progress(done, total, name)
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    if progress is not None:
        progress(total, total, "done")
    return seconds
