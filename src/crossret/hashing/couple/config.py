"""COUPLE's options: :class:`CoupleConfig`, its defaults and its validation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossret.errors import ConfigError
from crossret.graph.knn import KNN_METHODS
from crossret.limits import check_threads

SELECTIONS = ("diffusion", "classifier")
SOLVERS = ("active-set", "push")
SELECT_RULES = ("top-ratio", "positive")
PAIRINGS = ("random-walk", "nearest")
GRAPH_FEATURES = ("encoder", "input", "both")
HIGH_MIXUP_LOSSES = ("mse", "soft-ce")
MIX_PAIRS = ("consecutive", "endpoints")
LABEL_REFINES = ("none", "centroids")


@dataclass
class CoupleConfig:
    """COUPLE options (defaults: the released code's settings unless noted; docs/couple.md).

    epochs, batch_size, target_batch_size, lr, weight_decay: Adam training; an epoch is one pass
        over the larger domain, the smaller one is cycled.
    encoder_dim, hash_hidden: network widths (``None`` → ``min(d, 1024)``; hash head hidden 1024).
    center_per_domain: centre each domain's inputs on *its own* training mean (source on the source
        mean; target-train, and every feature encoded with ``domain="target"``, on the target-train
        mean) instead of on the pooled mean: the domains' first moments are aligned before any
        learning (the input-level analogue of AdaBN). On by default, chosen on the development tasks
        (docs/couple.md). Encode the source database with ``encode(x, domain="source")``.
    warmup_epochs: epochs on the source losses only, before the first graph (features of an
        untrained encoder make a meaningless graph).
    graph_every: rebuild graph + diffusion every this many epochs after the warm-up.
    graph_features: ``encoder`` (current ``E(x)``, the paper's progressive reading), ``input``, or
        ``both``: ``[x/‖x‖, E(x)/‖E(x)‖]``, whose cosine is the mean of the two cosines (the input half
        does not depend on the seed, which steadies the first graphs).
    k_cross, k_target, k_source: neighbourhood sizes of the three edge kinds. The paper uses 3 for
        all; 3 / 10 / 10 were chosen on the development tasks (``benchmarks/couple_dev.py``): a
        denser graph *inside* each domain gives a cleaner selected set, while the cross-domain
        mutual-kNN edges stay as sparse as the paper's.
    knn: neighbour search, ``exact`` | ``ivf`` | ``hnsw`` | ``auto`` (exact up to 20,000 rows per searched
        database, ``ivf`` k-means cells above; docs/couple.md).
    selection: ``diffusion`` or ``classifier`` (ablation: softmax confidence instead).
    target_fill: seed mass beyond the seeds' capacity, as a multiple of a class's share of the
        target volume (see :func:`~crossret.graph.diffusion.class_seed_mass`).
    solver, diffusion_tol: ``active-set`` (exact, fast) or ``push`` (coordinate pushes); tolerance
        on the remaining excess relative to the seed mass.
    disagreement_weight: factor on edges whose endpoint (pseudo-)labels disagree (1 = off;
        ICLR 2024 uses 0.01–0.1); targets take the previous round's pseudo-labels.
    select_rule, select_ratio: ``top-ratio`` keeps the ``select_ratio`` most confident targets
        among those the diffusion reached; ``positive`` keeps every target with ``x > 0``.
    select_ratio_end: when set, the ratio grows linearly from ``select_ratio`` at the end of the
        warm-up to this value at the last epoch (a self-training curriculum; off).
    select_balance: with ``top-ratio``, keep the ``select_ratio`` most confident targets *of each
        pseudo-class* instead of overall, so that easy classes cannot fill the whole budget (on by
        default, chosen on the development tasks; the paper's code ranks all targets together).
    label_refine, refine_iterations: ``centroids`` refines every refresh's target pseudo-labels by
        spherical k-means on the target encoder features, started from those labels (SHOT / CAN,
        :func:`~crossret.hashing.pseudo_labels.refine_by_centroids`, at most ``refine_iterations``
        passes), and ranks targets for selection by the margin between their two nearest centroids
        instead of by diffusion potential; ``none`` (default) keeps the diffusion's labels. Opt-in: its
        gains on the development tasks were too small and too uneven to make it the default
        (docs/couple.md).
    select_agreement: only targets whose diffusion label equals the classifier's argmax may be
        selected (a co-training style filter; off).
    target_seed_weight: from the second refresh on, the previous round's selected targets also
        seed their pseudo-class with ``w · α · deg`` (α: the source seeds' multiplier), so the
        diffusion spreads inside the target domain from the already trusted targets (0 = off).
    coral_weight: weight of the CORAL term on the batch's encoder features,
        ``||Cov(f_s) − Cov(f_t)||_F² / (4e²)`` (Sun & Saenko, ECCV-W 2016); 0 = off (the paper).
    target_im_weight: weight of the information-maximisation term on every batch target,
        ``mean_i H(p_i) − H(mean_i p_i)`` (SHOT, Liang et al., ICML 2020); 0 = off (the paper).
    ce_weight, target_ce_weight, quant_weight, quant_source_ratio (ρ₂), relation_weight (λ₃),
        relation_source_ratio (ρ₃): loss weights.
    target_relation: include selected targets (by pseudo-label) in the semantic relation term.
    pairing: ``random-walk`` or ``nearest`` (ablation: 1-NN pairing in the batch, as the code).
    walk_length: maximum moves ``K`` of a walk.
    mixup_low, mixup_high, low_mixup_weight, high_mixup_weight, high_mixup_loss: the two Mixup
        levels (``mse`` on logits as the code, or ``soft-ce``).
    mix_start, mix_end: the fraction ``u_max`` of a path that mixing may reach, at the first and at
        the last epoch (the code's fixed 0.8/0.2 mix is ``u_max = 0.2`` on one-hop paths).
    mix_pairs: ``consecutive`` mixes two consecutive nodes of a walk at position ``u`` (see the module
        doc); ``endpoints`` mixes the walk's source start with the target it reached, ``λ = 1 − u``,
        ``u ~ U[0, u_max]``.
    high_mixup_detach: the high-level Mixup mixes *detached* encoder features, so only the classifier
        learns from it (the code); ``false`` lets its gradient reach the encoder.
    ema_decay: > 0 keeps an exponential moving average of the weights (mean teacher, Tarvainen &
        Valpola, NeurIPS 2017; ``torch.optim.swa_utils.AveragedModel`` with BatchNorm buffers), updated
        after every step; the graph refreshes and the final codes use it. 0 = off.
    num_threads: torch CPU threads (1 is fastest for these small networks, see source-only).
    """

    epochs: int = 70
    batch_size: int = 256
    target_batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 8e-6
    encoder_dim: int | None = None
    hash_hidden: int = 1024
    center_per_domain: bool = True
    warmup_epochs: int = 5
    graph_every: int = 5
    graph_features: str = "encoder"
    k_cross: int = 3
    k_target: int = 10
    k_source: int = 10
    knn: str = "auto"
    selection: str = "diffusion"
    target_fill: float = 3.0
    solver: str = "active-set"
    diffusion_tol: float = 1e-4
    disagreement_weight: float = 1.0
    select_rule: str = "top-ratio"
    select_ratio: float = 0.5
    select_ratio_end: float | None = None
    select_balance: bool = True
    select_agreement: bool = False
    label_refine: str = "none"
    refine_iterations: int = 10
    target_seed_weight: float = 0.0
    ce_weight: float = 1.0
    target_ce_weight: float = 1.0
    target_im_weight: float = 0.0
    coral_weight: float = 0.0
    quant_weight: float = 1.0
    quant_source_ratio: float = 0.5
    relation_weight: float = 100.0
    relation_source_ratio: float = 0.9
    target_relation: bool = True
    pairing: str = "random-walk"
    walk_length: int = 4
    mixup_low: bool = True
    mixup_high: bool = True
    low_mixup_weight: float = 0.1
    high_mixup_weight: float = 1.0
    high_mixup_loss: str = "mse"
    high_mixup_detach: bool = True
    mix_pairs: str = "consecutive"
    mix_start: float = 0.2
    mix_end: float = 0.5
    ema_decay: float = 0.0
    num_threads: int = 1

    def validate(self) -> CoupleConfig:
        """Check every option's type and range and their combinations; returns ``self``.

        The first bad option raises a :class:`~crossret.errors.ConfigError` naming it and what it must be.
        """
        self._check_integers()
        self._check_numbers()
        self._check_choices()
        return self

    def _check_integers(self) -> None:
        for key in ("epochs", "graph_every", "walk_length", "refine_iterations"):
            _integer(self, key, 1)
        for key in ("batch_size", "target_batch_size"):
            _integer(self, key, 2)
        for key in ("warmup_epochs", "k_cross", "k_target", "k_source", "hash_hidden", "num_threads"):
            _integer(self, key, 0)
        check_threads(self.num_threads, "couple: num_threads")
        if self.encoder_dim is not None:
            _integer(self, "encoder_dim", 1)

    def _check_numbers(self) -> None:
        for key in ("lr", "weight_decay", "target_fill", "ce_weight", "target_ce_weight", "target_im_weight",
                    "coral_weight", "quant_weight", "relation_weight", "low_mixup_weight", "high_mixup_weight"):
            _number(self, key)
        if self.lr <= 0:
            raise ConfigError(f"couple: lr must be > 0, got {self.lr!r}")
        for key in ("quant_source_ratio", "relation_source_ratio", "mix_start", "mix_end"):
            _number(self, key, 0.0, 1.0)
        _number(self, "select_ratio", 0.0, 1.0)
        if self.select_ratio_end is not None:
            _number(self, "select_ratio_end", 0.0, 1.0)
        _number(self, "target_seed_weight")
        _number(self, "ema_decay", 0.0, 0.99999)
        _number(self, "diffusion_tol", 1e-12, 1.0)
        _number(self, "disagreement_weight", 1e-6, 1.0)

    def _check_choices(self) -> None:
        for key, options in (("selection", SELECTIONS), ("solver", SOLVERS), ("select_rule", SELECT_RULES),
                             ("pairing", PAIRINGS), ("graph_features", GRAPH_FEATURES),
                             ("high_mixup_loss", HIGH_MIXUP_LOSSES), ("mix_pairs", MIX_PAIRS), ("knn", KNN_METHODS),
                             ("label_refine", LABEL_REFINES)):
            if getattr(self, key) not in options:
                raise ConfigError(f"couple: {key} must be one of {', '.join(options)}, got {getattr(self, key)!r}")
        for key in ("mixup_low", "mixup_high", "target_relation", "select_balance", "select_agreement",
                    "high_mixup_detach", "center_per_domain"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"couple: {key} must be true or false, got {getattr(self, key)!r}")
        if self.selection == "diffusion" and self.k_cross == 0:
            raise ConfigError("couple: selection=diffusion needs cross-domain edges (k_cross >= 1)")
        if self.label_refine != "none" and self.select_rule == "positive":
            raise ConfigError("couple: label_refine=centroids ranks targets by their centroid margin, which has "
                              "no sign to threshold; use select_rule=top-ratio with it")


def _integer(config: CoupleConfig, key: str, minimum: int) -> None:
    value = getattr(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"couple: {key} must be an integer >= {minimum}, got {value!r}")


def _number(config: CoupleConfig, key: str, low: float = 0.0, high: float = float("inf")) -> None:
    value = getattr(config, key)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value)
            or not low <= value <= high):
        raise ConfigError(f"couple: {key} must be a number in [{low}, {high}], got {value!r}")
