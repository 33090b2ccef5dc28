"""Caption tokenisation for the ALBEF text encoder: WordPiece vocabularies, batching and MLM masking.

* :func:`train_wordpiece_vocab` trains a BERT WordPiece ``vocab.txt`` on captions (e.g. the file written by
  :func:`crossret.data.synthetic_person.write_wordpiece_corpus`) with the ``tokenizers`` library, for when the
  ``bert-base-uncased`` vocabulary is not available or too large for a small model;
* :func:`load_bert_vocab` builds a ``transformers`` BERT tokenizer from a local ``vocab.txt`` (trained here
  or ``bert-base-uncased``'s), without downloading anything;
* :class:`CaptionTokenizer` turns a list of captions into ``(input_ids, attention_mask)`` exactly as ALBEF
  does (``tokenizer(text, padding="longest", truncation=True, max_length=..., return_tensors="pt")``);
* :func:`check_vocab_fits` checks a tokenizer against an ``AlbefConfig``'s ``vocab_size`` / ``max_position``;
* :func:`mask_tokens` is ALBEF's masked-language-modelling corruption (``ALBEF.mask`` in
  ``models/model_pretrain.py``; Li et al., *Align before Fuse*, NeurIPS 2021), which is BERT's 80/10/10
  rule (Devlin et al., *BERT*, NAACL 2019, §3.1).

Token ids follow the BERT convention that ALBEF relies on: ``[PAD]`` is id 0 (``AlbefConfig.pad_token_id``).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from crossret.errors import ConfigError, DataError
from crossret.extras import require
from crossret.storage.atomic import write_text_atomic

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "SPECIAL_TOKENS",
    "CaptionTokenizer",
    "TokenBatch",
    "check_vocab_fits",
    "load_bert_vocab",
    "mask_tokens",
    "train_wordpiece_vocab",
]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens, in the order (and so with the ids 0–4) that :func:`train_wordpiece_vocab` writes."""

DEFAULT_MAX_LENGTH = 40
"""Default :attr:`CaptionTokenizer.max_length`: tokens per caption *including* ``[CLS]`` and ``[SEP]``."""

IGNORE_INDEX = -100
"""Label of positions that are not predicted (``torch.nn.CrossEntropyLoss``'s default ``ignore_index``)."""


# ----------------------------------------------------------------------------------------------------------------
# vocabulary: training and loading
# ----------------------------------------------------------------------------------------------------------------


def _read_corpus(texts: Iterable[str] | str | os.PathLike) -> list[str]:
    """The non-blank texts of ``texts``: a corpus file (one text per line) or an iterable of strings."""
    if isinstance(texts, (str, os.PathLike)):
        path = Path(texts)
        if not path.is_file():
            raise DataError(f"{path}: corpus file not found; pass a text file with one caption per line "
                            "(see crossret.data.synthetic_person.write_wordpiece_corpus) or a list of captions")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read the corpus as UTF-8 text ({exc})") from exc
        where = str(path)
    else:
        lines = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"corpus item {index} is a {type(text).__name__}, not a str; "
                                "pass captions as strings")
            lines.append(text)
        where = "the corpus"
    corpus = [line.strip() for line in lines if line.strip()]
    if not corpus:
        raise DataError(f"{where} is empty (no non-blank text); a WordPiece vocabulary needs training captions")
    return corpus


def train_wordpiece_vocab(texts: Iterable[str] | str | os.PathLike, out_path: str | os.PathLike, *,
                          vocab_size: int = 1000, min_frequency: int = 1, lowercase: bool = True) -> Path:
    """Train a BERT WordPiece vocabulary on ``texts`` and write it as ``vocab.txt`` (atomically) to ``out_path``.

    ``texts``: an iterable of captions, or the path (``str`` or path-like) of a corpus file with one caption per
    line. Blank texts are skipped; a corpus without any text is a :class:`DataError`.

    The file has one token per line, the line number being the id: ``[PAD] [UNK] [CLS] [SEP] [MASK]`` get
    ids 0–4 (``[PAD]`` = 0 as in BERT/ALBEF), then every continuation piece ``##c`` and every character ``c`` of
    the corpus, then the learned word pieces. It loads with
    :func:`load_bert_vocab` / :meth:`CaptionTokenizer.from_vocab` (with the same
    ``lowercase``), whose normaliser and pre-tokeniser are the ones used here (``BertNormalizer`` with
    ``strip_accents`` following ``lowercase``, ``BertPreTokenizer``).

    ``vocab_size``: the target size; training stops there, but every character of the corpus (and its
    ``##`` form) is always kept, so a corpus with many distinct characters can give a larger file.
    ``min_frequency``: a merge must occur at least this many times in the corpus to be learned.

    Deterministic: the same corpus and options always give the same file. (``tokenizers``' trainer breaks
    ties between equally frequent merges by token id, and it numbers the ``##c`` pieces in hash-map order,
    which differs between runs; here they are numbered in sorted order up front, which fixes every tie.)

    Returns ``Path(out_path)``.
    """
    for name, value, low in (("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1), ("min_frequency", min_frequency, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r}: must be an integer >= {low}")
    corpus = _read_corpus(texts)

    require("gckd", "tokenizers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=bool(lowercase))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    # Every character that can follow another one inside a word, as "##c", numbered in sorted order
    # (see the docstring). Passing them as "special tokens" of the trainer only fixes their ids: they are
    # written as ordinary vocabulary lines.
    chars: set[str] = set()
    for text in corpus:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            chars.update(word)
    if not chars:
        raise DataError("the corpus has no word characters after normalisation (only control characters?); "
                        "a WordPiece vocabulary needs training captions")
    continuations = [f"##{c}" for c in sorted(chars)]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=[*SPECIAL_TOKENS, *continuations],
                                        continuing_subword_prefix="##")
    tokenizer.train_from_iterator(corpus, trainer=trainer)

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):  # pragma: no cover - tokenizers invariant
        raise DataError("the trained WordPiece vocabulary has non-contiguous ids; check the tokenizers version")
    if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:  # pragma: no cover - tokenizers invariant
        raise DataError(f"the trained vocabulary starts with {tokens[:len(SPECIAL_TOKENS)]}, "
                        f"expected {list(SPECIAL_TOKENS)}; check the tokenizers version")
    bad = [t for t in tokens if not t or t != t.strip() or "\n" in t or "\r" in t]
    if bad:  # pragma: no cover - the BERT pre-tokeniser splits on whitespace
        raise DataError(f"the trained vocabulary has tokens that cannot be written one per line: {bad[:5]}")
    write_text_atomic(out_path, "\n".join(tokens) + "\n")
    return Path(out_path)


def load_bert_vocab(path: str | os.PathLike, *, lowercase: bool = True, max_length: int | None = None) -> Any:
    """A ``transformers.BertTokenizerFast`` from a local BERT ``vocab.txt`` (one token per line, the line
    number is the id; ALBEF uses ``bert-base-uncased``'s). Nothing is downloaded.

    ``lowercase``: lower-case and strip accents (the uncased models). ``max_length`` sets
    ``model_max_length`` (e.g. ``AlbefConfig.max_position``). A missing, empty or malformed file (no
    ``[PAD] [UNK] [CLS] [SEP] [MASK]``, duplicate tokens) is a :class:`DataError`.
    """
    require("gckd", "transformers")
    from transformers import BertTokenizerFast

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: BERT vocabulary file not found; pass the vocab.txt of the text encoder "
                        "(e.g. bert-base-uncased/vocab.txt)")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the vocabulary as UTF-8 text ({exc})") from exc
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    tokens = [line.rstrip("\r") for line in lines]
    if not tokens or all(not t.strip() for t in tokens):
        raise DataError(f"{path}: the vocabulary file is empty; expected one token per line")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise DataError(f"{path}: token {token!r} appears twice (lines {vocab[token] + 1} and {index + 1})")
        vocab[token] = index
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{path}: not a BERT vocabulary: special tokens {missing} are missing")

    params = inspect.signature(BertTokenizerFast.__init__).parameters
    kwargs: dict[str, Any] = {"do_lower_case": lowercase}
    if max_length is not None:
        kwargs["model_max_length"] = int(max_length)
    if "vocab" in params:  # transformers ≥ 5 builds the WordPiece model from a token → id dict
        tokenizer = BertTokenizerFast(vocab=vocab, **kwargs)
    else:  # transformers 4.x reads the file itself
        tokenizer = BertTokenizerFast(vocab_file=str(path), **kwargs)
    if len(tokenizer) != len(vocab) or tokenizer.convert_tokens_to_ids("[CLS]") != vocab["[CLS]"]:
        raise DataError(f"{path}: the tokenizer built from this vocabulary disagrees with it "
                        f"({len(tokenizer)} vs {len(vocab)} tokens); check the file")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# batching
# ----------------------------------------------------------------------------------------------------------------


class TokenBatch(NamedTuple):
    """A tokenised caption batch: ``input_ids`` and ``attention_mask``, both ``(B, L)`` ``torch.long``.

    ``L`` is the longest caption of the batch (at most :attr:`CaptionTokenizer.max_length`), ``[CLS]`` and
    ``[SEP]`` included; ``attention_mask`` is 1 on tokens and 0 on the trailing ``[PAD]``.
    """

    input_ids: Tensor
    attention_mask: Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        """Both tensors moved to ``device``."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


class CaptionTokenizer:
    """Captions → :class:`TokenBatch`, the way ALBEF tokenises text (Li et al., NeurIPS 2021; ``Retrieval.py``):
    ``[CLS] tokens [SEP]``, truncated to :attr:`max_length` tokens, padded with ``[PAD]`` to the longest
    caption of the batch.

    ``tokenizer``: a ``transformers`` BERT tokenizer (``BertTokenizerFast``, e.g. from
    :func:`load_bert_vocab`); it must define ``[PAD]``, ``[CLS]``, ``[SEP]`` and
    ``[MASK]``. ``max_length``: the most tokens per caption, **including** ``[CLS]`` and ``[SEP]`` (so at most
    ``max_length - 2`` word pieces); must be at least 2 and, for a model, at most ``AlbefConfig.max_position``
    (:func:`check_vocab_fits`).
    """

    def __init__(self, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length={max_length!r}: must be an integer >= 2 (the token length of a "
                              "caption including [CLS] and [SEP])")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ConfigError(f"the tokenizer has no {name.removesuffix('_id')}; pass a BERT tokenizer "
                                  "with [PAD], [CLS], [SEP] and [MASK] (e.g. from load_bert_vocab)")
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_vocab(cls, path: str | os.PathLike, *, max_length: int = DEFAULT_MAX_LENGTH,
                   lowercase: bool = True) -> CaptionTokenizer:
        """A tokenizer for a local BERT ``vocab.txt`` (e.g. written by :func:`train_wordpiece_vocab`); see
        :func:`load_bert_vocab`. Nothing is downloaded."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"max_length={max_length!r}: must be an integer >= 2 (the token length of a "
                              "caption including [CLS] and [SEP])")
        return cls(load_bert_vocab(path, lowercase=lowercase, max_length=max_length), max_length=max_length)

    # -- ids ---------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (the vocabulary plus any added tokens): ids are in ``[0, vocab_size)``."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def cls_token_id(self) -> int:
        return int(self.tokenizer.cls_token_id)

    @property
    def sep_token_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    @property
    def mask_token_id(self) -> int:
        return int(self.tokenizer.mask_token_id)

    @property
    def special_ids(self) -> Tensor:
        """Sorted 1-D ``torch.long`` tensor of the ids of all special tokens (``[PAD] [UNK] [CLS] [SEP]
        [MASK]`` for BERT): the ``special_ids`` argument of :func:`mask_tokens`."""
        ids = {int(i) for i in self.tokenizer.all_special_ids}
        ids.update((self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id))
        return torch.tensor(sorted(ids), dtype=torch.long)

    # -- tokenising --------------------------------------------------------------------------------------------

    def __call__(self, captions: Sequence[str]) -> TokenBatch:
        """Tokenise ``captions`` (B strings) into a :class:`TokenBatch` of ``(B, L)`` tensors, ``L`` ≤
        :attr:`max_length` the longest (truncated) caption. An empty list is a :class:`DataError`."""
        if isinstance(captions, (str, bytes)):
            raise DataError("captions must be a list of strings, not a single string; wrap it: [caption]")
        captions = list(captions)
        if not captions:
            raise DataError("no captions to tokenise (empty list)")
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise DataError(f"caption {index} is a {type(caption).__name__}, not a str")
        encoded = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                                 return_tensors="pt", return_token_type_ids=False, return_attention_mask=True)
        return TokenBatch(encoded["input_ids"].long(), encoded["attention_mask"].long())

    def decode(self, input_ids: Tensor | Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of one tokenised caption (a 1-D tensor or list of ids); special tokens are dropped."""
        if isinstance(input_ids, Tensor):
            if input_ids.ndim != 1:
                raise DataError(f"decode takes one caption (a 1-D tensor), got shape {tuple(input_ids.shape)}")
            input_ids = input_ids.tolist()
        return self.tokenizer.decode(list(input_ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"


def check_vocab_fits(tokenizer: CaptionTokenizer, vocab_size: int, max_position: int, *,
                     pad_token_id: int | None = None) -> None:
    """Raise a :class:`ConfigError` unless ``tokenizer`` can feed a text encoder with ``vocab_size`` token
    embeddings and ``max_position`` position embeddings (``AlbefConfig.vocab_size`` / ``.max_position``):
    every id must be ``< vocab_size`` and ``tokenizer.max_length <= max_position``. With ``pad_token_id``
    (``AlbefConfig.pad_token_id``) given, the tokenizer's ``[PAD]`` id must equal it.

    A model vocabulary *larger* than the tokenizer's is allowed (the extra embeddings are never used), as
    when a small trained vocabulary feeds a model sized for ``bert-base-uncased``.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocab_size is "
                          f"{vocab_size}: token ids >= {vocab_size} have no embedding. Set the model's "
                          f"vocab_size to at least {tokenizer.vocab_size} or train a smaller vocabulary")
    if tokenizer.max_length > max_position:
        raise ConfigError(f"the tokenizer's max_length={tokenizer.max_length} exceeds the model's "
                          f"max_position={max_position}: longer captions have no position embedding. Lower "
                          f"max_length to at most {max_position} or raise max_position")
    if pad_token_id is not None and tokenizer.pad_token_id != pad_token_id:
        raise ConfigError(f"the tokenizer's [PAD] id is {tokenizer.pad_token_id} but the model's pad_token_id "
                          f"is {pad_token_id}; use a vocabulary with [PAD] at id {pad_token_id}")


# ----------------------------------------------------------------------------------------------------------------
# masked language modelling
# ----------------------------------------------------------------------------------------------------------------


def _is_integer_tensor(x: Any) -> bool:
    return isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


def mask_tokens(input_ids: Tensor, *, vocab_size: int, mask_token_id: int, special_ids: Tensor | Sequence[int],
                attention_mask: Tensor | None = None, mask_prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT/ALBEF masked-language-modelling corruption of a token batch.

    The rule of BERT (Devlin et al., NAACL 2019, §3.1 and appendix A.1) as implemented by ALBEF's
    ``mask()`` (Li et al., *Align before Fuse*, NeurIPS 2021; ``models/model_pretrain.py``): every
    eligible token is chosen independently with probability ``mask_prob``; a chosen token becomes
    ``[MASK]`` with probability 0.8, a uniformly random id in ``[0, vocab_size)`` with probability 0.1
    (it may equal the original or a special id, as in both references), and stays unchanged with
    probability 0.1. The random numbers are drawn in ALBEF's order (choice, ``[MASK]``, random-vs-keep with
    probability 0.5, the random ids), so with ``generator=None`` the result equals ALBEF's for the same global
    torch seed when ``special_ids`` is ``{[PAD], [CLS]}``.

    Eligible tokens: not in ``special_ids`` and, when ``attention_mask`` is given, with mask 1. ALBEF only
    excludes ``[PAD]`` and ``[CLS]``; passing all special ids (:attr:`CaptionTokenizer.special_ids`) also
    keeps ``[SEP]``, ``[UNK]`` and ``[MASK]`` unchosen, as Hugging Face's ``DataCollatorForLanguageModeling``
    does.

    Args:
        input_ids: ``(B, L)`` (any shape) integer token ids in ``[0, vocab_size)``; never modified.
        vocab_size: number of token ids of the text encoder (the random replacements' range).
        mask_token_id: id of ``[MASK]``.
        special_ids: 1-D ids that are never chosen.
        attention_mask: optional, same shape as ``input_ids``; positions with 0 are never chosen.
        mask_prob: probability of choosing an eligible token, in ``[0, 1]`` (0.15 in BERT and ALBEF).
        generator: the random source (``torch.Generator`` on ``input_ids``' device); ``None`` uses torch's
            global generator. The result is a deterministic function of the generator's state.

    Returns:
        ``(masked_input_ids, labels)``, both ``torch.long`` with ``input_ids``' shape: the corrupted ids, and
        the original id at chosen positions / ``-100`` (``CrossEntropyLoss``'s ``ignore_index``) elsewhere.
    """
    if not _is_integer_tensor(input_ids):
        raise DataError(f"input_ids must be an integer tensor, got "
                        f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if input_ids.ndim == 0:
        raise DataError("input_ids must have at least one dimension, e.g. (B, L)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size={vocab_size!r}: must be a positive integer")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ConfigError(f"mask_token_id={mask_token_id!r}: must be a token id in [0, vocab_size={vocab_size})")
    if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not (
            math.isfinite(mask_prob) and 0.0 <= mask_prob <= 1.0):
        raise ConfigError(f"mask_prob={mask_prob!r}: must be a probability in [0, 1] (BERT and ALBEF use 0.15)")
    device = input_ids.device
    if not isinstance(special_ids, Tensor):
        special_ids = torch.as_tensor(list(special_ids), dtype=torch.long)
    if not (_is_integer_tensor(special_ids) or special_ids.numel() == 0) or special_ids.ndim != 1:
        raise DataError(f"special_ids must be a 1-D integer tensor of token ids, got dtype {special_ids.dtype} "
                        f"and shape {tuple(special_ids.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            raise DataError(f"attention_mask has shape {shape} but input_ids has shape {tuple(input_ids.shape)}; "
                            "they must match")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise DataError(f"input_ids has ids in [{int(input_ids.min())}, {int(input_ids.max())}], outside "
                        f"[0, vocab_size={vocab_size})")

    original = input_ids.detach().to(torch.long)
    eligible = ~torch.isin(original, special_ids.to(device=device, dtype=torch.long))
    if attention_mask is not None:
        eligible &= attention_mask.to(device) != 0

    shape = original.shape
    chosen = torch.bernoulli(torch.full(shape, float(mask_prob), device=device), generator=generator).bool()
    chosen &= eligible
    labels = original.clone()
    labels[~chosen] = IGNORE_INDEX

    masked = original.clone()
    # 80 % of the chosen tokens → [MASK]
    replaced = torch.bernoulli(torch.full(shape, 0.8, device=device), generator=generator).bool() & chosen
    masked[replaced] = mask_token_id
    # half of the remaining 20 % → a random id; the other half keep their token
    randomised = torch.bernoulli(torch.full(shape, 0.5, device=device), generator=generator).bool()
    randomised &= chosen & ~replaced
    random_ids = torch.randint(vocab_size, shape, dtype=torch.long, device=device, generator=generator)
    masked[randomised] = random_ids[randomised]
    return masked, labels
