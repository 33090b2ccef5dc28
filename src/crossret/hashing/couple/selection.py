"""COUPLE's graph refresh: graph → ℓ2 flow diffusion → the low-noise target set (Luo et al., IEEE TIP 2025,
§3.1–3.2).

Every ``graph_every`` epochs the current network encodes source ∪ target-train; the cross-domain graph
is built on those features (:mod:`crossret.graph.cross_domain`), one ℓ2 flow diffusion per class is
seeded on that class's source nodes with ``Δ = α·deg`` and capacities ``T = deg``
(:mod:`crossret.graph.diffusion`), and each target takes the class whose diffusion saturates it. The
most confident targets form the :class:`Selection` the training steps use. Everything after the
encoding is numpy / scipy on the CPU, whatever the network's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from crossret.graph.cross_domain import CrossDomainGraph, build_cross_domain_graph
from crossret.graph.diffusion import (
    FlowDiffusionResult,
    class_seed_mass,
    clip_to_feasible,
    disagreement_reweight,
    l2_flow_diffusion,
    l2_flow_diffusion_active_set,
)
from crossret.graph.knn import l2_normalize
from crossret.hashing.couple.config import CoupleConfig
from crossret.hashing.deep import ENCODE_BATCH
from crossret.hashing.networks import HashNet
from crossret.hashing.pseudo_labels import refine_by_centroids


@dataclass
class Selection:
    """The current low-noise target set (from the last graph refresh)."""

    pseudo_labels: np.ndarray  # (n_t,) int64, for every target (classifier argmax where unreached)
    selected: np.ndarray  # (n_t,) bool
    graph: sp.csr_matrix | None  # adjacency the walks use


@dataclass
class _Ranking:
    """Per-target pseudo-labels, confidences and who may be selected, before the selection."""

    labels: np.ndarray  # (n_t,) int64
    score: np.ndarray  # (n_t,) float, higher is more confident; -inf where the diffusion did not reach
    candidates: np.ndarray  # (n_t,) bool


@torch.no_grad()
def refresh(cfg: CoupleConfig, net: HashNet, x_all: torch.Tensor, source_labels: np.ndarray, n_s: int,
            num_classes: int, previous: Selection | None, ratio: float) -> tuple[Selection, dict[str, Any]]:
    """Rebuild the graph on the current features, diffuse, and select the low-noise targets.

    ``x_all (n_s + n_t, d)``: the network's inputs, source rows first; ``previous``: the last refresh's
    selection (disagreement reweighting and progressive seeding read it); ``ratio``: the share of targets
    to select. Returns the selection and the refresh's diagnostics.
    """
    started = time.perf_counter()
    encoded, probs = _encode(net, x_all, n_s)
    classifier_labels = probs.argmax(axis=1).astype(np.int64)
    graph_input = _graph_input(cfg.graph_features, x_all, encoded)
    n_t = x_all.shape[0] - n_s
    info: dict[str, Any] = {}

    graph: CrossDomainGraph | None = None
    if cfg.selection == "diffusion" or cfg.pairing == "random-walk":
        graph = build_cross_domain_graph(graph_input[:n_s], source_labels, graph_input[n_s:],
                                         k_cross=cfg.k_cross, k_target=cfg.k_target, k_source=cfg.k_source,
                                         knn=cfg.knn)
        info.update({f"graph_{k}": v for k, v in graph.summary().items()})

    if cfg.selection == "diffusion":
        assert graph is not None
        ranking = _diffusion_ranking(cfg, graph.adjacency, source_labels, n_s, num_classes, previous,
                                     classifier_labels, info)
    else:
        ranking = _Ranking(classifier_labels, probs.max(axis=1), np.ones(n_t, dtype=bool))

    labels, selected = _select(cfg, ranking, encoded[n_s:], classifier_labels, num_classes, ratio, info)
    info["selected"] = int(selected.sum())
    info["refresh_seconds"] = round(time.perf_counter() - started, 4)
    return Selection(labels, selected, graph.adjacency if graph is not None else None), info


def _encode(net: HashNet, x_all: torch.Tensor, n_s: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features ``(n, e)`` of every node and the targets' class probabilities ``(n_t, C)``, on
    the CPU, from ``net`` in eval mode (its training mode is restored)."""
    was_training = net.training
    net.eval()
    features, logits = [], []
    for lo in range(0, x_all.shape[0], ENCODE_BATCH):
        out = net(x_all[lo:lo + ENCODE_BATCH])
        features.append(out.features.cpu())
        logits.append(out.logits.cpu())
    net.train(was_training)
    encoded = torch.cat(features).numpy()
    probs = torch.softmax(torch.cat(logits)[n_s:], dim=1).numpy()
    return encoded, probs


def _graph_input(graph_features: str, x_all: torch.Tensor, encoded: np.ndarray) -> np.ndarray:
    """The rows the graph is built on: encoder features, inputs, or both side by side as unit vectors
    (whose cosine is then the mean of the two cosines)."""
    if graph_features == "encoder":
        return encoded
    if graph_features == "input":
        return x_all.cpu().numpy()
    return np.concatenate(
        [l2_normalize(x_all.cpu().numpy(), "inputs"), l2_normalize(encoded, "encoder features")], axis=1)


def _diffusion_ranking(cfg: CoupleConfig, adjacency: sp.csr_matrix, source_labels: np.ndarray, n_s: int,
                       num_classes: int, previous: Selection | None, classifier_labels: np.ndarray,
                       info: dict[str, Any]) -> _Ranking:
    """Targets ranked by one ℓ2 flow diffusion per class (docs/couple.md, "What runs"); adds its diagnostics
    to ``info``.

    A target's label is the class whose diffusion saturates it (largest potential ``x``, else largest
    mass); its confidence is ``1 + x`` when saturated, else the fill ratio ``mass / deg``. Targets no
    mass reached keep the classifier's label and cannot be selected.
    """
    if cfg.disagreement_weight < 1 and previous is not None:
        node_labels = np.concatenate([source_labels, previous.pseudo_labels])
        adjacency = disagreement_reweight(adjacency, node_labels, cfg.disagreement_weight)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    seed = _seed_mass(cfg, degree, source_labels, n_s, num_classes, previous)
    seed, clipped = clip_to_feasible(adjacency, seed, degree)
    result = _diffuse(cfg, adjacency, seed, degree)
    potential, mass = result.potential[n_s:], result.mass[n_s:]
    floor = 1e-12 * max(float(degree.max(initial=0.0)), 1.0)  # less mass than this is no mass
    reached = mass.max(axis=1) > floor
    saturated = potential.max(axis=1) > 0
    labels = np.where(saturated, potential.argmax(axis=1), mass.argmax(axis=1))
    labels = np.where(reached, labels, classifier_labels).astype(np.int64)
    # Confidence: the winning class's potential (saturated targets), then its fill ratio.
    fill = mass.max(axis=1) / np.maximum(degree[n_s:], np.finfo(float).tiny)
    score = np.where(saturated, 1.0 + potential.max(axis=1), fill)
    score = np.where(reached, score, -np.inf)
    candidates = saturated if cfg.select_rule == "positive" else reached
    seed_total = float(seed.sum())
    info.update({
        "diffusion_rounds": int(result.passes),
        "diffusion_converged": bool(result.converged),
        "diffusion_clipped_components": int(clipped),
        "diffusion_mass_to_target": round(float(mass.sum()) / seed_total, 6) if seed_total > 0 else 0.0,
        "targets_reached": int(reached.sum()),
        # Seeded classes none of whose mass reached a target (no path from their sources to a
        # target node): their (clipped) mass stays on source nodes and they label no target.
        "diffusion_classes_without_target": int(((seed.sum(axis=0) > 0) & ~(mass > floor).any(axis=0)).sum()),
        "targets_saturated": int(saturated.sum()),
        "classifier_agreement": round(float((labels[reached] == classifier_labels[reached]).mean()), 6)
        if reached.any() else None,
    })
    return _Ranking(labels, score, candidates)


def _seed_mass(cfg: CoupleConfig, degree: np.ndarray, source_labels: np.ndarray, n_s: int, num_classes: int,
               previous: Selection | None) -> np.ndarray:
    """Seed mass ``(n, C)``: ``α·deg`` on each class's source nodes, plus, with ``target_seed_weight``
    ``w``, ``w·α·deg`` on the previous round's selected targets in their pseudo-class."""
    seed = class_seed_mass(degree, n_s, source_labels, num_classes, cfg.target_fill)
    if cfg.target_seed_weight > 0 and previous is not None and previous.selected.any():
        # Progressive seeding: last round's selected targets also seed their pseudo-class.
        alpha = float(seed[:n_s].sum() / max(degree[:n_s].sum(), np.finfo(float).tiny))
        chosen = np.flatnonzero(previous.selected)
        seed[n_s + chosen, previous.pseudo_labels[chosen]] = (cfg.target_seed_weight * alpha
                                                             * degree[n_s + chosen])
    return seed


def _diffuse(cfg: CoupleConfig, adjacency: sp.csr_matrix, seed: np.ndarray, degree: np.ndarray) -> FlowDiffusionResult:
    """The per-class ℓ2 flow diffusions of ``seed``, by the configured solver."""
    if cfg.solver == "active-set":
        # Inner CG to 1e-2 of the outer tolerance: the labels and the ranking need no more, and it
        # saves CG products.
        return l2_flow_diffusion_active_set(adjacency, seed, degree, tol=cfg.diffusion_tol,
                                            cg_tol=cfg.diffusion_tol / 100)
    return l2_flow_diffusion(adjacency, seed, degree, tol=cfg.diffusion_tol)


def _select(cfg: CoupleConfig, ranking: _Ranking, target_features: np.ndarray, classifier_labels: np.ndarray,
            num_classes: int, ratio: float, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Final pseudo-labels ``(n_t,)`` and the selected mask ``(n_t,)``: optional centroid refinement
    (SHOT / CAN), the agreement filter, then the top ``ratio`` (per pseudo-class with ``select_balance``)."""
    labels, score, candidates = ranking.labels, ranking.score, ranking.candidates
    if cfg.label_refine == "centroids":
        refined = refine_by_centroids(target_features, labels, num_classes, cfg.refine_iterations)
        info.update({"refine_changed": int((refined.labels != labels).sum()),
                     "refine_iterations": refined.iterations, "refine_converged": refined.converged})
        labels, score, candidates = refined.labels, refined.margin, np.ones(labels.shape[0], dtype=bool)
    if cfg.select_agreement:
        candidates = candidates & (labels == classifier_labels)
    if cfg.selection == "diffusion" and cfg.select_rule == "positive":
        selected = candidates.copy()
    else:
        selected = select_top(score, candidates, labels if cfg.select_balance else None, ratio)
    return labels, selected


def select_top(score: np.ndarray, candidates: np.ndarray, groups: np.ndarray | None, ratio: float) -> np.ndarray:
    """The ``ratio`` share of the targets with the highest ``score`` among ``candidates``.

    With ``groups`` (pseudo-labels) the share is taken within each group, so a group of ``n_c``
    targets keeps at most ``round(ratio * n_c)`` of its candidates. Ties break by index.
    """
    n = score.shape[0]
    order = np.lexsort((np.arange(n), -score))  # confidence, then index: deterministic
    order = order[candidates[order]]
    selected = np.zeros(n, dtype=bool)
    if groups is None:
        selected[order[:min(round(ratio * n), order.size)]] = True
        return selected
    group_of = groups[order]
    # rank of each candidate inside its group, in confidence order
    counts = np.bincount(groups)
    budget = np.round(ratio * counts).astype(np.int64)
    sort_by_group = np.argsort(group_of, kind="stable")
    starts = np.searchsorted(group_of[sort_by_group], group_of[sort_by_group])
    rank = np.empty(order.size, dtype=np.int64)
    rank[sort_by_group] = np.arange(order.size) - starts
    selected[order[rank < budget[group_of]]] = True
    return selected
