"""Text → image search over a GCKD run, free of any web framework (the state behind ``POST /search/text``).

A :class:`TextSnapshot` holds a run's :class:`~crossret.textimage.search.GckdEncoder` and a
:class:`~crossret.textimage.search.GalleryIndex` (built from a dataset split at start-up, or loaded
from a file written by ``crossret index build --run RUN --gallery DATA``). :class:`TextSearchState`
answers batches of captions against it with the limits of :class:`~crossret.serve.state.ServiceLimits`:
batch size, ``k``, results per response, the request deadline (checked between encoding batches) and
one encode at a time. Everything a request can get wrong raises
:class:`~crossret.serve.state.RequestError`; nothing here writes a file or prints.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossret.errors import ConfigError, DataError
from crossret.serve.state import RequestError, ServiceLimits, check_deadline, check_k

__all__ = ["MAX_TEXT_CHARS", "TextSearchState", "TextSnapshot", "load_text_snapshot"]

#: Longest caption accepted, in characters (the tokenizer keeps only the first ``max_tokens`` pieces anyway).
MAX_TEXT_CHARS = 2000


@dataclass
class TextSnapshot:
    """A GCKD run's encoder and the gallery index it searches (read-only once built)."""

    encoder: Any  # GckdEncoder
    gallery: Any  # GalleryIndex
    meta: dict[str, Any]
    generation: int = 0
    encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return int(self.gallery.size)


def load_text_snapshot(run_dir: str | Path, *, gallery: str | Path | None = None, split: str = "test",
                       index: str | Path | None = None, device: str = "cpu", generation: int = 0) -> TextSnapshot:
    """Load a GCKD run and either index ``split`` of the ``gallery`` dataset or load the gallery ``index``
    file (built with this run's model)."""
    from crossret.textimage.search import GalleryIndex, GckdEncoder

    if (gallery is None) == (index is None):
        raise ConfigError("a GCKD run is served over a gallery: give exactly one of --gallery DATASET_DIR or "
                          "--index GALLERY_INDEX")
    encoder = GckdEncoder.from_run(run_dir, device=device)
    if index is not None:
        built = GalleryIndex.load(index)
        built.check_encoder(encoder)
    else:
        assert gallery is not None
        built = GalleryIndex.build(encoder, gallery, split=split)
    if built.size == 0:
        raise DataError("the gallery holds no images; nothing to search")
    meta = {"run_dir": Path(run_dir).name, "index_file": Path(index).name if index is not None else None,
            "gallery": built.info.get("dataset_name"), "split": built.info.get("split")}
    return TextSnapshot(encoder=encoder, gallery=built, meta=meta, generation=generation)


class TextSearchState:
    """The current :class:`TextSnapshot`, the service limits and the text query logic."""

    def __init__(self, run_dir: str | Path, *, gallery: str | Path | None = None, split: str = "test",
                 index: str | Path | None = None, limits: ServiceLimits | None = None, device: str = "cpu") -> None:
        self.limits = (limits or ServiceLimits()).validate()
        self._lock = threading.Lock()
        self._snapshot = load_text_snapshot(run_dir, gallery=gallery, split=split, index=index, device=device)

    def snapshot(self) -> TextSnapshot:
        """The current snapshot; a request takes it once and uses only it."""
        with self._lock:
            return self._snapshot

    def health(self) -> dict[str, Any]:
        snap = self.snapshot()
        return {"status": "ok", "size": snap.size, "dim": int(snap.gallery.index.dim), "generation": snap.generation}

    def info(self) -> dict[str, Any]:
        from crossret import __version__

        snap = self.snapshot()
        return {"service": "crossret", "version": __version__, "search": "text-to-image (GCKD, ITC score)",
                "size": snap.size, "dim": int(snap.gallery.index.dim), "kind": snap.gallery.index.kind,
                **snap.meta, "generation": snap.generation, "limits": self.limits.to_dict(),
                "max_text_chars": MAX_TEXT_CHARS}

    def search(self, texts: Sequence[Any], k: Any, *, deadline: float | None = None,
               snapshot: TextSnapshot | None = None) -> dict[str, Any]:
        """The ``k`` best gallery images of each caption (ITC score, ties by gallery position).

        ``deadline`` (``time.monotonic()``): checked before and between encoding batches and before the
        search; once passed, a 503 ``timeout`` :class:`RequestError`.
        """
        import numpy as np

        snap = snapshot if snapshot is not None else self.snapshot()
        timeout = float(self.limits.request_timeout)
        check_deadline(deadline, timeout)
        texts = list(texts)
        if not texts:
            raise RequestError(422, "empty_batch", "the request holds no texts; send at least one")
        if len(texts) > self.limits.max_batch:
            raise RequestError(422, "batch_too_large", f"batch of {len(texts)} texts exceeds the limit of "
                               f"{self.limits.max_batch} queries per request; split it")
        k = self._check_k(k, snap, len(texts))
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(422, "invalid_text", f"texts[{i}]: must be a string")
            if len(text) > MAX_TEXT_CHARS:
                raise RequestError(422, "text_too_long", f"texts[{i}]: has {len(text)} characters; the limit is "
                                   f"{MAX_TEXT_CHARS}")
        encoder = snap.encoder
        try:
            encoder.clean_texts(texts)
        except DataError as exc:
            raise RequestError(422, "invalid_text", str(exc).replace("text ", "texts[", 1).replace(" is empty",
                               "] is empty", 1)) from None
        parts = []
        size = encoder.batch_size
        with snap.encode_lock:
            for start in range(0, len(texts), size):
                check_deadline(deadline, timeout)
                parts.append(encoder.encode_texts(texts[start:start + size]))
        check_deadline(deadline, timeout)
        scores, ids = snap.gallery.search(np.concatenate(parts), k)
        return {"k": k, "size": snap.size, "generation": snap.generation,
                "results": snap.gallery.describe(ids, scores, texts)}

    def _check_k(self, k: Any, snap: TextSnapshot, n_texts: int) -> int:
        return check_k(k, self.limits, snap.size, f"the gallery size: it holds {snap.size} images", n_texts, "texts")
