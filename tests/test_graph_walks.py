"""random_walks: paths follow edges, stop rules, padding, reproducibility, transition probabilities
w_vu / deg(v) (empirically), sinks, zero-weight edges and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import chisquare

from crossret.errors import DataError
from crossret.graph import Walks, random_walks

# ------------------------------------------------------------------ helpers


def random_graph(rng: np.random.Generator, n: int, extra: int, isolated: int = 0) -> sp.csr_matrix:
    """Connected weighted undirected graph on the first ``n`` nodes (spanning tree + ``extra`` edges,
    weights in [0.1, 3]) followed by ``isolated`` degree-0 nodes."""
    perm = rng.permutation(n)
    edges = {tuple(sorted((int(perm[i]), int(perm[rng.integers(0, i)])))) for i in range(1, n)}
    while len(edges) < n - 1 + extra:
        a, b = rng.choice(n, size=2, replace=False)
        edges.add((int(min(a, b)), int(max(a, b))))
    e = np.array(sorted(edges))
    w = rng.uniform(0.1, 3.0, size=e.shape[0])
    total = n + isolated
    upper = sp.coo_matrix((w, (e[:, 0], e[:, 1])), shape=(total, total))
    return (upper + upper.T).tocsr()


def check_walks(adjacency: sp.csr_matrix, walks: Walks, starts: np.ndarray, max_steps: int, stop: np.ndarray) -> None:
    """Every structural promise of :class:`Walks` for an undirected graph without sinks."""
    dense = adjacency.toarray()
    nodes, lengths, reached = walks.nodes, walks.lengths, walks.reached
    w = starts.size
    assert nodes.shape == (w, max_steps + 1) and nodes.dtype == np.int64
    assert lengths.shape == reached.shape == (w,)
    np.testing.assert_array_equal(nodes[:, 0], starts)
    assert ((lengths >= 0) & (lengths <= max_steps)).all()
    steps = np.arange(1, max_steps + 1)[None, :]
    moved = steps <= lengths[:, None]  # (w, max_steps): step s was a real move
    prev, nxt = nodes[:, :-1], nodes[:, 1:]
    # Each real move follows an edge of positive weight.
    assert (dense[prev[moved], nxt[moved]] > 0).all()
    # After the end, the row repeats the last node.
    last = nodes[np.arange(w), lengths]
    np.testing.assert_array_equal(nxt[~moved], np.broadcast_to(last[:, None], nxt.shape)[~moved])
    np.testing.assert_array_equal(walks.end, last)
    # Stops at the first stop node entered: no stop node strictly inside the walk.
    inside = steps < lengths[:, None]
    assert not stop[nxt[inside]].any()
    np.testing.assert_array_equal(reached, (lengths > 0) & stop[last])
    # Without sinks, a walk that can move and never reaches the stop set runs for max_steps.
    degree = dense.sum(axis=1)
    can_move = degree[starts] > 0
    assert (lengths[can_move & ~reached] == max_steps).all()
    assert (lengths[~can_move] == 0).all()


# ------------------------------------------------------------------ structure


@pytest.mark.parametrize(
    ("seed", "n", "extra", "max_steps", "stop_frac"),
    [(0, 30, 20, 12, 0.2), (1, 50, 5, 30, 0.05), (2, 10, 30, 5, 0.5), (3, 25, 10, 1, 0.3)],
)
def test_walks_follow_edges_and_stop(seed: int, n: int, extra: int, max_steps: int, stop_frac: float) -> None:
    rng = np.random.default_rng(seed)
    adjacency = random_graph(rng, n, extra, isolated=2)
    total = n + 2
    stop = rng.random(total) < stop_frac
    stop[rng.integers(0, n)] = True  # at least one reachable stop node
    starts = rng.integers(0, total, size=800)
    walks = random_walks(adjacency, starts, max_steps, np.random.default_rng(seed + 100), stop=stop)
    check_walks(adjacency, walks, starts, max_steps, stop)
    # The test exercises both outcomes (and isolated starts).
    assert walks.reached.any()
    if max_steps > 1:
        assert (~walks.reached & (walks.lengths == max_steps)).any()
    assert (walks.lengths == 0).any()


def test_walks_without_stop_run_to_max_steps() -> None:
    rng = np.random.default_rng(4)
    adjacency = random_graph(rng, 20, 10)
    starts = np.repeat(np.arange(20), 10)
    walks = random_walks(adjacency, starts, 15, np.random.default_rng(5))
    check_walks(adjacency, walks, starts, 15, np.zeros(20, bool))
    assert (walks.lengths == 15).all()
    assert not walks.reached.any()
    # stop=None is the same as an all-False mask, draw for draw.
    again = random_walks(adjacency, starts, 15, np.random.default_rng(5), stop=np.zeros(20, bool))
    np.testing.assert_array_equal(again.nodes, walks.nodes)


def test_isolated_start_has_length_zero() -> None:
    adjacency = random_graph(np.random.default_rng(6), 5, 2, isolated=1)
    starts = np.array([5, 5, 0])
    walks = random_walks(adjacency, starts, 4, np.random.default_rng(0), stop=np.ones(6, bool))
    np.testing.assert_array_equal(walks.lengths[:2], 0)
    np.testing.assert_array_equal(walks.nodes[:2], 5)
    assert not walks.reached[:2].any()
    # The walker from node 0 moves once and enters a stop node immediately.
    assert walks.lengths[2] == 1 and walks.reached[2]


def test_starting_in_a_stop_node_does_not_count() -> None:
    """Path 0 – 1 – 2 with stop = {0}: from 0 the first move is forced to 1, and the walk ends only
    when it comes back to 0."""
    upper = sp.coo_matrix(([1.0, 1.0], ([0, 1], [1, 2])), shape=(3, 3))
    adjacency = (upper + upper.T).tocsr()
    stop = np.array([True, False, False])
    walks = random_walks(adjacency, np.zeros(2000, np.int64), 6, np.random.default_rng(7), stop=stop)
    assert (walks.nodes[:, 1] == 1).all()
    assert (walks.lengths >= 2).all()
    assert (walks.lengths % 2 == 0).all()  # returns to 0 only after an even number of moves
    back_at_2 = walks.nodes[:, 2] == 0
    np.testing.assert_array_equal(walks.reached[back_at_2], True)
    np.testing.assert_array_equal(walks.lengths[back_at_2], 2)
    assert 0.45 < back_at_2.mean() < 0.55
    # Never reached: bounced between 1 and 2 all the way (0-1-2-1-2-1-2).
    never = ~walks.reached
    assert never.any()
    np.testing.assert_array_equal(walks.nodes[never], np.tile([0, 1, 2, 1, 2, 1, 2], (never.sum(), 1)))


def test_same_seed_same_walks() -> None:
    rng = np.random.default_rng(8)
    adjacency = random_graph(rng, 25, 15)
    stop = rng.random(25) < 0.2
    starts = rng.integers(0, 25, size=300)
    a = random_walks(adjacency, starts, 10, np.random.default_rng(42), stop=stop)
    b = random_walks(adjacency, starts, 10, np.random.default_rng(42), stop=stop)
    c = random_walks(adjacency, starts, 10, np.random.default_rng(43), stop=stop)
    np.testing.assert_array_equal(a.nodes, b.nodes)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.reached, b.reached)
    assert not np.array_equal(a.nodes, c.nodes)


def test_empty_starts() -> None:
    adjacency = random_graph(np.random.default_rng(9), 5, 2)
    walks = random_walks(adjacency, np.zeros(0, np.int64), 3, np.random.default_rng(0))
    assert walks.nodes.shape == (0, 4)
    assert walks.lengths.shape == walks.reached.shape == (0,)


# ------------------------------------------------------------------ transition probabilities


def test_one_step_distribution_matches_weights() -> None:
    """20000 walkers from one node: next-node frequencies ≈ w_vu / deg(v) (tolerance and chi-square)."""
    rng = np.random.default_rng(10)
    adjacency = random_graph(rng, 12, 40)
    dense = adjacency.toarray()
    for v in (0, 5, 11):
        nbrs = np.flatnonzero(dense[v])
        assert nbrs.size >= 3
        walks = random_walks(adjacency, np.full(20_000, v), 1, np.random.default_rng(100 + v))
        counts = np.bincount(walks.nodes[:, 1], minlength=12)
        assert counts[dense[v] == 0].sum() == 0
        p = dense[v, nbrs] / dense[v].sum()
        np.testing.assert_allclose(counts[nbrs] / 20_000, p, atol=0.02)
        assert chisquare(counts[nbrs], 20_000 * p).pvalue > 1e-4


def test_all_transitions_match_weights() -> None:
    """Transitions v -> u counted over every step of many walks agree with w_vu / deg(v) for every v."""
    rng = np.random.default_rng(11)
    n = 10
    adjacency = random_graph(rng, n, 15)
    dense = adjacency.toarray()
    prob = dense / dense.sum(axis=1, keepdims=True)
    starts = rng.integers(0, n, size=20_000)
    walks = random_walks(adjacency, starts, 4, np.random.default_rng(12))
    counts = np.zeros((n, n))
    np.add.at(counts, (walks.nodes[:, :-1].ravel(), walks.nodes[:, 1:].ravel()), 1)
    out = counts.sum(axis=1)
    assert (out > 2000).all()
    np.testing.assert_allclose(counts / out[:, None], prob, atol=0.02)
    for v in range(n):
        nbrs = np.flatnonzero(dense[v])
        assert counts[v, dense[v] == 0].sum() == 0
        if nbrs.size > 1:
            assert chisquare(counts[v, nbrs], out[v] * prob[v, nbrs]).pvalue > 1e-4


def test_zero_weight_edges_are_never_taken() -> None:
    """Stored zero weights at the start, middle and end of a row carry no probability."""
    row = np.array([0, 0, 0, 0, 0, 1, 2, 3, 4])
    col = np.array([1, 2, 3, 4, 5, 0, 0, 0, 0])
    w = np.array([0.0, 1.0, 0.0, 3.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adjacency = sp.csr_matrix((w, (row, col)), shape=(6, 6))
    assert adjacency.nnz == 9
    walks = random_walks(adjacency, np.zeros(20_000, np.int64), 1, np.random.default_rng(13))
    counts = np.bincount(walks.nodes[:, 1], minlength=6)
    assert counts[[1, 3, 5]].sum() == 0
    assert counts[2] / 20_000 == pytest.approx(0.25, abs=0.02)


def test_directed_graph_and_sinks() -> None:
    """Rows are out-edges (need not be symmetric); entering a node without out-edges ends the walk."""
    # 0 -> 1 (3), 0 -> 2 (1), 1 -> 0 (1); node 2 is a sink.
    adjacency = sp.csr_matrix(([3.0, 1.0, 1.0], ([0, 0, 1], [1, 2, 0])), shape=(3, 3))
    walks = random_walks(adjacency, np.zeros(20_000, np.int64), 8, np.random.default_rng(14))
    first = walks.nodes[:, 1]
    assert (first == 1).mean() == pytest.approx(0.75, abs=0.02)
    sunk = walks.end == 2
    assert sunk.any() and (~sunk).any()
    assert not walks.reached.any()
    # A walk ends on its first visit to 2, at an odd step (0 -> 1 -> 0 ... -> 2), then repeats 2.
    assert (walks.lengths[sunk] % 2 == 1).all()
    for i in np.flatnonzero(sunk)[:200]:
        length = walks.lengths[i]
        assert (walks.nodes[i, :length] != 2).all()
        assert (walks.nodes[i, length:] == 2).all()
    assert (walks.lengths[~sunk] == 8).all()
    # Walks that never sink alternate 0, 1, 0, 1, ...
    np.testing.assert_array_equal(walks.nodes[~sunk][:, ::2], 0)
    np.testing.assert_array_equal(walks.nodes[~sunk][:, 1::2], 1)


# ------------------------------------------------------------------ errors


def _graph() -> sp.csr_matrix:
    return random_graph(np.random.default_rng(15), 6, 3)


@pytest.mark.parametrize("starts", [[0, -1], [6], [0, 1, 100]])
def test_bad_starts(starts: list[int]) -> None:
    with pytest.raises(DataError, match=r"start nodes must be in \[0, 6\)"):
        random_walks(_graph(), np.array(starts), 3, np.random.default_rng(0))


@pytest.mark.parametrize("max_steps", [0, -2, 1.5, None, "3"])
def test_bad_max_steps(max_steps: object) -> None:
    with pytest.raises(DataError, match="max_steps must be a positive integer"):
        random_walks(_graph(), np.array([0]), max_steps, np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("stop", [np.zeros(5, bool), np.zeros((6, 1), bool), np.zeros(7, bool)])
def test_bad_stop_mask(stop: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"stop mask must have shape \(6,\)"):
        random_walks(_graph(), np.array([0]), 3, np.random.default_rng(0), stop=stop)


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_bad_weights(bad: float) -> None:
    adjacency = _graph().copy()
    adjacency.data[2] = bad
    with pytest.raises(DataError, match="finite and >= 0"):
        random_walks(adjacency, np.array([0]), 3, np.random.default_rng(0))


def test_non_square_adjacency_is_rejected() -> None:
    adjacency = sp.csr_matrix(np.array([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0.0]]))
    with pytest.raises(DataError):
        random_walks(adjacency, np.array([0, 0, 0, 0, 0, 0, 0, 0]), 3, np.random.default_rng(0))
