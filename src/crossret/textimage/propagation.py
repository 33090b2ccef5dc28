"""GCKD graph-based multi-modal propagation (GMP; docs/gckd.md).

Reading chosen from docs/gckd.md (A3, A7, A8):

* **Nodes** — one *cross-modal, cross-domain* graph: the current batch's features of both modalities and
  both domains (student features, with gradient; or teacher features for the no-grad teacher pass)
  followed by all bank entries ``[M_v^s; M_t^s; M_v^t; M_t^t]`` (teacher features, no gradient).
  Images and texts share one graph because ITC has already aligned them in the 256-d space.
* **Edges** — cosine kNN over all nodes, ``K = 10`` by default, self-excluded, symmetrised
  ``A = max(A, Aᵀ)``; built without gradient and rebuilt at every call (the "dynamic" graph).
  Self-loops are added by the GCN normalisation ``Â = D^{-1/2}(A + I)D^{-1/2}`` (SAGE uses its root weight).
* **GNN** — two layers, 256→256→256: ``H¹ = ReLU(conv₁(X, A))``, dropout, ``H² = conv₂(H¹, A)``,
  ``z = norm(X + H²)`` (residual keeps the ITC space usable from step 0); GCNConv (default) or
  SAGEConv-mean from torch_geometric. Edges are binary (the dossier's weighted variant is not built).
* **Output** — the propagated features of the batch nodes only; the caller uses them for the target
  pseudo-similarity targets (teacher pass) and the optional source ITC on ``z`` (A8).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossret.errors import ConfigError, DataError
from crossret.extras import missing_extra

try:
    from torch_geometric.nn import GCNConv, SAGEConv
except ImportError as exc:  # the 'gckd' extra is not installed
    raise missing_extra("gckd", "torch_geometric.nn", exc) from exc


@torch.no_grad()
def knn_graph(features: Tensor, k: int = 10, *, chunk_size: int = 4096) -> Tensor:
    """Symmetric cosine kNN graph without self loops.

    ``features (N, D)`` → ``edge_index (2, E)`` int64, lexicographically sorted and duplicate-free, with
    ``(i, j) ∈ E ⇔ (j, i) ∈ E`` and ``i ≠ j``. Node ``i`` links to its ``min(k, N − 1)`` most
    cosine-similar other nodes (``S = X̂ X̂ᵀ`` with ``X̂`` row-normalised); the union with the reverse
    edges is the symmetrisation ``A = max(A, Aᵀ)``. Rows are processed ``chunk_size`` at a time so the
    ``N × N`` similarity matrix is never materialised whole. Ties are broken by ``torch.topk``.
    """
    if features.ndim != 2:
        raise DataError(f"knn_graph: features must be (N, D), got {tuple(features.shape)}")
    if int(k) <= 0:
        raise ConfigError(f"knn_graph: k={k} must be a positive integer")
    n = features.shape[0]
    k_eff = min(int(k), n - 1)
    device = features.device
    if k_eff <= 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    x = F.normalize(features.detach().float(), dim=-1)
    rows, cols = [], []
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        sim = x[start:stop] @ x.T
        local = torch.arange(stop - start, device=device)
        sim[local, local + start] = float("-inf")  # exclude self
        nbr = sim.topk(k_eff, dim=1).indices
        rows.append((local + start).unsqueeze(1).expand_as(nbr).reshape(-1))
        cols.append(nbr.reshape(-1))
    r, c = torch.cat(rows), torch.cat(cols)
    # Union with the reverse edges, then deduplicate via the linear key i·N + j (also sorts).
    keys = torch.unique(torch.cat([r * n + c, c * n + r]))
    return torch.stack([keys // n, keys % n])


class GraphPropagation(nn.Module):
    """Two-layer GNN over the batch ∪ memory kNN graph (docs/gckd.md, A7).

    ``forward(batch_feat (B, D), bank_feat (M, D) | None)`` → ``z (B, D)`` unit-norm, where
    ``X = [batch_feat; bank_feat.detach()]``, ``A = knn_graph(X, k)`` and
    ``z = norm(X + conv₂(dropout(ReLU(conv₁(X̃, A))), A))[:B]`` with ``X̃ = X + e_type`` when node-type
    embeddings are enabled (``num_node_types > 0``; the dossier's optional modality × domain tag) and
    ``X̃ = X`` otherwise. Gradients reach ``batch_feat`` and the GNN weights, never the bank.

    ``zero_init`` (default) zeroes the second layer's parameters, so that ``z = norm(X)`` at the start:
    the residual then really "keeps the ITC space usable from step 0" (docs/gckd.md) instead of adding
    a random 2-layer transform of ``X`` to it, which would corrupt the teacher's similarity targets
    until the GNN has been trained. The layer still gets gradients (its input ``H¹`` is non-zero).
    """

    def __init__(self, dim: int = 256, *, k: int = 10, conv: Literal["gcn", "sage"] = "gcn", dropout: float = 0.1,
                 num_node_types: int = 0, zero_init: bool = True) -> None:
        super().__init__()
        if conv not in ("gcn", "sage"):
            raise ConfigError(f"GraphPropagation: conv={conv!r}; use 'gcn' or 'sage'")
        if int(k) <= 0 or not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"GraphPropagation: need k > 0 and 0 <= dropout < 1, got k={k}, dropout={dropout}")
        self.dim, self.k, self.conv_type, self.dropout = int(dim), int(k), conv, float(dropout)
        if conv == "gcn":
            self.conv1: nn.Module = GCNConv(dim, dim)
            self.conv2: nn.Module = GCNConv(dim, dim)
        else:
            self.conv1 = SAGEConv(dim, dim, aggr="mean")
            self.conv2 = SAGEConv(dim, dim, aggr="mean")
        if zero_init:
            with torch.no_grad():
                for param in self.conv2.parameters():
                    param.zero_()
        self.type_embed = nn.Embedding(num_node_types, dim) if num_node_types > 0 else None
        if self.type_embed is not None:
            nn.init.normal_(self.type_embed.weight, std=0.02)

    def propagate(self, x: Tensor, edge_index: Tensor, node_type: Tensor | None = None) -> Tensor:
        """All-node propagation: ``x (N, D)``, ``edge_index (2, E)`` → ``norm(x + H²) (N, D)``."""
        h = x
        if self.type_embed is not None:
            if node_type is None:
                raise DataError("GraphPropagation: node_type (N,) is required when num_node_types > 0")
            h = h + self.type_embed(node_type)
        h = F.relu(self.conv1(h, edge_index))
        h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.conv2(h, edge_index)
        return F.normalize(x + h, dim=-1)

    def forward(self, batch_feat: Tensor, bank_feat: Tensor | None = None, *, node_type: Tensor | None = None,
                edge_index: Tensor | None = None) -> Tensor:
        """Propagated batch features ``(B, D)``; ``node_type (B + M,)`` only with node-type embeddings;
        ``edge_index`` overrides the kNN graph (e.g. one shared between calls)."""
        if batch_feat.ndim != 2 or batch_feat.shape[1] != self.dim:
            raise DataError(f"GraphPropagation: batch_feat must be (B, {self.dim}), got {tuple(batch_feat.shape)}")
        x = batch_feat.float()
        if bank_feat is not None and bank_feat.shape[0] > 0:
            x = torch.cat([x, bank_feat.detach().to(x)], dim=0)
        if edge_index is None:
            edge_index = knn_graph(x, self.k)
        return self.propagate(x, edge_index, node_type)[: batch_feat.shape[0]]
