"""Hardened readers for files crossret did not necessarily write: ``.npy`` / ``.npz`` arrays, JSON and YAML.

What a file *declares* (array shapes, zip member sizes) is checked against what it *holds* before
anything is allocated, so a few corrupt or crafted bytes can never make a reader allocate gigabytes.
Nothing is unpickled. Errors name the file and say what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import CrossretError, DataError, FileFormatError

__all__ = [
    "DEFLATE_MAX_RATIO",
    "NpyHeader",
    "check_npy_file",
    "check_zip_member",
    "load_npy",
    "load_npz_array",
    "npz_headers",
    "npz_members",
    "read_json_file",
    "read_npy_header",
    "read_yaml_mapping",
]


def read_yaml_mapping(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A YAML file that must hold a mapping (a run's ``config.yaml``); clear :class:`FileFormatError`
    naming the file when it cannot be read, parsed, or is not a mapping."""
    import yaml


    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())  # one line: YAML errors span several
        raise FileFormatError(f"{path}: cannot read {what} ({reason})") from exc
    except RecursionError:  # "[[[[..." nested deeper than the parser's stack
        raise FileFormatError(f"{path}: cannot read {what} (nested too deeply)") from None
    if not isinstance(data, dict):
        raise FileFormatError(f"{path}: not a {what} (expected a mapping)")
    return data


def load_npy(path: str | os.PathLike, what: str, *, mmap: bool = False, missing: str | None = None,
             hint: str = "") -> np.ndarray:
    """One ``.npy`` array (never pickles; memory-mapped read-only with ``mmap``), with errors that name
    ``what`` and the file: :class:`DataError` when it is missing (``missing`` replaces the message) or
    unreadable (``hint`` is appended), or holds an ``.npz`` archive instead of one array."""

    path = Path(path)
    if not path.is_file():
        raise DataError(missing or f"{what}: file not found: {path}")
    try:
        with open(path, "rb") as handle:
            if handle.read(4) in (b"PK\x03\x04", b"PK\x05\x06"):
                raise DataError(f"{what}: {path} is not a single-array .npy file")
            handle.seek(0)
            # Declared shape against the file size first: np.load allocates the declared shape.
            read_npy_header(handle, f"{what}: {path}", os.fstat(handle.fileno()).st_size)
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except DataError as exc:
        if hint:
            raise DataError(f"{exc}{hint}") from exc
        raise
    except (ValueError, OSError, EOFError, MemoryError) as exc:
        raise DataError(f"{what}: {path} is not a readable .npy file ({exc}){hint}") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise DataError(f"{what}: {path} is not a single-array .npy file")
    return array


#: The largest expansion of a deflate stream: one 2-bit code can stand for 258 bytes, ~1032:1.
DEFLATE_MAX_RATIO = 1032
_DEFLATE_SLACK = 1024  # block headers and the end of the stream


class NpyHeader:
    """The header of one ``.npy`` array: ``shape``, ``fortran_order``, ``dtype``, ``header_bytes``
    (bytes before the data) and ``nbytes`` (bytes of data the header declares)."""

    __slots__ = ("dtype", "fortran_order", "header_bytes", "shape")

    def __init__(self, shape: tuple[int, ...], fortran_order: bool, dtype: np.dtype, header_bytes: int) -> None:
        self.shape = shape
        self.fortran_order = fortran_order
        self.dtype = dtype
        self.header_bytes = header_bytes

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"NpyHeader(shape={self.shape}, dtype={self.dtype}, fortran_order={self.fortran_order})"


def read_npy_header(handle: Any, where: str, available: int | None, *, error: type[Exception] | None = None,
                    allow_objects: bool = False) -> NpyHeader:
    """Parse the ``.npy`` header at the current position of the binary file object ``handle`` and
    check it against the ``available`` bytes of this array (header included; ``None`` skips the
    size check). ``where`` starts every message (e.g. ``"features: /data/x.npy"``); ``error`` is
    the exception class (default :class:`~crossret.errors.DataError`).

    Refused: bytes that are not an ``.npy`` header, negative dimensions, Python-object dtypes (they
    need pickle; unless ``allow_objects``), zero-size elements, and a declared data size larger
    than what is present. Nothing is allocated from the declared shape.
    """

    error = error or DataError
    fmt = np.lib.format
    start = handle.tell()
    try:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = fmt.read_array_header_1_0(handle)
        elif version in ((2, 0), (3, 0)):
            # Version 3 is version 2 with a UTF-8 header; only structured field names can differ and
            # they do not change sizes.
            shape, fortran_order, dtype = fmt.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        header_bytes = handle.tell() - start
    except Exception as exc:  # numpy raises ValueError/EOFError/SyntaxError/... for foreign bytes
        raise error(f"{where}: not a valid .npy array ({type(exc).__name__}: {exc}); the file is corrupt, "
                    "truncated or not written by numpy.save") from exc
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise error(f"{where}: the .npy header declares negative dimensions {shape}; the file is corrupt")
    if dtype.hasobject and not allow_objects:
        raise error(f"{where}: the array holds Python objects (dtype {dtype}), which need pickle; crossret never "
                    "unpickles (it can run arbitrary code): save plain numeric arrays")
    header = NpyHeader(shape, bool(fortran_order), dtype, header_bytes)
    if dtype.itemsize == 0 and header.count:
        raise error(f"{where}: the .npy header declares {header.count} elements of size 0 (dtype {dtype}); "
                    "the file is corrupt")
    if available is not None and header.nbytes > available - header_bytes:
        present = max(available - header_bytes, 0)
        raise error(f"{where}: the .npy header declares shape {shape} of {dtype} ({header.nbytes} bytes) but only "
                    f"{present} bytes of data are present; the file is truncated or corrupt")
    return header


def check_npy_file(path: str | os.PathLike, where: str | None = None, *,
                   error: type[Exception] | None = None, allow_objects: bool = False) -> NpyHeader:
    """:func:`read_npy_header` of the ``.npy`` file at ``path``, checked against the file's size."""
    path = Path(path)
    where = where or str(path)

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return read_npy_header(handle, where, size, error=error, allow_objects=allow_objects)
    except OSError as exc:
        raise (error or DataError)(f"{where}: cannot read the file ({exc})") from exc


def check_zip_member(info: Any, archive_size: int, where: str, *, error: type[Exception] | None = None) -> None:
    """Check the sizes a zip archive declares for one member (a :class:`zipfile.ZipInfo`) before it
    is read: the compressed bytes must lie inside the archive and the uncompressed size must be
    reachable from them (equal for stored members, at most deflate's maximum ratio for deflated
    ones). Encrypted members and other compression methods are refused."""


    error = error or DataError
    name = info.filename
    if info.flag_bits & 0x1:
        raise error(f"{where}: member {name!r} is encrypted; crossret reads plain numpy.savez archives only")
    if info.header_offset < 0 or info.header_offset + info.compress_size > archive_size:
        raise error(f"{where}: member {name!r} declares {info.compress_size} compressed bytes at offset "
                    f"{info.header_offset}, beyond the end of the {archive_size}-byte archive; the file is truncated "
                    "or corrupt")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise error(f"{where}: member {name!r} is stored uncompressed but declares {info.file_size} bytes "
                        f"for {info.compress_size} stored bytes; the file is corrupt")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > info.compress_size * DEFLATE_MAX_RATIO + _DEFLATE_SLACK:
            raise error(f"{where}: member {name!r} declares {info.file_size} bytes uncompressed from "
                        f"{info.compress_size} compressed bytes, more than deflate can expand to; the file is "
                        "corrupt")
    else:
        raise error(f"{where}: member {name!r} uses zip compression method {info.compress_type}; crossret reads "
                    "archives written by numpy.savez / numpy.savez_compressed (stored or deflated) only")


def npz_members(path: str | os.PathLike, where: str | None = None, *,
                error: type[Exception] | None = None) -> dict[str, Any]:
    """The members of an ``.npz`` archive as ``{key: ZipInfo}`` (keys without ``.npy``, as
    ``numpy.load`` names them), every member's declared sizes checked (:func:`check_zip_member`)."""


    path = Path(path)
    where = where or str(path)
    error = error or DataError
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except CrossretError:
        raise
    except Exception as exc:  # BadZipFile, OSError, struct.error, MemoryError, ... on foreign bytes
        raise error(f"{where}: not a valid .npz (zip) archive ({type(exc).__name__}: {exc}); the file is corrupt "
                    "or truncated") from exc
    members: dict[str, Any] = {}
    for info in infos:
        check_zip_member(info, size, where, error=error)
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        members[key] = info
    return members


def npz_headers(path: str | os.PathLike, where: str | None = None, *,
                error: type[Exception] | None = None) -> dict[str, NpyHeader]:
    """The ``.npy`` headers (shape, dtype) of every array of an ``.npz`` archive, read without
    inflating the arrays: only each member's first bytes are decompressed. Every member's declared
    sizes are checked (:func:`check_zip_member`) and every shape against its member's size
    (:func:`read_npy_header`), so callers can compare shapes across arrays and files before reading
    any of them. Members that are not ``.npy`` arrays are left out."""


    path = Path(path)
    where = where or str(path)
    error = error or DataError
    members = npz_members(path, where, error=error)
    headers: dict[str, NpyHeader] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for key, info in members.items():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    headers[key] = read_npy_header(member, f"{where}: array {key!r}", info.file_size, error=error)
    except CrossretError:
        raise
    except Exception as exc:  # zlib.error, BadZipFile, EOFError, ... on corrupt members
        raise error(f"{where}: cannot read the array headers ({type(exc).__name__}: {exc}); the file is corrupt or "
                    "truncated") from exc
    return headers


def load_npz_array(path: str | os.PathLike, key: str, where: str | None = None, *,
                   error: type[Exception] | None = None) -> np.ndarray:
    """One array of an ``.npz`` archive, never pickled, with every declared size checked first: the
    member's sizes in the zip directory (:func:`check_zip_member`) and the shape in its ``.npy``
    header against the member's uncompressed size (:func:`read_npy_header`). Only then is the
    array read (numpy allocates the declared shape before reading a zip member)."""


    path = Path(path)
    where = where or str(path)
    error = error or DataError
    members = npz_members(path, where, error=error)
    if key not in members:
        raise error(f"{where}: no array {key!r} in the archive (arrays: {', '.join(sorted(members)) or 'none'})")
    info = members[key]
    if not info.filename.endswith(".npy"):
        raise error(f"{where}: member {info.filename!r} is not a .npy array; save arrays with numpy.savez")
    try:
        with zipfile.ZipFile(path) as archive, archive.open(info) as member:
            header = read_npy_header(member, f"{where}: array {key!r}", info.file_size, error=error)
            data = np.empty(header.count, dtype=header.dtype)
            raw = data.view(np.uint8).reshape(-1) if header.count else np.empty(0, np.uint8)
            done = 0
            while done < header.nbytes:
                chunk = member.read(min(header.nbytes - done, 1 << 22))
                if not chunk:
                    raise error(f"{where}: array {key!r} ends after {done} of its {header.nbytes} bytes; the file "
                                "is truncated or corrupt")
                raw[done:done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                done += len(chunk)
    except CrossretError:
        raise
    except Exception as exc:  # zlib.error, BadZipFile (CRC), EOFError, ... on corrupt members
        raise error(f"{where}: cannot read array {key!r} ({type(exc).__name__}: {exc}); the file is corrupt or "
                    "truncated") from exc
    return data.reshape(header.shape, order="F" if header.fortran_order else "C")


def read_json_file(path: str | os.PathLike, what: str, *, error: type[Exception] | None = None,
                   max_bytes: int | None = None) -> Any:
    """Parse a UTF-8 JSON file; any failure (unreadable, not UTF-8, invalid, nested too deeply, integers
    too long, larger than ``max_bytes``) is one ``error`` (default FileFormatError) naming the file."""

    path = Path(path)
    error = error or FileFormatError
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            text = None
        else:
            text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from exc
    if text is None:
        raise error(f"{path}: {what} is {size} bytes, more than the {max_bytes} expected; it is not a crossret file")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are too-long integers
        raise error(f"{path}: {what} is not valid JSON ({type(exc).__name__}: {exc})") from exc
