"""Choosing GCKD's pseudo-pair threshold δ without target labels.

GCKD (Luo et al., AAAI 2025, §2.3) keeps a target caption–image pseudo-positive for the cross-domain ITM only
when the teacher's score reaches δ. The paper gives δ for its own models; a threshold that suits one model and
dataset admits noise, or nothing, on another. Here δ is read off the *labelled source*: on a held-out source
split, the caption–image pairs that are mutual nearest neighbours (cosine of the ITC features, the rule of
:func:`~crossret.textimage.losses.mutual_nearest_pairs`) are sorted by cosine, and δ is the smallest cosine at
which the pairs at or above it are of the same identity at least ``precision`` of the time. The target is then
mined at that δ (``cd_itm_mining="banks"``, ``delta_on="cosine"``). No target label enters the choice; the
precision it gives on the target is usually lower than on the source (domain shift), which the training report's
``pseudo_pair_precision`` shows where the target's labels are known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from crossret.errors import DataError
from crossret.textimage.losses import mutual_nearest_pairs


@dataclass(frozen=True)
class DeltaCalibration:
    """The outcome of :func:`calibrate_delta`.

    ``delta``: the chosen cosine threshold (``1.0`` when no prefix of the pairs reaches ``precision``: then
    almost nothing is mined); ``pairs``: mutual-nearest pairs at or above ``delta`` on the calibration split,
    ``pair_precision``: their identity precision; ``mutual_pairs`` / ``overall_precision``: all mutual-nearest
    pairs of the split and their precision; ``captions`` / ``images``: the split's sizes."""

    precision: float
    delta: float
    pairs: int
    pair_precision: float | None
    mutual_pairs: int
    overall_precision: float | None
    captions: int
    images: int
    reached: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mutual_pair_scores(text_feat: torch.Tensor, image_feat: torch.Tensor, text_ids: Any, image_ids: Any,
                       *, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of the mutual-nearest caption–image pairs, highest first, and whether each pair is of one identity.

    ``text_feat (T, E)`` and ``image_feat (I, E)``: unit-norm features; ``text_ids (T,)`` / ``image_ids (I,)``:
    person ids. Returns ``(scores (P,) float32, correct (P,) bool)``, sorted by score (stable on ties). The
    ``T × I`` cosine is built one block of ``chunk`` captions at a time: only the arg-maxima are kept."""
    text_feat, image_feat = text_feat.float(), image_feat.float()
    text_ids, image_ids = np.asarray(text_ids), np.asarray(image_ids)
    if text_feat.ndim != 2 or image_feat.ndim != 2 or text_feat.shape[1] != image_feat.shape[1]:
        raise DataError(f"calibration: features must be (T, E) and (I, E), got {tuple(text_feat.shape)} and "
                        f"{tuple(image_feat.shape)}")
    if text_ids.shape != (text_feat.shape[0],) or image_ids.shape != (image_feat.shape[0],):
        raise DataError(f"calibration: {text_ids.shape} caption ids for {text_feat.shape[0]} captions, "
                        f"{image_ids.shape} image ids for {image_feat.shape[0]} images")
    if text_feat.shape[0] == 0 or image_feat.shape[0] == 0:
        raise DataError("calibration: the calibration split has no captions or no images")
    if text_feat.shape[0] <= chunk:
        cosine = text_feat @ image_feat.T
        rows, cols = mutual_nearest_pairs(cosine, -2.0)  # below any cosine: every mutual pair
        scores = cosine[rows, cols]
    else:
        best_image = torch.empty(text_feat.shape[0], dtype=torch.long)
        best_text_score = torch.full((image_feat.shape[0],), -float("inf"))
        best_text = torch.zeros(image_feat.shape[0], dtype=torch.long)
        for start in range(0, text_feat.shape[0], chunk):
            block = text_feat[start:start + chunk] @ image_feat.T
            best_image[start:start + chunk] = block.argmax(dim=1)
            value, where = block.max(dim=0)
            better = value > best_text_score  # strictly: the first caption wins ties, as argmax does
            best_text_score[better], best_text[better] = value[better], where[better] + start
        rows = torch.nonzero(best_text[best_image] == torch.arange(text_feat.shape[0])).squeeze(1)
        cols = best_image[rows]
        scores = best_text_score[cols]  # a mutual pair's cosine is its image's best score
    scores_np = scores.numpy().astype(np.float32)
    correct = text_ids[rows.numpy()] == image_ids[cols.numpy()]
    order = np.argsort(-scores_np, kind="stable")
    return scores_np[order], correct[order]


def calibrate_delta(text_feat: torch.Tensor, image_feat: torch.Tensor, text_ids: Any, image_ids: Any, *,
                    precision: float) -> DeltaCalibration:
    """δ on the cosine scale for the features of a labelled split: :func:`delta_from_scores` of its
    :func:`mutual_pair_scores`."""
    scores, correct = mutual_pair_scores(text_feat, image_feat, text_ids, image_ids)
    return delta_from_scores(scores, correct, precision=precision, captions=int(text_feat.shape[0]),
                             images=int(image_feat.shape[0]))


def delta_from_scores(scores: np.ndarray, correct: np.ndarray, *, precision: float, captions: int = 0,
                      images: int = 0) -> DeltaCalibration:
    """The smallest pair score ``s_j`` such that the pairs scoring ``≥ s_j`` are correct at least ``precision``
    of the time. ``scores (P,)`` sorted from the highest, ``correct (P,)`` bool.

    Pairs tied with ``s_j`` are all admitted by ``score ≥ δ``, so only prefixes that end before a change of
    score are candidates. Where no prefix reaches ``precision``, ``delta`` is 1.0 and ``reached`` False."""
    if isinstance(precision, bool) or not isinstance(precision, (int, float)) or not 0.0 < precision <= 1.0:
        raise DataError(f"calibration: precision={precision!r} must be in (0, 1]")
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape or scores.ndim != 1:
        raise DataError(f"calibration: {scores.shape} scores for {correct.shape} correctness flags")
    if np.any(scores[1:] > scores[:-1]):
        raise DataError("calibration: scores must be sorted from the highest")
    n = scores.size
    common = dict(precision=float(precision), mutual_pairs=int(n), overall_precision=float(correct.mean()) if n
                  else None, captions=captions, images=images)
    cumulative = np.cumsum(correct) / np.arange(1, n + 1)
    ends = np.ones(n, dtype=bool)  # a prefix may end only where the next score is lower
    ends[:-1] = scores[1:] < scores[:-1]
    good = np.nonzero(ends & (cumulative >= precision))[0]
    if not good.size:
        return DeltaCalibration(delta=1.0, pairs=0, pair_precision=None, reached=False, **common)
    last = int(good[-1])
    return DeltaCalibration(delta=float(scores[last]), pairs=last + 1, pair_precision=float(cumulative[last]),
                            reached=True, **common)


__all__ = ["DeltaCalibration", "calibrate_delta", "delta_from_scores", "mutual_pair_scores"]
