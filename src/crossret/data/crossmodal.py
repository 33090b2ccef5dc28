"""Paired image-text data: the Wikipedia cross-modal feature set and a category-transfer split.

A :class:`CrossModalSet` holds N aligned image-text pairs: row ``i`` of ``image`` and row ``i`` of
``text`` describe the same Wikipedia article section, and ``labels[i]`` is its category.

The data set is the Wikipedia image-text collection of

    N. Rasiwasia, J. Costa Pereira, E. Coviello, G. Doyle, G. Lanckriet, R. Levy, N. Vasconcelos,
    "A New Approach to Cross-Modal Multimedia Retrieval", ACM Multimedia (ACM MM) 2010:

2,866 pairs in 10 categories with the standard split of 2,173 training and 693 test pairs. The
features are the ones shipped by the RoPH authors (repository ``kding1225/RoPH``, file
``data/wiki.mat``; K. Ding, B. Fan, C. Huo, S. Xiang, C. Pan, "Cross-Modal Hashing via Rank-Order
Preserving", IEEE Transactions on Multimedia 2017): 128-d SIFT bag-of-words image features, centred
(every dimension has mean 0 over the 2,866 pairs), and 100-d text features with values in [-1, 1].
The text features are *not* centred, although the data README says so (per-dimension means up to
0.58 against a mean per-dimension spread of about 0.1); centre them yourself if a method needs it.

File layout (MAT v5, one struct ``data``; ``scipy.io.loadmat(path)["data"][0, 0]``):

==================  ==============  ==========================================================
field               shape           meaning
==================  ==============  ==========================================================
``X1``              (128, 2866)     image features, **one column per sample**
``X2``              (100, 2866)     text features, one column per sample
``Y``               (10, 2866)      one-hot class labels (sparse bool); exactly one per column
``split.ind_train`` 2173 entries    **1-based** column indices of the training pairs
``split.ind_test``  693 entries     1-based column indices of the test pairs (no overlap)
==================  ==============  ==========================================================

:func:`load_wikipedia` reads ``<data dir>/wikipedia-crossmodal/wiki.mat`` (the data dir comes from
``--data-dir`` / ``data_dir=...`` or ``$CROSSRET_DATA``, as for the named benchmarks) and returns
the train and test sets with 0-based labels 0..9. The file holds only numeric labels; that they
follow the category order of :data:`WIKIPEDIA_CATEGORIES` is an assumption (see the data README).

:func:`category_transfer_split` turns the two sets into a cross-category (domain-adaptive)
retrieval task: a labelled source made of some categories, an unlabelled target made of the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crossret.data.benchmarks import DATA_ENV, resolve_data_dir
from crossret.data.declared_sizes import check_mat_sizes, corrupt_file_error, dense_from_sparse
from crossret.data.domain import Domain, check_features, check_labels
from crossret.data.readers import _sniff
from crossret.errors import DataError

Modality = Literal["image", "text"]

#: Where the file lives under the data dir (first candidate), or directly in it (second candidate).
WIKIPEDIA_FILES = ("wikipedia-crossmodal/wiki.mat", "wiki.mat")
WIKIPEDIA_TRAIN_SIZE = 2173
WIKIPEDIA_TEST_SIZE = 693
#: The 10 Wikipedia categories in the order assumed for labels 0..9 (the file holds numbers only).
WIKIPEDIA_CATEGORIES = (
    "art & architecture",
    "biology",
    "geography & places",
    "history",
    "literature & theatre",
    "media",
    "music",
    "royalty & nobility",
    "sport & recreation",
    "warfare",
)
DEFAULT_SOURCE_CLASSES = (0, 1, 2, 3, 4)
SPLIT_KEYS = ("source_train", "target_train", "target_test", "source_test")

_DATA_FIELDS = ("X1", "X2", "Y", "split")
_SPLIT_FIELDS = ("ind_train", "ind_test")


# ------------------------------------------------------------------------------------------ the set
@dataclass(frozen=True, eq=False)
class CrossModalSet:
    """N aligned image-text pairs: ``image`` float32 ``(N, d_img)``, ``text`` float32 ``(N, d_txt)``,
    ``labels`` int64 ``(N,)`` (-1 = unknown), one row per pair.

    ``origin`` names the file the pairs came from (used in error messages); ``index`` is optional,
    int64 ``(N,)``: the 0-based position of each pair in that file (kept through :meth:`subset`, so
    that every row can be traced back and splits can be checked for overlap).
    Construction validates and converts, like :class:`~crossret.data.domain.Domain`.
    """

    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    name: str = "crossmodal"
    origin: str = ""
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        where = self.origin or self.name
        image = check_features(self.image, where, "image", "pair")
        text = check_features(self.text, where, "text", "pair")
        if image.shape[0] != text.shape[0]:
            raise DataError(
                f"{where}: {image.shape[0]} image rows but {text.shape[0]} text rows; the rows must be "
                "aligned pairs (row i of image and row i of text describe the same item)"
            )
        n = image.shape[0]
        labels = check_labels(self.labels, where, n, "pair")
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "labels", labels)
        if self.index is not None:
            index = np.asarray(self.index)
            if index.ndim != 1 or index.shape[0] != n or index.dtype.kind not in "iu":
                raise DataError(
                    f"{where}: index must be an integer vector with one entry per pair ({n}), got "
                    f"shape {index.shape} and dtype {index.dtype}"
                )
            if (index < 0).any():
                raise DataError(f"{where}: index holds negative positions ({int(index.min())}); it is 0-based")
            object.__setattr__(self, "index", np.ascontiguousarray(index, dtype=np.int64))

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return int(self.image.shape[0])

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def classes(self) -> np.ndarray:
        """Sorted known class ids (excluding -1)."""
        return np.unique(self.labels[self.labels >= 0])

    @property
    def is_labelled(self) -> bool:
        return bool((self.labels >= 0).all())

    def class_counts(self, n_classes: int | None = None) -> np.ndarray:
        """Pairs per class id 0..K-1 (``np.bincount`` of the known labels)."""
        known = self.labels[self.labels >= 0]
        return np.bincount(known, minlength=n_classes or 0)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (
            f"CrossModalSet({self.name!r}, n={self.n}, image_dim={self.image_dim}, text_dim={self.text_dim}, "
            f"classes={self.classes.size})"
        )

    # ------------------------------------------------------------------ derived sets
    def subset(self, mask_or_index: Any, name: str | None = None) -> CrossModalSet:
        """The pairs picked by a boolean mask of length N or by integer positions (order kept as given).

        Raises :class:`DataError` for a mask of the wrong length, positions out of range, a
        non-integer selector or an empty selection.
        """
        where = self.origin or self.name
        selector = np.asarray(mask_or_index)
        if selector.dtype.kind == "b":
            if selector.shape != (self.n,):
                raise DataError(
                    f"{where}: a boolean mask must have one entry per pair ({self.n}), got shape {selector.shape}"
                )
            positions = np.flatnonzero(selector)
        elif selector.dtype.kind in "iu" or selector.size == 0:
            positions = selector.reshape(-1).astype(np.int64)
            if selector.ndim > 1:
                raise DataError(f"{where}: subset positions must be 1-D, got shape {selector.shape}")
            bad = positions[(positions < -self.n) | (positions >= self.n)]
            if bad.size:
                raise DataError(
                    f"{where}: subset positions out of range for {self.n} pairs: {bad[:5].tolist()}"
                    + (" ..." if bad.size > 5 else "")
                )
            positions = np.where(positions < 0, positions + self.n, positions)
        else:
            raise DataError(
                f"{where}: subset takes a boolean mask or integer positions, got dtype {selector.dtype}"
            )
        if positions.size == 0:
            raise DataError(f"{where}: the selection is empty; a CrossModalSet needs at least one pair")
        return CrossModalSet(
            image=self.image[positions],
            text=self.text[positions],
            labels=self.labels[positions],
            name=name or self.name,
            origin=self.origin,
            index=None if self.index is None else self.index[positions],
        )

    def to_domain(self, modality: Modality, name: str | None = None) -> Domain:
        """One modality as a :class:`~crossret.data.domain.Domain` (same rows, same labels)."""
        if modality not in ("image", "text"):
            raise DataError(f"{self.origin or self.name}: modality must be 'image' or 'text', got {modality!r}")
        features = self.image if modality == "image" else self.text
        return Domain(name or f"{self.name}/{modality}", features, self.labels, self.origin)


# ------------------------------------------------------------------------------------------ loading
def wikipedia_path(data_dir: str | os.PathLike | None = None) -> Path:
    """The Wikipedia file under the data dir (``data_dir``, else ``$CROSSRET_DATA``).

    Looks for ``wikipedia-crossmodal/wiki.mat``, then ``wiki.mat``; raises :class:`DataError`
    saying where it looked when neither exists or no data dir is set.
    """
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"the Wikipedia image-text set needs {WIKIPEDIA_FILES[0]} but no data directory is set; pass "
            f"--data-dir DIR (data_dir=...) or set {DATA_ENV} to the folder that holds {WIKIPEDIA_FILES[0]}"
        )
    candidates = [root / name for name in WIKIPEDIA_FILES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Wikipedia image-text file not found: looked for {' and '.join(str(c) for c in candidates)}; pass "
        f"--data-dir DIR (data_dir=...) or set {DATA_ENV} to the folder that holds {WIKIPEDIA_FILES[0]} "
        "(source: kding1225/RoPH, data/wiki.mat)"
    )


def load_wikipedia(data_dir: str | os.PathLike | None = None) -> tuple[CrossModalSet, CrossModalSet]:
    """The Wikipedia image-text set (Rasiwasia et al., ACM MM 2010; features from RoPH, Ding et al.,
    IEEE TMM 2017) as ``(train, test)``: the standard 2,173 / 693 split of the 2,866 pairs.

    Reads ``<data dir>/wikipedia-crossmodal/wiki.mat`` (see :func:`wikipedia_path`; the data dir is
    ``data_dir``, else ``$CROSSRET_DATA``). Image features are 128-d, text features 100-d, labels
    0..9 (the file's classes 1..10 shifted); rows follow the order of ``split.ind_train`` /
    ``split.ind_test`` and ``index`` holds each pair's 0-based column in the file.
    Errors (:class:`DataError`) name the file and say what is wrong: missing file, not a MAT v5
    file, no struct ``data`` or missing fields, column counts that differ between ``X1``, ``X2``
    and ``Y``, labels that are not one-hot, split indices out of range, repeated or overlapping.
    """
    return read_wikipedia_mat(wikipedia_path(data_dir))


def read_wikipedia_mat(path: str | os.PathLike) -> tuple[CrossModalSet, CrossModalSet]:
    """:func:`load_wikipedia` for an explicit file path (a MAT v5 file in the RoPH ``wiki.mat`` layout)."""
    path = Path(path)
    data = _load_struct(path)
    image = _field_matrix(path, "X1", data["X1"])
    text = _field_matrix(path, "X2", data["X2"])
    onehot = _field_matrix(path, "Y", data["Y"])
    counts = {"X1": image.shape[1], "X2": text.shape[1], "Y": onehot.shape[1]}
    if len(set(counts.values())) != 1:
        shown = ", ".join(f"{key} {shape}" for key, shape in
                          (("X1", image.shape), ("X2", text.shape), ("Y", onehot.shape)))
        raise DataError(
            f"{path}: the fields have different numbers of columns ({shown}); X1, X2 and Y store one sample "
            "per column and must have the same number of columns"
        )
    n = counts["X1"]
    if n == 0:
        raise DataError(f"{path}: the data set is empty (0 columns in X1, X2 and Y)")
    labels = _onehot_labels(path, onehot)

    split = _struct(path, "data.split", data["split"], _SPLIT_FIELDS)
    train_idx = _split_indices(path, "ind_train", split["ind_train"], n)
    test_idx = _split_indices(path, "ind_test", split["ind_test"], n)
    overlap = np.intersect1d(train_idx, test_idx)
    if overlap.size:
        raise DataError(
            f"{path}: split.ind_train and split.ind_test overlap in {overlap.size} sample(s) (1-based: "
            f"{(overlap[:5] + 1).tolist()}{' ...' if overlap.size > 5 else ''}); a test pair must never be "
            "used for training, so the split is unusable"
        )

    image_rows, text_rows = image.T, text.T
    sets = []
    for part, idx in (("train", train_idx), ("test", test_idx)):
        sets.append(
            CrossModalSet(
                image=image_rows[idx],
                text=text_rows[idx],
                labels=labels[idx],
                name=f"wikipedia/{part}",
                origin=str(path),
                index=idx,
            )
        )
    return sets[0], sets[1]


# ------------------------------------------------------------------------------------------ category split
def category_transfer_split(
    train: CrossModalSet,
    test: CrossModalSet,
    source_classes: Sequence[int] = DEFAULT_SOURCE_CLASSES,
) -> dict[str, CrossModalSet]:
    """Split by category into a labelled source and an unlabelled target (cross-category transfer).

    The target classes are all known classes (of ``train`` and ``test``) not in ``source_classes``.
    Returns a dict with four sets, labels kept as they are (not renumbered):

    * ``source_train``: training pairs of the source classes; labelled, for training;
    * ``target_train``: training pairs of the target classes; what a method may train on without
      labels. Its labels are kept in the object **for reports only** (class counts, diagnostics);
      training must not use them (take ``.image`` / ``.text``, or ``to_domain(...).without_labels()``);
    * ``target_test``: test pairs of the target classes; the queries / database for evaluation;
    * ``source_test``: test pairs of the source classes (for evaluating on the source categories).

    With the Wikipedia set (standard 2,173 / 693 split) and the default source classes 0..4 the
    sizes are 1,120 / 1,053 / 341 / 352. ``source_classes`` must be a non-empty list of distinct
    integer labels present in the data that leaves at least one target class; both sets must be
    fully labelled and have the same feature sizes. Raises :class:`DataError` otherwise.
    """
    for part, data in (("train", train), ("test", test)):
        if not isinstance(data, CrossModalSet):
            raise DataError(f"category_transfer_split: {part} must be a CrossModalSet, got {type(data).__name__}")
        if not data.is_labelled:
            raise DataError(
                f"{data.origin or data.name}: {int((data.labels < 0).sum())} pair(s) have unknown labels (-1); "
                "a split by category needs every pair labelled"
            )
    if (train.image_dim, train.text_dim) != (test.image_dim, test.text_dim):
        raise DataError(
            f"train has image/text sizes {train.image_dim}/{train.text_dim} but test has "
            f"{test.image_dim}/{test.text_dim}; both must come from the same feature extractors"
        )
    known = np.union1d(train.classes, test.classes)
    source = _check_source_classes(source_classes, known)
    target = np.setdiff1d(known, source)

    in_source_train = np.isin(train.labels, source)
    in_source_test = np.isin(test.labels, source)
    picks = {
        "source_train": (train, in_source_train),
        "target_train": (train, ~in_source_train),
        "target_test": (test, ~in_source_test),
        "source_test": (test, in_source_test),
    }
    empty = [key for key, (_data, mask) in picks.items() if not mask.any()]
    if empty:
        raise DataError(
            f"category split with source classes {source.tolist()} and target classes {target.tolist()} leaves "
            f"{', '.join(empty)} empty; choose source classes that occur in both train and test "
            "(and leave target classes that do too)"
        )
    return {key: data.subset(mask, name=f"{data.name}/{key}") for key, (data, mask) in picks.items()}


def _check_source_classes(source_classes: Sequence[int], known: np.ndarray) -> np.ndarray:
    if isinstance(source_classes, (str, bytes)) or not isinstance(source_classes, (Sequence, np.ndarray)):
        raise DataError(f"source_classes must be a list of class labels, got {source_classes!r}")
    values = list(source_classes)
    if not values:
        raise DataError(f"source_classes is empty; name at least one of the known classes {known.tolist()}")
    bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
    if bad:
        raise DataError(f"source_classes must be integer class labels, got {bad!r}")
    source = np.asarray([int(v) for v in values], dtype=np.int64)
    if np.unique(source).size != source.size:
        raise DataError(f"source_classes lists a class more than once: {source.tolist()}")
    unknown = np.setdiff1d(source, known)
    if unknown.size:
        raise DataError(
            f"source_classes {unknown.tolist()} are not labels of the data; known classes: {known.tolist()} "
            "(labels are 0-based)"
        )
    if source.size == known.size:
        raise DataError(
            f"source_classes {sorted(source.tolist())} cover every known class; they must be a proper subset "
            "so that some classes are left for the target"
        )
    return np.sort(source)


# ------------------------------------------------------------------------------------------ helpers
def _load_struct(path: Path) -> Mapping[str, Any]:
    """The ``data`` struct of a MAT v5 file, with its fields checked."""
    import scipy.io
    from scipy.io.matlab import matfile_version

    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected the MAT file wiki.mat")
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass --data-dir DIR or set {DATA_ENV} to the data folder")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); copy wiki.mat again")
    kind = _sniff(path)
    if kind in ("hdf5", "mat-v7.3"):
        raise DataError(
            f"{path}: this is a MATLAB v7.3 (HDF5) file; the Wikipedia reader expects a MAT v5 file as in "
            "kding1225/RoPH (re-save it in MATLAB with save(..., '-v7'))"
        )
    try:
        major, _minor = matfile_version(str(path))
    except Exception as exc:  # scipy raises ValueError/MatReadError on foreign bytes
        raise DataError(
            f"{path}: not a MATLAB .mat file ({type(exc).__name__}: {exc}); expected the MAT v5 file wiki.mat"
        ) from exc
    if major != 1 or kind != "matlab":
        raise DataError(
            f"{path}: not a MATLAB v5 .mat file (no 'MATLAB 5.0 MAT-file' header); expected the MAT v5 file "
            "wiki.mat from kding1225/RoPH"
        )
    # Every declared size against the bytes present, before scipy allocates (or reads out of bounds).
    if "data" in check_mat_sizes(path):
        raise DataError(f"{path}: 'data' is a MATLAB object, not the struct with fields X1, X2, Y and split")
    try:
        variables = [name for name, _shape, _cls in scipy.io.whosmat(str(path))]
        if "data" not in variables:
            shown = ", ".join(v for v in variables if not v.startswith("__")) or "(none)"
            raise DataError(
                f"{path}: no variable 'data' in the file (variables found: {shown}); expected one struct "
                "'data' with fields X1, X2, Y and split"
            )
        raw = scipy.io.loadmat(str(path), variable_names=["data"])["data"]
    except DataError:
        raise
    except Exception as exc:  # a truncated or damaged file fails inside scipy with many types
        raise corrupt_file_error(path, "MATLAB .mat", exc) from exc
    return _struct(path, "data", raw, _DATA_FIELDS)


def _struct(path: Path, what: str, value: Any, fields: tuple[str, ...]) -> Mapping[str, Any]:
    """The single element of a MATLAB struct (a 1x1 structured array) after checking its fields."""
    array = np.asarray(value)
    names = array.dtype.names
    if names is None:
        raise DataError(
            f"{path}: {what} is not a struct (got a {array.dtype} array of shape {array.shape}); expected a "
            f"struct with fields {', '.join(fields)}"
        )
    if array.size != 1:
        raise DataError(f"{path}: {what} is a struct array of shape {array.shape}; expected a single (1x1) struct")
    missing = [f for f in fields if f not in names]
    if missing:
        raise DataError(
            f"{path}: struct {what} lacks field(s) {', '.join(missing)} (fields found: {', '.join(names)}); "
            f"expected {', '.join(fields)}"
        )
    element = array.reshape(-1)[0]
    return {name: element[name] for name in names}


def _field_matrix(path: Path, key: str, value: Any) -> np.ndarray:
    """A 2-D numeric array from a struct field (sparse matrices made dense)."""
    import scipy.sparse

    if scipy.sparse.issparse(value):
        value = dense_from_sparse(path, f"data.{key}", value)
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise DataError(
            f"{path}: data.{key} is not a numeric array (dtype {array.dtype}); expected a numeric matrix with "
            "one column per sample"
        )
    if array.ndim != 2:
        raise DataError(f"{path}: data.{key} must be a 2-D matrix (dims x samples), got shape {array.shape}")
    return array


def _onehot_labels(path: Path, onehot: np.ndarray) -> np.ndarray:
    """0-based class of each column of a one-hot (classes x samples) matrix."""
    if onehot.dtype.kind == "f" and not np.isfinite(onehot).all():
        raise DataError(f"{path}: data.Y holds NaN or inf; it must be a 0/1 one-hot matrix")
    if not np.isin(onehot, (0, 1)).all():
        raise DataError(
            f"{path}: data.Y holds values other than 0 and 1; it must be a one-hot matrix (classes x samples)"
        )
    per_column = (onehot != 0).sum(axis=0)
    bad = np.flatnonzero(per_column != 1)
    if bad.size:
        raise DataError(
            f"{path}: data.Y must have exactly one label per column (one-hot, classes x samples), but "
            f"{bad.size} column(s) have {sorted(set(per_column[bad].tolist()))} labels (first, 1-based: "
            f"{(bad[:5] + 1).tolist()})"
        )
    return np.argmax(onehot != 0, axis=0).astype(np.int64)


def _split_indices(path: Path, key: str, value: Any, n: int) -> np.ndarray:
    """The 1-based MATLAB indices of ``split.<key>``, checked and converted to 0-based int64."""
    import scipy.sparse

    if scipy.sparse.issparse(value):
        value = dense_from_sparse(path, f"split.{key}", value)
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise DataError(f"{path}: split.{key} is not a numeric array (dtype {array.dtype}); expected 1-based indices")
    if sum(s > 1 for s in array.shape) > 1:
        raise DataError(f"{path}: split.{key} must be a vector of indices, got shape {array.shape}")
    array = array.reshape(-1)
    if array.size == 0:
        raise DataError(f"{path}: split.{key} is empty; the split needs at least one index")
    if array.dtype.kind == "f" and (not np.isfinite(array).all() or not np.all(array == np.round(array))):
        raise DataError(f"{path}: split.{key} holds non-integer or NaN values; expected 1-based integer indices")
    indices = array.astype(np.int64)
    bad = indices[(indices < 1) | (indices > n)]
    if bad.size:
        hint = " (indices are 1-based, as in MATLAB: 0 is not a valid index)" if (bad == 0).any() else ""
        raise DataError(
            f"{path}: split.{key} has {bad.size} index(es) out of range 1..{n}: "
            f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}{hint}"
        )
    values, counts = np.unique(indices, return_counts=True)
    repeated = values[counts > 1]
    if repeated.size:
        raise DataError(
            f"{path}: split.{key} lists {repeated.size} index(es) more than once: "
            f"{repeated[:5].tolist()}{' ...' if repeated.size > 5 else ''}; each pair may appear once"
        )
    return indices - 1
