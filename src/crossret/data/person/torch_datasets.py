"""Images and torch datasets for person retrieval: :func:`load_image` (a full, checked decode),
:class:`ImageTransform` (resize, flip, CLIP/ALBEF normalisation; torch only, no torchvision),
:func:`verify_images`, and the datasets :class:`PairDataset`, :class:`PersonImageDataset` and
:class:`CaptionDataset` over the views of :mod:`crossret.data.person.annotations`.

Augmentation draws from :func:`item_rng`, keyed by ``(seed, epoch, index)``, so a sample's tensor does not
depend on worker scheduling or batch order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from crossret.data.person.annotations import HIDDEN_ID, MAX_LISTED_PROBLEMS, EvalView, PersonRecord, TrainPairs
from crossret.data.person.sampling import _check_seed
from crossret.errors import ConfigError, DataError
from crossret.extras import missing_extra

try:
    from PIL import Image
except ImportError as exc:  # the 'gckd' extra is not installed
    raise missing_extra("gckd", "PIL", exc) from exc

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionDataset",
    "CaptionSample",
    "ImageSample",
    "ImageTransform",
    "PairDataset",
    "PairSample",
    "PersonImageDataset",
    "item_rng",
    "load_image",
    "verify_images",
]

# ---------------------------------------------------------------------------------------------- images
# Normalisation of CLIP, also used by ALBEF and RaSa (``transforms.Normalize`` in their datasets).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; a missing, corrupt or truncated file is a DataError naming it.

    Unlike RaSa (``ImageFile.LOAD_TRUNCATED_IMAGES = True``) truncated files are refused, not padded grey.
    """
    try:
        with Image.open(path) as image:
            _check_image_size(path, image)
            image.load()  # decode now, so that truncation surfaces here and not inside a transform
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except DataError:
        raise
    except Exception as exc:  # an untrusted file: PIL's decoders raise OSError, SyntaxError, struct.error, ...
        raise DataError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); the file is corrupt or "
                        "not an image, replace it") from exc


#: No image format stores more pixels per byte than a 1-bit deflated PNG (8 x deflate's 1032:1).
_MAX_PIXELS_PER_BYTE = 8 * 1032


def _check_image_size(path: str | os.PathLike, image: Image.Image) -> None:
    """Refuse an image whose header declares more pixels than its bytes can encode, before PIL
    allocates the declared size."""
    width, height = image.size
    file_size = os.path.getsize(path)
    if width * height > _MAX_PIXELS_PER_BYTE * file_size + 65536:
        raise DataError(f"{path}: the image header declares {width} x {height} pixels but the file has only "
                        f"{file_size} bytes; the file is corrupt or truncated, replace it")


@dataclass(frozen=True)
class ImageTransform:
    """Resize to ``size`` = (H, W), random horizontal flip with ``flip_prob``, normalise with ``mean``/``std``.

    Pure torch: resizing is ``F.interpolate`` with ``antialias=True`` (the PIL-compatible kernel that
    torchvision uses), bicubic by default as in RaSa/ALBEF; values are clamped to [0, 1] after resizing
    as an 8-bit resize would. Output: float32 ``(3, H, W)``.
    """

    size: tuple[int, int] = (384, 128)
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"image size must be (height, width) with positive values, got {self.size!r}")
        if not 0.0 <= float(self.flip_prob) <= 1.0:
            raise ConfigError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need 3 values each (RGB) and std must be positive")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ConfigError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1))

    @classmethod
    def train(cls, size: tuple[int, int] = (384, 128), flip_prob: float = 0.5, **kwargs: Any) -> ImageTransform:
        return cls(size, flip_prob, **kwargs)

    @classmethod
    def eval(cls, size: tuple[int, int] = (384, 128), **kwargs: Any) -> ImageTransform:
        return cls(size, 0.0, **kwargs)

    def __call__(self, image: Image.Image | np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Transform one RGB image (PIL or uint8 ``(H, W, 3)``); ``rng`` draws the flip (seeded → reproducible)."""
        if isinstance(image, Image.Image):
            array = np.array(image.convert("RGB"), dtype=np.uint8)
        else:
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise DataError(f"expected a uint8 (H, W, 3) RGB array, got {array.dtype} {array.shape}")
        flip = False
        if self.flip_prob > 0:
            flip = bool((rng if rng is not None else np.random.default_rng()).random() < self.flip_prob)
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if tuple(x.shape[1:]) != self.size:
            x = F.interpolate(x.unsqueeze(0), size=self.size, mode=self.interpolation, align_corners=False,
                              antialias=True).squeeze(0).clamp_(0.0, 1.0)
        if flip:
            x = x.flip(-1)
        return ((x - self._mean) / self._std).contiguous()  # type: ignore[attr-defined]


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that augments item ``index`` in ``epoch``: keyed by ``(seed, epoch, index)``, so
    augmentation does not depend on worker scheduling or batch order."""
    return np.random.default_rng([seed, epoch, index])


def verify_images(paths: Iterable[str | os.PathLike | PersonRecord]) -> None:
    """Decode every image (paths, or records such as a
    :class:`~crossret.data.person.annotations.PersonDataset`); raise one DataError
    listing the unreadable ones. Slow (a full decode each): the readers only check that files exist."""
    bad: list[str] = []
    for path in paths:
        try:
            load_image(path.image_path if isinstance(path, PersonRecord) else path)
        except DataError as exc:
            bad.append(str(exc))
    if bad:
        shown = "\n".join(f"  {line}" for line in bad[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{len(bad)} unreadable image(s):\n{shown}{more}")


# ---------------------------------------------------------------------------------------------- torch datasets
class PairSample(NamedTuple):
    image: torch.Tensor
    caption: str
    person_id: int
    index: int


class ImageSample(NamedTuple):
    image: torch.Tensor
    person_id: int
    index: int


class CaptionSample(NamedTuple):
    caption: str
    person_id: int
    index: int


class _EpochSeeded:
    seed: int
    epoch: int

    def set_epoch(self, epoch: int) -> None:
        """Augmentations of epoch ``epoch`` (call before creating the epoch's DataLoader iterator)."""
        self.epoch = int(epoch)


class PairDataset(_EpochSeeded, Dataset[PairSample]):
    """Training pairs for a DataLoader: ``(image tensor, cleaned caption, person id, pair index)``.

    With a target :class:`TrainPairs` (ids hidden) ``person_id`` is -1. Tokenisation is left to the collate.
    """

    def __init__(self, pairs: TrainPairs, transform: ImageTransform, seed: int = 0) -> None:
        self.pairs = pairs
        self.transform = transform
        self.seed = _check_seed(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PairSample:
        index = int(index)
        path = self.pairs.image_paths[self.pairs.image_index[index]]
        image = self.transform(load_image(path), item_rng(self.seed, self.epoch, index))
        return PairSample(image, self.pairs.captions[index], int(self.pairs.person_ids[index]), index)


class PersonImageDataset(_EpochSeeded, Dataset[ImageSample]):
    """Images only (an evaluation gallery, or the target images of the unpaired reading): ``(image, id, index)``."""

    def __init__(self, image_paths: Sequence[str], transform: ImageTransform,
                 person_ids: np.ndarray | Sequence[int] | None = None, seed: int = 0) -> None:
        self.image_paths = tuple(image_paths)
        ids = np.full(len(self.image_paths), HIDDEN_ID, dtype=np.int64) if person_ids is None else \
            np.asarray(person_ids, dtype=np.int64)
        if ids.shape != (len(self.image_paths),):
            raise DataError(f"{len(self.image_paths)} images but {ids.shape} person ids")
        self.person_ids = ids
        self.transform = transform
        self.seed = _check_seed(seed)
        self.epoch = 0

    @classmethod
    def gallery(cls, view: EvalView, transform: ImageTransform) -> PersonImageDataset:
        return cls(view.image_paths, transform, view.image_person_ids)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> ImageSample:
        index = int(index)
        image = self.transform(load_image(self.image_paths[index]), item_rng(self.seed, self.epoch, index))
        return ImageSample(image, int(self.person_ids[index]), index)


class CaptionDataset(Dataset[CaptionSample]):
    """Captions only (evaluation queries): ``(caption, person id, index)``."""

    def __init__(self, captions: Sequence[str], person_ids: np.ndarray | Sequence[int] | None = None) -> None:
        self.captions = tuple(captions)
        ids = np.full(len(self.captions), HIDDEN_ID, dtype=np.int64) if person_ids is None else \
            np.asarray(person_ids, dtype=np.int64)
        if ids.shape != (len(self.captions),):
            raise DataError(f"{len(self.captions)} captions but {ids.shape} person ids")
        self.person_ids = ids

    @classmethod
    def queries(cls, view: EvalView) -> CaptionDataset:
        return cls(view.captions, view.caption_person_ids)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> CaptionSample:
        index = int(index)
        return CaptionSample(self.captions[index], int(self.person_ids[index]), index)
