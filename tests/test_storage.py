"""crossret.storage: one checksummed container for sealed files and indexes (files written before the
move load byte-compatibly), and atomic writes whose killed leftovers the cleaner recognises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossret.errors import FileFormatError
from crossret.storage import sealed
from crossret.storage.atomic import atomic_open, is_temporary_name, remove_stale_temporaries, write_bytes_atomic
from crossret.storage.sealed import PREFIX, SEALED, Container

FIXTURES = Path(__file__).parent / "fixtures" / "storage"
FIELDS = (("kind", str), ("payload_bytes", int), ("sha256", str))
ALPHA = Container(magic=b"CRALPHA1", version=2, fields=FIELDS, what="alpha file")
BETA = Container(magic=b"CRBETA01", version=1, fields=FIELDS, what="beta file",
                 siblings=((b"CRALPHA1", "{path}: an alpha file; read it as one"),))


def _split(raw: bytes) -> tuple[bytes, int, dict, bytes]:
    magic, version, length = PREFIX.unpack_from(raw)
    return magic, version, json.loads(raw[PREFIX.size:PREFIX.size + length]), raw[PREFIX.size + length:]


# ---------------------------------------------------------------------------------------------- the container
def test_round_trip_in_both_read_modes(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 3
    path = ALPHA.write(tmp_path / "a.bin", {"kind": "thing", "extra": [1, 2]}, payload)
    magic, version, header, body = _split(path.read_bytes())
    assert (magic, version, body) == (b"CRALPHA1", 2, payload)
    assert header["payload_bytes"] == len(payload) and header["extra"] == [1, 2] and "created" in header
    read_header, read_payload = ALPHA.read(path)
    assert read_header == header and read_payload == payload
    with ALPHA.open(path) as (open_header, stream):
        assert open_header == header and stream.read() == payload
        stream.seek(-3, os.SEEK_END)
        assert stream.read() == payload[-3:]


@pytest.mark.parametrize("mode", ["read", "open"])
def test_an_altered_payload_is_refused_in_both_read_modes(tmp_path: Path, mode: str) -> None:
    path = ALPHA.write(tmp_path / "a.bin", {"kind": "thing"}, b"0123456789")
    raw = bytearray(path.read_bytes())
    raw[-4] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match=r"a\.bin: checksum mismatch — the alpha file was altered"):
        if mode == "read":
            ALPHA.read(path)
        else:
            with ALPHA.open(path):
                pass


def test_a_file_of_another_magic_is_refused(tmp_path: Path) -> None:
    path = ALPHA.write(tmp_path / "a.bin", {"kind": "thing"}, b"x")
    with pytest.raises(FileFormatError, match=r"a\.bin: an alpha file; read it as one"):  # a known sibling
        BETA.read(path)
    other = BETA.write(tmp_path / "b.bin", {"kind": "thing"}, b"x")
    with pytest.raises(FileFormatError, match=r"b\.bin: not a alpha file \(not a sealed crossret file: bad magic"):
        ALPHA.read(other)
    with pytest.raises(FileFormatError, match=r"b\.bin: not a checkpoint \(not a sealed crossret file: bad magic"):
        sealed.load_torch(other, "crossret.test", 1)


def test_the_reader_checks_version_fields_and_its_callers_check_in_order(tmp_path: Path) -> None:
    seen: list[int] = []

    def check(path: Path, header: dict, version: int) -> None:
        seen.append(version)
        if header["kind"] != "thing":
            raise FileFormatError(f"{path}: wrong kind")

    path = ALPHA.write(tmp_path / "a.bin", {"kind": "other"}, b"payload")
    with pytest.raises(FileFormatError, match="wrong kind"):
        ALPHA.read(path, check=check)
    assert seen == [2]
    magic, _, header, body = _split(path.read_bytes())
    for version, message in ((3, "container version 3 is not one this crossret reads"),
                             (0, "container version 0 is not one")):
        text = json.dumps(header).encode()
        path.write_bytes(PREFIX.pack(magic, version, len(text)) + text + body)
        with pytest.raises(FileFormatError, match=message):
            ALPHA.read(path)
    text = json.dumps({k: v for k, v in header.items() if k != "kind"}).encode()
    path.write_bytes(PREFIX.pack(magic, 2, len(text)) + text + body)
    with pytest.raises(FileFormatError, match="garbage header — missing or invalid field 'kind'"):
        ALPHA.read(path)


def test_the_version_field_is_written_and_must_match_the_prefix(tmp_path: Path) -> None:
    versioned = Container(magic=b"CRVERSN1", version=1, fields=(("format_version", int), *FIELDS),
                          version_field="format_version")
    path = versioned.write(tmp_path / "v.bin", {"kind": "k", "format_version": 7}, b"p")
    magic, version, header, body = _split(path.read_bytes())
    assert header["format_version"] == version == 1
    header["format_version"] = 2
    text = json.dumps(header).encode()
    path.write_bytes(PREFIX.pack(magic, version, len(text)) + text + body)
    with pytest.raises(FileFormatError, match=r"header format_version 2 disagrees with the prefix \(1\)"):
        versioned.read(path)


def test_a_container_needs_an_8_byte_magic_and_the_size_and_checksum_fields() -> None:
    with pytest.raises(ValueError, match="8 bytes"):
        Container(magic=b"SHORT", version=1, fields=FIELDS)
    with pytest.raises(ValueError, match="payload_bytes"):
        Container(magic=b"CRNOSIZE", version=1, fields=(("sha256", str),))
    with pytest.raises(ValueError, match="version field"):
        Container(magic=b"CRNOVERS", version=1, fields=FIELDS, version_field="format_version")


# ---------------------------------------------------------------------------------------------- files of the old code
# tests/fixtures/storage/*: written by the code before crossret.storage existed (see the README there).
def test_old_sealed_files_load_and_are_rewritten_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    obj = sealed.load_torch(FIXTURES / "sealed_torch_v1.pt", "crossret.test.fixture", 2)
    assert obj["step"] == 3 and torch.equal(obj["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    with sealed.open_payload(FIXTURES / "sealed_bytes_v1.bin", "crossret.test.raw", 1) as (header, stream):
        assert stream.read() == b"hello sealed payload\x00\xff" and header["version"] == 1
    for name in ("sealed_torch_v1.pt", "sealed_bytes_v1.bin"):
        raw = (FIXTURES / name).read_bytes()
        _, _, header, payload = _split(raw)
        monkeypatch.setattr(sealed, "_created", lambda header=header: header["created"])
        assert sealed.seal(header["kind"], header["version"], payload) == raw, name
    with pytest.raises(FileFormatError, match=r"holds a 'crossret.test.raw', not a checkpoint"):
        sealed.load_torch(FIXTURES / "sealed_bytes_v1.bin", "crossret.test.fixture", 2)


def test_old_index_files_load_and_are_rewritten_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    from crossret.retrieval import index as index_module

    codes = np.load(FIXTURES / "codes.npy")
    old = index_module.BinaryIndex.load(FIXTURES / "binary_flat_v1.crbi")
    new = index_module.BinaryIndex(24, "flat")
    new.add(codes, ids=np.arange(100, 112))
    for got, want in zip(old.search(codes[:4], 12), new.search(codes[:4], 12), strict=True):
        np.testing.assert_array_equal(got, want)
    vectors = np.load(FIXTURES / "vectors.npy")
    dense = index_module.DenseIndex.load(FIXTURES / "dense_flat_v1.crdi")
    _, ids = dense.search(vectors, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(6))
    assert index_module.read_index_header(FIXTURES / "dense_flat_v1.crdi")["index_type"] == "dense"
    assert index_module.read_index_header(FIXTURES / "binary_flat_v1.crbi")["ntotal"] == 12
    for name in ("binary_flat_v1.crbi", "dense_flat_v1.crdi"):
        raw = (FIXTURES / name).read_bytes()
        magic, _, header, payload = _split(raw)
        monkeypatch.setattr(sealed, "_created", lambda header=header: header["created"])
        fields = {k: v for k, v in header.items() if k not in ("payload_bytes", "sha256", "created")}
        assert index_module._CONTAINERS[magic].seal(fields, payload) == raw, name


def test_an_index_reader_names_the_other_file_types(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from crossret.retrieval.index import BinaryIndex, DenseIndex

    with pytest.raises(FileFormatError, match=r"this is a dense crossret index; load it with DenseIndex\.load"):
        BinaryIndex.load(FIXTURES / "dense_flat_v1.crdi")
    with pytest.raises(FileFormatError, match=r"this is a binary crossret index; load it with BinaryIndex\.load"):
        DenseIndex.load(FIXTURES / "binary_flat_v1.crbi")
    with pytest.raises(FileFormatError, match=r"sealed_bytes_v1\.bin: not a crossret index file \(bad magic"):
        BinaryIndex.load(FIXTURES / "sealed_bytes_v1.bin")
    with pytest.raises(FileFormatError, match=r"not a checkpoint \(not a sealed crossret file: bad magic bytes\)"):
        with SEALED.open(FIXTURES / "binary_flat_v1.crbi", what="checkpoint"):
            pass


# ---------------------------------------------------------------------------------------------- atomic writes
def test_the_writer_names_its_temporary_as_the_cleaner_expects(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    with atomic_open(target, "w") as handle:
        handle.write("{}")
        (name,) = [p.name for p in tmp_path.iterdir()]
        assert name.startswith(".metrics.json.") and is_temporary_name(name)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    for name in ("metrics.json", ".metrics.json", ".metrics.json.tmp", ".metrics.json.ABCDEFGH.tmp"):
        assert not is_temporary_name(name), name


def test_a_killed_write_leaves_a_temporary_that_the_cleaner_removes(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    write_bytes_atomic(target, b"complete old version")
    (tmp_path / "notes.tmp").write_bytes(b"not ours")
    script = ("import os, signal, sys\n"
              "from crossret.storage.atomic import atomic_open\n"
              "with atomic_open(sys.argv[1], 'wb') as handle:\n"
              "    handle.write(b'half of the new')\n"
              "    handle.flush()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert target.read_bytes() == b"complete old version"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("checkpoint.pt", "notes.tmp"))
    assert len(leftovers) == 1 and is_temporary_name(leftovers[0])
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "notes.tmp"]


def test_importing_the_package_and_the_container_does_not_import_numpy() -> None:
    script = ("import sys\n"
              "import crossret.storage, crossret.storage.atomic, crossret.storage.sealed\n"
              "assert crossret.storage.write_sealed is crossret.storage.sealed.write_sealed\n"
              "print(sorted(m for m in ('numpy', 'yaml', 'torch') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
