"""The checksummed container of crossret's binary files: a magic, a JSON header that declares the
payload's size and SHA-256, then the payload. One implementation, parameterised by file type.

Byte layout (integers little-endian), written atomically as one file (:mod:`crossret.storage.atomic`)::

    magic              8 bytes   b"CRSEALED" | b"CRBINIDX" | b"CRDNSIDX" | ...
    container version  uint32
    header length      uint64
    header             UTF-8 JSON, keys sorted: the writer's fields, "payload_bytes", "sha256", "created"
    payload            the serialized object

A :class:`Container` is one file type: its magic, the newest container version it reads (and writes),
the header fields a reader requires, and the wording of its errors. Here :data:`SEALED` (``CRSEALED``)
holds checkpoints and saved methods, with header fields ``kind`` (what the payload is, e.g.
``crossret.couple.checkpoint``) and ``version`` (the payload's own format version), so a reader
refuses a file of another kind or of a newer version with a message naming the file. The search
indexes (:mod:`crossret.retrieval.index`) are two more containers, ``CRBINIDX`` and ``CRDNSIDX``,
whose headers also repeat the container version as ``format_version``.

A reader checks, in this order, before anything is deserialized: the magic (a file of a sibling type
is named as such), the container version, the header (declared length, a JSON object with the
required fields and types), the caller's own header checks, the payload's size against
``payload_bytes`` (a truncated file, or a header that declares more than is present, is refused)
and its SHA-256 against ``sha256`` (an altered file is refused). Every failure is a
:class:`~crossret.errors.FileFormatError` naming the file. :meth:`Container.open` reads the payload
through a bounded view of the file, so a multi-GB checkpoint is never copied into memory to be
checked; :meth:`Container.read` returns the payload's bytes, hashing exactly the bytes it returns.

Torch payloads are loaded with ``torch.load(weights_only=True)``: no arbitrary object is unpickled.

Files written before the container existed (a bare ``torch.save`` / ``numpy.savez`` zip) are still read
by :func:`open_payload`; for them the zip archive's own CRC-32 of every member is verified instead
(``torch.load`` does not check it), which also detects altered bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from crossret.errors import FileFormatError
from crossret.storage.atomic import write_bytes_atomic

__all__ = [
    "CONTAINER_VERSION",
    "MAGIC",
    "PREFIX",
    "SEALED",
    "Container",
    "HeaderCheck",
    "Wording",
    "is_sealed",
    "is_zip_file",
    "load_torch",
    "open_payload",
    "save_torch",
    "seal",
    "verify_zip",
    "write_sealed",
]

PREFIX = struct.Struct("<8sIQ")  # magic, container version, header length
_MAGIC_BYTES = 8
_CHUNK = 16 << 20
_ZIP_MAGIC = b"PK\x03\x04"

#: A reader's own header checks, called after the generic ones: ``check(path, header, container_version)``;
#: it raises :class:`FileFormatError` to refuse the file.
HeaderCheck = Callable[[Path, dict[str, Any], int], None]


@dataclasses.dataclass(frozen=True)
class Wording:
    """The messages that differ between container types (each file type keeps the wording its users
    and tests know). Placeholders: ``{path}``, ``{what}`` (the caller's name for the file), ``{exc}``,
    ``{prefix_bytes}``, ``{version}`` / ``{newest}`` (found / newest readable container version),
    ``{present}`` / ``{declared}`` (payload bytes). The defaults are the :data:`SEALED` wording."""

    missing: str = "{path}: no such {what} file"
    unreadable: str = "{path}: cannot read the {what} ({exc})"
    bad_magic: str = "{path}: not a {what} (not a sealed crossret file: bad magic bytes)"
    short_prefix: str = "{path}: truncated — the file ends inside the {prefix_bytes}-byte prefix"
    newer_version: str = ("{path}: container version {version} is not one this crossret reads (1..{newest}); a newer "
                          "crossret wrote it — upgrade crossret")
    invalid_version: str = newer_version
    short_payload: str = "{path}: truncated — the payload has {present} of its {declared} bytes"
    checksum: str = "{path}: checksum mismatch — the {what} was altered or corrupted"


@dataclasses.dataclass(frozen=True)
class Container:
    """One file type of the container (see the module docstring for the layout).

    ``magic``: 8 bytes. ``version``: the container version written into the prefix; readers accept
    ``1..version``. ``fields``: the header fields a reader requires, ``(name, type)`` checked in order
    (booleans never count as ``int``); ``payload_bytes`` (int) and ``sha256`` (str) must be among them.
    ``version_field``: a header field the writer sets to ``version`` and the reader requires to equal
    the prefix's version (``None``: none). ``max_header_bytes``: a larger declared header length is
    garbage. ``siblings``: ``(magic, message)`` of other crossret file types, so that one given to the
    wrong reader is named (``{path}`` in the message). ``what``: the default name of the file in messages.
    """

    magic: bytes
    version: int
    fields: tuple[tuple[str, type], ...]
    what: str = "crossret file"
    version_field: str | None = None
    max_header_bytes: int = 1 << 20
    siblings: tuple[tuple[bytes, str], ...] = ()
    wording: Wording = Wording()

    def __post_init__(self) -> None:
        if len(self.magic) != _MAGIC_BYTES:
            raise ValueError(f"a container magic is 8 bytes, not {len(self.magic)}")
        declared = dict(self.fields)
        if declared.get("payload_bytes") is not int or declared.get("sha256") is not str:
            raise ValueError("a container's header fields must include payload_bytes (int) and sha256 (str)")
        if self.version_field is not None and declared.get(self.version_field) is not int:
            raise ValueError(f"the version field {self.version_field!r} must be a required int field")

    # -- writing

    def seal(self, header: Mapping[str, Any], payload: bytes) -> bytes:
        """The bytes of a file holding ``payload``: ``header`` plus the payload's size, SHA-256 and the
        time of writing (and ``version_field``), JSON with sorted keys."""
        header = dict(header)
        if self.version_field is not None:
            header[self.version_field] = self.version
        header["payload_bytes"] = len(payload)
        header["sha256"] = hashlib.sha256(payload).hexdigest()
        header["created"] = _created()
        raw = json.dumps(header, sort_keys=True).encode("utf-8")
        return PREFIX.pack(self.magic, self.version, len(raw)) + raw + payload

    def write(self, path: str | os.PathLike, header: Mapping[str, Any], payload: bytes) -> Path:
        """Write :meth:`seal`'s bytes atomically (temporary file, fsync, rename); returns the path."""
        path = Path(path)
        write_bytes_atomic(path, self.seal(header, payload))
        return path

    # -- reading

    def recognises(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` starts with this container's magic (no verification)."""
        return _starts_with(path, self.magic)

    def read_header(self, path: Path, handle: BinaryIO, size: int, *, what: str | None = None,
                    check: HeaderCheck | None = None) -> tuple[dict[str, Any], int]:
        """Parse and check the prefix and header of the ``size``-byte file ``handle`` (read from its
        start); returns ``(header, payload offset)``. The payload itself is not looked at."""
        what = what or self.what
        handle.seek(0)
        prefix = handle.read(PREFIX.size)
        head = prefix[: len(self.magic)]
        if head != self.magic:
            for magic, message in self.siblings:
                if head == magic:
                    raise FileFormatError(message.format(path=path))
            if len(head) < len(self.magic) and self.magic.startswith(head):
                raise FileFormatError(f"{path}: truncated — only {len(head)} bytes")
            raise FileFormatError(self.wording.bad_magic.format(path=path, what=what))
        if len(prefix) < PREFIX.size:
            raise FileFormatError(self.wording.short_prefix.format(path=path, prefix_bytes=PREFIX.size))
        _, version, header_len = PREFIX.unpack(prefix)
        if version > self.version:
            raise FileFormatError(self.wording.newer_version.format(path=path, version=version, newest=self.version))
        if version < 1:
            raise FileFormatError(self.wording.invalid_version.format(path=path, version=version,
                                                                      newest=self.version))
        if header_len > self.max_header_bytes:
            raise FileFormatError(f"{path}: garbage header (declared length {header_len} bytes)")
        raw = handle.read(header_len) if PREFIX.size + header_len <= size else b""
        if len(raw) < header_len:
            raise FileFormatError(f"{path}: truncated — the file ends inside the header")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, integers too long, nesting too deep
            raise FileFormatError(f"{path}: garbage header — not valid UTF-8 JSON ({exc})") from None
        if not isinstance(header, dict):
            raise FileFormatError(f"{path}: garbage header — expected a JSON object")
        for key, kind in self.fields:
            value = header.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise FileFormatError(f"{path}: garbage header — missing or invalid field {key!r}")
        if self.version_field is not None and header[self.version_field] != version:
            raise FileFormatError(f"{path}: header {self.version_field} {header[self.version_field]} disagrees with "
                                  f"the prefix ({version})")
        if check is not None:
            check(path, header, version)
        return header, PREFIX.size + header_len

    def _open(self, path: Path, what: str) -> BinaryIO:
        try:
            return open(path, "rb")  # the callers close it
        except FileNotFoundError:
            raise FileFormatError(self.wording.missing.format(path=path, what=what)) from None
        except OSError as exc:
            raise FileFormatError(self.wording.unreadable.format(path=path, what=what, exc=exc)) from exc

    def _payload_span(self, path: Path, handle: BinaryIO, what: str, check: HeaderCheck | None
                      ) -> tuple[dict[str, Any], int, int]:
        """The checked header, the payload's offset and its declared size, which must be what the file holds."""
        size = os.fstat(handle.fileno()).st_size
        header, start = self.read_header(path, handle, size, what=what, check=check)
        present, declared = size - start, header["payload_bytes"]
        if present < declared:
            raise FileFormatError(self.wording.short_payload.format(path=path, present=present, declared=declared))
        if present > declared:
            raise FileFormatError(f"{path}: {present - declared} unexpected bytes after the payload")
        return header, start, declared

    def read(self, path: str | os.PathLike, *, what: str | None = None, check: HeaderCheck | None = None
             ) -> tuple[dict[str, Any], bytes]:
        """Verify ``path`` and return ``(header, payload bytes)``; the checksum is of the bytes returned.
        The declared sizes are checked against the file's size before the payload is read, so a corrupt
        or foreign file never makes this allocate more than the file holds."""
        path, what = Path(path), what or self.what
        with self._open(path, what) as handle:
            try:
                header, start, declared = self._payload_span(path, handle, what, check)
                handle.seek(start)
                payload = handle.read(declared)
            except OSError as exc:
                raise FileFormatError(self.wording.unreadable.format(path=path, what=what, exc=exc)) from exc
        if len(payload) != declared:  # the file changed while it was read
            raise FileFormatError(self.wording.short_payload.format(path=path, present=len(payload),
                                                                    declared=declared))
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise FileFormatError(self.wording.checksum.format(path=path, what=what))
        return header, payload

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike, *, what: str | None = None, check: HeaderCheck | None = None,
             legacy_zip: bool = False) -> Iterator[tuple[dict[str, Any] | None, BinaryIO]]:
        """Verify ``path`` and yield ``(header, payload stream)``: a read-only, seekable view of the
        payload, hashed in chunks first (never held in memory whole). With ``legacy_zip`` a bare zip
        archive (no container) is accepted after its members' CRC-32s check out; its header is ``None``."""
        path, what = Path(path), what or self.what
        handle = self._open(path, what)
        try:
            try:
                head = handle.read(len(self.magic))
                if head != self.magic and legacy_zip and head.startswith(_ZIP_MAGIC):
                    verify_zip(path, what, handle=handle)
                    handle.seek(0)
                    header, stream = None, handle
                else:
                    header, start, declared = self._payload_span(path, handle, what, check)
                    digest = hashlib.sha256()
                    handle.seek(start)
                    for chunk in iter(lambda: handle.read(_CHUNK), b""):
                        digest.update(chunk)
                    if digest.hexdigest() != header["sha256"]:
                        raise FileFormatError(self.wording.checksum.format(path=path, what=what))
                    stream = _PayloadView(handle, start, declared)
            except OSError as exc:
                raise FileFormatError(self.wording.unreadable.format(path=path, what=what, exc=exc)) from exc
            yield header, stream
        finally:
            handle.close()


def _created() -> str:
    """The time of writing, UTC to the second (recorded in every header)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _starts_with(path: str | os.PathLike, magic: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


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


# ------------------------------------------------------------------------------------------------
# CRSEALED: checkpoints and saved methods, a payload of a named kind and format version

MAGIC = b"CRSEALED"
CONTAINER_VERSION = 1
SEALED = Container(magic=MAGIC, version=CONTAINER_VERSION,
                   fields=(("kind", str), ("version", int), ("payload_bytes", int), ("sha256", str)))


def seal(kind: str, version: int, payload: bytes) -> bytes:
    """``payload`` framed with its kind, version, size and SHA-256 (the bytes of a sealed file)."""
    return SEALED.seal({"kind": kind, "version": int(version)}, payload)


def write_sealed(path: str | os.PathLike, kind: str, version: int, payload: bytes) -> Path:
    """Write a sealed file atomically (temporary file, fsync, rename); returns the path."""
    return SEALED.write(path, {"kind": kind, "version": int(version)}, payload)


def is_sealed(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the sealed-container magic (no verification)."""
    return SEALED.recognises(path)


def _kind_check(kind: str, max_version: int, what: str) -> HeaderCheck:
    """The header check of a sealed payload: of kind ``kind``, format version ``1..max_version``."""

    def check(path: Path, header: dict[str, Any], _container_version: int) -> None:
        if header["kind"] != kind:
            raise FileFormatError(f"{path}: holds a {header['kind']!r}, not a {what} ({kind!r})")
        if header["version"] < 1:
            raise FileFormatError(f"{path}: invalid {what} format version {header['version']}")
        if header["version"] > max_version:
            raise FileFormatError(f"{path}: {what} format version {header['version']} was written by a newer "
                                  f"crossret (this one reads up to {max_version}); upgrade crossret to load it")

    return check


@contextlib.contextmanager
def open_payload(path: str | os.PathLike, kind: str, max_version: int, what: str = "crossret file",
                 *, legacy: bool = True) -> Iterator[tuple[dict[str, Any] | None, BinaryIO]]:
    """Verify the sealed file ``path`` and yield ``(header, payload stream)``.

    The file is checked for kind, version, size and SHA-256 before the stream is handed out. With
    ``legacy`` a pre-container zip file is accepted after its CRC-32s check out; its header is ``None``.
    Every failure is a :class:`FileFormatError` naming the file.
    """
    with SEALED.open(path, what=what, check=_kind_check(kind, max_version, what), legacy_zip=legacy) as opened:
        yield opened


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
