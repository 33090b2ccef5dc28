"""GCKD training (Luo et al., "Graph-Based Cross-Domain Knowledge Distillation for Cross-Dataset
Text-to-Image Person Retrieval", AAAI 2025), as reconstructed in docs/gckd.md.

One step (``B_s`` labelled source pairs; ``B_t`` target images and ``B_t`` target captions, unpaired):

* EMA teacher: ``θ' ← m θ' + (1 − m) θ`` (``momentum``), then teacher features ``f'`` (no gradient).
* Source (ALBEF / RaSa):
  ``L_itc^s`` identity-aware ITC against ``[f'_batch; M^s]`` with momentum distillation (α);
  ``L_itm^s`` ITM with one hard negative text per image and one hard negative image per text
  (sampled ∝ softmax of the batch similarity, same identity excluded);
  ``L_mlm`` 15 % masked LM conditioned on the image, distilled from the teacher at α (ALBEF backbone only).
* GMP (§2.2): nodes ``X = [f_v^s; f_t^s; f_v^t; f_t^t; M]`` (four memory banks of teacher features),
  symmetric kNN (K) graph, two-layer GNN ``z = norm(X + GNN(X))``; the same GNN on the teacher nodes gives
  ``z'`` (no gradient). ``L_itc^{prop}`` = identity-aware ITC on the propagated source features (trains
  the GNN with real labels, A8).
* CMKD (§2.3): pseudo similarity targets ``P'_{t2i} = softmax(z'_t · [z'_v(batch); z'(M_v^t)]ᵀ / τ)`` (and
  i2t); ``L_cmkd = ½ Σ_dir CE(P'_dir, softmax(f_dir · [f'_batch; M^t]ᵀ / τ))``.
* Cross-domain ITM: ``cd_itm_mining="batch"``: a target caption and its best target image (``argmax P'``
  over the batch) form a pseudo-positive iff that teacher probability ≥ δ; ``"banks"``: caption and image
  are mutual nearest neighbours (cosine of ``z'``) over batch ∪ target banks, matched by dataset index, with
  score ≥ δ, and the ITM runs on a pseudo-pair batch loaded by index (or the mined pairs inside the batch).
  Each positive gets a hard negative image and a hard negative caption drawn from the *source ∪ target*
  pool (the positive and anything ≥ δ excluded).
* Target MLM (optional, ALBEF backbone): the masked LM on the pseudo-positives' captions conditioned on their
  pseudo-positive image, distilled at α.
* ``L = w_itc L_itc^s + w_itm L_itm^s + w_mlm L_mlm + w_prop L_itc^{prop} + w_kd L_cmkd + w_cd L_itm^{cd}
  + w_tmlm L_mlm^t``.

Before the first adaptation step the banks are warm-started with the teacher's features of a seeded sample
of the training data (``warm_start_banks``).

Source-only training is the same loop with every target term off (``GckdConfig.source_only()``), so
the baseline and GCKD differ by the target terms alone. Checkpoints (model, teacher, GNN, memory,
optimiser, RNG states) are written atomically after every epoch; ``resume=True`` continues bit-for-bit
on CPU.

Data parallelism (``torchrun``, docs/distributed.md): every rank receives the same global batch, runs
the unimodal encoders, the ITM fusion and the MLM head on its share of the rows, and gathers features,
tokens and logits with gradient, so that every term above (ITC over the batch and the banks, hard
negatives, the GMP graph, CMKD, the pseudo-pairs) is computed on the global batch exactly as in one
process. Gradients are averaged over ranks; the banks receive the global batch's teacher features, so
they hold the same contents on every rank. In one process none of this runs and no collective is called.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crossret import distributed
from crossret.config_keys import reject_unknown_keys
from crossret.errors import ConfigError, DataError, FileFormatError, NumericalError
from crossret.storage.sealed import load_torch, save_torch
from crossret.textimage.albef import ema_update, momentum_copy
from crossret.textimage.backbone import Backbone, MaskedLanguageBackbone
from crossret.textimage.losses import (
    cmkd_loss,
    itc_loss,
    itm_loss,
    momentum_similarity_targets,
    mutual_nearest_pairs,
    sample_hard_negatives,
    select_confident_target_pairs,
    soft_contrastive_loss,
)
from crossret.textimage.memory import GckdMemory
from crossret.textimage.propagation import GraphPropagation, knn_graph
from crossret.textimage.streams import StepBatch, TrainingData

log = logging.getLogger("crossret.gckd")

CHECKPOINT_FORMAT = "crossret.gckd.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOSS_TERMS = ("itc", "itm", "mlm", "prop", "kd", "cd_itm", "target_mlm")
CD_ITM_MINING = ("batch", "banks")
CD_ITM_PAIRS = ("fetch", "in_batch")

LEGACY_VALUES: dict[str, Any] = {
    "cd_itm_mining": "batch", "cd_itm_pairs": "fetch", "cd_itm_batch": 16, "warm_start_banks": False,
    "warm_start_samples": None, "target_mlm_weight": 0.0, "alpha_ramp_epochs": 0.0,
}
"""The values that reproduce the trainer from before these keys existed: a recorded configuration (a
checkpoint's fingerprint, a benchmark row) that lacks a key ran with this value."""

START_ONLY_KEYS = ("warm_start_banks", "warm_start_samples")
"""Keys that act only before the first step: a resume (which starts after an epoch) never uses them."""


@dataclass
class GckdConfig:
    """Every GCKD hyper-parameter and switch (defaults: the paper's setup, docs/gckd.md; [R] = reconstruction)."""

    epochs: int = 30
    lr: float = 1e-5  # backbone (RaSa)
    head_lr: float = 1e-4  # GNN and node-type embeddings (RaSa lr_custm)
    weight_decay: float = 0.02
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    grad_clip: float | None = None
    # data
    ids_per_batch: int = 4  # source: p identities × k pairs
    pairs_per_id: int = 4
    target_batch: int = 16
    target_pairing: str = "unpaired"  # gckd.md A1
    # ALBEF
    alpha: float = 0.4  # momentum-distillation weight
    # Source ITC candidates: "teacher" = the EMA teacher's batch features + the source banks (ALBEF's
    # loss_ita; right when starting from pre-trained weights); "student" = the student's own in-batch
    # features, gradient to both towers, no bank (CLIP-style). From random weights the teacher's text
    # [CLS] features are nearly identical for hundreds of steps, so "teacher" candidates give the vision
    # tower no gradient and the temperature collapses (docs/gckd.md, "Teacher and evaluation").
    itc_candidates: str = "teacher"
    momentum: float = 0.999  # EMA teacher m
    mlm_prob: float = 0.15
    # GMP
    memory_size: int = 4096  # per bank; 0 disables the banks
    knn_k: int = 10
    gnn: str = "gcn"  # "gcn" | "sage"
    gnn_dropout: float = 0.1
    use_gnn: bool = True  # off: teacher targets from the raw teacher features (ablation)
    # CMKD / cross-domain ITM
    delta: float = 0.5  # threshold on the teacher's t2i probability (or cosine, delta_on="cosine")
    delta_on: str = "probability"
    kd_min_confidence: float | None = None  # optional row mask of the KD targets
    teacher_temp: float | None = None  # τ_p of the KD targets; None: the student's τ (docs/gckd.md)
    # loss weights (A9: all 1)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    prop_weight: float = 1.0
    kd_weight: float = 1.0
    cd_itm_weight: float = 1.0
    # Cross-domain ITM pseudo-pairs. "batch": each target caption of the batch with its best batch image
    # (teacher score ≥ δ); "banks": mutual nearest neighbours (cosine) between the target captions and images
    # of batch ∪ target banks, teacher features (GNN-propagated when use_gnn), kept iff score ≥ δ.
    cd_itm_mining: str = "batch"
    # "banks" only: "fetch" = each step, a pseudo-pair batch of cd_itm_batch mined pairs loaded by dataset
    # index (IndexedTrainingData); "in_batch" = the mined pairs whose caption and image are both in the batch.
    cd_itm_pairs: str = "fetch"
    cd_itm_batch: int = 16
    # Fill the four banks with the teacher's features of a seeded sample of source pairs, target images and
    # target captions before the first adaptation step (warm_start_samples per bank; None: memory_size).
    warm_start_banks: bool = True
    warm_start_samples: int | None = None
    # Masked LM on the target captions of the pseudo-pairs, conditioned on their pseudo-positive image and
    # distilled from the teacher at α (ALBEF backbone only).
    target_mlm_weight: float = 0.0
    # ALBEF ramps α linearly from 0 over the first epoch (alpha · min(1, step / steps)); 0 = constant α.
    alpha_ramp_epochs: float = 0.0
    # runtime
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU) | "off" | "bf16"
    seed: int = 0

    @classmethod
    def source_only(cls, **overrides: Any) -> GckdConfig:
        """Source supervision only (ITC + ITM + MLM): the "source-only" baseline and the pre-training stage."""
        values: dict[str, Any] = dict(prop_weight=0.0, kd_weight=0.0, cd_itm_weight=0.0, target_mlm_weight=0.0)
        values.update(overrides)
        return cls.from_dict(values)

    @property
    def adapts(self) -> bool:
        """Whether any target term is on (the step then needs target batches)."""
        return self.kd_weight > 0 or self.cd_itm_weight > 0 or self.prop_weight > 0 or self.target_mlm_weight > 0

    @property
    def warm_starts(self) -> bool:
        """Whether :meth:`GckdTrainer.fit` fills the banks before the first step (adaptation with banks)."""
        return self.warm_start_banks and self.adapts and self.memory_size > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GckdConfig:
        reject_unknown_keys(cls, values.keys(), "GCKD config")
        return cls(**dict(values)).validate()

    @classmethod
    def from_recorded(cls, values: Mapping[str, Any]) -> GckdConfig:
        """A configuration recorded by an earlier crossret (a benchmark row, a checkpoint): keys it lacks
        take their :data:`LEGACY_VALUES`, so that it trains as it did then."""
        return cls.from_dict({**{k: v for k, v in LEGACY_VALUES.items() if k not in values}, **values})

    def validate(self) -> GckdConfig:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"GCKD config: {name}={getattr(self, name)!r} {why}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
            return float(value)

        for name in ("epochs", "ids_per_batch", "pairs_per_id", "target_batch", "knn_k", "cd_itm_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "must be a positive integer")
        if isinstance(self.memory_size, bool) or not isinstance(self.memory_size, int) or self.memory_size < 0:
            raise bad("memory_size", "must be an integer >= 0 (0 disables the memory banks)")
        for name in ("lr", "head_lr"):
            if number(name) <= 0:
                raise bad(name, "must be a positive number")
        for name in ("weight_decay", "warmup_epochs", "min_lr", "alpha_ramp_epochs",
                     *(f"{t}_weight" for t in LOSS_TERMS)):
            if number(name) < 0:
                raise bad(name, "must be a finite number >= 0")
        for name in ("alpha", "momentum", "mlm_prob", "gnn_dropout"):
            if not 0.0 <= number(name) <= 1.0:
                raise bad(name, "must be in [0, 1]")
        if self.gnn_dropout >= 1.0:
            raise bad("gnn_dropout", "must be < 1")
        if self.kd_min_confidence is not None and not 0.0 <= number("kd_min_confidence") <= 1.0:
            raise bad("kd_min_confidence", "must be null or a probability in [0, 1]")
        if self.teacher_temp is not None and not 0.0 < number("teacher_temp") <= 10.0:
            raise bad("teacher_temp", "must be null or in (0, 10]")
        if self.gnn not in ("gcn", "sage"):
            raise bad("gnn", "must be 'gcn' or 'sage'")
        for name in ("use_gnn", "warm_start_banks"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.warm_start_samples is not None and (isinstance(self.warm_start_samples, bool) or not isinstance(
                self.warm_start_samples, int) or self.warm_start_samples <= 0):
            raise bad("warm_start_samples", "must be null (memory_size) or a positive integer")
        if self.cd_itm_mining not in CD_ITM_MINING:
            raise bad("cd_itm_mining", f"must be one of {', '.join(CD_ITM_MINING)}")
        if self.cd_itm_pairs not in CD_ITM_PAIRS:
            raise bad("cd_itm_pairs", f"must be one of {', '.join(CD_ITM_PAIRS)}")
        if self.delta_on not in ("probability", "cosine"):
            raise bad("delta_on", "must be 'probability' or 'cosine'")
        if not -1.0 <= number("delta") <= 1.0:
            raise bad("delta", "must be in [-1, 1]")
        if self.target_pairing not in ("unpaired", "paired"):
            raise bad("target_pairing", "must be 'unpaired' or 'paired'")
        if self.itc_candidates not in ("teacher", "student"):
            raise bad("itc_candidates", "must be 'teacher' or 'student'")
        if self.amp not in ("auto", "off", "bf16"):
            raise bad("amp", "must be one of auto, off, bf16 (bf16 needs no loss scaling)")
        if self.grad_clip is not None and not number("grad_clip") > 0:
            raise bad("grad_clip", "must be positive or null")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise bad("seed", "must be an integer >= 0")
        return self


# ---------------------------------------------------------------------------------------------- helpers
def _autocast(config: GckdConfig, device: torch.device) -> Any:
    amp = config.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mlm_distill_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float) -> Tensor:
    """ALBEF MLM: ``(1 − α)·CE(logits, labels) + α·CE(softmax(teacher), logits)`` over masked positions
    (``labels != −100``); ``logits, teacher_logits (B, L, V)``, ``labels (B, L)``."""
    chosen = labels != -100
    if not bool(chosen.any()):
        return logits.sum() * 0.0
    return _mlm_on_masked(logits[chosen].float(), labels[chosen],
                          teacher_logits[chosen] if teacher_logits is not None else None, alpha)


def _mlm_on_masked(pred: Tensor, labels: Tensor, teacher_logits: Tensor | None, alpha: float) -> Tensor:
    """:func:`mlm_distill_loss` on the masked positions only: ``pred (n, V)`` float, ``labels (n,)``."""
    loss = F.cross_entropy(pred, labels)
    if teacher_logits is not None and alpha > 0:
        soft = F.softmax(teacher_logits.float(), dim=-1)
        loss = (1.0 - alpha) * loss + alpha * soft_contrastive_loss(pred, soft)
    return loss


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """``target_pairing``: the protocol of the target data, ``"unpaired"`` (GCKD's: no target pairing used)
    or ``"paired"`` (the target's image–caption pairing used: another protocol); None without target terms."""

    history: list[dict[str, Any]]
    resumed_from_epoch: int
    train_seconds: float
    target_pairing: str | None = None


class GckdTrainer:
    """Trains a :class:`~crossret.textimage.backbone.Backbone` ``model`` with :class:`GckdConfig` on
    :class:`~crossret.textimage.streams.TrainingData`.

    ``mask_fn(input_ids, attention_mask, generator) -> (masked_ids, labels)`` enables MLM (for a
    :class:`~crossret.textimage.backbone.MaskedLanguageBackbone` with token inputs). ``checkpoint_dir``
    receives ``checkpoint.pt`` after every epoch.
    """

    def __init__(self, model: Backbone, config: GckdConfig, *, device: str | torch.device = "cpu",
                 mask_fn: Callable[[Tensor, Tensor | None, torch.Generator], tuple[Tensor, Tensor]] | None = None,
                 checkpoint_dir: str | Path | None = None) -> None:
        self.config = config.validate()
        self.device = torch.device(device)
        self.model: Backbone = model.to(self.device)
        # The teacher runs in eval mode (no dropout): its similarities are the pseudo targets, and
        # dropout noise would only make them less reliable (ALBEF's momentum encoders share the
        # student's mode; GCKD does not say).
        self.teacher: Backbone = momentum_copy(self.model).eval()
        embed_dim = int(model.config.embed_dim)
        with torch.random.fork_rng(devices=[]):  # the GNN's initial weights depend on config.seed only
            torch.manual_seed(config.seed)
            self.gnn = GraphPropagation(embed_dim, k=config.knn_k, conv=config.gnn,  # type: ignore[arg-type]
                                        dropout=config.gnn_dropout).to(self.device)
        self.memory = GckdMemory(config.memory_size, embed_dim).to(self.device) if config.memory_size > 0 else None
        self.mask_fn = (mask_fn if (config.mlm_weight > 0 or config.target_mlm_weight > 0)
                        and isinstance(model, MaskedLanguageBackbone) else None)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        decay, no_decay = [], []
        skip = model.no_weight_decay()
        for name, param in self.model.named_parameters():
            (no_decay if name in skip or param.ndim < 2 else decay).append(param)
        groups = [{"params": decay, "lr": config.lr, "weight_decay": config.weight_decay, "base_lr": config.lr},
                  {"params": no_decay, "lr": config.lr, "weight_decay": 0.0, "base_lr": config.lr},
                  {"params": list(self.gnn.parameters()), "lr": config.head_lr, "weight_decay": config.weight_decay,
                   "base_lr": config.head_lr}]
        self.optimizer = torch.optim.AdamW(groups)
        # On the training device: hard-negative sampling and MLM masking draw from it there.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._teacher_feats: tuple[Tensor, ...] | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        # Data parallelism (set by fit under torchrun): ranks, whether the batches' images are this rank's
        # rows already, and a counter that gives each sharded forward of a step its own dropout stream.
        self._world = 1
        self._images_local = False
        self._rng_calls = 0
        # Set by fit: the data (fetching pseudo-pair batches by index), the steps of the α ramp.
        self._data: TrainingData | None = None
        self._alpha_ramp_steps = 0

    def _alpha(self) -> float:
        """The momentum-distillation weight of this step: ``α · min(1, step / ramp)`` during the ramp (ALBEF's
        first epoch), ``α`` otherwise."""
        alpha = self.config.alpha
        if self._alpha_ramp_steps > 0 and self.step < self._alpha_ramp_steps:
            return alpha * self.step / self._alpha_ramp_steps
        return alpha

    # ------------------------------------------------------------------ data-parallel hooks (identity in one process)
    def _local(self, t: Tensor | None) -> Tensor | None:
        """This rank's rows of a global-batch tensor."""
        if self._world == 1 or t is None:
            return t
        return t[slice(*distributed.shard_range(t.shape[0]))]

    def _local_images(self, t: Tensor | None) -> Tensor | None:
        return t if self._images_local else self._local(t)

    def _gather(self, t: Tensor) -> Tensor:
        """The global batch's rows of a per-rank tensor, with gradient."""
        return t if self._world == 1 else distributed.gather_with_grad(t)

    def _gather_rows(self, t: Tensor) -> Tensor:
        return t if self._world == 1 else distributed.gather_rows(t)

    def _sharded(self) -> AbstractContextManager[None]:
        """Context of a forward on this rank's rows: its dropout draws from a stream of its own, so that the
        generator the replicated GNN draws from stays the same on every rank."""
        if self._world == 1:
            return nullcontext()
        self._rng_calls += 1
        return distributed.rank_rng(self.config.seed, self.step, self._rng_calls, device=self.device)

    def _itm(self, text_tok: Tensor, mask: Tensor | None, image_tok: Tensor, text_rows: Tensor | None = None,
             image_rows: Tensor | None = None) -> Tensor:
        """ITM logits of the pairs ``(text_rows[j], image_rows[j])`` (all rows in order when None).

        Under torchrun the token tensors are the gathered global ones; each rank fuses a contiguous share
        of the pairs and the logits are gathered with gradient."""
        model = self.model
        if self._world == 1:
            if text_rows is None or image_rows is None:
                return model.itm_logits(text_tok, mask, image_tok)
            return model.itm_logits(text_tok[text_rows], _rows(mask, text_rows), image_tok[image_rows])
        if text_rows is None or image_rows is None:
            text_rows = image_rows = torch.arange(text_tok.shape[0], device=text_tok.device)
        lo, hi = distributed.shard_range(text_rows.numel())
        t, v = text_rows[lo:hi], image_rows[lo:hi]
        with self._sharded():
            logits = model.itm_logits(text_tok[t], _rows(mask, t), image_tok[v])
        return distributed.gather_with_grad(logits)

    # ------------------------------------------------------------------ one step
    def _bank(self, domain: str, modality: str) -> tuple[Tensor, Tensor]:
        if self.memory is None:
            empty = torch.zeros(0, self.gnn.dim, device=self.device)
            return empty, torch.zeros(0, dtype=torch.long, device=self.device)
        bank = self.memory.bank(domain, modality)
        return bank.features(), bank.ids()

    def losses(self, batch: StepBatch) -> tuple[Tensor, dict[str, float]]:
        """The weighted loss of one step and its terms (floats, unweighted) plus diagnostics."""
        c, model, teacher = self.config, self.model, self.teacher
        adapt = c.adapts
        if adapt and batch.target_images is None:
            raise DataError("this GCKD configuration has target terms but the batch has no target data")
        with torch.no_grad():
            ema_update(teacher, model, c.momentum)
        temp = model.clamped_temp()
        terms: dict[str, Tensor] = {}
        stats: dict[str, float] = {}

        # -- source: student + teacher unimodal features (this rank's rows under torchrun, then gathered)
        images, text, text_mask = (self._local_images(batch.source_images), self._local(batch.source_text),
                                   self._local(batch.source_mask))
        with self._sharded():
            s_img_tok, f_vs = model.encode_image(images)
            s_txt_tok, f_ts = model.encode_text(text, text_mask)
        f_vs, f_ts = self._gather(f_vs), self._gather(f_ts)
        ids = batch.source_ids
        _check_finite(f_vs, f_ts, where=f"step {self.step} (source features)")
        with torch.no_grad():
            ts_img_tok, tf_vs = teacher.encode_image(images)
            _, tf_ts = teacher.encode_text(text, text_mask)
            tf_vs, tf_ts = self._gather_rows(tf_vs), self._gather_rows(tf_ts)
        # The tokens of every row, for ITM pairs that cross shards (the rank's own tokens in one process).
        need_tokens = c.itm_weight > 0 or (adapt and c.cd_itm_weight > 0)
        source_tokens = ((self._gather(s_img_tok), self._gather(s_txt_tok)) if need_tokens
                         else (s_img_tok, s_txt_tok))
        bank_vs, bank_ids = self._bank("source", "image")
        bank_ts, _ = self._bank("source", "text")
        if c.itc_candidates == "student":  # in-batch student candidates; MD targets over the teacher's batch
            cand_t, cand_v, cand_ids = f_ts, f_vs, ids
            soft = momentum_similarity_targets(tf_vs, tf_ts, temp, text_candidates=tf_ts, image_candidates=tf_vs)
        else:
            cand_t, cand_v = torch.cat([tf_ts, bank_ts]), torch.cat([tf_vs, bank_vs])
            cand_ids = torch.cat([ids, bank_ids])
            soft = momentum_similarity_targets(tf_vs, tf_ts, temp, text_candidates=cand_t, image_candidates=cand_v)
        alpha = self._alpha()
        if c.itc_weight > 0:
            terms["itc"] = itc_loss(f_vs, f_ts, temp, ids, soft, alpha, text_candidates=cand_t,
                                    image_candidates=cand_v, candidate_ids=cand_ids)

        # -- source ITM with in-batch hard negatives (same identity never a negative)
        if c.itm_weight > 0:
            all_img_tok, all_txt_tok = source_tokens
            pos = self._itm(all_txt_tok, batch.source_mask, all_img_tok)
            with torch.no_grad():
                sim = f_vs @ f_ts.T / temp
            neg_t, neg_v = sample_hard_negatives(sim, sim.T, ids, self.generator)
            negs = []
            rows = torch.nonzero(neg_t >= 0).squeeze(1)
            if rows.numel():
                negs.append(self._itm(all_txt_tok, batch.source_mask, all_img_tok, neg_t[rows], rows))
            rows = torch.nonzero(neg_v >= 0).squeeze(1)
            if rows.numel():
                negs.append(self._itm(all_txt_tok, batch.source_mask, all_img_tok, rows, neg_v[rows]))
            terms["itm"] = itm_loss(pos, torch.cat(negs) if negs else pos[:0])

        # -- MLM (ALBEF backbone only)
        if self.mask_fn is not None and c.mlm_weight > 0:
            # The masks are drawn for the global batch (the generator advances as in one process).
            masked, labels = self.mask_fn(batch.source_text, batch.source_mask, self.generator)
            terms["mlm"] = self._mlm(masked, labels, batch.source_mask, s_img_tok, ts_img_tok, alpha)

        self._teacher_feats = (tf_vs, tf_ts)
        if adapt:
            self._target_terms(batch, temp, source_tokens, f_vs, f_ts, tf_vs, tf_ts, terms, stats)

        weights = {"itc": c.itc_weight, "itm": c.itm_weight, "mlm": c.mlm_weight, "prop": c.prop_weight,
                   "kd": c.kd_weight, "cd_itm": c.cd_itm_weight, "target_mlm": c.target_mlm_weight}
        total = sum(weights[name] * value for name, value in terms.items())
        stats.update({name: float(value.detach()) for name, value in terms.items()})
        return total, stats  # type: ignore[return-value]

    def _mlm(self, masked: Tensor, labels: Tensor, mask: Tensor | None, img_tok: Tensor,
             teacher_img_tok: Tensor | None, alpha: float) -> Tensor:
        """ALBEF MLM of the global batch's ``masked`` ids ``(B, L)`` conditioned on ``img_tok`` (this rank's
        rows under torchrun), distilled from the teacher (``teacher_img_tok``) at ``alpha``."""
        if self._world == 1:
            logits = self.model.mlm_logits(masked, mask, img_tok)  # type: ignore[attr-defined]
            with torch.no_grad():
                t_logits = (self.teacher.mlm_logits(masked, mask, teacher_img_tok)  # type: ignore[attr-defined]
                            if alpha > 0 and teacher_img_tok is not None else None)
            return mlm_distill_loss(logits, labels, t_logits, alpha)
        return self._mlm_sharded(masked, labels, self._local(mask), img_tok, teacher_img_tok, alpha)

    def _mlm_sharded(self, masked: Tensor, labels: Tensor, text_mask: Tensor | None, img_tok: Tensor,
                     teacher_img_tok: Tensor | None, alpha: float) -> Tensor:
        """The MLM term under torchrun: each rank runs the MLM head on its rows; the logits of the masked
        positions (row-major, so concatenated in rank order they are the single-process ones) are gathered
        with gradient and the loss is :func:`mlm_distill_loss` of the global batch."""
        chosen_all = labels != -100
        masked_l, labels_l = self._local(masked), self._local(labels)
        assert masked_l is not None and labels_l is not None
        with self._sharded():
            logits = self.model.mlm_logits(masked_l, text_mask, img_tok)
        if not bool(chosen_all.any()):
            return logits.sum() * 0.0
        chosen = labels_l != -100
        pred = distributed.gather_with_grad(logits[chosen].float())
        t_logits = None
        if alpha > 0 and teacher_img_tok is not None:
            with torch.no_grad():
                teacher_logits = self.teacher.mlm_logits(masked_l, text_mask, teacher_img_tok)
                t_logits = distributed.gather_rows(teacher_logits[chosen])
        return _mlm_on_masked(pred, labels[chosen_all], t_logits, alpha)

    def _target_terms(self, batch: StepBatch, temp: Tensor, source_tokens: tuple[Tensor, Tensor], f_vs: Tensor,
                      f_ts: Tensor, tf_vs: Tensor, tf_ts: Tensor, terms: dict[str, Tensor], stats: dict[str, float]
                      ) -> None:
        c, model, teacher = self.config, self.model, self.teacher
        assert batch.target_images is not None and batch.target_text is not None
        images, text, text_mask = (self._local_images(batch.target_images), self._local(batch.target_text),
                                   self._local(batch.target_mask))
        with self._sharded():
            t_img_tok, f_vt = model.encode_image(images)
            t_txt_tok, f_tt = model.encode_text(text, text_mask)
        f_vt, f_tt = self._gather(f_vt), self._gather(f_tt)
        _check_finite(f_vt, f_tt, where=f"step {self.step} (target features)")
        target_mlm = self.mask_fn is not None and c.target_mlm_weight > 0
        with torch.no_grad():
            tt_img_tok, tf_vt = teacher.encode_image(images)
            _, tf_tt = teacher.encode_text(text, text_mask)
            tf_vt, tf_tt = self._gather_rows(tf_vt), self._gather_rows(tf_tt)
            # the teacher's image tokens condition its MLM logits (target MLM distilled at α)
            tt_img_tok = self._gather_rows(tt_img_tok) if target_mlm and self._alpha() > 0 else None
        if c.cd_itm_weight > 0 or target_mlm:
            t_img_tok, t_txt_tok = self._gather(t_img_tok), self._gather(t_txt_tok)
        self._teacher_feats = (tf_vs, tf_ts, tf_vt, tf_tt)
        b_s, b_t = f_vs.shape[0], f_vt.shape[0]
        bank = self.memory.nodes()[0] if self.memory is not None else f_vs.new_zeros(0, f_vs.shape[1])
        bank_vt, _ = self._bank("target", "image")
        bank_tt, _ = self._bank("target", "text")
        n_banks = [len(self.memory.bank(d, m)) if self.memory is not None else 0 for d, m in GckdMemory.ORDER]

        # -- GMP: student and teacher graphs over batch ∪ memory
        student_nodes = torch.cat([f_vs, f_ts, f_vt, f_tt])
        teacher_nodes = torch.cat([tf_vs, tf_ts, tf_vt, tf_tt, bank])
        if c.use_gnn:
            z = self.gnn(student_nodes, bank)
            with torch.no_grad():
                self.gnn.eval()  # teacher side: deterministic propagation
                z_teacher = self.gnn.propagate(teacher_nodes, knn_graph(teacher_nodes, c.knn_k))
                self.gnn.train(self.model.training)
            if c.prop_weight > 0:
                terms["prop"] = itc_loss(z[:b_s], z[b_s:2 * b_s], temp, batch.source_ids)
        else:
            z_teacher = teacher_nodes
        batch_end = 2 * b_s + 2 * b_t
        zt_vt, zt_tt = z_teacher[2 * b_s:2 * b_s + b_t], z_teacher[2 * b_s + b_t:batch_end]
        # Node order after the batch: M_v^s, M_t^s, M_v^t, M_t^t (GckdMemory.ORDER); bounds[i] is where
        # bank i starts, bounds[i + 1] where it ends.
        bounds = np.cumsum([batch_end, *n_banks])
        zt_bank_vt = z_teacher[bounds[2]:bounds[3]]
        zt_bank_tt = z_teacher[bounds[3]:bounds[4]]

        # -- CMKD: pseudo similarity targets from the (propagated) teacher, student vs teacher candidates
        with torch.no_grad():
            q_i2t, q_t2i = momentum_similarity_targets(
                zt_vt, zt_tt, temp if c.teacher_temp is None else c.teacher_temp,
                text_candidates=torch.cat([zt_tt, zt_bank_tt]), image_candidates=torch.cat([zt_vt, zt_bank_vt]))
            if c.target_pairing == "paired":  # pair prior q = β·P' + (1 − β)·onehot(pair), β = α (§2.3)
                eye = torch.zeros_like(q_i2t)
                eye[torch.arange(b_t), torch.arange(b_t)] = 1.0
                q_i2t = c.alpha * q_i2t + (1 - c.alpha) * eye
                q_t2i = c.alpha * q_t2i + (1 - c.alpha) * eye
        if c.kd_weight > 0:
            terms["kd"] = cmkd_loss(f_vt, f_tt, (q_i2t, q_t2i), temp, text_candidates=torch.cat([tf_tt, bank_tt]),
                                    image_candidates=torch.cat([tf_vt, bank_vt]), min_confidence=c.kd_min_confidence)

        # -- cross-domain ITM (and target MLM) on δ-filtered target pseudo-positives
        pool = _Pool(t_txt_tok, batch.target_mask, t_img_tok, f_tt, f_vt, batch.target_text, tt_img_tok)
        if c.cd_itm_mining == "batch":
            with torch.no_grad():
                batch_sim = zt_tt @ zt_vt.T
                score = F.softmax(batch_sim / temp, dim=1) if c.delta_on == "probability" else batch_sim
                text_idx, image_idx = select_confident_target_pairs(score, c.delta)
                above = score >= c.delta  # (T_text, T_image)
            stats["pseudo_pairs"] = float(text_idx.numel())
            truth = getattr(self, "_truth", None)
            if truth is not None and text_idx.numel() and batch.target_text_index is not None:
                img_truth, txt_truth = truth
                ti = batch.target_image_index.cpu().numpy()[image_idx.cpu().numpy()]
                tt = batch.target_text_index.cpu().numpy()[text_idx.cpu().numpy()]
                stats["pseudo_pair_precision"] = float(np.mean(img_truth[ti] == txt_truth[tt]))
        else:
            bank_tt_index = self.memory.target_text.indices() if self.memory is not None else None
            bank_vt_index = self.memory.target_image.indices() if self.memory is not None else None
            mined = self._mine_bank_pairs(batch, zt_tt, zt_vt, zt_bank_tt, zt_bank_vt, bank_tt_index,
                                          bank_vt_index, temp, stats)
            pool, text_idx, image_idx, above = self._pseudo_pair_pool(batch, pool, mined, need_tokens=(
                c.cd_itm_weight > 0 or target_mlm), teacher_tokens=target_mlm and self._alpha() > 0)
            stats["cd_itm_pairs"] = float(text_idx.numel())
        if c.cd_itm_weight > 0 and text_idx.numel():
            terms["cd_itm"] = self._cd_itm(pool, text_idx, image_idx, above, source_tokens, batch.source_mask,
                                           f_vs, f_ts, temp)
        if target_mlm and text_idx.numel():
            assert self.mask_fn is not None and pool.text_ids is not None
            # the masks are drawn for the global list of pairs (the generator advances as in one process)
            masked, labels = self.mask_fn(pool.text_ids[text_idx], _rows(pool.mask, text_idx), self.generator)
            teacher_tok = pool.teacher_image[image_idx] if pool.teacher_image is not None else None
            terms["target_mlm"] = self._mlm(masked, labels, _rows(pool.mask, text_idx),
                                            self._local(pool.image[image_idx]), self._local(teacher_tok),
                                            self._alpha())

    def _cd_itm(self, pool: _Pool, text_idx: Tensor, image_idx: Tensor, above: Tensor,
                source_tokens: tuple[Tensor, Tensor], source_mask: Tensor | None, f_vs: Tensor, f_ts: Tensor,
                temp: Tensor) -> Tensor:
        """Cross-domain ITM (docs/gckd.md) on the pseudo-positives ``(pool.text[text_idx[j]],
        pool.image[image_idx[j]])``: ALBEF's ITM loss with, per positive, one hard-negative image and one
        hard-negative caption drawn from the source ∪ target pool, excluding the positive and every target item
        whose teacher score with it is ≥ δ (``above (T_pool, I_pool)``)."""
        b_s, n_img, n_txt = f_vs.shape[0], pool.f_image.shape[0], pool.f_text.shape[0]
        n_pos = text_idx.numel()
        pos = self._itm(pool.text, pool.mask, pool.image, text_idx, image_idx)
        with torch.no_grad():
            # candidates: source ∪ target pool; exclude the positive and every target item ≥ δ
            ex_img = torch.zeros(n_pos, b_s + n_img, dtype=torch.bool, device=f_vs.device)
            ex_img[:, b_s:] = above[text_idx]
            ex_img[torch.arange(n_pos), b_s + image_idx] = True
            ex_txt = torch.zeros(n_pos, b_s + n_txt, dtype=torch.bool, device=f_vs.device)
            ex_txt[:, b_s:] = above[:, image_idx].T
            ex_txt[torch.arange(n_pos), b_s + text_idx] = True
            sim_t2v = pool.f_text[text_idx] @ torch.cat([f_vs, pool.f_image]).T / temp
            sim_v2t = pool.f_image[image_idx] @ torch.cat([f_ts, pool.f_text]).T / temp
            no_ids = torch.full((b_s + n_img,), -1, dtype=torch.long, device=f_vs.device)
            neg_for_image, neg_for_text = sample_hard_negatives(sim_v2t, sim_t2v, None, self.generator,
                                                                candidate_ids=no_ids, exclude=(ex_txt, ex_img))
        all_img_tok = torch.cat([source_tokens[0], pool.image])
        all_txt_tok, all_mask = _pad_cat(source_tokens[1], source_mask, pool.text, pool.mask)
        negs = []
        ok = torch.nonzero(neg_for_text >= 0).squeeze(1)  # text rows with a negative image
        if ok.numel():
            negs.append(self._itm(pool.text, pool.mask, all_img_tok, text_idx[ok], neg_for_text[ok]))
        ok = torch.nonzero(neg_for_image >= 0).squeeze(1)  # image rows with a negative text
        if ok.numel():
            negs.append(self._itm(all_txt_tok, all_mask, pool.image, neg_for_image[ok], image_idx[ok]))
        return itm_loss(pos, torch.cat(negs) if negs else pos[:0])

    @torch.no_grad()
    def _mine_bank_pairs(self, batch: StepBatch, zt_tt: Tensor, zt_vt: Tensor, zt_bank_tt: Tensor,
                         zt_bank_vt: Tensor, bank_tt_index: Tensor | None, bank_vt_index: Tensor | None,
                         temp: Tensor, stats: dict[str, float]) -> _Mined:
        """Pseudo-pairs mined over batch ∪ target banks (``cd_itm_mining="banks"``).

        Candidates: the batch's target captions / images, then the banks' newest first, each dataset index
        once (its newest teacher feature; unknown indices ``-1`` are left out). Pairs:
        :func:`~crossret.textimage.losses.mutual_nearest_pairs` on the cosine ``(T_u, I_u)`` of the (propagated)
        teacher features, score ≥ δ (the cosine, or with ``delta_on="probability"`` the t2i softmax at τ over
        all ``I_u`` images). Stats: ``pseudo_pairs`` and, with the target train labels (report only),
        ``pseudo_pair_precision``."""
        c = self.config
        if batch.target_text_index is None or batch.target_image_index is None:
            raise DataError("cd_itm_mining='banks' needs the target dataset indices in every batch")
        dev = zt_tt.device
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        text_index = torch.cat([batch.target_text_index.to(dev),
                                (bank_tt_index if bank_tt_index is not None else empty).flip(0)])
        image_index = torch.cat([batch.target_image_index.to(dev),
                                 (bank_vt_index if bank_vt_index is not None else empty).flip(0)])
        text_feat = torch.cat([zt_tt, zt_bank_tt.flip(0)])
        image_feat = torch.cat([zt_vt, zt_bank_vt.flip(0)])
        text_u, text_first = _first_occurrence(text_index)
        image_u, image_first = _first_occurrence(image_index)
        probability = c.delta_on == "probability"
        with torch.autocast(dev.type, enabled=False):  # float32: bf16 cosines would tie among thousands
            cosine = text_feat[text_first].float() @ image_feat[image_first].float().T  # (T_u, I_u)
            rows, cols = mutual_nearest_pairs(cosine, c.delta, temp=temp.float() if probability else None)
            score = F.softmax(cosine / temp.float(), dim=1) if probability else cosine
        caption, image = text_u[rows], image_u[cols]
        stats["pseudo_pairs"] = float(rows.numel())
        truth = getattr(self, "_truth", None)
        if truth is not None and rows.numel():
            img_truth, txt_truth = truth
            stats["pseudo_pair_precision"] = float(np.mean(img_truth[image.cpu().numpy()]
                                                           == txt_truth[caption.cpu().numpy()]))
        return _Mined(caption, image, text_u, image_u, score >= c.delta)

    def _pseudo_pair_pool(self, batch: StepBatch, pool: _Pool, mined: _Mined, *, need_tokens: bool,
                          teacher_tokens: bool) -> tuple[_Pool, Tensor, Tensor, Tensor]:
        """The target pool the cross-domain ITM draws from and the positives' rows in it, for mined pairs.

        ``cd_itm_pairs="in_batch"``: the pool is the batch; the positives are the mined pairs whose caption and
        image are both in it (first rows). ``"fetch"``: ``cd_itm_batch`` mined pairs (a random subset drawn from
        the trainer's generator) are loaded by index (:class:`~crossret.textimage.streams.IndexedTrainingData`,
        augmentation key = step + 1) and appended to the batch: pool = ``[batch; pseudo-pair batch]``, positives
        at rows ``(B_t + j, B_t + j)``. ``above (T_pool, I_pool)``: teacher score ≥ δ, looked up by dataset index."""
        c = self.config
        assert batch.target_text_index is not None and batch.target_image_index is not None
        dev = pool.f_text.device
        text_index, image_index = batch.target_text_index.to(dev), batch.target_image_index.to(dev)
        if c.cd_itm_pairs == "in_batch":
            in_text = mined.caption.view(-1, 1) == text_index.view(1, -1)  # (P, B_t)
            in_image = mined.image.view(-1, 1) == image_index.view(1, -1)
            both = in_text.any(dim=1) & in_image.any(dim=1)
            text_idx = in_text[both].int().argmax(dim=1)
            image_idx = in_image[both].int().argmax(dim=1)
        else:
            n = mined.caption.numel()
            chosen = torch.randperm(n, generator=self.generator, device=self.generator.device)[:c.cd_itm_batch]
            chosen = chosen.to(dev)
            captions, images = mined.caption[chosen], mined.image[chosen]
            if chosen.numel() and need_tokens:  # (without a term that uses them, nothing is loaded)
                pool = self._fetch_into_pool(pool, captions, images, teacher_tokens)
            b_t = text_index.numel()
            text_idx = image_idx = torch.arange(b_t, b_t + chosen.numel(), device=dev)
            text_index, image_index = torch.cat([text_index, captions]), torch.cat([image_index, images])
        rows = torch.searchsorted(mined.text_u, text_index)
        cols = torch.searchsorted(mined.image_u, image_index)
        return pool, text_idx, image_idx, mined.above[rows][:, cols]

    def _fetch_into_pool(self, pool: _Pool, captions: Tensor, images: Tensor, teacher_tokens: bool) -> _Pool:
        """Load the pseudo-pair batch (caption and image rows) by index and append it to the pool: student
        tokens and features (this rank's rows, gathered with gradient), teacher image tokens when asked."""
        data = self._data
        if data is None or not all(hasattr(data, name) for name in ("target_images", "target_captions")):
            raise ConfigError("cd_itm_pairs='fetch' needs training data that fetches target items by index "
                              "(IndexedTrainingData, e.g. FeatureTrainingData / PersonTrainingData); use "
                              "cd_itm_pairs='in_batch' with other data")
        key = self.step + 1
        p_img = data.target_images(images.cpu().numpy(), key).to(self.device)  # type: ignore[attr-defined]
        p_txt, p_mask = data.target_captions(captions.cpu().numpy())  # type: ignore[attr-defined]
        p_txt = p_txt.to(self.device)
        p_mask = p_mask.to(self.device) if p_mask is not None else None
        with self._sharded():
            img_tok, f_v = self.model.encode_image(self._local(p_img))
            txt_tok, f_t = self.model.encode_text(self._local(p_txt), self._local(p_mask))
        f_v, f_t = self._gather(f_v), self._gather(f_t)
        _check_finite(f_v, f_t, where=f"step {self.step} (pseudo-pair batch)")
        img_tok, txt_tok = self._gather(img_tok), self._gather(txt_tok)
        teacher_image = None
        if teacher_tokens and pool.teacher_image is not None:
            with torch.no_grad():
                t_tok, _ = self.teacher.encode_image(self._local(p_img))
                teacher_image = torch.cat([pool.teacher_image, self._gather_rows(t_tok)])
        text, mask = _pad_cat(pool.text, pool.mask, txt_tok, p_mask)
        text_ids = None
        if pool.text_ids is not None:
            text_ids, _ = _pad_cat_ids(pool.text_ids, pool.mask, p_txt, p_mask)
        return _Pool(text, mask, torch.cat([pool.image, img_tok]), torch.cat([pool.f_text, f_t]),
                     torch.cat([pool.f_image, f_v]), text_ids, teacher_image)

    # ------------------------------------------------------------------ training loop
    def fit(self, data: TrainingData, *, resume: bool = False,
            progress: Callable[[int, int, dict[str, float]], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> TrainResult:
        """Train for ``config.epochs`` epochs; ``progress(step, total_steps, last_stats)`` after each step.

        With ``resume`` the state of ``checkpoint_dir/checkpoint.pt`` (if any) is restored first and
        training continues from its epoch. ``should_stop()`` true ends training after the current epoch's
        checkpoint (a clean interruption).

        Under torchrun (an initialised process group of several ranks) every rank calls ``fit`` with the
        same data and configuration; rank 0 writes the checkpoints and decides ``should_stop``."""
        c = self.config
        if c.adapts and not data.has_target:
            raise DataError("GCKD adaptation needs target data (images and captions of the target train split)")
        self._world = distributed.world_size() if distributed.active() else 1
        set_shard = getattr(data, "set_image_shard", None)
        self._images_local = self._world > 1 and set_shard is not None
        if self._images_local:
            set_shard(distributed.rank(), self._world)  # load and augment only this rank's images
        try:
            return self._fit(data, resume, progress, should_stop)
        finally:
            if self._images_local:
                set_shard(None, None)
            self._world, self._images_local = 1, False

    def _fit(self, data: TrainingData, resume: bool, progress: Callable[[int, int, dict[str, float]], None] | None,
             should_stop: Callable[[], bool] | None) -> TrainResult:
        c = self.config
        self._truth = data.target_truth()
        self._data = data
        steps_per_epoch = data.steps_per_epoch()
        total = steps_per_epoch * c.epochs
        warmup = round(c.warmup_epochs * steps_per_epoch)
        self._alpha_ramp_steps = round(c.alpha_ramp_epochs * steps_per_epoch)
        if c.adapts and c.target_pairing == "paired":
            log.warning("target_pairing='paired': training uses the target's image-caption pairing, a different "
                        "protocol from GCKD's unlabelled target (results are not comparable to unpaired runs)")
        if resume and self.checkpoint_dir is not None and distributed.is_main():
            from crossret.storage.atomic import remove_stale_temporaries

            remove_stale_temporaries(self.checkpoint_dir)  # of checkpoint writes killed before their rename
        start_epoch = self._restore(data) if resume else 0
        if start_epoch == 0:
            # Dropout draws from torch's global generator: seed it so that config.seed alone fixes the
            # run (a resumed run restores the generator's state from the checkpoint instead).
            torch.manual_seed(c.seed)
        for module in (self.model, self.teacher, self.gnn):  # rank 0's weights everywhere (no-op in one process)
            distributed.broadcast_module_(module)
        started = time.perf_counter()
        if start_epoch == 0 and self.step == 0 and c.warm_starts:
            with _autocast(c, self.device):  # every rank computes the same features (same teacher, same items)
                self.warm_start(data)
        for epoch in range(start_epoch, c.epochs):
            self.model.train()
            self.gnn.train()
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for batch in data.batches(epoch):
                batch = batch.to(self.device)
                factor = _lr_factor(self.step, total, warmup, c.min_lr / c.lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                self._rng_calls = 0
                with _autocast(c, self.device):
                    loss, stats = self.losses(batch)
                if not torch.isfinite(loss):
                    raise NumericalError(f"GCKD: non-finite loss at step {self.step} (terms {stats}); lower "
                                          "the learning rate or disable amp")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self._world > 1:
                    distributed.average_gradients(p for g in self.optimizer.param_groups for p in g["params"])
                if c.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                                   c.grad_clip)
                self.optimizer.step()
                self.model.clamp_temp_()
                self._enqueue(batch)
                self.step += 1
                stats["loss"] = float(loss.detach())
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                if progress is not None:
                    progress(self.step, total, stats)
            entry = {"epoch": epoch + 1, "step": self.step, **{k: sums[k] / counts[k] for k in sorted(sums)},
                     "temp": float(self.model.clamped_temp().detach())}
            self.history.append(entry)
            log.info("epoch %d/%d %s", epoch + 1, c.epochs, {k: round(v, 4) for k, v in entry.items()})
            if self.checkpoint_dir is not None:  # rank 0 writes, the others wait
                distributed.run_on_main(lambda epoch=epoch: self.save_checkpoint(data, epoch + 1))
            stop = should_stop is not None and should_stop()
            if self._world > 1:
                stop = distributed.broadcast_object(stop)  # rank 0 decides, so that every rank stops together
            if stop and epoch + 1 < c.epochs:
                break
        return TrainResult(self.history, start_epoch, time.perf_counter() - started,
                           c.target_pairing if c.adapts else None)

    @torch.no_grad()
    def _enqueue(self, batch: StepBatch) -> None:
        """Enqueue this step's teacher features (computed in :meth:`losses`) into the four banks."""
        if self.memory is None or self._teacher_feats is None:
            return
        feats = self._teacher_feats
        if len(feats) == 2:  # source-only step: the target banks get nothing
            empty = feats[0].new_zeros(0, feats[0].shape[1])
            feats = (*feats, empty, empty)
        # The features are the global batch's already (gathered in losses under torchrun): no second gather.
        self.memory.enqueue(*feats, source_ids=batch.source_ids, gather=False,
                            target_image_index=batch.target_image_index if len(self._teacher_feats) == 4 else None,
                            target_text_index=batch.target_text_index if len(self._teacher_feats) == 4 else None)
        self._teacher_feats = None

    @torch.no_grad()
    def warm_start(self, data: TrainingData) -> dict[str, int]:
        """Fill the four banks with the teacher's features of a seeded sample of the training data (gckd.md
        §2.2: the banks hold the most recent features of C samples per modality from the first step on).

        Per bank ``n = min(warm_start_samples or memory_size, available)`` items drawn without replacement by
        ``numpy.random.default_rng([seed, 4099])``: source pairs (image and text banks, with identities and
        pair rows), target images and target captions (with their dataset indices), in that order, each sample
        sorted by index. Teacher features in chunks of ``target_batch`` items, enqueued in sample order
        (augmentation key 0). Returns the number of items per bank."""
        c = self.config
        assert self.memory is not None
        needed = ("source_size", "source_pairs", "target_sizes", "target_images", "target_captions")
        if not all(hasattr(data, name) for name in needed):
            raise ConfigError("warm_start_banks needs training data that fetches items by index "
                              "(IndexedTrainingData, e.g. FeatureTrainingData / PersonTrainingData); set "
                              "warm_start_banks=false for other data")
        rng = np.random.default_rng([c.seed, 4099])
        wanted = c.warm_start_samples or c.memory_size
        n_images, n_captions = data.target_sizes()  # type: ignore[attr-defined]

        def sample(n: int) -> np.ndarray:
            return np.sort(rng.choice(n, size=min(wanted, n), replace=False))

        source, images, captions = sample(data.source_size()), sample(n_images), sample(n_captions)  # type: ignore
        chunk = c.target_batch
        teacher = self.teacher
        dev = self.device
        for start in range(0, source.size, chunk):
            rows = source[start:start + chunk]
            s_img, s_txt, s_mask, ids = data.source_pairs(rows, 0)  # type: ignore[attr-defined]
            _, f_v = teacher.encode_image(s_img.to(dev))
            _, f_t = teacher.encode_text(s_txt.to(dev), s_mask.to(dev) if s_mask is not None else None)
            index = torch.from_numpy(rows).to(dev)
            self.memory.source_image.enqueue(f_v, ids.to(dev), 0, gather=False, index=index)
            self.memory.source_text.enqueue(f_t, ids.to(dev), 0, gather=False, index=index)
        for start in range(0, images.size, chunk):
            rows = images[start:start + chunk]
            _, f_v = teacher.encode_image(data.target_images(rows, 0).to(dev))  # type: ignore[attr-defined]
            self.memory.target_image.enqueue(f_v, None, 1, gather=False, index=torch.from_numpy(rows).to(dev))
        for start in range(0, captions.size, chunk):
            rows = captions[start:start + chunk]
            t_txt, t_mask = data.target_captions(rows)  # type: ignore[attr-defined]
            _, f_t = teacher.encode_text(t_txt.to(dev), t_mask.to(dev) if t_mask is not None else None)
            self.memory.target_text.enqueue(f_t, None, 1, gather=False, index=torch.from_numpy(rows).to(dev))
        counts = {"source": int(source.size), "target_images": int(images.size), "target_captions": int(captions.size)}
        log.info("warm start: banks filled with the teacher features of %s", counts)
        return counts

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self, data: TrainingData) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "data": data.fingerprint(),
                "model": type(self.model).__name__, "model_config": self.model.config.to_dict()}

    def save_checkpoint(self, data: TrainingData, epoch: int) -> Path:
        assert self.checkpoint_dir is not None
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "step": self.step,
            "fingerprint": self._fingerprint(data),
            "model": self.model.state_dict(), "teacher": self.teacher.state_dict(), "gnn": self.gnn.state_dict(),
            "memory": self.memory.state_dict() if self.memory is not None else {},
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "history": self.history,
        }
        # Sealed (kind, version, SHA-256) and written atomically: a kill mid-write leaves the previous one.
        return save_torch(self.checkpoint_dir / CHECKPOINT_NAME, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)

    def _restore(self, data: TrainingData) -> int:
        if self.checkpoint_dir is None:
            raise ConfigError("resume needs a checkpoint directory")
        path = self.checkpoint_dir / CHECKPOINT_NAME
        if not path.is_file():
            return 0
        state = read_checkpoint(path)
        if not _same_fingerprint(state["fingerprint"], self._fingerprint(data), path):
            raise ConfigError(f"{path}: the checkpoint was written with a different configuration, model or data; "
                              "resume with the same settings or start a new run directory")
        try:
            self.model.load_state_dict(state["model"])
            self.teacher.load_state_dict(state["teacher"])
            self.gnn.load_state_dict(state["gnn"])
            if self.memory is not None:
                self.memory.load_state_dict(state["memory"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise FileFormatError(f"{path}: the GCKD checkpoint is inconsistent ({type(exc).__name__}: {exc})") from exc
        self.step = int(state["step"])
        self.history = list(state["history"])
        log.info("resumed from %s at epoch %d", path, state["epoch"])
        return int(state["epoch"])


def _same_fingerprint(saved: Any, current: dict[str, Any], path: Path) -> bool:
    """Whether a checkpoint's fingerprint is the current run's. Config keys the checkpoint predates take their
    :data:`LEGACY_VALUES`; of those, the :data:`START_ONLY_KEYS` are not compared (a resume never runs them)."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("config"), Mapping):
        return bool(saved == current)
    config = dict(saved["config"])
    missing = [k for k in LEGACY_VALUES if k not in config]
    config.update({k: LEGACY_VALUES[k] for k in missing})
    current_config = dict(current["config"])
    for key in START_ONLY_KEYS:
        if key in missing:
            config[key] = current_config.get(key)
    if missing:
        log.info("%s predates the GCKD config keys %s: compared with their earlier behaviour", path,
                 ", ".join(missing))
    return bool({**saved, "config": config} == {**current, "config": current_config})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a GCKD training checkpoint safely (``weights_only``); clear errors for foreign/corrupt files."""
    path = Path(path)
    state = load_torch(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "GCKD checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise FileFormatError(f"{path}: not a crossret GCKD checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise FileFormatError(f"{path}: GCKD checkpoint version {state.get('version')}; this crossret reads "
                              f"version {CHECKPOINT_VERSION}")
    return state


class _Pool(NamedTuple):
    """The target items the cross-domain ITM and the target MLM draw from (global rows): student text
    tokens ``(T, L, D_t)`` and ``mask``, image tokens ``(I, N_v, D_v)``, student features ``f_text (T, E)``,
    ``f_image (I, E)``, the text inputs ``text_ids`` (token ids or features) and the teacher's image tokens
    (None unless the target MLM is distilled)."""

    text: Tensor
    mask: Tensor | None
    image: Tensor
    f_text: Tensor
    f_image: Tensor
    text_ids: Tensor | None
    teacher_image: Tensor | None


class _Mined(NamedTuple):
    """Pseudo-pairs mined over batch ∪ banks: dataset indices ``caption (P,)``, ``image (P,)``; the sorted
    candidate indices ``text_u (T_u,)``, ``image_u (I_u,)`` and ``above (T_u, I_u)`` = teacher score ≥ δ."""

    caption: Tensor
    image: Tensor
    text_u: Tensor
    image_u: Tensor
    above: Tensor


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """``index (n,)`` → ``(values (u,), first (u,))``: the sorted distinct non-negative values and the position
    of each one's first occurrence (negative values = unknown, left out)."""
    valid = torch.nonzero(index >= 0).squeeze(1)
    values, inverse = torch.unique(index[valid], return_inverse=True)
    first = torch.full((values.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, inverse, valid, reduce="amin")
    return values, first


def _pad_cat_ids(a: Tensor, mask_a: Tensor | None, b: Tensor, mask_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Concatenate two token-id batches ``(B_a, L_a)``, ``(B_b, L_b)``, padding the shorter with id 0 and mask 0
    (feature inputs, without masks, are concatenated as they are)."""
    if mask_a is None or mask_b is None:
        return torch.cat([a, b]), None
    length = max(a.shape[1], b.shape[1])
    extra_a, extra_b = length - a.shape[1], length - b.shape[1]
    return (torch.cat([F.pad(a, (0, extra_a)), F.pad(b, (0, extra_b))]),
            torch.cat([F.pad(mask_a, (0, extra_a)), F.pad(mask_b, (0, extra_b))]))


def _check_finite(*features: Tensor, where: str) -> None:
    if not all(bool(torch.isfinite(f).all()) for f in features):
        raise NumericalError(f"GCKD: non-finite features at {where}; lower the learning rate or disable amp")


def _rows(mask: Tensor | None, idx: Tensor) -> Tensor | None:
    return None if mask is None else mask[idx]


def _pad_cat(a: Tensor, mask_a: Tensor | None, b: Tensor, mask_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Concatenate two text-token batches ``(B_a, L_a, D)``, ``(B_b, L_b, D)`` along the batch, padding the
    shorter sequence with zero tokens and zero mask (feature-heads tokens have ``L = 1`` and no mask)."""
    if mask_a is None or mask_b is None:
        return torch.cat([a, b]), None
    length = max(a.shape[1], b.shape[1])

    def pad(t: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        extra = length - t.shape[1]
        return (F.pad(t, (0, 0, 0, extra)), F.pad(m, (0, extra))) if extra else (t, m)

    (a, mask_a), (b, mask_b) = pad(a, mask_a), pad(b, mask_b)
    return torch.cat([a, b]), torch.cat([mask_a, mask_b])


__all__ = ["CHECKPOINT_FORMAT", "GckdConfig", "GckdTrainer", "TrainResult", "mlm_distill_loss", "read_checkpoint"]
