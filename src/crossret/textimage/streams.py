"""Training batches for the GCKD trainer: one :class:`StepBatch` per optimisation step.

A step holds a labelled *source* batch of pairs (identity-balanced: ``p`` ids × ``k`` pairs) and, for
adaptation, an unlabelled *target* batch of images and captions. Following gckd.md A1 ("unpaired" is
the default reading) the target images and captions are drawn from two independent shuffled streams,
so no target image–caption pairing reaches training; ``target_pairing="paired"`` draws target *pairs*
instead (same row = same pair, still without identities).

Two sources of batches share the interface :class:`TrainingData`:

* :class:`FeatureTrainingData` — precomputed image/text feature matrices (the feature-heads backbone);
* :class:`PersonTrainingData` — person-retrieval datasets on disk: PIL images through an
  :class:`~crossret.data.person.ImageTransform` and captions through a tokenizer.

Every epoch's batches are a pure function of ``(seed, epoch)``, so a resumed run sees the same data.
Under torchrun every rank draws the same global batches; after ``set_image_shard(rank, world)`` the
image tensors of a batch hold only that rank's contiguous rows (:func:`crossret.distributed.shard_range`),
so each rank decodes and augments only its own images, while ids, captions and indices stay global.
Target identities never appear in a batch; ``target_truth`` (image ids, caption ids) is kept apart for
the pseudo-positive precision report only.

Images are decoded by an :class:`ImageDecoder`: in the calling process, or (``workers`` > 0) in
DataLoader worker processes. Augmentation is keyed by (seed, epoch, row), so both give the same tensors.

Both sources also implement :class:`IndexedTrainingData`: items fetched by dataset index (target images,
target captions, source pairs), which the trainer uses to warm-start the memory banks and to load the
pseudo-pairs mined over the banks. A fetch is a pure function of ``(seed, key, index)``, is never sharded
and does not disturb the epoch's image stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from crossret.data.person import (
    HIDDEN_ID,
    IdentityBalancedBatchSampler,
    ImageTransform,
    TrainPairs,
    item_rng,
    load_image,
)
from crossret.distributed import shard_range
from crossret.errors import ConfigError, DataError
from crossret.limits import check_threads

TARGET_PAIRINGS = ("unpaired", "paired")


class StepBatch(NamedTuple):
    """One step's inputs. ``*_images``: pixels ``(B, C, H, W)`` or features ``(B, d_img)``;
    ``*_text``: token ids ``(B, L)`` or features ``(B, d_txt)``; ``*_mask``: ``(B, L)`` or None;
    ``source_ids (B_s,)`` identities; ``target_*_index``: row indices into the target image / caption
    lists (for the diagnostic report only). Target fields are None for source-only training."""

    source_images: Tensor
    source_text: Tensor
    source_mask: Tensor | None
    source_ids: Tensor
    target_images: Tensor | None = None
    target_text: Tensor | None = None
    target_mask: Tensor | None = None
    target_image_index: Tensor | None = None
    target_text_index: Tensor | None = None

    def to(self, device: torch.device | str) -> StepBatch:
        return StepBatch(*(None if t is None else t.to(device, non_blocking=True) for t in self))


class TrainingData(Protocol):
    """What the trainer needs from a data source."""

    has_target: bool
    uses_tokens: bool

    def steps_per_epoch(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[StepBatch]: ...

    def fingerprint(self) -> dict[str, int | str]: ...

    def target_truth(self) -> tuple[np.ndarray, np.ndarray] | None: ...


class IndexedTrainingData(TrainingData, Protocol):
    """A :class:`TrainingData` whose items can also be fetched by dataset index (bank warm start, pseudo-pair
    batches). Indices: target image rows ``0..n_images-1``, target caption rows ``0..n_captions-1`` (the
    rows of ``StepBatch.target_image_index`` / ``target_text_index`` and of ``target_truth``), source pair
    rows ``0..source_size()-1``. ``key`` picks the augmentation (images with a random transform only);
    the same ``(key, index)`` always gives the same tensor. Every row is returned (no rank sharding)."""

    def target_sizes(self) -> tuple[int, int]:
        """``(n_images, n_captions)`` of the target training split."""
        ...

    def source_size(self) -> int: ...

    def target_images(self, index: np.ndarray, key: int = 0) -> Tensor:
        """Target images ``index (n,)`` → pixels ``(n, C, H, W)`` or features ``(n, d_img)``."""
        ...

    def target_captions(self, index: np.ndarray) -> tuple[Tensor, Tensor | None]:
        """Target captions ``index (n,)`` → ``(token ids (n, L), mask (n, L))`` or ``(features (n, d_txt), None)``."""
        ...

    def source_pairs(self, index: np.ndarray, key: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Source pairs ``index (n,)`` → ``(images, text, mask, ids (n,))`` as in a :class:`StepBatch`."""
        ...


def _check_index(index: np.ndarray, n: int, what: str) -> np.ndarray:
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{what} index out of range for {n} items: [{idx.min()}, {idx.max()}]")
    return idx


class _ImageShard:
    """``set_image_shard`` for both data sources: which rows of each batch's images to materialise."""

    _shard: tuple[int, int] | None = None

    def set_image_shard(self, rank: int | None, world: int | None) -> None:
        """From now on yield only rank ``rank`` of ``world``'s rows of the image tensors (None: all rows)."""
        self._shard = None if rank is None or world is None or world <= 1 else (int(rank), int(world))

    def _image_rows(self, rows: np.ndarray) -> np.ndarray:
        if self._shard is None:
            return rows
        lo, hi = shard_range(len(rows), *self._shard)
        return rows[lo:hi]


def _check_pairing(pairing: str) -> str:
    if pairing not in TARGET_PAIRINGS:
        raise ConfigError(f"target_pairing={pairing!r}; choose one of {', '.join(TARGET_PAIRINGS)}")
    return pairing


def _target_index_streams(n_images: int, n_texts: int, batch: int, steps: int, seed: int, epoch: int,
                          pairing: str, pair_image: np.ndarray | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Row indices of the target images and captions for ``steps`` steps of one epoch.

    Unpaired: two independent seeded shuffles, cycled (each stream restarts with a new permutation
    when it runs out). Paired: caption rows are drawn and each caption brings its own image
    (``pair_image[caption]``)."""
    rng = np.random.default_rng([seed, 7919, epoch])

    def cycled(n: int) -> Iterator[np.ndarray]:
        while True:
            perm = rng.permutation(n)
            for start in range(0, n - batch + 1, batch):
                yield perm[start:start + batch]

    texts = cycled(n_texts)
    if pairing == "paired":
        assert pair_image is not None
        text_rows = [next(texts) for _ in range(steps)]
        return [pair_image[t] for t in text_rows], text_rows
    images = cycled(n_images)
    image_rows = [next(images) for _ in range(steps)]
    return image_rows, [next(texts) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- features
class FeatureTrainingData(_ImageShard):
    """Batches of precomputed features (the feature-heads backbone).

    ``source_image (N_s, d_img)``, ``source_text (N_s, d_txt)`` row-aligned pairs with ``source_ids
    (N_s,)``; ``target_image (N_ti, d_img)`` / ``target_text (N_tt, d_txt)`` unlabelled (None for
    source-only). With ``target_pairing="paired"`` the target rows must be aligned pairs.
    ``target_truth_ids = (image_ids, text_ids)`` are only used for the training report.
    """

    uses_tokens = False

    def __init__(self, source_image: np.ndarray, source_text: np.ndarray, source_ids: np.ndarray, *,
                 target_image: np.ndarray | None = None, target_text: np.ndarray | None = None,
                 ids_per_batch: int = 8, pairs_per_id: int = 4, target_batch: int = 32, seed: int = 0,
                 target_pairing: str = "unpaired",
                 target_truth_ids: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.source_image = _as_features(source_image, "source image features")
        self.source_text = _as_features(source_text, "source text features")
        self.source_ids = np.asarray(source_ids, dtype=np.int64).reshape(-1)
        if not (self.source_image.shape[0] == self.source_text.shape[0] == self.source_ids.shape[0]):
            raise DataError(f"source pairs: {self.source_image.shape[0]} image rows, {self.source_text.shape[0]} "
                            f"text rows and {self.source_ids.shape[0]} ids must be equal")
        self.sampler = IdentityBalancedBatchSampler(self.source_ids, ids_per_batch, pairs_per_id, seed)
        self.seed = int(seed)
        self.target_pairing = _check_pairing(target_pairing)
        self.has_target = target_image is not None or target_text is not None
        self.target_image = self.target_text = None
        if self.has_target:
            if target_image is None or target_text is None:
                raise DataError("adaptation needs both target image and target text features")
            self.target_image = _as_features(target_image, "target image features")
            self.target_text = _as_features(target_text, "target text features")
            for name, arr, src in (("image", self.target_image, self.source_image),
                                   ("text", self.target_text, self.source_text)):
                if arr.shape[1] != src.shape[1]:
                    raise DataError(f"target {name} features have {arr.shape[1]} dims, source {src.shape[1]}")
            if self.target_pairing == "paired" and self.target_image.shape[0] != self.target_text.shape[0]:
                raise DataError("target_pairing='paired' needs row-aligned target image and text features")
            smallest = min(self.target_image.shape[0], self.target_text.shape[0])
            if target_batch > smallest:
                raise ConfigError(f"target_batch={target_batch} exceeds the {smallest} target items; lower it")
        self.target_batch = int(target_batch)
        self._truth = None if target_truth_ids is None else tuple(np.asarray(t, dtype=np.int64)
                                                                   for t in target_truth_ids)

    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def target_truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._truth  # type: ignore[return-value]

    def _target(self) -> tuple[np.ndarray, np.ndarray]:
        if self.target_image is None or self.target_text is None:
            raise DataError("this training data has no target split")
        return self.target_image, self.target_text

    def target_sizes(self) -> tuple[int, int]:
        image, text = self._target()
        return int(image.shape[0]), int(text.shape[0])

    def source_size(self) -> int:
        return int(self.source_ids.shape[0])

    def target_images(self, index: np.ndarray, key: int = 0) -> Tensor:
        image, _ = self._target()
        return torch.from_numpy(image[_check_index(index, image.shape[0], "target image")])

    def target_captions(self, index: np.ndarray) -> tuple[Tensor, Tensor | None]:
        _, text = self._target()
        return torch.from_numpy(text[_check_index(index, text.shape[0], "target caption")]), None

    def source_pairs(self, index: np.ndarray, key: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        idx = _check_index(index, self.source_size(), "source pair")
        return (torch.from_numpy(self.source_image[idx]), torch.from_numpy(self.source_text[idx]), None,
                torch.from_numpy(self.source_ids[idx]))

    def fingerprint(self) -> dict[str, int | str]:
        return {"kind": "features", "source": int(self.source_ids.shape[0]),
                "target_images": 0 if self.target_image is None else int(self.target_image.shape[0]),
                "target_texts": 0 if self.target_text is None else int(self.target_text.shape[0]),
                "checksum": _checksum(self.source_image, self.source_text, self.target_image, self.target_text)}

    def batches(self, epoch: int) -> Iterator[StepBatch]:
        source_batches = self.sampler.batches(epoch)
        if self.has_target:
            assert self.target_image is not None and self.target_text is not None
            pair = np.arange(self.target_text.shape[0]) if self.target_pairing == "paired" else None
            image_rows, text_rows = _target_index_streams(
                self.target_image.shape[0], self.target_text.shape[0], self.target_batch, len(source_batches),
                self.seed, epoch, self.target_pairing, pair)
        for step, rows in enumerate(source_batches):
            idx = np.asarray(rows)
            batch = StepBatch(torch.from_numpy(self.source_image[self._image_rows(idx)]),
                              torch.from_numpy(self.source_text[idx]), None, torch.from_numpy(self.source_ids[idx]))
            if self.has_target:
                ti, tt = image_rows[step], text_rows[step]
                batch = batch._replace(target_images=torch.from_numpy(self.target_image[self._image_rows(ti)]),
                                       target_text=torch.from_numpy(self.target_text[tt]),
                                       target_image_index=torch.from_numpy(ti), target_text_index=torch.from_numpy(tt))
            yield batch


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise DataError(f"{name}: expected a non-empty (N, d) matrix, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name}: expected numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: contains NaN or inf")
    return arr


def _checksum(*arrays: np.ndarray | None) -> str:
    import hashlib

    h = hashlib.sha1()
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- image decoding
ImagePart = tuple[str, np.ndarray, int | None, int]
"""One image tensor of a job: (name of a path list, row indices, augmentation seed or None, epoch)."""
ImageJob = tuple[ImagePart, ...]
"""The image tensors of one batch, each stacked from one :data:`ImagePart`."""


def _decode_part(paths: Mapping[str, Sequence[str]], transform: ImageTransform, part: ImagePart) -> Tensor:
    name, index, seed, epoch = part
    # Augmentation keyed by (seed, epoch, row): reproducible whatever the batch composition or the process.
    return torch.stack([transform(load_image(paths[name][i]), None if seed is None else item_rng(seed, epoch, int(i)))
                        for i in index])


class _ImageJobs(Dataset):
    """The images of one job per item; what DataLoader worker processes run."""

    def __init__(self, paths: Mapping[str, Sequence[str]], transform: ImageTransform) -> None:
        self.paths = {name: list(values) for name, values in paths.items()}
        self.transform = transform

    def __getitem__(self, job: ImageJob) -> tuple[Tensor, ...] | DataError:  # type: ignore[override]
        try:
            return tuple(_decode_part(self.paths, self.transform, part) for part in job)
        except DataError as exc:  # returned, not raised: a worker would wrap it in a multi-line traceback
            return exc


class _JobSampler(Sampler):
    """Yields the jobs of the current pass; set before each pass, read in the main process."""

    def __init__(self) -> None:
        self.jobs: list[ImageJob] = []

    def __iter__(self) -> Iterator[ImageJob]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


def _as_is(item: Any) -> Any:
    return item


def _raising(items: Iterator[tuple[Tensor, ...] | DataError]) -> Iterator[tuple[Tensor, ...]]:
    for item in items:
        if isinstance(item, DataError):
            raise item
        yield item


class ImageDecoder:
    """Loads, transforms and stacks images listed by path, in the calling process (``workers=0``) or in
    ``workers`` DataLoader worker processes, which decode the next batches while the model trains.

    ``paths``: named path lists the jobs refer to. Workers are started with ``spawn`` (safe after CUDA or
    the tokenizer's thread pool have started in the parent), once, and kept for later passes until
    :meth:`close`. The tensors are equal whatever ``workers`` is. One pass at a time: a new
    :meth:`stream` ends the previous one. ``pin_memory`` pins the batches (for CUDA copies) when workers
    are used."""

    def __init__(self, paths: Mapping[str, Sequence[str]], transform: ImageTransform, *, workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.workers = check_threads(workers, "workers (--workers)", minimum=0)
        self.pin_memory = bool(pin_memory)
        self._dataset = _ImageJobs(paths, transform)
        self._sampler = _JobSampler()
        self._loader: DataLoader | None = None

    def stream(self, jobs: Sequence[ImageJob]) -> Iterator[tuple[Tensor, ...]]:
        """The image tensors of every job, in order; a bad image raises its :class:`DataError` here."""
        if self.workers == 0:
            return _raising(self._dataset[job] for job in jobs)
        self._sampler.jobs = list(jobs)
        if self._loader is None:
            self._loader = DataLoader(
                self._dataset, batch_size=None, sampler=self._sampler, num_workers=self.workers,
                collate_fn=_as_is, pin_memory=self.pin_memory, persistent_workers=True,
                multiprocessing_context="spawn",
                # The loader draws its workers' base seed from this generator: left to torch's global one it
                # would shift the training's dropout draws. Decoding uses no torch randomness.
                generator=torch.Generator().manual_seed(0))
        return _raising(iter(self._loader))

    def decode(self, job: ImageJob) -> tuple[Tensor, ...]:
        """The image tensors of one job, decoded in the calling process; a running :meth:`stream` is left as
        it is (and so are the worker processes)."""
        item = self._dataset[job]
        if isinstance(item, DataError):
            raise item
        return item

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`stream` starts new ones)."""
        self._loader = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loader": None}


# ---------------------------------------------------------------------------------------------- person images
TokenizeFn = Callable[[Sequence[str]], tuple[Tensor, Tensor]]


class PersonTrainingData(_ImageShard):
    """Batches from person-retrieval datasets: images loaded and augmented per item, captions tokenised.

    ``source``: labelled :class:`TrainPairs`; ``target``: the target training split (ids are dropped
    here whatever they hold; ``target.image_person_ids`` / ``person_ids`` are kept aside only as the
    diagnostic truth). ``tokenize(captions) -> (input_ids (B, L), attention_mask (B, L))``.
    Images are decoded in the calling process (``workers=0``) or in ``workers`` DataLoader processes
    (:class:`ImageDecoder`; the same tensors either way); :meth:`close` stops the workers.
    """

    uses_tokens = True

    def __init__(self, source: TrainPairs, tokenize: TokenizeFn, transform: ImageTransform, *,
                 target: TrainPairs | None = None, ids_per_batch: int = 8, pairs_per_id: int = 4,
                 target_batch: int = 32, seed: int = 0, target_pairing: str = "unpaired", workers: int = 0,
                 pin_memory: bool = False) -> None:
        if source.ids_hidden:
            raise DataError("the source pairs have no identities; source training needs labelled pairs")
        self.source = source
        self.tokenize = tokenize
        self.transform = transform
        self.sampler = IdentityBalancedBatchSampler(source.person_ids, ids_per_batch, pairs_per_id, seed)
        self.seed = int(seed)
        self.target_pairing = _check_pairing(target_pairing)
        self.has_target = target is not None
        self.target_batch = int(target_batch)
        self._truth: tuple[np.ndarray, np.ndarray] | None = None
        if target is not None:
            if not target.ids_hidden:
                self._truth = (target.image_person_ids.copy(), target.person_ids.copy())
            self.target = target.without_ids()
            smallest = min(len(self.target.image_paths), len(self.target))
            if self.target_batch > smallest:
                raise ConfigError(f"target_batch={target_batch} exceeds the {smallest} target items; lower it")
        paths = {"source": source.image_paths, **({"target": self.target.image_paths} if target is not None else {})}
        self.decoder = ImageDecoder(paths, transform, workers=workers, pin_memory=pin_memory)

    def close(self) -> None:
        """Stop the image worker processes, if any."""
        self.decoder.close()

    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def target_truth(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self._truth

    # Fetched items are augmented with the generator keyed by (seed + FETCH_SEED, key, image row).
    FETCH_SEED = 2

    def _need_target(self) -> TrainPairs:
        if not self.has_target:
            raise DataError("this training data has no target split")
        return self.target

    def target_sizes(self) -> tuple[int, int]:
        target = self._need_target()
        return len(target.image_paths), len(target)

    def source_size(self) -> int:
        return len(self.source)

    def target_images(self, index: np.ndarray, key: int = 0) -> Tensor:
        target = self._need_target()
        idx = _check_index(index, len(target.image_paths), "target image")
        (images,) = self.decoder.decode((("target", idx, self.seed + self.FETCH_SEED, int(key)),))
        return images

    def target_captions(self, index: np.ndarray) -> tuple[Tensor, Tensor | None]:
        target = self._need_target()
        idx = _check_index(index, len(target), "target caption")
        return self.tokenize([target.captions[i] for i in idx])

    def source_pairs(self, index: np.ndarray, key: int = 0) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        idx = _check_index(index, len(self.source), "source pair")
        (images,) = self.decoder.decode((("source", self.source.image_index[idx], self.seed + self.FETCH_SEED,
                                          int(key)),))
        ids, mask = self.tokenize([self.source.captions[i] for i in idx])
        return images, ids, mask, torch.from_numpy(self.source.person_ids[idx])

    def fingerprint(self) -> dict[str, int | str]:
        return {"kind": "person", "source": self.source.name, "source_pairs": len(self.source),
                "target": self.target.name if self.has_target else "", "target_pairs": len(self.target)
                if self.has_target else 0}

    def batches(self, epoch: int) -> Iterator[StepBatch]:
        source_batches = self.sampler.batches(epoch)
        if self.has_target:
            pair = self.target.image_index if self.target_pairing == "paired" else None
            image_rows, text_rows = _target_index_streams(
                len(self.target.image_paths), len(self.target), self.target_batch, len(source_batches),
                self.seed, epoch, self.target_pairing, pair)
        jobs: list[ImageJob] = []
        for step, rows in enumerate(source_batches):
            parts: list[ImagePart] = [("source", self.source.image_index[self._image_rows(np.asarray(rows))],
                                       self.seed, epoch)]
            if self.has_target:
                parts.append(("target", self._image_rows(image_rows[step]), self.seed + 1, epoch))
            jobs.append(tuple(parts))
        images = self.decoder.stream(jobs)
        for step, rows in enumerate(source_batches):
            idx = np.asarray(rows)
            decoded = next(images)
            ids, mask = self.tokenize([self.source.captions[i] for i in idx])
            batch = StepBatch(decoded[0], ids, mask, torch.from_numpy(self.source.person_ids[idx]))
            if self.has_target:
                ti, tt = image_rows[step], text_rows[step]
                t_ids, t_mask = self.tokenize([self.target.captions[i] for i in tt])
                target_images = decoded[1]
                batch = batch._replace(target_images=target_images,
                                       target_text=t_ids, target_mask=t_mask,
                                       target_image_index=torch.from_numpy(ti), target_text_index=torch.from_numpy(tt))
            yield batch


__all__ = ["HIDDEN_ID", "TARGET_PAIRINGS", "FeatureTrainingData", "ImageDecoder", "IndexedTrainingData",
           "PersonTrainingData", "StepBatch", "TrainingData"]
