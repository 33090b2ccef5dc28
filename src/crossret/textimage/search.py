"""Text → image search with a GCKD run's model.

:class:`GckdEncoder` loads a finished ``crossret gckd pretrain|adapt`` run (``model.pt`` in ALBEF's
layout, ``vocab.txt``, ``config.yaml``) and encodes captions and images into the unit-norm ITC
embeddings that evaluation ranks by: the same caption cleaning (``clean_caption`` with the run's
``max_words``), tokeniser (the run's ``max_tokens``), eval image transform and encoders as
:func:`crossret.textimage.pipeline.evaluate_view`, in eval mode without gradients. The ITC score of a
caption and an image is the inner product of their embeddings.

:class:`GalleryIndex` is an inner-product :class:`~crossret.retrieval.index.DenseIndex` over the
gallery images of a dataset split, saved as one file whose header also holds the image paths, their
person ids and the SHA-256 of the model that encoded them. :func:`search_texts` ranks the gallery for
each caption: best ITC score first, ties by gallery position — the ITC ranking of ``crossret gckd
eval`` (up to float rounding of the inner products)::

    encoder = GckdEncoder.from_run("runs/gckd")
    gallery = GalleryIndex.build(encoder, "data/RSTPReid", split="test")
    gallery.save("gallery.crdi")
    search_texts(encoder, GalleryIndex.load("gallery.crdi"), ["a woman in a red coat"], k=10)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossret import runs
from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.textimage.backbone import Backbone

if TYPE_CHECKING:
    from crossret.textimage.tokenize import CaptionTokenizer

__all__ = ["GALLERY_FORMAT", "GalleryIndex", "GckdEncoder", "check_text_k", "search_texts"]

#: ``format`` of the metadata a gallery index carries in its header.
GALLERY_FORMAT = "crossret-gckd-gallery"
_HASH_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _not_gckd(run: Path, kind: str | None) -> ConfigError:
    what = "a hashing run (crossret run)" if kind == "hashing" else "not a crossret GCKD run"
    return ConfigError(f"--run {run}: {what}; text search needs a finished `crossret gckd pretrain|adapt` run "
                       "(model.pt, vocab.txt, config.yaml)")


class GckdEncoder:
    """A GCKD run's model (a :class:`~crossret.textimage.backbone.Backbone`) and tokenizer, encoding
    captions and images to ITC embeddings ``(N, E)`` float32.

    ``batch_size`` items are encoded per forward pass (the batching of ``gckd eval``, whose default is
    64); ``device`` is a torch device.
    """

    def __init__(self, model: Backbone, tokenizer: CaptionTokenizer, *, max_words: int | None = 50,
                 model_sha256: str | None = None, run_dir: str | None = None, device: str = "cpu",
                 batch_size: int = 64) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.model_sha256 = model_sha256
        self.run_dir = run_dir
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, device: str = "cpu", batch_size: int = 64) -> GckdEncoder:
        """Load the model, vocabulary and settings of a finished GCKD run directory."""
        from crossret.extras import require

        require("gckd")
        from crossret.storage.safe_read import read_yaml_mapping
        from crossret.textimage.albef import AlbefConfig
        from crossret.textimage.checkpoint import load_albef_checkpoint
        from crossret.textimage.tokenize import CaptionTokenizer

        run = Path(run_dir)
        if not run.is_dir():
            raise ConfigError(f"--run {run}: not a directory; give a `crossret gckd pretrain|adapt` run directory")
        kind = runs.run_kind(run)
        if kind != "gckd":
            raise _not_gckd(run, kind)
        model_file, vocab_file = runs.run_file(run, "model.pt"), runs.run_file(run, "vocab.txt")
        config_file = runs.run_file(run, "config.yaml")
        if not (model_file.is_file() and vocab_file.is_file() and config_file.is_file()):
            raise DataError(f"--run {run}: not a finished GCKD run (model.pt, vocab.txt and config.yaml are needed); "
                            "let the run finish or choose another")
        saved = read_yaml_mapping(config_file, "run config")
        try:
            albef = AlbefConfig.from_dict(saved["albef"])
            max_tokens = int(saved["run"]["max_tokens"])
            max_words = saved["run"].get("max_words", 50)
        except (KeyError, TypeError, AttributeError) as exc:
            raise FileFormatError(f"{config_file}: missing or invalid 'albef' / 'run' settings ({exc}); is this a "
                                  "GCKD run's config.yaml?") from None
        model = load_albef_checkpoint(model_file, albef).model
        tokenizer = CaptionTokenizer.from_vocab(vocab_file, max_length=max_tokens)
        return cls(model, tokenizer, max_words=None if max_words is None else int(max_words),
                   model_sha256=_sha256(model_file), run_dir=str(run), device=device, batch_size=batch_size)

    @property
    def embed_dim(self) -> int:
        """Dimension ``E`` of the ITC embeddings."""
        return int(self.model.config.embed_dim)

    def clean_texts(self, texts: Sequence[str]) -> list[str]:
        """The captions as evaluation sees them (``clean_caption`` with the run's ``max_words``); an
        empty list, a non-string or a caption with no words left is a :class:`DataError`."""
        from crossret.data.person import clean_caption

        if isinstance(texts, (str, bytes)):
            raise DataError("texts must be a list of captions, not a single string; wrap it: [caption]")
        texts = list(texts)
        if not texts:
            raise DataError("no captions given; pass at least one text")
        cleaned = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"text {i} is a {type(text).__name__}, not a string")
            words = clean_caption(text, self.max_words)
            if not words:
                raise DataError(f"text {i} is empty (no words after removing punctuation); give a caption")
            cleaned.append(words)
        return cleaned

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """ITC embeddings ``(N, E)`` float32 (unit norm) of ``texts``."""
        from crossret.textimage.evaluate import encode_queries

        cleaned = self.clean_texts(texts)
        size = self.batch_size
        batches = (tuple(self.tokenizer(cleaned[i:i + size])) for i in range(0, len(cleaned), size))
        encoded = encode_queries(self.model, batches, device=self.device, keep_tokens=False)
        return np.ascontiguousarray(encoded.text_feat.numpy(), dtype=np.float32)

    def encode_images(self, paths: Sequence[str | os.PathLike],
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """ITC embeddings ``(N, E)`` float32 (unit norm) of the image files ``paths`` (eval transform at the
        model's ``config.image_size``, so a backbone that reads pixels); ``progress(done, total)`` after
        each batch."""
        import torch

        from crossret.data.person import ImageTransform, load_image
        from crossret.textimage.evaluate import encode_gallery

        paths = list(paths)
        if not paths:
            raise DataError("no images given; pass at least one image path")
        transform = ImageTransform.eval(tuple(self.model.config.image_size))
        size = self.batch_size

        def batches() -> Any:
            for start in range(0, len(paths), size):
                yield torch.stack([transform(load_image(p)) for p in paths[start:start + size]])
                if progress is not None:
                    progress(min(start + size, len(paths)), len(paths))

        encoded = encode_gallery(self.model, batches(), device=self.device, keep_tokens=False)
        return np.ascontiguousarray(encoded.image_feat.numpy(), dtype=np.float32)


def check_text_k(k: Any, size: int) -> int:
    """``k`` as an int in ``1..size`` (the gallery size), else a :class:`ConfigError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"-k must be a positive integer (results per text), got {k!r}")
    if k > size:
        raise ConfigError(f"-k {k} exceeds the gallery size ({size} images); give -k between 1 and {size}")
    return int(k)


@dataclass(frozen=True)
class GalleryIndex:
    """Gallery images of a dataset split in a dense inner-product index (item id = gallery position).

    ``image_paths[i]`` / ``person_ids[i]`` describe item ``i``; ``info`` holds the rest of the stored
    metadata (``run``, ``model_sha256``, ``dataset``, ``split``).
    """

    index: Any  # DenseIndex
    image_paths: tuple[str, ...]
    person_ids: tuple[int, ...] | None
    info: dict[str, Any]

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, encoder: GckdEncoder, dataset_dir: str | os.PathLike, *, split: str = "test", kind: str = "flat",
              progress: Callable[[int, int], None] | None = None, **params: Any) -> GalleryIndex:
        """Encode every gallery image of ``split`` of a person dataset (the gallery ``gckd eval`` ranks,
        in its order) and index them (``kind``: ``flat`` exact, or ``hnsw`` with its ``params``)."""
        from crossret.data.person import build_eval_view, load_person_dataset
        from crossret.retrieval.index import DenseIndex

        dataset = load_person_dataset(None, dataset_dir)
        view = build_eval_view(dataset, split, max_words=encoder.max_words)
        index = DenseIndex(encoder.embed_dim, kind, normalize=False, **params)
        index.add(encoder.encode_images(view.image_paths, progress=progress))
        paths = tuple(os.path.abspath(p) for p in view.image_paths)
        person_ids = tuple(int(v) for v in view.image_person_ids)
        info = {"run": encoder.run_dir, "model_sha256": encoder.model_sha256, "dataset": os.path.abspath(dataset_dir),
                "dataset_name": dataset.name, "split": split}
        index.meta = {"format": GALLERY_FORMAT, **info, "image_paths": list(paths), "person_ids": list(person_ids)}
        return cls(index, paths, person_ids, info)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index with its metadata to ``path`` (one file, atomically)."""
        return self.index.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GalleryIndex:
        """Read a gallery index written by :meth:`save`; a binary (hashing) index or a dense index
        without gallery metadata is a :class:`ConfigError`."""
        from crossret.retrieval.index import DenseIndex, read_index_header

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such index file; build one with crossret index build --run GCKD_RUN "
                              "--gallery DATA --out FILE")
        if read_index_header(path)["index_type"] != "dense":
            raise ConfigError(f"{path}: is a binary (Hamming) index of a hashing run; texts are searched in a "
                              "gallery index (crossret index build --run GCKD_RUN --gallery DATA)")
        index = DenseIndex.load(path)
        meta = index.meta or {}
        if meta.get("format") != GALLERY_FORMAT:
            raise ConfigError(f"{path}: a dense index without GCKD gallery metadata; build one with crossret index "
                              "build --run GCKD_RUN --gallery DATA")
        paths, person_ids = meta.get("image_paths"), meta.get("person_ids")
        if (not isinstance(paths, list) or len(paths) != index.ntotal or not all(isinstance(p, str) for p in paths)
                or (person_ids is not None and (not isinstance(person_ids, list) or len(person_ids) != index.ntotal
                                                or not all(type(v) is int for v in person_ids)))):
            raise FileFormatError(f"{path}: the gallery metadata does not list one image path (and person id) per "
                                  f"item ({index.ntotal} items); rebuild the index")
        info = {key: meta.get(key) for key in ("run", "model_sha256", "dataset", "dataset_name", "split")}
        return cls(index, tuple(paths), None if person_ids is None else tuple(person_ids), info)

    def check_encoder(self, encoder: GckdEncoder) -> None:
        """Refuse an encoder whose model is not the one that encoded the gallery (different embeddings)."""
        if encoder.embed_dim != self.index.dim:
            raise ConfigError(f"--run {encoder.run_dir}: makes {encoder.embed_dim}-d embeddings but the gallery "
                              f"index holds {self.index.dim}-d ones; use the run the index was built with "
                              f"({self.info.get('run')})")
        stored, used = self.info.get("model_sha256"), encoder.model_sha256
        if stored and used and stored != used:
            raise ConfigError(f"--run {encoder.run_dir}: its model.pt is not the model the gallery index was built "
                              f"with ({self.info.get('run')}); use that run or rebuild the index")

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (N, k), ids int64 (N, k))``: best inner product first, ties by position."""
        return self.index.search(embeddings, check_text_k(k, self.size))

    def describe(self, ids: np.ndarray, scores: np.ndarray, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One JSON-able result per text: ``text``, ``ids``, ``scores``, ``paths``, ``person_ids``."""
        results = []
        for text, row_ids, row_scores in zip(texts, ids.tolist(), scores.tolist(), strict=True):
            results.append({"text": text, "ids": row_ids, "scores": row_scores,
                            "paths": [self.image_paths[i] for i in row_ids],
                            "person_ids": None if self.person_ids is None else [self.person_ids[i] for i in row_ids]})
        return results


def search_texts(encoder: GckdEncoder, gallery: GalleryIndex, texts: Sequence[str], k: int = 10) -> dict[str, Any]:
    """The ``k`` best gallery images of each caption by ITC score (see the module docstring).

    Returns ``{"k", "size", "results": [{"text", "ids", "scores", "paths", "person_ids"}, ...]}`` in the
    order of ``texts``.
    """
    gallery.check_encoder(encoder)
    k = check_text_k(k, gallery.size)
    texts = list(texts) if not isinstance(texts, (str, bytes)) else texts
    embeddings = encoder.encode_texts(texts)
    scores, ids = gallery.search(embeddings, k)
    return {"k": k, "size": gallery.size, "results": gallery.describe(ids, scores, texts)}
