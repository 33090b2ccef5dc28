"""The "feature heads" backbone: GCKD on precomputed embeddings instead of pixels and token ids.

For users who already have one image vector ``(N, d_img)`` and one text vector ``(N, d_txt)`` per
item (e.g. from a frozen CLIP or a previous ALBEF run), this module plays the role of
:class:`~crossret.textimage.albef.AlbefModel` with the same method names, so a trainer can use either:

* ``encode_image(x_v)`` → ``(image_tokens (N, 1, F), image_feat (N, E))``:
  ``u_v = LN(W₂ GELU(W₁ x_v))`` (a one-token "sequence"), ``f_v = norm(g_v(u_v))``;
* ``encode_text(x_t, attention_mask=None)`` → the same for text (the mask is accepted and ignored:
  a precomputed text vector is already pooled);
* ``fuse(u_t, ·, u_v, ·)`` → ``(N, 1, F)``: ``z = LN(u_t + MLP([u_t, u_v, u_t ⊙ u_v, |u_t − u_v|]))``,
  the matching features of InferSent/ESIM-style pair classifiers — products and differences make a
  small MLP sensitive to agreement between the two vectors, which concatenation alone is not;
* ``itm_logits(...)`` → ``(N, 2)`` = ``itm_head(z)``; column 1 = "matched", as ALBEF;
* ``temp``: learnable τ (init 0.07), clamped to [0.001, 0.5] as ALBEF (Li et al., NeurIPS 2021).

There is no MLM head: there are no tokens to mask. ``F`` = ``fusion_dim``, ``E`` = ``embed_dim``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossret.config_keys import reject_unknown_keys
from crossret.errors import ConfigError, DataError
from crossret.textimage.albef import TEMP_MAX, TEMP_MIN, LearnableTemperature
from crossret.textimage.backbone import Backbone

__all__ = ["FeatureHeadsConfig", "FeatureHeadsFeatures", "FeatureHeadsModel"]


@dataclass
class FeatureHeadsConfig:
    """Sizes of :class:`FeatureHeadsModel`; ``queue_size`` and ``momentum`` mirror
    :class:`~crossret.textimage.albef.AlbefConfig` so a trainer reads them the same way."""

    image_dim: int
    text_dim: int
    embed_dim: int = 256
    hidden_dim: int = 512
    fusion_dim: int = 256
    dropout: float = 0.1
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureHeadsConfig:
        reject_unknown_keys(cls, values, "FeatureHeadsConfig")
        absent = sorted(n for n in ("image_dim", "text_dim") if n not in values)
        if absent:
            raise ConfigError(f"FeatureHeadsConfig: required field(s) {absent} missing")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> FeatureHeadsConfig:
        """Raise :class:`ConfigError` naming the first invalid field; return ``self``."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"FeatureHeadsConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("image_dim", "text_dim", "embed_dim", "hidden_dim", "fusion_dim", "queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a positive integer")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if not isinstance(self.temp, (int, float)) or not TEMP_MIN <= self.temp <= TEMP_MAX:
            raise bad("temp", f"must be in [{TEMP_MIN}, {TEMP_MAX}]")
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum <= 1.0:
            raise bad("momentum", "must be in [0, 1]")
        return self


class FeatureHeadsFeatures(NamedTuple):
    """Unimodal outputs of :meth:`FeatureHeadsModel.forward`."""

    image_tokens: Tensor  # (N, 1, F)
    image_feat: Tensor  # (N, E), unit norm, float32
    text_tokens: Tensor  # (N, 1, F)
    text_feat: Tensor  # (N, E), unit norm, float32


def _rows_text(rows: Tensor) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:10])
    more = f" and {rows.numel() - 10} more" if rows.numel() > 10 else ""
    return f"row{'s' if rows.numel() != 1 else ''} {shown}{more}"


def _check_finite_rows(x: Tensor, what: str, cast: torch.dtype | None = None) -> None:
    finite = torch.isfinite(x).all(dim=1)
    if bool(finite.all()):
        return
    rows = (~finite).nonzero().flatten().cpu()
    if cast is None:
        raise DataError(f"{what}: {rows.numel()} row(s) contain NaN or inf ({_rows_text(rows)}); clean or drop them")
    raise DataError(f"{what}: {rows.numel()} row(s) ({_rows_text(rows)}) overflow {cast} (the model's dtype); "
                    "rescale the features, e.g. L2-normalise each row")


def _check_finite_outputs(x: Tensor, feat: Tensor, what: str) -> None:
    """Finite inputs that give NaN/inf embeddings: the magnitudes overflow inside the MLP (LayerNorm squares
    them), or the weights diverged. Raised as a :class:`~crossret.hashing.networks.NumericalError` (a
    :class:`CrossretError` *and* a :class:`FloatingPointError`, as the GCKD trainer's own check)."""
    finite = torch.isfinite(feat).all(dim=1)
    if bool(finite.all()):
        return
    from crossret.errors import NumericalError

    rows = (~finite).nonzero().flatten()
    largest = float(x[rows].abs().max())
    raise NumericalError(
        f"{what}: {rows.numel()} row(s) ({_rows_text(rows.cpu())}) give NaN/inf embeddings from finite inputs "
        f"(largest |x| in them: {largest:.3g}). Inputs of such magnitude overflow float32 in the projection MLP: "
        "rescale the features (e.g. L2-normalise each row). If the inputs are ordinary, training diverged: lower "
        "the learning rate or disable amp")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim),
                         nn.LayerNorm(out_dim))


class FeatureHeadsModel(LearnableTemperature, nn.Module, Backbone):
    """Projection MLPs + ITC projections + a pairwise fusion MLP with an ITM head (module docstring); a
    :class:`~crossret.textimage.backbone.Backbone` without an MLM head."""

    def __init__(self, config: FeatureHeadsConfig) -> None:
        super().__init__()
        self.config = config.validate()
        c = config
        self.image_encoder = _mlp(c.image_dim, c.hidden_dim, c.fusion_dim, c.dropout)
        self.text_encoder = _mlp(c.text_dim, c.hidden_dim, c.fusion_dim, c.dropout)
        self.vision_proj = nn.Linear(c.fusion_dim, c.embed_dim)
        self.text_proj = nn.Linear(c.fusion_dim, c.embed_dim)
        self.fusion = nn.Sequential(nn.Linear(4 * c.fusion_dim, c.hidden_dim), nn.GELU(), nn.Dropout(c.dropout),
                                    nn.Linear(c.hidden_dim, c.fusion_dim))
        self.fusion_norm = nn.LayerNorm(c.fusion_dim)
        self.itm_head = nn.Linear(c.fusion_dim, 2)
        self.temp = nn.Parameter(torch.tensor(float(c.temp)))

    def no_weight_decay(self) -> set[str]:
        return {"temp"}

    # -- encoders ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check(x: Tensor, dim: int, what: str, encoder: nn.Sequential) -> Tensor:
        """Shape-checked ``x`` in the encoder's weight dtype (integer, float16 or float64 features are cast;
        autocast still picks the compute dtype); NaN/inf rows are a :class:`DataError` naming them."""
        if x.dim() != 2 or x.shape[1] != dim:
            raise DataError(f"{what} must have shape (N, {dim}), got {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            raise DataError(f"{what} must be real numbers, got dtype {x.dtype}")
        weight_dtype = encoder[0].weight.dtype
        if x.is_floating_point():
            _check_finite_rows(x, what)
        if x.dtype != weight_dtype:
            x = x.to(weight_dtype)
            _check_finite_rows(x, what, cast=weight_dtype)
        return x

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images (N, d_img)`` precomputed features → ``(image_tokens (N, 1, F), image_feat (N, E))``."""
        images = self._check(images, self.config.image_dim, "image features", self.image_encoder)
        tokens = self.image_encoder(images).unsqueeze(1)
        feat = F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)
        _check_finite_outputs(images, feat, "image features")
        return tokens, feat

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``input_ids``: here the precomputed text features ``(N, d_txt)`` (the name matches
        :meth:`AlbefModel.encode_text`); ``attention_mask`` is ignored. → ``(text_tokens (N, 1, F),
        text_feat (N, E))``."""
        input_ids = self._check(input_ids, self.config.text_dim, "text features", self.text_encoder)
        tokens = self.text_encoder(input_ids).unsqueeze(1)
        feat = F.normalize(self.text_proj(tokens[:, 0]).float(), dim=-1)
        _check_finite_outputs(input_ids, feat, "text features")
        return tokens, feat

    def fuse(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
             image_atts: Tensor | None = None) -> Tensor:
        """``text_tokens (N, 1, F)``, ``image_tokens (N, 1, F)`` → ``(N, 1, F)``:
        ``LN(u_t + MLP([u_t, u_v, u_t ⊙ u_v, |u_t − u_v|]))``. The masks are accepted and ignored."""
        if text_tokens.shape != image_tokens.shape:
            raise DataError(f"text_tokens {tuple(text_tokens.shape)} and image_tokens {tuple(image_tokens.shape)} "
                            "must have the same shape (N, 1, fusion_dim)")
        t, v = text_tokens[:, 0], image_tokens[:, 0]
        pair = torch.cat([t, v, t * v, (t - v).abs()], dim=-1)
        return self.fusion_norm(t + self.fusion(pair)).unsqueeze(1)

    def itm_logits(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
                   image_atts: Tensor | None = None) -> Tensor:
        """Image-text matching logits ``(N, 2)``; column 1 = "matched"."""
        return self.itm_head(self.fuse(text_tokens, attention_mask, image_tokens, image_atts)[:, 0])

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> FeatureHeadsFeatures:
        """Both unimodal encoders at once (what DistributedDataParallel hooks); see :meth:`encode_image`."""
        image_tokens, image_feat = self.encode_image(images)
        text_tokens, text_feat = self.encode_text(input_ids, attention_mask)
        return FeatureHeadsFeatures(image_tokens, image_feat, text_tokens, text_feat)
