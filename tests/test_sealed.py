"""The sealed container (crossret.storage.sealed): kind, version, size and SHA-256 are checked before a payload is
deserialized; every damaged or foreign file is a FileFormatError naming it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossret.errors import FileFormatError
from crossret.storage import sealed as _sealed

KIND = "crossret.test.payload"


def _object() -> dict:
    return {"weights": torch.arange(64, dtype=torch.float32).reshape(8, 8), "step": 7, "name": "x",
            "nested": {"ids": torch.tensor([3, 1, 2])}}


def _assert_same(loaded: dict, expected: dict) -> None:
    assert loaded["step"] == expected["step"] and loaded["name"] == expected["name"]
    assert torch.equal(loaded["weights"], expected["weights"])
    assert torch.equal(loaded["nested"]["ids"], expected["nested"]["ids"])


@pytest.fixture()
def sealed_file(tmp_path: Path) -> Path:
    return _sealed.save_torch(tmp_path / "obj.pt", _object(), KIND, 2)


def test_round_trip_and_header(sealed_file: Path) -> None:
    _assert_same(_sealed.load_torch(sealed_file, KIND, 2), _object())
    raw = sealed_file.read_bytes()
    magic, container, header_len = struct.unpack_from("<8sIQ", raw)
    assert (magic, container) == (b"CRSEALED", 1)
    header = json.loads(raw[20: 20 + header_len])
    payload = raw[20 + header_len:]
    assert header["kind"] == KIND and header["version"] == 2
    assert header["payload_bytes"] == len(payload)
    assert header["sha256"] == hashlib.sha256(payload).hexdigest()
    assert zipfile.is_zipfile(io.BytesIO(payload))  # the payload is a plain torch.save archive
    assert _sealed.is_sealed(sealed_file) and not _sealed.is_zip_file(sealed_file)


def test_payload_view_behaves_like_a_file(sealed_file: Path) -> None:
    raw = sealed_file.read_bytes()
    payload = raw[-json.loads(raw[20: 20 + struct.unpack_from("<8sIQ", raw)[2]])["payload_bytes"]:]
    with _sealed.open_payload(sealed_file, KIND, 2) as (header, view):
        assert header is not None and view.read() == payload
        assert view.seek(-10, io.SEEK_END) == len(payload) - 10 and view.read(100) == payload[-10:]
        assert view.seek(5) == 5 and view.seek(3, io.SEEK_CUR) == 8 and view.read(4) == payload[8:12]
        assert view.read(0) == b"" and view.tell() == 12
        view.seek(len(payload) + 5)
        assert view.read(3) == b""  # past the end: nothing, never the bytes of something else
        with pytest.raises(OSError):
            view.seek(-1)


@pytest.mark.parametrize(("kind", "max_version", "message"), [
    ("crossret.other", 2, "holds a 'crossret.test.payload', not a thing ('crossret.other')"),
    (KIND, 1, "thing format version 2 was written by a newer crossret"),
])
def test_wrong_kind_or_newer_version(sealed_file: Path, kind: str, max_version: int, message: str) -> None:
    with pytest.raises(FileFormatError, match=re.escape(message)) as info:
        _sealed.load_torch(sealed_file, kind, max_version, "thing")
    assert str(sealed_file) in str(info.value)


def _with_header(raw: bytes, **changes) -> bytes:
    header_len = struct.unpack_from("<8sIQ", raw)[2]
    header = {**json.loads(raw[20: 20 + header_len]), **changes}
    encoded = json.dumps(header).encode()
    return struct.pack("<8sIQ", b"CRSEALED", 1, len(encoded)) + encoded + raw[20 + header_len:]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda raw: raw[:-1], "truncated — the payload has"),
    (lambda raw: raw + b"\0", "1 unexpected bytes after the payload"),
    (lambda raw: raw[:10], "truncated — the file ends inside the 20-byte prefix"),
    (lambda raw: raw[:25], "truncated — the file ends inside the header"),
    (lambda raw: raw[:3], "truncated — only 3 bytes"),
    (lambda raw: b"", "truncated — only 0 bytes"),
    (lambda raw: b"GARBAGE!" + raw[8:], "bad magic bytes"),
    (lambda raw: raw[:8] + struct.pack("<I", 9) + raw[12:], "container version 9"),
    (lambda raw: raw[:12] + struct.pack("<Q", 1 << 40) + raw[20:], "garbage header"),
    (lambda raw: _with_header(raw, payload_bytes=1 << 40), "truncated — the payload has"),  # declares > present
    (lambda raw: _with_header(raw, sha256="0" * 64), "checksum mismatch"),
    (lambda raw: _with_header(raw, version="2"), "missing or invalid field 'version'"),
    (lambda raw: _with_header(raw, payload_bytes=True), "missing or invalid field 'payload_bytes'"),
    (lambda raw: raw[:20] + b"\xff" * (len(raw) - 20), "not valid UTF-8 JSON"),
])
def test_damaged_files_are_refused_naming_the_file(sealed_file: Path, damage, message: str) -> None:
    sealed_file.write_bytes(damage(sealed_file.read_bytes()))
    with pytest.raises(FileFormatError, match=message) as info:
        _sealed.load_torch(sealed_file, KIND, 2)
    assert str(sealed_file) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match=r"absent\.pt: no such checkpoint file"):
        _sealed.load_torch(tmp_path / "absent.pt", KIND, 1)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7), cut=st.booleans())
def test_any_flipped_bit_or_cut_is_detected(sealed_file: Path, tmp_path: Path, position: int, bit: int,
                                            cut: bool) -> None:
    raw = sealed_file.read_bytes()
    position %= len(raw)
    damaged = raw[:position] if cut else raw[:position] + bytes([raw[position] ^ (1 << bit)]) + raw[position + 1:]
    path = tmp_path / "damaged.pt"
    path.write_bytes(damaged)
    try:
        loaded = _sealed.load_torch(path, KIND, 2)
    except FileFormatError as exc:
        assert str(path) in str(exc)
    else:
        # Only bytes outside the checked content may change undetected: the "created" time stamp.
        _assert_same(loaded, _object())
        header_len = struct.unpack_from("<8sIQ", raw)[2]
        assert 20 <= position < 20 + header_len and not cut


def test_a_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    calls: list[str] = []

    class Evil:
        def __reduce__(self):
            return (calls.append, ("ran",))

    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    path = _sealed.write_sealed(tmp_path / "evil.pt", KIND, 1, buffer.getvalue())
    with pytest.raises(FileFormatError, match=r"evil\.pt: cannot deserialize"):
        _sealed.load_torch(path, KIND, 1)
    assert calls == []


def test_legacy_zip_files_are_read_after_a_crc_check(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(_object(), path)
    _assert_same(_sealed.load_torch(path, KIND, 1), _object())
    raw = bytearray(path.read_bytes())
    raw[raw.find(_object()["weights"].numpy().tobytes()) + 17] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match=r"legacy\.pt: checksum mismatch in member '.*data/0'"):
        _sealed.load_torch(path, KIND, 1)
    with pytest.raises(FileFormatError, match="bad magic bytes"):  # legacy=False accepts only sealed files
        torch.save(_object(), path)
        _sealed.load_torch(path, KIND, 1, legacy=False)


def test_npz_payload_through_the_view(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    arrays = {"a": np.arange(10.0), "b": np.eye(3, dtype=np.int8)}
    np.savez(buffer, **arrays)
    path = _sealed.write_sealed(tmp_path / "arrays.bin", KIND, 1, buffer.getvalue())
    with _sealed.open_payload(path, KIND, 1) as (_, stream), np.load(stream, allow_pickle=False) as npz:
        assert set(npz.files) == {"a", "b"}
        assert np.array_equal(npz["a"], arrays["a"]) and np.array_equal(npz["b"], arrays["b"])


def test_failed_write_keeps_the_previous_file(sealed_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sealed_file.read_bytes()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("crossret.storage.atomic.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _sealed.save_torch(sealed_file, {"other": torch.zeros(2)}, KIND, 2)
    assert sealed_file.read_bytes() == before
    assert [p.name for p in sealed_file.parent.iterdir()] == [sealed_file.name]  # no temporary file left
