"""The Backbone protocol (crossret.textimage.backbone): both GCKD models implement it, and every method
returns the shapes the protocol documents, on the tiny configurations the GCKD tests use."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from crossret.textimage.albef import AlbefConfig, AlbefModel  # noqa: E402
from crossret.textimage.backbone import Backbone, MaskedLanguageBackbone  # noqa: E402
from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel  # noqa: E402

B, L = 3, 7
IMAGE_DIM, TEXT_DIM, EMBED_DIM, FUSION_DIM = 12, 9, 16, 16


def _albef() -> AlbefModel:
    torch.manual_seed(0)
    return AlbefModel(AlbefConfig.tiny()).eval()


def _feature_heads() -> FeatureHeadsModel:
    torch.manual_seed(0)
    return FeatureHeadsModel(FeatureHeadsConfig(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, embed_dim=EMBED_DIM,
                                                hidden_dim=32, fusion_dim=FUSION_DIM)).eval()


def test_both_models_are_backbones() -> None:
    albef, heads = _albef(), _feature_heads()
    for model in (albef, heads):
        assert isinstance(model, Backbone)
        assert isinstance(model, nn.Module)
        assert Backbone in type(model).__mro__  # implemented explicitly, not only structurally
    assert isinstance(albef, MaskedLanguageBackbone)
    assert not isinstance(heads, MaskedLanguageBackbone)  # no tokens to mask
    assert not isinstance(nn.Linear(2, 2), Backbone)


def test_the_protocol_module_imports_no_torch() -> None:
    code = "import sys, crossret.textimage.backbone; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _check_common(model: Backbone, images: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None,
                  n_v: int, d_v: int, length: int, d_t: int) -> None:
    with torch.no_grad():
        image_tokens, image_feat = model.encode_image(images)
        text_tokens, text_feat = model.encode_text(text, mask)
        assert image_tokens.shape == (B, n_v, d_v)
        assert text_tokens.shape == (B, length, d_t)
        for feat in (image_feat, text_feat):
            assert feat.shape == (B, model.config.embed_dim) and feat.dtype == torch.float32
            torch.testing.assert_close(feat.norm(dim=1), torch.ones(B))
        assert model.fuse(text_tokens, mask, image_tokens).shape == (B, length, d_t)
        assert model.itm_logits(text_tokens, mask, image_tokens).shape == (B, 2)
    temp = model.clamped_temp().detach()
    assert temp.dim() == 0 and 0.001 <= float(temp) <= 0.5
    model.clamp_temp_()
    assert isinstance(model.no_weight_decay(), set) and "temp" in model.no_weight_decay()
    assert isinstance(model.config.to_dict(), dict)


def test_albef_shapes() -> None:
    model = _albef()
    c = model.config
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, c.in_channels, *c.image_size, generator=g)
    ids = torch.randint(6, c.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0
    n_v = 1 + c.num_patches
    _check_common(model, images, ids, mask, n_v, c.vision_width, L, c.text_width)
    with torch.no_grad():
        image_tokens, _ = model.encode_image(images)
        assert model.mlm_logits(ids, mask, image_tokens).shape == (B, L, c.vocab_size)


def test_feature_heads_shapes() -> None:
    model = _feature_heads()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, IMAGE_DIM, generator=g)
    texts = torch.randn(B, TEXT_DIM, generator=g)
    _check_common(model, images, texts, None, 1, FUSION_DIM, 1, FUSION_DIM)
