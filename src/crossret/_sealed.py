"""Sealed files: a versioned, checksummed container around one payload (a ``torch.save`` or numpy archive).

Checkpoints and saved methods are written as one file, atomically (:mod:`crossret._io`)::

    magic              8 bytes   b"CRSEALED"
    container version  uint32 little-endian (currently 1)
    header length      uint64 little-endian
    header             UTF-8 JSON {"kind", "version", "payload_bytes", "sha256", "created"}
    payload            the serialized object

``kind`` names what the payload is (``crossret.couple.checkpoint``, ...) and ``version`` its own format
version, so a reader refuses a file of another kind or of a newer version with a message naming the file.
Before anything is deserialized the payload's size is compared with ``payload_bytes`` (a truncated file,
or a header that declares more than is present, is refused) and its SHA-256 with ``sha256`` (an altered
file is refused). Payloads are read through a bounded view of the file, so a multi-GB checkpoint is
never copied into memory to be checked.

Torch payloads are loaded with ``torch.load(weights_only=True)``: no arbitrary object is unpickled.

Files written before the container existed (a bare ``torch.save`` / ``numpy.savez`` zip) are still read;
for them the zip archive's own CRC-32 of every member is verified instead (``torch.load`` does not check
it), which also detects altered bytes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from crossret._io import write_bytes_atomic
from crossret.errors import FileFormatError

__all__ = [
    "CONTAINER_VERSION",
    "MAGIC",
    "is_sealed",
    "is_zip_file",
    "load_torch",
    "open_payload",
    "save_torch",
    "seal",
    "verify_zip",
    "write_sealed",
]

MAGIC = b"CRSEALED"
CONTAINER_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, container version, header length
_MAX_HEADER_BYTES = 1 << 20  # a header is ~200 bytes; a larger declared length is garbage
_CHUNK = 16 << 20
_ZIP_MAGIC = b"PK\x03\x04"


def seal(kind: str, version: int, payload: bytes) -> bytes:
    """``payload`` framed with its kind, version, size and SHA-256 (the bytes of a sealed file)."""
    header = {
        "kind": kind,
        "version": int(version),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    raw = json.dumps(header, sort_keys=True).encode("utf-8")
    return _PREFIX.pack(MAGIC, CONTAINER_VERSION, len(raw)) + raw + payload


def write_sealed(path: str | os.PathLike, kind: str, version: int, payload: bytes) -> Path:
    """Write a sealed file atomically (temporary file, fsync, rename); returns the path."""
    path = Path(path)
    write_bytes_atomic(path, seal(kind, version, payload))
    return path


def _starts_with(path: str | os.PathLike, magic: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def is_sealed(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the sealed-container magic (no verification)."""
    return _starts_with(path, MAGIC)


class _PayloadView(io.RawIOBase):
    """Read-only, seekable window ``[offset, offset + length)`` of an open file; looks like a whole file
    to ``torch.load`` / ``zipfile`` / ``numpy.load`` (positions are relative to the payload start)."""

    def __init__(self, handle: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self._handle, self._offset, self._length, self._pos = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise OSError("seek before the start of the payload")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        if count == 0:
            return 0
        self._handle.seek(self._offset + self._pos)
        got = self._handle.readinto(view[:count]) or 0
        self._pos += got
        return got


def _read_header(path: Path, handle: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    prefix = handle.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise FileFormatError(f"{path}: truncated — the file ends inside the {_PREFIX.size}-byte prefix")
    magic, container, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FileFormatError(f"{path}: not a sealed crossret file (bad magic bytes)")
    if container < 1 or container > CONTAINER_VERSION:
        raise FileFormatError(f"{path}: container version {container} is not one this crossret reads "
                              f"(1..{CONTAINER_VERSION}); a newer crossret wrote it — upgrade crossret")
    if header_len > _MAX_HEADER_BYTES:
        raise FileFormatError(f"{path}: garbage header (declared length {header_len} bytes)")
    if _PREFIX.size + header_len > size:
        raise FileFormatError(f"{path}: truncated — the file ends inside the header")
    try:
        header = json.loads(handle.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: garbage header — not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: garbage header — expected a JSON object")
    for key, kind in (("kind", str), ("version", int), ("payload_bytes", int), ("sha256", str)):
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise FileFormatError(f"{path}: garbage header — missing or invalid field {key!r}")
    return header, _PREFIX.size + header_len


def _check_kind(path: Path, header: dict[str, Any], kind: str, max_version: int, what: str) -> None:
    if header["kind"] != kind:
        raise FileFormatError(f"{path}: holds a {header['kind']!r}, not a {what} ({kind!r})")
    if header["version"] < 1:
        raise FileFormatError(f"{path}: invalid {what} format version {header['version']}")
    if header["version"] > max_version:
        raise FileFormatError(f"{path}: {what} format version {header['version']} was written by a newer crossret "
                              f"(this one reads up to {max_version}); upgrade crossret to load it")


@contextlib.contextmanager
def open_payload(path: str | os.PathLike, kind: str, max_version: int, what: str = "crossret file",
                 *, legacy: bool = True) -> Iterator[tuple[dict[str, Any] | None, BinaryIO]]:
    """Verify ``path`` and yield ``(header, payload stream)``.

    A sealed file is checked for kind, version, size and SHA-256 before the stream is handed out. With
    ``legacy`` a pre-container zip file is accepted after its CRC-32s check out; its header is ``None``.
    Every failure is a :class:`FileFormatError` naming the file.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")  # closed in the finally below, after the caller is done
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read the {what} ({exc})") from exc
    try:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(len(MAGIC))
        handle.seek(0)
        if head != MAGIC:
            if legacy and head.startswith(_ZIP_MAGIC):
                verify_zip(path, what, handle=handle)
                handle.seek(0)
                yield None, handle
                return
            if len(head) < len(MAGIC) and MAGIC.startswith(head):
                raise FileFormatError(f"{path}: truncated — only {len(head)} bytes")
            raise FileFormatError(f"{path}: not a {what} (not a sealed crossret file: bad magic bytes)")
        header, start = _read_header(path, handle, size)
        _check_kind(path, header, kind, max_version, what)
        present, declared = size - start, header["payload_bytes"]
        if present < declared:
            raise FileFormatError(f"{path}: truncated — the payload has {present} of its {declared} bytes")
        if present > declared:
            raise FileFormatError(f"{path}: {present - declared} unexpected bytes after the payload")
        digest = hashlib.sha256()
        handle.seek(start)
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
        if digest.hexdigest() != header["sha256"]:
            raise FileFormatError(f"{path}: checksum mismatch — the {what} was altered or corrupted")
        yield header, _PayloadView(handle, start, declared)
    finally:
        handle.close()


def is_zip_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a zip archive (``torch.save``'s default format since torch 1.6)."""
    return _starts_with(path, _ZIP_MAGIC)


def verify_zip(path: str | os.PathLike, what: str = "file", *, handle: BinaryIO | None = None) -> None:
    """Check every member's CRC-32 of a zip archive (``torch.save`` / ``numpy.savez`` output)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(handle if handle is not None else path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            zlib.error, RuntimeError) as exc:  # RuntimeError: an encrypted member
        raise FileFormatError(f"{path}: the {what} is corrupt or truncated (not a readable zip archive: "
                              f"{exc})") from exc
    if bad is not None:
        raise FileFormatError(f"{path}: checksum mismatch in member {bad!r} — the {what} was altered or corrupted")


def save_torch(path: str | os.PathLike, obj: Any, kind: str, version: int) -> Path:
    """``torch.save(obj)`` into a sealed file, atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_sealed(path, kind, version, buffer.getvalue())


def load_torch(path: str | os.PathLike, kind: str, max_version: int, what: str = "checkpoint",
               *, legacy: bool = True) -> Any:
    """Inverse of :func:`save_torch`: verify, then ``torch.load(weights_only=True, map_location="cpu")``."""
    import torch

    path = Path(path)
    with open_payload(path, kind, max_version, what, legacy=legacy) as (_, stream):
        try:
            return torch.load(stream, map_location="cpu", weights_only=True)
        except Exception as exc:  # untrusted bytes behind a valid checksum: still only a format error
            raise FileFormatError(f"{path}: cannot deserialize the {what} ({type(exc).__name__}: "
                                  f"{str(exc)[:300]})") from exc
