"""Person-retrieval annotations: CUHK-PEDES, ICFG-PEDES and RSTPReid records, caption cleaning, and the
training-pair and evaluation views built from them (no torch, no images decoded).

Layout of a dataset root (the layout IRRA and RaSa expect; docs/gckd.md)::

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

* :func:`clean_caption` — RaSa's ``pre_caption``;
* :func:`build_train_pairs` — (image, caption, person) pairs of the train split (RaSa expands its
  training json the same way); ``hide_ids=True`` gives the *unlabelled* target stream (ids = -1);
* :func:`build_eval_view` — queries (every caption) and gallery (every unique image) of a test split,
  the text-to-image protocol of IRRA/RaSa.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from crossret.errors import ConfigError, DataError

__all__ = [
    "HIDDEN_ID",
    "MAX_LISTED_PROBLEMS",
    "PERSON_DATASETS",
    "SPLIT_NAMES",
    "EvalView",
    "PersonDataset",
    "PersonRecord",
    "TrainPairs",
    "build_eval_view",
    "build_train_pairs",
    "canonical_person_format",
    "clean_caption",
    "detect_person_format",
    "load_person_dataset",
    "read_cuhk_pedes",
    "read_icfg_pedes",
    "read_rstpreid",
]

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
    stream (ids -1; GCKD's target train split is used without labels).
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


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True, eq=False)
class EvalView:
    """Text-to-image evaluation of one split (IRRA/RaSa protocol).

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
