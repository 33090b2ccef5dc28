"""Tests of crossret.textimage.tokenize: WordPiece training, caption batching and ALBEF/BERT MLM masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossret.errors import ConfigError, DataError
from crossret.textimage.tokenize import (
    SPECIAL_TOKENS,
    CaptionTokenizer,
    TokenBatch,
    check_vocab_fits,
    load_bert_vocab,
    mask_tokens,
    train_wordpiece_vocab,
)

CORPUS = [
    "A man in a red shirt and blue jeans walks down the street.",
    "The woman wears a black coat and carries a white bag.",
    "A young man with short hair, wearing a grey jacket and black shoes.",
    "She has long hair and wears a pink dress with white sneakers.",
    "The man is carrying a backpack and wearing blue shorts.",
    "A girl in a yellow skirt, holding an umbrella.",
    "He wears glasses, a striped shirt and dark trousers.",
    "The lady walks with a red handbag and high heels.",
] * 4

TINY_VOCAB = [  # the line number is the id
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",  # 0-4
    "a", "man", "in", "red", "shirt",  # 5-9
    "woman", "##s", "walk", ".",  # 10-13
]


@pytest.fixture
def tiny_tokenizer(tmp_path: Path) -> CaptionTokenizer:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return CaptionTokenizer.from_vocab(path, max_length=10)


@pytest.fixture(scope="module")
def trained_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_wordpiece_vocab(CORPUS, tmp_path_factory.mktemp("vocab") / "vocab.txt", vocab_size=150)


# ----------------------------------------------------------------------------------------------------------------
# vocabulary training
# ----------------------------------------------------------------------------------------------------------------


def test_trained_vocab_layout_and_loadable(trained_vocab: Path) -> None:
    tokens = trained_vocab.read_text(encoding="utf-8").split("\n")
    assert tokens[-1] == ""  # final newline
    tokens = tokens[:-1]
    assert tuple(tokens[:5]) == SPECIAL_TOKENS  # [PAD] = 0, BERT/ALBEF convention
    assert len(tokens) == len(set(tokens)) == 150
    assert all(t == t.strip() and t for t in tokens)
    assert all(t == t.lower() for t in tokens[5:])  # lowercase=True
    # frequent whole words were learned
    for word in ("man", "wearing", "shirt", "hair", "and"):
        assert word in tokens

    tok = load_bert_vocab(trained_vocab)
    assert len(tok) == 150
    assert tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("[MASK]") == 4
    wrapped = CaptionTokenizer.from_vocab(trained_vocab)
    assert wrapped.pad_token_id == 0
    assert (wrapped.cls_token_id, wrapped.sep_token_id, wrapped.mask_token_id) == (2, 3, 4)
    assert wrapped.special_ids.tolist() == [0, 1, 2, 3, 4]
    assert wrapped.vocab_size == 150


def test_training_is_deterministic_and_file_input_matches_list(tmp_path: Path) -> None:
    # tokenizers' own trainer is not deterministic on this corpus (tied merges are ordered by hash-map
    # iteration); several runs in one process must still give byte-identical files.
    outputs = {train_wordpiece_vocab(CORPUS, tmp_path / f"v{i}.txt", vocab_size=120).read_bytes() for i in range(4)}
    assert len(outputs) == 1
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n\n".join(CORPUS) + "\n\n", encoding="utf-8")  # blank lines are skipped
    assert train_wordpiece_vocab(corpus_file, tmp_path / "f.txt", vocab_size=120).read_bytes() in outputs
    assert train_wordpiece_vocab(str(corpus_file), tmp_path / "s.txt", vocab_size=120).read_bytes() in outputs


def test_vocab_size_and_case_options(tmp_path: Path) -> None:
    small = train_wordpiece_vocab(CORPUS, tmp_path / "small.txt", vocab_size=100).read_text().split()
    big = train_wordpiece_vocab(CORPUS, tmp_path / "big.txt", vocab_size=160).read_text().split()
    assert len(small) == 100 and len(big) == 160
    assert small == big[:100]  # training is greedy: a larger vocabulary extends the smaller one
    cased = train_wordpiece_vocab(CORPUS, tmp_path / "cased.txt", vocab_size=150, lowercase=False).read_text().split()
    assert "A" in cased and "The" in cased
    # merges seen fewer than min_frequency times are not learned
    rare = train_wordpiece_vocab(["zebra"] * 2 + ["quokka"], tmp_path / "rare.txt", vocab_size=500,
                                 min_frequency=2).read_text().split()
    assert "zebra" in rare and "quokka" not in rare


def test_round_trip_tokenise_decode(trained_vocab: Path) -> None:
    tok = CaptionTokenizer.from_vocab(trained_vocab)
    caption = "a man wearing a black coat and blue jeans"
    batch = tok([caption, "the woman"])
    ids = batch.input_ids[0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.tokenizer.unk_token_id not in ids.tolist()  # corpus words only: no [UNK]
    assert tok.decode(ids) == caption
    assert tok.decode(batch.input_ids[1]) == "the woman"  # padding is dropped too
    assert tok.decode(tok(["The MAN"]).input_ids[0]) == "the man"  # lower-cased like the vocabulary


# ----------------------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_vocab_exact_ids_padding(tiny_tokenizer: CaptionTokenizer) -> None:
    batch = tiny_tokenizer(["A man in RED.", "woman walks", "a dog"])
    assert isinstance(batch, TokenBatch)
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    # [CLS] a man in red . [SEP] / [CLS] woman walk ##s [SEP] / [CLS] a [UNK] [SEP]; padded to the longest (7)
    assert batch.input_ids.tolist() == [
        [2, 5, 6, 7, 8, 13, 3],
        [2, 10, 12, 11, 3, 0, 0],
        [2, 5, 1, 3, 0, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
    ]
    # a batch of short captions is only as long as its longest caption
    assert tiny_tokenizer(["a", "man"]).input_ids.tolist() == [[2, 5, 3], [2, 6, 3]]


def test_tiny_vocab_truncation_keeps_sep(tmp_path: Path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    tok = CaptionTokenizer.from_vocab(path, max_length=4)
    batch = tok(["A man in red shirt", "woman walks", "a"])
    # max_length counts [CLS] and [SEP]: 2 word pieces fit
    assert batch.input_ids.tolist() == [[2, 5, 6, 3], [2, 10, 12, 3], [2, 5, 3, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert tok.max_length == 4 and tok.vocab_size == len(TINY_VOCAB)
    assert batch.to("cpu").input_ids.tolist() == batch.input_ids.tolist()


def test_caption_errors(tiny_tokenizer: CaptionTokenizer) -> None:
    with pytest.raises(DataError, match="empty"):
        tiny_tokenizer([])
    with pytest.raises(DataError, match="single string"):
        tiny_tokenizer("a man")
    with pytest.raises(DataError, match="caption 1 is a int"):
        tiny_tokenizer(["a man", 3])
    with pytest.raises(ConfigError, match="max_length"):
        CaptionTokenizer(tiny_tokenizer.tokenizer, max_length=1)


def test_check_vocab_fits(tiny_tokenizer: CaptionTokenizer) -> None:
    check_vocab_fits(tiny_tokenizer, vocab_size=14, max_position=10, pad_token_id=0)  # exact fit is fine
    check_vocab_fits(tiny_tokenizer, vocab_size=30522, max_position=512)
    with pytest.raises(ConfigError, match=r"14 token ids but the model's vocab_size is 13"):
        check_vocab_fits(tiny_tokenizer, vocab_size=13, max_position=10)
    with pytest.raises(ConfigError, match=r"max_length=10 exceeds the model's max_position=9"):
        check_vocab_fits(tiny_tokenizer, vocab_size=100, max_position=9)
    with pytest.raises(ConfigError, match=r"\[PAD\] id is 0 but the model's pad_token_id is 1"):
        check_vocab_fits(tiny_tokenizer, vocab_size=100, max_position=10, pad_token_id=1)


def test_training_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        train_wordpiece_vocab([], tmp_path / "v.txt")
    with pytest.raises(DataError, match="empty"):
        train_wordpiece_vocab(["", "   ", "\n"], tmp_path / "v.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"blank\.txt is empty"):
        train_wordpiece_vocab(blank, tmp_path / "v.txt")
    with pytest.raises(DataError, match="corpus file not found"):
        train_wordpiece_vocab(tmp_path / "missing.txt", tmp_path / "v.txt")
    with pytest.raises(DataError, match="corpus item 1 is a int"):
        train_wordpiece_vocab(["a man", 5], tmp_path / "v.txt")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_wordpiece_vocab(CORPUS, tmp_path / "v.txt", vocab_size=5)
    with pytest.raises(ConfigError, match="min_frequency"):
        train_wordpiece_vocab(CORPUS, tmp_path / "v.txt", min_frequency=0)
    assert not (tmp_path / "v.txt").exists()


# ----------------------------------------------------------------------------------------------------------------
# MLM masking
# ----------------------------------------------------------------------------------------------------------------

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = torch.tensor([PAD, UNK, CLS, SEP, MASK])


def _batch(batch: int = 400, length: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions of varying length: [CLS] ids [SEP] [PAD]..., word ids in [5, 200)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (batch, length), generator=g)
    lengths = torch.randint(3, length + 1, (batch,), generator=g)
    pos = torch.arange(length).expand(batch, length)
    attn = (pos < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[pos == (lengths[:, None] - 1)] = SEP
    ids[attn == 0] = PAD
    return ids, attn


def _mask(ids: torch.Tensor, attn: torch.Tensor | None, seed: int = 1, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, special_ids=SPECIALS, attention_mask=attn,
                       generator=torch.Generator().manual_seed(seed), **kw)


def test_mask_statistics_and_labels() -> None:
    ids, attn = _batch()
    before = ids.clone()
    masked, labels = _mask(ids, attn)
    assert torch.equal(ids, before)  # input untouched
    assert masked.shape == labels.shape == ids.shape
    assert masked.dtype == labels.dtype == torch.long

    chosen = labels != -100
    eligible = (attn == 1) & (ids != CLS) & (ids != SEP)
    assert not (chosen & ~eligible).any()  # specials and padding never chosen
    assert torch.equal(labels[chosen], ids[chosen])  # labels = original ids where chosen
    assert (labels[~chosen] == -100).all()
    assert torch.equal(masked[~chosen], ids[~chosen])  # unchosen tokens unchanged
    assert (masked[(ids == CLS) | (ids == SEP) | (ids == PAD)] == ids[(ids == CLS) | (ids == SEP) | (ids == PAD)]).all()

    n_eligible, n_chosen = int(eligible.sum()), int(chosen.sum())
    assert n_eligible > 6000
    assert abs(n_chosen / n_eligible - 0.15) < 0.015
    to_mask = chosen & (masked == MASK)
    kept = chosen & (masked == ids)
    randomised = chosen & ~to_mask & ~kept
    assert abs(int(to_mask.sum()) / n_chosen - 0.8) < 0.04
    assert abs(int(kept.sum()) / n_chosen - 0.1) < 0.03
    assert abs(int(randomised.sum()) / n_chosen - 0.1) < 0.03
    # random replacements are drawn from the whole vocabulary [0, vocab_size), not only the batch's ids
    assert (masked[randomised] < VOCAB).all() and (masked[randomised] >= 200).float().mean() > 0.5


def test_mask_is_deterministic_given_generator() -> None:
    ids, attn = _batch(batch=50)
    a = _mask(ids, attn, seed=7)
    b = _mask(ids, attn, seed=7)
    c = _mask(ids, attn, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_attention_mask_excludes_positions_and_probability_extremes() -> None:
    ids = torch.randint(5, 200, (8, 12), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    attn[:, 6:] = 0  # non-special ids under a zero attention mask
    _, labels = _mask(ids, attn, mask_prob=1.0)
    assert torch.equal(labels[:, :6], ids[:, :6])  # p = 1: every eligible token chosen
    assert (labels[:, 6:] == -100).all()
    _, labels_all = _mask(ids, None, mask_prob=1.0)  # no attention mask: all non-special tokens eligible
    assert torch.equal(labels_all, ids)
    masked, labels = _mask(ids, attn, mask_prob=0.0)
    assert torch.equal(masked, ids) and (labels == -100).all()


def test_mask_matches_albef_reference() -> None:
    """With ALBEF's exclusions ({[PAD], [CLS]}) and the global RNG, the draws are ALBEF's ``mask()``."""

    def albef_mask(input_ids, vocab_size, targets, probability_matrix):  # ALBEF models/model_pretrain.py
        masked_indices = torch.bernoulli(probability_matrix).bool()
        masked_indices[input_ids == PAD] = False
        masked_indices[input_ids == CLS] = False
        targets[~masked_indices] = -100
        indices_replaced = torch.bernoulli(torch.full(input_ids.shape, 0.8)).bool() & masked_indices
        input_ids[indices_replaced] = MASK
        indices_random = torch.bernoulli(torch.full(input_ids.shape, 0.5)).bool() & masked_indices & ~indices_replaced
        random_words = torch.randint(vocab_size, input_ids.shape, dtype=torch.long)
        input_ids[indices_random] = random_words[indices_random]
        return input_ids, targets

    ids, _ = _batch(batch=64)
    torch.manual_seed(123)
    ref_ids, ref_labels = albef_mask(ids.clone(), VOCAB, ids.clone(), torch.full(ids.shape, 0.15))
    torch.manual_seed(123)
    masked, labels = mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, special_ids=[PAD, CLS])
    assert torch.equal(masked, ref_ids) and torch.equal(labels, ref_labels)
    assert (labels[ids == SEP] != -100).any()  # ALBEF itself may choose [SEP]; CaptionTokenizer.special_ids not


def test_mask_with_caption_tokenizer(tiny_tokenizer: CaptionTokenizer) -> None:
    batch = tiny_tokenizer(["a man in red shirt", "woman walks"] * 50)
    masked, labels = mask_tokens(batch.input_ids, vocab_size=tiny_tokenizer.vocab_size,
                                 mask_token_id=tiny_tokenizer.mask_token_id, special_ids=tiny_tokenizer.special_ids,
                                 attention_mask=batch.attention_mask, mask_prob=0.5,
                                 generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any()
    assert not chosen[:, 0].any()  # [CLS]
    assert not chosen[batch.input_ids == tiny_tokenizer.sep_token_id].any()
    assert not chosen[batch.attention_mask == 0].any()
    assert (masked < tiny_tokenizer.vocab_size).all()


def test_mask_errors() -> None:
    ids, attn = _batch(batch=4)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="mask_prob"):
            _mask(ids, attn, mask_prob=bad)
    with pytest.raises(DataError, match=r"attention_mask has shape \(4, 39\) but input_ids has shape \(4, 40\)"):
        _mask(ids, attn[:, :-1])
    with pytest.raises(DataError, match="integer tensor"):
        _mask(ids.float(), attn)
    with pytest.raises(DataError, match="outside"):
        mask_tokens(ids, vocab_size=100, mask_token_id=MASK, special_ids=SPECIALS)
    with pytest.raises(ConfigError, match="mask_token_id"):
        mask_tokens(ids, vocab_size=VOCAB, mask_token_id=VOCAB, special_ids=SPECIALS)
    with pytest.raises(DataError, match="special_ids"):
        mask_tokens(ids, vocab_size=VOCAB, mask_token_id=MASK, special_ids=SPECIALS[None])
