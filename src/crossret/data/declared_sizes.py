"""Declared sizes of MAT v4 / v5 and HDF5 files, checked against the bytes present before anything is read.

scipy and h5py allocate what a file declares (a cell array's element count, a variable's byte count, a
dataset's shape) before they find out whether the bytes are there. The checks here walk the declared
structure first and refuse anything that does not fit in the bytes present, so a corrupt or crafted file
is a :class:`~crossret.errors.DataError` naming it, never gigabytes of memory or a loop over billions of
empty elements:

* :func:`check_mat_sizes` — every element of a MAT v4 / v5 file (compressed v5 variables are inflated
  only up to the size they declare, and at most deflate's maximal ratio of their compressed size);
* :func:`check_hdf5_dataset` — one HDF5 dataset (MAT v7.3 files are HDF5): numeric, stored in the file,
  and no larger than its stored bytes allow;
* :func:`dense_from_sparse` — a scipy sparse matrix made dense only when the result is bounded by the
  file size and by its stored values, after its index structure is checked.

The MAT v5 layout is MathWorks' "MAT-File Format" (level 5); the walk follows the order in which
``scipy.io.loadmat`` reads the elements.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import DataError
from crossret.storage.safe_read import DEFLATE_MAX_RATIO

__all__ = [
    "MAX_DENSE_FROM_SPARSE_BYTES",
    "check_hdf5_dataset",
    "check_mat_sizes",
    "corrupt_file_error",
    "dense_from_sparse",
]


def corrupt_file_error(path: Path, what: str, exc: BaseException | None = None) -> DataError:
    """The :class:`DataError` for a file that is not a valid ``what`` file (``exc``: the parser's error)."""
    detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return DataError(f"{path}: not a valid {what} file{detail}; the file is corrupt or truncated, re-create it")


_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 1, 5, 6, 14, 15, 16
_MX_CELL, _MX_STRUCT, _MX_OBJECT, _MX_CHAR, _MX_SPARSE, _MX_FUNCTION, _MX_OPAQUE = 1, 2, 3, 4, 5, 16, 17
_MX_NUMERIC = frozenset(range(6, 16))  # double, single, int8 ... uint64
# Data types scipy can read a number / a character from. scipy looks the type code up in a fixed
# table without a range check: any other code (0, 8, 10, 11, >= 19, or a small element's 16-bit
# code) reads outside it and crashes the process.
_MI_NUMBERS = (1, 2, 3, 4, 5, 6, 7, 9, 12, 13)  # int8 uint8 int16 uint16 int32 uint32 single double int64 uint64
_MI_TEXT = (1, 2, 4, 16, 17, 18)  # int8 uint8 uint16 utf8 utf16 utf32
_MAT_MAX_DEPTH = 64  # nested cells / structs; MATLAB files in the wild nest a few levels
_MAT_MAX_DIMS = 32  # scipy's limit too
#: Largest dense array made from a sparse matrix: this, or 16 bytes per byte of the file if more.
MAX_DENSE_FROM_SPARSE_BYTES = 1 << 28
_DENSE_FREE_ELEMENTS = 1 << 22  # a sparse matrix this small is made dense whatever its density
_MAX_SPARSITY = 1024  # beyond that, at least one stored value per 1024 entries (one-hot labels of 1024 classes)


class _MatSizeError(Exception):
    """Internal: what is wrong, turned into a DataError naming the file."""


class _MatWalker:
    """Walks the elements of a MAT v5 byte buffer the way scipy reads them (sequentially)."""

    def __init__(self, buf: Any, order: str) -> None:
        self.buf = buf
        self.u32 = np.dtype(order + "u4")
        self.i32 = np.dtype(order + "i4")

    def _u32(self, pos: int, end: int) -> int:
        if pos + 4 > end:
            raise _MatSizeError("an element tag is cut off")
        return int(np.frombuffer(self.buf, self.u32, 1, pos)[0])

    def sub(self, pos: int, end: int, expect: tuple[int, ...] | None = None) -> tuple[int, int, int, int]:
        """A sub-element at ``pos``: ``(mdtype, data_start, nbytes, next_pos)``; small (packed) tags too."""
        first = self._u32(pos, end)
        if first >> 16:  # small data element: type and size in one word, data in the next 4 bytes
            mdtype, nbytes, data, nxt = first & 0xFFFF, first >> 16, pos + 4, pos + 8
            if nbytes > 4:
                raise _MatSizeError(f"a small data element declares {nbytes} bytes (at most 4)")
            if nxt > end:
                raise _MatSizeError("a small data element is cut off")
        else:
            mdtype, nbytes, data = first, self._u32(pos + 4, end), pos + 8
            if data + nbytes > end:
                raise _MatSizeError(f"an element at byte {pos} declares {nbytes} bytes, beyond the {end - data} "
                                    "bytes left in its parent")
            nxt = data + nbytes + (-nbytes % 8)
        if expect is not None and mdtype not in expect:
            raise _MatSizeError(f"an element at byte {pos} has type {mdtype}, expected {expect}")
        return mdtype, data, nbytes, nxt

    def matrix(self, pos: int, end: int, depth: int) -> tuple[int, int]:
        """Check the miMATRIX element at ``pos``; returns ``(next_pos, class)``."""
        if depth > _MAT_MAX_DEPTH:
            raise _MatSizeError(f"cells/structs nested more than {_MAT_MAX_DEPTH} levels deep")
        mdtype, nbytes = self._u32(pos, end), self._u32(pos + 4, end)
        if mdtype != _MI_MATRIX:
            raise _MatSizeError(f"expected a matrix element at byte {pos}, found type {mdtype}")
        start, stop = pos + 8, pos + 8 + nbytes
        if stop > end:
            raise _MatSizeError(f"a matrix at byte {pos} declares {nbytes} bytes, beyond the {end - start} bytes "
                                "left")
        if nbytes == 0:  # an empty matrix
            return stop, 0
        if start + 16 > stop:
            raise _MatSizeError("a matrix is too short for its array flags")
        flags = self._u32(start + 8, stop)
        mclass, is_complex = flags & 0xFF, bool(flags >> 11 & 1)
        p = start + 16
        if mclass in (_MX_OPAQUE, _MX_OBJECT, _MX_FUNCTION) and depth:
            raise _MatSizeError(f"a MATLAB class-{mclass} object (not plain data) inside a cell or struct")
        if mclass == _MX_OPAQUE:
            return stop, mclass  # MATLAB's own objects: only their extent is checked (never loaded)
        _, data, count, p = self.sub(p, stop, (_MI_INT32,))
        if count % 4 or not 1 <= count // 4 <= _MAT_MAX_DIMS:
            raise _MatSizeError(f"a matrix declares {count // 4} dimensions")
        dims = np.frombuffer(self.buf, self.i32, count // 4, data).tolist()
        if min(dims) < 0:
            raise _MatSizeError(f"a matrix declares negative dimensions {dims}")
        length = math.prod(dims)
        p = self.sub(p, stop, (_MI_INT8, _MI_UTF8))[3]  # the name
        if mclass in _MX_NUMERIC:
            p = self.sub(p, stop, _MI_NUMBERS)[3]
            if is_complex:
                p = self.sub(p, stop, _MI_NUMBERS)[3]
        elif mclass == _MX_CHAR:
            p = self.sub(p, stop, _MI_TEXT)[3]
        elif mclass == _MX_SPARSE:
            for _ in range(4 if is_complex else 3):  # row indices, column pointers, values (real, imaginary)
                p = self.sub(p, stop, _MI_NUMBERS)[3]
        elif mclass == _MX_CELL:
            # scipy allocates one object per element before reading them; each takes >= 8 bytes.
            if length * 8 > stop - p:
                raise _MatSizeError(f"a cell array declares {length} elements ({dims}) but only {stop - p} bytes "
                                    "are left for them")
            for _ in range(length):
                p = self.matrix(p, stop, depth + 1)[0]
        elif mclass in (_MX_STRUCT, _MX_OBJECT):
            if mclass == _MX_OBJECT:
                p = self.sub(p, stop, (_MI_INT8, _MI_UTF8))[3]  # class name
            _, data, count, p = self.sub(p, stop, (_MI_INT32,))
            if count != 4:
                raise _MatSizeError("a struct's field-name length is not one int32")
            name_length = int(np.frombuffer(self.buf, self.i32, 1, data)[0])
            _, _, names_bytes, p = self.sub(p, stop, (_MI_INT8, _MI_UTF8))
            if name_length <= 0:
                raise _MatSizeError(f"a struct declares field names of length {name_length}")
            n_fields = names_bytes // name_length
            # Without fields scipy still makes an object array of the declared size.
            needed = length * n_fields * 8 if n_fields else length
            if needed > stop - p:
                raise _MatSizeError(f"a struct array declares {length} elements x {n_fields} fields ({dims}) but "
                                    f"only {stop - p} bytes are left for them")
            for _ in range(length * n_fields):
                p = self.matrix(p, stop, depth + 1)[0]
        elif mclass == _MX_FUNCTION:
            p = self.matrix(p, stop, depth + 1)[0]
        else:
            raise _MatSizeError(f"unknown MATLAB array class {mclass}")
        if p > stop + 7:
            raise _MatSizeError(f"the parts of a matrix at byte {pos} run past its declared end")
        return stop, mclass


def check_mat_sizes(path: str | os.PathLike) -> dict[str, str]:
    """Check every size a MAT v4 / v5 file declares against the bytes present (and, for compressed
    v5 variables, against what deflate can expand to), before scipy reads it.

    Returns ``{variable name: class}`` for variables of MATLAB classes crossret never loads
    (``"object"``, ``"function"``, ``"opaque"``). Raises :class:`DataError` naming the file.
    """
    import mmap

    from scipy.io.matlab import matfile_version

    path = Path(path)
    try:
        major, _minor = matfile_version(str(path))
    except Exception as exc:
        raise corrupt_file_error(path, "MATLAB .mat", exc) from exc
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise _MatSizeError("the file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if major == 0:
                    return _check_mat4(buf, size)
                return _check_mat5(buf, size)
    except _MatSizeError as exc:
        raise DataError(f"{path}: not a valid MATLAB .mat file: {exc}; the file is corrupt or truncated, "
                        "re-create it") from None
    except (OSError, ValueError) as exc:
        raise corrupt_file_error(path, "MATLAB .mat", exc) from exc


def _check_mat5(buf: Any, size: int) -> dict[str, str]:
    if size < 128:
        raise _MatSizeError("the 128-byte header is cut off")
    order = "<" if bytes(buf[126:128]) == b"IM" else ">"  # scipy's rule
    walker = _MatWalker(buf, order)
    unsupported: dict[str, str] = {}
    names = {_MX_OBJECT: "object", _MX_FUNCTION: "function", _MX_OPAQUE: "opaque"}
    pos = 128
    while pos < size:
        mdtype, nbytes = walker._u32(pos, size), walker._u32(pos + 4, size)
        if nbytes == 0:
            raise _MatSizeError(f"a variable at byte {pos} declares 0 bytes")
        end = pos + 8 + nbytes
        if end > size:
            raise _MatSizeError(f"a variable at byte {pos} declares {nbytes} bytes but only {size - pos - 8} are "
                                "left in the file")
        if mdtype == _MI_COMPRESSED:
            inner = _inflate_variable(buf, pos + 8, nbytes, order)
            inner_walker = _MatWalker(inner, order)
            _, mclass = inner_walker.matrix(0, len(inner), 0)
            name = _mat5_name(inner_walker, 0, len(inner), mclass)
        elif mdtype == _MI_MATRIX:
            _, mclass = walker.matrix(pos, end, 0)
            name = _mat5_name(walker, pos, end, mclass)
        else:
            raise _MatSizeError(f"expected a variable (matrix) at byte {pos}, found element type {mdtype}")
        if mclass in names and name is not None:
            unsupported[name] = names[mclass]
        pos = end
    return unsupported


def _mat5_name(walker: _MatWalker, pos: int, end: int, mclass: int) -> str | None:
    """The name of the (already checked) matrix at ``pos``."""
    if mclass in (0, _MX_OPAQUE) or walker._u32(pos + 4, end) == 0:
        return None
    p = walker.sub(pos + 24, end)[3]  # skip the tag, the array flags and the dimensions
    _, data, nbytes, _ = walker.sub(p, end)
    return bytes(walker.buf[data:data + nbytes]).decode("latin1")


def _inflate_variable(buf: Any, start: int, nbytes: int, order: str) -> bytes:
    """Inflate one compressed MAT v5 variable, never beyond the size its inner tag declares."""
    import zlib

    decompressor = zlib.decompressobj()
    try:
        head = decompressor.decompress(bytes(buf[start:start + nbytes]), 8)
        if len(head) < 8:
            raise _MatSizeError("a compressed variable is cut off")
        declared = int(np.frombuffer(head, np.dtype(order + "u4"), 1, 4)[0])
        inner_size = 8 + declared
        if inner_size > nbytes * DEFLATE_MAX_RATIO + 1024:
            raise _MatSizeError(f"a compressed variable of {nbytes} bytes declares {declared} bytes, more than "
                                "deflate can expand to")
        rest = decompressor.decompress(decompressor.unconsumed_tail, inner_size - 8)
    except zlib.error as exc:
        raise _MatSizeError(f"a compressed variable cannot be inflated ({exc})") from None
    data = head + rest
    if len(data) < inner_size:
        raise _MatSizeError(f"a compressed variable holds {len(data) - 8} of the {declared} bytes it declares")
    return data


_MAT4_ITEMSIZE = {0: 8, 1: 4, 2: 4, 3: 2, 4: 2, 5: 1}  # precision code P -> bytes per element


def _check_mat4(buf: Any, size: int) -> dict[str, str]:
    first = bytes(buf[:4])
    # scipy's rule: the first record's type word decides the byte order of the whole file.
    little = len(first) == 4 and 0 <= int.from_bytes(first, "little", signed=True) < 5000
    order = "<" if little else ">"
    header = np.dtype(order + "i4")
    pos = 0
    while pos < size:
        if pos + 20 > size:
            raise _MatSizeError(f"a MAT v4 record header at byte {pos} is cut off")
        mopt, mrows, ncols, imagf, namlen = np.frombuffer(buf, header, 5, pos).tolist()
        if not 0 <= mopt <= 5000 or mopt % 1000 // 100 != 0:
            raise _MatSizeError(f"a MAT v4 record at byte {pos} has an invalid type word {mopt}")
        precision, kind = mopt % 100 // 10, mopt % 10
        if precision not in _MAT4_ITEMSIZE or kind > 2:
            raise _MatSizeError(f"a MAT v4 record at byte {pos} has an unknown type {mopt}")
        if mrows < 0 or ncols < 0 or namlen < 0:
            raise _MatSizeError(f"a MAT v4 record at byte {pos} declares negative sizes")
        data_bytes = mrows * ncols * _MAT4_ITEMSIZE[precision] * (2 if imagf == 1 and kind != 2 else 1)
        end = pos + 20 + namlen + data_bytes
        if end > size:
            raise _MatSizeError(f"a MAT v4 record at byte {pos} declares a {mrows} x {ncols} array "
                                f"({data_bytes} bytes) but only {max(size - pos - 20 - namlen, 0)} are left")
        pos = end
    return {}


def check_hdf5_dataset(path: Path, key: str, dataset: Any) -> None:
    """Refuse a dataset whose declared shape needs more bytes than the file can hold for it."""
    dtype = dataset.dtype
    if dtype.kind not in "fiub":
        raise DataError(
            f"{path}: {key!r} is not a numeric array (dtype {dtype}); store plain numbers, "
            "not cells, structs or strings"
        )
    import h5py

    plist = dataset.id.get_create_plist()
    if plist.get_layout() not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED) \
            or plist.get_external_count():
        raise DataError(f"{path}: dataset {key!r} keeps its data outside the file (external or virtual storage); "
                        "store the arrays in the file itself")
    nbytes = math.prod(dataset.shape or ()) * dtype.itemsize
    if nbytes == 0:
        return
    stored = int(dataset.id.get_storage_size())
    file_size = path.stat().st_size
    filtered = plist.get_nfilters() > 0
    limit = stored * DEFLATE_MAX_RATIO + 1024 if filtered else stored
    if stored > file_size or nbytes > limit:
        raise DataError(
            f"{path}: dataset {key!r} declares shape {dataset.shape} of {dtype} ({nbytes} bytes) but the file "
            f"stores {stored} bytes for it{' (compressed)' if filtered else ''} in {file_size} bytes; the file is "
            "truncated or corrupt, re-create it"
        )


def dense_from_sparse(path: Path, key: str, value: Any) -> Any:
    """``value.toarray()`` of a sparse matrix, refused when the dense array would be far larger than the
    file or than its stored values warrant (a sparse matrix can declare any shape at no cost)."""
    rows, cols = (int(n) for n in value.shape)
    nbytes = rows * cols * value.dtype.itemsize
    try:
        file_size = path.stat().st_size
    except OSError:
        file_size = 0
    limit = max(MAX_DENSE_FROM_SPARSE_BYTES, 16 * file_size)
    stored = int(np.asarray(getattr(value, "data", ())).size)
    if nbytes > limit or rows * cols > max(_DENSE_FREE_ELEMENTS, _MAX_SPARSITY * (stored + 1)):
        raise DataError(
            f"{path}: {key!r} is a sparse {rows} x {cols} matrix with {stored} stored values; as a dense array "
            f"it would take {nbytes} bytes; store the features dense or with fewer rows/columns"
        )
    try:
        # scipy builds a file's sparse matrix without checking its row indices / column pointers, and
        # toarray() reads and writes wherever they point: check the whole structure first (scipy's own
        # check_format skips the pointers of a matrix without stored values).
        if value.format not in ("csc", "csr"):
            value = value.tocsc()
        value.check_format(full_check=True)
        minor = rows if value.format == "csc" else cols
        indptr, indices = np.asarray(value.indptr), np.asarray(value.indices)
        consistent = (indptr.ndim == 1 and indptr.size == (cols if value.format == "csc" else rows) + 1
                      and indptr[0] == 0 and not np.any(np.diff(indptr) < 0)
                      and int(indptr[-1]) == indices.size == np.asarray(value.data).size
                      and (indices.size == 0 or (indices.min() >= 0 and indices.max() < minor)))
        if not consistent:
            raise ValueError("column pointers / row indices out of range or not increasing")
    except Exception as exc:
        raise DataError(f"{path}: {key!r} is a sparse matrix with inconsistent indices ({exc}); the file is "
                        "corrupt, re-create it") from exc
    return value.toarray()
