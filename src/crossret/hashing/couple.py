"""COUPLE: cross-domain diffusion with progressive alignment (Luo et al., IEEE TIP 2025).

The method as the paper describes it (couple.md §2–3), not as its released code runs (§8 lists the
bugs we do not reproduce). Every few epochs (``graph_every``):

1. **Graph** (:mod:`crossret.graph.cross_domain`) on the current encoder features ``f = E(x)`` of
   source ∪ target-train: mutual-kNN cross-domain and intra-target edges, same-label kNN source
   edges, ``max(0, cos)`` weights.
2. **ℓ2 flow diffusion** (:mod:`crossret.graph.diffusion`), one per class, seeded on that class's
   source nodes with ``Δ = α·deg`` and capacities ``T = deg`` (§3.2 A). A target's pseudo-label is
   the class whose diffusion saturates it (largest potential ``x``, else largest mass); its
   confidence is that potential. The ``select_ratio`` most confident reached targets (or those
   with ``x > 0``) form the low-noise set. Optionally edges whose endpoint labels disagree are
   down-weighted first (noisy-label flow diffusion, ICLR 2024).

Each step (``batch_size`` source + ``target_batch_size`` target samples), with ``h = H(f)``:

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
0.1 low-level weight). Codes are ``sign(H(E(x)))``.

Ablation switches: ``selection="classifier"`` (no diffusion: classifier confidence picks the set),
``pairing="nearest"`` (no walks: each selected batch target is mixed with its nearest batch
source, as the released code), ``mixup_low`` / ``mixup_high``, ``target_ce_weight=0``.

Training checkpoints after every epoch into ``checkpoint_dir`` (when set) and resumes from it with
``resume=True``: network, optimiser, both random generators, graph and selection are restored, so
a resumed run gives bit-identical codes on CPU.

``method.to("cuda")`` trains on a GPU (see :mod:`crossret.hashing._hashnet`): the network, the batches,
the losses and the Mixup inputs live there; the graph, the diffusion, the walks and every random draw
stay on the CPU, so a seed picks the same batches and walks on every device.

Under ``torchrun`` (docs/distributed.md) every rank draws the same global batch, runs the network on
its shard (BatchNorm over the global batch), gathers the outputs with gradient and computes the losses
above on the global batch; gradients are averaged over ranks. The graph and the diffusion run on rank
0, whose selection is broadcast; rank 0 writes the checkpoints. Data-parallel training runs on CPU
processes (gloo); a GPU device is refused there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from crossret import distributed
from crossret._sealed import load_torch, save_torch
from crossret.data.domain import Domain, class_count
from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.graph.cross_domain import CrossDomainGraph, build_cross_domain_graph
from crossret.graph.diffusion import (
    class_seed_mass,
    clip_to_feasible,
    disagreement_reweight,
    l2_flow_diffusion,
    l2_flow_diffusion_active_set,
)
from crossret.graph.knn import KNN_METHODS, l2_normalize
from crossret.graph.walks import random_walks
from crossret.hashing._hashnet import ENCODE_BATCH, HashNetMethod, cpu_state, rng_devices
from crossret.hashing.base import ProgressFn, no_progress, register
from crossret.hashing.networks import (
    HashNet,
    HashNetOutput,
    check_finite_loss,
    check_finite_network,
    quantization_loss,
    torch_threads,
)
from crossret.hashing.preprocessing import FeatureNormalizer, bit_balance, fit_per_domain
from crossret.hashing.pseudo_labels import refine_by_centroids
from crossret.limits import check_memory, check_threads

CHECKPOINT_FORMAT = "crossret.couple.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A COUPLE checkpoint's payload ``{"header": json, "model", "optimizer", "arrays"}``, read safely: the
    sealed container's kind, version, size and SHA-256 are verified, then ``torch.load(weights_only=True)``.
    Damaged or foreign files raise :class:`~crossret.errors.FileFormatError` naming the file."""
    payload = load_torch(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "COUPLE checkpoint")
    if not isinstance(payload, dict):
        raise FileFormatError(f"{path}: not a COUPLE checkpoint (the payload is a {type(payload).__name__})")
    return payload

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
    """COUPLE options (defaults: couple.md §4.6 unless noted).

    epochs, batch_size, target_batch_size, lr, weight_decay: Adam training; an epoch is one pass
        over the larger domain, the smaller one is cycled.
    encoder_dim, hash_hidden: network widths (``None`` → ``min(d, 1024)``; hash head hidden 1024).
    center_per_domain: centre each domain's inputs on *its own* training mean (source on the source
        mean; target-train, and every feature encoded with ``domain="target"``, on the target-train
        mean) instead of on the pooled mean: the domains' first moments are aligned before any
        learning (the input-level analogue of AdaBN). On by default, chosen on the development tasks
        (8 seeds, paired Δ MAP +8.3 / −0.1 / +4.0 on dev-m2opt / dev-u2opt / dev-m200opt; neutral on the
        reported benchmarks, docs/couple.md). Encode the source database with ``encode(x, domain="source")``.
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
        def integer(key: str, minimum: int) -> None:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"couple: {key} must be an integer >= {minimum}, got {value!r}")

        def number(key: str, low: float = 0.0, high: float = float("inf")) -> None:
            value = getattr(self, key)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value)
                    or not low <= value <= high):
                raise ConfigError(f"couple: {key} must be a number in [{low}, {high}], got {value!r}")

        def choice(key: str, options: tuple[str, ...]) -> None:
            if getattr(self, key) not in options:
                raise ConfigError(f"couple: {key} must be one of {', '.join(options)}, got {getattr(self, key)!r}")

        for key in ("epochs", "graph_every", "walk_length", "refine_iterations"):
            integer(key, 1)
        for key in ("batch_size", "target_batch_size"):
            integer(key, 2)
        for key in ("warmup_epochs", "k_cross", "k_target", "k_source", "hash_hidden", "num_threads"):
            integer(key, 0)
        check_threads(self.num_threads, "couple: num_threads")
        if self.encoder_dim is not None:
            integer("encoder_dim", 1)
        for key in ("lr", "weight_decay", "target_fill", "ce_weight", "target_ce_weight", "target_im_weight",
                    "coral_weight", "quant_weight", "relation_weight", "low_mixup_weight", "high_mixup_weight"):
            number(key)
        if self.lr <= 0:
            raise ConfigError(f"couple: lr must be > 0, got {self.lr!r}")
        for key in ("quant_source_ratio", "relation_source_ratio", "mix_start", "mix_end"):
            number(key, 0.0, 1.0)
        number("select_ratio", 0.0, 1.0)
        if self.select_ratio_end is not None:
            number("select_ratio_end", 0.0, 1.0)
        number("target_seed_weight")
        number("ema_decay", 0.0, 0.99999)
        number("diffusion_tol", 1e-12, 1.0)
        number("disagreement_weight", 1e-6, 1.0)
        choice("selection", SELECTIONS)
        choice("solver", SOLVERS)
        choice("select_rule", SELECT_RULES)
        choice("pairing", PAIRINGS)
        choice("graph_features", GRAPH_FEATURES)
        choice("high_mixup_loss", HIGH_MIXUP_LOSSES)
        choice("mix_pairs", MIX_PAIRS)
        choice("knn", KNN_METHODS)
        choice("label_refine", LABEL_REFINES)
        for key in ("mixup_low", "mixup_high", "target_relation", "select_balance", "select_agreement",
                    "high_mixup_detach", "center_per_domain"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"couple: {key} must be true or false, got {getattr(self, key)!r}")
        if self.selection == "diffusion" and self.k_cross == 0:
            raise ConfigError("couple: selection=diffusion needs cross-domain edges (k_cross >= 1)")
        if self.label_refine != "none" and self.select_rule == "positive":
            raise ConfigError("couple: label_refine=centroids ranks targets by their centroid margin, which has "
                              "no sign to threshold; use select_rule=top-ratio with it")
        return self


@dataclass
class _Selection:
    """The current low-noise target set (from the last graph refresh)."""

    pseudo_labels: np.ndarray  # (n_t,) int64, for every target (classifier argmax where unreached)
    selected: np.ndarray  # (n_t,) bool
    graph: sp.csr_matrix | None  # adjacency the walks use


def _soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    return -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


@register
class Couple(HashNetMethod):
    """COUPLE domain-adaptive hashing (see the module docstring)."""

    name = "couple"
    config_class = CoupleConfig
    data_parallel = True

    def __init__(self, bits: int, seed: int = 0, config: CoupleConfig | None = None) -> None:
        super().__init__(bits, seed, config)
        self.checkpoint_dir: Path | None = None
        self._ema: torch.optim.swa_utils.AveragedModel | None = None
        self.resume = False
        # Per graph refresh: epoch, selected target indices and pseudo-labels (for label-based reports).
        self.selection_history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ training
    def check_sizes(self, source: Domain, target: Domain) -> None:
        super().check_sizes(source, target)
        cfg = self.config
        if cfg.pairing == "random-walk" and (cfg.mixup_low or cfg.mixup_high):
            # each batch's walks: node ids (int64) and their copies, one row of walk_length + 1 per source
            walkers = min(cfg.batch_size, source.n)
            check_memory(16 * walkers * (cfg.walk_length + 1),
                         f"couple: walk_length={cfg.walk_length} ({walkers} walks per batch)",
                         "use a shorter walk_length")

    def fit(self, source: Domain, target: Domain, progress: ProgressFn = no_progress) -> Couple:
        start_time = time.perf_counter()
        cfg = self.config
        source.require_labels()
        if source.n < 2 or target.n < 2:
            raise DataError("couple: both domains need at least 2 training samples "
                            f"(source {source.n}, target {target.n})")
        if source.dim != target.dim:
            raise DataError(f"couple: source features are {source.dim}-d but target features {target.dim}-d")
        if distributed.active() and self.device.type != "cpu":
            raise ConfigError(f"--device {self.device}: COUPLE trains data-parallel under torchrun on CPU processes "
                              "(gloo) only; use --device cpu under torchrun, or one process with --device cuda")
        num_classes = class_count(source.labels, "COUPLE source labels")
        n_s, n_t = source.n, target.n
        self.check_sizes(source, target)
        # Normalisation statistics from the *training* data only (unlabelled target included).
        if cfg.center_per_domain:
            self.source_normalizer, self.normalizer = fit_per_domain(source.features, target.features)
        else:
            self.source_normalizer = None
            self.normalizer = FeatureNormalizer(center=True, scale=False).fit(
                np.concatenate([source.features, target.features]))
        source_normalizer = self.source_normalizer or self.normalizer
        device = self.device
        # The network's inputs on its device (the same tensors on the CPU); graphs read them back on the CPU.
        x_all = torch.from_numpy(np.concatenate([source_normalizer.transform(source.features, dtype=np.float32),
                                                 self.normalizer.transform(target.features, dtype=np.float32)]))
        x_all = x_all.to(device)
        y_source = torch.from_numpy(source.labels).to(device)
        fingerprint = _data_fingerprint(source, target)

        with torch.random.fork_rng(devices=rng_devices(device)), torch_threads(cfg.num_threads):
            torch.manual_seed(self.seed)
            net = self._build(source.dim, num_classes)
            distributed.broadcast_module_(net)  # every rank starts from rank 0's weights (a no-op in one process)
            optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            # Mean-teacher weights (Tarvainen & Valpola, NeurIPS 2017): the graph, the pseudo-labels and
            # the final codes come from the EMA of the weights, which is steadier than the last step's.
            self._ema = (torch.optim.swa_utils.AveragedModel(
                net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
                if cfg.ema_decay > 0 else None)
            generator = torch.Generator().manual_seed(self.seed)
            rng = np.random.default_rng(self.seed)
            first_epoch = 0
            selection: _Selection | None = None
            epoch_log: list[dict[str, Any]] = []
            self.selection_history = []
            if self.resume and self.checkpoint_dir is not None and distributed.is_main():
                from crossret._leftovers import remove_stale_temporaries

                remove_stale_temporaries(self.checkpoint_dir)  # of checkpoint writes killed before their rename
            restored = self._restore(net, optimizer, generator, fingerprint) if self.resume else None
            if restored is not None:
                first_epoch, selection, epoch_log, rng_state = restored
                rng.bit_generator.state = rng_state

            steps = max(-(-n_s // min(cfg.batch_size, n_s)), -(-n_t // min(cfg.target_batch_size, n_t)))
            for epoch in range(first_epoch, cfg.epochs):
                epoch_start = time.perf_counter()
                record: dict[str, Any] = {"epoch": epoch + 1}
                if epoch >= cfg.warmup_epochs and (selection is None
                                                   or (epoch - cfg.warmup_epochs) % cfg.graph_every == 0):
                    # Under torchrun rank 0 builds the graph and diffuses; every rank gets its selection.
                    selection, refresh_info = distributed.run_on_main(
                        partial(self._refresh, self._teacher(net), x_all, source.labels, n_s, num_classes, selection,
                                self._select_ratio_at(epoch)))
                    record.update(refresh_info)
                    self.selection_history.append({
                        "epoch": epoch + 1,
                        "selected": np.flatnonzero(selection.selected),
                        "pseudo_labels": selection.pseudo_labels.copy(),
                    })
                progress_u = epoch / max(cfg.epochs - 1, 1)
                u_max = cfg.mix_start + (cfg.mix_end - cfg.mix_start) * progress_u
                with distributed.global_batchnorm(net):  # BatchNorm sees the global batch under torchrun
                    sums = self._train_epoch(net, optimizer, generator, rng, x_all, y_source, n_s, n_t,
                                             num_classes, selection, steps, u_max)
                record.update(sums)
                record["seconds"] = round(time.perf_counter() - epoch_start, 4)
                epoch_log.append(record)
                if self.checkpoint_dir is not None:  # rank 0 writes, the others wait
                    distributed.run_on_main(partial(self._save_checkpoint, net, optimizer, generator, rng, epoch + 1,
                                                    selection, epoch_log, fingerprint))
                progress(epoch + 1, cfg.epochs, _progress_message(record, cfg.epochs))

        net = self._teacher(net)
        check_finite_network(net, where="couple", lr=cfg.lr)
        net.eval()
        self.network, self.num_classes, self.input_dim = net, num_classes, source.dim
        hash_out = self._forward_eval(x_all)[0]  # on the CPU
        final = epoch_log[-1] if epoch_log else {}
        self.diagnostics = {
            "n_source": n_s,
            "n_target": n_t,
            "num_classes": num_classes,
            "steps_per_epoch": steps,
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "final_losses": {k: v for k, v in final.items() if k.startswith("loss_")},
            "train_bit_balance": bit_balance(hash_out.numpy()),
            "feature_rescale": self.normalizer.global_scale,
            "resumed_from_epoch": restored[0] if restored is not None else 0,
            "fit_seconds": round(time.perf_counter() - start_time, 4),
            "device": str(device),
            "epochs": epoch_log,
        }
        return self

    def _train_epoch(self, net: HashNet, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     rng: np.random.Generator, x_all: torch.Tensor, y_source: torch.Tensor, n_s: int, n_t: int,
                     num_classes: int, selection: _Selection | None, steps: int, u_max: float) -> dict[str, float]:
        cfg = self.config
        net.train()
        device = x_all.device
        bs_s, bs_t = min(cfg.batch_size, n_s), min(cfg.target_batch_size, n_t)
        # Drawn on the CPU generator on every device; the walks read the CPU copies, the network the others.
        source_order = _cycled_permutation(n_s, steps * bs_s, generator)
        target_order = _cycled_permutation(n_t, steps * bs_t, generator)
        source_order_dev, target_order_dev = source_order.to(device), target_order.to(device)
        if selection is not None:
            pseudo = torch.from_numpy(selection.pseudo_labels).to(device)
            selected = torch.from_numpy(selection.selected).to(device)
        keys = ("loss_total", "loss_ce", "loss_target_ce", "loss_target_im", "loss_coral", "loss_quant",
                "loss_relation", "loss_mix_low", "loss_mix_high")
        sums = dict.fromkeys(keys, 0.0)
        mixed_samples = 0
        for step in range(steps):
            src_host = source_order[step * bs_s:(step + 1) * bs_s]
            tgt_host = target_order[step * bs_t:(step + 1) * bs_t]
            src = source_order_dev[step * bs_s:(step + 1) * bs_s]
            tgt = target_order_dev[step * bs_t:(step + 1) * bs_t]
            out = _sharded_forward(net, x_all[src], x_all[n_s + tgt])
            f_s, f_t = out.features[:bs_s], out.features[bs_s:]
            h_s, h_t = out.hash[:bs_s], out.hash[bs_s:]
            logits_s, logits_t = out.logits[:bs_s], out.logits[bs_s:]
            y_s = y_source[src]

            loss_ce = F.cross_entropy(logits_s, y_s)
            zero = logits_s.new_zeros(())
            loss_target_ce = zero
            rel_hash, rel_labels = h_s, y_s
            if selection is not None:
                chosen = selected[tgt]
                if chosen.any():
                    loss_target_ce = F.cross_entropy(logits_t[chosen], pseudo[tgt][chosen])
                    if cfg.target_relation:
                        rel_hash = torch.cat([h_s, h_t[chosen]])
                        rel_labels = torch.cat([y_s, pseudo[tgt][chosen]])
            loss_coral = _coral(f_s, f_t) if cfg.coral_weight > 0 else zero
            loss_im = zero
            if cfg.target_im_weight > 0:
                loss_im = _information_maximisation(logits_t)
            loss_quant = (cfg.quant_source_ratio * quantization_loss(h_s)
                          + (1 - cfg.quant_source_ratio) * quantization_loss(h_t))
            same = (rel_labels[:, None] == rel_labels[None, :]).float()
            semantic = F.mse_loss(F.relu(_cosine_matrix(rel_hash, rel_hash)), 1.1 * same)
            structure = F.mse_loss(_cosine_matrix(f_s, f_t), F.relu(_cosine_matrix(h_s, h_t)))
            loss_relation = cfg.relation_source_ratio * semantic + (1 - cfg.relation_source_ratio) * structure

            loss_low, loss_high = zero, zero
            if selection is not None and (cfg.mixup_low or cfg.mixup_high):
                pairs = self._mixup_pairs(rng, selection, src_host.numpy(), tgt_host.numpy(), f_s, f_t, n_s, u_max)
                if pairs is not None:
                    a, b, lam = pairs
                    mixed_samples += int(a.size)
                    lam_t = torch.from_numpy(lam.astype(np.float32)).to(device)[:, None]
                    label_a = self._node_labels(a, n_s, y_source, pseudo)
                    label_b = self._node_labels(b, n_s, y_source, pseudo)
                    soft = (lam_t * F.one_hot(label_a, num_classes).float()
                            + (1 - lam_t) * F.one_hot(label_b, num_classes).float())
                    a_dev, b_dev = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
                    if cfg.mixup_low and a.size > 1:  # batch norm needs 2 samples
                        mixed = lam_t * x_all[a_dev] + (1 - lam_t) * x_all[b_dev]
                        loss_low = _soft_cross_entropy(_sharded_forward(net, mixed).logits, soft)
                    if cfg.mixup_high:
                        with torch.set_grad_enabled(not cfg.high_mixup_detach):
                            was_training = net.training
                            net.eval()  # running BN statistics: the extra forward must not shift them
                            f_a, f_b = net.encoder(x_all[a_dev]), net.encoder(x_all[b_dev])
                            net.train(was_training)
                        mixed_f = lam_t * f_a + (1 - lam_t) * f_b
                        logits = net.classifier(mixed_f)
                        loss_high = (F.mse_loss(logits, soft) if cfg.high_mixup_loss == "mse"
                                     else _soft_cross_entropy(logits, soft))

            total = (cfg.ce_weight * loss_ce + cfg.target_ce_weight * loss_target_ce
                     + cfg.target_im_weight * loss_im + cfg.coral_weight * loss_coral
                     + cfg.quant_weight * loss_quant + cfg.relation_weight * loss_relation
                     + cfg.low_mixup_weight * loss_low + cfg.high_mixup_weight * loss_high)
            check_finite_loss(total, dict(zip(keys[1:], (loss_ce, loss_target_ce, loss_im, loss_coral, loss_quant,
                                                         loss_relation, loss_low, loss_high), strict=True)),
                              where=f"couple: step {step + 1}/{steps} of an epoch", lr=cfg.lr)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            distributed.average_gradients(net.parameters())  # a no-op in one process
            optimizer.step()
            if self._ema is not None:
                self._ema.update_parameters(net)
            # One device-to-host copy per step for the nine running sums.
            values = torch.stack([total, loss_ce, loss_target_ce, loss_im, loss_coral, loss_quant, loss_relation,
                                  loss_low, loss_high]).detach().tolist()
            for key, value in zip(keys, values, strict=True):
                sums[key] += value
        out = {k: round(v / steps, 6) for k, v in sums.items()}
        out["mixed_samples"] = mixed_samples
        return out

    @staticmethod
    def _node_labels(nodes: np.ndarray, n_s: int, y_source: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """Labels of graph nodes: source labels, then target pseudo-labels (on ``y_source``'s device)."""
        nodes_t = torch.from_numpy(nodes).to(y_source.device)
        is_source = nodes_t < n_s
        labels = torch.empty(nodes.size, dtype=torch.int64, device=y_source.device)
        labels[is_source] = y_source[nodes_t[is_source]]
        labels[~is_source] = pseudo[nodes_t[~is_source] - n_s]
        return labels

    def _mixup_pairs(self, rng: np.random.Generator, selection: _Selection, src: np.ndarray, tgt: np.ndarray,
                     f_s: torch.Tensor, f_t: torch.Tensor, n_s: int, u_max: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Node pairs ``(a, b)`` and source-side weights ``λ`` of the mixed samples (see module doc)."""
        cfg = self.config
        if cfg.pairing == "nearest":
            # Ablation / the released code: each selected batch target with its nearest batch source.
            chosen = np.flatnonzero(selection.selected[tgt])
            if chosen.size == 0:
                return None
            with torch.no_grad():
                chosen_t = torch.from_numpy(chosen).to(f_t.device)
                nearest = _cosine_matrix(f_t[chosen_t], f_s).argmax(dim=1).cpu().numpy()
            paths = np.stack([src[nearest], n_s + tgt[chosen]], axis=1)
            lengths = np.ones(chosen.size, dtype=np.int64)
        else:
            assert selection.graph is not None
            stop = np.zeros(selection.graph.shape[0], dtype=bool)
            stop[n_s:] = True
            walks = random_walks(selection.graph, src, cfg.walk_length, rng, stop=stop)
            end = walks.end
            usable = walks.reached & selection.selected[np.maximum(end - n_s, 0)]
            if not usable.any():
                return None
            paths, lengths = walks.nodes[usable], walks.lengths[usable]
            if cfg.mix_pairs == "endpoints":
                # Mix the walk's source start with the target it reached; λ = 1 − u, u ~ U[0, u_max].
                lam = 1.0 - rng.random(lengths.size) * u_max
                rows = np.arange(lengths.size)
                return paths[:, 0], paths[rows, lengths], lam
        position = rng.random(lengths.size) * u_max * lengths
        segment = np.minimum(np.floor(position).astype(np.int64), lengths - 1)
        lam = 1.0 - (position - segment)
        rows = np.arange(lengths.size)
        return paths[rows, segment], paths[rows, segment + 1], lam

    def _teacher(self, net: HashNet) -> HashNet:
        """The network that builds the graph and gives the codes: the EMA copy when ``ema_decay > 0``."""
        return net if self._ema is None else self._ema.module

    # ------------------------------------------------------------------ graph + diffusion
    def _select_ratio_at(self, epoch: int) -> float:
        """``select_ratio`` at the first refresh, growing linearly to ``select_ratio_end`` at the last epoch."""
        cfg = self.config
        if cfg.select_ratio_end is None:
            return cfg.select_ratio
        span = max(cfg.epochs - 1 - cfg.warmup_epochs, 1)
        t = min(max((epoch - cfg.warmup_epochs) / span, 0.0), 1.0)
        return cfg.select_ratio + (cfg.select_ratio_end - cfg.select_ratio) * t

    @torch.no_grad()
    def _refresh(self, net: HashNet, x_all: torch.Tensor, source_labels: np.ndarray, n_s: int, num_classes: int,
                 previous: _Selection | None, ratio: float) -> tuple[_Selection, dict[str, Any]]:
        """Rebuild the graph on the current features, diffuse, and select the low-noise targets."""
        cfg = self.config
        started = time.perf_counter()
        was_training = net.training
        net.eval()
        features, logits = [], []
        for lo in range(0, x_all.shape[0], ENCODE_BATCH):
            out = net(x_all[lo:lo + ENCODE_BATCH])
            features.append(out.features.cpu())
            logits.append(out.logits.cpu())
        net.train(was_training)
        # Graph, diffusion and selection are numpy / scipy on the CPU, whatever the network's device.
        encoded = torch.cat(features).numpy()
        probs = torch.softmax(torch.cat(logits)[n_s:], dim=1).numpy()
        classifier_labels = probs.argmax(axis=1).astype(np.int64)
        if cfg.graph_features == "encoder":
            graph_input = encoded
        elif cfg.graph_features == "input":
            graph_input = x_all.cpu().numpy()
        else:
            graph_input = np.concatenate(
                [l2_normalize(x_all.cpu().numpy(), "inputs"), l2_normalize(encoded, "encoder features")], axis=1)
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
            adjacency = graph.adjacency
            if cfg.disagreement_weight < 1 and previous is not None:
                node_labels = np.concatenate([source_labels, previous.pseudo_labels])
                adjacency = disagreement_reweight(adjacency, node_labels, cfg.disagreement_weight)
            degree = np.asarray(adjacency.sum(axis=1)).ravel()
            seed = class_seed_mass(degree, n_s, source_labels, num_classes, cfg.target_fill)
            if cfg.target_seed_weight > 0 and previous is not None and previous.selected.any():
                # Progressive seeding: last round's selected targets also seed their pseudo-class.
                alpha = float(seed[:n_s].sum() / max(degree[:n_s].sum(), np.finfo(float).tiny))
                chosen = np.flatnonzero(previous.selected)
                seed[n_s + chosen, previous.pseudo_labels[chosen]] = (cfg.target_seed_weight * alpha
                                                                     * degree[n_s + chosen])
            seed, clipped = clip_to_feasible(adjacency, seed, degree)
            if cfg.solver == "active-set":
                # Inner CG to 1e-2 of the outer tolerance: the labels and the ranking need no more
                # (identical labels on the scaling benchmark's graphs), and it saves ~1/3 of the products.
                result = l2_flow_diffusion_active_set(adjacency, seed, degree, tol=cfg.diffusion_tol,
                                                      cg_tol=cfg.diffusion_tol / 100)
            else:
                result = l2_flow_diffusion(adjacency, seed, degree, tol=cfg.diffusion_tol)
            potential, mass = result.potential[n_s:], result.mass[n_s:]
            reached = mass.max(axis=1) > 1e-12 * max(float(degree.max(initial=0.0)), 1.0)
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
                "diffusion_classes_without_target": int(((seed.sum(axis=0) > 0) & ~(
                    mass > 1e-12 * max(float(degree.max(initial=0.0)), 1.0)).any(axis=0)).sum()),
                "targets_saturated": int(saturated.sum()),
                "classifier_agreement": round(float((labels[reached] == classifier_labels[reached]).mean()), 6)
                if reached.any() else None,
            })
        else:
            labels = classifier_labels
            score = probs.max(axis=1)
            candidates = np.ones(n_t, dtype=bool)

        if cfg.label_refine == "centroids":
            refined = refine_by_centroids(encoded[n_s:], labels, num_classes, cfg.refine_iterations)
            info.update({"refine_changed": int((refined.labels != labels).sum()),
                         "refine_iterations": refined.iterations, "refine_converged": refined.converged})
            labels, score, candidates = refined.labels, refined.margin, np.ones(n_t, dtype=bool)
        if cfg.select_agreement:
            candidates = candidates & (labels == classifier_labels)
        if cfg.selection == "diffusion" and cfg.select_rule == "positive":
            selected = candidates.copy()
        else:
            selected = _select_top(score, candidates, labels if cfg.select_balance else None, ratio)
        info["selected"] = int(selected.sum())
        info["refresh_seconds"] = round(time.perf_counter() - started, 4)
        return _Selection(labels, selected, graph.adjacency if graph is not None else None), info

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, net: HashNet, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                         rng: np.random.Generator, epochs_done: int, selection: _Selection | None,
                         epoch_log: list[dict[str, Any]], fingerprint: str) -> None:
        assert self.checkpoint_dir is not None and self.normalizer is not None
        header = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "method": self.name, "bits": self.bits,
            "seed": self.seed, "config": asdict(self.config), "epochs_done": epochs_done,
            "data_fingerprint": fingerprint, "numpy_rng": rng.bit_generator.state, "epoch_log": epoch_log,
            "history_epochs": [h["epoch"] for h in self.selection_history],
        }
        arrays: dict[str, torch.Tensor] = {"torch_rng": generator.get_state()}
        if selection is not None:
            arrays["pseudo_labels"] = torch.from_numpy(selection.pseudo_labels)
            arrays["selected"] = torch.from_numpy(selection.selected)
            if selection.graph is not None:
                csr = selection.graph
                arrays["graph_indptr"] = torch.from_numpy(csr.indptr.astype(np.int64))
                arrays["graph_indices"] = torch.from_numpy(csr.indices.astype(np.int64))
                arrays["graph_data"] = torch.from_numpy(csr.data.astype(np.float64))
                arrays["graph_shape"] = torch.tensor(csr.shape, dtype=torch.int64)
        for i, entry in enumerate(self.selection_history):
            arrays[f"history_{i}_selected"] = torch.from_numpy(entry["selected"].astype(np.int64))
            arrays[f"history_{i}_pseudo"] = torch.from_numpy(entry["pseudo_labels"])
        # Sealed (kind, version, SHA-256) and written atomically: a kill mid-write leaves the previous one.
        # CPU tensors (a no-op on the CPU): a checkpoint written on a GPU resumes on any device.
        payload = {"header": json.dumps(header), "model": cpu_state(net.state_dict()),
                   "optimizer": cpu_state(optimizer.state_dict()), "arrays": arrays}
        if self._ema is not None:
            payload["ema"] = cpu_state(self._ema.state_dict())
        save_torch(self.checkpoint_dir / CHECKPOINT_NAME, payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)

    def _restore(self, net: HashNet, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                 fingerprint: str) -> tuple[int, _Selection | None, list[dict[str, Any]], dict[str, Any]] | None:
        """Load ``checkpoint_dir/checkpoint.pt`` if present; ``None`` when there is nothing to resume."""
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / CHECKPOINT_NAME
        if not path.is_file():
            return None
        payload = read_checkpoint(path)
        try:
            header = json.loads(payload["header"])
        except Exception as exc:  # an untrusted / damaged file: refuse, naming it
            raise FileFormatError(f"{path}: cannot read the COUPLE checkpoint ({type(exc).__name__}: {exc}); "
                                  "delete it to start over") from exc
        if header.get("format") != CHECKPOINT_FORMAT or header.get("version") != CHECKPOINT_VERSION:
            raise FileFormatError(f"{path}: not a COUPLE checkpoint of format version {CHECKPOINT_VERSION}")
        if (header.get("config") != asdict(self.config) or header.get("bits") != self.bits
                or header.get("seed") != self.seed):
            raise ConfigError(f"{path}: the checkpoint was written with a different configuration, bits or seed"
                              f"{_config_differences(header, self.bits, self.seed, asdict(self.config))}; "
                              "resume with the same settings or start a new run")
        if header.get("data_fingerprint") != fingerprint:
            raise ConfigError(f"{path}: the checkpoint was trained on different data; refusing to resume")
        try:
            net.load_state_dict(payload["model"], strict=True)
            if self._ema is not None:
                self._ema.load_state_dict(payload["ema"], strict=True)
            optimizer.load_state_dict(payload["optimizer"])
            arrays = payload["arrays"]
            generator.set_state(arrays["torch_rng"])
            selection = None
            if "pseudo_labels" in arrays:
                graph = None
                if "graph_indptr" in arrays:
                    shape = tuple(int(v) for v in arrays["graph_shape"].tolist())
                    graph = sp.csr_matrix((arrays["graph_data"].numpy(), arrays["graph_indices"].numpy(),
                                           arrays["graph_indptr"].numpy()), shape=shape)
                selection = _Selection(arrays["pseudo_labels"].numpy().copy(), arrays["selected"].numpy().copy(),
                                       graph)
            self.selection_history = [
                {"epoch": epoch, "selected": arrays[f"history_{i}_selected"].numpy().copy(),
                 "pseudo_labels": arrays[f"history_{i}_pseudo"].numpy().copy()}
                for i, epoch in enumerate(header["history_epochs"])
            ]
            return int(header["epochs_done"]), selection, list(header["epoch_log"]), header["numpy_rng"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise FileFormatError(f"{path}: the COUPLE checkpoint is inconsistent ({type(exc).__name__}: {exc})") \
                from exc

    def label_report(self, target_labels: np.ndarray) -> dict[str, Any]:
        """Pseudo-label quality per graph refresh, using the target's true labels.

        Reporting only: called after training by the experiment runner, which holds the labels;
        nothing here feeds back into training or model choice.
        """
        labels = np.asarray(target_labels)
        rows = []
        for entry in self.selection_history:
            pseudo, known = entry["pseudo_labels"], labels >= 0
            chosen = entry["selected"][known[entry["selected"]]]  # unknown true labels are not scored
            rows.append({
                "epoch": entry["epoch"],
                "selected": int(chosen.size),
                "selected_accuracy": float((pseudo[chosen] == labels[chosen]).mean()) if chosen.size else None,
                "pseudo_label_accuracy": float((pseudo[known] == labels[known]).mean()) if known.any() else None,
            })
        return {"selection_quality": rows}


def _select_top(score: np.ndarray, candidates: np.ndarray, groups: np.ndarray | None, ratio: float) -> np.ndarray:
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


def _coral(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """CORAL: ``||C_s − C_t||_F² / (4 e²)`` with ``C`` the unbiased feature covariances, ``e`` the
    width (Sun & Saenko, "Deep CORAL", ECCV Workshops 2016). ``f_s (B_s, e)``, ``f_t (B_t, e)``."""
    def covariance(f: torch.Tensor) -> torch.Tensor:
        centred = f - f.mean(dim=0, keepdim=True)
        return centred.T @ centred / max(f.shape[0] - 1, 1)

    width = f_s.shape[1]
    return ((covariance(f_s) - covariance(f_t)) ** 2).sum() / (4 * width * width)


def _information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """``mean_i H(p_i) − H(p̄)`` with ``p = softmax(logits)``, ``p̄`` the batch mean (SHOT, ICML 2020).

    Low when each prediction is confident (first term) and the batch uses every class (second).
    """
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    mean_p = p.mean(dim=0)
    return -(p * log_p).sum(dim=1).mean() + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()


def _sharded_forward(net: HashNet, *groups: torch.Tensor) -> HashNetOutput:
    """``net(cat(groups))``, the outputs of the global batch.

    Under torchrun each rank runs only its shard of every group and the outputs are gathered with
    gradient (group by group, so the row order is the single-process one); every loss computed on them
    is then the single-process loss, pairwise terms included.
    """
    if not distributed.active():
        return net(torch.cat(groups)) if len(groups) > 1 else net(groups[0])
    parts = [group[slice(*distributed.shard_range(group.shape[0]))] for group in groups]
    out = net(torch.cat(parts))
    widths = [out.features.shape[1], out.hash.shape[1], out.logits.shape[1]]
    packed = torch.cat([out.features, out.hash, out.logits], dim=1)  # one gather per group, not three
    gathered, offset = [], 0
    for part in parts:
        gathered.append(distributed.gather_with_grad(packed[offset:offset + part.shape[0]]))
        offset += part.shape[0]
    return HashNetOutput(*torch.split(torch.cat(gathered), widths, dim=1))


def _config_differences(header: dict[str, Any], bits: int, seed: int, config: dict[str, Any]) -> str:
    """`` (differs: a, b; not in the checkpoint: c)`` naming what keeps a checkpoint from resuming; a
    setting missing from the checkpoint means an older crossret wrote it (before that option existed)."""
    saved = header.get("config") if isinstance(header.get("config"), dict) else {}
    differs = [k for k in ("bits", "seed") if header.get(k) != {"bits": bits, "seed": seed}[k]]
    differs += sorted(k for k in config if k in saved and saved[k] != config[k])
    missing = sorted(k for k in config if k not in saved)
    parts = ([f"differs: {', '.join(differs)}"] if differs else []) + (
        [f"not in the checkpoint (written by an older crossret): {', '.join(missing)}"] if missing else [])
    return f" ({'; '.join(parts)})" if parts else ""


def _cycled_permutation(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``length`` indices from back-to-back random permutations of ``range(n)``."""
    rounds = -(-length // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(rounds)])[:length]


def _data_fingerprint(source: Domain, target: Domain) -> str:
    digest = hashlib.sha256()
    for array in (source.features, source.labels, target.features):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _progress_message(record: dict[str, Any], epochs: int) -> str:
    text = f"couple: epoch {record['epoch']}/{epochs} loss {record.get('loss_total', 0.0):.4f}"
    parts = [f"{name} {record[key]:.4f}" for name, key in (("ce", "loss_ce"), ("tce", "loss_target_ce"),
                                                          ("rel", "loss_relation"), ("mix", "loss_mix_low"))
             if key in record]
    if "selected" in record:
        parts.append(f"selected {record['selected']}")
    return text + " (" + ", ".join(parts) + ")"
