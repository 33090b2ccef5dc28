"""ALBEF backbone (crossret.textimage): shapes, ITC/ITM/MLM behaviour, the ALBEF checkpoint key mapping,
safe loading, pos-embed interpolation, the BERT vocabulary and the feature-heads backbone.

Everything runs on the tiny config (width 32, 2 heads, 1 text + 1 fusion layer, 32×16 images).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from crossret.errors import ConfigError, DataError, FileFormatError  # noqa: E402
from crossret.textimage import (  # noqa: E402
    AlbefConfig,
    AlbefModel,
    FeatureHeadsConfig,
    FeatureHeadsModel,
    albef_state_to_model,
    ema_update,
    interpolate_pos_embed,
    load_albef_checkpoint,
    load_bert_vocab,
    model_to_albef_state,
    momentum_copy,
    save_albef_checkpoint,
)

B, L = 3, 7


def _tiny(seed: int = 0, **overrides) -> AlbefModel:
    torch.manual_seed(seed)
    return AlbefModel(AlbefConfig.tiny(**overrides)).eval()


def _batch(config: AlbefConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, config.in_channels, *config.image_size, generator=g)
    ids = torch.randint(6, config.vocab_size, (B, L), generator=g)
    ids[:, 0] = 2  # a [CLS]-like first token
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:] = 0  # one padded caption
    ids[0, 5:] = config.pad_token_id
    return images, ids, mask


@pytest.fixture(scope="module")
def model() -> AlbefModel:
    return _tiny()


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------


def test_config_presets_validate_and_round_trip_through_yaml():
    base = AlbefConfig.base()
    assert (base.vision_width, base.vision_depth, base.vision_heads, base.text_layers, base.fusion_layers) == (
        768, 12, 12, 6, 6)
    assert base.image_size == (384, 128) and base.grid_size == (24, 8) and base.embed_dim == 256
    tiny = AlbefConfig.tiny()
    again = AlbefConfig.from_dict(yaml.safe_load(yaml.safe_dump(tiny.to_dict())))
    assert again == tiny and isinstance(again.image_size, tuple)


@pytest.mark.parametrize(("field", "value"), [
    ("vision_heads", 3), ("text_heads", 5), ("patch_size", 5), ("temp", 0.9), ("momentum", 1.5),
    ("image_size", (32,)), ("text_layers", 0), ("attn_implementation", "flash"), ("pad_token_id", 100),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        AlbefConfig.tiny(**{field: value})


def test_config_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="vision_widht"):
        AlbefConfig.from_dict({"vision_widht": 32})


# ----------------------------------------------------------------------------------------------------------------
# forward behaviour
# ----------------------------------------------------------------------------------------------------------------


def test_forward_shapes_of_every_method(model):
    c = model.config
    images, ids, mask = _batch(c)
    n_v = 1 + (32 // 8) * (16 // 8)
    image_tokens, image_feat = model.encode_image(images)
    text_tokens, text_feat = model.encode_text(ids, mask)
    assert image_tokens.shape == (B, n_v, c.vision_width) and image_feat.shape == (B, c.embed_dim)
    assert text_tokens.shape == (B, L, c.text_width) and text_feat.shape == (B, c.embed_dim)
    assert model.fuse(text_tokens, mask, image_tokens).shape == (B, L, c.text_width)
    assert model.itm_logits(text_tokens, mask, image_tokens, torch.ones(B, n_v)).shape == (B, 2)
    assert model.mlm_logits(ids, mask, image_tokens).shape == (B, L, c.vocab_size)
    out = model(images, ids, mask)
    assert torch.equal(out.image_feat, image_feat) and torch.equal(out.text_feat, text_feat)
    with pytest.raises(DataError, match="32, 16"):
        model.encode_image(torch.randn(1, 3, 16, 16))


def test_image_and_text_widths_may_differ():
    m = _tiny(vision_width=48, vision_heads=3)
    images, ids, mask = _batch(m.config)
    image_tokens, _ = m.encode_image(images)
    text_tokens, _ = m.encode_text(ids, mask)
    assert image_tokens.shape[-1] == 48
    assert m.itm_logits(text_tokens, mask, image_tokens).shape == (B, 2)


def test_features_are_unit_norm_float32(model):
    images, ids, mask = _batch(model.config)
    for feat in (model.encode_image(images)[1], model.encode_text(ids, mask)[1]):
        assert feat.dtype == torch.float32
        torch.testing.assert_close(feat.norm(dim=-1), torch.ones(B))


def test_padding_is_masked_and_sdpa_equals_eager(model):
    images, ids, mask = _batch(model.config)
    _, full = model.encode_text(ids, mask)
    _, short = model.encode_text(ids[:1, :5], mask[:1, :5])  # the same caption without its padding
    torch.testing.assert_close(full[:1], short, atol=1e-5, rtol=1e-5)
    eager = _tiny(attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    image_tokens = model.encode_image(images)[0]
    tt, tf = model.encode_text(ids, mask)
    tt_e, tf_e = eager.encode_text(ids, mask)
    torch.testing.assert_close(tf, tf_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.itm_logits(tt, mask, image_tokens), eager.itm_logits(tt_e, mask, image_tokens),
                               atol=1e-5, rtol=1e-5)


def test_temperature_is_clamped_like_albef(model):
    m = _tiny()
    assert m.temp.item() == pytest.approx(0.07)
    with torch.no_grad():
        m.temp.fill_(5.0)
    assert m.clamped_temp().item() == pytest.approx(0.5)
    m.clamp_temp_()
    assert m.temp.item() == pytest.approx(0.5)
    with torch.no_grad():
        m.temp.fill_(1e-6)
    m.clamp_temp_()
    assert m.temp.item() == pytest.approx(0.001)


def test_fusion_depends_on_the_image_and_text_encoding_does_not(model):
    images, ids, mask = _batch(model.config)
    other = images.flip(0) + 0.5
    text_a, feat_a = model.encode_text(ids, mask)
    tok_1, tok_2 = model.encode_image(images)[0], model.encode_image(other)[0]
    text_b, feat_b = model.encode_text(ids, mask)
    assert torch.equal(text_a, text_b) and torch.equal(feat_a, feat_b)
    itm_1 = model.itm_logits(text_a, mask, tok_1)
    itm_2 = model.itm_logits(text_a, mask, tok_2)
    assert not torch.allclose(itm_1, itm_2)
    assert not torch.allclose(model.mlm_logits(ids, mask, tok_1), model.mlm_logits(ids, mask, tok_2))
    # image_atts masks image tokens: masking all but [CLS] changes the fusion output
    atts = torch.zeros(B, tok_1.shape[1])
    atts[:, 0] = 1
    assert not torch.allclose(model.itm_logits(text_a, mask, tok_1, atts), itm_1)


def test_mlm_decoder_is_tied_to_word_embeddings(model):
    head = model.mlm_head
    assert head.decoder.weight is model.text.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    names = [n for n, _ in model.named_parameters()]
    assert "mlm_head.decoder.weight" not in names  # counted once, under the embeddings


def test_bfloat16_autocast_forward(model):
    images, ids, mask = _batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_tokens, image_feat = model.encode_image(images)
        text_tokens, text_feat = model.encode_text(ids, mask)
        itm = model.itm_logits(text_tokens, mask, image_tokens)
        mlm = model.mlm_logits(ids, mask, image_tokens)
    assert image_feat.dtype == torch.float32 and text_feat.dtype == torch.float32
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(B))
    for out in (image_tokens, text_tokens, itm, mlm):
        assert torch.isfinite(out.float()).all()
    ref = model.itm_logits(model.encode_text(ids, mask)[0], mask, model.encode_image(images)[0])
    torch.testing.assert_close(itm.float(), ref, atol=0.1, rtol=0.1)


def test_ema_update_and_momentum_copy(model):
    student = _tiny(seed=3)
    teacher = momentum_copy(model)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.mlm_head.decoder.weight is teacher.text.embeddings.word_embeddings.weight
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, 0.9)
    s = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * s[name])
    with pytest.raises(ConfigError):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ConfigError, match="different parameters"):
        ema_update(teacher, _tiny(vision_depth=1), 0.5)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _fake_albef_file(model: AlbefModel, path, **extra):
    """An ALBEF-layout checkpoint as ALBEF writes it: student + momentum copies + queues."""
    state = model_to_albef_state(model)
    state.update({k: v.clone() + 0.01 if v.is_floating_point() else v.clone()
                  for k, v in model_to_albef_state(model, momentum=True).items()})
    e = model.config.embed_dim
    state.update(image_queue=F.normalize(torch.randn(e, 8), dim=0), text_queue=F.normalize(torch.randn(e, 8), dim=0),
                 idx_queue=torch.full((1, 8), -100), queue_ptr=torch.zeros(1, dtype=torch.long))
    state.update(extra)
    torch.save({"model": state, "config": {"image_res": 32, "embed_dim": e}, "epoch": 3}, path)
    return state


def _assert_identical(a: AlbefModel, b: AlbefModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_key_mapping_round_trip_is_exact(model, tmp_path):
    path = tmp_path / "albef.pth"
    _fake_albef_file(model, path)
    loaded = load_albef_checkpoint(path, AlbefConfig.tiny(), strict=True, momentum=True, queues=True)
    fresh = loaded.model.eval()
    assert fresh is not model
    _assert_identical(model, fresh)
    assert loaded.missing_keys == [] and loaded.unexpected_keys == [] and loaded.interpolated == []
    queues = ["idx_queue", "image_queue", "queue_ptr", "text_queue"]
    assert sorted(loaded.queues) == queues
    assert loaded.ignored_keys == sorted([*queues, "text_encoder.bert.embeddings.position_ids",
                                          "text_encoder_m.bert.embeddings.position_ids"])
    student_only = load_albef_checkpoint(path, AlbefConfig.tiny())
    assert student_only.teacher is None and student_only.queues == {}
    assert "visual_encoder_m.cls_token" in student_only.ignored_keys
    # outputs identical
    images, ids, mask = _batch(model.config)
    tok, feat = model.encode_image(images)
    tok2, feat2 = fresh.encode_image(images)
    assert torch.equal(tok, tok2) and torch.equal(feat, feat2)
    tt, tf = model.encode_text(ids, mask)
    tt2, tf2 = fresh.encode_text(ids, mask)
    assert torch.equal(tf, tf2)
    assert torch.equal(model.itm_logits(tt, mask, tok), fresh.itm_logits(tt2, mask, tok2))
    assert torch.equal(model.mlm_logits(ids, mask, tok), fresh.mlm_logits(ids, mask, tok2))
    # the teacher comes from the *_m copies (+0.01), ITM head and temperature from the student
    teacher = loaded.teacher
    torch.testing.assert_close(teacher.vision.cls_token, model.vision.cls_token + 0.01)
    assert torch.equal(teacher.itm_head.weight, model.itm_head.weight)
    assert teacher.mlm_head.decoder.weight is teacher.text.embeddings.word_embeddings.weight


def test_mapped_key_names_follow_albef_literally(model):
    state = model_to_albef_state(model)
    for key in ("visual_encoder.blocks.0.attn.qkv.weight", "visual_encoder.patch_embed.proj.weight",
                "visual_encoder.pos_embed", "visual_encoder.cls_token", "visual_encoder.norm.bias",
                "text_encoder.bert.embeddings.word_embeddings.weight", "text_encoder.bert.embeddings.position_ids",
                "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
                "text_encoder.bert.encoder.layer.1.crossattention.self.query.weight",
                "text_encoder.bert.encoder.layer.1.crossattention.output.LayerNorm.weight",
                "text_encoder.cls.predictions.decoder.weight", "text_encoder.cls.predictions.decoder.bias",
                "text_encoder.cls.predictions.bias", "text_encoder.cls.predictions.transform.dense.weight",
                "vision_proj.weight", "text_proj.bias", "itm_head.weight", "temp"):
        assert key in state, key
    assert not any("crossattention" in k for k in state if ".layer.0." in k)  # layer 0 is a text layer
    assert torch.equal(state["text_encoder.cls.predictions.decoder.weight"],
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])
    momentum = model_to_albef_state(model, momentum=True)
    assert "visual_encoder_m.blocks.1.mlp.fc2.bias" in momentum and "text_proj_m.weight" in momentum
    assert "itm_head_m.weight" not in momentum and "itm_head.weight" not in momentum
    mapped = albef_state_to_model(state, model.config)
    assert mapped.sources["fusion.layers.0.crossattention.self.query.weight"] == (
        "text_encoder.bert.encoder.layer.1.crossattention.self.query.weight")
    assert mapped.unexpected == [] and mapped.ignored == ["text_encoder.bert.embeddings.position_ids"]


def test_save_writes_albef_layout_atomically_and_reloads(model, tmp_path):
    path = tmp_path / "out.pth"
    save_albef_checkpoint(model, path, teacher=momentum_copy(model), queues={"queue_ptr": torch.zeros(1).long()})
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]  # no temporary left behind
    payload = torch.load(path, weights_only=True)
    assert "visual_encoder.blocks.0.attn.qkv.weight" in payload["model"]
    assert "visual_encoder_m.blocks.0.attn.qkv.weight" in payload["model"]
    loaded = load_albef_checkpoint(path, AlbefConfig.tiny(), momentum=True)
    _assert_identical(model, loaded.model)
    _assert_identical(model, loaded.teacher)


def test_retrieval_layout_without_bert_prefix_loads(model, tmp_path):
    state = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in model_to_albef_state(model).items()}
    torch.save({"model": state}, tmp_path / "ft.pth")
    _assert_identical(model, load_albef_checkpoint(tmp_path / "ft.pth", AlbefConfig.tiny()).model)


def test_missing_and_unexpected_keys_are_listed(model, tmp_path):
    path = tmp_path / "partial.pth"
    state = model_to_albef_state(model)
    del state["itm_head.weight"]
    state["visual_encoder.blocks.7.attn.qkv.weight"] = torch.zeros(3)
    state["some_new_head.weight"] = torch.zeros(2)
    torch.save({"model": state}, path)
    with pytest.raises(FileFormatError) as info:
        load_albef_checkpoint(path, AlbefConfig.tiny())
    message = str(info.value)
    assert str(path) in message and "itm_head.weight" in message
    assert "visual_encoder.blocks.7.attn.qkv.weight" in message and "some_new_head.weight" in message
    loaded = load_albef_checkpoint(path, AlbefConfig.tiny(), strict=False)
    assert loaded.missing_keys == ["itm_head.weight"]
    assert loaded.unexpected_keys == ["some_new_head.weight", "visual_encoder.blocks.7.attn.qkv.weight"]
    assert torch.equal(loaded.model.itm_head.bias, model.itm_head.bias)


def test_shape_mismatch_and_inconsistent_ties_are_errors(model, tmp_path):
    state = model_to_albef_state(model)
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.cls.predictions.decoder.weight"] + 1
    torch.save({"model": state}, tmp_path / "tie.pth")
    with pytest.raises(FileFormatError, match="differ"):
        load_albef_checkpoint(tmp_path / "tie.pth", AlbefConfig.tiny())
    torch.save({"model": model_to_albef_state(model)}, tmp_path / "ok.pth")
    with pytest.raises(FileFormatError, match="vocab_size") as info:
        load_albef_checkpoint(tmp_path / "ok.pth", AlbefConfig.tiny(vocab_size=120))
    assert "text_encoder.bert.embeddings.word_embeddings.weight: checkpoint (100, 32) vs model (120, 32)" in str(
        info.value)


def test_corrupt_truncated_and_foreign_files(model, tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": model_to_albef_state(model)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(2)}, foreign)
    for path in (truncated, garbage, foreign, tmp_path / "absent.pth"):
        with pytest.raises(FileFormatError, match=re.escape(path.name)):
            load_albef_checkpoint(path, AlbefConfig.tiny())


def test_altered_weights_fail_the_zip_crc_check(model, tmp_path):
    # torch.load itself would silently return the altered tensor; the CRC-32 check refuses the file.
    path = tmp_path / "altered.pth"
    state = model_to_albef_state(model)
    torch.save({"model": state}, path)
    raw = bytearray(path.read_bytes())
    weight = state["text_encoder.bert.embeddings.word_embeddings.weight"].numpy().tobytes()
    raw[raw.find(weight) + 7] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match=r"altered\.pth: checksum mismatch in member"):
        load_albef_checkpoint(path, AlbefConfig.tiny())
    key = "text_encoder.bert.embeddings.word_embeddings.weight"
    assert not torch.equal(torch.load(path, weights_only=True)["model"][key], state[key])  # the reason for the check


_UNPICKLED: list[str] = []


def _record_unpickle() -> str:
    _UNPICKLED.append("ran")
    return "payload"


class _Malicious:
    def __reduce__(self):
        return (_record_unpickle, ())


def test_non_tensor_objects_are_refused_by_weights_only(model, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": model_to_albef_state(model), "optimizer": _Malicious()}, path)
    with pytest.raises(FileFormatError, match=r"evil\.pth.*weights_only") as info:
        load_albef_checkpoint(path, AlbefConfig.tiny())
    assert "_record_unpickle" in str(info.value)
    assert _UNPICKLED == []  # nothing was executed


def test_pos_embed_interpolation():
    pos = torch.randn(1, 1 + 4 * 2, 8)
    assert interpolate_pos_embed(pos, (4, 2), (4, 2)) is pos  # unchanged grid: exact, no copy
    out = interpolate_pos_embed(pos, (6, 3), (4, 2))
    assert out.shape == (1, 1 + 18, 8) and torch.equal(out[:, :1], pos[:, :1])
    square = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(square, (2, 3)).shape == (1, 7, 8)  # square grid inferred
    # a constant field stays constant under bicubic resizing
    const = torch.ones(1, 1 + 8, 4)
    torch.testing.assert_close(interpolate_pos_embed(const, (8, 4), (4, 2)), torch.ones(1, 33, 4))
    with pytest.raises(ValueError, match="old_grid"):
        interpolate_pos_embed(pos, (3, 3))


def test_checkpoint_for_another_image_size_is_interpolated(model, tmp_path):
    path = tmp_path / "small.pth"
    save_albef_checkpoint(model, path)  # 32×16 images → grid 4×2, recorded in the crossret entry
    bigger = AlbefConfig.tiny(image_size=(48, 24))
    loaded = load_albef_checkpoint(path, bigger)
    assert loaded.model.vision.pos_embed.shape == (1, 1 + 6 * 3, 32)
    assert loaded.interpolated == ["visual_encoder.pos_embed"]
    assert loaded.model.encode_image(torch.randn(2, 3, 48, 24))[0].shape == (2, 19, 32)
    # without metadata a non-square grid cannot be inferred: the error says what to pass
    torch.save({"model": model_to_albef_state(model)}, tmp_path / "bare.pth")
    with pytest.raises(FileFormatError, match="source_grid"):
        load_albef_checkpoint(tmp_path / "bare.pth", bigger)
    again = load_albef_checkpoint(tmp_path / "bare.pth", bigger, source_grid=(4, 2))
    assert torch.equal(again.model.vision.pos_embed, loaded.model.vision.pos_embed)


# ----------------------------------------------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------------------------------------------

_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "in", "red", "shirt", "##s",
          "walk", "##ing", ".", "the"]


def test_vocab_loader_tokenizes_to_expected_ids(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    tok = load_bert_vocab(path, max_length=12)
    enc = tok("A man in red shirts walking.", padding="max_length", max_length=12, truncation=True)
    assert enc["input_ids"] == [3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 4, 0]
    assert enc["attention_mask"] == [1] * 11 + [0]
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.unk_token_id) == (
        0, 3, 4, 5, 2)
    assert tok("zebra")["input_ids"] == [3, 2, 4]


def test_vocab_loader_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_bert_vocab(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_bert_vocab(empty)
    no_special = tmp_path / "plain.txt"
    no_special.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[CLS\]"):
        load_bert_vocab(no_special)


# ----------------------------------------------------------------------------------------------------------------
# feature heads
# ----------------------------------------------------------------------------------------------------------------


def test_feature_heads_shapes_and_validation():
    config = FeatureHeadsConfig(image_dim=12, text_dim=10, embed_dim=8, hidden_dim=16, fusion_dim=8)
    m = FeatureHeadsModel(config)
    tokens_v, feat_v = m.encode_image(torch.randn(5, 12))
    tokens_t, feat_t = m.encode_text(torch.randn(5, 10))
    assert tokens_v.shape == tokens_t.shape == (5, 1, 8) and feat_v.shape == feat_t.shape == (5, 8)
    torch.testing.assert_close(feat_v.norm(dim=-1), torch.ones(5))
    assert m.fuse(tokens_t, None, tokens_v).shape == (5, 1, 8)
    assert m.itm_logits(tokens_t, None, tokens_v).shape == (5, 2)
    with pytest.raises(DataError, match="12"):
        m.encode_image(torch.randn(5, 11))
    with pytest.raises(ConfigError, match="fusion_dim"):
        dataclasses.replace(config, fusion_dim=0).validate()
    assert FeatureHeadsConfig.from_dict(config.to_dict()) == config
    with torch.no_grad():
        m.temp.fill_(3.0)
    m.clamp_temp_()
    assert m.temp.item() == pytest.approx(0.5)


def test_feature_heads_gradient_step_reduces_itc_loss():
    torch.manual_seed(0)
    n = 16
    latent = torch.randn(n, 6)
    images = latent @ torch.randn(6, 12) + 0.1 * torch.randn(n, 12)
    texts = latent @ torch.randn(6, 10) + 0.1 * torch.randn(n, 10)
    m = FeatureHeadsModel(FeatureHeadsConfig(image_dim=12, text_dim=10, embed_dim=8, hidden_dim=32, fusion_dim=16,
                                             dropout=0.0))
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)

    def itc_loss() -> torch.Tensor:  # symmetric InfoNCE, ALBEF's ITC without queue/distillation
        _, v = m.encode_image(images)
        _, t = m.encode_text(texts)
        logits = v @ t.T / m.clamped_temp()
        target = torch.arange(n)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    before = itc_loss()
    for _ in range(5):
        optimizer.zero_grad()
        itc_loss().backward()
        optimizer.step()
    assert itc_loss().item() < before.item()
    # and ITM is trainable through the fusion module
    tv, _ = m.encode_image(images)
    tt, _ = m.encode_text(texts)
    F.cross_entropy(m.itm_logits(tt, None, tv), torch.ones(n, dtype=torch.long)).backward()
    assert m.fusion[0].weight.grad is not None and m.itm_head.weight.grad is not None


def test_package_import_is_lazy():
    # In a child process: re-importing here would give other test modules two copies of each class.
    code = ("import sys, crossret.textimage as t; "
            "assert 'crossret.textimage.albef' not in sys.modules and 'transformers' not in sys.modules; "
            "assert 'AlbefModel' in t.__all__")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
