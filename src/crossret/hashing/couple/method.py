"""The :class:`Couple` hashing method: COUPLE's training loop (refreshes, epochs, steps) and its reports.

The pieces it runs live beside it: the options in :mod:`~crossret.hashing.couple.config`, the graph
refresh in :mod:`~crossret.hashing.couple.selection`, the per-step losses and Mixup pairs in
:mod:`~crossret.hashing.couple.terms`, the checkpoints in :mod:`~crossret.hashing.couple.checkpoint`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

import crossret.distributed as distributed
from crossret.data.domain import Domain, class_count
from crossret.errors import ConfigError, DataError
from crossret.hashing.couple.checkpoint import (
    CHECKPOINT_NAME,
    Trainee,
    data_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from crossret.hashing.couple.config import CoupleConfig
from crossret.hashing.couple.selection import Selection, refresh
from crossret.hashing.couple.terms import (
    LOSS_KEYS,
    Pairs,
    add_mixup_losses,
    batch_losses,
    cycled_permutation,
    loss_values,
    mixup_pairs,
    sharded_forward,
    weighted_total,
)
from crossret.hashing.deep import DeepHashMethod, rng_devices
from crossret.hashing.networks import HashNet, check_finite_loss, check_finite_network, torch_threads
from crossret.hashing.preprocessing import FeatureNormalizer, bit_balance, fit_per_domain
from crossret.limits import check_memory
from crossret.progress import ProgressFn, no_progress


@dataclass
class _Run:
    """One ``fit``'s training state between epochs."""

    trainee: Trainee
    rng: np.random.Generator  # walks and Mixup positions
    fingerprint: str  # of the training data, recorded in checkpoints
    steps: int  # per epoch
    first_epoch: int = 0  # > 0 when resumed
    selection: Selection | None = None
    epoch_log: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _EpochData:
    """What every step of an epoch reads besides the network."""

    x_all: torch.Tensor  # (n_s + n_t, d) network inputs, source rows first, on the device
    y_source: torch.Tensor  # (n_s,) int64 on the device
    n_s: int
    num_classes: int
    selection: Selection | None
    pseudo: torch.Tensor | None  # (n_t,) the selection's pseudo-labels on the device
    selected: torch.Tensor | None  # (n_t,) bool on the device
    u_max: float  # the Mixup position limit this epoch


class Couple(DeepHashMethod):
    """COUPLE domain-adaptive hashing (see :mod:`crossret.hashing.couple`)."""

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
        """Train on the labelled ``source`` and the unlabelled ``target`` (see :mod:`crossret.hashing.couple`),
        continuing from ``checkpoint_dir`` when ``resume`` is set and a checkpoint is there."""
        start_time = time.perf_counter()
        cfg = self.config
        num_classes = self._check_training_data(source, target)
        x_all = self._fit_normalizers(source, target)
        y_source = torch.from_numpy(source.labels).to(self.device)
        fingerprint = data_fingerprint(source, target)

        with torch.random.fork_rng(devices=rng_devices(self.device)), torch_threads(cfg.num_threads):
            run = self._start(source, target, num_classes, fingerprint)
            for epoch in range(run.first_epoch, cfg.epochs):
                record = self._run_epoch(run, epoch, x_all, y_source, source.labels, num_classes)
                progress(epoch + 1, cfg.epochs, _progress_message(record, cfg.epochs))

        self._finish(run, x_all, source, target, num_classes, start_time)
        return self

    def _check_training_data(self, source: Domain, target: Domain) -> int:
        """Refuse data or settings COUPLE cannot train on; returns the number of source classes."""
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
        self.check_sizes(source, target)
        return num_classes

    def _fit_normalizers(self, source: Domain, target: Domain) -> torch.Tensor:
        """Fit the input normalisers and return the normalised inputs ``(n_s + n_t, d)`` on the device."""
        # Normalisation statistics from the *training* data only (unlabelled target included).
        if self.config.center_per_domain:
            self.source_normalizer, self.normalizer = fit_per_domain(source.features, target.features)
        else:
            self.source_normalizer = None
            self.normalizer = FeatureNormalizer(center=True, scale=False).fit(
                np.concatenate([source.features, target.features]))
        source_normalizer = self.source_normalizer or self.normalizer
        # The network's inputs on its device (the same tensors on the CPU); graphs read them back on the CPU.
        x_all = torch.from_numpy(np.concatenate([source_normalizer.transform(source.features, dtype=np.float32),
                                                 self.normalizer.transform(target.features, dtype=np.float32)]))
        return x_all.to(self.device)

    def _start(self, source: Domain, target: Domain, num_classes: int, fingerprint: str) -> _Run:
        """Seeded network, optimiser, EMA and generators; restored from the checkpoint when resuming."""
        cfg = self.config
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
        n_s, n_t = source.n, target.n
        steps = max(-(-n_s // min(cfg.batch_size, n_s)), -(-n_t // min(cfg.target_batch_size, n_t)))
        run = _Run(Trainee(net, optimizer, generator, self._ema), np.random.default_rng(self.seed), fingerprint,
                   steps)
        self.selection_history = []
        if self.resume and self.checkpoint_dir is not None and distributed.is_main():
            from crossret.storage.atomic import remove_stale_temporaries

            remove_stale_temporaries(self.checkpoint_dir)  # of checkpoint writes killed before their rename
        restored = self._restore(net, optimizer, generator, fingerprint) if self.resume else None
        if restored is not None:
            run.first_epoch, run.selection, run.epoch_log, rng_state = restored
            run.rng.bit_generator.state = rng_state
        return run

    def _run_epoch(self, run: _Run, epoch: int, x_all: torch.Tensor, y_source: torch.Tensor,
                   source_labels: np.ndarray, num_classes: int) -> dict[str, Any]:
        """One epoch: the graph refresh when due, the steps, the checkpoint; returns the epoch's record."""
        cfg = self.config
        net, n_s = run.trainee.net, source_labels.shape[0]
        epoch_start = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1}
        if epoch >= cfg.warmup_epochs and (run.selection is None
                                           or (epoch - cfg.warmup_epochs) % cfg.graph_every == 0):
            # Under torchrun rank 0 builds the graph and diffuses; every rank gets its selection.
            run.selection, refresh_info = distributed.run_on_main(
                partial(self._refresh, self._teacher(net), x_all, source_labels, n_s, num_classes, run.selection,
                        self._select_ratio_at(epoch)))
            record.update(refresh_info)
            self.selection_history.append({
                "epoch": epoch + 1,
                "selected": np.flatnonzero(run.selection.selected),
                "pseudo_labels": run.selection.pseudo_labels.copy(),
            })
        progress_u = epoch / max(cfg.epochs - 1, 1)
        u_max = cfg.mix_start + (cfg.mix_end - cfg.mix_start) * progress_u
        with distributed.global_batchnorm(net):  # BatchNorm sees the global batch under torchrun
            sums = self._train_epoch(net, run.trainee.optimizer, run.trainee.generator, run.rng, x_all, y_source,
                                     n_s, x_all.shape[0] - n_s, num_classes, run.selection, run.steps, u_max)
        record.update(sums)
        record["seconds"] = round(time.perf_counter() - epoch_start, 4)
        run.epoch_log.append(record)
        if self.checkpoint_dir is not None:  # rank 0 writes, the others wait
            distributed.run_on_main(partial(self._save_checkpoint, run, epoch + 1))
        return record

    def _finish(self, run: _Run, x_all: torch.Tensor, source: Domain, target: Domain, num_classes: int,
                start_time: float) -> None:
        """Keep the trained (teacher) network and record the diagnostics (``start_time``: when ``fit`` began)."""
        net = self._teacher(run.trainee.net)
        check_finite_network(net, where="couple", lr=self.config.lr)
        net.eval()
        self.network, self.num_classes, self.input_dim = net, num_classes, source.dim
        hash_out = self._forward_eval(x_all)[0]  # on the CPU
        final = run.epoch_log[-1] if run.epoch_log else {}
        self.diagnostics = {
            "n_source": source.n,
            "n_target": target.n,
            "num_classes": num_classes,
            "steps_per_epoch": run.steps,
            "parameters": int(sum(p.numel() for p in net.parameters())),
            "final_losses": {k: v for k, v in final.items() if k.startswith("loss_")},
            "train_bit_balance": bit_balance(hash_out.numpy()),
            "feature_rescale": self.normalizer.global_scale,
            "resumed_from_epoch": run.first_epoch,
            "fit_seconds": round(time.perf_counter() - start_time, 4),
            "device": str(self.device),
            "epochs": run.epoch_log,
        }

    def _train_epoch(self, net: HashNet, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                     rng: np.random.Generator, x_all: torch.Tensor, y_source: torch.Tensor, n_s: int, n_t: int,
                     num_classes: int, selection: Selection | None, steps: int, u_max: float) -> dict[str, float]:
        """``steps`` optimiser steps over cycled random batches; returns the mean of each loss term and
        the number of mixed samples."""
        cfg = self.config
        net.train()
        device = x_all.device
        bs_s, bs_t = min(cfg.batch_size, n_s), min(cfg.target_batch_size, n_t)
        # Drawn on the CPU generator on every device; the walks read the CPU copies, the network the others.
        source_order = cycled_permutation(n_s, steps * bs_s, generator)
        target_order = cycled_permutation(n_t, steps * bs_t, generator)
        source_order_dev, target_order_dev = source_order.to(device), target_order.to(device)
        data = _EpochData(x_all, y_source, n_s, num_classes, selection, None, None, u_max)
        if selection is not None:
            data.pseudo = torch.from_numpy(selection.pseudo_labels).to(device)
            data.selected = torch.from_numpy(selection.selected).to(device)
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        mixed_samples = 0
        for step in range(steps):
            batch_s, batch_t = slice(step * bs_s, (step + 1) * bs_s), slice(step * bs_t, (step + 1) * bs_t)
            values, mixed = self._train_step(net, optimizer, rng, data, source_order[batch_s],
                                             target_order[batch_t], source_order_dev[batch_s],
                                             target_order_dev[batch_t], f"couple: step {step + 1}/{steps} of an epoch")
            mixed_samples += mixed
            for key, value in zip(LOSS_KEYS, values, strict=True):
                sums[key] += value
        out = {k: round(v / steps, 6) for k, v in sums.items()}
        out["mixed_samples"] = mixed_samples
        return out

    def _train_step(self, net: HashNet, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
                    data: _EpochData, src_host: torch.Tensor, tgt_host: torch.Tensor, src: torch.Tensor,
                    tgt: torch.Tensor, where: str) -> tuple[list[float], int]:
        """One optimiser step on the batch ``src`` + ``tgt`` (``*_host``: the same indices on the CPU);
        returns ``[total, *terms]`` as :data:`~crossret.hashing.couple.terms.LOSS_KEYS` and the number of
        mixed samples."""
        cfg = self.config
        out = sharded_forward(net, data.x_all[src], data.x_all[data.n_s + tgt])
        losses, f_s, f_t = batch_losses(cfg, out, src.shape[0], data.y_source[src], tgt, data.pseudo,
                                        data.selected)
        mixed = 0
        if data.selection is not None and (cfg.mixup_low or cfg.mixup_high):
            assert data.pseudo is not None
            pairs = self._mixup_pairs(rng, data.selection, src_host.numpy(), tgt_host.numpy(), f_s, f_t, data.n_s,
                                      data.u_max)
            if pairs is not None:
                mixed = int(pairs[0].size)
                add_mixup_losses(losses, cfg, net, data.x_all, pairs, data.n_s, data.y_source, data.pseudo,
                                 data.num_classes)
        total = weighted_total(cfg, losses)
        check_finite_loss(total, losses, where=where, lr=cfg.lr)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        distributed.average_gradients(net.parameters())  # a no-op in one process
        optimizer.step()
        if self._ema is not None:
            self._ema.update_parameters(net)
        return loss_values(total, losses), mixed

    def _mixup_pairs(self, rng: np.random.Generator, selection: Selection, src: np.ndarray, tgt: np.ndarray,
                     f_s: torch.Tensor, f_t: torch.Tensor, n_s: int, u_max: float) -> Pairs | None:
        """Node pairs ``(a, b)`` and source-side weights ``λ`` of the mixed samples
        (:func:`~crossret.hashing.couple.terms.mixup_pairs`)."""
        return mixup_pairs(self.config, rng, selection, src, tgt, f_s, f_t, n_s, u_max)

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
                 previous: Selection | None, ratio: float) -> tuple[Selection, dict[str, Any]]:
        """Rebuild the graph on the current features, diffuse, and select the low-noise targets
        (:func:`~crossret.hashing.couple.selection.refresh`)."""
        return refresh(self.config, net, x_all, source_labels, n_s, num_classes, previous, ratio)

    # ------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to resume: method, bits, seed and config."""
        return {"method": self.name, "bits": self.bits, "seed": self.seed, "config": asdict(self.config)}

    def _save_checkpoint(self, run: _Run, epochs_done: int) -> None:
        assert self.checkpoint_dir is not None and self.normalizer is not None
        save_checkpoint(self.checkpoint_dir / CHECKPOINT_NAME, self._identity(), run.trainee, run.rng, epochs_done,
                        run.selection, run.epoch_log, run.fingerprint, self.selection_history)

    def _restore(self, net: HashNet, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                 fingerprint: str) -> tuple[int, Selection | None, list[dict[str, Any]], dict[str, Any]] | None:
        """Load ``checkpoint_dir/checkpoint.pt`` if present; ``None`` when there is nothing to resume."""
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / CHECKPOINT_NAME
        if not path.is_file():
            return None
        resumed = load_checkpoint(path, self._identity(), fingerprint, Trainee(net, optimizer, generator, self._ema))
        self.selection_history = resumed.history
        return resumed.epochs_done, resumed.selection, resumed.epoch_log, resumed.numpy_rng

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


def _progress_message(record: dict[str, Any], epochs: int) -> str:
    text = f"couple: epoch {record['epoch']}/{epochs} loss {record.get('loss_total', 0.0):.4f}"
    parts = [f"{name} {record[key]:.4f}" for name, key in (("ce", "loss_ce"), ("tce", "loss_target_ce"),
                                                          ("rel", "loss_relation"), ("mix", "loss_mix_low"))
             if key in record]
    if "selected" in record:
        parts.append(f"selected {record['selected']}")
    return text + " (" + ", ".join(parts) + ")"
