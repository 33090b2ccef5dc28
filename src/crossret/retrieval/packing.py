"""Binary codes: ±1 <-> packed bytes. The one place that knows the bit layout.

Conventions (every module that packs, pads or reads codes follows them):

* Codes are ±1 while learning; ``sign(0) = +1`` (never 0).
* A packed code is a row of ``ceil(L / 8)`` uint8 bytes in **faiss's bit order**: bit ``j`` of the
  code is bit ``j % 8`` (least significant first) of byte ``j // 8``; a ``+1`` (or ``1``) is a set bit.
* For search, rows are zero-padded to a multiple of 64 bits. Padding bits are 0 in every code, so
  Hamming distances are unchanged and the 64-bit kernels apply.

:func:`as_packed` is the one entry point for input that may be either codes or packed codes.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from crossret.errors import CodeError, DataError

BIT_ORDER = "lsb-first"  # recorded in saved indexes; the only order crossret writes
WORD_BITS = 64
_MAX_PAD_MULTIPLE = 4096  # pad_packed's granularity: SIMD widths are 64 to 512 bits


def packed_width(bits: int) -> int:
    """Bytes per packed code of ``bits`` bits."""
    bits = _check_bits(bits)
    return (bits + 7) // 8


def padded_bits(bits: int) -> int:
    """Code length rounded up to a multiple of 64 (the width used for search)."""
    bits = _check_bits(bits)
    return -(-bits // WORD_BITS) * WORD_BITS


def binarize(values: np.ndarray) -> np.ndarray:
    """Real values -> ±1 int8 codes with ``sign(0) = +1``. Shape is kept. NaN is an error."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise CodeError(f"cannot binarize: expected real numbers, got dtype {values.dtype}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise CodeError("cannot binarize: the values contain NaN or inf")
    return np.where(values >= 0, 1, -1).astype(np.int8)


def as_pm1(codes: np.ndarray, *, name: str = "codes") -> np.ndarray:
    """Validate a 2-D code matrix of ±1 or {0,1} (or bool) values and return it as ±1 int8.

    A matrix holding only 1s is read as ±1 (all +1). Anything else (e.g. 2, 0.5, NaN, a mix of
    -1, 0 and 1) raises :class:`CodeError` naming ``name``.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise CodeError(f"{name}: expected a 2-D array (items x bits), got shape {codes.shape}")
    if codes.shape[1] == 0:
        raise CodeError(f"{name}: code length is 0")
    if codes.dtype == bool:
        return np.where(codes, 1, -1).astype(np.int8)
    if codes.dtype.kind not in "iuf":
        raise CodeError(f"{name}: expected numeric codes, got dtype {codes.dtype}")
    if codes.size == 0:
        return np.empty(codes.shape, dtype=np.int8)
    if codes.dtype.kind == "f" and not np.isfinite(codes).all():
        raise CodeError(f"{name}: contains NaN or inf; codes must be ±1 or 0/1")
    values = np.unique(codes)
    if np.isin(values, (-1, 1)).all():
        return codes.astype(np.int8)
    if np.isin(values, (0, 1)).all():
        return np.where(codes > 0, 1, -1).astype(np.int8)
    shown = ", ".join(str(v) for v in values[:6].tolist())
    raise CodeError(
        f"{name}: values must be all ±1 or all 0/1, found {shown}{' ...' if values.size > 6 else ''}; "
        "binarize real-valued outputs first (crossret.retrieval.packing.binarize)"
    )


def pack_codes(codes: np.ndarray, *, name: str = "codes") -> np.ndarray:
    """Pack ±1 or {0,1} codes ``(N, L)`` into uint8 ``(N, ceil(L/8))``, faiss bit order (errors name
    ``name``)."""
    pm1 = as_pm1(codes, name=name)
    return np.packbits(pm1 > 0, axis=1, bitorder="little")


def as_packed(codes: Any, bits: int | None = None, *, name: str = "codes",
              origin: Literal["api", "cli"] = "api") -> tuple[np.ndarray, int]:
    """Codes or packed codes -> ``(packed uint8 (N, >= ceil(L/8)), L)``.

    ``codes`` is a code matrix ``(N, L)`` of ±1, {0,1} or bool values (packed here, ``L`` its width)
    or, when ``bits`` gives ``L``, packed uint8 rows of ``ceil(L/8)`` bytes or zero-padded to 64 bits
    (checked by :func:`check_packed`, returned as they are). Errors name ``name``. ``origin`` says
    where the array came from, which decides how a uint8 array is read when ``bits`` is given:

    ``"api"`` (an array passed to a function): uint8 is packed. Errors are :class:`CodeError`.
    ``"cli"`` (a ``.npy`` named on the command line, where 0/1 codes are often stored as uint8):
    uint8 with exactly ``bits`` columns is a 0/1 code matrix, any other width packed codes. The
    array must be 2-D and a code matrix ``bits`` wide (:class:`DataError`); uint8 values above 1
    without ``bits`` are packed codes whose length is unknown, an error that names ``--bits``.
    """
    if origin not in ("api", "cli"):
        raise ValueError(f"origin must be 'api' or 'cli', got {origin!r}")
    array = np.asarray(codes)
    if origin == "api":
        if bits is not None and array.dtype == np.uint8:
            return check_packed(array, bits, allow_padding=True, name=name), int(bits)
        pm1 = as_pm1(array, name=name)
        length = pm1.shape[1]
        if bits is not None and length != bits:
            raise CodeError(f"{name}: rows have {length} bits but bits={bits} was given")
        return pack_codes(pm1), length
    if array.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array of codes (one row per item), got shape {array.shape}")
    if bits is not None and array.dtype == np.uint8 and array.shape[1] != bits:
        return check_packed(array, bits, allow_padding=True, name=name), int(bits)
    if bits is not None and array.shape[1] != bits:
        raise DataError(f"{name}: codes have {array.shape[1]} bits but {bits} were expected; code lengths "
                        "must match")
    if array.dtype == np.uint8 and array.size and int(array.max()) > 1:
        raise DataError(f"{name}: holds uint8 values above 1, i.e. packed codes; pass --bits L to read them")
    return pack_codes(array, name=name), int(array.shape[1])


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 ``(N, >= ceil(L/8))`` -> ±1 int8 ``(N, L)``."""
    bits = _check_bits(bits)
    packed = check_packed(packed, bits, allow_padding=True)
    unpacked = np.unpackbits(packed, axis=1, count=bits, bitorder="little")
    return (unpacked.astype(np.int8) * 2 - 1).astype(np.int8)


def pad_packed(packed: np.ndarray, bits: int, multiple_bits: int = WORD_BITS) -> np.ndarray:
    """Zero-pad packed codes to a multiple of ``multiple_bits`` (default 64). No copy if aligned."""
    bits = _check_bits(bits)
    if isinstance(multiple_bits, bool) or not isinstance(multiple_bits, (int, np.integer)) \
            or not 8 <= multiple_bits <= _MAX_PAD_MULTIPLE or multiple_bits % 8:
        raise CodeError(f"multiple_bits must be a multiple of 8 between 8 and {_MAX_PAD_MULTIPLE}, got "
                        f"{multiple_bits!r}")
    multiple_bits = int(multiple_bits)
    packed = check_packed(packed, bits, allow_padding=True)
    width = -(-bits // multiple_bits) * multiple_bits // 8
    if packed.shape[1] == width:
        return np.ascontiguousarray(packed)
    if packed.shape[1] > width:
        return np.ascontiguousarray(packed[:, :width])
    out = np.zeros((packed.shape[0], width), dtype=np.uint8)
    out[:, : packed.shape[1]] = packed
    return out


def packed_to_words(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed codes -> uint64 words ``(N, ceil(L/64))`` (little-endian view of the padded bytes).

    Bit ``j`` of the code is bit ``j % 64`` of word ``j // 64`` on little-endian machines.
    """
    padded = pad_packed(packed, bits)
    words = padded.view("<u8")
    return words if words.dtype.isnative else words.astype(np.uint64)


def check_packed(packed: np.ndarray, bits: int, *, allow_padding: bool = False,
                 name: str = "packed codes") -> np.ndarray:
    """Check that ``packed`` is a uint8 ``(N, ceil(bits/8))`` array whose unused bits are zero.

    With ``allow_padding`` the row may be wider (zero bytes up to a multiple of 64 bits).
    """
    bits = _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise CodeError(f"{name}: expected uint8 packed codes, got dtype {packed.dtype}; use pack_codes()")
    if packed.ndim != 2:
        raise CodeError(f"{name}: expected a 2-D array (items x bytes), got shape {packed.shape}")
    width = (bits + 7) // 8
    if packed.shape[1] != width and not (allow_padding and packed.shape[1] >= width):
        raise CodeError(
            f"{name}: rows have {packed.shape[1]} bytes but a {bits}-bit code takes {width}; "
            "the code lengths do not match"
        )
    if packed.shape[0]:
        if bits % 8 and np.any(packed[:, width - 1] >> (bits % 8)):
            raise CodeError(f"{name}: bits beyond the declared {bits}-bit length are set")
        if packed.shape[1] > width and np.any(packed[:, width:]):
            raise CodeError(f"{name}: padding bytes beyond the declared {bits}-bit length are not zero")
    return packed


def _check_bits(bits: int) -> int:
    """``bits`` as a Python int (numpy integer types would overflow in the width arithmetic)."""
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, (bool, np.bool_)) or bits <= 0:
        raise CodeError(f"code length must be a positive integer, got {bits!r}")
    return int(bits)
