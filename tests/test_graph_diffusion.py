"""ℓ2 flow diffusion: both solvers against a scipy L-BFGS-B reference of the dual, KKT conditions checked
directly, multi-column = per column, locality, infeasibility, graph validation, seeding, clipping and
label-aware reweighting."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import minimize

from crossret.errors import DataError
from crossret.graph import (
    FlowDiffusionResult,
    check_feasible,
    class_seed_mass,
    clip_to_feasible,
    disagreement_reweight,
    l2_flow_diffusion,
    l2_flow_diffusion_active_set,
    laplacian,
)

SOLVERS = [l2_flow_diffusion, l2_flow_diffusion_active_set]
SOLVER_IDS = ["push", "active_set"]


def tight(solver, adjacency, delta, capacity, tol: float = 1e-12, **kwargs) -> FlowDiffusionResult:
    """Run a solver to a tight tolerance; the active-set solver's accuracy is bounded by its CG
    tolerance (default 1e-10, independent of ``tol``), so that is tightened too."""
    if solver is l2_flow_diffusion_active_set:
        kwargs.setdefault("cg_tol", 1e-14)
    return solver(adjacency, delta, capacity, tol=tol, **kwargs)

# ------------------------------------------------------------------ helpers


def random_connected_graph(rng: np.random.Generator, n: int, extra: int) -> sp.csr_matrix:
    """Random spanning tree plus ``extra`` random edges, weights in [0.1, 2]."""
    perm = rng.permutation(n)
    edges = {tuple(sorted((int(perm[i]), int(perm[rng.integers(0, i)])))) for i in range(1, n)}
    while len(edges) < n - 1 + extra:
        a, b = rng.choice(n, size=2, replace=False)
        edges.add((int(min(a, b)), int(max(a, b))))
    e = np.array(sorted(edges))
    w = rng.uniform(0.1, 2.0, size=e.shape[0])
    upper = sp.coo_matrix((w, (e[:, 0], e[:, 1])), shape=(n, n))
    return (upper + upper.T).tocsr()


def random_problem(
    rng: np.random.Generator, n: int, fill: float, seeds: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Capacities T (some zero) and a seed mass Δ concentrated on a few nodes with Σ Δ = fill · Σ T."""
    capacity = rng.uniform(0.2, 1.5, size=n)
    capacity[rng.choice(n, size=max(1, n // 8), replace=False)] = 0.0
    delta = np.zeros(n)
    delta[rng.choice(n, size=seeds, replace=False)] = rng.uniform(0.5, 1.0, size=seeds)
    delta *= fill * capacity.sum() / delta.sum()
    return delta, capacity


def dual_objective(lap: np.ndarray, delta: np.ndarray, capacity: np.ndarray, x: np.ndarray) -> float:
    return float(0.5 * x @ lap @ x + x @ (capacity - delta))


def reference_solve(lap: np.ndarray, delta: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """min_{x >= 0} ½ xᵀLx + xᵀ(T − Δ) by scipy's L-BFGS-B (dense, tight tolerances)."""
    c = capacity - delta

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        g = lap @ x
        return float(0.5 * x @ g + c @ x), g + c

    res = minimize(
        fun,
        np.zeros(lap.shape[0]),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * lap.shape[0],
        options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 50_000, "maxfun": 100_000, "maxcor": 50},
    )
    return res.x


def edge_list(adjacency: sp.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    upper = sp.triu(adjacency, k=1).tocoo()
    return upper.row, upper.col, upper.data


def check_kkt(
    adjacency: sp.csr_matrix,
    delta: np.ndarray,
    capacity: np.ndarray,
    result: FlowDiffusionResult,
    tol: float,
) -> None:
    """x >= 0, m = Δ − Lx (recomputed), m <= T, complementary slackness, flow conservation and strong
    duality, all for a single column."""
    x, m = result.potential, result.mass
    scale = delta.sum()
    assert x.shape == m.shape == delta.shape
    assert (x >= 0).all()
    lap = laplacian(adjacency)
    np.testing.assert_allclose(m, delta - lap @ x, atol=1e-9 * scale)
    assert (m <= capacity + tol * scale).all()
    assert np.abs(x * (capacity - m)).max() <= tol * scale * max(1.0, x.max())
    # Primal flow f_ij = w_ij (x_i − x_j) along each undirected edge i -> j; conservation Δ + Bᵀf = m.
    i, j, w = edge_list(adjacency)
    f = w * (x[i] - x[j])
    routed = delta.copy()
    np.add.at(routed, i, -f)
    np.add.at(routed, j, f)
    np.testing.assert_allclose(routed, m, atol=1e-9 * scale)
    # Mass is conserved overall, and strong duality: ½ Σ f²/w = −(dual objective).
    assert m.sum() == pytest.approx(delta.sum(), rel=1e-12)
    primal = 0.5 * float((f * f / w).sum())
    dual = dual_objective(lap.toarray(), delta, capacity, x)
    assert primal + dual == pytest.approx(0.0, abs=tol * scale * max(1.0, x.max()) * x.size)


GRAPH_CASES = [(0, 8, 4, 0.5), (1, 12, 10, 0.8), (2, 20, 15, 0.3), (3, 25, 40, 0.9), (4, 33, 20, 0.6), (5, 40, 60, 0.7)]


# ------------------------------------------------------------------ optimality vs. scipy


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize(("seed", "n", "extra", "fill"), GRAPH_CASES)
def test_solvers_reach_the_dual_optimum(solver, seed: int, n: int, extra: int, fill: float) -> None:
    rng = np.random.default_rng(seed)
    adjacency = random_connected_graph(rng, n, extra)
    delta, capacity = random_problem(rng, n, fill)
    result = tight(solver, adjacency, delta, capacity, tol=1e-11)
    assert result.converged
    lap = laplacian(adjacency).toarray()
    x_ref = reference_solve(lap, delta, capacity)
    f_ref = dual_objective(lap, delta, capacity, x_ref)
    f_got = dual_objective(lap, delta, capacity, result.potential)
    assert f_ref < 0, "the diffusion must be non-trivial (x = 0 is not optimal)"
    assert f_got == pytest.approx(f_ref, rel=1e-6)
    assert f_got <= f_ref + 1e-9 * abs(f_ref), "the solver should not be worse than the reference"
    np.testing.assert_allclose(result.potential, x_ref, atol=1e-6 * x_ref.max())
    assert (result.potential > 0).sum() >= 1
    check_kkt(adjacency, delta, capacity, result, tol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize(("seed", "n", "extra", "fill"), GRAPH_CASES[:4])
def test_kkt_at_default_tolerance(solver, seed: int, n: int, extra: int, fill: float) -> None:
    rng = np.random.default_rng(100 + seed)
    adjacency = random_connected_graph(rng, n, extra)
    delta, capacity = random_problem(rng, n, fill, seeds=3)
    result = solver(adjacency, delta, capacity)
    assert result.converged
    assert result.excess.shape == (1,)
    assert result.excess[0] <= 1e-6 * delta.sum()
    np.testing.assert_allclose(result.excess, np.maximum(result.mass - capacity, 0).sum(), rtol=1e-12, atol=1e-300)
    check_kkt(adjacency, delta, capacity, result, tol=1e-5)


@pytest.mark.parametrize(("seed", "n", "extra", "fill"), GRAPH_CASES)
def test_solvers_agree(seed: int, n: int, extra: int, fill: float) -> None:
    rng = np.random.default_rng(200 + seed)
    adjacency = random_connected_graph(rng, n, extra)
    delta, capacity = random_problem(rng, n, fill, seeds=3)
    push = l2_flow_diffusion(adjacency, delta, capacity, tol=1e-12)
    active = tight(l2_flow_diffusion_active_set, adjacency, delta, capacity)
    unchecked = tight(l2_flow_diffusion_active_set, adjacency, delta, capacity, check=False)
    scale = max(push.potential.max(), 1.0)
    np.testing.assert_allclose(push.potential, active.potential, atol=1e-7 * scale)
    np.testing.assert_allclose(push.mass, active.mass, atol=1e-8 * delta.sum())
    np.testing.assert_array_equal(unchecked.potential, active.potential)
    # Same support (the diffused cluster).
    np.testing.assert_array_equal(push.potential > 1e-6 * scale, active.potential > 1e-6 * scale)


def test_inputs_not_modified() -> None:
    rng = np.random.default_rng(7)
    adjacency = random_connected_graph(rng, 15, 10)
    delta, capacity = random_problem(rng, 15, 0.5)
    a0, d0, c0 = adjacency.copy(), delta.copy(), capacity.copy()
    for solver in SOLVERS:
        solver(adjacency, delta, capacity)
        assert (adjacency != a0).nnz == 0
        np.testing.assert_array_equal(delta, d0)
        np.testing.assert_array_equal(capacity, c0)


# ------------------------------------------------------------------ multi-column


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_column_equals_per_column(solver, seed: int) -> None:
    rng = np.random.default_rng(300 + seed)
    n = 30
    adjacency = random_connected_graph(rng, n, 25)
    _, capacity = random_problem(rng, n, 0.5)
    columns = []
    for fill in (0.2, 0.6, 0.9):
        delta, _ = random_problem(rng, n, 1.0, seeds=2)
        columns.append(delta / delta.sum() * fill * capacity.sum())
    columns.append(np.zeros(n))  # an empty column
    delta = np.stack(columns, axis=1)
    joint = tight(solver, adjacency, delta, capacity)
    assert joint.potential.shape == joint.mass.shape == (n, 4)
    assert joint.excess.shape == (4,)
    assert joint.converged
    for c in range(4):
        alone = tight(solver, adjacency, delta[:, c], capacity)
        assert alone.potential.shape == (n,)
        scale = max(alone.potential.max(), 1.0)
        np.testing.assert_allclose(joint.potential[:, c], alone.potential, atol=1e-8 * scale)
        np.testing.assert_allclose(joint.mass[:, c], alone.mass, atol=1e-8 * capacity.sum())
    np.testing.assert_array_equal(joint.potential[:, 3], 0.0)
    np.testing.assert_array_equal(joint.mass[:, 3], 0.0)


# ------------------------------------------------------------------ exact solution and locality


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_path_graph_exact_and_local(solver) -> None:
    """Path of 200 unit edges, T = 1, Δ_0 = 4.5: nodes 0..3 saturate, node 4 gets 0.5.
    Flows 3.5, 2.5, 1.5, 0.5 give x = (8, 4.5, 2, 0.5, 0, ...); nothing beyond node 4 is touched."""
    n = 200
    i = np.arange(n - 1)
    upper = sp.coo_matrix((np.ones(n - 1), (i, i + 1)), shape=(n, n))
    adjacency = (upper + upper.T).tocsr()
    delta = np.zeros(n)
    delta[0] = 4.5
    capacity = np.ones(n)
    result = tight(solver, adjacency, delta, capacity, tol=1e-13)
    expected_x = np.zeros(n)
    expected_x[:4] = [8.0, 4.5, 2.0, 0.5]
    expected_m = np.zeros(n)
    expected_m[:5] = [1.0, 1.0, 1.0, 1.0, 0.5]
    np.testing.assert_allclose(result.potential, expected_x, atol=1e-9)
    np.testing.assert_allclose(result.mass, expected_m, atol=1e-9)
    # Locality: far nodes are exactly untouched.
    assert (result.potential[4:] == 0).all()
    assert (result.mass[5:] == 0).all()


def test_push_work_is_local() -> None:
    """On the 200-node path the push solver only ever pushes the four saturated nodes."""
    n = 200
    i = np.arange(n - 1)
    upper = sp.coo_matrix((np.ones(n - 1), (i, i + 1)), shape=(n, n))
    adjacency = (upper + upper.T).tocsr()
    delta = np.zeros(n)
    delta[0] = 4.5
    result = l2_flow_diffusion(adjacency, delta, np.ones(n))
    assert result.converged
    assert result.pushes <= 4 * result.passes
    assert result.passes > 0


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_no_excess_means_no_diffusion(solver) -> None:
    rng = np.random.default_rng(8)
    adjacency = random_connected_graph(rng, 10, 5)
    capacity = np.full(10, 2.0)
    delta = rng.uniform(0, 1.9, size=10)
    result = solver(adjacency, delta, capacity)
    np.testing.assert_array_equal(result.potential, 0.0)
    np.testing.assert_array_equal(result.mass, delta)
    assert result.converged
    assert result.passes == 0


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_truncated_iterates_stay_below_the_optimum(solver) -> None:
    """From x = 0 the iterates increase monotonically towards the least feasible point (L is a
    Z-matrix), so a run cut short is below the optimum everywhere and m = Δ − Lx still holds."""
    rng = np.random.default_rng(9)
    n = 40
    adjacency = random_connected_graph(rng, n, 20)
    delta, capacity = random_problem(rng, n, 0.9, seeds=1)
    optimum = tight(solver, adjacency, delta, capacity).potential
    key = "max_passes" if solver is l2_flow_diffusion else "max_rounds"
    previous = np.zeros(n)
    for limit in (1, 2, 3, 5):
        partial = tight(solver, adjacency, delta, capacity, **{key: limit})
        assert not partial.converged
        assert partial.passes == limit
        assert (partial.potential <= optimum + 1e-9).all()
        assert (partial.potential >= previous - 1e-9).all()
        np.testing.assert_allclose(partial.mass, delta - laplacian(adjacency) @ partial.potential, atol=1e-9)
        previous = partial.potential


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_isolated_nodes_within_capacity_are_fine(solver) -> None:
    """A degree-0 node whose mass fits its own capacity keeps it; the rest diffuses normally."""
    rng = np.random.default_rng(10)
    core = random_connected_graph(rng, 12, 6)
    adjacency = sp.block_diag([core, sp.csr_matrix((2, 2))]).tocsr()
    delta, capacity = random_problem(rng, 12, 0.6)
    delta = np.concatenate([delta, [0.3, 0.0]])
    capacity = np.concatenate([capacity, [0.5, 0.0]])
    result = tight(solver, adjacency, delta, capacity)
    alone = tight(solver, core, delta[:12], capacity[:12])
    np.testing.assert_allclose(result.potential[:12], alone.potential, atol=1e-8 * alone.potential.max())
    np.testing.assert_array_equal(result.potential[12:], 0.0)
    np.testing.assert_array_equal(result.mass[12:], [0.3, 0.0])


def _with_stored_zeros(adjacency: sp.csr_matrix, pairs: list[tuple[int, int]]) -> sp.csr_matrix:
    """``adjacency`` plus explicit (stored) zero entries at ``pairs`` and their mirror images."""
    coo = adjacency.tocoo()
    extra = np.array(pairs + [(j, i) for i, j in pairs])
    out = sp.csr_matrix(
        (
            np.concatenate([coo.data, np.zeros(len(extra))]),
            (np.concatenate([coo.row, extra[:, 0]]), np.concatenate([coo.col, extra[:, 1]])),
        ),
        shape=adjacency.shape,
    )
    assert out.nnz == adjacency.nnz + len(extra)
    return out


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_explicit_zero_entries_are_not_edges(solver) -> None:
    rng = np.random.default_rng(11)
    adjacency = random_connected_graph(rng, 15, 12)
    delta, capacity = random_problem(rng, 15, 0.7)
    dense = adjacency.toarray()
    pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(dense == 0, k=1)), strict=True)][:6]
    with_zeros = _with_stored_zeros(adjacency, pairs)
    a = tight(solver, with_zeros, delta, capacity)
    b = tight(solver, adjacency, delta, capacity)
    np.testing.assert_allclose(a.potential, b.potential, atol=1e-9 * max(1.0, b.potential.max()))
    # A stored zero does not join two components: the overfull one is still infeasible.
    two = sp.block_diag([random_connected_graph(rng, 4, 1), random_connected_graph(rng, 4, 1)]).tocsr()
    joined = _with_stored_zeros(two, [(3, 4)])
    delta = np.zeros(8)
    delta[0] = 5.0
    with pytest.raises(DataError, match="infeasible"):
        solver(joined, delta, np.ones(8))


# ------------------------------------------------------------------ infeasibility


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_infeasible_isolated_node(solver) -> None:
    rng = np.random.default_rng(12)
    core = random_connected_graph(rng, 10, 5)
    adjacency = sp.block_diag([core, sp.csr_matrix((1, 1))]).tocsr()
    delta, capacity = random_problem(rng, 10, 0.3)
    delta = np.append(delta, 2.0)
    capacity = np.append(capacity, 0.0)
    with pytest.raises(DataError, match=r"infeasible \(column 0\).*1 node\(s\) holds mass 2 but only capacity 0"):
        solver(adjacency, delta, capacity)


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_infeasible_total_mass(solver) -> None:
    rng = np.random.default_rng(13)
    adjacency = random_connected_graph(rng, 20, 10)
    delta, capacity = random_problem(rng, 20, 1.01)
    with pytest.raises(DataError, match="infeasible"):
        solver(adjacency, delta, capacity)


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_infeasible_component_names_the_column(solver) -> None:
    """Total mass fits, but one of two components is overfull in column 2 only."""
    rng = np.random.default_rng(14)
    g1 = random_connected_graph(rng, 8, 4)
    g2 = random_connected_graph(rng, 8, 4)
    adjacency = sp.block_diag([g1, g2]).tocsr()
    capacity = np.ones(16)
    delta = np.zeros((16, 3))
    delta[0, :] = 2.0
    delta[8, 2] = 9.0  # component 2 holds 9 > 8
    with pytest.raises(DataError, match=r"infeasible \(column 2\).*8 node\(s\) holds mass 9 but only capacity 8"):
        solver(adjacency, delta, capacity)
    delta[8, 2] = 7.0
    result = solver(adjacency, delta, capacity)
    assert result.converged


def test_check_feasible_boundary() -> None:
    rng = np.random.default_rng(15)
    adjacency = random_connected_graph(rng, 10, 5)
    capacity = rng.uniform(0.5, 1.0, size=10)
    delta = np.zeros(10)
    delta[3] = capacity.sum()
    check_feasible(adjacency, delta, capacity)  # equality is allowed
    delta[3] = capacity.sum() * (1 + 1e-9)
    with pytest.raises(DataError, match="infeasible"):
        check_feasible(adjacency, delta, capacity)


# ------------------------------------------------------------------ graph / input validation


def _valid() -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(16)
    adjacency = random_connected_graph(rng, 6, 3)
    delta, capacity = random_problem(rng, 6, 0.5)
    return adjacency, delta, capacity


def _asymmetric() -> sp.csr_matrix:
    a = _valid()[0].tolil()
    rows, cols = a.nonzero()
    a[rows[0], cols[0]] = a[rows[0], cols[0]] + 0.5
    return a.tocsr()


def _negative() -> sp.csr_matrix:
    a = _valid()[0].copy()
    a.data[:] = -a.data
    return a


def _self_loop() -> sp.csr_matrix:
    a = _valid()[0].tolil()
    a[2, 2] = 1.0
    return a.tocsr()


def _nan() -> sp.csr_matrix:
    a = _valid()[0].copy()
    a.data[0] = np.nan
    return a


def _inf() -> sp.csr_matrix:
    a = _valid()[0].tolil()
    a[0, 5] = a[5, 0] = np.inf
    return a.tocsr()


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_asymmetric, "symmetric"),
        (_negative, "finite and >= 0"),
        (_self_loop, "self-loops"),
        (_nan, "finite and >= 0"),
        (_inf, "finite and >= 0"),
        (lambda: _valid()[0].toarray(), "scipy.sparse"),
        (lambda: sp.csr_matrix(np.ones((6, 7))), "square"),
    ],
    ids=["asymmetric", "negative", "self_loop", "nan", "inf", "dense", "non_square"],
)
def test_invalid_graphs(solver, make, message: str) -> None:
    _, delta, capacity = _valid()
    with pytest.raises(DataError, match=message):
        solver(make(), delta, capacity)


def test_tiny_asymmetry_is_tolerated() -> None:
    adjacency, delta, capacity = _valid()
    a = adjacency.tolil()
    rows, cols = a.nonzero()
    a[rows[0], cols[0]] = a[rows[0], cols[0]] * (1 + 1e-13)
    base = l2_flow_diffusion(adjacency, delta, capacity, tol=1e-12)
    fuzzy = l2_flow_diffusion(a.tocsr(), delta, capacity, tol=1e-12)
    np.testing.assert_allclose(fuzzy.potential, base.potential, rtol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_invalid_mass_and_capacity(solver) -> None:
    adjacency, delta, capacity = _valid()
    cases = [
        (delta[:5], capacity, {}, "source mass must be"),
        (delta.reshape(6, 1, 1), capacity, {}, "source mass must be"),
        (delta, capacity[:5], {}, "capacity must be"),
        (delta, np.stack([capacity, capacity], axis=1), {}, "capacity must be"),
        (-delta, capacity, {}, "finite and >= 0"),
        (delta, -capacity, {}, "finite and >= 0"),
        (np.where(delta > 0, np.nan, 0.0), capacity, {}, "finite and >= 0"),
        (delta, np.full(6, np.inf), {}, "finite and >= 0"),
        (delta, capacity, {"tol": 0.0}, "tol must be > 0"),
        (delta, capacity, {"tol": -1e-6}, "tol must be > 0"),
        (delta, capacity, {"tol": float("nan")}, "tol must be > 0"),
    ]
    for d, c, kwargs, message in cases:
        with pytest.raises(DataError, match=message):
            solver(adjacency, d, c, **kwargs)


# ------------------------------------------------------------------ laplacian


def test_laplacian() -> None:
    rng = np.random.default_rng(17)
    adjacency = random_connected_graph(rng, 12, 8)
    lap = laplacian(adjacency)
    assert sp.issparse(lap) and lap.format == "csr"
    dense = adjacency.toarray()
    np.testing.assert_allclose(lap.toarray(), np.diag(dense.sum(axis=1)) - dense, atol=0)
    np.testing.assert_allclose(lap @ np.ones(12), 0.0, atol=1e-12)
    # xᵀLx = Σ_edges w (x_i − x_j)²
    x = rng.normal(size=12)
    i, j, w = edge_list(adjacency)
    assert x @ (lap @ x) == pytest.approx(float((w * (x[i] - x[j]) ** 2).sum()), rel=1e-12)


# ------------------------------------------------------------------ class_seed_mass


def test_class_seed_mass_by_hand() -> None:
    degree = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    labels = np.array([2, 0, 2, 1])
    mass = class_seed_mass(degree, 4, labels, num_classes=4, target_fill=0.5)
    alpha = 1.0 + 0.5 * (5 + 6 + 7) / (1 + 2 + 3 + 4)  # 1.9
    expected = np.zeros((7, 4))
    expected[0, 2] = alpha * 1
    expected[1, 0] = alpha * 2
    expected[2, 2] = alpha * 3
    expected[3, 1] = alpha * 4
    np.testing.assert_allclose(mass, expected, rtol=1e-15)
    assert alpha == pytest.approx(1.9)
    # Column sums: α · class volume; class 3 has no source node.
    np.testing.assert_allclose(mass.sum(axis=0), alpha * np.array([2.0, 4.0, 4.0, 0.0]))
    # Excess over the seeds' own capacity T = deg: target_fill × the class's share of the target volume.
    excess = mass.sum(axis=0) - np.array([2.0, 4.0, 4.0, 0.0])
    np.testing.assert_allclose(excess, 0.5 * 18 * np.array([2.0, 4.0, 4.0, 0.0]) / 10)


def test_class_seed_mass_random() -> None:
    rng = np.random.default_rng(18)
    n, ns, classes, fill = 50, 30, 5, 1.3
    degree = rng.uniform(0.5, 3.0, size=n)
    labels = rng.integers(0, classes, size=ns)
    mass = class_seed_mass(degree, ns, labels, classes, fill)
    alpha = 1 + fill * degree[ns:].sum() / degree[:ns].sum()
    for c in range(classes):
        expected = np.where((np.arange(n) < ns) & (np.append(labels, -np.ones(n - ns)) == c), alpha * degree, 0.0)
        np.testing.assert_allclose(mass[:, c], expected, rtol=1e-14)
    # Every source node seeds exactly one class; targets none.
    assert ((mass[:ns] > 0).sum(axis=1) == 1).all()
    assert not mass[ns:].any()
    assert mass.sum() == pytest.approx(alpha * degree[:ns].sum())


def test_class_seed_mass_fill_zero_and_no_source_volume() -> None:
    degree = np.array([1.0, 2.0, 3.0])
    mass = class_seed_mass(degree, 2, np.array([0, 1]), 2, 0.0)
    np.testing.assert_allclose(mass, [[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    mass = class_seed_mass(np.array([0.0, 0.0, 3.0]), 2, np.array([0, 1]), 2, 5.0)
    np.testing.assert_array_equal(mass, 0.0)


def test_class_seed_mass_errors() -> None:
    degree = np.ones(5)
    with pytest.raises(DataError, match="do not match"):
        class_seed_mass(degree, 3, np.array([0, 1]), 2, 1.0)
    with pytest.raises(DataError, match="do not match"):
        class_seed_mass(degree, 6, np.zeros(6, np.int64), 2, 1.0)
    with pytest.raises(DataError, match=r"in \[0, 2\)"):
        class_seed_mass(degree, 2, np.array([0, 2]), 2, 1.0)
    with pytest.raises(DataError, match=r"in \[0, 2\)"):
        class_seed_mass(degree, 2, np.array([-1, 0]), 2, 1.0)
    for bad in (-0.1, np.nan, np.inf):
        with pytest.raises(DataError, match="target_fill"):
            class_seed_mass(degree, 2, np.array([0, 1]), 2, bad)


def test_class_seed_mass_float_labels_raise_data_error() -> None:
    with pytest.raises(DataError):
        class_seed_mass(np.ones(3), 2, np.array([0.0, 1.0]), 2, 1.0)


def test_seeded_diffusion_end_to_end() -> None:
    """class_seed_mass + clip_to_feasible + both solvers on a graph with T = degree."""
    rng = np.random.default_rng(19)
    adjacency = random_connected_graph(rng, 30, 30)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    labels = rng.integers(0, 3, size=12)
    delta = class_seed_mass(degree, 12, labels, 3, 0.5)
    delta, scaled = clip_to_feasible(adjacency, delta, degree)
    assert scaled == 0
    push = l2_flow_diffusion(adjacency, delta, degree, tol=1e-11)
    active = tight(l2_flow_diffusion_active_set, adjacency, delta, degree, tol=1e-11)
    for c in range(3):
        single = FlowDiffusionResult(push.potential[:, c], push.mass[:, c], 0, True, push.excess[c:c + 1], 0)
        check_kkt(adjacency, delta[:, c], degree, single, tol=1e-9)
    np.testing.assert_allclose(push.potential, active.potential, atol=1e-7 * push.potential.max())


# ------------------------------------------------------------------ clip_to_feasible


def _three_components(rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Components: 0..9 feasible with room to spare, 10..17 overfull, 18 isolated with T = 0, Δ > 0."""
    g1 = random_connected_graph(rng, 10, 5)
    g2 = random_connected_graph(rng, 8, 4)
    adjacency = sp.block_diag([g1, g2, sp.csr_matrix((1, 1))]).tocsr()
    capacity = rng.uniform(0.5, 1.5, size=19)
    capacity[18] = 0.0
    delta = np.zeros(19)
    delta[[1, 4]] = [1.0, 2.0]  # well below the first component's capacity
    delta[[11, 12, 15]] = [3.0, 5.0, 4.0]  # above the second's
    delta[18] = 0.7
    return adjacency, delta, capacity


def test_clip_to_feasible() -> None:
    rng = np.random.default_rng(20)
    adjacency, delta, capacity = _three_components(rng)
    assert capacity[10:18].sum() < 12.0
    with pytest.raises(DataError, match="infeasible"):
        check_feasible(adjacency, delta, capacity)
    clipped, scaled = clip_to_feasible(adjacency, delta, capacity, margin=0.01)
    assert clipped.shape == delta.shape
    assert scaled == 2
    check_feasible(adjacency, clipped, capacity)
    # Feasible component untouched, bit for bit.
    np.testing.assert_array_equal(clipped[:10], delta[:10])
    # Overfull component scaled proportionally to exactly (1 − margin) of its capacity.
    assert clipped[10:18].sum() == pytest.approx(0.99 * capacity[10:18].sum(), rel=1e-12)
    np.testing.assert_allclose(clipped[10:18], delta[10:18] * clipped[10:18].sum() / delta[10:18].sum(), rtol=1e-12)
    # Zero-capacity component emptied.
    assert clipped[18] == 0.0
    # Inputs not modified, and the result is solvable.
    assert delta[18] == 0.7
    result = l2_flow_diffusion(adjacency, clipped, capacity)
    assert result.converged


def test_clip_to_feasible_multi_column() -> None:
    rng = np.random.default_rng(21)
    adjacency, delta, capacity = _three_components(rng)
    both = np.stack([delta, delta * 0.01], axis=1)  # column 1: only the isolated node is infeasible
    clipped, scaled = clip_to_feasible(adjacency, both, capacity)
    assert clipped.shape == (19, 2)
    assert scaled == 3
    check_feasible(adjacency, clipped, capacity)
    single, _ = clip_to_feasible(adjacency, delta, capacity)
    np.testing.assert_array_equal(clipped[:, 0], single)
    np.testing.assert_array_equal(clipped[:18, 1], both[:18, 1])
    assert clipped[18, 1] == 0.0
    assert clipped[10:18, 0].sum() == pytest.approx((1 - 1e-3) * capacity[10:18].sum(), rel=1e-12)


def test_clip_to_feasible_leaves_feasible_input_unchanged() -> None:
    rng = np.random.default_rng(22)
    adjacency = random_connected_graph(rng, 20, 10)
    delta, capacity = random_problem(rng, 20, 0.8)
    clipped, scaled = clip_to_feasible(adjacency, delta, capacity)
    assert scaled == 0
    np.testing.assert_array_equal(clipped, delta)


def test_clip_to_feasible_with_explicit_zero_edges() -> None:
    dense = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0.0]])
    adjacency = sp.csr_matrix(dense)
    # Zero the edge 1–2 but keep it stored: the graph is two components {0, 1} and {2, 3}.
    row = np.repeat(np.arange(4), np.diff(adjacency.indptr))
    cut = ((row == 1) & (adjacency.indices == 2)) | ((row == 2) & (adjacency.indices == 1))
    adjacency.data[cut] = 0.0
    assert adjacency.nnz == 6
    delta = np.array([3.0, 0.0, 0.0, 0.0])
    capacity = np.ones(4)
    clipped, _ = clip_to_feasible(adjacency, delta, capacity)
    result = l2_flow_diffusion(adjacency, clipped, capacity)
    assert result.converged


def test_check_feasible_ignores_explicit_zero_edges() -> None:
    two = sp.block_diag([sp.csr_matrix(np.ones((2, 2)) - np.eye(2))] * 2).tocsr()
    joined = _with_stored_zeros(two, [(1, 2)])
    delta = np.array([3.0, 0.0, 0.0, 0.0])
    with pytest.raises(DataError, match="infeasible"):
        check_feasible(joined, delta, np.ones(4))


# ------------------------------------------------------------------ disagreement_reweight


def test_disagreement_reweight_exact() -> None:
    rng = np.random.default_rng(23)
    adjacency = random_connected_graph(rng, 25, 30)
    labels = rng.integers(-1, 3, size=25)
    assert (labels == -1).sum() >= 3
    out = disagreement_reweight(adjacency, labels, 0.05)
    dense = adjacency.toarray()
    expected = dense.copy()
    for i in range(25):
        for j in range(25):
            if labels[i] >= 0 and labels[j] >= 0 and labels[i] != labels[j]:
                expected[i, j] *= 0.05
    np.testing.assert_allclose(out.toarray(), expected, rtol=1e-15)
    np.testing.assert_array_equal(out.toarray(), out.toarray().T)
    assert (out != adjacency).nnz > 0
    # -1 never counts: every edge touching an unknown node keeps its weight.
    unknown = labels == -1
    np.testing.assert_array_equal(out.toarray()[unknown], dense[unknown])
    np.testing.assert_array_equal(out.toarray()[:, unknown], dense[:, unknown])
    # Input untouched.
    np.testing.assert_array_equal(adjacency.toarray(), dense)


def test_disagreement_reweight_all_unknown_or_factor_one() -> None:
    rng = np.random.default_rng(24)
    adjacency = random_connected_graph(rng, 10, 5)
    same = disagreement_reweight(adjacency, -np.ones(10, np.int64), 0.01)
    assert (same != adjacency).nnz == 0
    labels = rng.integers(0, 3, size=10)
    one = disagreement_reweight(adjacency, labels, 1.0)
    assert sp.issparse(one) and one.format == "csr"
    assert (one != adjacency).nnz == 0
    one.data[:] = 123.0  # a copy, not a view of the input
    assert not np.any(adjacency.data == 123.0)


def test_disagreement_reweight_errors() -> None:
    adjacency = random_connected_graph(np.random.default_rng(25), 6, 2)
    with pytest.raises(DataError, match="5 labels for a graph of 6 nodes"):
        disagreement_reweight(adjacency, np.zeros(5, np.int64), 0.1)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match=r"factor must be in \(0, 1\]"):
            disagreement_reweight(adjacency, np.zeros(6, np.int64), bad)


# ------------------------------------------------------------------ stacked per-column systems


def random_masks(rng: np.random.Generator, n: int, columns: int) -> np.ndarray:
    """Saturated-set masks with overlaps between columns, one empty column and one full column."""
    mask = rng.random((n, columns)) < 0.4
    mask[:, 1] = False
    mask[:, -1] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stacked_blocks_are_the_per_column_submatrices(seed: int) -> None:
    from crossret.graph.diffusion import _stacked_blocks

    rng = np.random.default_rng(800 + seed)
    n, columns = 40, 4
    lap = laplacian(random_connected_graph(rng, n, 50))
    mask = random_masks(rng, n, columns)
    col, node = np.nonzero(mask.T)
    got = _stacked_blocks(lap, node, col, n)
    blocks = [lap[np.flatnonzero(mask[:, c])][:, np.flatnonzero(mask[:, c])] for c in range(columns)]
    expected = sp.block_diag([b for b in blocks if b.shape[0]]).toarray()
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), expected)


def test_laplacian_times_is_the_sparse_product() -> None:
    from crossret.graph.diffusion import _laplacian_times

    rng = np.random.default_rng(810)
    n, columns = 35, 5
    lap = laplacian(random_connected_graph(rng, n, 40))
    mask = random_masks(rng, n, columns)
    col, node = np.nonzero(mask.T)
    values = rng.uniform(0.1, 2.0, size=node.size)
    dense = np.zeros((n, columns))
    dense[node, col] = values
    np.testing.assert_allclose(_laplacian_times(lap, node, col, values, n, columns), lap @ dense, rtol=1e-13,
                               atol=1e-13)


def test_block_cg_solves_every_block() -> None:
    """Independent blocks (sizes 1, 0-rhs, 12, 30) reach ||r_b|| <= tol ||b_b|| each, = the direct solve."""
    from crossret.graph.diffusion import _block_cg, _stacked_blocks

    rng = np.random.default_rng(820)
    n, columns = 30, 4
    lap = laplacian(random_connected_graph(rng, n, 30))
    mask = np.zeros((n, columns), dtype=bool)
    mask[3, 0] = True  # a single unknown
    mask[rng.choice(n, 12, replace=False), 2] = True
    mask[:-1, 3] = True  # everything but one node: L_SS is still non-singular
    mask[rng.choice(n, 5, replace=False), 1] = True  # zero right-hand side below
    col, node = np.nonzero(mask.T)
    matrix = _stacked_blocks(lap, node, col, n)
    rhs = rng.normal(size=node.size)
    rhs[col == 1] = 0.0
    x, used = _block_cg(matrix, rhs, np.zeros(node.size), col, columns, 1e-13, 1000)
    assert 0 < used < 1000
    np.testing.assert_allclose(x, sp.linalg.spsolve(matrix.tocsc(), rhs), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(x[col == 1], 0.0)
    # a warm start at the solution needs no iteration
    _, again = _block_cg(matrix, rhs, x, col, columns, 1e-8, 1000)
    assert again == 0


def previous_active_set(adjacency: sp.csr_matrix, delta: np.ndarray, capacity: np.ndarray, tol: float,
                        cg_tol: float) -> tuple[np.ndarray, int, int]:
    """The active-set solver as it was before the per-column stacking: one masked CG over the union of
    saturated rows with all columns. Returns (potential, rounds, CG products)."""
    lap = laplacian(adjacency)
    degree = lap.diagonal()
    inv = np.where(degree > 0, 1 / np.where(degree > 0, degree, 1), 0)[:, None]
    threshold = tol * delta.sum(axis=0)
    rhs_full = delta - capacity[:, None]
    saturated = (rhs_full > 0) & (degree[:, None] > 0)
    x_all = np.zeros_like(delta)
    rounds = products = 0
    while True:
        rows = np.flatnonzero(saturated.any(axis=1))
        sub, m = lap[rows][:, rows], saturated[rows].astype(float)
        x, b = x_all[rows] * m, rhs_full[rows] * m
        r = b - (sub @ x) * m
        z = r * inv[rows]
        p, rz, goal = z.copy(), (r * z).sum(axis=0), cg_tol * np.sqrt((b * b).sum(axis=0))
        while not (np.sqrt((r * r).sum(axis=0)) <= goal).all():
            q = (sub @ p) * m
            pq = (p * q).sum(axis=0)
            alpha = np.divide(rz, pq, out=np.zeros_like(rz), where=pq > 0)
            x, r = x + alpha * p, r - alpha * q
            z = r * inv[rows]
            rz_new = (r * z).sum(axis=0)
            p = z + np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0) * p
            rz, products = rz_new, products + 1
        x_all[rows] = x
        np.maximum(x_all, 0, out=x_all)
        mass = delta - lap @ x_all
        if (np.maximum(mass - capacity[:, None], 0).sum(axis=0) <= threshold).all():
            return x_all, rounds, products
        violators = (mass > capacity[:, None] * (1 + 1e-12) + 1e-15) & ~saturated & (degree[:, None] > 0)
        if not violators.any():
            return x_all, rounds, products
        saturated |= violators
        rounds += 1


@pytest.mark.parametrize("seed", [0, 1])
def test_active_set_on_a_cross_domain_graph_matches_previous_solver(seed: int) -> None:
    """COUPLE's setting (graph from features, per-class seeds, T = degree, 6 classes): the stacked
    solver takes the previous solver's rounds and iterations to the same potentials (bit for bit), which satisfy the
    KKT conditions and strong duality in every column."""
    from crossret.graph import build_cross_domain_graph

    rng = np.random.default_rng(900 + seed)
    classes, ns, nt = 6, 300, 300
    centres = rng.normal(size=(classes, 8)) * 2
    ys, yt = rng.integers(0, classes, ns), rng.integers(0, classes, nt)
    fs = centres[ys] + rng.normal(size=(ns, 8))
    ft = centres[yt] + 0.5 + rng.normal(size=(nt, 8))
    graph = build_cross_domain_graph(fs, ys, ft, k_target=5, k_source=5)
    degree = graph.degree
    delta, _ = clip_to_feasible(graph.adjacency, class_seed_mass(degree, ns, ys, classes, 2.0), degree)
    result = l2_flow_diffusion_active_set(graph.adjacency, delta, degree, tol=1e-9, cg_tol=1e-12)
    old_x, old_rounds, old_products = previous_active_set(graph.adjacency, delta, degree, 1e-9, 1e-12)
    assert result.converged
    assert (result.passes, result.pushes) == (old_rounds, old_products)
    np.testing.assert_array_equal(result.potential, old_x)  # same arithmetic, summed in the same order
    # Optimality checked directly (the push solver needs >10⁴ passes through the few cross edges).
    for c in range(classes):
        single = FlowDiffusionResult(result.potential[:, c], result.mass[:, c], 0, True, result.excess[c:c + 1], 0)
        check_kkt(graph.adjacency, delta[:, c], degree, single, tol=1e-8)
    assert (result.potential[ns:] > 0).any(), "the diffusion must reach target nodes"
