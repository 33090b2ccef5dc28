"""What the GCKD trainer, evaluation and text search need from a model: the :class:`Backbone` protocol.

Two models implement it: :class:`~crossret.textimage.albef.AlbefModel` (pixels and token ids; ALBEF,
Li et al., NeurIPS 2021) and :class:`~crossret.textimage.feature_heads.FeatureHeadsModel` (precomputed
feature vectors). Code that trains or ranks with a backbone is typed against this protocol, never
against one of the two classes, the way data sources are typed against
:class:`~crossret.textimage.streams.TrainingData`.

Shapes: ``B`` batch; ``E`` = ``config.embed_dim``; the token states are ``(B, N_v, D_v)`` for images
and ``(B, L, D_t)`` for text. For ALBEF ``N_v = 1 + (H/p)(W/p)`` patch tokens and ``L`` is the text
length; for the feature heads both are one-token sequences ``(B, 1, F)`` and the masks are ignored.
The unit-norm ITC features ``f_v``, ``f_t`` are always float32, whatever the autocast dtype.

Importing this module imports neither torch nor transformers (the types are only named).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["Backbone", "BackboneConfig", "MaskedLanguageBackbone"]


class BackboneConfig(Protocol):
    """The parts of a backbone's configuration the trainer reads: the ITC width and a plain-dict form
    (recorded in checkpoint fingerprints, so that a resume with another model is refused)."""

    embed_dim: int

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class Backbone(Protocol):
    """A GCKD model: unimodal encoders with ITC projections, a fusion encoder with an ITM head, and a
    learnable ITC temperature τ kept in [0.001, 0.5] (ALBEF's clamp).

    Besides the methods below a backbone is a ``torch.nn.Module``; the trainer and evaluation also use
    the module methods listed at the end (moving, train/eval mode, parameters and state dicts).
    """

    config: BackboneConfig
    training: bool

    # -- encoders ----------------------------------------------------------------------------------------------

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images`` (pixels ``(B, C, H, W)`` or features ``(B, d_img)``) →
        ``(image_tokens (B, N_v, D_v), image_feat (B, E))``, ``image_feat`` unit norm, float32."""
        ...

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``input_ids`` (token ids ``(B, L)`` or features ``(B, d_txt)``), ``attention_mask (B, L)`` or None →
        ``(text_tokens (B, L, D_t), text_feat (B, E))``, ``text_feat`` unit norm, float32; independent of
        any image."""
        ...

    def fuse(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
             image_atts: Tensor | None = None) -> Tensor:
        """Fusion encoder: ``text_tokens (B, L, D_t)``, ``attention_mask (B, L)``, ``image_tokens (B, N_v, D_v)``,
        ``image_atts (B, N_v)`` (None = all ones) → fused text states ``(B, L, D_t)``."""
        ...

    def itm_logits(self, text_tokens: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
                   image_atts: Tensor | None = None) -> Tensor:
        """Image-text matching logits ``(B, 2)`` of the fused [CLS] state; column 1 = "matched"."""
        ...

    # -- temperature and optimisation --------------------------------------------------------------------------

    def clamped_temp(self) -> Tensor:
        """τ clamped to [0.001, 0.5], a 0-d tensor (differentiable inside the range)."""
        ...

    def clamp_temp_(self) -> None:
        """Clamp τ in place to [0.001, 0.5] (after every optimiser step)."""
        ...

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters excluded from weight decay."""
        ...

    # -- the torch.nn.Module methods the trainer and evaluation call -------------------------------------------

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


@runtime_checkable
class MaskedLanguageBackbone(Backbone, Protocol):
    """A backbone with a masked-language-modelling head (ALBEF); the trainer adds the MLM term only for
    these. The feature heads have no tokens to mask."""

    def mlm_logits(self, input_ids_masked: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
                   image_atts: Tensor | None = None) -> Tensor:
        """Masked-LM logits ``(B, L, V)`` of the text conditioned on ``image_tokens (B, N_v, D_v)``."""
        ...
