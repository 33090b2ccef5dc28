"""ℓ2-norm flow diffusion: the dual push solver, per-class seeding and label-aware reweighting.

Problem (Fountoulakis, Wang & Yang, "p-Norm Flow Diffusion for Local Graph Clustering", ICML 2020;
the diffusion of COUPLE, Luo et al., IEEE TIP 2025). On a graph with conductances ``w_e > 0``, signed incidence
``B`` and Laplacian ``L = Bᵀ diag(w) B``, source mass ``Δ ≥ 0`` and sink capacities ``T ≥ 0``:

    primal   min_f ½ Σ_e f_e² / w_e          s.t.  m = Δ + Bᵀ f ≤ T
    dual     min_{x ≥ 0} ½ xᵀ L x + xᵀ (T − Δ)

At the optimum the routed mass is ``m = Δ − L x ≤ T`` and ``x_i (T_i − m_i) = 0``: nodes with
``x_i > 0`` are saturated, and the support of ``x`` is the diffused cluster. The flow on edge
``(i, j)`` is ``w_ij (x_i − x_j)``.

Solver: coordinate minimisation of the dual ("push"): a node ``v`` with excess ``m_v > T_v`` raises
``x_v`` by ``(m_v − T_v) / deg(v)``, which leaves ``v`` exactly at capacity and spreads the excess
to its neighbours in proportion to ``w_uv``. Here all nodes with excess push *at once* each pass
(projected Jacobi), vectorised with sparse products over the rows that hold excess only, so a pass
costs O(volume of the active set) — the diffusion stays local. Because ``L`` is a Z-matrix, the
iterates increase monotonically from ``x = 0`` to the least feasible point, which is the unique
optimum of the dual's active set (Cottle, Pang & Stone, "The Linear Complementarity Problem",
§3.11/§5.2); ``x_i > 0`` only on nodes that pushed, and those have ``m_i ≥ T_i`` throughout, so
complementary slackness holds to the final excess tolerance.

Several diffusions (e.g. one per class) run together as the columns of ``(n, C)`` matrices.

A solution exists iff in every connected component the mass fits: ``Σ_comp Δ ≤ Σ_comp T``
(strictly, for finite convergence); :func:`check_feasible` says which component fails.

Degenerate inputs, each a deliberate rule (``tests/test_numerical_robustness.py``):

* **Infeasible mass**: both solvers raise :class:`DataError` naming the component, its mass and its
  capacity; they never rescale silently. Callers that want an always-feasible problem scale the mass
  down explicitly with :func:`clip_to_feasible` (COUPLE does, and records how many (component, class)
  pairs it clipped as ``diffusion_clipped_components``).
* **Isolated nodes** (degree 0) cannot push or receive: mass seeded on one is infeasible unless its own
  capacity holds it; their potential is 0. COUPLE seeds ``α·deg = 0`` on them, so they never matter.
* **A class whose source nodes reach no target** keeps its mass on the source side of its component
  (after clipping): its column's potentials on target nodes are 0, so it labels no target.
* **Scale**: the problem ``(cW, cΔ, cT)`` has the same potentials as ``(W, Δ, T)``; the feasibility test
  and the solvers' tolerances are relative, so 1e-30 and 1e30 graphs are solved like unit ones.
* An empty graph (0 nodes) is a :class:`DataError`; zero mass gives ``x = 0`` at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from crossret.errors import DataError


@dataclass
class FlowDiffusionResult:
    """Solution of one or several (columns) ℓ2 flow diffusions.

    potential: dual variable ``x`` ``(n,)`` or ``(n, C)``, ``≥ 0``.
    mass: routed mass ``m = Δ − L x`` (same shape), ``≤ T + excess``.
    passes: push passes run; converged: the excess fell below the tolerance.
    excess: ``Σ max(0, m − T)`` left, per column.
    pushes: node pushes performed (work measure).
    """

    potential: np.ndarray
    mass: np.ndarray
    passes: int
    converged: bool
    excess: np.ndarray
    pushes: int


def laplacian(adjacency: sp.spmatrix) -> sp.csr_matrix:
    """Weighted graph Laplacian ``L = diag(deg) − W`` as CSR."""
    adjacency = sp.csr_matrix(adjacency)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    return (sp.diags(degree) - adjacency).tocsr()


def check_graph(adjacency: sp.spmatrix) -> sp.csr_matrix:
    """Validate a conductance matrix: square, symmetric, finite, non-negative, empty diagonal."""
    if not sp.issparse(adjacency):
        raise DataError("flow diffusion: the adjacency must be a scipy.sparse matrix")
    adjacency = sp.csr_matrix(adjacency, dtype=np.float64)
    n, m = adjacency.shape
    if n != m:
        raise DataError(f"flow diffusion: the adjacency must be square, got {adjacency.shape}")
    if n == 0:
        raise DataError("flow diffusion: the graph has no nodes; build it from at least one sample")
    data = adjacency.data
    if not np.isfinite(data).all() or (data < 0).any():
        raise DataError("flow diffusion: edge weights must be finite and >= 0")
    if adjacency.diagonal().any():
        raise DataError("flow diffusion: the adjacency must have an empty diagonal (no self-loops)")
    if abs(adjacency - adjacency.T).max() > 1e-9 * max(1.0, float(data.max(initial=0.0))):
        raise DataError("flow diffusion: the adjacency must be symmetric")
    adjacency.eliminate_zeros()
    adjacency.sort_indices()
    return adjacency


def _without_zeros(adjacency: sp.spmatrix) -> sp.csr_matrix:
    """CSR copy without stored zeros: scipy's component search counts them as edges, the solvers do not."""
    adjacency = sp.csr_matrix(adjacency, copy=True)
    adjacency.eliminate_zeros()
    return adjacency


def _round_off_floor(mass: np.ndarray, capacity: np.ndarray, unit: float) -> float:
    """``unit`` times the problem's scale, capped at ``unit``: the absolute slack for round-off on nodes of
    zero capacity. Relative on tiny problems (weights ~1e-30 would otherwise hide any excess), and the
    fixed ``unit`` on ordinary and large ones (where the relative ``1e-12`` term dominates anyway)."""
    scale = max(float(np.max(mass, initial=0.0)), float(np.max(capacity, initial=0.0)))
    return unit * min(1.0, scale)


def check_feasible(adjacency: sp.csr_matrix, source_mass: np.ndarray, capacity: np.ndarray) -> None:
    """Raise :class:`DataError` unless every connected component can hold its mass in every column.

    The test is scale-free (``need ≤ cap·(1 + 1e-12)`` plus a round-off slack relative to the problem's
    scale), so the same problem multiplied by 1e-30 or 1e30 is judged alike. Components that are exactly
    at capacity are feasible (the push solver then converges only asymptotically)."""
    _, component = csgraph.connected_components(_without_zeros(adjacency), directed=False)
    mass = source_mass.reshape(source_mass.shape[0], -1)
    n_comp = int(component.max()) + 1 if component.size else 0
    cap = np.bincount(component, weights=capacity, minlength=n_comp)
    slack = _round_off_floor(mass, capacity, 1e-12)
    for col in range(mass.shape[1]):
        need = np.bincount(component, weights=mass[:, col], minlength=n_comp)
        over = need > cap * (1 + 1e-12) + slack
        if over.any():
            worst = int(np.argmax(need - cap))
            raise DataError(
                f"flow diffusion is infeasible (column {col}): a connected component of "
                f"{int((component == worst).sum())} node(s) holds mass {need[worst]:.6g} but only "
                f"capacity {cap[worst]:.6g}; total mass {mass[:, col].sum():.6g} vs total capacity "
                f"{capacity.sum():.6g}. Lower the source mass or raise the capacities."
            )


def l2_flow_diffusion(
    adjacency: sp.spmatrix,
    source_mass: np.ndarray,
    capacity: np.ndarray,
    *,
    tol: float = 1e-6,
    max_passes: int = 10_000,
    check: bool = True,
) -> FlowDiffusionResult:
    """Solve the ℓ2 flow diffusion of the module docstring by vectorised pushes.

    Args:
        adjacency: ``(n, n)`` symmetric non-negative sparse conductances ``w``.
        source_mass: ``Δ``, ``(n,)`` or ``(n, C)`` for ``C`` independent diffusions.
        capacity: ``T``, ``(n,)``, shared by all columns.
        tol: stop when every column's remaining excess ``Σ max(0, m − T)`` is at most
            ``tol · Σ Δ``.
        max_passes: bound on push passes (``converged`` says whether ``tol`` was met).
        check: validate the graph and feasibility (skip only for inputs checked before).

    Returns:
        :class:`FlowDiffusionResult` with arrays shaped like ``source_mass``.
    """
    adjacency = check_graph(adjacency) if check else sp.csr_matrix(adjacency)
    mass, cap, squeeze = _check_mass(adjacency, source_mass, capacity, tol)
    if check:
        check_feasible(adjacency, mass, cap)

    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    potential = np.zeros_like(mass)
    threshold = tol * np.maximum(mass.sum(axis=0), np.finfo(float).tiny)  # per column
    indptr, indices, weights = adjacency.indptr, adjacency.indices, adjacency.data
    # Rows that may hold excess: only those that received mass since they were last checked.
    candidates = np.flatnonzero((mass > cap[:, None]).any(axis=1))
    passes = pushes = 0
    converged = False
    while True:
        excess = np.maximum(mass[candidates] - cap[candidates, None], 0.0)
        # A node of degree 0 cannot push; feasibility guarantees it holds no excess.
        pushable = degree[candidates] > 0
        excess[~pushable] = 0.0
        if (excess.sum(axis=0) <= threshold).all():
            converged = True
            break
        if passes >= max_passes:
            break
        active_rows = (excess > 0).any(axis=1)
        rows = candidates[active_rows]
        step = excess[active_rows] / degree[rows, None]  # exact coordinate step per (node, column)
        potential[rows] += step
        mass[rows] -= step * degree[rows, None]
        # Spread to neighbours: mass_u += Σ_v w_uv step_v over the active rows v (A symmetric).
        starts, stops = indptr[rows], indptr[rows + 1]
        lengths = stops - starts
        edge_pos = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        neighbours = indices[edge_pos]
        contribution = weights[edge_pos, None] * np.repeat(step, lengths, axis=0)
        touched, inverse = np.unique(neighbours, return_inverse=True)
        gathered = np.zeros((touched.size, mass.shape[1]))
        np.add.at(gathered, inverse, contribution)
        mass[touched] += gathered
        candidates = touched
        passes += 1
        pushes += int((step > 0).sum())

    return _result(potential, mass, cap, squeeze, passes, converged, pushes)


def l2_flow_diffusion_active_set(
    adjacency: sp.spmatrix,
    source_mass: np.ndarray,
    capacity: np.ndarray,
    *,
    tol: float = 1e-6,
    max_rounds: int = 1_000,
    cg_tol: float | None = None,
    max_cg_iters: int = 5_000,
    check: bool = True,
) -> FlowDiffusionResult:
    """The same optimum as :func:`l2_flow_diffusion`, by growing the saturated set.

    Chandrasekaran's algorithm for linear complementarity problems with a Z-matrix ("A special
    case of the complementary pivot problem", Opsearch 1970), applied to the dual above: start with
    the nodes that hold excess, ``S = {i : Δ_i > T_i}``; solve ``L_SS x_S = Δ_S − T_S`` (all of
    ``S`` saturated, ``x = 0`` elsewhere); add every node whose routed mass ``m = Δ − L x`` now
    exceeds its capacity; repeat until none does. ``S`` only grows, ``x`` increases monotonically,
    and the number of rounds is about the hop radius of the diffused cluster — where the push
    iteration needs thousands of passes to move mass through a narrow cut (the few cross-domain
    edges of COUPLE's graph), this needs tens of rounds.

    Each column ``c`` has its own set ``S_c``. A round stacks the ``C`` systems into one
    block-diagonal matrix ``diag(L_{S_1 S_1}, …, L_{S_C S_C})`` of size ``Σ_c |S_c|`` and solves it by
    Jacobi-preconditioned conjugate gradients with per-block step sizes (one sparse product per
    iteration, warm-started from the previous round). A round therefore costs
    ``O(Σ_c vol(S_c))`` per iteration — for COUPLE's per-class seeds the sets are nearly disjoint,
    so about ``O(|E|)``, not ``O(C·|E|)`` as a product with all ``C`` columns over their union.

    Args and result as :func:`l2_flow_diffusion`; ``passes`` counts rounds, ``pushes`` CG iterations
    (block-diagonal products). ``cg_tol`` is the relative residual of the inner solves, per column
    (default ``min(1e-10, tol / 100)``).
    """
    cg_tol = min(1e-10, tol / 100) if cg_tol is None else cg_tol
    adjacency = check_graph(adjacency) if check else sp.csr_matrix(adjacency)
    mass0, cap, squeeze = _check_mass(adjacency, source_mass, capacity, tol)
    if check:
        check_feasible(adjacency, mass0, cap)
    lap = laplacian(adjacency)
    lap.sort_indices()  # the block extraction below relies on sorted column indices
    degree = lap.diagonal()
    n, n_cols = mass0.shape
    threshold = tol * np.maximum(mass0.sum(axis=0), np.finfo(float).tiny)
    slack = _round_off_floor(mass0, cap, 1e-15)
    rhs_full = mass0 - cap[:, None]
    saturated = (rhs_full > 0) & (degree[:, None] > 0)
    potential = np.zeros_like(mass0)
    mass = mass0.copy()
    rounds = products = 0
    converged = False
    while True:
        # Stacked unknowns: (column, node) pairs of the saturated entries, column-major, so each
        # column's block is contiguous and its nodes ascending.
        col, node = np.nonzero(saturated.T)
        if node.size:
            block = _stacked_blocks(lap, node, col, n)
            solved, used = _block_cg(block, rhs_full[node, col], potential[node, col], col, n_cols, cg_tol,
                                     max_cg_iters)
            # Numerical guard: the exact x_S is >= 0 (L_SS is an M-matrix); drop CG round-off below 0.
            potential[node, col] = np.maximum(solved, 0.0)
            products += used
            mass = mass0 - _laplacian_times(lap, node, col, potential[node, col], n, n_cols)
        excess = np.maximum(mass - cap[:, None], 0.0)
        excess[degree == 0] = 0.0
        if (excess.sum(axis=0) <= threshold).all():
            converged = True
            break
        violators = (mass > cap[:, None] * (1 + 1e-12) + slack) & ~saturated & (degree[:, None] > 0)
        if rounds >= max_rounds or not violators.any():
            # Nothing left to add: what excess remains is solver tolerance inside S.
            converged = (excess.sum(axis=0) <= threshold).all()
            break
        saturated |= violators
        rounds += 1
    return _result(potential, mass, cap, squeeze, rounds, converged, products)


def _row_edges(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in a CSR matrix's ``indices``/``data`` of all entries of ``rows`` (in row order),
    and each row's entry count."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    positions = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    return positions, lengths


def _stacked_blocks(lap: sp.csr_matrix, node: np.ndarray, col: np.ndarray, n: int) -> sp.csr_matrix:
    """``diag(L_{S_1 S_1}, …, L_{S_C S_C})`` as one CSR matrix; row/column ``s`` is ``(col[s], node[s])``.

    Entries must be sorted by ``key = col·n + node`` (as :func:`numpy.nonzero` of the transposed mask
    gives them). Each stacked row takes its node's Laplacian row and keeps the entries whose
    neighbour is stacked in the same column, found by binary search of ``col·n + neighbour`` among the
    keys: ``O(Σ_c vol(S_c) · log Σ_c |S_c|)``, no ``(n, C)`` lookup table."""
    key = col.astype(np.int64) * n + node
    positions, lengths = _row_edges(lap.indptr, node)
    owner = np.repeat(np.arange(node.size), lengths)
    wanted = col[owner].astype(np.int64) * n + lap.indices[positions]
    where = np.minimum(np.searchsorted(key, wanted), key.size - 1)
    hit = key[where] == wanted
    # Kept entries are in CSR order already: rows ascending (owner), columns ascending within a row
    # (sorted Laplacian indices map monotonically to stacked positions inside one column block).
    indptr = np.zeros(node.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[hit], minlength=node.size), out=indptr[1:])
    return sp.csr_matrix((lap.data[positions[hit]], where[hit], indptr), shape=(node.size, node.size))


def _laplacian_times(lap: sp.csr_matrix, node: np.ndarray, col: np.ndarray, values: np.ndarray, n: int,
                     n_cols: int) -> np.ndarray:
    """``L X`` as ``(n, C)`` for ``X`` zero except ``X[node[s], col[s]] = values[s]``.

    ``(L X)_{v,c} = Σ_s [col_s = c] L_{v, node_s} values_s``; with ``L`` symmetric the column of
    ``node_s`` is its row, so only the rows of stacked nodes are read: ``O(Σ_c vol(S_c) + n·C)``
    instead of ``O(nnz(L)·C)`` for ``lap @ X``."""
    positions, lengths = _row_edges(lap.indptr, node)
    owner = np.repeat(np.arange(node.size), lengths)
    target = lap.indices[positions].astype(np.int64) * n_cols + col[owner]
    out = np.bincount(target, weights=lap.data[positions] * values[owner], minlength=n * n_cols)
    return out.reshape(n, n_cols)


def _result(potential: np.ndarray, mass: np.ndarray, cap: np.ndarray, squeeze: bool, passes: int,
            converged: bool, work: int) -> FlowDiffusionResult:
    """Package a solution; 1-D inputs give 1-D arrays back."""
    excess = np.maximum(mass - cap[:, None], 0.0).sum(axis=0)
    if squeeze:
        potential, mass = potential[:, 0], mass[:, 0]
    return FlowDiffusionResult(potential, mass, passes, converged, excess, work)


def _block_cg(
    matrix: sp.csr_matrix,
    rhs: np.ndarray,
    start: np.ndarray,
    block: np.ndarray,
    n_blocks: int,
    rel_tol: float,
    max_iters: int,
) -> tuple[np.ndarray, int]:
    """Jacobi-preconditioned CG on a block-diagonal SPD ``matrix``, one independent CG per block.

    ``block[s]`` is the block of unknown ``s``. Every inner product is taken per block, so the step
    ``α_b = r_bᵀz_b / p_bᵀAp_b`` and ``β_b = r_bᵀz_b (new) / r_bᵀz_b (old)`` are the ones block ``b``
    alone would use, while the sparse product is shared. Stops when every block has
    ``||r_b|| ≤ rel_tol ||rhs_b||``. Returns ``(x, iterations)``.
    """
    diagonal = matrix.diagonal()
    inv_diag = np.where(diagonal > 0, 1.0 / np.where(diagonal > 0, diagonal, 1.0), 0.0)
    x = np.array(start, dtype=np.float64, copy=True)
    # Index arrays keep scipy's dtype (int32 up to 2³¹ entries): the product is memory-bound, and
    # 4-byte indices stream a third less data than 8-byte ones.
    used = _block_cg_kernel(matrix.indptr, matrix.indices, matrix.data.astype(np.float64, copy=False),
                            np.ascontiguousarray(rhs, dtype=np.float64), x,
                            inv_diag, np.ascontiguousarray(block, dtype=np.int64), int(n_blocks), float(rel_tol),
                            int(max_iters))
    return x, int(used)


@nb.njit(cache=True)
def _block_cg_kernel(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rhs: np.ndarray, x: np.ndarray,
                     inv_diag: np.ndarray, block: np.ndarray, n_blocks: int, rel_tol: float,
                     max_iters: int) -> int:  # pragma: no cover - compiled
    """The CG loop of :func:`_block_cg`, ``x`` updated in place; three fused passes per iteration
    (product + ``pᵀq``; updates + ``rᵀz``, ``rᵀr``; new direction) instead of ~15 array operations.
    Sums run in index order, so results do not depend on threads or chunking."""
    n = rhs.size
    r = np.empty(n)
    z = np.empty(n)
    p = np.empty(n)
    q = np.empty(n)
    rz = np.zeros(n_blocks)
    rr = np.zeros(n_blocks)
    goal = np.zeros(n_blocks)
    for i in range(n):
        s = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            s += data[e] * x[indices[e]]
        r[i] = rhs[i] - s
        z[i] = r[i] * inv_diag[i]
        p[i] = z[i]
        b = block[i]
        rz[b] += r[i] * z[i]
        rr[b] += r[i] * r[i]
        goal[b] += rhs[i] * rhs[i]
    tiny = np.finfo(np.float64).tiny
    for b in range(n_blocks):
        goal[b] = rel_tol * max(np.sqrt(goal[b]), tiny)
    pq = np.zeros(n_blocks)
    rz_new = np.zeros(n_blocks)
    alpha = np.zeros(n_blocks)
    beta = np.zeros(n_blocks)
    for used in range(1, max_iters + 1):
        done = True
        for b in range(n_blocks):
            if np.sqrt(rr[b]) > goal[b]:
                done = False
                break
        if done:
            return used - 1
        pq[:] = 0.0
        for i in range(n):
            s = 0.0
            for e in range(indptr[i], indptr[i + 1]):
                s += data[e] * p[indices[e]]
            q[i] = s
            pq[block[i]] += p[i] * s
        for b in range(n_blocks):
            alpha[b] = rz[b] / pq[b] if pq[b] > 0 else 0.0
        rz_new[:] = 0.0
        rr[:] = 0.0
        for i in range(n):
            b = block[i]
            x[i] += alpha[b] * p[i]
            r[i] -= alpha[b] * q[i]
            z[i] = r[i] * inv_diag[i]
            rz_new[b] += r[i] * z[i]
            rr[b] += r[i] * r[i]
        for b in range(n_blocks):
            beta[b] = rz_new[b] / rz[b] if rz[b] > 0 else 0.0
            rz[b] = rz_new[b]
        for i in range(n):
            p[i] = z[i] + beta[block[i]] * p[i]
    return max_iters


def _check_mass(
    adjacency: sp.csr_matrix, source_mass: np.ndarray, capacity: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate ``Δ`` / ``T``; returns ``(Δ as (n, C) float64 copy, T (n,), was 1-D)``."""
    n = adjacency.shape[0]
    delta = np.asarray(source_mass, dtype=np.float64)
    if delta.ndim not in (1, 2) or delta.shape[0] != n:
        raise DataError(f"flow diffusion: source mass must be ({n},) or ({n}, C), got {delta.shape}")
    mass = delta.reshape(n, -1).copy()
    cap = np.asarray(capacity, dtype=np.float64)
    if cap.shape != (n,):
        raise DataError(f"flow diffusion: capacity must be ({n},), got {cap.shape}")
    if not (np.isfinite(mass).all() and np.isfinite(cap).all()) or (mass < 0).any() or (cap < 0).any():
        raise DataError("flow diffusion: source mass and capacity must be finite and >= 0")
    if not tol > 0:
        raise DataError(f"flow diffusion: tol must be > 0, got {tol!r}")
    return mass, cap, delta.ndim == 1


def disagreement_reweight(adjacency: sp.spmatrix, node_labels: np.ndarray, factor: float) -> sp.csr_matrix:
    """Down-weight edges whose endpoint labels disagree: ``w_ij ← factor · w_ij`` if ``y_i ≠ y_j``.

    The noisy-label flow diffusion of Back de Luca, Fountoulakis & Yang ("Local Graph Clustering
    with Noisy Labels", ICLR 2024) uses weight ``ε ∈ [0.01, 0.1]`` on such edges. ``node_labels``
    ``(n,)``; ``-1`` = unknown, never counted as a disagreement. ``factor = 1`` returns the graph
    unchanged.
    """
    adjacency = sp.csr_matrix(adjacency, dtype=np.float64, copy=True)
    labels = np.asarray(node_labels).reshape(-1)
    if labels.shape[0] != adjacency.shape[0]:
        raise DataError(f"reweight: {labels.shape[0]} labels for a graph of {adjacency.shape[0]} nodes")
    if not 0 < factor <= 1:
        raise DataError(f"reweight: factor must be in (0, 1], got {factor!r}")
    if factor == 1:
        return adjacency
    row = np.repeat(np.arange(adjacency.shape[0]), np.diff(adjacency.indptr))
    a, b = labels[row], labels[adjacency.indices]
    disagree = (a != b) & (a >= 0) & (b >= 0)
    adjacency.data[disagree] *= factor
    return adjacency


def class_seed_mass(
    degree: np.ndarray, n_source: int, source_labels: np.ndarray, num_classes: int, target_fill: float
) -> np.ndarray:
    """Per-class seed mass of COUPLE's diffusion (docs/couple.md, "What runs"), ``(n, C)``.

    Column ``c`` puts ``Δ_i = α · deg(i)`` on the source nodes of class ``c`` (nodes ``0..n_s−1``)
    and 0 elsewhere, with ``α = 1 + target_fill · vol(target) / vol(source)``: the excess over the
    seeds' own capacity ``T_i = deg(i)`` is then ``target_fill`` times the class's share of the
    target volume, so ``target_fill = 1`` is enough mass to fill a class's worth of target nodes.
    (With ``α = 1``, i.e. ``Δ = T`` on the seeds, nothing diffuses; a large fixed α floods the other
    classes.)
    """
    degree = np.asarray(degree, dtype=np.float64)
    labels = np.asarray(source_labels).reshape(-1)
    if labels.dtype.kind not in "iu":
        raise DataError(f"seed mass: source labels must be integers, got dtype {labels.dtype}")
    if labels.shape[0] != n_source or n_source > degree.shape[0]:
        raise DataError("seed mass: source labels do not match the graph's source nodes")
    if (labels < 0).any() or (labels >= num_classes).any():
        raise DataError(f"seed mass: source labels must be in [0, {num_classes})")
    if not (np.isfinite(target_fill) and target_fill >= 0):
        raise DataError(f"seed mass: target_fill must be a finite number >= 0, got {target_fill!r}")
    source_volume = degree[:n_source].sum()
    target_volume = degree[n_source:].sum()
    alpha = 1.0 + target_fill * target_volume / source_volume if source_volume > 0 else 1.0
    mass = np.zeros((degree.shape[0], num_classes))
    mass[np.arange(n_source), labels] = alpha * degree[:n_source]
    return mass


def clip_to_feasible(
    adjacency: sp.spmatrix, source_mass: np.ndarray, capacity: np.ndarray, margin: float = 1e-3
) -> tuple[np.ndarray, int]:
    """Scale the mass down, per connected component and column, to at most ``(1 − margin)`` of the
    component's capacity (a class whose source nodes have no path to any target would otherwise
    make the problem infeasible). Returns ``(mass, number of (component, column) pairs scaled)``."""
    _, component = csgraph.connected_components(_without_zeros(adjacency), directed=False)
    mass = np.asarray(source_mass, dtype=np.float64).reshape(component.size, -1).copy()
    n_comp = int(component.max()) + 1 if component.size else 0
    cap = np.bincount(component, weights=np.asarray(capacity, dtype=np.float64), minlength=n_comp)
    scaled = 0
    for col in range(mass.shape[1]):
        need = np.bincount(component, weights=mass[:, col], minlength=n_comp)
        limit = (1.0 - margin) * cap
        factor = np.ones_like(need)
        over = need > limit
        factor[over] = limit[over] / need[over]
        scaled += int((factor < 1.0).sum())
        mass[:, col] *= factor[component]
    return mass.reshape(np.shape(source_mass)), scaled
