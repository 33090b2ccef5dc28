"""Feature-file readers: one entry point, :func:`read_domain`, for every supported layout.

The format is detected from the file itself (container by magic bytes and extension, layout by the
variable names inside), so ``crossret run --source FILE --target FILE`` accepts all of them
(docs/benchmarks.md, "Protocols"). Supported layouts:

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
features-only ``features`` (N x d), no labels              ``.npz``; labels unknown (-1)
npy           a bare 2-D float matrix (``.npy``)          labels unknown (-1)
============  ==========================================  ===========================================

A file without labels (the last two rows) is an *unlabelled* domain: every label is -1. It can be
the target of ``crossret fit``; evaluation needs labelled files.

Any layout is accepted in any container (``.npz``, MAT v4/v5, MAT v7.3 = HDF5, plain HDF5);
MATLAB v7.3 arrays are transposed back (h5py sees MATLAB's column-major arrays transposed).
Labels of the MATLAB layouts (couple, jda, surf, decaf) are normalised to 0-based: with
``label_base="auto"`` labels whose smallest known value is 1 are taken as 1-based.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crossret.data.declared_sizes import check_hdf5_dataset, check_mat_sizes, corrupt_file_error, dense_from_sparse
from crossret.data.domain import UNKNOWN_LABEL, Domain
from crossret.errors import ConfigError, DataError
from crossret.limits import check_memory, format_bytes
from crossret.storage.safe_read import load_npz_array, npz_headers, npz_members

Role = Literal["source", "target"]
LabelBase = Literal["auto", 0, 1]

SUPPORTED_EXTENSIONS = (".npz", ".mat", ".h5", ".hdf5", ".csv", ".npy")

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
# ``features`` without ``labels``: an unlabelled domain (labels_key "" = every label -1).
_FEATURES_ONLY = _Layout("features-only", "features", "", "features alone (unlabelled npz)", matlab_labels=False)
_LOOKED_FOR = ", ".join(layout.description for layout in _LAYOUTS)


# ---------------------------------------------------------------------------------------- containers
class _Container:
    """Uniform read access to the named arrays of one file (npz, MAT v5, MAT v7.3, HDF5)."""

    def __init__(self, kind: str, keys: list[str], load: Callable[[str], Any],
                 declared: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> None:
        self.kind = kind  # "npz", "mat-v5", "mat-v7.3", "hdf5"
        self.keys = keys
        self._load = load
        # (shape, dtype) of each array as the file declares it, known without reading the array (npz)
        self.declared = declared or {}

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


def _open_npz(path: Path) -> _Container:
    if _sniff(path) != "zip":
        raise corrupt_file_error(path, ".npz (zip archive)")
    # Member sizes (zip directory) and array shapes (.npy headers) are checked against what the
    # archive holds before anything is read: numpy allocates a member's declared shape up front.
    members = npz_members(path)
    keys = list(members)
    # Shapes and dtypes from the .npy headers (a few bytes of each member): compared before any array
    # is inflated, so a small archive declaring gigabytes is refused by its shapes, not read.
    declared = {key: (header.shape, header.dtype) for key, header in npz_headers(path).items()}

    def load(key: str) -> Any:
        # Reopened per array so that no file handle outlives the call.
        return load_npz_array(path, key)

    return _Container("npz", keys, load, declared)


def _open_mat_v5(path: Path) -> _Container:
    import scipy.io

    classes = check_mat_sizes(path)  # declared sizes first: scipy allocates from them
    try:
        keys = [name for name, _shape, _cls in scipy.io.whosmat(str(path))]
    except Exception as exc:  # scipy raises ValueError/TypeError/MatReadError on foreign bytes
        raise corrupt_file_error(path, "MATLAB .mat", exc) from exc

    def load(key: str) -> Any:
        unsupported = classes.get(key)
        if unsupported:
            raise DataError(f"{path}: {key!r} is a MATLAB {unsupported} object, not a numeric array; store plain "
                            "numbers")
        try:
            # Load one variable at a time: JDA files hold two domains and deep-feature files are large.
            return scipy.io.loadmat(str(path), variable_names=[key])[key]
        except Exception as exc:
            raise corrupt_file_error(path, "MATLAB .mat", exc) from exc

    return _Container("mat-v5", keys, load)


def _open_hdf5(path: Path, matlab: bool) -> _Container:
    import h5py

    what = "MATLAB v7.3 .mat (HDF5)" if matlab else "HDF5"
    try:
        with h5py.File(path, "r") as handle:
            # Only top-level datasets are candidates; MATLAB keeps cell/struct internals in '#refs#'.
            # Hard links only: a soft or external link could lead into another file.
            keys = [k for k in handle if isinstance(handle.get(k, getlink=True), h5py.HardLink)
                    and isinstance(handle.get(k), h5py.Dataset)]
    except Exception as exc:
        raise corrupt_file_error(path, what, exc) from exc

    def load(key: str) -> Any:
        try:
            with h5py.File(path, "r") as handle:
                dataset = handle[key]
                check_hdf5_dataset(path, key, dataset)
                array = np.asarray(dataset[()])
        except DataError:
            raise
        except Exception as exc:
            raise corrupt_file_error(path, what, exc) from exc
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
            raise corrupt_file_error(path, "MATLAB .mat", exc) from exc
        if major == 2:  # v7.3 whose header we did not recognise above
            return _open_hdf5(path, matlab=True)
        return _open_mat_v5(path)
    # .h5 / .hdf5: a MATLAB v7.3 file renamed to .h5 still carries MATLAB's header and transposition.
    if sniffed == "mat-v7.3":
        return _open_hdf5(path, matlab=True)
    if sniffed != "hdf5":
        raise corrupt_file_error(path, "HDF5")
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
    if _FEATURES_ONLY.features_key in present:
        return _FEATURES_ONLY
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
    if ext == ".npy":
        return "npy:npy"
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
    *,
    source_label_base: LabelBase | None = None,
    target_label_base: LabelBase | None = None,
) -> tuple[Domain, Domain, dict[str, int]]:
    """Read a source and a target file with **one** label base decision for the pair.

    Deciding per file is unsafe: a 0-based target that lacks class 0 would look 1-based and every
    label would shift by one. With ``"auto"``, MATLAB-family files are 1-based when the smallest
    known label of the *pair* is 1; if the two files would still be normalised differently (a
    1-based MATLAB file next to a format taken as it is), this is an error asking for an explicit
    ``label_base``. Returns ``(source, target, {"source_label_base": b, "target_label_base": b})``.
    The feature sizes the two files declare are compared before either is read, where the format
    declares them without reading (``.npz``).

    ``source_label_base`` / ``target_label_base`` (``"auto"``, 0 or 1) set one file's base and win over
    ``label_base``. When only one side is ``"auto"``, that side is 1-based when it is a MATLAB-family
    file whose smallest known label is 1. Files without labels (see the module doc) have all labels -1.
    """
    bases_given = {"source": label_base if source_label_base is None else source_label_base,
                   "target": label_base if target_label_base is None else target_label_base}
    for role, base in bases_given.items():
        if base not in ("auto", 0, 1):
            raise ConfigError(f"--{role}-label-base must be auto, 0 or 1, got {base!r}")
    label_base = bases_given["source"] if bases_given["source"] == bases_given["target"] else "mixed"  # type: ignore[assignment]
    declared = {role: _declared_samples(Path(p), role) for role, p in (("source", source_path),
                                                                        ("target", target_path))}
    if declared["source"] is not None and declared["target"] is not None:
        _check_same_dim(source_path, declared["source"][1], target_path, declared["target"][1])
    if label_base == "mixed" or label_base != "auto":
        return _read_with_bases(source_path, target_path, source_name, target_name, bases_given)
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


def _read_with_bases(source_path: str | os.PathLike, target_path: str | os.PathLike, source_name: str | None,
                     target_name: str | None, bases: dict[str, Any]) -> tuple[Domain, Domain, dict[str, int]]:
    """The pair read with one base per file (an ``"auto"`` side decided from its own labels)."""
    domains: dict[str, Domain] = {}
    chosen: dict[str, int] = {}
    for role, path, name in (("source", source_path, source_name), ("target", target_path, target_name)):
        base = bases[role]
        domain, matlab = _read_domain(Path(path), role, name, 0 if base == "auto" else base)  # type: ignore[arg-type]
        if base == "auto":
            known = domain.labels[domain.labels >= 0]
            base = int(matlab and known.size > 0 and int(known.min()) == 1)
            if base:
                domain = Domain(domain.name, domain.features,
                                np.where(domain.labels >= 0, domain.labels - 1, UNKNOWN_LABEL), domain.origin)
        domains[role], chosen[f"{role}_label_base"] = domain, int(base)
    return domains["source"], domains["target"], chosen


def _label_list(classes: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(c)) for c in classes[:limit])
    return f"{{{shown}{', ...' if classes.size > limit else ''}}} ({classes.size} classes)"


def check_label_overlap(source: Domain, target: Domain, *, allow_mismatch: bool = False) -> None:
    """Refuse a pair whose known labels hardly overlap: a label-base slip (0- vs 1-based) or files of two
    different label spaces. With labels on both sides, no shared class, or fewer than half of the source
    classes present in the target, is a :class:`DataError` listing both label sets, unless
    ``allow_mismatch``. A side without known labels is not checked."""
    source_classes, target_classes = source.classes, target.classes
    if allow_mismatch or not source_classes.size or not target_classes.size:
        return
    shared = np.intersect1d(source_classes, target_classes)
    if shared.size * 2 >= source_classes.size:
        return
    what = "share no class" if not shared.size else (
        f"share only {shared.size} of the {source_classes.size} source classes")
    raise DataError(
        f"source {source.origin or source.name} labels {_label_list(source_classes)} and target "
        f"{target.origin or target.name} labels {_label_list(target_classes)} {what}; check the label bases "
        "(--source-label-base / --target-label-base 0 or 1), or pass --allow-class-mismatch if this is intended")


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
    if ext == ".npy":
        return _unlabelled(path, name or path.stem, _read_npy_features(path)), False

    container = _open_container(path, ext)
    layout = _find_layout(path, container.keys)
    if layout is _FEATURES_ONLY:
        return _unlabelled(path, name or path.stem, _features_only(path, container)), False
    fkey, lkey = _layout_keys(path, layout, role)
    suffix = {"source": "/src", "target": "/tar"}.get(role or "", "") if layout.name == "jda" else ""

    _check_declared(path, layout, fkey, lkey, container)
    features = _numeric(path, fkey, container.get(fkey))
    labels = _numeric(path, lkey, container.get(lkey))
    _check_shapes(path, layout, fkey, lkey, features.shape, labels.shape)
    labels = labels.reshape(-1)
    if layout.columns_are_samples:
        features = features.T
    labels = _normalise_labels(path, lkey, labels, label_base, matlab=layout.matlab_labels)
    return Domain(name or f"{path.stem}{suffix}", features, labels, origin=str(path)), layout.matlab_labels


def _unlabelled(path: Path, name: str, features: np.ndarray) -> Domain:
    """A domain of ``features`` whose labels are all unknown (-1)."""
    return Domain(name, features, np.full(features.shape[0], UNKNOWN_LABEL, np.int64), origin=str(path))


def _check_unlabelled_shape(path: Path, key: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise DataError(f"{path}: {key!r} must be a 2-D array (samples x dims), got shape {tuple(shape)}; "
                        "flatten each sample to one row")


def _features_only(path: Path, container: _Container) -> np.ndarray:
    """The ``features`` array of an ``.npz`` without labels (shape and memory checked before reading)."""
    key = _FEATURES_ONLY.features_key
    if key in container.declared:
        shape, dtype = container.declared[key]
        if dtype.kind not in "fiub":
            raise DataError(f"{path}: {key!r} is not a numeric array (dtype {dtype}); store plain numbers")
        _check_unlabelled_shape(path, key, shape)
        check_memory(math.prod(shape) * (dtype.itemsize + 8), f"{path}: {shape[0]} x {shape[1]} features",
                     "use a smaller file or a machine with more memory", error=DataError)
    features = _numeric(path, key, container.get(key))
    _check_unlabelled_shape(path, key, features.shape)
    return features


def _read_npy_features(path: Path) -> np.ndarray:
    """A bare ``.npy`` feature matrix (declared shape checked against the file before reading)."""
    from crossret.storage.safe_read import load_npy

    array = load_npy(path, "features", mmap=True)
    _check_unlabelled_shape(path, "features", array.shape)
    if array.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected a real-valued feature matrix, got dtype {array.dtype}")
    check_memory(array.size * 8, f"{path}: {array.shape[0]} x {array.shape[1]} features",
                 "use a smaller file or a machine with more memory", error=DataError)
    return np.asarray(array)


def _layout_keys(path: Path, layout: _Layout, role: Role | None) -> tuple[str, str]:
    """The (features, labels) keys of ``layout``; a JDA file needs the ``role`` to pick its half."""
    if layout.name != "jda":
        return layout.features_key, layout.labels_key
    if role is None:
        raise DataError(
            f"{path}: this JDA file holds two domains (X_src/Y_src and X_tar/Y_tar); pass "
            "role='source' or role='target' to pick one (on the command line, --source FILE "
            "and --target FILE pick the matching half automatically)"
        )
    return _JDA_KEYS[role]


def _check_shapes(path: Path, layout: _Layout, fkey: str, lkey: str, fshape: tuple[int, ...],
                  lshape: tuple[int, ...]) -> tuple[int, int]:
    """``(samples, dims)`` of a features array and a labels array of these shapes, or the
    :class:`DataError` that says why they do not make a domain (one rule for declared and read shapes)."""
    if len(fshape) != 2:
        raise DataError(
            f"{path}: {fkey!r} must be a 2-D array (samples x dims), got shape {tuple(fshape)}; "
            "flatten each sample to one row"
        )
    if not (len(lshape) == 1 or (len(lshape) == 2 and 1 in lshape)):
        raise DataError(
            f"{path}: {lkey!r} must be a vector of labels (N, N x 1 or 1 x N), got shape {tuple(lshape)}; "
            "multi-label / one-hot labels are not supported, store one class id per sample"
        )
    n_labels = math.prod(lshape)
    rows, dims = fshape
    if layout.columns_are_samples:
        if dims != n_labels and rows == n_labels:
            raise DataError(
                f"{path}: {fkey!r} has shape {tuple(fshape)} but {lkey!r} has {n_labels} labels; "
                "JDA files store one sample per column (dims x samples); transpose the array"
            )
        rows, dims = dims, rows
    if rows != n_labels:
        raise DataError(
            f"{path}: {fkey!r} has {rows} samples but {lkey!r} has {n_labels} labels; "
            "there must be exactly one label per sample"
        )
    return int(rows), int(dims)


def _check_declared(path: Path, layout: _Layout, fkey: str, lkey: str, container: _Container) -> tuple[int, int] | None:
    """Check the shapes and dtypes a container declares for ``fkey``/``lkey`` before reading either
    (see :func:`_check_shapes`), and that the features fit in memory; ``(samples, dims)``, or ``None``
    when the container does not declare them (MAT, HDF5: their readers check declared sizes)."""
    if fkey not in container.declared or lkey not in container.declared:
        return None
    (fshape, fdtype), (lshape, ldtype) = container.declared[fkey], container.declared[lkey]
    for key, dtype in ((fkey, fdtype), (lkey, ldtype)):
        if dtype.kind not in "fiub":
            raise DataError(
                f"{path}: {key!r} is not a numeric array (dtype {dtype}); store plain numbers, "
                "not cells, structs or strings"
            )
    rows, dims = _check_shapes(path, layout, fkey, lkey, fshape, lshape)
    # the array as stored, its float32 copy and the checked copy of that
    check_memory(rows * dims * (fdtype.itemsize + 8) + rows * 8 * 2, f"{path}: {rows} x {dims} features",
                 "use a smaller file or a machine with more memory", error=DataError)
    return rows, dims


def _declared_samples(path: Path, role: Role) -> tuple[int, int] | None:
    """``(samples, dims)`` of the domain a file holds, from declared shapes only (``.npz``); ``None`` when
    the file is not an ``.npz`` archive (its own read reports any problem)."""
    if not path.is_file() or path.suffix.lower() != ".npz" or _sniff(path) != "zip":
        return None
    container = _open_npz(path)
    layout = _find_layout(path, container.keys)
    if layout is _FEATURES_ONLY:
        declared = container.declared.get(layout.features_key)
        if declared is None or len(declared[0]) != 2:
            return None  # the read reports the problem
        return int(declared[0][0]), int(declared[0][1])
    fkey, lkey = _layout_keys(path, layout, role)
    return _check_declared(path, layout, fkey, lkey, container)


def _check_same_dim(source_path: Any, source_dim: int, target_path: Any, target_dim: int) -> None:
    if source_dim != target_dim:
        raise DataError(
            f"source {source_path} has {source_dim} features per sample but target {target_path} has "
            f"{target_dim}; both domains must be described by the same features (same extractor/codebook)"
        )


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
    _check_same_dim(src_where, source.dim, tgt_where, target.dim)
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
            "labels are needed to evaluate retrieval (training never sees them); to adapt to an unlabelled "
            "target without evaluating, use crossret fit"
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
        value = dense_from_sparse(path, key, value)
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise DataError(
            f"{path}: {key!r} is not a numeric array (dtype {array.dtype}); store plain numbers, "
            "not cells, structs or strings"
        )
    return array


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


#: Longest CSV line read: one sample of a million features. Longer means not a CSV file (or no line breaks).
MAX_CSV_LINE_BYTES = 1 << 25
# np.loadtxt's float64 table per byte of text: a value can take 2 bytes ("0,") and becomes 8, plus the
# parser's own copy of the text.
_CSV_BYTES_PER_TEXT_BYTE = 5


def _check_csv_size(path: Path) -> None:
    """Bound what parsing a CSV file allocates before parsing: every line at most
    :data:`MAX_CSV_LINE_BYTES` (found by a streaming scan that holds one block), and the parsed table
    within the available memory."""
    size = path.stat().st_size
    check_memory(size * _CSV_BYTES_PER_TEXT_BYTE, f"{path}: parsing this {format_bytes(size)} CSV file",
                 "convert it to .npz (numpy.savez with arrays 'features' and 'labels')", error=DataError)
    line, run = 1, 0  # the current line's number and its bytes so far
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            breaks = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n"))
            if breaks.size:
                # lengths of the lines this block ends: the current one, then those wholly inside it
                ended = np.diff(breaks, prepend=-1) - 1
                ended[0] += run
                too_long = np.flatnonzero(ended > MAX_CSV_LINE_BYTES)
                if too_long.size:
                    _csv_line_too_long(path, line + int(too_long[0]))
                line, run = line + breaks.size, len(block) - int(breaks[-1]) - 1
            else:
                run += len(block)
            if run > MAX_CSV_LINE_BYTES:
                _csv_line_too_long(path, line)


def _csv_line_too_long(path: Path, line: int) -> None:
    raise DataError(f"{path}: line {line} is longer than {MAX_CSV_LINE_BYTES} bytes; a CSV file holds one sample per "
                    "line (is this a CSV file, with line breaks?)")


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Comma-separated rows, the label in the last column, an optional (non-numeric) header row."""
    _check_csv_size(path)
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

