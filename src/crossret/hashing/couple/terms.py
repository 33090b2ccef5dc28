"""COUPLE's per-step pieces: batch orders, the sharded forward, the loss terms and the Mixup pairs.

With ``f = E(x)``, ``h = H(f)`` and ``s``/``t`` the batch's source/target rows (Luo et al., IEEE TIP 2025,
§3.3–3.4):

* ``L_ce  = CE(Cl(f_s), y_s) + CE(Cl(f_t), ŷ_t)``, the target term averaged over selected targets;
* ``L_q   = ρ₂ MSE(h_s, sign h_s) + (1 − ρ₂) MSE(h_t, sign h_t)``;
* ``L_rel = ρ₃ MSE(relu(cos(h_i, h_j)), 1.1 S_ij) + (1 − ρ₃) MSE(cos(f_s, f_t), relu(cos(h_s, h_t)))``;
* ``L_low``, ``L_high``: hierarchical Mixup of node pairs ``(a, b)`` with weight ``λ`` on ``a`` and the
  soft label ``λ y_a + (1 − λ) y_b``: of the inputs through the whole network (low level) and of the
  encoder features through the classifier (high level).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import crossret.distributed as distributed
from crossret.graph.walks import random_walks
from crossret.hashing.couple.config import CoupleConfig
from crossret.hashing.couple.selection import Selection
from crossret.hashing.networks import HashNet, HashNetOutput, quantization_loss

# The running sums an epoch reports, ``loss_total`` first, then each term in this order.
LOSS_KEYS = ("loss_total", "loss_ce", "loss_target_ce", "loss_target_im", "loss_coral", "loss_quant",
             "loss_relation", "loss_mix_low", "loss_mix_high")

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # node ids a (m,), b (m,) and the weight λ (m,) of a


def cycled_permutation(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``length`` indices from back-to-back random permutations of ``range(n)``."""
    rounds = -(-length // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(rounds)])[:length]


def sharded_forward(net: HashNet, *groups: torch.Tensor) -> HashNetOutput:
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


def batch_losses(cfg: CoupleConfig, out: HashNetOutput, bs_s: int, y_s: torch.Tensor, tgt: torch.Tensor,
                 pseudo: torch.Tensor | None, selected: torch.Tensor | None
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every term but Mixup on one batch: ``out`` holds ``bs_s`` source rows, then the targets ``tgt``.

    ``pseudo``/``selected`` (``(n_t,)``, on the device) are ``None`` before the first refresh. Returns the
    terms keyed as :data:`LOSS_KEYS` (both Mixup terms zero) and the features ``f_s``, ``f_t``.
    """
    f_s, f_t = out.features[:bs_s], out.features[bs_s:]
    h_s, h_t = out.hash[:bs_s], out.hash[bs_s:]
    logits_s, logits_t = out.logits[:bs_s], out.logits[bs_s:]

    loss_ce = F.cross_entropy(logits_s, y_s)
    zero = logits_s.new_zeros(())
    loss_target_ce = zero
    rel_hash, rel_labels = h_s, y_s
    if pseudo is not None and selected is not None:
        chosen = selected[tgt]
        if chosen.any():
            loss_target_ce = F.cross_entropy(logits_t[chosen], pseudo[tgt][chosen])
            if cfg.target_relation:
                rel_hash = torch.cat([h_s, h_t[chosen]])
                rel_labels = torch.cat([y_s, pseudo[tgt][chosen]])
    loss_coral = coral(f_s, f_t) if cfg.coral_weight > 0 else zero
    loss_im = zero
    if cfg.target_im_weight > 0:
        loss_im = information_maximisation(logits_t)
    loss_quant = (cfg.quant_source_ratio * quantization_loss(h_s)
                  + (1 - cfg.quant_source_ratio) * quantization_loss(h_t))
    same = (rel_labels[:, None] == rel_labels[None, :]).float()
    semantic = F.mse_loss(F.relu(cosine_matrix(rel_hash, rel_hash)), 1.1 * same)
    structure = F.mse_loss(cosine_matrix(f_s, f_t), F.relu(cosine_matrix(h_s, h_t)))
    loss_relation = cfg.relation_source_ratio * semantic + (1 - cfg.relation_source_ratio) * structure
    losses = dict(zip(LOSS_KEYS[1:], (loss_ce, loss_target_ce, loss_im, loss_coral, loss_quant, loss_relation,
                                      zero, zero), strict=True))
    return losses, f_s, f_t


def add_mixup_losses(losses: dict[str, torch.Tensor], cfg: CoupleConfig, net: HashNet, x_all: torch.Tensor,
                     pairs: Pairs, n_s: int, y_source: torch.Tensor, pseudo: torch.Tensor, num_classes: int) -> None:
    """Set ``losses["loss_mix_low"]`` and ``losses["loss_mix_high"]`` from the mixed samples ``pairs``
    (a level that is off, or low level with fewer than 2 samples, keeps its zero).

    Low level: ``λ x_a + (1 − λ) x_b`` through the network, soft cross-entropy to the soft label. High
    level: ``λ f_a + (1 − λ) f_b`` (encoder run in eval mode, detached unless ``high_mixup_detach`` is
    off) through the classifier, MSE on the logits or soft cross-entropy.
    """
    a, b, lam = pairs
    device = x_all.device
    lam_t = torch.from_numpy(lam.astype(np.float32)).to(device)[:, None]
    label_a = node_labels(a, n_s, y_source, pseudo)
    label_b = node_labels(b, n_s, y_source, pseudo)
    soft = (lam_t * F.one_hot(label_a, num_classes).float()
            + (1 - lam_t) * F.one_hot(label_b, num_classes).float())
    a_dev, b_dev = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    if cfg.mixup_low and a.size > 1:  # batch norm needs 2 samples
        mixed = lam_t * x_all[a_dev] + (1 - lam_t) * x_all[b_dev]
        losses["loss_mix_low"] = soft_cross_entropy(sharded_forward(net, mixed).logits, soft)
    if cfg.mixup_high:
        with torch.set_grad_enabled(not cfg.high_mixup_detach):
            was_training = net.training
            net.eval()  # running BN statistics: the extra forward must not shift them
            f_a, f_b = net.encoder(x_all[a_dev]), net.encoder(x_all[b_dev])
            net.train(was_training)
        mixed_f = lam_t * f_a + (1 - lam_t) * f_b
        logits = net.classifier(mixed_f)
        losses["loss_mix_high"] = (F.mse_loss(logits, soft) if cfg.high_mixup_loss == "mse"
                                   else soft_cross_entropy(logits, soft))


def weighted_total(cfg: CoupleConfig, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """``L = w_ce L_ce + w_tce L_tce + w_im L_im + w_coral L_coral + w_q L_q + w_rel L_rel + w_low L_low
    + w_high L_high``, summed in that order."""
    return (cfg.ce_weight * losses["loss_ce"] + cfg.target_ce_weight * losses["loss_target_ce"]
            + cfg.target_im_weight * losses["loss_target_im"] + cfg.coral_weight * losses["loss_coral"]
            + cfg.quant_weight * losses["loss_quant"] + cfg.relation_weight * losses["loss_relation"]
            + cfg.low_mixup_weight * losses["loss_mix_low"] + cfg.high_mixup_weight * losses["loss_mix_high"])


def mixup_pairs(cfg: CoupleConfig, rng: np.random.Generator, selection: Selection, src: np.ndarray,
                tgt: np.ndarray, f_s: torch.Tensor, f_t: torch.Tensor, n_s: int, u_max: float) -> Pairs | None:
    """Node pairs ``(a, b)`` and source-side weights ``λ`` of a batch's mixed samples; ``None`` if none.

    ``random-walk`` (§3.4): walks from the batch sources ``src`` (transition ∝ weight) stop at the first
    target node; those ending in a selected target are mixed at ``u ~ U[0, u_max]·len`` along the path,
    between ``a = v_k`` and ``b = v_{k+1}`` with ``λ = 1 − (u − k)`` (``consecutive``), or between the
    walk's ends with ``λ = 1 − u``, ``u ~ U[0, u_max]`` (``endpoints``). ``nearest``: each selected batch
    target with its nearest batch source (cosine of ``f_t``, ``f_s``), mixed as a one-move path.
    """
    if cfg.pairing == "nearest":
        # Ablation / the released code: each selected batch target with its nearest batch source.
        chosen = np.flatnonzero(selection.selected[tgt])
        if chosen.size == 0:
            return None
        with torch.no_grad():
            chosen_t = torch.from_numpy(chosen).to(f_t.device)
            nearest = cosine_matrix(f_t[chosen_t], f_s).argmax(dim=1).cpu().numpy()
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


def node_labels(nodes: np.ndarray, n_s: int, y_source: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """Labels of graph nodes: source labels, then target pseudo-labels (on ``y_source``'s device)."""
    nodes_t = torch.from_numpy(nodes).to(y_source.device)
    is_source = nodes_t < n_s
    labels = torch.empty(nodes.size, dtype=torch.int64, device=y_source.device)
    labels[is_source] = y_source[nodes_t[is_source]]
    labels[~is_source] = pseudo[nodes_t[~is_source] - n_s]
    return labels


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """``mean_i −Σ_c q_ic log softmax(z_i)_c`` for logits ``z (B, C)`` and soft labels ``q (B, C)``."""
    return -(soft_targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines ``(m, n)`` of the rows of ``a (m, e)`` and ``b (n, e)``."""
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def coral(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """CORAL: ``||C_s − C_t||_F² / (4 e²)`` with ``C`` the unbiased feature covariances, ``e`` the
    width (Sun & Saenko, "Deep CORAL", ECCV Workshops 2016). ``f_s (B_s, e)``, ``f_t (B_t, e)``."""
    def covariance(f: torch.Tensor) -> torch.Tensor:
        centred = f - f.mean(dim=0, keepdim=True)
        return centred.T @ centred / max(f.shape[0] - 1, 1)

    width = f_s.shape[1]
    return ((covariance(f_s) - covariance(f_t)) ** 2).sum() / (4 * width * width)


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """``mean_i H(p_i) − H(p̄)`` with ``p = softmax(logits)``, ``p̄`` the batch mean (SHOT, ICML 2020).

    Low when each prediction is confident (first term) and the batch uses every class (second).
    """
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    mean_p = p.mean(dim=0)
    return -(p * log_p).sum(dim=1).mean() + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()


def loss_values(total: torch.Tensor, losses: dict[str, torch.Tensor]) -> list[float]:
    """``[total, *losses]`` as floats, with one device-to-host copy."""
    return torch.stack([total, *losses.values()]).detach().tolist()
