"""Source-only deep hashing: the no-adaptation lower bound for domain-adaptive methods.

A :class:`~crossret.hashing.networks.HashNet` (COUPLE's network) is trained with
labels on the **source only** — the target is never looked at, not even to normalise features —
with COUPLE's three source-side losses:

``L = w_ce · CE(Cl(f), y) + w_pair · L_pair(h, y) + w_q · mean((h − sign h)²)``

where ``L_pair`` is COUPLE's ``MSE(max(0, cos(h_i, h_j)), 1.1 S_ij)`` by default (see
:func:`~crossret.hashing.networks.pairwise_similarity_loss` for the alternatives). Adam, seeded
mini-batches, a fixed number of epochs; there is no model selection (no target labels exist).
Whatever an adaptive method adds must beat this. ``method.to("cuda")`` trains on a GPU (see
:mod:`crossret.hashing.deep`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crossret.data.domain import Domain, class_count
from crossret.errors import ConfigError, DataError
from crossret.hashing.deep import DeepHashMethod, rng_devices
from crossret.hashing.networks import (
    PAIR_LOSSES,
    check_finite_loss,
    check_finite_network,
    pairwise_similarity_loss,
    quantization_loss,
    torch_threads,
)
from crossret.hashing.preprocessing import FeatureNormalizer, bit_balance
from crossret.limits import check_threads
from crossret.progress import ProgressFn, no_progress


@dataclass
class SourceOnlyConfig:
    """Source-only training options.

    Defaults were chosen on held-out *source* retrieval only, never with target labels (the
    comparison is in docs/benchmarks.md).

    epochs: passes over the source (fixed; no early stopping).
    batch_size: source mini-batch size (pair losses use all pairs within a batch).
    lr, weight_decay: Adam.
    encoder_dim: encoder width ``e``; ``None`` → ``min(d, 1024)``.
    hash_hidden: hidden width of the hash head (COUPLE: 1024); 0 = a single linear layer.
    dropout: after hidden ReLUs.
    standardize: z-score features with source statistics (else only centre).
    pair_loss: ``couple`` | ``cosine`` | ``dpsh``.
    ce_weight, pair_weight, quant_weight: loss weights.
    num_threads: torch CPU threads while training; these small MLPs train fastest on one thread,
        and multi-threaded torch is much slower when the cores are shared. 0 = leave torch's setting.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    encoder_dim: int | None = None
    hash_hidden: int = 1024
    dropout: float = 0.0
    standardize: bool = False
    pair_loss: str = "couple"
    ce_weight: float = 1.0
    pair_weight: float = 10.0
    quant_weight: float = 0.1
    num_threads: int = 1

    def validate(self) -> None:
        def positive_int(key: str) -> None:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"source-only: {key} must be a positive integer, got {value!r}")

        positive_int("epochs")
        positive_int("batch_size")
        check_threads(self.num_threads, "source-only: num_threads")
        if self.batch_size < 2:
            raise ConfigError("source-only: batch_size must be >= 2 (batch norm and pair losses)")
        if self.encoder_dim is not None:
            positive_int("encoder_dim")
        if not isinstance(self.hash_hidden, int) or self.hash_hidden < 0:
            raise ConfigError(f"source-only: hash_hidden must be an integer >= 0, got {self.hash_hidden!r}")
        for key in ("lr", "weight_decay", "dropout", "ce_weight", "pair_weight", "quant_weight"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
                raise ConfigError(f"source-only: {key} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ConfigError(f"source-only: lr must be > 0, got {self.lr!r}")
        if self.dropout >= 1:
            raise ConfigError(f"source-only: dropout must be < 1, got {self.dropout!r}")
        if self.pair_loss not in PAIR_LOSSES:
            raise ConfigError(f"source-only: pair_loss must be one of {', '.join(PAIR_LOSSES)}, got {self.pair_loss!r}")
        if not isinstance(self.standardize, bool):
            raise ConfigError(f"source-only: standardize must be true or false, got {self.standardize!r}")


class SourceOnly(DeepHashMethod):
    """HashNet trained on labelled source data only (no target adaptation)."""

    name = "source-only"
    config_class = SourceOnlyConfig

    def fit(self, source: Domain, target: Domain, progress: ProgressFn = no_progress) -> SourceOnly:
        # `target` is deliberately unused: this is the no-adaptation baseline.
        start = time.perf_counter()
        cfg = self.config
        source.require_labels()
        self.check_sizes(source, target)
        labels_np = source.labels
        num_classes = class_count(labels_np, "source-only source labels")
        self.normalizer = FeatureNormalizer(center=True, scale=cfg.standardize).fit(source.features)
        x_host = torch.from_numpy(self.normalizer.transform(source.features, dtype=np.float32))
        y_host = torch.from_numpy(labels_np)
        device = self.device
        x, y = x_host.to(device), y_host.to(device)  # the same tensors on the CPU
        n = x.shape[0]
        if n < 2:
            raise DataError("source-only: needs at least 2 labelled source samples")
        batch = min(cfg.batch_size, n)
        generator = torch.Generator().manual_seed(self.seed)

        # fork_rng: seed init and dropout without disturbing the caller's global torch RNG.
        with torch.random.fork_rng(devices=rng_devices(device)), torch_threads(cfg.num_threads):
            torch.manual_seed(self.seed)
            net = self._build(source.dim, num_classes)
            optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            net.train()
            sums: dict[str, float] = {}
            for epoch in range(cfg.epochs):
                order = torch.randperm(n, generator=generator)
                sums = {"ce": 0.0, "pair": 0.0, "quant": 0.0, "total": 0.0}
                steps = 0
                for lo in range(0, n, batch):
                    idx = order[lo : lo + batch]
                    if idx.numel() < 2:  # batch norm cannot train on a single sample
                        continue
                    idx = idx.to(device)  # drawn on the CPU generator on every device
                    out = net(x[idx])
                    ce = F.cross_entropy(out.logits, y[idx])
                    pair = pairwise_similarity_loss(out.hash, y[idx], cfg.pair_loss)
                    quant = quantization_loss(out.hash)
                    total = cfg.ce_weight * ce + cfg.pair_weight * pair + cfg.quant_weight * quant
                    check_finite_loss(total, {"ce": ce, "pair": pair, "quant": quant},
                                      where=f"source-only: epoch {epoch + 1}, step {steps + 1}", lr=cfg.lr)
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    optimizer.step()
                    # One device-to-host copy per step for the four running sums.
                    values = torch.stack([ce, pair, quant, total]).detach().tolist()
                    for key, value in zip(("ce", "pair", "quant", "total"), values, strict=True):
                        sums[key] += value
                    steps += 1
                sums = {k: v / max(steps, 1) for k, v in sums.items()}
                progress(
                    epoch + 1,
                    cfg.epochs,
                    f"source-only: epoch {epoch + 1}/{cfg.epochs} loss {sums['total']:.4f} "
                    f"(ce {sums['ce']:.4f}, pair {sums['pair']:.4f}, quant {sums['quant']:.4f})",
                )
        check_finite_network(net, where="source-only", lr=cfg.lr)
        net.eval()
        self.network = net
        self.num_classes = num_classes
        self.input_dim = source.dim
        train_seconds = time.perf_counter() - start

        hash_out, logits = self._forward_eval(x)  # on the CPU
        self.diagnostics = {
            "n_source": int(n),
            "num_classes": num_classes,
            "epochs": cfg.epochs,
            "steps_per_epoch": -(-n // batch),
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "final_loss": sums.get("total"),
            "final_ce_loss": sums.get("ce"),
            "final_pair_loss": sums.get("pair"),
            "final_quant_loss": sums.get("quant"),
            "source_train_accuracy": float((logits.argmax(1) == y_host).float().mean()),
            "source_mean_abs_hash": float(hash_out.abs().mean()),
            "train_bit_balance": bit_balance(hash_out.numpy()),
            "feature_rescale": self.normalizer.global_scale,
            "fit_seconds": train_seconds,
            "device": str(device),
        }
        return self
