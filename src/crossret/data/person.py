"""Text-to-image person-retrieval datasets: CUHK-PEDES, ICFG-PEDES and RSTPReid.

Layout of a dataset root (the layout IRRA and RaSa expect, see ``papers/gckd.md`` §3.1)::

    root/
      reid_raw.json | ICFG-PEDES.json | data_captions.json     # one annotation file
      imgs/...                                                 # image paths are relative to imgs/

============  =======================  ==============================================  ==========  =======
dataset       annotation file          entry keys                                      splits      ids
============  =======================  ==============================================  ==========  =======
cuhk-pedes    ``reid_raw.json``        split, captions, file_path, (processed_tokens),  train, val, 1-based
                                       id                                              test
icfg-pedes    ``ICFG-PEDES.json``      same as CUHK-PEDES (one caption per entry)      train, test 0-based
rstpreid      ``data_captions.json``   id, img_path, captions (two), split             train, val, 0-based
                                                                                       test
============  =======================  ==============================================  ==========  =======

Every reader returns a :class:`PersonDataset` with **0-based** person ids. Annotations are validated as
a whole: a malformed entry or a missing image is never dropped silently, the :class:`DataError` lists
the first problems (with their entry index) and how many there are in total.

On top of the records this module builds what training and evaluation need:

* :func:`build_train_pairs` — (image, caption, person) pairs of the train split (RaSa expands its
  training json the same way); ``hide_ids=True`` gives the *unlabelled* target stream (ids = -1).
* :class:`IdentityBalancedBatchSampler` (P identities × K pairs, labelled source) and
  :class:`ShuffledBatchSampler` (seeded shuffle, unlabelled target).
* :func:`build_eval_view` — queries (every caption) and gallery (every unique image) of a test split,
  the text-to-image protocol of IRRA/RaSa (``papers/gckd.md`` §5).
* :func:`clean_caption` (RaSa's ``pre_caption``), :func:`load_image`, :class:`ImageTransform`
  (resize, flip, CLIP/ALBEF normalisation; torch only, no torchvision) and the torch datasets
  :class:`PairDataset`, :class:`PersonImageDataset`, :class:`CaptionDataset`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from crossret.errors import ConfigError, DataError
from crossret.extras import missing_extra
from crossret.limits import check_memory

try:
    from PIL import Image
except ImportError as exc:  # the 'gckd' extra is not installed
    raise missing_extra("gckd", "PIL", exc) from exc

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
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
    "clean_caption",
    "detect_person_format",
    "load_image",
    "load_person_dataset",
    "read_cuhk_pedes",
    "read_icfg_pedes",
    "read_rstpreid",
    "verify_images",
]

# Normalisation of CLIP, also used by ALBEF and RaSa (``transforms.Normalize`` in their datasets).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
HIDDEN_ID = -1  # what training code sees of a target person id
MAX_LISTED_PROBLEMS = 10


# ---------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class _Format:
    name: str  # canonical name, e.g. "cuhk-pedes"
    display: str  # the dataset's own spelling, also its usual folder name
    annotation_files: tuple[str, ...]  # accepted file names, preferred first
    path_key: str  # key of the image path in an entry
    splits: tuple[str, ...]  # split values allowed in the file
    id_base: int  # smallest valid id in the file (CUHK-PEDES is 1-based)
    example: str  # an entry, for error messages

    @property
    def required_keys(self) -> tuple[str, ...]:
        return ("split", "captions", self.path_key, "id")


_FORMATS: dict[str, _Format] = {
    "cuhk-pedes": _Format(
        "cuhk-pedes", "CUHK-PEDES", ("reid_raw.json",), "file_path", ("train", "val", "test"), 1,
        '{"split": "train", "captions": ["..."], "file_path": "cam_a/x.jpg", "processed_tokens": [[...]], "id": 1}',
    ),
    "icfg-pedes": _Format(
        # IRRA's README spells the file with an underscore, its code with a hyphen: accept both.
        "icfg-pedes", "ICFG-PEDES", ("ICFG-PEDES.json", "ICFG_PEDES.json"), "file_path", ("train", "test"), 0,
        '{"split": "train", "captions": ["..."], "file_path": "train/0001/x.jpg", "id": 0}',
    ),
    "rstpreid": _Format(
        "rstpreid", "RSTPReid", ("data_captions.json",), "img_path", ("train", "val", "test"), 0,
        '{"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["...", "..."], "split": "train"}',
    ),
}
PERSON_DATASETS: tuple[str, ...] = tuple(_FORMATS)

_ALIASES = {
    "cuhk": "cuhk-pedes", "cuhkpedes": "cuhk-pedes", "reid-raw": "cuhk-pedes",
    "icfg": "icfg-pedes", "icfgpedes": "icfg-pedes",
    "rstp": "rstpreid", "rstp-reid": "rstpreid",
}


def canonical_person_format(name: str) -> str:
    """``"CUHK-PEDES"``, ``"cuhk_pedes"``, ``"cuhk"`` ... → ``"cuhk-pedes"``; ConfigError if unknown."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _FORMATS:
        raise ConfigError(f"unknown person-retrieval dataset {name!r}; choose one of {', '.join(PERSON_DATASETS)}")
    return key


def _find_annotation(root: Path, fmt: _Format) -> Path | None:
    # Either root is the dataset folder, or it holds the dataset folder under its usual name (IRRA layout).
    for folder in (root, root / fmt.display):
        for file_name in fmt.annotation_files:
            if (folder / file_name).is_file():
                return folder / file_name
    return None


def detect_person_format(root: str | os.PathLike) -> str:
    """The dataset name whose annotation file is present in ``root`` (or in ``root/<DatasetName>``)."""
    root = Path(root)
    if root.is_file():
        for fmt in _FORMATS.values():
            if root.name in fmt.annotation_files:
                return fmt.name
        raise DataError(f"{root}: not a known annotation file name; expected one of {_all_annotation_names()}")
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; pass the folder that holds the dataset's json and imgs/")
    found = [fmt.name for fmt in _FORMATS.values() if _find_annotation(root, fmt) is not None]
    if not found:
        raise DataError(
            f"{root}: no person-retrieval annotation file found; looked for {_all_annotation_names()} "
            "in this folder and in its CUHK-PEDES/, ICFG-PEDES/ and RSTPReid/ sub-folders"
        )
    if len(found) > 1:
        raise ConfigError(f"{root}: annotation files of several datasets are present ({', '.join(found)}); name one")
    return found[0]


def _all_annotation_names() -> str:
    return ", ".join(name for fmt in _FORMATS.values() for name in fmt.annotation_files)


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True, eq=False)
class PersonRecord:
    """One annotated image: absolute ``image_path``, its raw ``captions``, 0-based ``person_id``."""

    image_path: str
    captions: list[str]
    person_id: int
    split: str
    file_path: str = ""  # the path as written in the annotation file (relative to imgs/)
    entry: int = -1  # index of the entry in the annotation file, for messages


@dataclass(frozen=True, eq=False)
class PersonDataset(Sequence[PersonRecord]):
    """A list of :class:`PersonRecord` read from one annotation file (or a split of it)."""

    name: str
    records: tuple[PersonRecord, ...]
    root: str = ""
    annotation: str = ""
    image_root: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> PersonRecord: ...
    @overload
    def __getitem__(self, index: slice) -> PersonDataset: ...
    def __getitem__(self, index: int | slice) -> PersonRecord | PersonDataset:
        if isinstance(index, slice):
            return self._with(self.records[index])
        return self.records[index]

    def __iter__(self) -> Iterator[PersonRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.split_counts().items() if v)
        return f"PersonDataset({self.name!r}, records={len(self)}, {counts})"

    def _with(self, records: Iterable[PersonRecord]) -> PersonDataset:
        return PersonDataset(self.name, tuple(records), self.root, self.annotation, self.image_root)

    # ------------------------------------------------------------------ views
    def split(self, name: str) -> PersonDataset:
        """Records of one split (``train``, ``val`` or ``test``); empty if the dataset has none (ICFG val)."""
        if name not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
        return self._with(r for r in self.records if r.split == name)

    def split_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SPLIT_NAMES, 0)
        for record in self.records:
            counts[record.split] = counts.get(record.split, 0) + 1
        return counts

    @property
    def person_ids(self) -> np.ndarray:
        """int64 person id of every record."""
        return np.fromiter((r.person_id for r in self.records), dtype=np.int64, count=len(self.records))

    @property
    def image_paths(self) -> list[str]:
        return [r.image_path for r in self.records]

    @property
    def num_identities(self) -> int:
        return int(np.unique(self.person_ids).size)

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "root": self.root}
        for split in SPLIT_NAMES:
            part = self.split(split)
            out[split] = {"identities": part.num_identities, "images": len(part), "captions": part.num_captions}
        return out

    def train_pairs(self, split: str | None = "train", *, max_words: int | None = 50, hide_ids: bool = False
                    ) -> TrainPairs:
        """See :func:`build_train_pairs`."""
        return build_train_pairs(self, split, max_words=max_words, hide_ids=hide_ids)

    def eval_view(self, split: str | None = "test", *, max_words: int | None = 50) -> EvalView:
        """See :func:`build_eval_view`."""
        return build_eval_view(self, split, max_words=max_words)


# ---------------------------------------------------------------------------------------------- reading
def load_person_dataset(name_or_format: str | None, root: str | os.PathLike, *,
                        image_root: str | os.PathLike | None = None, check_images: bool = True) -> PersonDataset:
    """Read a person-retrieval dataset.

    ``name_or_format`` is ``"cuhk-pedes"``, ``"icfg-pedes"``, ``"rstpreid"`` (or an alias such as
    ``"CUHK-PEDES"``); ``None``/``"auto"`` detects it from the annotation file present in ``root``.
    ``root`` is the folder with the annotation json (or the json itself, or a folder holding
    ``CUHK-PEDES/`` etc.); images are resolved against ``image_root`` (default ``<json folder>/imgs``).
    With ``check_images`` (default) every listed image must exist.
    """
    root = Path(root)
    if name_or_format is None or str(name_or_format).lower() == "auto":
        fmt = _FORMATS[detect_person_format(root)]
    else:
        fmt = _FORMATS[canonical_person_format(name_or_format)]
    if root.is_file():
        annotation: Path | None = root
    elif root.is_dir():
        annotation = _find_annotation(root, fmt)
    else:
        raise DataError(f"{root}: no such file or directory; pass the {fmt.display} folder (with "
                        f"{fmt.annotation_files[0]} and imgs/)")
    if annotation is None:
        raise DataError(f"{root}: {fmt.display} annotation file not found; looked for "
                        f"{', '.join(fmt.annotation_files)} in {root} and {root / fmt.display}")
    images = Path(image_root) if image_root is not None else annotation.parent / "imgs"
    raw = _read_json_list(annotation)
    records, problems = _parse_entries(raw, fmt, images.resolve())
    if check_images:
        problems += _missing_images(records)
    if problems:
        raise DataError(_problem_report(annotation, fmt, images, problems, len(raw)))
    return PersonDataset(fmt.name, tuple(records), str(annotation.parent.resolve()), str(annotation.resolve()),
                         str(images.resolve()))


def read_cuhk_pedes(root: str | os.PathLike, **kwargs: Any) -> PersonDataset:
    """CUHK-PEDES ``reid_raw.json`` (ids 1-based in the file, 0-based in the result)."""
    return load_person_dataset("cuhk-pedes", root, **kwargs)


def read_icfg_pedes(root: str | os.PathLike, **kwargs: Any) -> PersonDataset:
    """ICFG-PEDES ``ICFG-PEDES.json`` (splits train/test only, one caption per image)."""
    return load_person_dataset("icfg-pedes", root, **kwargs)


def read_rstpreid(root: str | os.PathLike, **kwargs: Any) -> PersonDataset:
    """RSTPReid ``data_captions.json`` (key ``img_path``, two captions per image)."""
    return load_person_dataset("rstpreid", root, **kwargs)


def _read_json_list(path: Path) -> list[Any]:
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        "the file is truncated or corrupt, re-extract it") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the annotation file ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # integers too long to convert, lists/objects nested too deeply
        raise DataError(f"{path}: not a valid annotation file ({type(exc).__name__}: {exc}); the file is corrupt, "
                        "re-extract it") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the annotation list is empty (0 entries)")
    return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_entries(raw: list[Any], fmt: _Format, image_root: Path) -> tuple[list[PersonRecord], list[tuple[int, str]]]:
    """Validate every entry; return the records of the valid ones and ``(entry, message)`` problems."""
    records: list[PersonRecord] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, tuple[int, int, str]] = {}  # file path -> (entry, person id, split) of its first entry
    root_text = str(image_root)
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            problems.append((index, f"is a {_type_name(entry)}, expected an object with keys "
                                    f"{', '.join(fmt.required_keys)}"))
            continue
        issues: list[str] = []
        missing = [key for key in fmt.required_keys if key not in entry]
        if missing:
            issues.append("missing key(s) " + ", ".join(repr(k) for k in missing))

        split = entry.get("split")
        if "split" in entry and (not isinstance(split, str) or split not in fmt.splits):
            issues.append(f"'split' is {split!r}, expected one of {', '.join(fmt.splits)}")

        pid = entry.get("id")
        if "id" in entry:
            if isinstance(pid, bool) or not isinstance(pid, int):
                issues.append(f"'id' must be an integer, got {_type_name(pid)} {pid!r}")
            elif pid < 0:
                issues.append(f"'id' is negative ({pid})")
            elif pid < fmt.id_base:
                issues.append(f"'id' is {pid} but {fmt.display} ids are {fmt.id_base}-based")
            elif pid > _MAX_PERSON_ID:
                issues.append(f"'id' is {pid}, larger than any dataset's (at most {_MAX_PERSON_ID})")

        captions = entry.get("captions")
        if "captions" in entry:
            if not isinstance(captions, list):
                issues.append(f"'captions' must be a list of strings, got {_type_name(captions)}")
            elif not captions:
                issues.append("'captions' is an empty list")
            else:
                for k, caption in enumerate(captions):
                    if not isinstance(caption, str):
                        issues.append(f"caption {k} is a {_type_name(caption)}, expected a string")
                    elif not clean_caption(caption, None):
                        issues.append(f"caption {k} is empty (or punctuation only): {caption!r}")

        rel = entry.get(fmt.path_key)
        if fmt.path_key in entry:
            if not isinstance(rel, str) or not rel.strip():
                issues.append(f"'{fmt.path_key}' must be a non-empty string, got {_type_name(rel)} {rel!r}")
            elif os.path.isabs(rel) or ".." in Path(rel).parts:
                issues.append(f"'{fmt.path_key}' {rel!r} must be a path relative to imgs/ (no '..')")
            elif not _is_file_name(rel):
                issues.append(f"'{fmt.path_key}' {rel!r} holds characters no file name can have (NUL or an "
                              "unpaired surrogate)")

        if issues:
            problems.append((index, "; ".join(issues)))
            continue
        person_id = int(pid) - fmt.id_base
        first = seen.setdefault(rel, (index, person_id, split))
        if first[0] != index and (first[1] != person_id or first[2] != split):
            what = f"id {first[1] + fmt.id_base}" if first[1] != person_id else f"split {first[2]!r}"
            problems.append((index, f"image {rel!r} is also listed by entry {first[0]} with {what}"))
            continue
        records.append(PersonRecord(os.path.join(root_text, rel), list(captions), person_id, split, rel, index))
    return records, problems


_MAX_PERSON_ID = 1 << 62  # ids are stored as int64


def _is_file_name(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        os.fsencode(text)
    except UnicodeError:
        return False
    return True


def _missing_images(records: Sequence[PersonRecord]) -> list[tuple[int, str]]:
    """Entries whose image file does not exist.

    One directory listing per folder instead of a ``stat`` per file: the datasets keep tens of
    thousands of images in a few folders, so this is much faster, on network file systems above all.
    """
    listings: dict[str, set[str] | None] = {}
    problems: list[tuple[int, str]] = []
    for record in records:
        folder, name = os.path.split(record.image_path)
        if folder not in listings:
            try:
                with os.scandir(folder) as it:
                    listings[folder] = {e.name for e in it if e.is_file()}
            except (OSError, ValueError):  # ValueError: a name the file system cannot encode
                listings[folder] = None
        names = listings[folder]
        if names is None or name not in names:
            problems.append((record.entry, f"image file missing: {record.image_path}"))
    return problems


def _problem_report(annotation: Path, fmt: _Format, image_root: Path, problems: list[tuple[int, str]],
                    n_entries: int) -> str:
    problems = sorted(problems, key=lambda item: item[0])
    n_missing = sum(1 for _, message in problems if message.startswith("image file missing"))
    n_bad = len(problems) - n_missing
    kinds = []
    if n_bad:
        kinds.append(f"{n_bad} malformed entr{'y' if n_bad == 1 else 'ies'}")
    if n_missing:
        kinds.append(f"{n_missing} missing image{'' if n_missing == 1 else 's'}")
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"{annotation}: {len(problems)} problem(s) in {n_entries} {fmt.display} entries "
             f"({', '.join(kinds)}); first {len(shown)}:"]
    lines += [f"  entry {index}: {message}" for index, message in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    hints = []
    if n_bad:
        hints.append(f"fix the annotation file (entries look like {fmt.example})")
    if n_missing:
        hints.append(f"check the image folder {image_root} (image paths are relative to it)")
    lines.append("; ".join(hints))
    return "\n".join(lines)


def verify_images(paths: Iterable[str | os.PathLike | PersonRecord]) -> None:
    """Decode every image (paths, or records such as a :class:`PersonDataset`); raise one DataError
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


# ---------------------------------------------------------------------------------------------- captions
# RaSa's pre_caption: drop ,.'!?"()*#:;~ and turn - and / into spaces.
_CAPTION_TABLE = str.maketrans({**dict.fromkeys(",.'!?\"()*#:;~", None), "-": " ", "/": " "})


def clean_caption(text: str, max_words: int | None = 50) -> str:
    """RaSa's ``pre_caption`` (also ALBEF's): lower-case, strip ``,.'!?"()*#:;~``, ``-`` and ``/`` →
    space, collapse whitespace, keep the first ``max_words`` words (``None``: all).

    Differs from RaSa only in collapsing *every* whitespace run (RaSa leaves a lone tab or newline).
    """
    if max_words is not None and max_words < 1:
        raise ConfigError(f"max_words must be >= 1 (or None), got {max_words}")
    words = text.lower().translate(_CAPTION_TABLE).split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------- training pairs
@dataclass(frozen=True, eq=False)
class TrainPairs:
    """(image, caption, person) pairs of a training split.

    ``image_index[i]`` indexes ``image_paths`` (one entry per annotated image). ``person_ids`` are the
    identities re-indexed to ``0..num_identities-1`` (``original_ids[label]`` is the dataset's id), as
    RaSa re-indexes its training ``person_idx``. For a target stream every id is ``-1`` and
    ``original_ids`` is empty: the identities are not available to training code at all.
    """

    image_paths: tuple[str, ...]
    image_index: np.ndarray
    captions: tuple[str, ...]
    person_ids: np.ndarray
    image_person_ids: np.ndarray
    original_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    name: str = ""

    def __post_init__(self) -> None:
        n = len(self.captions)
        image_index = np.asarray(self.image_index, dtype=np.int64)
        person_ids = np.asarray(self.person_ids, dtype=np.int64)
        image_ids = np.asarray(self.image_person_ids, dtype=np.int64)
        if image_index.shape != (n,) or person_ids.shape != (n,):
            raise DataError(f"{self.name}: {n} captions but image_index {image_index.shape} and person_ids "
                            f"{person_ids.shape}; every pair needs one image and one id")
        if image_ids.shape != (len(self.image_paths),):
            raise DataError(f"{self.name}: {len(self.image_paths)} images but {image_ids.shape} image ids")
        if n and (image_index.min() < 0 or image_index.max() >= len(self.image_paths)):
            raise DataError(f"{self.name}: image_index out of range for {len(self.image_paths)} images")
        object.__setattr__(self, "image_paths", tuple(self.image_paths))
        object.__setattr__(self, "captions", tuple(self.captions))
        object.__setattr__(self, "image_index", image_index)
        object.__setattr__(self, "person_ids", person_ids)
        object.__setattr__(self, "image_person_ids", image_ids)
        object.__setattr__(self, "original_ids", np.asarray(self.original_ids, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def ids_hidden(self) -> bool:
        return bool((self.person_ids == HIDDEN_ID).all())

    @property
    def num_identities(self) -> int:
        """Number of distinct identities (0 when the ids are hidden)."""
        return int(np.unique(self.person_ids[self.person_ids >= 0]).size)

    def without_ids(self) -> TrainPairs:
        """The same pairs with every id set to -1 and the id table dropped: the unlabelled target view."""
        return TrainPairs(self.image_paths, self.image_index, self.captions,
                          np.full(len(self), HIDDEN_ID, dtype=np.int64),
                          np.full(len(self.image_paths), HIDDEN_ID, dtype=np.int64), name=self.name)


def _select(dataset: PersonDataset | Sequence[PersonRecord], split: str | None) -> list[PersonRecord]:
    if split is None:
        return list(dataset)
    if split not in SPLIT_NAMES:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    return [r for r in dataset if r.split == split]


def build_train_pairs(dataset: PersonDataset | Sequence[PersonRecord], split: str | None = "train", *,
                      max_words: int | None = 50, hide_ids: bool = False) -> TrainPairs:
    """Expand the records of ``split`` (``None``: all records) into one pair per caption.

    Captions are cleaned with :func:`clean_caption`. ``hide_ids=True`` gives the unlabelled target
    stream (ids -1; GCKD's target train split is used without labels, ``papers/gckd.md`` §1).
    """
    records = _select(dataset, split)
    name = getattr(dataset, "name", "")
    if not records:
        raise DataError(f"{name or 'dataset'}: no records in split {split!r}; nothing to train on")
    counts = np.fromiter((len(r.captions) for r in records), dtype=np.int64, count=len(records))
    image_index = np.repeat(np.arange(len(records), dtype=np.int64), counts)
    captions = [clean_caption(c, max_words) for r in records for c in r.captions]
    image_paths = [r.image_path for r in records]
    if hide_ids:
        return TrainPairs(image_paths, image_index, captions, np.full(len(captions), HIDDEN_ID, dtype=np.int64),
                          np.full(len(records), HIDDEN_ID, dtype=np.int64), name=name)
    raw_ids = np.fromiter((r.person_id for r in records), dtype=np.int64, count=len(records))
    original_ids, image_labels = np.unique(raw_ids, return_inverse=True)
    image_labels = image_labels.astype(np.int64).reshape(-1)
    return TrainPairs(image_paths, image_index, captions, image_labels[image_index], image_labels,
                      original_ids, name=name)


# ---------------------------------------------------------------------------------------------- samplers
def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)



def check_sampling_memory(n_identities: int, pairs_per_id: int) -> None:
    """Refuse an identity-balanced epoch that would not fit in memory: every epoch deals at least one chunk
    of ``pairs_per_id`` pairs per identity (int64 indices, and their batches)."""
    check_memory(16 * n_identities * pairs_per_id, f"k={pairs_per_id} pairs per identity (pairs_per_id) for "
                 f"{n_identities} identities", "lower k")

class IdentityBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``p`` distinct identities × ``k`` pairs each, for the labelled source.

    Per epoch (seeded by ``(seed, epoch)``, so every epoch is reproducible on its own):

    * each identity's pairs are shuffled and cut into chunks of ``k``; the last chunk is filled up by
      sampling the identity's pairs with replacement (so identities with fewer than ``k`` pairs work),
      hence every pair and every identity appears at least once per epoch;
    * chunks are dealt into ``max(ceil(chunks / p), largest chunk count)`` batches of ``p`` *distinct*
      identities, picking identities at random weighted by their remaining chunks (an identity is forced
      in when it would otherwise not fit into the remaining batches); a batch that runs out of
      identities with chunks left is topped up with extra chunks of other, random identities.

    Indices within a batch are grouped by identity (``k`` consecutive indices share an id).
    """

    def __init__(self, person_ids: np.ndarray | Sequence[int], p: int, k: int, seed: int = 0) -> None:
        ids = np.asarray(person_ids, dtype=np.int64).reshape(-1)
        self.p = _check_positive("p (identities per batch)", p)
        self.k = _check_positive("k (pairs per identity)", k)
        self.seed = _check_seed(seed)
        self.epoch = 0
        if ids.size == 0:
            raise DataError("identity-balanced sampling needs at least one pair")
        if (ids < 0).any():
            raise DataError(f"{int((ids < 0).sum())} pair(s) have unknown ids (-1); identity-balanced sampling "
                            "needs labels: use it on the labelled source, ShuffledBatchSampler on the target")
        order = np.argsort(ids, kind="stable")
        unique, starts = np.unique(ids[order], return_index=True)
        self._groups = np.split(order, starts[1:])
        if unique.size < self.p:
            raise ConfigError(f"p={self.p} identities per batch but the data has only {unique.size} identities; "
                              "lower p")
        check_sampling_memory(unique.size, self.k)
        self._chunks = np.array([math.ceil(g.size / self.k) for g in self._groups], dtype=np.int64)
        self._num_batches = max(math.ceil(int(self._chunks.sum()) / self.p), int(self._chunks.max()))

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (a pure function of ``seed`` and ``epoch``)."""
        rng = np.random.default_rng([self.seed, _check_seed(epoch)])
        k = self.k
        chunks: list[np.ndarray] = []
        for group, count in zip(self._groups, self._chunks, strict=True):
            perm = rng.permutation(group)
            pad = int(count) * k - group.size
            if pad:
                perm = np.concatenate([perm, rng.choice(group, size=pad, replace=True)])
            chunks.append(perm.reshape(int(count), k))
        remaining = self._chunks.copy()
        used = np.zeros_like(remaining)
        n_ids = remaining.size
        out: list[list[int]] = []
        for b in range(self._num_batches):
            left = self._num_batches - b
            forced = np.flatnonzero(remaining == left)  # these need a chunk in every remaining batch
            candidates = np.flatnonzero((remaining > 0) & (remaining < left))
            need = self.p - forced.size
            if candidates.size > need:
                # Weighted sampling without replacement (Efraimidis–Spirakis keys), O(n) per batch.
                keys = np.log(rng.random(candidates.size)) / remaining[candidates]
                picked = candidates[np.argpartition(-keys, need - 1)[:need]] if need else candidates[:0]
            else:
                picked = candidates
            chosen = np.concatenate([forced, picked])
            rows = [chunks[i][used[i]] for i in chosen]
            used[chosen] += 1
            remaining[chosen] -= 1
            short = self.p - chosen.size
            if short:
                # Not enough identities with chunks left: top up with fresh chunks of other identities.
                pool = np.setdiff1d(np.arange(n_ids), chosen, assume_unique=True)
                for i in rng.choice(pool, size=short, replace=False):
                    group = self._groups[i]
                    rows.append(rng.choice(group, size=k, replace=group.size < k))
            batch = np.concatenate(rows)
            # Shuffle the order of the identity blocks so forced identities are not always first.
            block_order = rng.permutation(self.p)
            out.append(batch.reshape(self.p, k)[block_order].reshape(-1).tolist())
        return out


class ShuffledBatchSampler(Sampler[list[int]]):
    """Seeded shuffled batches of ``batch_size`` indices out of ``n`` (the unlabelled target stream).

    Epoch ``e`` is the permutation drawn from ``(seed, e)``; ``drop_last`` (default) keeps every batch
    full, which the fixed-size memory-bank updates of GCKD expect.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True) -> None:
        self.n = _check_positive("n (number of items)", n)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seed = _check_seed(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        if self.drop_last and self.n < self.batch_size:
            raise ConfigError(f"batch_size {self.batch_size} is larger than the {self.n} items and drop_last is "
                              "set, so no batch would be produced; lower batch_size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        perm = np.random.default_rng([self.seed, _check_seed(epoch)]).permutation(self.n)
        return [perm[i:i + self.batch_size].tolist() for i in range(0, len(self) * self.batch_size, self.batch_size)]


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True, eq=False)
class EvalView:
    """Text-to-image evaluation of one split (IRRA/RaSa protocol, ``papers/gckd.md`` §5).

    Queries are *every* caption, the gallery is every unique image; a gallery image is relevant to a
    query iff the person ids are equal. ``caption_image[q]`` is the gallery index of the image the
    caption was written for (RaSa's ``txt2img``).
    """

    captions: tuple[str, ...]
    caption_person_ids: np.ndarray
    caption_image: np.ndarray
    image_paths: tuple[str, ...]
    image_person_ids: np.ndarray
    name: str = ""

    @property
    def num_queries(self) -> int:
        return len(self.captions)

    @property
    def num_gallery(self) -> int:
        return len(self.image_paths)

    def relevant_counts(self) -> np.ndarray:
        """Number of relevant gallery images of every query (>= 1 by construction)."""
        ids, counts = np.unique(self.image_person_ids, return_counts=True)
        return counts[np.searchsorted(ids, self.caption_person_ids)].astype(np.int64)


def build_eval_view(dataset: PersonDataset | Sequence[PersonRecord], split: str | None = "test", *,
                    max_words: int | None = 50) -> EvalView:
    """Queries (cleaned captions) and gallery (unique images) of ``split`` with their person ids."""
    records = _select(dataset, split)
    name = getattr(dataset, "name", "")
    if not records:
        raise DataError(f"{name or 'dataset'}: no records in split {split!r}; nothing to evaluate")
    gallery: dict[str, int] = {}
    image_ids: list[int] = []
    captions: list[str] = []
    caption_ids: list[int] = []
    caption_image: list[int] = []
    for record in records:
        g = gallery.setdefault(record.image_path, len(gallery))
        if g == len(image_ids):
            image_ids.append(record.person_id)
        for caption in record.captions:
            captions.append(clean_caption(caption, max_words))
            caption_ids.append(record.person_id)
            caption_image.append(g)
    return EvalView(tuple(captions), np.asarray(caption_ids, dtype=np.int64), np.asarray(caption_image, dtype=np.int64),
                    tuple(gallery), np.asarray(image_ids, dtype=np.int64), name=name)


# ---------------------------------------------------------------------------------------------- images
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


def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    # Keyed by (seed, epoch, index), so augmentation does not depend on worker scheduling or batch order.
    return np.random.default_rng([seed, epoch, index])


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
        image = self.transform(load_image(path), _item_rng(self.seed, self.epoch, index))
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
        image = self.transform(load_image(self.image_paths[index]), _item_rng(self.seed, self.epoch, index))
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
