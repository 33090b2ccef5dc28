"""COUPLE's cross-domain relationship graph (Luo et al., "Cross-Domain Diffusion with Progressive
Alignment for Efficient Adaptive Retrieval", IEEE TIP 2025).

Nodes are the source samples followed by the target (training) samples: node ``i < n_s`` is
source sample ``i``, node ``n_s + j`` is target sample ``j``. Edges:

* **cross-domain**: ``(s_i, t_j)`` when ``s_i`` is among the ``k`` nearest *source* samples of
  ``t_j`` **and** ``t_j`` among the ``k`` nearest *target* samples of ``s_i`` (mutual kNN across
  the domains, as COUPLE's paper defines it; the released code's one-directional, mis-indexed
  version is not reproduced);
* **intra-target**: mutual kNN inside the target;
* **intra-source**: same-label pairs, restricted to each class's ``k_source`` nearest neighbours
  (a class clique would make the graph quadratic in the class size; docs/couple.md), symmetrised
  by union — every such pair is correct by construction, so no mutuality is needed.

Weights are ``max(0, cos(f_a, f_b))`` on the given features (the current encoder features during
COUPLE training); edges of weight 0 are dropped. The adjacency is a symmetric ``scipy.sparse``
CSR matrix with an empty diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from crossret.errors import DataError
from crossret.graph.knn import KnnIndex, l2_normalize, mutual_pairs


@dataclass
class CrossDomainGraph:
    """A built graph: ``adjacency`` (n × n CSR, symmetric, non-negative) and its bookkeeping."""

    adjacency: sp.csr_matrix
    n_source: int
    n_target: int
    edge_counts: dict[str, int] = field(default_factory=dict)  # undirected edges by kind
    # Neighbourhood sizes actually searched: the requested k clipped to the rows available.
    # cross_source: source neighbours per target, min(k_cross, n_s); cross_target: target neighbours per
    # source, min(k_cross, n_t); target: min(k_target, n_t − 1); source: min(k_source, largest class − 1).
    k_used: dict[str, int] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return self.n_source + self.n_target

    @property
    def degree(self) -> np.ndarray:
        """Weighted degree ``deg(i) = Σ_j w_ij``, float64 ``(n,)``."""
        return np.asarray(self.adjacency.sum(axis=1)).ravel()

    def is_source(self) -> np.ndarray:
        mask = np.zeros(self.n_nodes, dtype=bool)
        mask[: self.n_source] = True
        return mask

    def target_nodes(self) -> np.ndarray:
        return np.arange(self.n_source, self.n_nodes)

    def summary(self) -> dict[str, float | int]:
        """Sizes for diagnostics: edges by kind, isolated nodes, targets without a cross edge."""
        adjacency = self.adjacency
        degree_count = np.diff(adjacency.indptr)
        source_neighbour = np.zeros(self.n_nodes, dtype=bool)
        coo = adjacency.tocoo()
        source_neighbour[coo.row[coo.col < self.n_source]] = True
        targets = slice(self.n_source, self.n_nodes)
        return {
            "nodes": self.n_nodes,
            **{f"edges_{kind}": int(count) for kind, count in self.edge_counts.items()},
            **{f"k_{kind}_used": int(k) for kind, k in self.k_used.items()},
            "isolated_nodes": int((degree_count == 0).sum()),
            "isolated_targets": int((degree_count[targets] == 0).sum()),
            "targets_with_cross_edge": int(source_neighbour[targets].sum()),
        }


def build_cross_domain_graph(
    source_features: np.ndarray,
    source_labels: np.ndarray,
    target_features: np.ndarray,
    *,
    k_cross: int = 3,
    k_target: int = 3,
    k_source: int = 3,
    knn: str = "exact",
) -> CrossDomainGraph:
    """Build the graph of the module docstring.

    Args:
        source_features: ``(n_s, d)``.
        source_labels: ``(n_s,)`` integer class ids (all known).
        target_features: ``(n_t, d)``.
        k_cross, k_target, k_source: neighbourhood sizes of the three edge kinds (COUPLE: 3);
            ``0`` switches a kind off.
        knn: ``exact`` | ``hnsw`` | ``ivf`` | ``auto`` neighbour search
            (:class:`~crossret.graph.knn.KnnIndex`; ``auto`` = exact up to 20,000 rows per searched
            database, ``ivf`` above). Exact search costs ``O(n² d)``, ``ivf`` about ``O(n (n/B + p·B) d)``
            with cells of ``B`` = 1,000 rows and ``p`` = 8 probes, i.e. near-linear up to millions of rows.

    Cost: one index per domain (the target index serves both the cross and the intra-target search)
    and one per source class; ``O((n_s + n_t) k)`` memory besides the features.

    Degenerate inputs (each a deliberate rule, tested in ``tests/test_numerical_robustness.py``):

    * NaN/inf features: :class:`DataError` naming the domain and the rows.
    * A ``k`` larger than the rows available is clipped (``k_used``, in :meth:`CrossDomainGraph.summary`);
      a domain of one sample has no intra-domain edges, a class of one sample no source edges.
    * Exactly-zero feature rows have cosine 0 with everything, hence no edges (isolated nodes); any other
      row is normalised whatever its scale. Identical rows (kNN ties) are ordered as faiss returns them,
      which is deterministic; all their edges have weight 1.
    * Isolated nodes are kept (degree 0): the diffusion gives them no mass, walks cannot leave them.
    """
    labels = np.asarray(source_labels)
    for name, value in (("k_cross", k_cross), ("k_target", k_target), ("k_source", k_source)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise DataError(f"graph: {name} must be an integer >= 0, got {value!r}")
    xs = l2_normalize(source_features, "source features")
    xt = l2_normalize(target_features, "target features")
    n_s, n_t = xs.shape[0], xt.shape[0]
    if n_s == 0 or n_t == 0:
        raise DataError(f"graph: both domains need samples (source {n_s}, target {n_t})")
    if xs.shape[1] != xt.shape[1]:
        raise DataError(f"graph: source features are {xs.shape[1]}-d but target features {xt.shape[1]}-d")
    if labels.shape != (n_s,) or labels.dtype.kind not in "iu" or (labels < 0).any():
        raise DataError("graph: source labels must be (n_source,) non-negative integers")
    largest_class = int(np.unique(labels, return_counts=True)[1].max())
    k_used = {"cross_source": int(min(k_cross, n_s)), "cross_target": int(min(k_cross, n_t)),
              "target": int(min(k_target, n_t - 1)), "source": int(min(k_source, largest_class - 1))}

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    counts: dict[str, int] = {}

    target_index = KnnIndex(xt, method=knn, normalized=True)  # searched twice, built once (lazily)
    # Cross-domain mutual kNN: node ids source i, target n_s + j.
    if k_cross > 0:
        # (n_t, k): source neighbours of targets; (n_s, k): target neighbours of sources
        _, t_to_s = KnnIndex(xs, method=knn, normalized=True).search(xt, k_cross, normalized=True)
        _, s_to_t = target_index.search(xs, k_cross, normalized=True)
        s_idx, t_idx = mutual_pairs(s_to_t, t_to_s, n_t)
        rows.append(s_idx)
        cols.append(n_s + t_idx)
        counts["cross"] = int(s_idx.size)
    else:
        counts["cross"] = 0

    # Intra-target mutual kNN (each undirected pair is found in both directions; keep i < j).
    if k_target > 0 and n_t > 1:
        _, t_to_t = target_index.search(xt, k_target, exclude_self=True, normalized=True)
        a, b = mutual_pairs(t_to_t, t_to_t, n_t)
        keep = a < b
        rows.append(n_s + a[keep])
        cols.append(n_s + b[keep])
        counts["target"] = int(keep.sum())
    else:
        counts["target"] = 0

    # Intra-source: kNN restricted to the same class, union-symmetrised.
    source_pairs = _same_label_knn_pairs(xs, labels, k_source, knn) if k_source > 0 else np.zeros((2, 0), np.int64)
    rows.append(source_pairs[0])
    cols.append(source_pairs[1])
    counts["source"] = int(source_pairs.shape[1])

    row = np.concatenate(rows)
    col = np.concatenate(cols)
    # Cosine weights computed per edge (no n × n matrix): rows are unit vectors.
    nodes = np.concatenate([xs, xt])
    weight = np.einsum("ij,ij->i", nodes[row], nodes[col]).astype(np.float64)
    positive = weight > 0
    for kind, start, stop in _kind_ranges(counts):
        counts[kind] = int(positive[start:stop].sum())
    row, col, weight = row[positive], col[positive], weight[positive]
    n = n_s + n_t
    upper = sp.coo_matrix((weight, (row, col)), shape=(n, n))
    adjacency = (upper + upper.T).tocsr()
    adjacency.sum_duplicates()
    adjacency.sort_indices()
    return CrossDomainGraph(adjacency=adjacency, n_source=n_s, n_target=n_t, edge_counts=counts, k_used=k_used)


def _kind_ranges(counts: dict[str, int]) -> list[tuple[str, int, int]]:
    start, out = 0, []
    for kind in ("cross", "target", "source"):
        out.append((kind, start, start + counts[kind]))
        start += counts[kind]
    return out


def _same_label_knn_pairs(xs: np.ndarray, labels: np.ndarray, k: int, knn: str = "exact") -> np.ndarray:
    """Unordered pairs ``(i < j)`` with ``y_i = y_j`` and one among the other's ``k`` same-class
    nearest neighbours; ``(2, E)`` int64, unique."""
    pairs = []
    # Rows grouped by class once (stable: members in index order), not one O(n) mask per class.
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if members.size < 2:
            continue
        x = xs[members]
        _, local = KnnIndex(x, method=knn, normalized=True).search(x, k, exclude_self=True, normalized=True)
        a = np.repeat(members, local.shape[1])
        b = members[local.reshape(-1)]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)]))
    if not pairs:
        return np.zeros((2, 0), np.int64)
    both = np.concatenate(pairs, axis=1).astype(np.int64)
    # Unique pairs in (i, j) lexicographic order via the 1-D key i·n + j (np.unique(axis=1) sorts
    # structured rows, which is slower).
    n = int(labels.size)
    key = np.unique(both[0] * n + both[1])
    return np.stack([key // n, key % n])
