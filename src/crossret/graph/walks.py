"""Weighted random walks on a sparse graph, vectorised over walkers (COUPLE's Mixup along
cross-domain random-walk paths; Luo et al., IEEE TIP 2025).

A walker at node ``v`` moves to neighbour ``u`` with probability ``w_vu / deg(v)``. Walks stop at
the first node of a *stop set* (COUPLE: the first target node) or after ``max_steps`` moves. All
walkers advance together: one inverse-CDF lookup per step (``searchsorted`` on the global cumulative
edge weights), no Python loop over walkers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from crossret.errors import DataError
from crossret.limits import check_memory


@dataclass
class Walks:
    """Paths of a batch of walkers.

    nodes: ``(W, max_steps + 1)`` int64; column 0 is the start node; after a walk ends, its row
        repeats the last node.
    lengths: ``(W,)`` moves made (0 = could not move: isolated start, or it started in the stop set).
    reached: ``(W,)`` whether the walk ended in the stop set.
    """

    nodes: np.ndarray
    lengths: np.ndarray
    reached: np.ndarray

    @property
    def end(self) -> np.ndarray:
        return self.nodes[np.arange(self.nodes.shape[0]), self.lengths]


def random_walks(
    adjacency: sp.csr_matrix,
    starts: np.ndarray,
    max_steps: int,
    rng: np.random.Generator,
    stop: np.ndarray | None = None,
) -> Walks:
    """Walk from every node in ``starts`` (repeats allowed) for at most ``max_steps`` moves.

    Args:
        adjacency: ``(n, n)`` CSR with non-negative weights (need not be symmetric).
        starts: ``(W,)`` start nodes.
        max_steps: bound ``K`` on the number of moves (``≥ 1``).
        rng: numpy generator (the only randomness; same state → same walks).
        stop: boolean ``(n,)``; a walk ends when it *enters* a stop node (starting in one does
            not count as reaching it). ``None`` = never stop early.
    """
    adjacency = sp.csr_matrix(adjacency)
    n = adjacency.shape[0]
    if adjacency.shape[1] != n:
        raise DataError(f"random walks: the adjacency must be square, got {adjacency.shape}")
    starts = np.asarray(starts)
    if starts.dtype.kind not in "iu":
        raise DataError(f"random walks: start nodes must be integers, got dtype {starts.dtype}")
    starts = starts.astype(np.int64).reshape(-1)
    if starts.size and (starts.min() < 0 or starts.max() >= n):
        raise DataError(f"random walks: start nodes must be in [0, {n})")
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise DataError(f"random walks: max_steps must be a positive integer, got {max_steps!r}")
    stop_mask = np.zeros(n, dtype=bool) if stop is None else np.asarray(stop, dtype=bool)
    if stop_mask.shape != (n,):
        raise DataError(f"random walks: stop mask must have shape ({n},)")
    weights = np.asarray(adjacency.data, dtype=np.float64)
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise DataError("random walks: edge weights must be finite and >= 0")

    indptr, indices = adjacency.indptr, adjacency.indices
    cumulative = np.cumsum(weights)
    row_base = np.concatenate([[0.0], cumulative])[indptr[:-1]]  # cumulative weight before each row
    degree = np.asarray(adjacency.sum(axis=1)).ravel()

    walkers = starts.size
    check_memory(8 * walkers * (max_steps + 1), f"random walks: {walkers} walks of up to max_steps={max_steps} moves",
                 "use fewer steps")
    nodes = np.empty((walkers, max_steps + 1), dtype=np.int64)
    nodes[:, 0] = starts
    lengths = np.zeros(walkers, dtype=np.int64)
    reached = np.zeros(walkers, dtype=bool)
    current = starts.copy()
    alive = degree[current] > 0
    for step in range(1, max_steps + 1):
        moving = np.flatnonzero(alive)
        if moving.size:
            here = current[moving]
            target_weight = row_base[here] + rng.random(moving.size) * degree[here]
            pos = np.searchsorted(cumulative, target_weight, side="right")
            # Round-off can land one past the row's last edge; clamp into the row.
            pos = np.clip(pos, indptr[here], indptr[here + 1] - 1)
            current[moving] = indices[pos]
            lengths[moving] = step
            hit = stop_mask[current[moving]]
            reached[moving[hit]] = True
            alive[moving[hit]] = False
            alive[moving] &= degree[current[moving]] > 0  # a sink (directed graphs) ends the walk
        nodes[:, step] = current
    return Walks(nodes=nodes, lengths=lengths, reached=reached)
