"""Text-to-image person retrieval evaluation: ITC ranking, then ITM re-ranking of the top k (docs/gckd.md).

Protocol (ALBEF, Li et al., NeurIPS 2021, ``Retrieval.py: evaluation``; RaSa, Bai et al., IJCAI 2023):

1. :func:`encode_gallery` / :func:`encode_queries`: every gallery image → ``image_feat f_v (G, E)``
   (unit norm) and, for re-ranking, its token states ``image_tokens (G, N_v, D)``; every caption →
   ``text_feat f_t (Q, E)``, ``text_tokens (Q, L, D)`` and ``attention_mask (Q, L)``.
2. ITC scores ``S = f_t f_vᵀ (Q, G)`` (cosine similarities), computed in query chunks.
3. :func:`itm_rerank`: for each query its top ``k`` gallery items by ``S`` (``k_test = 128``), each
   scored by the fusion encoder's matching logit ``s_itm = itm_logits(text_tokens, mask, image_tokens)[:, 1]``.
4. :func:`text_to_image_metrics`: Rank-k / mAP / mINP (mINP: Ye et al., TPAMI 2021) of the ITC ranking,
   and of the re-ranked one.

Candidate score (``rerank_score``): ``"itm"`` (default) is ``s = s_itm`` alone, as ALBEF's and RaSa's
``Retrieval.py`` (``score_matrix_t2i[i, topk_idx] = score``); ``"itm+itc"`` is
``s = s_itm + λ · S[q, g]`` with ``λ = itc_weight`` (1 in BLIP, Li et al., ICML 2022,
``train_retrieval.py``: ``score + topk_sim``, the raw cosine added to the ITM logit).

Re-ranked order of a query (exact, computed by integer ranks, no score padding): its ``k``
candidates first, by ``s`` descending, ties by ITC score descending, then by gallery index; then
every other item by ITC descending, ties by gallery index. RaSa pads the non-candidates with −100
(so they tie and their order is arbitrary) and APTM adds 0.002 × the min-max-normalised ITC; both
break ties among the non-candidates differently, which only changes mAP / mINP when relevant items lie
outside the top ``k`` (docs/gckd.md); ITC order is the secondary key.

Models: any :class:`~crossret.textimage.backbone.Backbone` (``encode_image``, ``encode_text``,
``itm_logits``), i.e. :class:`~crossret.textimage.albef.AlbefModel` and
:class:`~crossret.textimage.feature_heads.FeatureHeadsModel` (whose "images"/"input_ids" are feature
matrices, whose tokens are ``(N, 1, F)`` and whose masks are ``None``). Metrics are fractions in [0, 1]
(multiply by 100 for the papers' tables).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crossret.errors import ConfigError, DataError
from crossret.retrieval.metrics import ranking_metrics
from crossret.textimage.backbone import Backbone

__all__ = [
    "RERANK_SCORES",
    "TIE_RULE",
    "EncodedGallery",
    "EncodedQueries",
    "check_rerank_score",
    "encode_gallery",
    "encode_queries",
    "evaluate_model",
    "itm_rerank",
    "rerank_candidate_scores",
    "reranked_scores",
    "stable_topk",
    "text_to_image_metrics",
]

TIE_RULE = (
    "descending score, ties in gallery order; re-ranked: the ITC top-k by their candidate score descending "
    "(rerank_score 'itm': ITM logit[:, 1]; 'itm+itc': ITM logit[:, 1] + itc_weight * ITC cosine; ties by ITC "
    "score descending, then gallery index), then all other items by ITC descending (ties by gallery index)"
)
# "itm": ALBEF / RaSa (the ITM logit alone); "itm+itc": BLIP (ITM logit + itc_weight x ITC cosine).
RERANK_SCORES = ("itm", "itm+itc")
_CHUNK_ENTRIES = 1 << 22  # (query chunk x G) ITC entries per chunk, as crossret.retrieval.metrics
_DEFAULT_QUERY_CHUNK = 1024


# ----------------------------------------------------------------------------------------------------------------
# encoded data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedGallery:
    """Encoded gallery images, on the CPU.

    ``image_feat``: ``(G, E)`` float32, unit-norm ITC features ``f_v``; ``image_tokens``: ``(G, N_v, D)``
    token states for ITM re-ranking (typically float16 to halve memory), or None when not kept.
    """

    image_feat: Tensor
    image_tokens: Tensor | None = None

    def __post_init__(self) -> None:
        if self.image_feat.dim() != 2 or self.image_feat.shape[0] == 0:
            raise DataError(f"image_feat must be a non-empty (G, E) tensor, got {tuple(self.image_feat.shape)}")
        if self.image_tokens is not None and (
            self.image_tokens.dim() != 3 or self.image_tokens.shape[0] != self.image_feat.shape[0]
        ):
            raise DataError(f"image_tokens must be (G={self.image_feat.shape[0]}, N_v, D), "
                            f"got {tuple(self.image_tokens.shape)}")

    def __len__(self) -> int:
        return int(self.image_feat.shape[0])


@dataclass
class EncodedQueries:
    """Encoded captions, on the CPU.

    ``text_feat``: ``(Q, E)`` float32, unit-norm ITC features ``f_t``; ``text_tokens``: ``(Q, L, D)``
    text-encoder states (batches padded with zeros to the longest ``L``), or None when not kept;
    ``attention_mask``: ``(Q, L)`` int64 (1 = token, 0 = padding), or None when every batch came
    without a mask and with the same length (e.g. the feature-heads model).
    """

    text_feat: Tensor
    text_tokens: Tensor | None = None
    attention_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.text_feat.dim() != 2 or self.text_feat.shape[0] == 0:
            raise DataError(f"text_feat must be a non-empty (Q, E) tensor, got {tuple(self.text_feat.shape)}")
        n = self.text_feat.shape[0]
        if self.text_tokens is not None and (self.text_tokens.dim() != 3 or self.text_tokens.shape[0] != n):
            raise DataError(f"text_tokens must be (Q={n}, L, D), got {tuple(self.text_tokens.shape)}")
        if self.attention_mask is not None:
            if self.text_tokens is None:
                raise DataError("attention_mask given without text_tokens")
            if tuple(self.attention_mask.shape) != tuple(self.text_tokens.shape[:2]):
                raise DataError(f"attention_mask has shape {tuple(self.attention_mask.shape)}, expected "
                                f"{tuple(self.text_tokens.shape[:2])} (the first two dims of text_tokens)")

    def __len__(self) -> int:
        return int(self.text_feat.shape[0])


@contextmanager
def _inference(model: Backbone) -> Iterator[None]:
    """``model.eval()`` + ``torch.no_grad()``; afterwards every submodule gets back its own train/eval flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _check_tensor(x: Any, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise DataError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    return x


def encode_gallery(
    model: Backbone,
    batches: Iterable[Tensor],
    *,
    device: str | torch.device = "cpu",
    keep_tokens: bool = True,
    token_dtype: torch.dtype | None = torch.float16,
) -> EncodedGallery:
    """Encode every gallery image: ``model.encode_image(batch) -> (tokens (B, N_v, D), feat (B, E))``.

    ``batches`` yields image batches (pixels ``(B, C, H, W)`` for ALBEF, features ``(B, d_img)`` for
    the feature heads), moved to ``device``. Runs in eval mode under ``torch.no_grad`` (each
    submodule's train/eval flag is restored afterwards). Results are concatenated on the CPU:
    ``image_feat`` float32; ``image_tokens`` cast to ``token_dtype`` (None keeps the model's dtype)
    when ``keep_tokens``, else None.
    """
    feats: list[Tensor] = []
    tokens: list[Tensor] = []
    with _inference(model):
        for i, batch in enumerate(batches):
            batch_tokens, feat = model.encode_image(_check_tensor(batch, f"image batch {i}").to(device))
            feats.append(feat.detach().float().cpu())
            if keep_tokens:
                tokens.append(batch_tokens.detach().to(dtype=token_dtype or batch_tokens.dtype).cpu())
    if not feats:
        raise DataError("encode_gallery: no image batches (the iterable was empty)")
    return EncodedGallery(torch.cat(feats), torch.cat(tokens) if keep_tokens else None)


def encode_queries(
    model: Backbone,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    *,
    device: str | torch.device = "cpu",
    keep_tokens: bool = True,
    token_dtype: torch.dtype | None = torch.float16,
) -> EncodedQueries:
    """Encode every caption: ``model.encode_text(input_ids, attention_mask) -> (tokens (B, L_b, D), feat (B, E))``.

    ``batches`` yields ``(input_ids (B, L_b), attention_mask (B, L_b) or None)`` (for the feature
    heads: ``(text features (B, d_txt), None)``). Eval mode + ``torch.no_grad``, modes restored
    afterwards. Concatenated on the CPU: ``text_feat`` float32; when ``keep_tokens``, ``text_tokens``
    ``(Q, L_max, D)`` in ``token_dtype`` (None keeps the model's), each batch padded with zero
    states to the longest ``L_max``, and ``attention_mask (Q, L_max)`` int64 with 0 on the padding
    (a batch given without a mask counts as all ones). The mask is None when no batch had one and all
    had the same length.
    """
    feats: list[Tensor] = []
    tokens: list[Tensor] = []
    masks: list[Tensor | None] = []
    with _inference(model):
        for i, item in enumerate(batches):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"text batch {i}: expected a pair (input_ids, attention_mask or None), "
                                f"got {type(item).__name__}")
            input_ids = _check_tensor(item[0], f"text batch {i} input_ids")
            mask = None if item[1] is None else _check_tensor(item[1], f"text batch {i} attention_mask")
            batch_tokens, feat = model.encode_text(input_ids.to(device), None if mask is None else mask.to(device))
            feats.append(feat.detach().float().cpu())
            if keep_tokens:
                if batch_tokens.dim() != 3 or batch_tokens.shape[0] != feat.shape[0]:
                    raise DataError(f"text batch {i}: the model returned text_tokens of shape "
                                    f"{tuple(batch_tokens.shape)}, expected (B, L, D)")
                if mask is not None and tuple(mask.shape) != tuple(batch_tokens.shape[:2]):
                    raise DataError(f"text batch {i}: attention_mask has shape {tuple(mask.shape)} but the text "
                                    f"tokens are {tuple(batch_tokens.shape[:2])} (B, L)")
                tokens.append(batch_tokens.detach().to(dtype=token_dtype or batch_tokens.dtype).cpu())
                masks.append(None if mask is None else mask.detach().cpu())
    if not feats:
        raise DataError("encode_queries: no text batches (the iterable was empty)")
    text_feat = torch.cat(feats)
    if not keep_tokens:
        return EncodedQueries(text_feat)
    lengths = [t.shape[1] for t in tokens]
    l_max = max(lengths)
    if all(m is None for m in masks) and min(lengths) == l_max:
        return EncodedQueries(text_feat, torch.cat(tokens), None)
    dim = tokens[0].shape[2]
    if any(t.shape[2] != dim for t in tokens):
        raise DataError(f"text batches have different token widths {sorted({t.shape[2] for t in tokens})}")
    text_tokens = tokens[0].new_zeros((text_feat.shape[0], l_max, dim))
    attention_mask = torch.zeros((text_feat.shape[0], l_max), dtype=torch.long)
    row = 0
    for t, m in zip(tokens, masks, strict=True):
        b, length = t.shape[0], t.shape[1]
        text_tokens[row:row + b, :length] = t
        attention_mask[row:row + b, :length] = 1 if m is None else m.to(torch.long)
        row += b
    return EncodedQueries(text_feat, text_tokens, attention_mask)


# ----------------------------------------------------------------------------------------------------------------
# ITC scores, top-k, ITM re-ranking
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_pair(queries: EncodedQueries, gallery: EncodedGallery) -> None:
    if queries.text_feat.shape[1] != gallery.image_feat.shape[1]:
        raise DataError(f"text_feat has {queries.text_feat.shape[1]} dims but image_feat has "
                        f"{gallery.image_feat.shape[1]}; encode both with the same model")


def _query_chunk(n_gallery: int) -> int:
    return max(1, min(_DEFAULT_QUERY_CHUNK, _CHUNK_ENTRIES // n_gallery))


def _itc_fn(queries: EncodedQueries, gallery: EncodedGallery) -> Callable[[int, int], np.ndarray]:
    """``fn(start, stop)`` → ITC scores ``f_t[start:stop] f_vᵀ`` as a float32 ``(stop - start, G)`` array.

    One function for both :func:`itm_rerank` and :func:`text_to_image_metrics`, so the candidates and
    the ranking see the same float32 values.
    """
    text = queries.text_feat.detach().float().cpu()
    image_t = gallery.image_feat.detach().float().cpu().T.contiguous()

    def fn(start: int, stop: int) -> np.ndarray:
        return (text[start:stop] @ image_t).numpy()

    return fn


def stable_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(n, k)`` of the ``k`` largest entries of each row of ``scores (n, G)``, in descending
    order with ties by index -- exactly ``np.argsort(-scores, kind="stable")[:, :k]`` in ``O(G + k log k)``
    per row. NaN is not allowed."""
    n, g = scores.shape
    k = min(int(k), g)
    if k == g:
        return np.argsort(-scores, axis=1, kind="stable")
    key = -scores
    kth = np.partition(key, k - 1, axis=1)[:, k - 1:k]  # the k-th smallest key of each row
    below = key < kth
    tied = key == kth
    need = k - below.sum(axis=1, keepdims=True)  # >= 1: how many of the tied entries to take, lowest index first
    chosen = below | (tied & (np.cumsum(tied, axis=1) <= need))
    idx = np.nonzero(chosen)[1].reshape(n, k)  # row-major: ascending index within each row
    order = np.argsort(np.take_along_axis(key, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def _model_dtype(model: Backbone) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def itm_rerank(
    model: Backbone,
    queries: EncodedQueries,
    gallery: EncodedGallery,
    *,
    k: int = 128,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    topk_idx: np.ndarray | Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """ITM scores of each query's ITC top-``k`` gallery items (ALBEF / RaSa ``k_test``).

    Candidates: ``topk_idx[q]`` = the ``k`` largest ``S[q, :] = f_t[q] · f_vᵀ`` (ITC, float32, computed
    in query chunks), in descending order with ties by gallery index (``k`` is clipped to ``G``);
    or the given ``topk_idx (Q, k)`` (distinct gallery indices per row). Then
    ``itm_scores[q, j] = itm_logits(text_tokens[q], attention_mask[q], image_tokens[topk_idx[q, j]])[1]``,
    computed ``batch_size`` (query, candidate) pairs at a time: within a query chunk the pairs are
    flattened and each batch gathers (repeats) the query tokens and the candidate tokens by index --
    no Python loop over pairs. Tokens are cast to the model's dtype on ``device``; eval mode +
    ``no_grad``, modes restored afterwards.

    Returns:
        ``(topk_idx (Q, k) int64, itm_scores (Q, k) float32)`` numpy arrays.

    Raises:
        DataError: tokens not kept (encode with ``keep_tokens=True``), mismatched dims, bad ``topk_idx``.
        ConfigError: ``k`` or ``batch_size`` not a positive integer.
    """
    k = _positive_int(k, "k")
    batch_size = _positive_int(batch_size, "batch_size")
    _check_pair(queries, gallery)
    if queries.text_tokens is None or gallery.image_tokens is None:
        raise DataError("ITM re-ranking needs the token states: encode the queries and the gallery with "
                        "keep_tokens=True")
    n_q, n_g = len(queries), len(gallery)
    if topk_idx is None:
        k = min(k, n_g)
        itc = _itc_fn(queries, gallery)
        chunk = _query_chunk(n_g)
        topk = np.empty((n_q, k), dtype=np.int64)
        for start in range(0, n_q, chunk):
            stop = min(start + chunk, n_q)
            scores = itc(start, stop)
            if np.isnan(scores).any():
                raise DataError("ITC scores contain NaN; check the encoded features for NaN")
            topk[start:stop] = stable_topk(scores, k)
    else:
        topk = _check_topk(topk_idx, n_q, n_g)
        k = topk.shape[1]

    dtype = _model_dtype(model)
    text_tokens, image_tokens, mask = queries.text_tokens, gallery.image_tokens, queries.attention_mask
    itm = np.empty(n_q * k, dtype=np.float32)
    flat_topk = torch.from_numpy(topk.reshape(-1))
    n_pairs = n_q * k
    with _inference(model):
        for p0 in range(0, n_pairs, batch_size):
            pairs = torch.arange(p0, min(p0 + batch_size, n_pairs))
            q_index = pairs // k
            t = text_tokens.index_select(0, q_index).to(device=device, dtype=dtype)
            m = None if mask is None else mask.index_select(0, q_index).to(device)
            v = image_tokens.index_select(0, flat_topk[pairs]).to(device=device, dtype=dtype)
            logits = model.itm_logits(t, m, v, None)
            itm[p0:p0 + pairs.shape[0]] = logits[:, 1].float().cpu().numpy()
    return topk, itm.reshape(n_q, k)


def _check_topk(topk_idx: Any, n_q: int, n_g: int) -> np.ndarray:
    topk = topk_idx.detach().cpu().numpy() if isinstance(topk_idx, Tensor) else np.asarray(topk_idx)
    if topk.ndim != 2 or topk.shape[0] != n_q or not 1 <= topk.shape[1] <= n_g:
        raise DataError(f"topk_idx must be (Q={n_q}, k) with 1 <= k <= G={n_g}, got shape {topk.shape}")
    if topk.dtype.kind not in "iu":
        raise DataError(f"topk_idx must hold integer gallery indices, got dtype {topk.dtype}")
    topk = topk.astype(np.int64)
    if topk.min() < 0 or topk.max() >= n_g:
        raise DataError(f"topk_idx holds indices outside [0, G={n_g})")
    if topk.shape[1] > 1 and (np.diff(np.sort(topk, axis=1), axis=1) == 0).any():
        raise DataError("topk_idx repeats a gallery index within a row; each query's candidates must be distinct")
    return topk


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------

_ABOVE_ALL_KEYS = np.int64(1) << 32  # above every float32 order key (those lie in [-2^31, 2^31))


def _float32_order_key(x: np.ndarray) -> np.ndarray:
    """An int64 array with ``key(a) < key(b) <=> a < b`` and ``key(a) == key(b) <=> a == b`` for float32
    values without NaN (``-0.0`` and ``0.0`` share key 0): the IEEE-754 bits of non-negative floats
    increase with the value; a negative float gets minus its magnitude bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def check_rerank_score(rerank_score: Any, itc_weight: Any) -> tuple[str, float]:
    """Validated ``(rerank_score, itc_weight)``: one of :data:`RERANK_SCORES` and a finite number ``>= 0``.

    Raises:
        ConfigError: naming the bad value.
    """
    if rerank_score not in RERANK_SCORES:
        raise ConfigError(f"rerank_score={rerank_score!r} must be one of {', '.join(RERANK_SCORES)} ('itm': the ITM "
                          "logit alone, as ALBEF/RaSa; 'itm+itc': ITM logit + itc_weight x ITC cosine, as BLIP)")
    if (isinstance(itc_weight, (bool, np.bool_)) or not isinstance(itc_weight, (int, float, np.integer, np.floating))
            or not np.isfinite(itc_weight) or itc_weight < 0):
        raise ConfigError(f"itc_weight={itc_weight!r} must be a finite number >= 0")
    return str(rerank_score), float(itc_weight)


def rerank_candidate_scores(itc_candidates: np.ndarray, itm_scores: np.ndarray, rerank_score: str = "itm",
                            itc_weight: float = 1.0) -> np.ndarray:
    """Candidate scores ``s (n, k)`` float64 that order the re-ranked candidates (module docstring).

    ``itc_candidates``: the ITC cosines ``S[q, topk_idx[q, j]]`` ``(n, k)``; ``itm_scores``: the ITM logits
    ``(n, k)``. ``"itm"``: ``s = s_itm`` (ALBEF, RaSa); ``"itm+itc"``: ``s = s_itm + λ · S`` with
    ``λ = itc_weight`` (BLIP: ``score + topk_sim``, λ = 1), summed in float64.
    """
    rerank_score, itc_weight = check_rerank_score(rerank_score, itc_weight)
    score = np.asarray(itm_scores, dtype=np.float64)
    if rerank_score == "itm+itc":
        score = score + itc_weight * np.asarray(itc_candidates, dtype=np.float64)
    return score


def reranked_scores(itc: np.ndarray, topk_idx: np.ndarray, itm_scores: np.ndarray, *, rerank_score: str = "itm",
                    itc_weight: float = 1.0) -> np.ndarray:
    """Integer scores ``(n, G)`` whose descending stable order is the re-ranked order (module docstring).

    ``itc (n, G)`` float32; ``topk_idx``, ``itm_scores (n, k)``. Candidates get
    ``2^32 + k - p`` (``p`` = 0-based position after sorting them by (candidate score ``s`` desc, ITC
    desc, index); ``s`` from :func:`rerank_candidate_scores`), every other item its float32 order key
    of ITC (``< 2^31``), so candidates come first and the rest keep the ITC order; equal ITC keys tie
    and the stable sort keeps gallery order.
    """
    k = topk_idx.shape[1]
    itc_c = np.take_along_axis(itc, topk_idx, axis=1)
    score = rerank_candidate_scores(itc_c, itm_scores, rerank_score, itc_weight)
    order = np.lexsort((topk_idx, -itc_c, -score), axis=-1)
    scores = _float32_order_key(itc)
    ranked = np.take_along_axis(topk_idx, order, axis=1)
    top = np.broadcast_to(_ABOVE_ALL_KEYS + np.arange(k, 0, -1, dtype=np.int64), ranked.shape)
    np.put_along_axis(scores, ranked, top, axis=1)
    return scores


def text_to_image_metrics(
    queries: EncodedQueries,
    gallery: EncodedGallery,
    query_ids: Sequence[int] | np.ndarray,
    gallery_ids: Sequence[int] | np.ndarray,
    *,
    rerank: tuple[np.ndarray, np.ndarray] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    rerank_score: str = "itm",
    itc_weight: float = 1.0,
) -> dict[str, Any]:
    """Rank-k, mAP and mINP of text-to-image retrieval (defined in :func:`~crossret.retrieval.metrics.ranking_metrics`).

    ``itc``: ranking by ``S = f_t f_vᵀ`` (float32) descending, ties by gallery index.
    ``itm`` (only with ``rerank=(topk_idx (Q, k), itm_scores (Q, k))``, e.g. from :func:`itm_rerank`):
    each query's ``k`` candidates first, ordered by their candidate score descending (``rerank_score``
    ``"itm"``: the ITM logit, ALBEF/RaSa; ``"itm+itc"``: ITM logit + ``itc_weight`` × ITC cosine, BLIP),
    ties by ITC descending, then by gallery index; then all other items by ITC descending, ties by
    gallery index. Both are streamed in query chunks (never a ``Q x G`` matrix at once) and ranked
    exactly (integer ranks, no epsilons).

    Returns ``{"itc": {...}, "itm": {...} (with rerank only), "rerank_k": k (0 without), "rerank_score",
    "rerank_itc_weight" (0.0 for "itm"), "tie_rule": ...}``; each metrics dict has ``rank{k}``, ``map``,
    ``minp`` (fractions), ``n_queries``, ``n_gallery``, ``n_queries_without_relevant``.

    Raises:
        DataError: id counts that differ from the encoded rows, mismatched dims, NaN scores, a malformed
            ``rerank``. ConfigError: bad ``ks``, ``rerank_score`` or ``itc_weight``.
    """
    rerank_score, itc_weight = check_rerank_score(rerank_score, itc_weight)
    _check_pair(queries, gallery)
    n_q, n_g = len(queries), len(gallery)
    for name, ids, n, what in (("query_ids", query_ids, n_q, "encoded queries"),
                               ("gallery_ids", gallery_ids, n_g, "encoded gallery images")):
        count = np.asarray(ids).size
        if count != n:
            raise DataError(f"{name} has {count} ids but there are {n} {what}; give one id per row")
    itc = _itc_fn(queries, gallery)
    chunk = _query_chunk(n_g)
    result: dict[str, Any] = {
        "itc": ranking_metrics(itc, query_ids, gallery_ids, ks=ks, chunk_size=chunk),
        "rerank_k": 0,
        "rerank_score": rerank_score,
        "rerank_itc_weight": itc_weight if rerank_score == "itm+itc" else 0.0,
        "tie_rule": TIE_RULE,
    }
    if rerank is None:
        return result
    if not isinstance(rerank, (tuple, list)) or len(rerank) != 2:
        raise DataError("rerank must be a pair (topk_idx (Q, k), itm_scores (Q, k))")
    topk = _check_topk(rerank[0], n_q, n_g)
    raw = rerank[1]
    itm_scores = np.asarray(raw.detach().cpu() if isinstance(raw, Tensor) else raw)
    if itm_scores.shape != topk.shape:
        raise DataError(f"itm_scores has shape {itm_scores.shape} but topk_idx has {topk.shape}; they must match")
    if itm_scores.dtype.kind not in "fiu":
        raise DataError(f"itm_scores must be numeric, got dtype {itm_scores.dtype}")
    if itm_scores.dtype.kind == "f" and np.isnan(itm_scores).any():
        raise DataError("itm_scores contain NaN; check the ITM logits")

    def reranked(start: int, stop: int) -> np.ndarray:
        return reranked_scores(itc(start, stop), topk[start:stop], itm_scores[start:stop],
                               rerank_score=rerank_score, itc_weight=itc_weight)

    result["itm"] = ranking_metrics(reranked, query_ids, gallery_ids, ks=ks, chunk_size=chunk)
    result["rerank_k"] = int(topk.shape[1])
    return result


def evaluate_model(
    model: Backbone,
    image_batches: Iterable[Tensor],
    text_batches: Iterable[tuple[Tensor, Tensor | None]],
    query_ids: Sequence[int] | np.ndarray,
    gallery_ids: Sequence[int] | np.ndarray,
    *,
    rerank_k: int = 128,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    rerank_score: str = "itm",
    itc_weight: float = 1.0,
) -> dict[str, Any]:
    """Encode, (optionally) ITM re-rank the ITC top ``rerank_k`` and compute the metrics.

    ``rerank_k=0`` skips re-ranking (and does not keep token states). ``batch_size`` is the number of
    (query, candidate) pairs per ITM forward pass. ``rerank_score`` / ``itc_weight``: the candidate
    score (:func:`text_to_image_metrics`). Returns :func:`text_to_image_metrics`'s dict.
    """
    if not isinstance(rerank_k, (int, np.integer)) or isinstance(rerank_k, bool) or rerank_k < 0:
        raise ConfigError(f"rerank_k must be a non-negative integer (0 disables re-ranking), got {rerank_k!r}")
    check_rerank_score(rerank_score, itc_weight)  # before any encoding
    keep = rerank_k > 0
    gallery = encode_gallery(model, image_batches, device=device, keep_tokens=keep)
    queries = encode_queries(model, text_batches, device=device, keep_tokens=keep)
    rerank = None
    if keep:
        rerank = itm_rerank(model, queries, gallery, k=int(rerank_k), batch_size=batch_size, device=device)
    return text_to_image_metrics(queries, gallery, query_ids, gallery_ids, rerank=rerank, ks=ks,
                                 rerank_score=rerank_score, itc_weight=itc_weight)
