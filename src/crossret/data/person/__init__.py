"""Text-to-image person-retrieval datasets: CUHK-PEDES, ICFG-PEDES and RSTPReid.

* :mod:`~crossret.data.person.annotations` — the annotation readers (:func:`load_person_dataset`,
  :class:`PersonDataset` with 0-based person ids, every entry validated), :func:`clean_caption` (RaSa's
  ``pre_caption``), the training pairs (:func:`build_train_pairs`; ``hide_ids=True`` for the unlabelled
  target) and the evaluation view (:func:`build_eval_view`, the IRRA/RaSa text-to-image protocol);
* :mod:`~crossret.data.person.sampling` — :class:`IdentityBalancedBatchSampler` (P identities × K pairs,
  labelled source) and :class:`ShuffledBatchSampler` (seeded shuffle, unlabelled target);
* :mod:`~crossret.data.person.torch_datasets` — :func:`load_image`, :class:`ImageTransform` and the torch
  datasets :class:`PairDataset`, :class:`PersonImageDataset`, :class:`CaptionDataset`.

Importing this package imports torch and PIL (the ``gckd`` extra); ``import crossret.data`` does not
import it.
"""

from __future__ import annotations

from crossret.data.person.annotations import (
    HIDDEN_ID,
    MAX_LISTED_PROBLEMS,
    PERSON_DATASETS,
    SPLIT_NAMES,
    EvalView,
    PersonDataset,
    PersonRecord,
    TrainPairs,
    build_eval_view,
    build_train_pairs,
    canonical_person_format,
    clean_caption,
    detect_person_format,
    load_person_dataset,
    read_cuhk_pedes,
    read_icfg_pedes,
    read_rstpreid,
)
from crossret.data.person.sampling import IdentityBalancedBatchSampler, ShuffledBatchSampler, check_sampling_memory
from crossret.data.person.torch_datasets import (
    CLIP_MEAN,
    CLIP_STD,
    CaptionDataset,
    CaptionSample,
    ImageSample,
    ImageTransform,
    PairDataset,
    PairSample,
    PersonImageDataset,
    item_rng,
    load_image,
    verify_images,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HIDDEN_ID",
    "MAX_LISTED_PROBLEMS",
    "PERSON_DATASETS",
    "SPLIT_NAMES",
    "CaptionDataset",
    "CaptionSample",
    "EvalView",
    "IdentityBalancedBatchSampler",
    "ImageSample",
    "ImageTransform",
    "PairDataset",
    "PairSample",
    "PersonDataset",
    "PersonImageDataset",
    "PersonRecord",
    "ShuffledBatchSampler",
    "TrainPairs",
    "build_eval_view",
    "build_train_pairs",
    "canonical_person_format",
    "check_sampling_memory",
    "clean_caption",
    "detect_person_format",
    "item_rng",
    "load_image",
    "load_person_dataset",
    "read_cuhk_pedes",
    "read_icfg_pedes",
    "read_rstpreid",
    "verify_images",
]
