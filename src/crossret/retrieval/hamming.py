"""Numba kernels for Hamming-distance retrieval metrics.

Everything here works on codes already turned into uint64 words by
:func:`crossret.retrieval.packing.packed_to_words` (shape ``(n, W)``, ``W = ceil(L / 64)``, zero
padded), and on *label codes*: int32 arrays where a query and a database item are relevant to each
other iff their label codes are equal. The caller (:mod:`crossret.retrieval.metrics`) maps database
label -1 to a code no query has, so the kernels need no special case for "unknown".

Kernels
-------
* :func:`distance_histograms` (pass 1): for every query ``q`` and distance ``d`` in ``0..L``,
  ``hist[q, d]`` = # non-relevant items at distance ``d`` and ``hist[q, (L+1) + d]`` = # relevant
  items at distance ``d``. One branch-free increment per (query, item) pair; the database is fed
  in chunks and the counts accumulate.
* :func:`index_rank_pass` (pass 2, tie rule ``index``): walks the database in order. With
  ``C_d`` / ``Cr_d`` = # items / # relevant items at distances ``< d`` (from pass 1) and running
  counts ``seen_d`` / ``seen_rel_d`` (persisting across chunks), a relevant item at distance ``d`` has
  rank ``C_d + seen_d + 1`` and relevant-rank ``Cr_d + seen_rel_d + 1``, which is exactly its place
  in a stable sort by distance.
* :func:`expected_rank_metrics` (tie rule ``expected``): exact expectations over uniformly random
  orders within tie groups, from the per-distance counts alone (see the function docstring).
* :func:`hamming_distances`: the full ``(Q, N)`` int32 distance matrix, for small inputs and tests.
* :func:`hamming_topk`: exact top-k by (distance, position) — the search of the ``flat``
  :class:`crossret.retrieval.BinaryIndex` — by a query-blocked threshold scan while k is a small
  share of the database, else by histogram threshold and counting sort (no heap either way).

The blocked kernels are compiled ``nogil`` and run on Python threads (:func:`_run_blocks`), as many
as numba's thread count allows (``crossret.threads`` sets it per phase).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numba as nb
import numpy as np
from numba import prange
from numba.cpython.unsafe.numbers import trailing_zeros

from crossret.errors import CodeError, ConfigError, DataError
from crossret.limits import check_result_slots
from crossret.retrieval.bit_masks import (
    BELOW_BLOCK,
    MASK_WIDTH,
    any_popcount_below,
    blocks_popcount_below,
    equal_mask64,
    popcount_below_mask64,
    quarters_popcount_below,
)
from crossret.retrieval.packing import check_packed, packed_to_words
from crossret.retrieval.vector_width import prefer_wide_vectors

# SWAR popcount constants. They must be uint64: mixing uint64 with int64 makes numba fall back to
# float64 arithmetic.
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_S1 = np.uint64(1)
_S2 = np.uint64(2)
_S4 = np.uint64(4)
_S56 = np.uint64(56)

# Below this many terms a harmonic difference is summed directly (exact to rounding); above it the
# asymptotic expansion is used, started at an argument >= this value so that its truncation error
# (~ 1 / (240 a^8)) is below 1e-17.
_DIRECT_TERMS = 64

# Below this many (query, item) pairs a call runs on one thread: waking the worker threads costs more
# than the work itself (docs/scale.md, "Exact search speed").
_SERIAL_PAIRS = 1 << 18

# The smallest query block of the threshold scan (see search_query_block); multi-word codes take the
# scan only with at least half a block of queries to share each tile's word-major copy.
_QUERY_BLOCK = 16


def _run_blocks(kernel: Callable[..., None], n_tasks: int, n_threads: int, *args: object) -> None:
    """``kernel(*args, task0, task1)`` over tasks ``0..n_tasks``, split into contiguous ranges run on
    ``n_threads`` threads. The kernels are compiled ``nogil`` and parallelised here rather than with
    numba's ``prange``: the inner loops of a ``parallel=True`` kernel compiled to slower code, and
    plain threads honour the caller's thread count exactly. Tasks write disjoint outputs."""
    if n_threads <= 1 or n_tasks <= 1:
        kernel(*args, np.int64(0), np.int64(n_tasks))
        return
    parts = min(n_tasks, 4 * n_threads)  # a few ranges per thread balance uneven tasks
    bounds = np.linspace(0, n_tasks, parts + 1).astype(np.int64)
    pool = _worker_pool(n_threads)
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(parts)]
    for future in futures:
        future.result()


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _worker_pool(n_threads: int) -> ThreadPoolExecutor:
    """A thread pool of ``n_threads`` workers kept for the process: starting threads for every call cost
    more than a one-query search. One pool per thread count, so a call never gets more threads than it
    asked for; callers that share a pool share its threads. Made anew in a forked child (the parent's
    worker threads do not exist there)."""
    key = (os.getpid(), n_threads)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="crossret-hamming")
        return pool


@contextmanager
def _threads_for(pairs: int) -> Iterator[None]:
    """Run small calls single-threaded (numba's thread count is per calling thread)."""
    if pairs >= _SERIAL_PAIRS:
        yield
        return
    previous = nb.get_num_threads()
    nb.set_num_threads(1)
    try:
        yield
    finally:
        nb.set_num_threads(previous)


@nb.njit(inline="always", cache=True)
def _popcount64(x: np.uint64) -> np.int64:
    """Number of set bits of a uint64 (SWAR; LLVM lowers it to ``popcnt`` where available)."""
    x = x - ((x >> _S1) & _M1)
    x = (x & _M2) + ((x >> _S2) & _M2)
    x = (x + (x >> _S4)) & _M4
    return np.int64((x * _H01) >> _S56)


# Serial: a helper for small inputs, and a parallel kernel takes much longer to compile.
@nb.njit(cache=True)
def _distance_kernel(q_words, db_words, out):  # pragma: no cover - compiled
    n_q, n_words = q_words.shape
    n_db = db_words.shape[0]
    for q in range(n_q):
        for j in range(n_db):
            d = np.int64(0)
            for w in range(n_words):
                d += _popcount64(q_words[q, w] ^ db_words[j, w])
            out[q, j] = d


@nb.njit(inline="always", cache=True)
def _distance(q_words, q, first_word, db_words, j, n_words):  # pragma: no cover - compiled
    """Hamming distance of query ``q`` and item ``j``; ``first_word = q_words[q, 0]``."""
    if n_words == 1:
        return _popcount64(first_word ^ db_words[j, 0])
    d = np.int64(0)
    for w in range(n_words):
        d += _popcount64(q_words[q, w] ^ db_words[j, w])
    return d


# The metric passes are query-blocked: a block of up to ``_EVAL_BLOCK`` queries walks the database chunk in
# tiles of ``_EVAL_TILE`` items (multi-word codes copied word-major once per block); every query of the
# block computes the tile's "slots" (distance, plus ``L + 1`` for a relevant item) by vectorised
# passes, then counts them, so the database is read from memory once per block instead of once per
# query. The counting itself (one increment per (query, item) pair, into four interleaved histograms
# so that runs of equal distances do not serialise on one counter) is what bounds the pass. The tile,
# its labels, the slots and one query's histograms stay in L1.
_EVAL_TILE = 2048
_EVAL_BLOCK = 64
_EVAL_LANES = 4


def _eval_block(n_queries: int, n_threads: int) -> int:
    """Queries per block of a metric pass: at most ``_EVAL_BLOCK``, and equal shares for the threads (with
    7 blocks on 2 threads, one thread would idle through the last one)."""
    per_thread = -(-n_queries // max(1, n_threads))
    blocks_per_thread = -(-per_thread // _EVAL_BLOCK)
    return max(1, -(-per_thread // max(1, blocks_per_thread)))


def _flat_codes(db_words: np.ndarray) -> np.ndarray:
    """1-word codes as one contiguous vector (the kernels read them in place; a column view would not
    vectorise); an empty placeholder for wider codes."""
    return db_words.reshape(-1) if db_words.shape[1] == 1 else db_words[:0, 0].copy()


_ALIGN = 64  # bytes: a 512-bit load that straddles two cache lines costs two


@nb.njit(inline="always", cache=True)
def _aligned_empty(n, dtype):  # pragma: no cover - compiled
    """An uninitialised vector of ``n`` items whose data starts on a ``_ALIGN``-byte boundary (the heap
    gives 16: vector loads from a tile that starts mid-line cost up to 1.7x as much)."""
    raw = np.empty(n + _ALIGN, dtype)
    size = raw.itemsize
    skip = (_ALIGN - raw.ctypes.data % _ALIGN) % _ALIGN // size
    return raw[skip:skip + n]


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` whose data starts on a ``_ALIGN``-byte boundary."""
    raw = np.empty(array.nbytes + _ALIGN, np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    out = raw[skip:skip + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


@nb.njit(inline="always", cache=True)
def _load_tile(db_words, t0, t1, tile, stride):  # pragma: no cover - compiled
    """Copy items ``t0..t1`` word-major into the flat ``tile`` (word ``w`` of item ``j`` at
    ``w * stride + j``). For 2 and 4 words the loop reads the row-major codes with a constant stride
    and unsigned offsets, so that it vectorises (as shuffles): item by item with signed 2-D indices
    it cost a fifth of a 128-bit search at k = 10."""
    n_words = db_words.shape[1]
    n = t1 - t0
    flat = db_words.reshape(db_words.size)
    s1, s2, s3 = np.uint64(stride), np.uint64(2 * stride), np.uint64(3 * stride)
    if n_words == 2:
        for j in range(n):
            u = np.uint64(2 * (t0 + j))
            tile[np.uint64(j)] = flat[u]
            tile[s1 + np.uint64(j)] = flat[u + np.uint64(1)]
    elif n_words == 4:
        for j in range(n):
            u = np.uint64(4 * (t0 + j))
            tile[np.uint64(j)] = flat[u]
            tile[s1 + np.uint64(j)] = flat[u + np.uint64(1)]
            tile[s2 + np.uint64(j)] = flat[u + np.uint64(2)]
            tile[s3 + np.uint64(j)] = flat[u + np.uint64(3)]
    else:
        for j in range(n):
            for w in range(n_words):
                tile[w * stride + j] = db_words[t0 + j, w]


@nb.njit(inline="always", cache=True)
def _tile_slots(q_row, label, codes, stride, first, n, labels, t0, rel_offset, slot):  # pragma: no cover
    """``slot[j] = distance(q_row, item j) + rel_offset · (labels[t0 + j] == label)`` for ``n`` items
    of word-major codes (word ``w`` of item ``j`` at ``codes[w * stride + first + j]``), vectorised:
    one pass per word, the first with the label test. Offsets are unsigned (see
    :func:`_scan_tile_one_word`). Returns how many of the items are relevant."""
    rel = np.uint32(rel_offset)
    base = np.uint64(first)
    lab = np.uint64(t0)
    a = q_row[0]
    n_rel = np.int64(0)
    for j in range(n):
        u = np.uint64(j)
        r = labels[lab + u] == label
        slot[j] = np.uint32(_popcount64(a ^ codes[base + u])) + rel * np.uint32(r)
        n_rel += r
    for w in range(1, q_row.shape[0]):
        a = q_row[w]
        base = np.uint64(w * stride + first)
        for j in range(n):
            u = np.uint64(j)
            slot[j] += np.uint32(_popcount64(a ^ codes[base + u]))
    return n_rel


@nb.njit(inline="always", cache=True)
def _count_slots(slot, n, lane, width):  # pragma: no cover - compiled
    """``lane[(j % 4) · width + slot[j]] += 1`` for the first ``n`` slots."""
    w1 = np.uint64(width)
    w2 = np.uint64(2 * width)
    w3 = np.uint64(3 * width)
    n4 = n // 4 * 4
    for j in range(0, n4, 4):
        lane[np.uint64(slot[j])] += 1
        lane[w1 + np.uint64(slot[j + 1])] += 1
        lane[w2 + np.uint64(slot[j + 2])] += 1
        lane[w3 + np.uint64(slot[j + 3])] += 1
    for j in range(n4, n):
        lane[np.uint64(slot[j])] += 1


@nb.njit(inline="always", cache=True)
def _tile_source(n_words, db_flat, db_words, t0, t1, tile, stride):  # pragma: no cover - compiled
    """Where a tile's codes are read from: 1-word codes straight from the database (``first = t0``),
    wider codes from a word-major copy (``first = 0``). Returns ``(codes, first)``."""
    if n_words == 1:
        return db_flat, t0
    _load_tile(db_words, t0, t1, tile, stride)
    return tile, 0


@nb.njit(nogil=True, cache=True)
def _histogram_kernel(q_words, q_labels, db_words, db_flat, db_labels, hist, q_block, blk0,
                      blk1):  # pragma: no cover - compiled
    """Query blocks ``blk0..blk1`` of pass 1 (see :func:`distance_histograms`). ``db_flat`` is
    ``db_words`` as one contiguous vector when ``W == 1``."""
    prefer_wide_vectors()
    n_q, n_words = q_words.shape
    n_db = db_words.shape[0]
    width = hist.shape[1]
    rel_offset = width // 2  # L + 1: relevant items count in the second half of a row
    for blk in range(blk0, blk1):
        q0 = blk * q_block
        q1 = min(q0 + q_block, n_q)
        lanes = np.zeros((q1 - q0) * _EVAL_LANES * width, np.int64)  # query b's lanes from b * 4 * width
        tile = np.empty(n_words * _EVAL_TILE, np.uint64)
        slot = np.empty(_EVAL_TILE, np.uint32)
        for t0 in range(0, n_db, _EVAL_TILE):
            t1 = min(t0 + _EVAL_TILE, n_db)
            n = t1 - t0
            codes, first = _tile_source(n_words, db_flat, db_words, t0, t1, tile, _EVAL_TILE)
            for b in range(q1 - q0):
                _tile_slots(q_words[q0 + b], q_labels[q0 + b], codes, _EVAL_TILE, first, n, db_labels, t0,
                            rel_offset, slot)
                _count_slots(slot, n, lanes[b * _EVAL_LANES * width:(b + 1) * _EVAL_LANES * width], width)
        for b in range(q1 - q0):
            row = hist[q0 + b]
            at = b * _EVAL_LANES * width
            for x in range(width):
                row[x] += lanes[at + x] + lanes[at + width + x] + lanes[at + 2 * width + x] + lanes[at + 3 * width + x]


# Each record packs (items at its distance before it) << _RECORD_SHIFT | distance (distances stay below
# 2**17, since codes have at most MAX_BITS = 2**16 bits).
_RECORD_SHIFT = 20
_RECORD_DISTANCE_MASK = (1 << _RECORD_SHIFT) - 1
# A tile whose relevant items are at most this share of it (1 / _SPARSE_RELEVANT) is counted by the
# histogram lanes with records for its relevant items; a denser tile is walked branch-free. The lanes
# measured faster up to 10 % relevant and even at 25 % (docs/scale.md).
_SPARSE_RELEVANT = 4


# Tie rule ``index`` in one pass over the database: every item of a query's walk counts at its
# distance (the counts at the end are pass 1's histogram), and each relevant item records its distance
# and how many items at that distance came before it. Its rank needs the items at smaller distances in
# the whole database, known only at the end, so ranks are scored afterwards from the records.
@nb.njit(nogil=True, cache=True)
def _index_walk_kernel(q_words, q_labels, db_words, db_flat, db_labels, seen, offsets, n_rec, rec_d, rec_s, q_block,
                       dist_type, blk0, blk1):  # pragma: no cover - compiled
    """Query blocks ``blk0..blk1`` of the one-pass tie rule ``index`` (see :func:`index_records_walk`).
    Each query of a block goes through each tile in database order. Its distances (held in
    ``dist_type``'s dtype: uint8 where they fit, so that one vector compare covers 64 of them) are
    computed vectorised, and the relevant items of every 64 as a bit mask (:func:`equal_mask64`); then
    every item is counted at its distance and each relevant one recorded:

    * a tile with few relevant items for the query is counted in four histogram lanes
      (``lane[(j % 4) · width + d]``, so that neighbours do not wait on each other's increments) by
      sub-blocks of 64 items: the items at ``d`` before a relevant one are ``seen[q, d]``, plus the
      lanes' counts at ``d``, plus those of its sub-block before it (a masked popcount of
      ``equal_mask64(dist, ., d)``); then the 64 are counted branch-free;
    * a denser tile is walked item by item straight into ``seen[q]``, branch-free (each item's record
      is written and kept only when relevant), after the lanes are folded into ``seen[q]``.

    Everything per query is written out here rather than in helpers: numba passes an array to an
    inlined helper with an atomic reference count update, a large share of the walk's time when paid
    per query and tile (docs/scale.md); arrays are indexed by unsigned offsets rather than sliced for
    the same reason."""
    prefer_wide_vectors()
    n_q, n_words = q_words.shape
    n_db = db_words.shape[0]
    width = seen.shape[1]
    w1 = np.uint64(width)
    w2 = np.uint64(2 * width)
    w3 = np.uint64(3 * width)
    one = np.uint64(1)
    mask = np.int64(_RECORD_DISTANCE_MASK)
    for blk in range(blk0, blk1):
        q0 = blk * q_block
        q1 = min(q0 + q_block, n_q)
        lanes = np.zeros((q1 - q0) * _EVAL_LANES * width, np.int64)  # query b's lanes from b * 4 * width
        in_lanes = np.zeros(q1 - q0, np.bool_)
        tile = np.empty(n_words * _EVAL_TILE, np.uint64)
        dist = np.empty(_EVAL_TILE, dist_type.dtype)
        relevant = np.empty(_EVAL_TILE // MASK_WIDTH + 1, np.uint64)  # bit i of word s: item 64 s + i
        packed = np.empty(_EVAL_TILE, np.int64)
        for t0 in range(0, n_db, _EVAL_TILE):
            t1 = min(t0 + _EVAL_TILE, n_db)
            n = t1 - t0
            codes, first = _tile_source(n_words, db_flat, db_words, t0, t1, tile, _EVAL_TILE)
            n_full = n // MASK_WIDTH
            for b in range(q1 - q0):
                q = q0 + b
                label = q_labels[q]
                n_rel = np.int64(0)
                for s in range(n_full):
                    found = equal_mask64(db_labels, t0 + MASK_WIDTH * s, label)
                    relevant[s] = found
                    n_rel += _popcount64(found)
                tail = np.uint64(0)
                for j in range(MASK_WIDTH * n_full, n):
                    tail |= np.uint64(db_labels[t0 + j] == label) << np.uint64(j - MASK_WIDTH * n_full)
                relevant[n_full] = tail
                n_rel += _popcount64(tail)
                base = np.uint64(first)
                a = q_words[q, 0]
                for j in range(n):
                    dist[j] = _popcount64(a ^ codes[base + np.uint64(j)])
                for w in range(1, n_words):
                    a = q_words[q, w]
                    base = np.uint64(w * _EVAL_TILE + first)
                    for j in range(n):
                        dist[j] += _popcount64(a ^ codes[base + np.uint64(j)])
                lb = np.uint64(b * _EVAL_LANES * width)  # this query's lanes
                m = np.int64(0)
                if n_rel * _SPARSE_RELEVANT <= n:
                    in_lanes[b] = True
                    for s in range(n_full):
                        s0 = MASK_WIDTH * s
                        sb = np.uint64(s0)
                        found = relevant[s]
                        while found != 0:
                            off = trailing_zeros(found)
                            found &= found - one
                            d = dist[sb + np.uint64(off)]
                            at = lb + np.uint64(d)
                            before = (seen[q, np.uint64(d)] + lanes[at] + lanes[at + w1] + lanes[at + w2]
                                      + lanes[at + w3])
                            # Items of the sub-block before it at distance d.
                            same = _popcount64(equal_mask64(dist, s0, d) & ((one << np.uint64(off)) - one))
                            packed[m] = ((before + same) << _RECORD_SHIFT) | np.int64(d)
                            m += 1
                        for j in range(0, MASK_WIDTH, 4):
                            u = sb + np.uint64(j)
                            lanes[lb + np.uint64(dist[u])] += 1
                            lanes[lb + w1 + np.uint64(dist[u + one])] += 1
                            lanes[lb + w2 + np.uint64(dist[u + np.uint64(2)])] += 1
                            lanes[lb + w3 + np.uint64(dist[u + np.uint64(3)])] += 1
                    for j in range(MASK_WIDTH * n_full, n):  # the tile's last few, one by one
                        at = lb + np.uint64(dist[j])
                        if (tail >> np.uint64(j - MASK_WIDTH * n_full)) & one:
                            before = (seen[q, np.uint64(dist[j])] + lanes[at] + lanes[at + w1] + lanes[at + w2]
                                      + lanes[at + w3])
                            packed[m] = (before << _RECORD_SHIFT) | np.int64(dist[j])
                            m += 1
                        lanes[at + np.uint64(j & 3) * w1] += 1
                else:
                    if in_lanes[b]:
                        _fold_lanes(lanes, lb, width, seen, q)
                        in_lanes[b] = False
                    for j in range(n):
                        d = np.uint64(dist[j])
                        before = seen[q, d]
                        seen[q, d] = before + 1
                        packed[m] = (before << _RECORD_SHIFT) | np.int64(d)
                        m += np.int64((relevant[j >> 6] >> np.uint64(j & 63)) & one)
                at = offsets[q] + n_rec[q]
                for r in range(m):
                    rec_d[at + r] = packed[r] & mask
                    rec_s[at + r] = packed[r] >> _RECORD_SHIFT
                n_rec[q] += m
        for b in range(q1 - q0):
            if in_lanes[b]:
                _fold_lanes(lanes, np.uint64(b * _EVAL_LANES * width), width, seen, q0 + b)


@nb.njit(inline="always", cache=True)
def _fold_lanes(lanes, lb, width, seen, q):  # pragma: no cover - compiled
    """Add query ``q``'s four lanes (from ``lanes[lb]``) into ``seen[q]`` and clear them (once per
    switch to the branch-free walk, and at the end)."""
    for d in range(width):
        at = lb + np.uint64(d)
        seen[q, d] += lanes[at] + lanes[at + np.uint64(width)] + lanes[at + np.uint64(2 * width)] + \
            lanes[at + np.uint64(3 * width)]
        lanes[at] = 0
        lanes[at + np.uint64(width)] = 0
        lanes[at + np.uint64(2 * width)] = 0
        lanes[at + np.uint64(3 * width)] = 0


@nb.njit(inline="always", cache=True)
def _score_relevant(d, s, seen_rel, before, before_rel, ns, first_under):  # pragma: no cover - compiled
    """A relevant item at distance ``d`` with ``s`` items at ``d`` before it: ``rank = before[d] + s + 1``,
    ``precision = (before_rel[d] + # relevant at d before it + 1) / rank`` (``seen_rel`` counts them).
    ``ns`` ascending: the item counts once, at the first cut-off it falls under (the caller turns
    these counts into "rank <= ns[t]" by a cumulative sum): a linear scan of up to 16 cut-offs, else a
    binary search. Returns ``(rank, precision)``."""
    sr = seen_rel[d]
    seen_rel[d] = sr + 1
    rank = before[d] + s + 1
    precision = (before_rel[d] + sr + 1) / rank
    n_cut = ns.shape[0]
    if n_cut <= 16:  # a short list: a linear scan beats the binary search's call
        t = 0
        while t < n_cut and ns[t] < rank:
            t += 1
    else:
        t = np.searchsorted(ns, rank)
    if t < n_cut:
        first_under[t] += 1
    return rank, precision


# The index-rule pass stays one query per thread (numba prange), walking the database in order: a
# query-blocked version with per-lane counters measured slower (docs/scale.md).
_RANK_BLOCK = 256


@nb.njit(parallel=True, cache=True)
def _index_rank_kernel(q_words, q_labels, db_words, db_labels, before, before_rel, seen, seen_rel,
                       topk, ns, ap_sum, apk_sum, n_rel_topk, rel_at_n):  # pragma: no cover
    n_q, n_words = q_words.shape
    n_db = db_words.shape[0]
    for q in prange(n_q):
        label = q_labels[q]
        first_word = q_words[q, 0]
        # Per-query state in private copies (written back at the end): no aliasing with inputs.
        seen_row = seen[q].copy()
        seen_rel_row = seen_rel[q].copy()
        before_row = before[q].copy()
        before_rel_row = before_rel[q].copy()
        ap_acc = ap_sum[q]
        apk_acc = apk_sum[q]
        nk = n_rel_topk[q]
        # Blocks: a branch-free counting loop that notes (distance, # seen before) of the relevant
        # items, then the (rare, ~1/#labels) relevant items are scored. Faster than one branchy loop
        # (docs/scale.md, "MAP evaluation at scale").
        rel_dist = np.empty(_RANK_BLOCK, dtype=np.int64)
        rel_seen = np.empty(_RANK_BLOCK, dtype=np.int64)
        under = rel_at_n[q]  # one view per query (a slice per item costs a reference count update)
        for j0 in range(0, n_db, _RANK_BLOCK):
            j1 = min(j0 + _RANK_BLOCK, n_db)
            n_found = 0
            for j in range(j0, j1):
                d = _distance(q_words, q, first_word, db_words, j, n_words)
                s = seen_row[d]
                seen_row[d] = s + 1
                rel_dist[n_found] = d
                rel_seen[n_found] = s
                n_found += np.int64(db_labels[j] == label)
            for i in range(n_found):
                rank, precision = _score_relevant(rel_dist[i], rel_seen[i], seen_rel_row, before_row,
                                                  before_rel_row, ns, under)
                ap_acc += precision
                if rank <= topk:
                    apk_acc += precision
                    nk += 1
        seen[q, :] = seen_row
        seen_rel[q, :] = seen_rel_row
        ap_sum[q] = ap_acc
        apk_sum[q] = apk_acc
        n_rel_topk[q] = nk


@nb.njit(parallel=True, cache=True)
def _index_score_kernel(seen, offsets, n_rec, rec_d, rec_s, topk, ns, rel_counts, ap_sum, apk_sum, n_rel_topk,
                        first_under, bad):  # pragma: no cover - compiled
    """Score every query's records (see :func:`index_records_score`). A query with a recorded distance
    outside ``0..L`` is left unscored with ``bad[q] = 1`` (the caller raises): checked here, in the
    pass that reads the records anyway, rather than by a gather over all of them beforehand."""
    n_q, n_dist = seen.shape
    for q in prange(n_q):
        base = offsets[q]
        n = n_rec[q]
        rel_row = rel_counts[q]
        for r in range(n):
            d = rec_d[base + r]
            if d < 0 or d >= n_dist:
                bad[q] = 1
                break
            rel_row[d] += 1
        if bad[q]:
            continue
        before = np.empty(n_dist, np.int64)  # items / relevant items at smaller distances
        before_rel = np.empty(n_dist, np.int64)
        total = np.int64(0)
        total_rel = np.int64(0)
        for d in range(n_dist):
            before[d] = total
            before_rel[d] = total_rel
            total += seen[q, d]
            total_rel += rel_row[d]
        seen_rel = np.zeros(n_dist, np.int64)
        ap_acc = 0.0
        apk_acc = 0.0
        nk = np.int64(0)
        under = first_under[q]  # one view per query: a slice per record costs a reference count update
        for r in range(n):  # in database order, as the two-pass kernel scores them
            rank, precision = _score_relevant(rec_d[base + r], rec_s[base + r], seen_rel, before, before_rel, ns,
                                              under)
            ap_acc += precision
            if rank <= topk:
                apk_acc += precision
                nk += 1
        ap_sum[q] = ap_acc
        apk_sum[q] = apk_acc
        n_rel_topk[q] = nk


@nb.njit(cache=True)
def _harmonic_difference(a: int, n: int) -> float:
    """``S = H(a + n) - H(a) = sum_{i=1..n} 1 / (a + i)`` for integers ``a >= 0``, ``n >= 0``.

    Accurate to a few ulps for any size: the first terms (up to ``_DIRECT_TERMS``) are summed
    directly; for the rest, ``H(b) - H(a) = log1p((b - a) / a) + (1/(2b) - 1/(2a))
    - (1/(12 b^2) - 1/(12 a^2)) + (1/(120 b^4) - 1/(120 a^4)) - (1/(252 b^6) - 1/(252 a^6))``
    with ``a >= 64`` (truncation error < 1e-17). A difference of digammas would lose ~log(a) / S
    relative precision when ``a ~ 1e6`` and ``n`` is small.
    """
    if n <= 0:
        return 0.0
    if n <= _DIRECT_TERMS:
        total = 0.0
        for i in range(1, n + 1):
            total += 1.0 / (a + i)
        return total
    total = 0.0
    start = a
    while start < _DIRECT_TERMS and start < a + n:
        start += 1
        total += 1.0 / start
    end = a + n
    if end == start:
        return total
    fa = float(start)
    fb = float(end)
    ia = 1.0 / fa
    ib = 1.0 / fb
    ia2 = ia * ia
    ib2 = ib * ib
    total += math.log1p((fb - fa) / fa)
    total += 0.5 * (ib - ia)
    total -= (ib2 - ia2) / 12.0
    total += (ib2 * ib2 - ia2 * ia2) / 120.0
    total -= (ib2 * ib2 * ib2 - ia2 * ia2 * ia2) / 252.0
    return total


@nb.njit(cache=True)
def _group_terms(n_before: int, n: int) -> tuple[float, float]:
    """``(S, T)`` for a tie group of ``n`` items after ``n_before`` items.

    ``S = sum_{i=1..n} 1 / (N_b + i)`` and ``T = sum_{i=1..n} (i - 1) / (N_b + i) = n - (N_b + 1) S``.
    ``T`` is summed directly for short groups: the closed form cancels badly when ``N_b >> n``.
    """
    if n <= _DIRECT_TERMS:
        s = 0.0
        t = 0.0
        for i in range(1, n + 1):
            inv = 1.0 / (n_before + i)
            s += inv
            t += (i - 1) * inv
        return s, t
    s = _harmonic_difference(n_before, n)
    # n >= 65 here, so T >= n (n - 1) / (2 (N_b + n)) and the cancellation costs at most a factor
    # 2 (N_b + n) / (n - 1) ~ 3e4 at N_b = 1e6: ~1e-11 relative.
    return s, n - (n_before + 1) * s


@nb.njit(cache=True)
def _expected_group_sum(n_before: int, rel_before: int, n: int, r: int) -> float:
    """Expected sum of precision@rank over the relevant items of a randomly ordered tie group.

    A group of ``n`` items (``r`` relevant) follows ``N_b = n_before`` items (``R_b = rel_before``
    relevant). Position ``i`` is relevant with probability ``r / n``; given that, the expected number
    of relevant items among the ``i - 1`` before it in the group is ``(i - 1)(r - 1) / (n - 1)``::

        E = sum_i (r/n) (R_b + 1 + (i-1)(r-1)/(n-1)) / (N_b + i)
          = (r/n) [ (R_b + 1) S + (r - 1)/(n - 1) T ],   S, T from ``_group_terms``.

    The ``T`` term is absent when ``n == 1``. Returns 0 when ``r == 0``.
    """
    if r <= 0 or n <= 0:
        return 0.0
    s, t = _group_terms(n_before, n)
    value = (rel_before + 1) * s
    if n > 1:
        value += (r - 1) / (n - 1) * t
    return r / n * value


@nb.njit(cache=True)
def _expected_truncated_ap(partial_full: float, n_before: int, rel_before: int, n: int, r: int,
                           m: int) -> float:
    """E[AP@k] when the cut at ``k`` falls inside a tie group (``0 < m = k - N_b < n``).

    The number ``j`` of relevant items among the ``m`` kept positions is hypergeometric
    ``(n, r, m)``; given ``j`` they are uniform among the ``m`` positions, so their expected
    precision sum is :func:`_expected_group_sum` with ``n -> m, r -> j``, which is
    ``(j/m)(R_b + 1) S_m + j (j - 1) / (m (m - 1)) T_m``. Then::

        E[AP@k] = sum_j P(j) (P_full + partial(j)) / (R_b + j)     (term 0 when R_b + j = 0)

    where ``P_full`` (``partial_full``) is the expected precision sum of the groups before. This is
    exact: earlier groups are ordered independently of the boundary group.

    The pmf is built by the ratio ``P(j+1)/P(j) = (r-j)(m-j) / ((j+1)(n-r-m+j+1))`` from the mode
    (weight 1) outwards and normalised by its sum, so no factorials or gammas are needed and
    nothing overflows; tail weights that underflow to 0 are negligible.
    """
    lo = max(0, m - (n - r))
    hi = min(r, m)
    size = hi - lo + 1
    weights = np.empty(size)
    mode = ((m + 1) * (r + 1)) // (n + 2)
    mode = min(max(mode, lo), hi)
    weights[mode - lo] = 1.0
    for j in range(mode, hi):
        weights[j + 1 - lo] = weights[j - lo] * ((r - j) * (m - j)) / ((j + 1) * (n - r - m + j + 1))
    for j in range(mode, lo, -1):
        # Inverse ratio P(j-1)/P(j) = j (n - r - m + j) / ((r - j + 1)(m - j + 1)).
        weights[j - 1 - lo] = weights[j - lo] * (j * (n - r - m + j)) / ((r - j + 1) * (m - j + 1))
    s_m, t_m = _group_terms(n_before, m)
    total_w = 0.0
    total = 0.0
    for j in range(lo, hi + 1):
        w = weights[j - lo]
        total_w += w
        denominator = rel_before + j
        if denominator == 0 or w == 0.0:
            continue
        part = j / m * (rel_before + 1) * s_m
        if m > 1:
            part += j * (j - 1) / (m * (m - 1)) * t_m
        total += w * (partial_full + part) / denominator
    return total / total_w


# Serial on purpose: O(Q (L + 1)) work (plus O(k) per query for AP@k) is small next to the
# O(Q N) distance pass, and a parallel kernel would add compile time.
@nb.njit(cache=True)
def _expected_kernel(counts, rel_counts, topk, ns, ap, apk, rel_at_n):  # pragma: no cover
    n_q, n_dist = counts.shape
    n_ns = ns.shape[0]
    for q in range(n_q):
        n_total = np.int64(0)
        r_total = np.int64(0)
        for d in range(n_dist):
            n_total += counts[q, d]
            r_total += rel_counts[q, d]
        n_before = np.int64(0)
        rel_before = np.int64(0)
        psum = 0.0
        apk_value = -1.0  # set when the top-k cut is reached
        for t in range(n_ns):
            rel_at_n[q, t] = 0.0
        for d in range(n_dist):
            n = counts[q, d]
            if n == 0:
                continue
            r = rel_counts[q, d]
            n_after = n_before + n
            # precision@N / recall@N: E[# relevant in the first N] is linear in the cut.
            for t in range(n_ns):
                cut = ns[t]
                if n_before < cut <= n_after:
                    rel_at_n[q, t] = rel_before + (cut - n_before) * r / n
            if apk_value < 0.0 and n_before < topk < n_after:
                if rel_before + r == 0:
                    apk_value = 0.0
                else:
                    apk_value = _expected_truncated_ap(psum, n_before, rel_before, n, r, topk - n_before)
            psum += _expected_group_sum(n_before, rel_before, n, r)
            if apk_value < 0.0 and n_after == topk:
                apk_value = psum / (rel_before + r) if rel_before + r > 0 else 0.0
            n_before = n_after
            rel_before += r
        for t in range(n_ns):
            if ns[t] > n_total:
                rel_at_n[q, t] = r_total  # every item retrieved (callers drop N > database size)
        ap[q] = psum / r_total if r_total > 0 else 0.0
        if apk_value < 0.0:
            # topk >= database size: AP@k is AP over everything, normalised by all relevant items.
            apk_value = ap[q]
        apk[q] = apk_value


@nb.njit(cache=True)
def _scan_bit_table(buf, b, id_bits, buckets, ntotal):  # pragma: no cover - compiled
    """Walk one faiss multi-hash table (``IndexBinaryMultiHash`` on disk): ``buckets`` records of a
    ``b``-bit key, an ``id_bits``-bit count and that many ``id_bits``-bit ids, packed least
    significant bit first in ``buf``. Returns the number of ids listed, ``-1`` when the records
    run past the bit string or list more than ``ntotal`` ids, ``-2`` for an id ``>= ntotal``
    (checked before faiss reads the table, :mod:`crossret.retrieval._faiss_format`)."""
    nbits = buf.size * 8
    pos = 0
    total = 0
    for _ in range(buckets):
        if pos + b + id_bits > nbits:
            return -1
        pos += b
        count = _read_bits(buf, pos, id_bits)
        pos += id_bits
        total += count
        if total > ntotal or pos + count * id_bits > nbits:
            return -1
        for _ in range(count):
            if _read_bits(buf, pos, id_bits) >= ntotal:
                return -2
            pos += id_bits
    return total


@nb.njit(cache=True)
def _read_bits(buf, pos, width):  # pragma: no cover - compiled
    """The ``width``-bit unsigned integer at bit ``pos`` of ``buf`` (least significant bit first)."""
    value = np.int64(0)
    for i in range(width):
        p = pos + i
        value |= np.int64((buf[p >> 3] >> (p & 7)) & 1) << i
    return value


# ----------------------------------------------------------------------------------------------
# Input checks. The kernels are compiled without bounds checks: a distance beyond a histogram row, a
# state array of the wrong shape or counts that contradict each other would read or write outside
# the arrays. Every public entry point checks its inputs first (O(inputs), no Q x N work).

_MAX_COUNT = 1 << 62  # counts and ranks stay far from int64 overflow


def _as_int(value: object, name: str, minimum: int = 0, error: type[Exception] = DataError) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise error(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not minimum <= value <= _MAX_COUNT:
        raise error(f"{name} must be between {minimum} and 2**62, got {value}")
    return value


def _words(words: object, name: str) -> np.ndarray:
    array = np.asarray(words)
    if array.dtype != np.uint64 or array.ndim != 2 or array.shape[1] < 1:
        raise CodeError(f"{name}: expected uint64 words (items x words, >= 1 word), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def _vector(values: object, name: str, dtype: type, n: int) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype != dtype or array.shape != (n,):
        raise DataError(f"{name}: expected {np.dtype(dtype)} of shape ({n},), got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def _state(array: object, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """An array updated in place: exact dtype and shape, C-contiguous and writable."""
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise DataError(f"{name}: expected a {np.dtype(dtype)} array of shape {shape}, got {got}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise DataError(f"{name}: must be a C-contiguous, writable array (it is updated in place)")
    return array


def _max_distance(q_words: np.ndarray, db_words: np.ndarray) -> int:
    """An upper bound of every query-item distance: the bits set in any code."""
    union = np.zeros(q_words.shape[1], np.uint64)
    for words in (q_words, db_words):
        if words.shape[0]:
            union |= np.bitwise_or.reduce(words, axis=0)
    return int(np.unpackbits(union.view(np.uint8)).sum())


def _pair_inputs(q_words: object, q_labels: object, db_words: object, db_labels: object, n_dist: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    q_words = _words(q_words, "query words")
    db_words = _words(db_words, "database words")
    if q_words.shape[1] != db_words.shape[1]:
        raise CodeError(f"query codes have {q_words.shape[1]} words but database codes {db_words.shape[1]}")
    q_labels = _vector(q_labels, "query label codes", np.int32, q_words.shape[0])
    db_labels = _vector(db_labels, "database label codes", np.int32, db_words.shape[0])
    if _max_distance(q_words, db_words) >= n_dist:
        raise CodeError(f"codes set bits beyond the {n_dist - 1}-bit length the counts are sized for "
                        "(padding bits must be zero)")
    return q_words, q_labels, db_words, db_labels


def harmonic_difference(a: int, n: int) -> float:
    """``S = H(a + n) - H(a) = sum_{i=1..n} 1 / (a + i)`` for integers ``a >= 0``, ``n >= 0``
    (see :func:`_harmonic_difference`, the compiled version the kernels use)."""
    return float(_harmonic_difference(_as_int(a, "a"), _as_int(n, "n")))


def expected_group_sum(n_before: int, rel_before: int, n: int, r: int) -> float:
    """Expected precision sum of a randomly ordered tie group (:func:`_expected_group_sum`); needs
    ``0 <= r <= n`` and ``0 <= rel_before <= n_before``."""
    n_before, rel_before = _as_int(n_before, "n_before"), _as_int(rel_before, "rel_before")
    n, r = _as_int(n, "n"), _as_int(r, "r")
    if r > n or rel_before > n_before or n_before + n > _MAX_COUNT:
        raise DataError(f"inconsistent counts: r={r} relevant of n={n}, rel_before={rel_before} of "
                        f"n_before={n_before}")
    return float(_expected_group_sum(n_before, rel_before, n, r))


def expected_truncated_ap(partial_full: float, n_before: int, rel_before: int, n: int, r: int, m: int) -> float:
    """E[AP@k] when the cut at ``k`` falls inside a tie group (:func:`_expected_truncated_ap`); needs
    ``0 < m < n``, ``0 <= r <= n``, ``0 <= rel_before <= n_before`` and a finite ``partial_full``."""
    n_before, rel_before = _as_int(n_before, "n_before"), _as_int(rel_before, "rel_before")
    n, r, m = _as_int(n, "n"), _as_int(r, "r"), _as_int(m, "m")
    if isinstance(partial_full, (bool, np.bool_)) or not isinstance(partial_full, (int, float, np.integer,
                                                                                 np.floating)):
        raise DataError(f"partial_full must be a number, got {partial_full!r}")
    if not np.isfinite(partial_full):
        raise DataError(f"partial_full must be finite, got {partial_full!r}")
    if not 0 < m < n or r > n or rel_before > n_before or n_before + n > _MAX_COUNT:
        raise DataError(f"inconsistent counts: cut m={m} inside a group of n={n} (need 0 < m < n), r={r}, "
                        f"rel_before={rel_before} of n_before={n_before}")
    return float(_expected_truncated_ap(float(partial_full), n_before, rel_before, n, r, m))


# ----------------------------------------------------------------------------------------------
# Thin typed wrappers (the metrics module calls these; they fix dtypes and contiguity once).


def distance_histograms(q_words: np.ndarray, q_labels: np.ndarray, db_words: np.ndarray,
                        db_labels: np.ndarray, hist: np.ndarray) -> None:
    """Pass 1: accumulate per-distance counts of one database chunk into ``hist`` (in place).

    Shapes: ``q_words`` uint64 ``(Q, W)``, ``q_labels`` int32 ``(Q,)``, ``db_words`` uint64
    ``(n, W)``, ``db_labels`` int32 ``(n,)``, ``hist`` int64 ``(Q, 2 (L + 1))`` with
    ``hist[q, d]`` += # non-relevant and ``hist[q, L + 1 + d]`` += # relevant items at distance ``d``.
    """
    if not isinstance(hist, np.ndarray) or hist.ndim != 2 or hist.shape[1] < 2 or hist.shape[1] % 2:
        raise DataError(f"hist: expected an int64 array (Q, 2 (L + 1)), got {getattr(hist, 'shape', hist)!r}")
    q_words, q_labels, db_words, db_labels = _pair_inputs(q_words, q_labels, db_words, db_labels,
                                                          hist.shape[1] // 2)
    hist = _state(hist, "hist", np.int64, (q_words.shape[0], hist.shape[1]))
    with _threads_for(q_words.shape[0] * db_words.shape[0]):
        n_threads = nb.get_num_threads()
        block = _eval_block(q_words.shape[0], n_threads)
        _run_blocks(_histogram_kernel, -(-q_words.shape[0] // block), n_threads, q_words, q_labels, db_words,
                    _flat_codes(db_words), db_labels, hist, np.int64(block))


def index_rank_pass(q_words: np.ndarray, q_labels: np.ndarray, db_words: np.ndarray,
                    db_labels: np.ndarray, before: np.ndarray, before_rel: np.ndarray,
                    seen: np.ndarray, seen_rel: np.ndarray, topk: int, ns: np.ndarray,
                    ap_sum: np.ndarray, apk_sum: np.ndarray, n_rel_topk: np.ndarray,
                    rel_at_n: np.ndarray) -> None:
    """Pass 2 of tie rule ``index`` over one database chunk (all state arrays updated in place).

    ``before`` / ``before_rel`` int64 ``(Q, L + 1)``: # items / # relevant at distances ``< d``
    (exclusive cumulative sums of the pass-1 histograms). ``seen`` / ``seen_rel`` int64
    ``(Q, L + 1)``: items / relevant items at distance ``d`` already walked (zero before the first
    chunk). For a relevant item at distance ``d``: ``rank = before[d] + seen[d] + 1`` and
    ``precision = (before_rel[d] + seen_rel[d] + 1) / rank``; ``ap_sum`` (float64 ``(Q,)``) adds the
    precision; ``apk_sum`` / ``n_rel_topk`` (``(Q,)``) add it / count it when ``rank <= topk``;
    ``rel_at_n[q, t]`` (int64 ``(Q, T)``) counts relevant items with ``rank <= ns[t]``.
    """
    if not isinstance(before, np.ndarray) or before.ndim != 2 or before.shape[1] < 1:
        raise DataError(f"before: expected an int64 array (Q, L + 1), got {getattr(before, 'shape', before)!r}")
    q_words, q_labels, db_words, db_labels = _pair_inputs(q_words, q_labels, db_words, db_labels,
                                                          before.shape[1])
    shape = (q_words.shape[0], before.shape[1])
    before, before_rel, seen, seen_rel = (_state(a, name, np.int64, shape) for a, name in (
        (before, "before"), (before_rel, "before_rel"), (seen, "seen"), (seen_rel, "seen_rel")))
    ns = np.asarray(ns)
    if ns.dtype != np.int64 or ns.ndim != 1:
        raise DataError(f"ns: expected a 1-D int64 array, got {ns.dtype} {ns.shape}")
    ns = np.ascontiguousarray(ns)
    n_q = q_words.shape[0]
    ap_sum = _state(ap_sum, "ap_sum", np.float64, (n_q,))
    apk_sum = _state(apk_sum, "apk_sum", np.float64, (n_q,))
    n_rel_topk = _state(n_rel_topk, "n_rel_topk", np.int64, (n_q,))
    rel_at_n = _state(rel_at_n, "rel_at_n", np.int64, (n_q, ns.shape[0]))
    topk = _as_int(topk, "topk", 0, ConfigError)
    order = np.argsort(ns, kind="stable")
    first_under = np.zeros((n_q, ns.shape[0]), dtype=np.int64)  # per item: the smallest cut-off >= its rank
    with _threads_for(q_words.shape[0] * db_words.shape[0]):
        _index_rank_kernel(q_words, q_labels, db_words, db_labels, before, before_rel, seen, seen_rel,
                           np.int64(topk), np.ascontiguousarray(ns[order]), ap_sum, apk_sum, n_rel_topk,
                           first_under)
    rel_at_n[:, order] += np.cumsum(first_under, axis=1)


def index_records_walk(q_words: np.ndarray, q_labels: np.ndarray, db_words: np.ndarray, db_labels: np.ndarray,
                       seen: np.ndarray, offsets: np.ndarray, n_rec: np.ndarray, rec_d: np.ndarray,
                       rec_s: np.ndarray) -> None:
    """One-pass tie rule ``index``, over one database chunk (state updated in place).

    ``seen`` int64 ``(Q, L + 1)``: items walked so far at each distance (zero before the first
    chunk; after the last it is the distance histogram). For every relevant item, query ``q`` writes
    its distance and the items at that distance before it to ``rec_d`` / ``rec_s`` (int64) at
    ``offsets[q] + n_rec[q]`` and increments ``n_rec[q]``; query ``q``'s records need ``R_q + 1``
    slots from ``offsets[q]`` (``R_q`` = its relevant items in the whole database).
    """
    if not isinstance(seen, np.ndarray) or seen.ndim != 2 or seen.shape[1] < 1:
        raise DataError(f"seen: expected an int64 array (Q, L + 1), got {getattr(seen, 'shape', seen)!r}")
    q_words, q_labels, db_words, db_labels = _pair_inputs(q_words, q_labels, db_words, db_labels, seen.shape[1])
    n_q = q_words.shape[0]
    seen = _state(seen, "seen", np.int64, (n_q, seen.shape[1]))
    offsets = _vector(offsets, "offsets", np.int64, n_q)
    n_rec = _state(n_rec, "n_rec", np.int64, (n_q,))
    if not isinstance(rec_d, np.ndarray) or rec_d.ndim != 1:
        raise DataError("rec_d: expected a 1-D int64 array")
    rec_d = _state(rec_d, "rec_d", np.int64, rec_d.shape)
    rec_s = _state(rec_s, "rec_s", np.int64, rec_d.shape)
    # Every query's room must hold what its label can still add in this chunk, plus the spare slot.
    if n_q:
        room = np.diff(np.append(offsets, rec_d.shape[0]))
        if offsets.min() < 0 or np.any(room < 1):
            raise DataError("offsets: each query needs at least one record slot, in increasing order")
        known = db_labels[db_labels >= 0]  # -1 is nobody's label
        per_label = np.bincount(known, minlength=int(q_labels.max(initial=-1)) + 1) if known.size else None
        adds = np.zeros(n_q, np.int64)
        if per_label is not None:
            inside = (q_labels >= 0) & (q_labels < per_label.size)
            adds[inside] = per_label[q_labels[inside]]
        if np.any(n_rec < 0) or np.any(n_rec + adds + 1 > room):
            raise DataError("rec_d / rec_s: too few record slots for the relevant items of this chunk")
    with _threads_for(q_words.shape[0] * db_words.shape[0]):
        n_threads = nb.get_num_threads()
        block = _eval_block(n_q, n_threads)
        _run_blocks(_index_walk_kernel, -(-n_q // block), n_threads, q_words, q_labels, db_words,
                    _flat_codes(db_words), db_labels, seen, offsets, n_rec, rec_d, rec_s, np.int64(block),
                    np.empty(0, np.uint8 if seen.shape[1] <= 256 else np.uint32))


def index_records_score(seen: np.ndarray, offsets: np.ndarray, n_rec: np.ndarray, rec_d: np.ndarray,
                        rec_s: np.ndarray, topk: int, ns: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score the records of :func:`index_records_walk` once every chunk is walked.

    A relevant item at distance ``d`` with ``s`` items at ``d`` before it has ``rank = C_d + s + 1``
    (``C_d`` = items at smaller distances, from ``seen``) and precision ``(Cr_d + sr + 1) / rank``
    (``Cr_d`` relevant items at smaller distances, ``sr`` relevant at ``d`` before it), exactly its
    place in a stable sort by distance. Returns ``(rel_counts (Q, L + 1) int64, ap_sum, apk_sum,
    n_rel_topk, rel_at_n (Q, T) int64)`` with the sums float64 ``(Q,)``; ``rel_at_n[q, t]`` counts
    relevant items with ``rank <= ns[t]``.
    """
    seen = np.ascontiguousarray(seen, dtype=np.int64)
    n_q, n_dist = seen.shape
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    n_rec = np.ascontiguousarray(n_rec, dtype=np.int64)
    if offsets.shape != (n_q,) or n_rec.shape != (n_q,) or rec_d.shape != rec_s.shape:
        raise DataError("index records: offsets and n_rec need one entry per query, rec_d and rec_s one shape")
    if n_q and (np.any(n_rec < 0) or np.any(offsets < 0) or np.any(offsets + n_rec > rec_d.shape[0])):
        raise DataError("index records: counts or distances outside the record arrays")

    ns = np.asarray(ns)
    if ns.dtype != np.int64 or ns.ndim != 1:
        raise DataError(f"ns: expected a 1-D int64 array, got {ns.dtype} {ns.shape}")
    topk = _as_int(topk, "topk", 0, ConfigError)
    order = np.argsort(ns, kind="stable")
    rel_counts = np.zeros((n_q, n_dist), np.int64)
    ap_sum, apk_sum = np.zeros(n_q), np.zeros(n_q)
    n_rel_topk = np.zeros(n_q, np.int64)
    first_under = np.zeros((n_q, ns.shape[0]), np.int64)
    bad = np.zeros(n_q, np.int8)
    # Only the records in use are read (slots past them may hold anything); the kernel checks their
    # distances as it reads them.
    _index_score_kernel(seen, offsets, n_rec, np.ascontiguousarray(rec_d, dtype=np.int64),
                        np.ascontiguousarray(rec_s, dtype=np.int64), np.int64(topk),
                        np.ascontiguousarray(ns[order]), rel_counts, ap_sum, apk_sum, n_rel_topk, first_under, bad)
    if bad.any():
        raise DataError("index records: counts or distances outside the record arrays")
    rel_at_n = np.zeros_like(first_under)
    rel_at_n[:, order] = np.cumsum(first_under, axis=1)
    return rel_counts, ap_sum, apk_sum, n_rel_topk, rel_at_n


def expected_rank_metrics(counts: np.ndarray, rel_counts: np.ndarray, topk: int,
                          ns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tie rule ``expected``: exact expected AP, AP@k and # relevant in the top N.

    ``counts`` / ``rel_counts`` int64 ``(Q, L + 1)``: # items / # relevant items at each distance.
    Distance groups are walked in order; a group of ``n`` items (``r`` relevant) after ``N_b`` items
    (``R_b`` relevant) adds :func:`expected_group_sum` to the expected precision sum, so
    ``AP = sum_groups / R``. ``E[# relevant in top N] = R_b + (N - N_b) r / n`` for the group that
    contains position ``N``. AP@k (normalised by the relevant items retrieved in the top k) uses
    :func:`expected_truncated_ap` for the group cut by ``k``.

    Returns ``(ap (Q,), ap_at_k (Q,), rel_at_n (Q, T))``, float64; queries with no relevant item
    get AP 0 and AP@k 0.
    """
    counts, rel_counts = np.asarray(counts), np.asarray(rel_counts)
    if counts.dtype != np.int64 or counts.ndim != 2 or counts.shape[1] < 1 or rel_counts.dtype != np.int64 \
            or rel_counts.shape != counts.shape:
        raise DataError(f"counts / rel_counts: expected two int64 arrays of one shape (Q, L + 1), got "
                        f"{counts.dtype} {counts.shape} and {rel_counts.dtype} {rel_counts.shape}")
    if counts.size and (rel_counts.min() < 0 or np.any(rel_counts > counts)
                        or np.any(counts.sum(axis=1, dtype=object) > _MAX_COUNT)):
        raise DataError("counts / rel_counts: need 0 <= relevant <= items at every distance (and totals below "
                        "2**62)")
    counts, rel_counts = np.ascontiguousarray(counts), np.ascontiguousarray(rel_counts)
    topk = _as_int(topk, "topk", 1, ConfigError)
    ns = np.asarray(ns)
    if ns.ndim != 1 or (ns.size and ns.dtype.kind not in "iu"):
        raise DataError(f"ns: expected a 1-D integer array, got {ns.dtype} {ns.shape}")
    if ns.size and (ns.min() < 1 or int(ns.max()) > _MAX_COUNT):
        raise ConfigError(f"ns: the N of precision@N must be between 1 and 2**62, got {ns.tolist()[:5]}")
    ns = np.ascontiguousarray(ns, dtype=np.int64)
    n_q = counts.shape[0]
    ap = np.zeros(n_q)
    apk = np.zeros(n_q)
    rel_at_n = np.zeros((n_q, ns.shape[0]))
    _expected_kernel(counts, rel_counts, np.int64(topk), ns, ap, apk, rel_at_n)
    return ap, apk, rel_at_n


def hamming_distances(q_packed: np.ndarray, db_packed: np.ndarray, bits: int) -> np.ndarray:
    """All Hamming distances between packed query and database codes: int32 ``(Q, N)``.

    ``dist[q, j] = popcount(q XOR db_j)``. Meant for small inputs and tests; the metrics never build
    this matrix.
    """
    q_packed = check_packed(q_packed, bits, allow_padding=True, name="query codes")
    db_packed = check_packed(db_packed, bits, allow_padding=True, name="database codes")
    q_words = np.ascontiguousarray(packed_to_words(q_packed, bits))
    db_words = np.ascontiguousarray(packed_to_words(db_packed, bits))
    if q_words.shape[1] != db_words.shape[1]:  # pragma: no cover - packed_to_words fixes the width
        raise CodeError("query and database codes have different widths")
    out = np.empty((q_words.shape[0], db_words.shape[0]), dtype=np.int32)
    _distance_kernel(q_words, db_words, out)
    return out


# ----------------------------------------------------------------------------------------------
# Exact top-k (the ``flat`` kind of :class:`crossret.retrieval.BinaryIndex`)
#
# Blocked threshold scan. A task is a block of queries (see search_query_block) and one database chunk.
# The chunk is walked in tiles that stay in cache (``_TILE_BYTES``), and every query of the block scans
# the tile before the next one is read, so memory traffic per (query, item) pair drops by the block
# size. Each query keeps candidates (distance, position) in position order and a bound ``thr``: only an
# item at ``d < thr`` can still enter the top k. The scan of a sub-block (``_SUB`` items) is first a
# vectorised, store-free test for any distance below ``thr`` (XOR + vector popcount + minimum); only
# in a quarter where one is does a vector compare give the bit mask of its items below ``thr``, whose
# set bits are offered one by one (``tzcnt``). When the
# candidate buffer fills, it is cut back to the exact top k so
# far by a histogram over distances (``thr`` becomes the k-th distance: a later item at that distance
# has a larger position, so it loses the tie). The final order is a stable counting sort by distance
# of candidates held in position order, which is exactly (distance, position).
#
# Few queries (fewer than twice the threads) split the database into chunks instead; each chunk's
# top k are merged in chunk order, which keeps equal distances in position order.

_TILE_BYTES = 1 << 17  # database bytes per tile (L2-resident with the per-query state)
_SUB = 256  # items per vectorised threshold test
assert _SUB == BELOW_BLOCK  # the first pass of a full sub-block is one any_popcount_below test
_SPAN = 4 * _SUB  # items per first-pass test at small k (blocks_popcount_below)
_QUARTER = _SUB // 4  # items per bit mask of hits; with many hits, the first pass also answers per quarter
# A query's starting bound comes from a strided sample of the chunk (see _guess_bound): at most this many
# bytes of codes, shared by the query block, and at least _SAMPLE_MIN items.
_SAMPLE_BYTES = 1 << 15
_SAMPLE_BYTES_LARGE_K = 1 << 17
_SAMPLE_BYTES_FEW = 1 << 15
_SAMPLE_MIN = 1024
_BOUND_RISK = 1e-3  # chance that a starting bound is too tight (then the chunk is scanned again)
_TOPK_MIN_CHUNK = 1 << 16  # items per database chunk when few queries are split across threads
# The threshold scan is used while k <= N / _SCAN_MAX_SHARE on databases of at least
# _SCAN_MIN_DATABASE items, and up to k = N / _SCAN_MAX_SHARE_MANY for at least _SCAN_MANY_QUERIES
# queries (see uses_threshold_scan; chosen by measurement, docs/scale.md "Exact search speed").
_SCAN_MAX_SHARE = 500
_SCAN_MAX_SHARE_MANY = 100
_SCAN_MANY_QUERIES = 64
_SCAN_MIN_DATABASE = 1 << 16
_SEARCH_BLOCK_MAX = 64  # queries per tile pass of the threshold scan (see search_query_block)
# Candidate buffers of one query block, at most. They are written only on offers (a few thousand per
# query), so they need not stay in cache beside the tile; a larger block reads the database fewer times.
_CANDIDATE_BYTES = 1 << 22
_QUARTER_MIN_K = 64  # from this k on, the scan's first pass answers per quarter (see _scan_tile_one_word)
_CUT_BATCH = 8  # offers between two cuts of a candidate buffer at small k (see candidate_capacity)
_ALIGNED_COPY_QUERIES = 1024  # queries from which a misaligned 1-word database is copied to an aligned one


@nb.njit(inline="always", cache=True)
def _cut_to_topk(cand_d, cand_i, n, k, n_dist):  # pragma: no cover - compiled
    """Keep the exact top ``k`` (by distance, then position) of the first ``n`` candidates, held in
    position order, in place and still in position order. Returns ``(n_kept, thr)``: ``thr`` is the
    k-th distance when ``n >= k`` (later items must be strictly closer), else ``n_dist``."""
    if n < k:
        return n, n_dist
    hist = np.zeros(n_dist, np.int64)
    for c in range(n):
        hist[cand_d[c]] += 1
    below = np.int64(0)
    t = np.int64(0)
    for d in range(n_dist):
        if below + hist[d] >= k:
            t = d
            break
        below += hist[d]
    at_t = k - below  # how many items at distance t are kept: the first ones in position order
    kept = np.int64(0)
    for c in range(n):
        d = cand_d[c]
        if d < t or (d == t and at_t > 0):
            if d == t:
                at_t -= 1
            cand_d[kept] = d
            cand_i[kept] = cand_i[c]
            kept += 1
    return kept, t


@nb.njit(inline="always", cache=True)
def _sorted_topk(cand_d, cand_i, n, k, n_dist, out_d, out_i):  # pragma: no cover - compiled
    """Write the top ``k`` of ``n`` candidates (in position order) to ``out_d`` / ``out_i`` ordered by
    (distance, position): a stable counting sort by distance."""
    n, _ = _cut_to_topk(cand_d, cand_i, n, k, n_dist)
    start = np.zeros(n_dist + 1, np.int64)
    for c in range(n):
        start[cand_d[c] + 1] += 1
    for d in range(n_dist):
        start[d + 1] += start[d]
    for c in range(n):
        d = cand_d[c]
        slot = start[d]
        start[d] = slot + 1
        out_d[slot] = d
        out_i[slot] = cand_i[c]


@nb.njit(inline="always", cache=True)
def _offer(cand_d, cand_i, counts, thrs, b, d, position, k, n_dist):  # pragma: no cover - compiled
    """Offer one item to query ``b`` of the block; cut the buffer back to the top k when it is full."""
    n = counts[b]
    cand_d[b, n] = d
    cand_i[b, n] = position
    n += 1
    if n == cand_d.shape[1]:
        n, thrs[b] = _cut_to_topk(cand_d[b], cand_i[b], n, k, n_dist)
    counts[b] = n


@nb.njit(inline="always", cache=True)
def _scan_tile_one_word(q_words, q0, q1, codes, t0, t1, cand_d, cand_i, counts, thrs, k, n_dist,
                        quarters):  # pragma: no cover - compiled
    """Queries ``q0..q1`` (1-word codes; block slot ``b`` for query ``q0 + b``) against the 1-word codes
    ``codes[t0:t1]``, one query after the other (the tile stays in cache).

    The codes are first only tested for any distance below the bound (XOR, popcount, minimum; no
    stores): 1,024 at a time, answered per sub-block of 256
    (:func:`crossret.retrieval.bit_masks.blocks_popcount_below`; one sub-block at a time near the
    tile's end, :func:`~crossret.retrieval.bit_masks.any_popcount_below`), and from k =
    ``_QUARTER_MIN_K`` on, where hits are common, 256 at a time answered per quarter
    (:func:`~crossret.retrieval.bit_masks.quarters_popcount_below`). Each quarter with a hit is compared
    again, into a bit mask of its items below the bound
    (:func:`~crossret.retrieval.bit_masks.popcount_below_mask64`), and only those items are offered:
    nothing is stored and read back, and no item below the bound is looked for one at a time. An
    offer re-checks the bound, which a cut within the quarter may have tightened. The chunk's last
    items (fewer than a sub-block) are gone through one by one.

    Everything per sub-block is written out here rather than in helpers: numba passes an array to an
    inlined helper with an atomic reference count update, and per sub-block and per offer those
    updates cost more than the scan itself at k = 1,000 (and the query loop is in here, so that the
    arrays are passed once per tile, not once per query and tile). Items are addressed by unsigned offsets,
    not slices (a slice costs a reference count update too), and a signed index a negative-index test
    that stops the loop from vectorising."""
    for b in range(q1 - q0):
        a = q_words[q0 + b, 0]
        s0 = t0
        while s0 < t1:
            base = np.uint64(s0)
            left = t1 - s0
            if left < _SUB:  # the chunk's last items: one by one
                for j in range(left):
                    d = _popcount64(a ^ codes[base + np.uint64(j)])
                    if d < thrs[b]:
                        n = counts[b]
                        cand_d[b, n] = d
                        cand_i[b, n] = s0 + j
                        n += 1
                        if n == cand_d.shape[1]:
                            n, thrs[b] = _cut_to_topk(cand_d[b], cand_i[b], n, k, n_dist)
                        counts[b] = n
                break
            thr = thrs[b]
            span = _SUB
            if quarters:
                walk = quarters_popcount_below(codes, base, 0, (a,), thr)
            elif left >= _SPAN:
                span = _SPAN
                blocks = blocks_popcount_below(codes, base, 0, (a,), thr)
                walk = np.int64(0)
                for i in range(_SPAN // _SUB):  # every quarter of a block with a hit
                    walk |= (blocks >> i & 1) * np.int64(0b1111) << (4 * i)
            else:
                walk = np.int64(0b1111) if any_popcount_below(codes, base, 0, (a,), thr) else np.int64(0)
            while walk:
                part = trailing_zeros(walk)
                walk &= walk - 1
                at = base + np.uint64(part * _QUARTER)
                mask = popcount_below_mask64(codes, at, 0, (a,), thrs[b])
                while mask:
                    j = trailing_zeros(mask)
                    mask &= mask - np.uint64(1)
                    d = _popcount64(a ^ codes[at + np.uint64(j)])
                    if d < thrs[b]:  # a cut after the mask was taken may have tightened it
                        n = counts[b]
                        cand_d[b, n] = d
                        cand_i[b, n] = s0 + part * _QUARTER + j
                        n += 1
                        if n == cand_d.shape[1]:
                            n, thrs[b] = _cut_to_topk(cand_d[b], cand_i[b], n, k, n_dist)
                        counts[b] = n
            s0 += span


@nb.njit(inline="always", cache=True)
def _distance2(a0, a1, tile, p0, p1, u):  # pragma: no cover - compiled
    return _popcount64(a0 ^ tile[p0 + u]) + _popcount64(a1 ^ tile[p1 + u])


@nb.njit(inline="always", cache=True)
def _distance4(a0, a1, a2, a3, tile, p0, p1, p2, p3, u):  # pragma: no cover - compiled
    return _distance2(a0, a1, tile, p0, p1, u) + _distance2(a2, a3, tile, p2, p3, u)


@nb.njit(inline="always", cache=True)
def _scan_tile_words(q_words, q0, q1, tile, stride, n, dist, first, cand_d, cand_i, counts, thrs, k, n_dist,
                     quarters):  # pragma: no cover - compiled
    """Queries ``q0..q1`` (``W`` words; block slot ``b`` for query ``q0 + b``), one after the other, against
    the first ``n`` items of a flat word-major tile (word ``w`` of item ``j`` at ``tile[w * stride + j]``),
    item ``j`` at position ``first + j``. 2- and 4-word codes: as :func:`_scan_tile_one_word`, a
    store-free test per 1,024 items answered per sub-block (256 items answered per quarter from k =
    ``_QUARTER_MIN_K`` on), and a bit mask of the items below the bound in each quarter where it
    finds one. Other widths, and a tile's last items: the distances of
    each sub-block go into the L1-resident ``dist`` by one vectorised pass per word, are counted
    against the bound there, and gone through only when one beats it. Written out without helpers
    that take arrays and branch, for the reason given in :func:`_scan_tile_one_word`."""
    n_words = q_words.shape[1]
    fused = n_words == 2 or n_words == 4
    p0, p1, p2, p3 = np.uint64(0), np.uint64(stride), np.uint64(2 * stride), np.uint64(3 * stride)
    last = n_words - 1
    for b in range(q1 - q0):
        qi = q0 + b
        # words past the code's are unused
        a0, a1, a2, a3 = q_words[qi, 0], q_words[qi, min(1, last)], q_words[qi, min(2, last)], q_words[qi, min(3, last)]
        s0 = 0
        while s0 < n:
            m = min(_SUB, n - s0)
            u0 = np.uint64(s0)
            thr = thrs[b]
            if fused and m == _SUB:
                span = _SUB
                if quarters:
                    if n_words == 2:
                        walk = quarters_popcount_below(tile, u0, p1, (a0, a1), thr)
                    else:
                        walk = quarters_popcount_below(tile, u0, p1, (a0, a1, a2, a3), thr)
                elif n - s0 >= _SPAN:
                    span = _SPAN
                    if n_words == 2:
                        blocks = blocks_popcount_below(tile, u0, p1, (a0, a1), thr)
                    else:
                        blocks = blocks_popcount_below(tile, u0, p1, (a0, a1, a2, a3), thr)
                    walk = np.int64(0)
                    for i in range(_SPAN // _SUB):  # every quarter of a block with a hit
                        walk |= (blocks >> i & 1) * np.int64(0b1111) << (4 * i)
                elif n_words == 2:
                    walk = np.int64(0b1111) if any_popcount_below(tile, u0, p1, (a0, a1), thr) else np.int64(0)
                else:
                    walk = (np.int64(0b1111) if any_popcount_below(tile, u0, p1, (a0, a1, a2, a3), thr)
                            else np.int64(0))
                while walk:
                    part = trailing_zeros(walk)
                    walk &= walk - 1
                    at = u0 + np.uint64(part * _QUARTER)
                    if n_words == 2:
                        mask = popcount_below_mask64(tile, at, p1, (a0, a1), thrs[b])
                    else:
                        mask = popcount_below_mask64(tile, at, p1, (a0, a1, a2, a3), thrs[b])
                    while mask:
                        j = trailing_zeros(mask)
                        mask &= mask - np.uint64(1)
                        u = at + np.uint64(j)
                        if n_words == 2:
                            d = _distance2(a0, a1, tile, p0, p1, u)
                        else:
                            d = _distance4(a0, a1, a2, a3, tile, p0, p1, p2, p3, u)
                        if d < thrs[b]:  # a cut after the mask was taken may have tightened it
                            c = counts[b]
                            cand_d[b, c] = d
                            cand_i[b, c] = first + s0 + part * _QUARTER + j
                            c += 1
                            if c == cand_d.shape[1]:
                                c, thrs[b] = _cut_to_topk(cand_d[b], cand_i[b], c, k, n_dist)
                            counts[b] = c
                s0 += span
                continue
            a = q_words[qi, 0]
            for j in range(m):
                dist[j] = _popcount64(a ^ tile[u0 + np.uint64(j)])
            for w in range(1, n_words):
                a = q_words[qi, w]
                base = np.uint64(w * stride + s0)
                for j in range(m):
                    dist[j] += _popcount64(a ^ tile[base + np.uint64(j)])
            hits = np.int64(0)
            for j in range(m):  # vectorised: most sub-blocks have no hit
                hits += dist[j] < thr
            if hits:
                for j in range(m):
                    d = np.int64(dist[j])
                    if d < thrs[b]:
                        c = counts[b]
                        cand_d[b, c] = d
                        cand_i[b, c] = first + s0 + j
                        c += 1
                        if c == cand_d.shape[1]:
                            c, thrs[b] = _cut_to_topk(cand_d[b], cand_i[b], c, k, n_dist)
                        counts[b] = c
            s0 += _SUB


def bound_sample(n_items: int, n_words: int, many_queries: bool = True, k: int = 1) -> tuple[int, int]:
    """``(size, stride)`` of the sample a chunk's starting bound is guessed from: every ``stride``-th item
    from the chunk's first, ``size`` of them. A block of many queries shares a strided sample of up to
    ``_SAMPLE_BYTES`` of codes, ``_SAMPLE_BYTES_LARGE_K`` from ``k = _QUARTER_MIN_K`` on (gathering it costs
    a cache miss per item, paid once for the block, and every query computes its distances to it; a
    larger sample gives a tighter bound, which pays for a large ``k`` only, and 128 KiB measured best at
    k = 1,000 against 32 KiB and 1 MiB, docs/scale.md); a block of few queries reads the chunk's first
    items (``_SAMPLE_BYTES_FEW``), which costs no gather. ``(0, 0)`` for a chunk under
    ``16 * _SAMPLE_MIN`` items, scanned with no starting bound."""
    budget = ((_SAMPLE_BYTES_LARGE_K if k >= _QUARTER_MIN_K else _SAMPLE_BYTES) if many_queries
              else _SAMPLE_BYTES_FEW)
    size = max(_SAMPLE_MIN, min(budget // (8 * n_words), n_items // 16) // 8 * 8)
    if n_items < 16 * _SAMPLE_MIN:
        return 0, 0
    return size, n_items // size if many_queries else 1


@nb.njit(inline="always", cache=True)
def _gather_sample(db_words, j_start, stride, sample, size):  # pragma: no cover - compiled
    """Copy every ``stride``-th item from ``j_start`` word-major into ``sample`` (word ``w`` of sampled
    item ``i`` at ``w * size + i``), once per query block."""
    for i in range(size):
        for w in range(db_words.shape[1]):
            sample[w * size + i] = db_words[j_start + i * stride, w]


@nb.njit(inline="always", cache=True)
def _guess_bound(q_row, sample, size, sample_dist, sample8, n_items, k, n_dist):  # pragma: no cover - compiled
    """A starting bound for query ``q_row`` from its distances to the chunk's sample: one past the
    ``c``-th smallest sampled distance ``t``. Fewer than ``k`` items of the chunk are at ``≤ t`` exactly
    when ``c`` sampled items fall among its ``k`` nearest, which has probability about
    ``P(Poisson(λ) ≥ c)``, ``λ = k · size / n_items``; ``c`` is the smallest count that makes it at most
    ``_BOUND_RISK`` (:func:`_sample_goal`). The caller checks that at least ``k`` items beat the bound
    and otherwise rescans unbounded. The distances (saturated to bytes) come from one vectorised pass
    per word; ``t`` is found by bisection from the sample's smallest distance, each step a vectorised
    count of bytes."""
    goal = _sample_goal(k * size / n_items)
    if goal > size:
        return np.int64(n_dist)
    a = q_row[0]
    n_words = q_row.shape[0]
    if n_words == 1:
        for i in range(size):
            sample8[i] = np.uint8(_popcount64(a ^ sample[np.uint64(i)]))
    else:
        for i in range(size):
            sample_dist[i] = np.int32(_popcount64(a ^ sample[np.uint64(i)]))
        for w in range(1, n_words):
            a = q_row[w]
            base = np.uint64(w * size)
            for i in range(size):
                sample_dist[i] += np.int32(_popcount64(a ^ sample[base + np.uint64(i)]))
        for i in range(size):
            sample8[i] = np.uint8(min(sample_dist[i], 255))
    nearest = np.uint8(255)
    for i in range(size):
        nearest = min(nearest, sample8[i])
    # smallest t in [nearest, 254] with count(sample8 <= t) >= goal; none: no useful bound
    lo, hi = np.int64(nearest), np.int64(min(254, n_dist - 1))
    if _count_at_most(sample8, size, hi) < goal:
        return np.int64(n_dist)
    step = np.int64(8)  # the t sought is usually a few units above the smallest distance
    while lo + step < hi and _count_at_most(sample8, size, lo + step) < goal:
        lo += step + 1
        step *= 2
    hi = min(hi, lo + step)
    while lo < hi:
        mid = (lo + hi) // 2
        if _count_at_most(sample8, size, mid) >= goal:
            hi = mid
        else:
            lo = mid + 1
    return lo + 1


@nb.njit(inline="always", cache=True)
def _sample_goal(lam):  # pragma: no cover - compiled
    """The smallest ``c`` with ``P(Poisson(lam) >= c) <= _BOUND_RISK`` (summed exactly while the terms stay
    representable; a normal tail bound of four standard deviations, more than enough, beyond that)."""
    if lam > 100.0:
        return np.int64(math.ceil(lam + 4.0 * math.sqrt(lam) + 1.0))
    term = math.exp(-lam)  # P(X = c) for c = 0
    tail = 1.0 - term  # P(X >= c + 1)
    c = np.int64(1)
    while tail > _BOUND_RISK:
        term *= lam / c
        tail -= term
        c += 1
    return c


@nb.njit(inline="always", cache=True)
def _count_at_most(values8, size, t):  # pragma: no cover - compiled
    """How many of ``values8[:size]`` are ``<= t`` (vectorised: 32-bit lanes, 16 per 512-bit vector)."""
    bound = np.uint8(t)
    count = np.int32(0)
    for i in range(size):
        count += np.int32(values8[i] <= bound)
    return np.int64(count)


@nb.njit(nogil=True, cache=True)
def _topk_blocked(q_words, db_words, db_flat, k, cap, chunk, q_block, quarters, many_size, many_stride, few_size,
                  res_d, res_i, task0, task1):  # pragma: no cover - compiled
    """Top ``k`` of the (query block, database chunk) tasks ``task0..task1`` into ``res_d`` / ``res_i`` of shape
    ``(Q, n_chunks, k)``, each row ordered by (distance, position) and padded with ``(max, -1)``.
    ``db_flat`` is ``db_words`` as one contiguous vector when ``W == 1`` (a column view would not
    vectorise)."""
    prefer_wide_vectors()
    n_q, n_words = q_words.shape
    n_db = db_words.shape[0]
    n_dist = n_words * 64 + 1
    n_chunks = res_d.shape[1]
    tile_items = max(_SUB, _TILE_BYTES // (8 * n_words) // _SUB * _SUB)
    largest = max(many_size, few_size)
    sample = np.empty(n_words * largest, np.uint64)
    sample_dist = np.empty(largest, np.int32)
    sample8 = np.empty(largest, np.uint8)
    for task in range(task0, task1):
        q0 = (task // n_chunks) * q_block
        q1 = min(q0 + q_block, n_q)
        c = task % n_chunks
        j_start = c * chunk
        j_stop = min(j_start + chunk, n_db)
        cand_d = np.empty((q1 - q0, cap), np.int64)
        cand_i = np.empty((q1 - q0, cap), np.int64)
        counts = np.zeros(q1 - q0, np.int64)
        thrs = np.full(q1 - q0, n_dist, np.int64)
        n_items = j_stop - j_start
        need = min(k, n_items)
        # (see bound_sample) a block of few queries samples the chunk's first items
        sample_size, sample_stride = (many_size, many_stride) if q1 - q0 >= _QUERY_BLOCK else (few_size, 1)
        guessed = sample_size > 0
        if guessed:
            _gather_sample(db_words, j_start, sample_stride, sample, sample_size)
            for b in range(q1 - q0):
                thrs[b] = _guess_bound(q_words[q0 + b], sample, sample_size, sample_dist, sample8, n_items, k,
                                       n_dist)
        tile = _aligned_empty(n_words * tile_items, np.uint64)  # word-major: word w of item j at w * tile_items + j
        dist = np.empty(_SUB, np.int32)
        for t0 in range(j_start, j_stop, tile_items):
            t1 = min(t0 + tile_items, j_stop)
            if n_words == 1:
                _scan_tile_one_word(q_words, q0, q1, db_flat, t0, t1, cand_d, cand_i, counts, thrs, k, n_dist,
                                    quarters)
            else:
                # Word-major copy of the tile, paid once for the whole query block: the distance loop
                # then reads each word contiguously and vectorises.
                _load_tile(db_words, t0, t1, tile, tile_items)
                _scan_tile_words(q_words, q0, q1, tile, tile_items, t1 - t0, dist, t0, cand_d, cand_i, counts, thrs, k,
                                 n_dist, quarters)
        for b in range(q1 - q0):
            if guessed and counts[b] < need:
                # The guessed bound was too tight for this query (fewer than k items beat it): redo the
                # chunk with no bound. Exact either way; rare unless the chunk's start is unrepresentative.
                counts[b] = 0
                thrs[b] = n_dist
                first_word = q_words[q0 + b, 0]
                for j in range(j_start, j_stop):
                    d = _distance(q_words, q0 + b, first_word, db_words, j, n_words)
                    if d < thrs[b]:
                        _offer(cand_d, cand_i, counts, thrs, b, d, j, k, n_dist)
            _sorted_topk(cand_d[b], cand_i[b], counts[b], k, n_dist, res_d[q0 + b, c], res_i[q0 + b, c])


@nb.njit(nogil=True, cache=True)
def _merge_chunks(res_d, res_i, k, n_dist, out_d, out_i):  # pragma: no cover - compiled
    """Merge every query's per-chunk top k (chunks in database order, so equal distances stay in
    position order) into its overall top k (serial: only few queries are split into chunks)."""
    n_q, n_chunks = res_d.shape[0], res_d.shape[1]
    for q in range(n_q):
        cand_d = np.empty(n_chunks * k, np.int64)
        cand_i = np.empty(n_chunks * k, np.int64)
        n = np.int64(0)
        for c in range(n_chunks):
            for s in range(k):
                if res_i[q, c, s] < 0:
                    break
                cand_d[n] = res_d[q, c, s]
                cand_i[n] = res_i[q, c, s]
                n += 1
        _sorted_topk(cand_d, cand_i, n, k, n_dist, out_d[q], out_i[q])


# ----------------------------------------------------------------------------------------------
# Counting top-k: the choice when k is a large share of the database
#
# Per query: pass 1 computes every distance into a small buffer (uint8 / uint16) and counts them in
# a histogram over 0..L; the cumulative histogram gives the threshold distance ``t`` where the count
# reaches k. Pass 2 walks the buffer in position order and drops each item with ``d <= t`` into slot
# ``start[d] + (# items at d seen so far)``, keeping slots ``< k``: a counting sort, ordered by
# (distance, position). Its cost hardly depends on k, while the threshold scan above pays per item
# that beats its bound, so it wins once k is more than a small fraction of the database.

_LANES = 4  # pass 1 keeps 4 histograms (item j counts in lane j % 4), summed at the end
# SWAR "some lane below n" test (exact for n up to half the lane range): constants per lane width.
_SWAR_LOW = {1: np.uint64(0x0101010101010101), 2: np.uint64(0x0001000100010001)}
_SWAR_HIGH = {1: np.uint64(0x8080808080808080), 2: np.uint64(0x8000800080008000)}


@nb.njit(inline="always", cache=True)
def _scan_chunk(q_words, q, db_words, j0, j1, buf, hist):  # pragma: no cover - compiled
    """Pass 1 over items ``j0..j1``: ``buf[j] = distance``; ``hist`` (``_LANES · (L + 1)``) counts
    them. Consecutive items increment different lanes: with one histogram, runs of equal distances
    (common: distances of random codes cluster around L / 2) serialise on the same counter and slow
    this loop down (docs/scale.md, "Exact search speed")."""
    n_words = q_words.shape[1]
    first_word = q_words[q, 0]
    n_dist = hist.shape[0] // _LANES
    j4 = j0 + (j1 - j0) // 4 * 4
    # One loop per word count, branch outside: a branch inside the loop body slows it down.
    if n_words == 1:
        for j in range(j0, j4, 4):
            d0 = _popcount64(first_word ^ db_words[j, 0])
            d1 = _popcount64(first_word ^ db_words[j + 1, 0])
            d2 = _popcount64(first_word ^ db_words[j + 2, 0])
            d3 = _popcount64(first_word ^ db_words[j + 3, 0])
            buf[j] = d0
            buf[j + 1] = d1
            buf[j + 2] = d2
            buf[j + 3] = d3
            hist[d0] += 1
            hist[n_dist + d1] += 1
            hist[2 * n_dist + d2] += 1
            hist[3 * n_dist + d3] += 1
    elif n_words == 2:
        second_word = q_words[q, 1]
        for j in range(j0, j4, 4):
            d0 = _popcount64(first_word ^ db_words[j, 0]) + _popcount64(second_word ^ db_words[j, 1])
            d1 = _popcount64(first_word ^ db_words[j + 1, 0]) + _popcount64(second_word ^ db_words[j + 1, 1])
            d2 = _popcount64(first_word ^ db_words[j + 2, 0]) + _popcount64(second_word ^ db_words[j + 2, 1])
            d3 = _popcount64(first_word ^ db_words[j + 3, 0]) + _popcount64(second_word ^ db_words[j + 3, 1])
            buf[j] = d0
            buf[j + 1] = d1
            buf[j + 2] = d2
            buf[j + 3] = d3
            hist[d0] += 1
            hist[n_dist + d1] += 1
            hist[2 * n_dist + d2] += 1
            hist[3 * n_dist + d3] += 1
    else:
        for j in range(j0, j4, 4):
            d0 = np.int64(0)
            d1 = np.int64(0)
            d2 = np.int64(0)
            d3 = np.int64(0)
            for w in range(n_words):
                a = q_words[q, w]
                d0 += _popcount64(a ^ db_words[j, w])
                d1 += _popcount64(a ^ db_words[j + 1, w])
                d2 += _popcount64(a ^ db_words[j + 2, w])
                d3 += _popcount64(a ^ db_words[j + 3, w])
            buf[j] = d0
            buf[j + 1] = d1
            buf[j + 2] = d2
            buf[j + 3] = d3
            hist[d0] += 1
            hist[n_dist + d1] += 1
            hist[2 * n_dist + d2] += 1
            hist[3 * n_dist + d3] += 1
    for j in range(j4, j1):
        d = _distance(q_words, q, first_word, db_words, j, n_words)
        buf[j] = d
        hist[d] += 1


@nb.njit(inline="always", cache=True)
def _merge_lanes(hist, n_dist):  # pragma: no cover - compiled
    """Sum the ``_LANES`` histograms of :func:`_scan_chunk`."""
    out = np.zeros(n_dist, np.int64)
    for lane in range(_LANES):
        for d in range(n_dist):
            out[d] += hist[lane * n_dist + d]
    return out


@nb.njit(inline="always", cache=True)
def _threshold(hist, k):  # pragma: no cover - compiled
    """Smallest distance ``t`` with ``#(d <= t) >= k`` (the largest distance when there are fewer
    than ``k`` items) and the exclusive cumulative counts ``start[d] = #(d' < d)``: ``(t, start)``."""
    n_dist = hist.shape[0]
    start = np.empty(n_dist, np.int64)
    total = np.int64(0)
    t = n_dist - 1
    found = False
    for d in range(n_dist):
        start[d] = total
        total += hist[d]
        if not found and total >= k:
            t = d
            found = True
    return t, start


@nb.njit(inline="always", cache=True)
def _collect_items(buf, j0, j1, t, base, k, out_d, out_i, q):  # pragma: no cover - compiled
    """Pass 2 over items ``j0..j1``: an item at ``d <= t`` takes slot ``base[d]`` (then
    ``base[d] += 1``) and is written when that slot is below ``k``."""
    for j in range(j0, j1):
        d = np.int64(buf[j])
        if d <= t:  # rare (about k / N of the items): a well-predicted branch
            slot = base[d]
            base[d] = slot + 1
            if slot < k:
                out_d[q, slot] = d
                out_i[q, slot] = j


@nb.njit(inline="always", cache=True)
def _collect_chunk(buf, words, per_word, low, high, j0, j1, t, base, k, out_d, out_i,
                   q):  # pragma: no cover - compiled
    """Pass 2 over items ``j0..j1`` (``j0`` a multiple of ``per_word``). ``words`` is ``buf`` seen as
    uint64, ``per_word`` distances each: a word is only walked item by item when some lane is
    ``<= t`` (SWAR test ``(x - low·(t+1)) & ~x & high``, exact for ``t + 1`` up to half the lane
    range) — cheaper than testing every item, since almost no word holds a result."""
    if per_word == 1 or t + 1 > np.int64(1) << (64 // per_word - 1):
        _collect_items(buf, j0, j1, t, base, k, out_d, out_i, q)
        return
    sub = low * np.uint64(t + 1)
    w1 = j1 // per_word
    for w in range(j0 // per_word, w1):
        x = words[w]
        if (x - sub) & ~x & high:
            _collect_items(buf, w * per_word, (w + 1) * per_word, t, base, k, out_d, out_i, q)
    _collect_items(buf, max(w1 * per_word, j0), j1, t, base, k, out_d, out_i, q)


@nb.njit(parallel=True, cache=True)
def _topk_by_query(q_words, db_words, k, bufs, words, per_word, low, high, out_d,
                   out_i):  # pragma: no cover - compiled
    """Many queries: one query per thread at a time, each thread with its own distance buffer
    (``bufs[thread]``, seen as uint64 in ``words[thread]``)."""
    n_q = q_words.shape[0]
    n_db = db_words.shape[0]
    n_dist = q_words.shape[1] * 64 + 1
    for q in prange(n_q):
        prefer_wide_vectors()
        tid = nb.get_thread_id()
        hist = np.zeros(_LANES * n_dist, np.int64)
        _scan_chunk(q_words, q, db_words, 0, n_db, bufs[tid], hist)
        t, start = _threshold(_merge_lanes(hist, n_dist), k)
        _collect_chunk(bufs[tid], words[tid], per_word, low, high, 0, n_db, t, start, k, out_d, out_i, q)


@nb.njit(parallel=True, cache=True)
def _topk_by_chunk(q_words, db_words, k, size, buf, words, per_word, low, high, out_d,
                   out_i):  # pragma: no cover - compiled
    """Few queries: each query's database is split into chunks of ``size`` items (a multiple of 8)
    scanned in parallel; ``buf`` is ``(Q, N)``. The per-chunk histograms are merged, then each chunk
    writes its part of the result from its own slot offsets."""
    n_q = q_words.shape[0]
    n_db = db_words.shape[0]
    n_dist = q_words.shape[1] * 64 + 1
    n_chunks = -(-n_db // size)
    hist = np.zeros((n_q * n_chunks, _LANES * n_dist), np.int64)
    for task in prange(n_q * n_chunks):
        prefer_wide_vectors()
        q = task // n_chunks
        c = task % n_chunks
        _scan_chunk(q_words, q, db_words, c * size, min((c + 1) * size, n_db), buf[q], hist[task])
    # Serial merge, O(Q · chunks · L): slot offsets of every (query, chunk) at each distance.
    base = np.empty((n_q * n_chunks, n_dist), np.int64)
    thresholds = np.empty(n_q, np.int64)
    for q in range(n_q):
        total = np.zeros(n_dist, np.int64)
        for c in range(n_chunks):
            counts = _merge_lanes(hist[q * n_chunks + c], n_dist)
            base[q * n_chunks + c] = counts
            total += counts
        t, start = _threshold(total, k)
        thresholds[q] = t
        for c in range(n_chunks):
            row = base[q * n_chunks + c]
            for d in range(n_dist):
                count = row[d]
                row[d] = start[d]
                start[d] += count
    for task in prange(n_q * n_chunks):
        prefer_wide_vectors()
        q = task // n_chunks
        c = task % n_chunks
        _collect_chunk(buf[q], words[q], per_word, low, high, c * size, min((c + 1) * size, n_db), thresholds[q],
                       base[task], k, out_d, out_i, q)


def _distance_dtype(n_words: int) -> type:
    """The narrowest unsigned type that holds a distance of ``64 · n_words`` bits."""
    max_distance = 64 * n_words
    return np.uint8 if max_distance <= 0xFF else np.uint16 if max_distance <= 0xFFFF else np.uint32


def _topk_counting(q_words: np.ndarray, db_words: np.ndarray, k: int, n_threads: int, out_d: np.ndarray,
                   out_i: np.ndarray) -> None:
    """The counting kernels, written into ``out_d`` / ``out_i`` (see the section comment)."""
    n_q, n_db = q_words.shape[0], db_words.shape[0]
    dtype = np.dtype(_distance_dtype(q_words.shape[1]))
    per_word = 8 // dtype.itemsize
    low = _SWAR_LOW.get(dtype.itemsize, np.uint64(0))
    high = _SWAR_HIGH.get(dtype.itemsize, np.uint64(0))
    width = -(-n_db // 8) * 8  # rows padded to whole uint64 words for the SWAR view
    k64 = np.int64(k)
    previous = nb.get_num_threads()
    nb.set_num_threads(n_threads)
    try:
        if n_q >= 2 * n_threads or n_threads == 1:
            bufs = np.empty((n_threads, width), dtype)
            _topk_by_query(q_words, db_words, k64, bufs, bufs.view(np.uint64), np.int64(per_word), low, high,
                           out_d, out_i)
        else:
            # Enough chunks for every thread to get work, each of >= _TOPK_MIN_CHUNK items.
            n_chunks = max(1, min(-(-2 * n_threads // n_q), n_db // _TOPK_MIN_CHUNK))
            size = -(-n_db // n_chunks // 8) * 8 if n_chunks > 1 else width
            buf = np.empty((n_q, width), dtype)
            _topk_by_chunk(q_words, db_words, k64, np.int64(size), buf, buf.view(np.uint64), np.int64(per_word),
                           low, high, out_d, out_i)
    finally:
        nb.set_num_threads(previous)


def candidate_capacity(k: int) -> int:
    """Slots of a query's candidate buffer in the threshold scan: ``k`` plus ``max(k // 2, _CUT_BATCH)``
    offers between two cuts back to the top k. Each cut tightens the bound to the k-th distance so far,
    so cutting early keeps the bound close from early in the scan: at a small k, every few offers (with
    256 slots, the sampled bound stayed in force over half the database: 5x the offers at k = 10); at
    k = 1,000 on 64-bit codes, half of k between cuts measured 1.05x faster than k (docs/scale.md)."""
    return k + max(k // 2, _CUT_BATCH)


def search_query_block(n_words: int, k: int) -> int:
    """Queries that share each pass over a database tile in the threshold scan: more queries read the
    database from memory fewer times, as long as their candidate buffers (2 int64 arrays of
    :func:`candidate_capacity` slots each) stay within ``_CANDIDATE_BYTES``."""
    cap = candidate_capacity(k)
    block = _SEARCH_BLOCK_MAX
    while block > _QUERY_BLOCK and block * cap * 16 > _CANDIDATE_BYTES:
        block //= 2
    return block


def _topk_threshold(q_words: np.ndarray, db_words: np.ndarray, k: int, n_threads: int, out_d: np.ndarray,
                    out_i: np.ndarray) -> None:
    """The blocked threshold scan, written into ``out_d`` / ``out_i`` (see the section comment)."""
    n_q, n_db = q_words.shape[0], db_words.shape[0]
    n_dist = 64 * q_words.shape[1] + 1
    k_kept = min(k, n_db)  # slots past the database size stay padding
    # Candidate buffer: room for k plus a batch of offers between two cuts (each cut is O(cap + L)).
    cap = candidate_capacity(k_kept)
    n_chunks = 1
    q_block = search_query_block(q_words.shape[1], k_kept)
    n_blocks = -(-n_q // q_block)
    if n_blocks < 2 * n_threads and n_threads > 1:
        # Too few query blocks to keep every thread busy: split the database into chunks too, each of
        # >= _TOPK_MIN_CHUNK items.
        n_chunks = max(1, min(-(-2 * n_threads // n_blocks), n_db // _TOPK_MIN_CHUNK))
    chunk = -(-n_db // n_chunks)
    # Every chunk but the last has `chunk` items and the last no more: a sample sized for it fits every chunk.
    last_chunk = n_db - (n_chunks - 1) * chunk
    # (only blocks of at least _QUERY_BLOCK queries take the strided sample: none when there are fewer queries)
    many_size, many_stride = (bound_sample(last_chunk, q_words.shape[1], True, k_kept) if n_q >= _QUERY_BLOCK
                              else (0, 0))
    few_size, _ = bound_sample(last_chunk, q_words.shape[1], False)
    if n_chunks == 1 and k_kept == k:
        # Written in place: a view of the (padded) output, no copy of Q x k results.
        res_d, res_i = out_d.reshape(n_q, 1, k), out_i.reshape(n_q, 1, k)
    else:
        res_d = np.full((n_q, n_chunks, k_kept), np.iinfo(np.int32).max, np.int32)
        res_i = np.full((n_q, n_chunks, k_kept), -1, np.int64)
    db_flat = _flat_codes(db_words)
    if n_q >= _ALIGNED_COPY_QUERIES and db_flat.size and db_flat.ctypes.data % _ALIGN:
        # 1-word codes are scanned in place: from a 64-byte boundary, a pass costs about a tenth less,
        # which pays for the copy from this many queries on.
        db_flat = aligned_copy(db_flat)
    _run_blocks(_topk_blocked, n_blocks * n_chunks, n_threads, q_words, db_words, db_flat,
                np.int64(k_kept), np.int64(cap), np.int64(chunk), np.int64(q_block), k_kept >= _QUARTER_MIN_K,
                np.int64(many_size), np.int64(many_stride), np.int64(few_size), res_d, res_i)
    if n_chunks > 1:
        merged_d = np.empty((n_q, k_kept), np.int32)
        merged_i = np.empty((n_q, k_kept), np.int64)
        _merge_chunks(res_d, res_i, np.int64(k_kept), np.int64(n_dist), merged_d, merged_i)
        out_d[:, :k_kept] = merged_d
        out_i[:, :k_kept] = merged_i
    elif res_d.base is not out_d:
        out_d[:, :k_kept] = res_d[:, 0]
        out_i[:, :k_kept] = res_i[:, 0]


def uses_threshold_scan(n_queries: int, n_database: int, n_words: int, k: int) -> bool:
    """Whether :func:`hamming_topk` takes the blocked threshold scan (else the counting kernels).

    The scan costs a vectorised pass plus work per item that beats a query's running bound (about
    ``k ln(N / k)`` items), so it wins while ``k`` is a small share of a large database: up to
    ``N / 500``, and up to ``N / 100`` for 64 queries or more (fewer split the database into chunks,
    whose merge costs ``k`` per chunk). For codes of several words it also needs enough queries to
    share the word-major copy of each tile. Both give identical results; the rule only picks the
    faster (docs/scale.md)."""
    share = _SCAN_MAX_SHARE_MANY if n_queries >= _SCAN_MANY_QUERIES else _SCAN_MAX_SHARE
    return (n_database >= _SCAN_MIN_DATABASE and k * share <= n_database
            and (n_words == 1 or n_queries >= _QUERY_BLOCK // 2))


def hamming_topk(q_words: np.ndarray, db_words: np.ndarray, k: int, threads: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest items per query by Hamming distance, ordered by (distance, position).

    ``q_words`` / ``db_words``: uint64 ``(Q, W)`` / ``(N, W)`` (:func:`packed_to_words`). Returns
    ``(distances int32 (Q, k), positions int64 (Q, k))``; when ``k > N`` the last ``k - N`` slots of
    every row hold position ``-1`` and distance ``int32`` max. ``threads`` caps numba's thread count
    for this call (default: numba's current setting); calls under ``_SERIAL_PAIRS`` pairs run on one
    thread. Two kernels give identical results; :func:`uses_threshold_scan` picks the faster: the
    blocked threshold scan while ``k`` is a small share of the database, else the counting kernels.
    Fewer queries than twice the threads split the database into chunks across the threads.
    """
    q_words = _words(q_words, "query words")
    db_words = _words(db_words, "database words")
    n_q, n_db = q_words.shape[0], db_words.shape[0]
    if q_words.shape[1] != db_words.shape[1]:
        raise CodeError(f"query codes have {q_words.shape[1]} words but database codes {db_words.shape[1]}")
    k = _as_int(k, "k", 1, ConfigError)
    check_result_slots(k, n_q, n_db)
    if threads is not None:
        threads = _as_int(threads, "threads", 0, ConfigError)
    out_d = np.full((n_q, k), np.iinfo(np.int32).max, np.int32)
    out_i = np.full((n_q, k), -1, np.int64)
    if n_q == 0 or n_db == 0:
        return out_d, out_i
    with _threads_for(n_q * n_db):
        n_threads = nb.get_num_threads()
        if threads is not None and threads >= 1:
            n_threads = min(n_threads, threads)
        if uses_threshold_scan(n_q, n_db, q_words.shape[1], k):
            _topk_threshold(q_words, db_words, k, n_threads, out_d, out_i)
        else:
            _topk_counting(q_words, db_words, k, n_threads, out_d, out_i)
    return out_d, out_i
