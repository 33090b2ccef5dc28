"""Contrastive, matching and distillation losses of ALBEF (Li et al., NeurIPS 2021) and GCKD
(Luo et al., AAAI 2025; docs/gckd.md).

Notation: ``B`` batch rows, ``M`` candidate columns (the other modality's batch, optionally followed by
a queue / memory bank, as ALBEF's ``cat([feat_m.t(), queue])`` — the first ``B`` candidates are the
rows' own pairs), ``D`` feature dim, τ temperature. All features are L2-normalised.

GMP loss reading (docs/gckd.md, A8): GCKD gives no separate graph loss. Its GNN is trained by
(a) the target contrastive KD, whose teacher targets come from propagated teacher features
(:func:`momentum_similarity_targets` on ``z'`` + :func:`soft_contrastive_loss`, i.e. :func:`cmkd_loss`),
and (b) an identity-aware ITC on the propagated *source* features — :func:`itc_loss` on ``z^s`` with ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crossret.errors import ConfigError, DataError


def soft_contrastive_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``−(1/B) Σ_i Σ_j q_ij log softmax(logits)_ij`` for ``logits, targets (B, M)`` (rows of q sum to 1)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets.float()).sum(dim=1).mean()


def _hard_targets(n_rows: int, n_cols: int, ids: Tensor | None, cand_ids: Tensor | None, device: torch.device
                  ) -> Tensor:
    """Row-normalised positive mask ``(B, M)``: the own pair (column ``i``) always, plus with ids every
    column of the same non-negative identity (ALBEF retrieval ``idx`` targets / RaSa)."""
    pos = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=device)
    diag = torch.arange(min(n_rows, n_cols), device=device)
    pos[diag, diag] = True
    if ids is not None:
        cand = ids if cand_ids is None else cand_ids
        if cand.shape[0] != n_cols:
            raise DataError(f"itc: need {n_cols} candidate ids, got {cand.shape[0]}")
        # -1 marks an unknown identity: it matches nothing (but its own pair, via the diagonal).
        pos |= (ids.view(-1, 1) == cand.view(1, -1).to(ids.device)) & (ids.view(-1, 1) >= 0)
    pos = pos.float()
    return pos / pos.sum(dim=1, keepdim=True)


def itc_loss(image_feat: Tensor, text_feat: Tensor, temp: float | Tensor, ids: Tensor | None = None,
             soft_targets: tuple[Tensor, Tensor] | None = None, alpha: float = 0.4, *,
             text_candidates: Tensor | None = None, image_candidates: Tensor | None = None,
             candidate_ids: Tensor | None = None) -> Tensor:
    """Symmetric image↔text InfoNCE (ALBEF ``loss_ita``; identity-aware as ALBEF retrieval / RaSa).

    ``s_i2t = f_v (B, D) · T_candᵀ / τ`` with ``T_cand (M, D)`` (default ``text_feat``), and
    ``s_t2i = f_t · V_candᵀ / τ`` likewise. Hard targets ``y (B, M)``: 1 on the own pair (column i) and,
    with ``ids (B,)`` (candidate ids default to ``ids``), on every candidate of the same identity,
    normalised per row. With momentum distillation ``soft_targets = (q_i2t, q_t2i)`` (each ``(B, M)``,
    from :func:`momentum_similarity_targets`) the target is ``(1 − α)·y + α·q``. Returns the scalar
    ``½ (CE(s_i2t, y_i2t) + CE(s_t2i, y_t2i))`` with soft-label cross-entropy averaged over rows.
    """
    t_cand = text_feat if text_candidates is None else text_candidates
    v_cand = image_feat if image_candidates is None else image_candidates
    if image_feat.shape[0] != text_feat.shape[0] or t_cand.shape[0] != v_cand.shape[0]:
        raise DataError(f"itc_loss: batch/candidate sizes differ: {image_feat.shape[0]} vs {text_feat.shape[0]}, "
                        f"{t_cand.shape[0]} vs {v_cand.shape[0]}")
    sim_i2t = image_feat.float() @ t_cand.float().T / temp
    sim_t2i = text_feat.float() @ v_cand.float().T / temp
    hard = _hard_targets(sim_i2t.shape[0], sim_i2t.shape[1], ids, candidate_ids, sim_i2t.device)
    t_i2t, t_t2i = hard, hard
    if soft_targets is not None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"itc_loss: alpha={alpha} must be in [0, 1]")
        q_i2t, q_t2i = soft_targets
        if q_i2t.shape != sim_i2t.shape or q_t2i.shape != sim_t2i.shape:
            raise DataError(f"itc_loss: soft targets must be {tuple(sim_i2t.shape)}, got {tuple(q_i2t.shape)}, "
                            f"{tuple(q_t2i.shape)}")
        t_i2t = (1.0 - alpha) * hard + alpha * q_i2t.detach().float()
        t_t2i = (1.0 - alpha) * hard + alpha * q_t2i.detach().float()
    return 0.5 * (soft_contrastive_loss(sim_i2t, t_i2t) + soft_contrastive_loss(sim_t2i, t_t2i))


@torch.no_grad()
def momentum_similarity_targets(teacher_image_feat: Tensor, teacher_text_feat: Tensor, temp: float | Tensor, *,
                                text_candidates: Tensor | None = None, image_candidates: Tensor | None = None
                                ) -> tuple[Tensor, Tensor]:
    """ALBEF momentum-distillation targets (GCKD pseudo-similarity targets, docs/gckd.md):
    ``q_i2t = softmax(f'_v · T'_candᵀ / τ)``, ``q_t2i = softmax(f'_t · V'_candᵀ / τ)``, each ``(B, M)``.

    Candidates default to the teacher batch of the other modality; for GCKD's target KD pass the
    propagated teacher features ``z'`` and ``[z'_v(batch); M_v^t]`` (and the text analogue).
    """
    t_cand = teacher_text_feat if text_candidates is None else text_candidates
    v_cand = teacher_image_feat if image_candidates is None else image_candidates
    q_i2t = F.softmax(teacher_image_feat.float() @ t_cand.float().T / temp, dim=1)
    q_t2i = F.softmax(teacher_text_feat.float() @ v_cand.float().T / temp, dim=1)
    return q_i2t, q_t2i


def cmkd_loss(student_image_feat: Tensor, student_text_feat: Tensor, targets: tuple[Tensor, Tensor],
              temp: float | Tensor, *, text_candidates: Tensor, image_candidates: Tensor,
              min_confidence: float | None = None) -> Tensor:
    """GCKD target contrastive KD ``L_cmkd^t = ½ Σ_dir CE(P'_dir, softmax(s_dir))`` (docs/gckd.md).

    ``s_i2t = f_v (B, D) · T_candᵀ / τ``, ``s_t2i = f_t · V_candᵀ / τ`` (candidates ``(M, D)``, typically
    teacher batch + target memory); ``targets = (P'_i2t, P'_t2i)`` each ``(B, M)``. With
    ``min_confidence`` the rows whose ``max P'`` is below it are dropped (the optional confidence mask);
    a direction with no row left contributes 0 (still connected to the graph).
    """
    losses = []
    for feat, cand, target in ((student_image_feat, text_candidates, targets[0]),
                               (student_text_feat, image_candidates, targets[1])):
        logits = feat.float() @ cand.float().T / temp
        if logits.shape != target.shape:
            raise DataError(f"cmkd_loss: targets must be {tuple(logits.shape)}, got {tuple(target.shape)}")
        keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if min_confidence is not None:
            keep = target.max(dim=1).values >= min_confidence
        losses.append(soft_contrastive_loss(logits[keep], target[keep].detach()) if bool(keep.any())
                      else logits.sum() * 0.0)
    return 0.5 * (losses[0] + losses[1])


@torch.no_grad()
def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, ids: Tensor | None = None,
                          generator: torch.Generator | None = None, *, candidate_ids: Tensor | None = None,
                          exclude: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """ALBEF ITM hard negatives: for every image row one negative text, for every text row one image.

    ``sim_i2t (B, M)``, ``sim_t2i (B, M)``; row ``i`` draws column ``j`` with probability
    ``∝ (softmax(sim_i)_j + 1e-5)·[j allowed]`` (ALBEF adds 1e-5 so that underflowed entries stay
    drawable). Disallowed: same non-negative identity (``ids (B,)`` vs ``candidate_ids (M,)``, default
    ``ids``); the own pair (column ``i``) when ``candidate_ids`` is None; and ``exclude = (mask_i2t,
    mask_t2i)`` boolean ``(B, M)`` (e.g. GCKD's pseudo-positives and anything above δ). Returns
    ``(neg_text_idx (B,), neg_image_idx (B,))`` int64, ``-1`` for a row with no allowed column.
    Deterministic given ``generator``.
    """
    out = []
    for d, sim in enumerate((sim_i2t, sim_t2i)):
        b, m = sim.shape
        mask = torch.zeros(b, m, dtype=torch.bool, device=sim.device)
        if candidate_ids is None:
            diag = torch.arange(min(b, m), device=sim.device)
            mask[diag, diag] = True
        if ids is not None:
            cand = ids if candidate_ids is None else candidate_ids
            if cand.shape[0] != m or ids.shape[0] != b:
                raise DataError(f"sample_hard_negatives: ids {tuple(ids.shape)} / candidate ids {tuple(cand.shape)} "
                                f"do not match sim {(b, m)}")
            mask |= (ids.view(-1, 1) == cand.view(1, -1)) & (ids.view(-1, 1) >= 0)
        if exclude is not None:
            mask |= exclude[d].to(torch.bool)
        weights = (F.softmax(sim.float(), dim=1) + 1e-5).masked_fill(mask, 0.0)
        idx = torch.full((b,), -1, dtype=torch.long, device=sim.device)
        valid = ~mask.all(dim=1)
        if bool(valid.any()):
            idx[valid] = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
        out.append(idx)
    return out[0], out[1]


@torch.no_grad()
def sample_weak_positives(ids: Tensor, probability: float, generator: torch.Generator | None = None) -> Tensor:
    """ITM positive texts with RaSa's weak positives (p-ITM; Bai et al., IJCAI 2023): ``text_rows (B,)``.

    Image row ``i`` is paired with its own text ``i`` unless a draw ``u_i ~ U(0, 1)`` falls below ``p =
    probability`` and the batch holds another row of the same non-negative identity in ``ids (B,)``;
    then with a row ``j ≠ i`` of that identity, drawn uniformly (another caption of the same person).
    RaSa swaps in a caption of the person drawn from the whole training set; here the draw stays inside
    the identity-balanced batch. ``p = 0`` returns ``arange(B)`` without touching ``generator`` (so the
    ALBEF pairing and every later draw are unchanged). Returns int64 on ``ids.device``; deterministic
    given ``generator``.
    """
    if isinstance(probability, bool) or not 0.0 <= float(probability) <= 1.0:
        raise ConfigError(f"sample_weak_positives: probability={probability!r} must be in [0, 1]")
    if ids.dim() != 1:
        raise DataError(f"sample_weak_positives: ids must be (B,), got {tuple(ids.shape)}")
    rows = torch.arange(ids.shape[0], device=ids.device)
    if float(probability) == 0.0 or ids.numel() == 0:
        return rows
    same = (ids.view(-1, 1) == ids.view(1, -1)) & (ids.view(-1, 1) >= 0)
    same[rows, rows] = False
    has_partner = same.any(dim=1)
    weights = same.float()
    weights[rows, rows] = (~has_partner).float()  # a valid (ignored) draw for rows without a partner
    swap = (torch.rand(ids.shape[0], generator=generator, device=ids.device) < float(probability)) & has_partner
    partner = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(swap, partner, rows)


def itm_loss(itm_logits_pos: Tensor, itm_logits_neg: Tensor) -> Tensor:
    """ALBEF ITM loss: ``CE(cat[pos (P, 2), neg (Q, 2)], cat[1·P, 0·Q])`` averaged over all ``P + Q`` rows
    (column 1 = "matched"). GCKD's cross-domain ITM uses the same form with pseudo-positives."""
    logits = torch.cat([itm_logits_pos, itm_logits_neg], dim=0).float()
    labels = torch.cat([torch.ones(itm_logits_pos.shape[0], dtype=torch.long, device=logits.device),
                        torch.zeros(itm_logits_neg.shape[0], dtype=torch.long, device=logits.device)])
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def select_confident_target_pairs(sim: Tensor, delta: float, *, best_only: bool = True, mutual: bool = False
                                  ) -> tuple[Tensor, Tensor]:
    """GCKD threshold-filtered target pseudo-positives (docs/gckd.md, A4).

    ``sim (T, I)`` text×image score (teacher t2i probability or cosine). With ``best_only`` (default)
    each text ``k`` proposes ``j* = argmax_j sim[k, j]`` and the pair is kept iff ``sim[k, j*] ≥ δ``; with
    ``mutual`` also iff ``argmax_k' sim[k', j*] = k``. With ``best_only=False`` every pair ``≥ δ`` is
    returned (``mutual`` then keeps pairs that are each other's best). Returns ``(text_idx, image_idx)``
    int64, sorted by text then image.
    """
    if sim.ndim != 2:
        raise DataError(f"select_confident_target_pairs: sim must be (T, I), got {tuple(sim.shape)}")
    if sim.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=sim.device)
        return empty, empty
    keep = sim >= delta
    if best_only:
        best = torch.zeros_like(keep)
        best[torch.arange(sim.shape[0], device=sim.device), sim.argmax(dim=1)] = True
        keep &= best
    if mutual:
        col_best = torch.zeros_like(keep)
        col_best[sim.argmax(dim=0), torch.arange(sim.shape[1], device=sim.device)] = True
        row_best = torch.zeros_like(keep)
        row_best[torch.arange(sim.shape[0], device=sim.device), sim.argmax(dim=1)] = True
        keep &= col_best & row_best
    text_idx, image_idx = keep.nonzero(as_tuple=True)
    return text_idx, image_idx


@torch.no_grad()
def mutual_nearest_pairs(cosine: Tensor, delta: float, *, temp: float | Tensor | None = None
                         ) -> tuple[Tensor, Tensor]:
    """Mutual nearest neighbours between texts and images, kept above a threshold (GCKD cross-domain ITM
    pseudo-positives mined over batch ∪ memory banks; docs/gckd.md, A4).

    ``cosine (T, I)``: text × image cosine of the (propagated) teacher features. ``(k, j)`` is a pair iff
    ``j = argmax_j' cosine[k, j']`` and ``k = argmax_k' cosine[k', j]`` (first index on ties) and its score
    is ``≥ δ``, where the score is the cosine itself (``temp`` None) or the t2i probability
    ``softmax(cosine[k] / τ)_j`` over all ``I`` candidate images (``temp`` = τ). Each text and each image is in
    at most one pair. Returns ``(text_idx, image_idx)`` int64, sorted by text.
    """
    if cosine.ndim != 2:
        raise DataError(f"mutual_nearest_pairs: cosine must be (T, I), got {tuple(cosine.shape)}")
    if cosine.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cosine.device)
        return empty, empty
    best_image = cosine.argmax(dim=1)  # (T,)
    best_text = cosine.argmax(dim=0)  # (I,)
    texts = torch.arange(cosine.shape[0], device=cosine.device)
    mutual = best_text[best_image] == texts
    if temp is None:
        score = cosine[texts, best_image]
    else:
        score = F.softmax(cosine.float() / temp, dim=1)[texts, best_image]
    keep = mutual & (score >= delta)
    return texts[keep], best_image[keep]
