"""Feature-file readers: one entry point, :func:`read_domain`, for every supported layout.

The format is detected from the file itself (container by magic bytes and extension, layout by the
variable names inside), so ``crossret run --source FILE --target FILE`` accepts all of them
(DESIGN "Data conventions"). Supported layouts:

============  ==========================================  ===========================================
layout        variables                                   notes
============  ==========================================  ===========================================
features      ``features`` (N x d), ``labels`` (N)        crossret's own ``.npz``
couple        ``deepfea`` (N x d), ``label`` (N x 1/1 x N)  COUPLE / PWCF deep features (``.mat``)
jda           ``X_src``/``Y_src``/``X_tar``/``Y_tar``      JDA ``.mat``; **columns are samples**; two
                                                          domains per file, ``role`` picks one
surf          ``fts`` (N x 800 counts), ``labels``        Office-Caltech SURF ``.mat``
decaf         ``feas``, ``labels``                        Office-Caltech DeCAF ``.mat``
data-target   ``data``, ``target``                        ``.h5`` / ``.hdf5``
csv           one row per sample, label in last column    optional header row
============  ==========================================  ===========================================

Any layout is accepted in any container (``.npz``, MAT v4/v5, MAT v7.3 = HDF5, plain HDF5);
MATLAB v7.3 arrays are transposed back (h5py sees MATLAB's column-major arrays transposed).
Labels of the MATLAB layouts (couple, jda, surf, decaf) are normalised to 0-based: with
``label_base="auto"`` labels whose smallest known value is 1 are taken as 1-based.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crossret.data.domain import UNKNOWN_LABEL, Domain
from crossret.errors import ConfigError, DataError

Role = Literal["source", "target"]
LabelBase = Literal["auto", 0, 1]

SUPPORTED_EXTENSIONS = (".npz", ".mat", ".h5", ".hdf5", ".csv")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip
# MAT v7.3 files are HDF5 files with a 512-byte MATLAB header ("user block") in front.
_MAT73_USERBLOCK = 512


@dataclass(frozen=True)
class _Layout:
    """A known set of variable names and how to turn them into (features, labels)."""

    name: str
    features_key: str
    labels_key: str
    description: str
    matlab_labels: bool  # MATLAB families may be 1-based; see _normalise_labels
    columns_are_samples: bool = False


_LAYOUTS: tuple[_Layout, ...] = (
    _Layout("features", "features", "labels", "features+labels (npz)", matlab_labels=False),
    _Layout("couple", "deepfea", "label", "deepfea+label (COUPLE .mat)", matlab_labels=True),
    # JDA holds two domains: keys are resolved per role in _jda_keys.
    _Layout(
        "jda", "X_src", "Y_src", "X_src/Y_src/X_tar/Y_tar (JDA .mat)", matlab_labels=True, columns_are_samples=True
    ),
    _Layout("surf", "fts", "labels", "fts+labels (SURF .mat)", matlab_labels=True),
    _Layout("decaf", "feas", "labels", "feas+labels (DeCAF .mat)", matlab_labels=True),
    _Layout("data-target", "data", "target", "data+target (.h5)", matlab_labels=False),
)
_JDA_KEYS = {"source": ("X_src", "Y_src"), "target": ("X_tar", "Y_tar")}
_LOOKED_FOR = ", ".join(layout.description for layout in _LAYOUTS)


# ---------------------------------------------------------------------------------------- containers
class _Container:
    """Uniform read access to the named arrays of one file (npz, MAT v5, MAT v7.3, HDF5)."""

    def __init__(self, kind: str, keys: list[str], load: Callable[[str], Any]) -> None:
        self.kind = kind  # "npz", "mat-v5", "mat-v7.3", "hdf5"
        self.keys = keys
        self._load = load

    def get(self, key: str) -> Any:
        return self._load(key)


def _sniff(path: Path) -> str:
    """Container kind from the first bytes: "zip", "hdf5", "mat-v7.3", "matlab" or "other"."""
    with path.open("rb") as handle:
        head = handle.read(_MAT73_USERBLOCK + len(_HDF5_MAGIC))
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head[_MAT73_USERBLOCK:].startswith(_HDF5_MAGIC) and head.startswith(b"MATLAB"):
        return "mat-v7.3"
    if head[:4] in _ZIP_MAGICS:
        return "zip"
    if head.startswith(b"MATLAB"):
        return "matlab"
    return "other"


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path (relative paths are resolved from {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a feature file ({', '.join(SUPPORTED_EXTENSIONS)})")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); re-export the features")


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{path}: unknown file extension {ext or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)} "
            "(rename the file if it is one of these formats, or convert it to .npz with arrays "
            "'features' and 'labels')"
        )
    return ext


def _corrupt(path: Path, what: str, exc: BaseException | None = None) -> DataError:
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return DataError(f"{path}: not a valid {what} file{detail}; the file is corrupt or truncated, re-create it")


def _open_npz(path: Path) -> _Container:
    if _sniff(path) != "zip":
        raise _corrupt(path, ".npz (zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
    except Exception as exc:  # zipfile/numpy raise many types for a broken archive
        raise _corrupt(path, ".npz", exc) from exc

    def load(key: str) -> Any:
        # Reopened per array so that no file handle outlives the call.
        try:
            with np.load(path, allow_pickle=False) as archive:
                return archive[key]
        except ValueError as exc:
            if "allow_pickle" not in str(exc):
                raise _corrupt(path, ".npz", exc) from exc
            # Object arrays need pickle, which is never allowed (it can run arbitrary code).
            raise DataError(
                f"{path}: array {key!r} holds Python objects (pickled), which crossret does not load; "
                "save plain numeric arrays with numpy.savez"
            ) from exc
        except Exception as exc:
            raise _corrupt(path, ".npz", exc) from exc

    return _Container("npz", keys, load)


def _open_mat_v5(path: Path) -> _Container:
    import scipy.io

    try:
        keys = [name for name, _shape, _cls in scipy.io.whosmat(str(path))]
    except Exception as exc:  # scipy raises ValueError/TypeError/MatReadError on foreign bytes
        raise _corrupt(path, "MATLAB .mat", exc) from exc

    def load(key: str) -> Any:
        try:
            # Load one variable at a time: JDA files hold two domains and deep-feature files are large.
            return scipy.io.loadmat(str(path), variable_names=[key])[key]
        except Exception as exc:
            raise _corrupt(path, "MATLAB .mat", exc) from exc

    return _Container("mat-v5", keys, load)


def _open_hdf5(path: Path, matlab: bool) -> _Container:
    import h5py

    what = "MATLAB v7.3 .mat (HDF5)" if matlab else "HDF5"
    try:
        with h5py.File(path, "r") as handle:
            # Only top-level datasets are candidates; MATLAB keeps cell/struct internals in '#refs#'.
            keys = [k for k, v in handle.items() if isinstance(v, h5py.Dataset)]
    except Exception as exc:
        raise _corrupt(path, what, exc) from exc

    def load(key: str) -> Any:
        try:
            with h5py.File(path, "r") as handle:
                array = np.asarray(handle[key][()])
        except Exception as exc:
            raise _corrupt(path, what, exc) from exc
        # h5py reads MATLAB's column-major arrays with the axes reversed; undo that so the arrays
        # have MATLAB's own shapes and the layout rules below are the same as for MAT v5.
        return array.T if matlab else array

    return _Container("mat-v7.3" if matlab else "hdf5", keys, load)


def _open_container(path: Path, ext: str) -> _Container:
    sniffed = _sniff(path)
    if ext == ".npz":
        return _open_npz(path)
    if ext == ".mat":
        # An HDF5 file named .mat is taken as MATLAB v7.3 even without MATLAB's 512-byte header.
        if sniffed in ("mat-v7.3", "hdf5"):
            return _open_hdf5(path, matlab=True)
        from scipy.io.matlab import matfile_version

        try:
            major, _minor = matfile_version(str(path))
        except Exception as exc:
            raise _corrupt(path, "MATLAB .mat", exc) from exc
        if major == 2:  # v7.3 whose header we did not recognise above
            return _open_hdf5(path, matlab=True)
        return _open_mat_v5(path)
    # .h5 / .hdf5: a MATLAB v7.3 file renamed to .h5 still carries MATLAB's header and transposition.
    if sniffed == "mat-v7.3":
        return _open_hdf5(path, matlab=True)
    if sniffed != "hdf5":
        raise _corrupt(path, "HDF5")
    return _open_hdf5(path, matlab=False)


def _find_layout(path: Path, keys: list[str]) -> _Layout:
    present = set(keys)
    for layout in _LAYOUTS:
        needed = (
            {*_JDA_KEYS["source"], *_JDA_KEYS["target"]}
            if layout.name == "jda"
            else {layout.features_key, layout.labels_key}
        )
        if needed <= present:
            return layout
    shown = sorted(k for k in keys if not k.startswith("__"))
    raise DataError(
        f"{path}: no known set of arrays found; keys found: {', '.join(shown) or '(none)'}; "
        f"looked for: {_LOOKED_FOR}. Save the features and labels under one of these names "
        "(e.g. numpy.savez(path, features=X, labels=y))"
    )


# ------------------------------------------------------------------------------------------ public
def detect_format(path: str | os.PathLike) -> str:
    """The format of a feature file as ``"<container>:<layout>"``, e.g. ``"mat-v5:jda"``.

    Containers: ``npz``, ``mat-v5`` (also v4), ``mat-v7.3``, ``hdf5``, ``csv``. Layouts: ``features``,
    ``couple``, ``jda``, ``surf``, ``decaf``, ``data-target`` and ``csv`` (label in the last column).
    Raises :class:`DataError` when the file is missing, unreadable or holds no known layout.
    """
    path = Path(path)
    _check_file(path)
    ext = _extension(path)
    if ext == ".csv":
        return "csv:csv"
    container = _open_container(path, ext)
    layout = _find_layout(path, container.keys)
    return f"{container.kind}:{layout.name}"


def read_domain(
    path: str | os.PathLike,
    role: Role | None = None,
    name: str | None = None,
    label_base: LabelBase = "auto",
) -> Domain:
    """Read one domain from a feature file (format detected from the file; see the module doc).

    ``role`` picks the source or target half of a JDA file, which holds two domains (other layouts
    ignore it). ``name`` defaults to the file stem (plus ``/src`` or ``/tar`` for JDA files).
    ``label_base`` says whether the labels of MATLAB-family files are 0- or 1-based; ``"auto"`` takes
    labels whose smallest known value is 1 as 1-based (non-MATLAB layouts are taken as they are).
    Features come back float32 ``(N, d)``, labels int64 0-based; errors name the file.
    """
    return _read_domain(path, role, name, label_base)[0]


def read_domain_pair(
    source_path: str | os.PathLike,
    target_path: str | os.PathLike,
    label_base: LabelBase = "auto",
    source_name: str | None = None,
    target_name: str | None = None,
) -> tuple[Domain, Domain, dict[str, int]]:
    """Read a source and a target file with **one** label base decision for the pair.

    Deciding per file is unsafe: a 0-based target that lacks class 0 would look 1-based and every
    label would shift by one. With ``"auto"``, MATLAB-family files are 1-based when the smallest
    known label of the *pair* is 1; if the two files would still be normalised differently (a
    1-based MATLAB file next to a format taken as it is), this is an error asking for an explicit
    ``label_base``. Returns ``(source, target, {"source_label_base": b, "target_label_base": b})``.
    """
    if label_base != "auto":
        source = read_domain(source_path, "source", source_name, label_base)
        target = read_domain(target_path, "target", target_name, label_base)
        base = int(label_base)
        return source, target, {"source_label_base": base, "target_label_base": base}
    source, source_matlab = _read_domain(Path(source_path), "source", source_name, 0)
    target, target_matlab = _read_domain(Path(target_path), "target", target_name, 0)
    known = np.concatenate([source.labels[source.labels >= 0], target.labels[target.labels >= 0]])
    pair_min = int(known.min()) if known.size else 0
    bases = {"source_label_base": int(source_matlab and pair_min == 1),
             "target_label_base": int(target_matlab and pair_min == 1)}
    if source_matlab != target_matlab and pair_min == 1:
        raise DataError(
            f"{source_path} and {target_path}: the smallest label of the pair is 1, so the MATLAB file would be "
            "read as 1-based and shifted while the other file is taken as it is; their classes would no longer "
            "match. Pass the label base explicitly (--label-base 0 or --label-base 1)"
        )

    def shift(domain: Domain, base: int) -> Domain:
        if not base:
            return domain
        labels = np.where(domain.labels >= 0, domain.labels - 1, UNKNOWN_LABEL)
        return Domain(domain.name, domain.features, labels, domain.origin)

    return shift(source, bases["source_label_base"]), shift(target, bases["target_label_base"]), bases


def _read_domain(
    path: str | os.PathLike, role: Role | None, name: str | None, label_base: LabelBase
) -> tuple[Domain, bool]:
    """:func:`read_domain`, also saying whether the file is of a MATLAB family (labels may be 1-based)."""
    path = Path(path)
    if label_base not in ("auto", 0, 1):
        raise ConfigError(f"{path}: label_base must be 'auto', 0 or 1, got {label_base!r}")
    if role is not None and role not in _JDA_KEYS:
        raise ConfigError(f"{path}: role must be 'source' or 'target' (or None), got {role!r}")
    _check_file(path)
    ext = _extension(path)
    if ext == ".csv":
        features, labels = _read_csv(path)
        labels = _normalise_labels(path, "last column", labels, label_base, matlab=False)
        return Domain(name or path.stem, features, labels, origin=str(path)), False

    container = _open_container(path, ext)
    layout = _find_layout(path, container.keys)
    suffix = ""
    if layout.name == "jda":
        if role is None:
            raise DataError(
                f"{path}: this JDA file holds two domains (X_src/Y_src and X_tar/Y_tar); pass "
                "role='source' or role='target' to pick one (on the command line, --source FILE "
                "and --target FILE pick the matching half automatically)"
            )
        fkey, lkey = _JDA_KEYS[role]
        suffix = "/src" if role == "source" else "/tar"
    else:
        fkey, lkey = layout.features_key, layout.labels_key

    features = _numeric(path, fkey, container.get(fkey))
    labels = _numeric(path, lkey, container.get(lkey))
    if features.ndim != 2:
        raise DataError(
            f"{path}: {fkey!r} must be a 2-D array (samples x dims), got shape {features.shape}; "
            "flatten each sample to one row"
        )
    labels = _as_label_vector(path, lkey, labels)
    if layout.columns_are_samples:
        if features.shape[1] != labels.shape[0] and features.shape[0] == labels.shape[0]:
            raise DataError(
                f"{path}: {fkey!r} has shape {features.shape} but {lkey!r} has {labels.shape[0]} labels; "
                "JDA files store one sample per column (dims x samples); transpose the array"
            )
        features = features.T
    if features.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: {fkey!r} has {features.shape[0]} samples but {lkey!r} has {labels.shape[0]} labels; "
            "there must be exactly one label per sample"
        )
    labels = _normalise_labels(path, lkey, labels, label_base, matlab=layout.matlab_labels)
    return Domain(name or f"{path.stem}{suffix}", features, labels, origin=str(path)), layout.matlab_labels


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (recorded in protocols so that results name their exact inputs)."""
    stat = Path(path).stat()
    # Keyed on size and mtime too, so a file rewritten in place is hashed again.
    return _cached_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_of_origins(domains: Mapping[str, Domain]) -> dict[str, Any]:
    """``{"<role>_file": path, "<role>_sha256": hex}`` for each domain whose origin is a file."""
    out: dict[str, Any] = {}
    for role, domain in domains.items():
        if domain.origin and Path(domain.origin).is_file():
            out[f"{role}_file"] = domain.origin
            out[f"{role}_sha256"] = file_sha256(domain.origin)
    return out


def check_pair(source: Domain, target: Domain) -> list[str]:
    """Check that ``source`` and ``target`` can be used together; return notes (not errors).

    Errors (:class:`DataError`): different feature sizes, an unlabelled source or one with a single
    class, a target without labels (they are needed for evaluation, never for training).
    Notes: target classes that the source lacks (allowed: those queries simply have no relevant
    cross-domain items).
    """
    src_where, tgt_where = source.origin or source.name, target.origin or target.name
    if source.dim != target.dim:
        raise DataError(
            f"source {src_where} has {source.dim} features per sample but target {tgt_where} has "
            f"{target.dim}; both domains must be described by the same features (same extractor/codebook)"
        )
    unlabelled = int((source.labels < 0).sum())
    if unlabelled:
        raise DataError(
            f"source {src_where}: {unlabelled} of {source.n} samples have unknown labels (-1); "
            "the source must be fully labelled"
        )
    if source.classes.size < 2:
        raise DataError(
            f"source {src_where}: all samples have a single class ({int(source.classes[0])}); "
            "label-based retrieval needs at least 2 classes in the source"
        )
    unlabelled = int((target.labels < 0).sum())
    if unlabelled:
        raise DataError(
            f"target {tgt_where}: {unlabelled} of {target.n} samples have unknown labels (-1); target "
            "labels are needed to evaluate retrieval (training never sees them)"
        )
    notes: list[str] = []
    missing = np.setdiff1d(target.classes, source.classes)
    if missing.size:
        notes.append(
            f"target classes absent from the source: {missing.tolist()} "
            "(their queries have no relevant cross-domain items)"
        )
    return notes


# ------------------------------------------------------------------------------------------ helpers
def _numeric(path: Path, key: str, value: Any) -> np.ndarray:
    """A plain numeric ndarray from whatever the container returned (dense-ifies sparse matrices)."""
    import scipy.sparse

    if scipy.sparse.issparse(value):
        value = value.toarray()
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise DataError(
            f"{path}: {key!r} is not a numeric array (dtype {array.dtype}); store plain numbers, "
            "not cells, structs or strings"
        )
    return array


def _as_label_vector(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    if labels.ndim == 2 and 1 in labels.shape:
        return labels.reshape(-1)
    if labels.ndim != 1:
        raise DataError(
            f"{path}: {key!r} must be a vector of labels (N, N x 1 or 1 x N), got shape {labels.shape}; "
            "multi-label / one-hot labels are not supported, store one class id per sample"
        )
    return labels


def _normalise_labels(path: Path, key: str, labels: np.ndarray, label_base: LabelBase, matlab: bool) -> np.ndarray:
    """Integer labels, 0-based; -1 (unknown) is kept as it is in either base."""
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all() or not np.array_equal(labels, np.round(labels)):
            bad = int((~finite).sum() + (labels[finite] != np.round(labels[finite])).sum())
            raise DataError(
                f"{path}: {key!r} must hold integer class ids, but {bad} value(s) are not integers "
                "(e.g. scores, probabilities or NaN); store one integer class id per sample"
            )
    labels = labels.astype(np.int64)
    known = labels != UNKNOWN_LABEL
    base: int
    if label_base == "auto":
        base = 1 if matlab and known.any() and int(labels[known].min()) == 1 else 0
    else:
        base = int(label_base)
    if base == 1:
        if known.any() and int(labels[known].min()) < 1:
            raise DataError(
                f"{path}: label_base=1 but {key!r} contains the label {int(labels[known].min())}; "
                "1-based labels start at 1 (use label_base=0 or 'auto')"
            )
        labels = np.where(known, labels - 1, UNKNOWN_LABEL)
    if (labels < UNKNOWN_LABEL).any():
        raise DataError(
            f"{path}: {key!r} contains negative labels ({int(labels.min())}); class ids must be >= 0 "
            "(or -1 for unknown)"
        )
    return labels


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Comma-separated rows, the label in the last column, an optional (non-numeric) header row."""
    with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
        first = handle.readline()
    header = 0
    if first.strip():
        # A header only when *no* field is a number: a data row with one bad field must be an error,
        # not silently dropped as a "header".
        header = int(not any(_is_number(field) for field in first.strip().split(",")))
    try:
        with warnings.catch_warnings():
            # An empty table is reported below as a DataError; numpy's own warning would be noise.
            warnings.filterwarnings("ignore", message=".*input contained no data", category=UserWarning)
            table = np.loadtxt(path, delimiter=",", skiprows=header, ndmin=2, dtype=np.float64, encoding="utf-8-sig")
    except ValueError as exc:
        reason = str(exc).split(";")[0]  # drop numpy's 'use usecols' advice, which does not apply
        raise DataError(
            f"{path}: not a numeric comma-separated table ({reason}); every row after the optional "
            "header must have the same number of numeric fields, the label last"
        ) from exc
    if table.shape[0] == 0:
        raise DataError(f"{path}: the CSV file has no data rows (0 samples)")
    if table.shape[1] < 2:
        raise DataError(
            f"{path}: each CSV row needs at least one feature and the label (last column), "
            f"found {table.shape[1]} column"
        )
    return table[:, :-1], table[:, -1]
