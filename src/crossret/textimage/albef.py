"""ALBEF-style vision-language backbone (Li et al., "Align before Fuse: Vision and Language
Representation Learning with Momentum Distillation", NeurIPS 2021), the backbone of GCKD (docs/gckd.md).

Modules (names are this package's; :mod:`crossret.textimage.checkpoint` maps them to ALBEF's keys):

* ``vision`` — ViT image encoder E_v: patch embedding (a ``patch × patch`` stride-``patch`` conv),
  a [CLS] token, learned position embeddings, ``vision_depth`` pre-norm blocks
  ``x ← x + Attn(LN(x)); x ← x + MLP(LN(x))`` and a final LayerNorm (timm / DeiT layout, eps 1e-6).
* ``text`` — BERT embeddings + the first ``text_layers`` BERT layers, self-attention only
  (ALBEF's ``mode='text'``): the unimodal text encoder E_t.
* ``fusion`` — the last ``fusion_layers`` BERT layers, each with self-attention, then
  cross-attention from the text tokens to the image tokens (ALBEF's ``mode='fusion'``): E_f.
* ``vision_proj`` / ``text_proj`` — ``Linear → embed_dim`` on the [CLS] token, L2-normalised:
  ``f_v = norm(g_v(E_v(v)[CLS]))``, ``f_t = norm(g_t(E_t(t)[CLS]))``.
* ``temp`` — the learnable ITC temperature τ (init 0.07), clamped to [0.001, 0.5] as ALBEF does.
* ``itm_head`` — ``Linear(text_width, 2)`` on the fusion [CLS]; ``p_itm = softmax(·)[1]``.
* ``mlm_head`` — BERT's MLM head (dense → GELU → LayerNorm → decoder), the decoder weight tied to the
  word embeddings and its bias shared with ``mlm_head.bias`` (as ALBEF's ``xbert``).

The BERT parts are built from ``transformers`` blocks (``BertEmbeddings``, ``BertAttention``,
``BertIntermediate``, ``BertOutput``) with our own layer glue: ``transformers``' ``BertLayer`` only
adds cross-attention to *decoder* layers, whose self-attention is causal, which ALBEF's fusion layers
are not.

Shapes: ``B`` batch, ``C`` image channels, ``H×W`` image size, ``N_v = 1 + (H/p)(W/p)`` image tokens,
``L`` text length, ``D_v``/``D_t`` vision/text widths, ``E`` = ``embed_dim``, ``V`` vocabulary.
Everything is autocast-safe (e.g. ``torch.autocast("cpu", torch.bfloat16)``): the normalised ITC
features are always returned in float32. No distributed calls are made here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossret.config_keys import reject_unknown_keys
from crossret.errors import ConfigError, DataError
from crossret.extras import require
from crossret.limits import check_memory
from crossret.textimage.backbone import MaskedLanguageBackbone

__all__ = [
    "TEMP_MAX",
    "TEMP_MIN",
    "AlbefConfig",
    "AlbefFeatures",
    "AlbefModel",
    "ema_update",
    "interpolate_pos_embed",
    "momentum_copy",
]

TEMP_MIN = 0.001
"""Lower clamp of the ITC temperature (ALBEF: ``self.temp.clamp_(0.001, 0.5)``)."""
TEMP_MAX = 0.5
"""Upper clamp of the ITC temperature."""

_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# ALBEF/BERT's additive mask value: large enough to zero a softmax entry, small enough to stay finite
# in float16/bfloat16 (torch.finfo(float32).min would overflow to -inf there).
_MASK_VALUE = -10000.0


# ----------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AlbefConfig:
    """Architecture and ITC/momentum hyper-parameters of :class:`AlbefModel`.

    Plain fields only, so that ``dataclasses.asdict`` / :meth:`to_dict` is YAML-serialisable.
    The defaults are ALBEF's (ViT-B/16 + BERT-base split 6 text + 6 fusion layers, ``configs/
    config_bert.json``, ``Retrieval_*.yaml``) at the person-retrieval image size 384×128 (gckd.md A6).
    """

    image_size: tuple[int, int] = (384, 128)  # (H, W)
    patch_size: int = 16
    in_channels: int = 3
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_qkv_bias: bool = True
    vision_layer_norm_eps: float = 1e-6
    text_width: int = 768
    text_heads: int = 12
    text_intermediate: int = 3072
    text_layers: int = 6
    fusion_layers: int = 6
    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    text_dropout: float = 0.1  # BERT hidden_dropout_prob = attention_probs_dropout_prob
    text_layer_norm_eps: float = 1e-12
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    attn_implementation: str = "sdpa"  # BERT attention: "sdpa" (fused kernels) or "eager" (explicit softmax)

    # -- presets -----------------------------------------------------------------------------------------------

    @classmethod
    def base(cls, **overrides: Any) -> AlbefConfig:
        """ALBEF's ViT-B/16 + BERT-base (the ``AlbefConfig()`` defaults), with ``overrides`` applied."""
        return cls.from_dict(overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> AlbefConfig:
        """A ~50k-parameter model for tests and smoke runs: width 32, 2 heads, 2 ViT blocks,
        1 text + 1 fusion layer, 32×16 images in 8×8 patches, vocabulary 100."""
        values: dict[str, Any] = dict(
            image_size=(32, 16), patch_size=8, vision_width=32, vision_depth=2, vision_heads=2,
            vision_mlp_ratio=2.0, text_width=32, text_heads=2, text_intermediate=64, text_layers=1,
            fusion_layers=1, vocab_size=100, max_position=32, embed_dim=16, queue_size=64,
        )
        values.update(overrides)
        return cls.from_dict(values)

    # -- (de)serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (``image_size`` becomes a list)."""
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AlbefConfig:
        """Build and validate a config from plain values; unknown keys are a :class:`ConfigError`."""
        reject_unknown_keys(cls, values, "AlbefConfig")
        values = dict(values)
        if "image_size" in values:
            size = values["image_size"]
            if isinstance(size, int) and not isinstance(size, bool):
                size = (size, size)
            try:
                values["image_size"] = tuple(size)
            except TypeError as exc:
                raise ConfigError(f"AlbefConfig.image_size={size!r}: must be (H, W)") from exc
        config = cls(**values)
        config.validate()
        return config

    # -- validation --------------------------------------------------------------------------------------------

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(H / patch, W / patch)``."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def parameter_count(self) -> int:
        """About how many weights a model of this configuration has (biases and norms left out)."""
        vw, tw, ti, embed = self.vision_width, self.text_width, self.text_intermediate, self.embed_dim
        mlp = int(vw * self.vision_mlp_ratio)
        vision = (self.in_channels * self.patch_size ** 2 * vw + (1 + self.num_patches) * vw
                  + self.vision_depth * (4 * vw * vw + 2 * vw * mlp))
        embeddings = (self.vocab_size + self.max_position + self.type_vocab_size) * tw
        text = self.text_layers * (4 * tw * tw + 2 * tw * ti)
        fusion = self.fusion_layers * (6 * tw * tw + 2 * tw * vw + 2 * tw * ti)  # + cross-attention
        heads = (vw + tw) * embed + 2 * tw + tw * tw + self.vocab_size
        return vision + embeddings + text + fusion + heads

    def validate(self) -> AlbefConfig:
        """Raise :class:`ConfigError` naming the first invalid field; return ``self``."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"AlbefConfig.{name}={getattr(self, name)!r}: {why}")

        size = self.image_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise bad("image_size", "must be two positive integers (H, W)")
        for name in ("patch_size", "in_channels", "vision_width", "vision_depth", "vision_heads", "text_width",
                     "text_heads", "text_intermediate", "text_layers", "fusion_layers", "vocab_size",
                     "max_position", "type_vocab_size", "embed_dim", "queue_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be a positive integer")
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise bad("patch_size", f"must divide both image sides {tuple(size)}")
        if self.vision_width % self.vision_heads:
            raise bad("vision_heads", f"must divide vision_width={self.vision_width}")
        if self.text_width % self.text_heads:
            raise bad("text_heads", f"must divide text_width={self.text_width}")
        if not isinstance(self.vision_mlp_ratio, (int, float)) or not self.vision_mlp_ratio > 0:
            raise bad("vision_mlp_ratio", "must be a positive number")
        if not isinstance(self.vision_qkv_bias, bool):
            raise bad("vision_qkv_bias", "must be true or false")
        for name in ("vision_layer_norm_eps", "text_layer_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise bad(name, "must be a positive number")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise bad("pad_token_id", f"must be a token id in [0, vocab_size={self.vocab_size})")
        if self.max_position < 2:
            raise bad("max_position", "must be at least 2 ([CLS] + one token)")
        if not isinstance(self.text_dropout, (int, float)) or not 0.0 <= self.text_dropout < 1.0:
            raise bad("text_dropout", "must be in [0, 1)")
        if not isinstance(self.temp, (int, float)) or not TEMP_MIN <= self.temp <= TEMP_MAX:
            raise bad("temp", f"must be in [{TEMP_MIN}, {TEMP_MAX}] (the range ALBEF clamps τ to)")
        if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum <= 1.0:
            raise bad("momentum", "must be in [0, 1]")
        if self.attn_implementation not in _ATTN_IMPLEMENTATIONS:
            raise bad("attn_implementation", f"must be one of {list(_ATTN_IMPLEMENTATIONS)}")
        weights = self.parameter_count()
        # float32 weights, their gradients, Adam's two moments and the momentum (teacher) copy
        check_memory(4 * 5 * weights, f"AlbefConfig: a model of about {weights} weights (vision_width="
                     f"{self.vision_width}, text_width={self.text_width}, text_intermediate={self.text_intermediate}, "
                     f"vocab_size={self.vocab_size}, max_position={self.max_position}, embed_dim={self.embed_dim}, "
                     f"{self.num_patches} image patches)", "lower these sizes (--model-set)")
        return self


# ----------------------------------------------------------------------------------------------------------------
# vision transformer
# ----------------------------------------------------------------------------------------------------------------


def interpolate_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_extra_tokens: int = 1,
) -> Tensor:
    """Resize ViT position embeddings to another patch grid (ALBEF ``models/vit.py: interpolate_pos_embed``).

    ``pos_embed`` is ``(1, num_extra_tokens + gh·gw, D)`` with patch tokens in row-major (h, w) order.
    The extra ([CLS]) tokens are kept; the patch part is reshaped to ``(1, D, gh, gw)``, resized by
    bicubic interpolation (``align_corners=False``) to ``new_grid`` and flattened back. ALBEF only
    handles square grids; here ``old_grid`` may be any ``(gh, gw)`` and defaults to the square grid
    implied by the token count. When ``old_grid == new_grid`` the input is returned unchanged (exact).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    n_patch = pos_embed.shape[1] - num_extra_tokens
    if old_grid is None:
        side = math.isqrt(max(n_patch, 0))
        if side * side != n_patch:
            raise ValueError(f"cannot infer the patch grid of a pos_embed with {n_patch} patch tokens "
                             "(not a square); pass old_grid=(gh, gw)")
        old_grid = (side, side)
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if old_grid[0] * old_grid[1] != n_patch:
        raise ValueError(f"old_grid={old_grid} does not match the {n_patch} patch tokens of pos_embed")
    if old_grid == new_grid:
        return pos_embed
    extra, patches = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    # Bicubic in float32: low-precision CPU kernels for bicubic are missing or inaccurate.
    grid = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([extra, patches], dim=1)


class VitAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm layout: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, N, D) → (B, N, D)``; ``softmax(q kᵀ / √d_h) v`` per head."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VitMlp(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VitBlock(nn.Module):
    """Pre-norm transformer block: ``x ← x + attn(norm1(x)); x ← x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = VitAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = VitMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT image encoder E_v (Dosovitskiy et al. 2021; ALBEF ``models/vit.py`` without dropout/drop-path,
    which ALBEF leaves at 0)."""

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__()
        width, p = config.vision_width, config.patch_size
        self.image_size = tuple(config.image_size)
        self.grid_size = config.grid_size
        self.patch_embed = nn.Conv2d(config.in_channels, width, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, width))
        self.blocks = nn.ModuleList(
            VitBlock(width, config.vision_heads, config.vision_mlp_ratio, config.vision_qkv_bias,
                     config.vision_layer_norm_eps)
            for _ in range(config.vision_depth)
        )
        self.norm = nn.LayerNorm(width, eps=config.vision_layer_norm_eps)

    def forward(self, images: Tensor) -> Tensor:
        """``images (B, C, H, W) → tokens (B, 1 + (H/p)(W/p), D_v)``, [CLS] first."""
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise DataError(f"images must have shape (B, C, {self.image_size[0]}, {self.image_size[1]}) for this "
                            f"model (AlbefConfig.image_size), got {tuple(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, gh·gw, D), row-major over (h, w)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# BERT text / fusion encoders
# ----------------------------------------------------------------------------------------------------------------


def _bert_config(config: AlbefConfig) -> Any:
    require("gckd", "transformers")
    from transformers import BertConfig

    bert = BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.text_width,
        num_hidden_layers=config.text_layers + config.fusion_layers,
        num_attention_heads=config.text_heads,
        intermediate_size=config.text_intermediate,
        hidden_act="gelu",
        hidden_dropout_prob=config.text_dropout,
        attention_probs_dropout_prob=config.text_dropout,
        max_position_embeddings=config.max_position,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.text_layer_norm_eps,
        pad_token_id=config.pad_token_id,
    )
    # The attention modules look the kernel up from the config at call time; a standalone config has none.
    bert._attn_implementation = config.attn_implementation
    return bert


def _key_mask(mask: Tensor | None, implementation: str, dtype: torch.dtype) -> Tensor | None:
    """A ``(B, L)`` 0/1 key-padding mask → what the attention kernel wants, broadcast as ``(B, 1, 1, L)``.

    ``sdpa``: boolean, True = attend. ``eager``: additive, ``(1 − m)·(−10000)`` as ALBEF/BERT, in the
    hidden states' ``dtype`` (a float32 mask would promote a bf16 model's attention weights to float32).
    """
    if mask is None:
        return None
    if mask.dim() != 2:
        raise DataError(f"attention masks must have shape (B, L), got {tuple(mask.shape)}")
    mask = mask[:, None, None, :]
    if implementation == "sdpa":
        return mask.bool()
    return ((1.0 - mask.float()) * _MASK_VALUE).to(dtype)


class AlbefBertLayer(nn.Module):
    """One BERT layer in ALBEF's ``xbert`` layout: ``attention`` (self), optional ``crossattention`` (to the
    image tokens), then ``intermediate`` + ``output`` (the feed-forward with residual + LayerNorm).

    ``h ← LN(h + SelfAttn(h)); [h ← LN(h + CrossAttn(h, image))]; h ← LN(h + W₂ GELU(W₁ h))`` (post-norm BERT).
    """

    def __init__(self, bert_config: Any, *, cross_attention: bool, encoder_width: int) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput

        self.attention = BertAttention(bert_config, is_causal=False)
        self.has_cross_attention = cross_attention
        if cross_attention:
            self.crossattention = BertAttention(bert_config, is_causal=False, is_cross_attention=True)
            if encoder_width != bert_config.hidden_size:
                # transformers sizes keys/values by the text width; ALBEF by the image width (encoder_width).
                heads = self.crossattention.self
                heads.key = nn.Linear(encoder_width, heads.all_head_size)
                heads.value = nn.Linear(encoder_width, heads.all_head_size)
        self.intermediate = BertIntermediate(bert_config)
        self.output = BertOutput(bert_config)

    def forward(
        self,
        hidden: Tensor,
        attention_mask: Tensor | None,
        encoder_hidden: Tensor | None = None,
        encoder_mask: Tensor | None = None,
    ) -> Tensor:
        """``hidden (B, L, D_t)``, masks already in kernel form (:func:`_key_mask`) → ``(B, L, D_t)``."""
        hidden = self.attention(hidden, attention_mask=attention_mask)[0]  # (output, attention weights)
        if self.has_cross_attention:
            if encoder_hidden is None:
                raise ValueError("a fusion layer needs the image tokens (encoder_hidden)")
            hidden = self.crossattention(hidden, encoder_hidden_states=encoder_hidden,
                                         encoder_attention_mask=encoder_mask)[0]
        return self.output(self.intermediate(hidden), hidden)


class AlbefTextEncoder(nn.Module):
    """E_t: BERT embeddings + ``text_layers`` self-attention layers (ALBEF ``mode='text'``)."""

    def __init__(self, config: AlbefConfig, bert_config: Any) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.implementation = config.attn_implementation
        self.max_position = config.max_position
        self.embeddings = BertEmbeddings(bert_config)
        self.layers = nn.ModuleList(
            AlbefBertLayer(bert_config, cross_attention=False, encoder_width=config.vision_width)
            for _ in range(config.text_layers)
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``input_ids (B, L)`` int64, ``attention_mask (B, L)`` 0/1 → ``(B, L, D_t)``."""
        if input_ids.dim() != 2:
            raise DataError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_position:
            raise DataError(f"text length {input_ids.shape[1]} exceeds AlbefConfig.max_position={self.max_position}; "
                            "truncate the captions (ALBEF: max_words / tokenizer max_length)")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise DataError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                            f"{tuple(input_ids.shape)}")
        hidden = self.embeddings(input_ids=input_ids)
        mask = _key_mask(attention_mask, self.implementation, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, mask)
        return hidden


class AlbefFusionEncoder(nn.Module):
    """E_f: ``fusion_layers`` BERT layers with cross-attention to the image tokens (ALBEF ``mode='fusion'``)."""

    def __init__(self, config: AlbefConfig, bert_config: Any) -> None:
        super().__init__()
        self.implementation = config.attn_implementation
        self.layers = nn.ModuleList(
            AlbefBertLayer(bert_config, cross_attention=True, encoder_width=config.vision_width)
            for _ in range(config.fusion_layers)
        )

    def forward(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
                image_atts: Tensor | None = None) -> Tensor:
        """``text_tokens (B, L, D_t)``, ``attention_mask (B, L)``, ``image_tokens (B, N_v, D_v)``,
        ``image_atts (B, N_v)`` (None = all ones) → ``(B, L, D_t)``."""
        if image_tokens.dim() != 3 or image_tokens.shape[0] != text_tokens.shape[0]:
            raise DataError(f"image_tokens must have shape (B={text_tokens.shape[0]}, N_v, D_v), "
                            f"got {tuple(image_tokens.shape)}")
        mask = _key_mask(attention_mask, self.implementation, text_tokens.dtype)
        image_mask = _key_mask(image_atts, self.implementation, text_tokens.dtype)
        hidden = text_tokens
        for layer in self.layers:
            hidden = layer(hidden, mask, image_tokens, image_mask)
        return hidden


class AlbefMLMHead(nn.Module):
    """BERT ``BertOnlyMLMHead`` equivalent: ``decoder(LN(GELU(dense(h))))`` with
    ``decoder.weight`` tied to the word embeddings and ``decoder.bias is bias`` (ALBEF ``xbert``)."""

    def __init__(self, bert_config: Any, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(bert_config)
        self.decoder = nn.Linear(bert_config.hidden_size, bert_config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # weight tying (Press & Wolf 2017), as BERT
        self.bias = nn.Parameter(torch.zeros(bert_config.vocab_size))
        self.decoder.bias = self.bias  # one parameter under both of ALBEF's names

    def forward(self, hidden: Tensor) -> Tensor:
        """``(B, L, D_t) → (B, L, V)`` logits."""
        return self.decoder(self.transform(hidden))


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------


class AlbefFeatures(NamedTuple):
    """Unimodal outputs of :meth:`AlbefModel.forward`."""

    image_tokens: Tensor  # (B, N_v, D_v)
    image_feat: Tensor  # (B, E), unit norm, float32
    text_tokens: Tensor  # (B, L, D_t)
    text_feat: Tensor  # (B, E), unit norm, float32


class LearnableTemperature:
    """The ITC temperature τ shared by both backbones: a parameter ``self.temp`` kept in [0.001, 0.5]."""

    temp: nn.Parameter

    @torch.no_grad()
    def clamp_temp_(self) -> None:
        """Clamp τ in place to [0.001, 0.5]; ALBEF does this at the start of every forward."""
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)

    def clamped_temp(self) -> Tensor:
        """τ clamped to [0.001, 0.5] (differentiable inside the range); use it to divide similarities."""
        return self.temp.clamp(TEMP_MIN, TEMP_MAX)


class AlbefModel(LearnableTemperature, nn.Module, MaskedLanguageBackbone):
    """ALBEF (Li et al., NeurIPS 2021): ViT image encoder, BERT text encoder, BERT fusion encoder with
    cross-attention, ITC projections + temperature, ITM head and MLM head. See the module docstring.
    A :class:`~crossret.textimage.backbone.MaskedLanguageBackbone`.

    The momentum (teacher) model of ALBEF/GCKD is a second instance: :func:`momentum_copy` and
    :func:`ema_update`. Queues and losses live with the trainer.
    """

    def __init__(self, config: AlbefConfig | None = None) -> None:
        super().__init__()
        config = (config or AlbefConfig()).validate()
        self.config = config
        bert_config = _bert_config(config)
        self.vision = VisionTransformer(config)
        self.text = AlbefTextEncoder(config, bert_config)
        self.fusion = AlbefFusionEncoder(config, bert_config)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.itm_head = nn.Linear(config.text_width, 2)
        self.mlm_head = AlbefMLMHead(bert_config, self.text.embeddings.word_embeddings)
        self._init_weights()

    # -- initialisation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self) -> None:
        """ViT: truncated normal (std 0.02) for Linear, pos_embed and cls_token (timm/DeiT); BERT: normal
        (std 0.02) for Linear/Embedding, zero padding row (``BertPreTrainedModel._init_weights``);
        LayerNorm (1, 0); biases 0. Pre-trained weights normally replace all of this."""
        for module in self.vision.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.vision.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.vision.cls_token, std=0.02)
        for part in (self.text, self.fusion, self.mlm_head.transform, self.vision_proj, self.text_proj, self.itm_head):
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=0.02)
                    if module.padding_idx is not None:
                        module.weight[module.padding_idx].zero_()
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.mlm_head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names ALBEF/timm exclude from weight decay."""
        return {"vision.pos_embed", "vision.cls_token", "temp"}

    # -- encoders ----------------------------------------------------------------------------------------------

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images (B, C, H, W)`` → ``(image_tokens (B, N_v, D_v), image_feat (B, E))``.

        ``image_feat = norm(vision_proj(image_tokens[:, 0]))``, float32, unit L2 norm.
        """
        tokens = self.vision(images)
        # Normalise in float32: under autocast the projection is bf16/fp16, and the features feed
        # similarity matrices, queues and kNN graphs where a 2⁻⁸ norm error would compound.
        feat = F.normalize(self.vision_proj(tokens[:, 0]).float(), dim=-1)
        return tokens, feat

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``input_ids (B, L)``, ``attention_mask (B, L)`` (1 = token, 0 = padding) →
        ``(text_tokens (B, L, D_t), text_feat (B, E))`` from the text-only layers; ``text_feat`` is
        ``norm(text_proj(text_tokens[:, 0]))``, float32, unit L2 norm. Independent of any image."""
        tokens = self.text(input_ids, attention_mask)
        feat = F.normalize(self.text_proj(tokens[:, 0]).float(), dim=-1)
        return tokens, feat

    def fuse(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
             image_atts: Tensor | None = None) -> Tensor:
        """Fusion encoder: ``text_tokens (B, L, D_t)`` (from :meth:`encode_text`), ``attention_mask (B, L)``,
        ``image_tokens (B, N_v, D_v)``, ``image_atts (B, N_v)`` (None = all ones) → ``(B, L, D_t)``."""
        return self.fusion(text_tokens, attention_mask, image_tokens, image_atts)

    def itm_logits(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
                   image_atts: Tensor | None = None) -> Tensor:
        """Image-text matching logits ``(B, 2)`` = ``itm_head(fuse(...)[:, 0])``; column 1 = "matched"."""
        return self.itm_head(self.fuse(text_tokens, attention_mask, image_tokens, image_atts)[:, 0])

    def mlm_logits(self, input_ids_masked: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
                   image_atts: Tensor | None = None) -> Tensor:
        """Masked-LM logits ``(B, L, V)``: text layers → fusion layers conditioned on ``image_tokens
        (B, N_v, D_v)`` → MLM head (ALBEF ``BertForMaskedLM`` in ``mode='multi_modal'``)."""
        text_tokens = self.text(input_ids_masked, attention_mask)
        return self.mlm_head(self.fusion(text_tokens, attention_mask, image_tokens, image_atts))

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> AlbefFeatures:
        """Both unimodal encoders at once (convenient under DistributedDataParallel, which hooks
        ``forward``): returns :class:`AlbefFeatures`."""
        image_tokens, image_feat = self.encode_image(images)
        text_tokens, text_feat = self.encode_text(input_ids, attention_mask)
        return AlbefFeatures(image_tokens, image_feat, text_tokens, text_feat)


# ----------------------------------------------------------------------------------------------------------------
# momentum (EMA) teacher
# ----------------------------------------------------------------------------------------------------------------


def momentum_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for use as ALBEF's momentum model: same weights, ``requires_grad=False``.

    Tied weights stay tied in the copy (``copy.deepcopy`` keeps shared parameters shared).
    """
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """ALBEF ``_momentum_update``: ``θ' ← m·θ' + (1 − m)·θ`` for every parameter, in place.

    Floating buffers are copied from the student (none of the models here has one that should be
    averaged). Raises :class:`ConfigError` when ``m`` is outside [0, 1] or the two models differ in
    parameter names or shapes.
    """
    if not 0.0 <= float(m) <= 1.0:
        raise ConfigError(f"ema momentum m={m!r}: must be in [0, 1]")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        diff = sorted(set(t_params) ^ set(s_params))
        raise ConfigError(f"ema_update: teacher and student have different parameters, e.g. {diff[:5]}")
    teacher_list, student_list = [], []
    for name, t in t_params.items():
        s = s_params[name]
        if t.shape != s.shape:
            raise ConfigError(f"ema_update: shape mismatch for {name}: {tuple(t.shape)} vs {tuple(s.shape)}")
        teacher_list.append(t)
        student_list.append(s.to(dtype=t.dtype, device=t.device))
    if teacher_list:
        # Fused multi-tensor ops: one kernel launch per group instead of one per parameter.
        torch._foreach_mul_(teacher_list, float(m))
        torch._foreach_add_(teacher_list, student_list, alpha=1.0 - float(m))
    s_buffers = dict(student.named_buffers())
    for name, buf in teacher.named_buffers():
        if name in s_buffers and buf.is_floating_point() and buf.shape == s_buffers[name].shape:
            buf.copy_(s_buffers[name])

