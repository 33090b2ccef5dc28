"""Text-to-image evaluation: encoding, ITC top-k + ITM re-ranking, and the exact re-ranked order
against a brute-force ``sorted`` reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _ranking_reference import metrics_from_orders
from crossret.errors import ConfigError, DataError
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.evaluate import (
    EncodedGallery,
    EncodedQueries,
    encode_gallery,
    encode_queries,
    evaluate_model,
    itm_rerank,
    reranked_scores,
    stable_topk,
    text_to_image_metrics,
)
from crossret.textimage.feature_heads import FeatureHeadsConfig, FeatureHeadsModel


def assert_same(ours: dict, reference: dict) -> None:
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


def feature_model(seed: int = 0) -> FeatureHeadsModel:
    torch.manual_seed(seed)
    return FeatureHeadsModel(FeatureHeadsConfig(image_dim=6, text_dim=5, embed_dim=8, hidden_dim=16, fusion_dim=8))


def integer_case(rng: np.random.Generator, n_q: int, n_g: int, dim: int = 3):
    """Encoded data with small integer features, so ITC scores are exact integers with many ties."""
    text = torch.from_numpy(rng.integers(-1, 2, (n_q, dim)).astype(np.float32))
    image = torch.from_numpy(rng.integers(-1, 2, (n_g, dim)).astype(np.float32))
    return EncodedQueries(text), EncodedGallery(image), (text @ image.T).numpy()


def reference_orders(itc: np.ndarray, topk: np.ndarray, itm: np.ndarray) -> list[list[int]]:
    """The re-ranked order with Python's sorted(): candidates by (-ITM, -ITC, index), then the rest by (-ITC, index)."""
    orders = []
    for q in range(itc.shape[0]):
        cand = [int(g) for g in topk[q]]
        itm_of = {g: float(s) for g, s in zip(cand, itm[q], strict=True)}
        head = sorted(cand, key=lambda g, q=q: (-itm_of[g], -float(itc[q, g]), g))
        rest = sorted((g for g in range(itc.shape[1]) if g not in itm_of), key=lambda g, q=q: (-float(itc[q, g]), g))
        orders.append(head + rest)
    return orders


# ----------------------------------------------------------------------------------------------------------------
# exact orders


@pytest.mark.parametrize("k", [1, 3, 9, 12])
def test_stable_topk_equals_stable_argsort(k: int) -> None:
    rng = np.random.default_rng(k)
    scores = rng.integers(-2, 3, (15, 12)).astype(np.float32)
    np.testing.assert_array_equal(stable_topk(scores, k), np.argsort(-scores, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("seed", range(4))
def test_reranked_order_matches_sorted_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_g, k = 13, 11, 4
    queries, gallery, itc = integer_case(rng, n_q, n_g)
    # Arbitrary candidate sets (not only the ITC top-k): the rule must hold for any given set.
    topk = np.stack([rng.permutation(n_g)[:k] for _ in range(n_q)])
    itm = rng.integers(0, 3, (n_q, k)).astype(np.float32)  # ITM ties, broken by ITC then index
    orders = reference_orders(itc, topk, itm)
    scores = reranked_scores(itc, topk, itm)
    np.testing.assert_array_equal(np.argsort(-scores, axis=1, kind="stable"), np.array(orders))

    q_ids, g_ids = rng.integers(0, 4, n_q), rng.integers(0, 4, n_g)
    ks = (1, 2, 5)
    result = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm), ks=ks)
    assert_same(result["itm"], metrics_from_orders(orders, list(q_ids), list(g_ids), ks))
    itc_orders = [sorted(range(n_g), key=lambda g, q=q: (-itc[q, g], g)) for q in range(n_q)]
    assert_same(result["itc"], metrics_from_orders(itc_orders, list(q_ids), list(g_ids), ks))
    assert result["rerank_k"] == k and "ITM" in result["tie_rule"]


def test_reranked_order_handles_signed_zeros_and_negative_scores() -> None:
    itc = np.array([[-0.0, 0.0, -1.5, 2.0, -1e-30, 1e-30]], dtype=np.float32)
    topk = np.array([[2, 5]])
    itm = np.array([[0.5, 0.5]], dtype=np.float32)
    order = np.argsort(-reranked_scores(itc, topk, itm), axis=1, kind="stable")[0].tolist()
    # Candidates tie on ITM -> ITC decides (5 before 2); the rest by ITC with -0.0 == 0.0 in index order.
    assert order == [5, 2, 3, 0, 1, 4]


def test_itm_monotone_in_itc_reproduces_itc_metrics() -> None:
    rng = np.random.default_rng(7)
    queries, gallery, itc = integer_case(rng, 9, 14)
    topk = stable_topk(itc, 5)
    result = text_to_image_metrics(queries, gallery, rng.integers(0, 3, 9), rng.integers(0, 3, 14),
                                   rerank=(topk, np.take_along_axis(itc, topk, 1)))
    assert result["itm"] == result["itc"]


# ----------------------------------------------------------------------------------------------------------------
# encoding


def test_encode_restores_modes_and_feature_heads_has_no_mask() -> None:
    model = feature_model()
    model.train()
    model.itm_head.eval()  # a submodule in its own mode must keep it
    images = torch.randn(7, 6)
    texts = torch.randn(5, 5)
    gallery = encode_gallery(model, [images[:4], images[4:]], token_dtype=torch.float32)
    queries = encode_queries(model, [(texts[:2], None), (texts[2:], None)], token_dtype=None)
    assert model.training and model.image_encoder.training and not model.itm_head.training
    assert gallery.image_feat.dtype == torch.float32 and gallery.image_feat.shape == (7, 8)
    assert gallery.image_tokens is not None and gallery.image_tokens.shape == (7, 1, 8)
    assert queries.text_tokens is not None and queries.text_tokens.shape == (5, 1, 8)
    assert queries.attention_mask is None
    model.eval()  # eval-mode outputs: the encoding ran without dropout
    with torch.no_grad():
        tokens, feat = model.encode_image(images)
    torch.testing.assert_close(gallery.image_feat, feat)
    torch.testing.assert_close(gallery.image_tokens, tokens)
    assert encode_gallery(model, [images], keep_tokens=False).image_tokens is None
    assert encode_gallery(model, [images]).image_tokens.dtype == torch.float16


def test_encode_queries_pads_tokens_and_masks() -> None:
    torch.manual_seed(0)
    model = AlbefModel(AlbefConfig.tiny())
    model.train()
    ids_a = torch.randint(1, 100, (2, 5))
    mask_a = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids_b = torch.randint(1, 100, (3, 8))
    mask_b = torch.ones(3, 8, dtype=torch.long)
    ids_c = torch.randint(1, 100, (1, 6))
    queries = encode_queries(model, [(ids_a, mask_a), (ids_b, mask_b), (ids_c, None)], token_dtype=torch.float32)
    assert model.training and model.text.training
    assert queries.text_tokens.shape == (6, 8, 32) and queries.text_feat.shape == (6, 16)
    expected_mask = torch.zeros(6, 8, dtype=torch.long)
    expected_mask[:2, :5] = mask_a
    expected_mask[2:5] = 1
    expected_mask[5, :6] = 1  # a batch without a mask counts as all ones
    torch.testing.assert_close(queries.attention_mask, expected_mask)
    assert (queries.text_tokens[:2, 5:] == 0).all() and (queries.text_tokens[5, 6:] == 0).all()
    model.eval()
    with torch.no_grad():
        tokens_a, feat_a = model.encode_text(ids_a, mask_a)
    torch.testing.assert_close(queries.text_tokens[:2, :5], tokens_a)
    torch.testing.assert_close(queries.text_feat[:2], feat_a)


def test_encode_errors() -> None:
    model = feature_model()
    with pytest.raises(DataError, match="empty"):
        encode_gallery(model, [])
    with pytest.raises(DataError, match="pair"):
        encode_queries(model, [torch.randn(2, 5)])
    with pytest.raises(DataError, match=r"shape \(N, 6\)"):
        encode_gallery(model, [torch.randn(2, 4)])
    model.train()
    with pytest.raises(DataError):
        encode_gallery(model, [torch.randn(2, 4)])
    assert model.training  # restored on error too


# ----------------------------------------------------------------------------------------------------------------
# ITM re-ranking


def test_itm_rerank_scores_equal_direct_itm_logits_albef() -> None:
    torch.manual_seed(1)
    model = AlbefModel(AlbefConfig.tiny())
    images = torch.randn(6, 3, 32, 16)
    ids = torch.randint(1, 100, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:] = 0
    gallery = encode_gallery(model, [images[:3], images[3:]], token_dtype=torch.float32)
    queries = encode_queries(model, [(ids[:2], mask[:2]), (ids[2:, :6], mask[2:, :6])], token_dtype=torch.float32)
    topk, itm = itm_rerank(model, queries, gallery, k=4, batch_size=5)
    assert topk.shape == (4, 4) and topk.dtype == np.int64 and itm.dtype == np.float32
    itc = (queries.text_feat @ gallery.image_feat.T).numpy()
    np.testing.assert_array_equal(topk, np.argsort(-itc, axis=1, kind="stable")[:, :4])
    model.eval()
    with torch.no_grad():
        for q, j in [(0, 0), (1, 3), (2, 1), (3, 2)]:
            g = int(topk[q, j])
            direct = model.itm_logits(queries.text_tokens[q:q + 1], queries.attention_mask[q:q + 1],
                                      gallery.image_tokens[g:g + 1])[0, 1]
            assert itm[q, j] == pytest.approx(float(direct), abs=1e-5)


def test_itm_rerank_feature_heads_and_k_at_least_gallery() -> None:
    model = feature_model(2)
    gallery = encode_gallery(model, [torch.randn(5, 6)], token_dtype=torch.float32)
    queries = encode_queries(model, [(torch.randn(3, 5), None)], token_dtype=torch.float32)
    topk, itm = itm_rerank(model, queries, gallery, k=50, batch_size=4)  # k clipped to G = 5
    assert topk.shape == itm.shape == (3, 5)
    assert all(sorted(row) == list(range(5)) for row in topk.tolist())
    model.eval()
    with torch.no_grad():
        direct = model.itm_logits(queries.text_tokens.repeat_interleave(5, 0), None,
                                  gallery.image_tokens[torch.from_numpy(topk.reshape(-1))])[:, 1]
    np.testing.assert_allclose(itm.reshape(-1), direct.numpy(), rtol=0, atol=1e-6)
    # k >= G: the re-ranked order is the ITM order over the whole gallery.
    q_ids, g_ids = [0, 1, 2], [0, 1, 2, 0, 1]
    result = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm), ks=(1, 5))
    itc = (queries.text_feat @ gallery.image_feat.T).numpy()
    orders = reference_orders(itc, topk, itm)
    assert orders == [sorted(range(5), key=lambda g, q=q: (-itm[q][list(topk[q]).index(g)], -itc[q, g], g))
                      for q in range(3)]
    assert_same(result["itm"], metrics_from_orders(orders, q_ids, g_ids, (1, 5)))
    assert result["rerank_k"] == 5


def test_evaluate_model_end_to_end() -> None:
    model = feature_model(3)
    rng = np.random.default_rng(0)
    images, texts = torch.randn(9, 6), torch.randn(7, 5)
    g_ids, q_ids = rng.integers(0, 3, 9), rng.integers(0, 3, 7)
    image_batches = [images[:4], images[4:]]
    text_batches = [(texts[:3], None), (texts[3:], None)]
    plain = evaluate_model(model, image_batches, text_batches, q_ids, g_ids, rerank_k=0)
    assert "itm" not in plain and plain["rerank_k"] == 0
    full = evaluate_model(model, image_batches, text_batches, q_ids, g_ids, rerank_k=4, batch_size=3)
    assert full["itc"] == plain["itc"] and full["rerank_k"] == 4
    gallery = encode_gallery(model, image_batches)
    queries = encode_queries(model, text_batches)
    manual = text_to_image_metrics(queries, gallery, q_ids, g_ids,
                                   rerank=itm_rerank(model, queries, gallery, k=4))
    assert manual == full
    assert set(full["itm"]) == {"rank1", "rank5", "rank10", "map", "minp", "n_queries", "n_gallery",
                                "n_queries_without_relevant"}


def test_errors() -> None:
    rng = np.random.default_rng(0)
    queries, gallery, _ = integer_case(rng, 3, 4)
    with pytest.raises(DataError, match="query_ids has 2 ids but there are 3"):
        text_to_image_metrics(queries, gallery, [0, 1], [0, 1, 2, 3])
    with pytest.raises(DataError, match="gallery_ids has 5 ids but there are 4"):
        text_to_image_metrics(queries, gallery, [0, 1, 2], [0, 1, 2, 3, 4])
    with pytest.raises(DataError, match="dims"):
        text_to_image_metrics(queries, EncodedGallery(torch.ones(4, 2)), [0, 1, 2], [0, 1, 2, 3])
    nan_queries = EncodedQueries(torch.full((3, 3), float("nan")))
    with pytest.raises(DataError, match="NaN"):
        text_to_image_metrics(nan_queries, gallery, [0, 1, 2], [0, 1, 2, 3])
    ids = ([0, 1, 2], [0, 1, 2, 3])
    topk = np.array([[0, 1], [1, 2], [2, 3]])
    with pytest.raises(DataError, match="repeats"):
        text_to_image_metrics(queries, gallery, *ids, rerank=(np.array([[0, 0], [1, 2], [2, 3]]), np.zeros((3, 2))))
    with pytest.raises(DataError, match="outside"):
        text_to_image_metrics(queries, gallery, *ids, rerank=(topk + 1, np.zeros((3, 2))))
    with pytest.raises(DataError, match="must match"):
        text_to_image_metrics(queries, gallery, *ids, rerank=(topk, np.zeros((3, 3))))
    with pytest.raises(DataError, match="NaN"):
        text_to_image_metrics(queries, gallery, *ids, rerank=(topk, np.full((3, 2), np.nan)))
    with pytest.raises(DataError, match=r"\(Q=3, k\)"):
        text_to_image_metrics(queries, gallery, *ids, rerank=(topk[:2], np.zeros((2, 2))))
    with pytest.raises(ConfigError, match="ks"):
        text_to_image_metrics(queries, gallery, *ids, ks=(0,))
    model = feature_model()
    with pytest.raises(DataError, match="keep_tokens=True"):
        itm_rerank(model, queries, gallery)
    with pytest.raises(ConfigError, match="k must be"):
        itm_rerank(model, queries, gallery, k=0)
    with pytest.raises(ConfigError, match="batch_size"):
        itm_rerank(model, queries, gallery, batch_size=0)
    with pytest.raises(ConfigError, match="rerank_k"):
        evaluate_model(model, [], [], [], [], rerank_k=-1)
    with pytest.raises(DataError, match="attention_mask has shape"):
        EncodedQueries(torch.ones(2, 3), torch.ones(2, 4, 5), torch.ones(2, 3))
    with pytest.raises(DataError, match="image_tokens"):
        EncodedGallery(torch.ones(2, 3), torch.ones(3, 1, 5))


# ----------------------------------------------------------------------------------------------------------------
# candidate score: "itm" (ALBEF / RaSa) and "itm+itc" (BLIP: ITM logit + itc_weight x ITC cosine)


def combined_reference_orders(itc: np.ndarray, topk: np.ndarray, itm: np.ndarray, weight: float) -> list[list[int]]:
    """The "itm+itc" re-ranked order in plain Python: candidates by (-(itm + weight * itc), -itc, index), then
    the rest by (-itc, index)."""
    orders = []
    for q in range(itc.shape[0]):
        cand = [int(g) for g in topk[q]]
        score = {g: float(s) + weight * float(itc[q, g]) for g, s in zip(cand, itm[q], strict=True)}
        head = sorted(cand, key=lambda g, q=q: (-score[g], -float(itc[q, g]), g))
        rest = sorted((g for g in range(itc.shape[1]) if g not in score), key=lambda g, q=q: (-float(itc[q, g]), g))
        orders.append(head + rest)
    return orders


@pytest.mark.parametrize(("seed", "weight"), [(0, 1.0), (1, 0.5), (2, 2.0), (3, 0.25), (4, 3.0)])
def test_itm_plus_itc_order_matches_sorted_reference_with_ties(seed: int, weight: float) -> None:
    rng = np.random.default_rng(100 + seed)
    n_q, n_g, k = 12, 10, 5
    queries, gallery, itc = integer_case(rng, n_q, n_g)  # integer ITC: many ties
    topk = np.stack([rng.permutation(n_g)[:k] for _ in range(n_q)])
    # Integer / half-integer ITM: with these weights itm + weight * itc ties across different (itm, itc) pairs.
    itm = (rng.integers(-2, 3, (n_q, k)) / 2).astype(np.float32)
    orders = combined_reference_orders(itc, topk, itm, weight)
    scores = reranked_scores(itc, topk, itm, rerank_score="itm+itc", itc_weight=weight)
    np.testing.assert_array_equal(np.argsort(-scores, axis=1, kind="stable"), np.array(orders))
    combined = np.array([[float(itm[q, j]) + weight * float(itc[q, topk[q, j]]) for j in range(k)] for q in range(n_q)])
    assert any(len(set(row)) < k for row in combined.tolist())  # a query really has tied combined scores

    q_ids, g_ids = rng.integers(0, 4, n_q), rng.integers(0, 4, n_g)
    ks = (1, 3, 5)
    result = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm), ks=ks,
                                   rerank_score="itm+itc", itc_weight=weight)
    assert_same(result["itm"], metrics_from_orders(orders, list(q_ids), list(g_ids), ks))
    assert (result["rerank_score"], result["rerank_itc_weight"]) == ("itm+itc", weight)


def test_itm_plus_itc_at_weight_zero_is_itm_alone_and_default_is_itm() -> None:
    rng = np.random.default_rng(11)
    queries, gallery, itc = integer_case(rng, 9, 8)
    topk = stable_topk(itc, 4)
    itm = rng.normal(size=(9, 4)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 3, 9), rng.integers(0, 3, 8)
    default = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm))
    zero = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm), rerank_score="itm+itc",
                                 itc_weight=0.0)
    assert default["itm"] == zero["itm"]
    assert (default["rerank_score"], default["rerank_itc_weight"]) == ("itm", 0.0)
    np.testing.assert_array_equal(reranked_scores(itc, topk, itm), reranked_scores(itc, topk, itm, rerank_score="itm"))
    # The weight is ignored (and recorded as 0) for "itm".
    assert text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm), itc_weight=5.0) == default


def test_itm_plus_itc_with_dominant_weight_reproduces_itc_metrics() -> None:
    rng = np.random.default_rng(5)
    text, image = torch.randn(8, 4), torch.randn(11, 4)  # continuous ITC: no ties
    queries, gallery = EncodedQueries(text), EncodedGallery(image)
    itc = (text @ image.T).numpy()
    topk = stable_topk(itc, 6)
    itm = rng.normal(size=(8, 6)).astype(np.float32)
    q_ids, g_ids = rng.integers(0, 3, 8), rng.integers(0, 3, 11)
    result = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm), rerank_score="itm+itc",
                                   itc_weight=1e6)
    assert result["itm"] == result["itc"]
    plain = text_to_image_metrics(queries, gallery, q_ids, g_ids, rerank=(topk, itm))
    assert plain["itm"] != plain["itc"]  # ITM alone does move this ranking


def test_evaluate_model_with_itm_plus_itc_equals_manual_combination() -> None:
    model = feature_model(4)
    rng = np.random.default_rng(1)
    images, texts = torch.randn(10, 6), torch.randn(6, 5)
    g_ids, q_ids = rng.integers(0, 3, 10), rng.integers(0, 3, 6)
    full = evaluate_model(model, [images], [(texts, None)], q_ids, g_ids, rerank_k=5, rerank_score="itm+itc",
                          itc_weight=2.0)
    gallery, queries = encode_gallery(model, [images]), encode_queries(model, [(texts, None)])
    topk, itm = itm_rerank(model, queries, gallery, k=5)
    itc = (queries.text_feat @ gallery.image_feat.T).numpy()
    orders = combined_reference_orders(itc, topk, itm, 2.0)
    assert_same(full["itm"], metrics_from_orders(orders, list(q_ids), list(g_ids), (1, 5, 10)))
    assert (full["rerank_score"], full["rerank_itc_weight"], full["rerank_k"]) == ("itm+itc", 2.0, 5)


@pytest.mark.parametrize(("score", "weight", "match"), [
    ("itc", 1.0, "rerank_score"), ("ITM", 1.0, "rerank_score"), (None, 1.0, "rerank_score"),
    ("itm+itc", -1.0, "itc_weight"), ("itm+itc", float("nan"), "itc_weight"), ("itm+itc", float("inf"), "itc_weight"),
    ("itm+itc", True, "itc_weight"), ("itm+itc", "1", "itc_weight"),
])
def test_rerank_score_errors(score, weight, match) -> None:
    rng = np.random.default_rng(0)
    queries, gallery, itc = integer_case(rng, 3, 4)
    topk = stable_topk(itc, 2)
    with pytest.raises(ConfigError, match=match):
        text_to_image_metrics(queries, gallery, [0, 1, 2], [0, 1, 2, 3], rerank=(topk, np.zeros((3, 2))),
                              rerank_score=score, itc_weight=weight)
    with pytest.raises(ConfigError, match=match):
        reranked_scores(itc, topk, np.zeros((3, 2)), rerank_score=score, itc_weight=weight)

    def no_batches():
        raise AssertionError("validated before encoding")
        yield  # pragma: no cover

    with pytest.raises(ConfigError, match=match):
        evaluate_model(feature_model(), no_batches(), no_batches(), [0], [0], rerank_score=score, itc_weight=weight)
