"""COUPLE: cross-domain diffusion with progressive alignment (Luo et al., IEEE TIP 2025).

The method as the paper describes it, not as its released code runs (docs/couple.md lists the
differences we do not reproduce). Every few epochs (``graph_every``, :mod:`~crossret.hashing.couple.selection`):

1. **Graph** (:mod:`crossret.graph.cross_domain`) on the current encoder features ``f = E(x)`` of
   source ∪ target-train: mutual-kNN cross-domain and intra-target edges, same-label kNN source
   edges, ``max(0, cos)`` weights.
2. **ℓ2 flow diffusion** (:mod:`crossret.graph.diffusion`), one per class, seeded on that class's
   source nodes with ``Δ = α·deg`` and capacities ``T = deg`` (§3.2 A). A target's pseudo-label is
   the class whose diffusion saturates it (largest potential ``x``, else largest mass); its
   confidence is that potential. The ``select_ratio`` most confident reached targets (or those
   with ``x > 0``) form the low-noise set. Optionally edges whose endpoint labels disagree are
   down-weighted first (noisy-label flow diffusion, ICLR 2024).

Each step (``batch_size`` source + ``target_batch_size`` target samples, :mod:`~crossret.hashing.couple.terms`),
with ``h = H(f)``:

* ``L_ce  = CE(Cl(f_s), y_s) + CE(Cl(f_t), ŷ_t)`` — the target term averaged over selected targets
  only (the released code divides by the whole batch; §7.11);
* ``L_q   = ρ₂ MSE(h_s, sign h_s) + (1 − ρ₂) MSE(h_t, sign h_t)``;
* ``L_rel = ρ₃ MSE(relu(cos(h_i, h_j)), 1.1 S_ij) + (1 − ρ₃) MSE(cos(f_s, f_t), relu(cos(h_s, h_t)))``
  where ``S`` covers source pairs and, with ``target_relation``, selected targets by pseudo-label;
* ``L_mix`` — hierarchical Mixup along cross-domain random walks (§3.4): walks start at the batch's
  source nodes (transition ∝ weight) and stop at the first target node (≤ ``walk_length`` moves);
  walks ending in a selected target give a mixed sample at a random position ``u`` along the path
  — between path nodes ``a = v_k`` and ``b = v_{k+1}``, ``λ = 1 − (u − k)`` — with the soft label
  ``λ y_a + (1 − λ) y_b``. ``u`` is drawn from ``[0, u_max]·len`` and ``u_max`` grows linearly from
  ``mix_start`` to ``mix_end`` over training: samples move progressively from source to target.
  *Low level*: inputs ``λ x_a + (1 − λ) x_b`` through the whole network; *high level*: encoder
  features ``λ f_a + (1 − λ) f_b`` (detached) through the classifier.

``L = w_ce L_ce + w_q L_q + w_rel L_rel + w_low L_low + w_high L_high``; defaults follow the paper's
code (Adam 1e-4, wd 8e-6, 256 + 256, 70 epochs, k = 3, top 50 %, λ₃ = 100, ρ₂ = 0.5, ρ₃ = 0.9,
0.1 low-level weight; :class:`CoupleConfig` notes where crossret differs). Codes are ``sign(H(E(x)))``.

Ablation switches: ``selection="classifier"`` (no diffusion: classifier confidence picks the set),
``pairing="nearest"`` (no walks: each selected batch target is mixed with its nearest batch
source, as the released code), ``mixup_low`` / ``mixup_high``, ``target_ce_weight=0``.

Training checkpoints after every epoch into ``checkpoint_dir`` (when set) and resumes from it with
``resume=True`` (:mod:`~crossret.hashing.couple.checkpoint`): network, optimiser, both random
generators, graph and selection are restored, so a resumed run gives bit-identical codes on CPU.

``method.to("cuda")`` trains on a GPU (see :mod:`crossret.hashing.deep`): the network, the batches,
the losses and the Mixup inputs live there; the graph, the diffusion, the walks and every random draw
stay on the CPU, so a seed picks the same batches and walks on every device.

Under ``torchrun`` (docs/distributed.md) every rank draws the same global batch, runs the network on
its shard (BatchNorm over the global batch), gathers the outputs with gradient and computes the losses
above on the global batch; gradients are averaged over ranks. The graph and the diffusion run on rank
0, whose selection is broadcast; rank 0 writes the checkpoints. Data-parallel training runs on CPU
processes (gloo); a GPU device is refused there.
"""

from __future__ import annotations

# The underscore names are the former module's private ones, still imported by tests and benchmarks.
from crossret.hashing.couple.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    read_checkpoint,
)
from crossret.hashing.couple.checkpoint import data_fingerprint as _data_fingerprint  # noqa: F401
from crossret.hashing.couple.config import (
    GRAPH_FEATURES,
    HIGH_MIXUP_LOSSES,
    LABEL_REFINES,
    MIX_PAIRS,
    PAIRINGS,
    SELECT_RULES,
    SELECTIONS,
    SOLVERS,
    CoupleConfig,
)
from crossret.hashing.couple.method import Couple
from crossret.hashing.couple.selection import Selection
from crossret.hashing.couple.selection import Selection as _Selection  # noqa: F401
from crossret.hashing.couple.selection import select_top as _select_top  # noqa: F401
from crossret.hashing.couple.terms import coral as _coral  # noqa: F401
from crossret.hashing.couple.terms import information_maximisation as _information_maximisation  # noqa: F401

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "GRAPH_FEATURES",
    "HIGH_MIXUP_LOSSES",
    "LABEL_REFINES",
    "MIX_PAIRS",
    "PAIRINGS",
    "SELECTIONS",
    "SELECT_RULES",
    "SOLVERS",
    "Couple",
    "CoupleConfig",
    "Selection",
    "read_checkpoint",
]
