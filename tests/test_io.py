"""Atomic writes: all or nothing, sensible permissions, JSON-safe conversion."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from crossret.storage.atomic import atomic_open, save_npy_atomic, to_jsonable, write_json_atomic, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write("half of the new conte")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_written_files_get_umask_permissions(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_json_conversion_of_numpy_values(tmp_path):
    obj = {"a": np.float32(0.5), "b": np.arange(3), "c": (1, 2), 3: float("nan")}
    write_json_atomic(tmp_path / "x.json", obj)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": [1, 2], "3": None}
    assert to_jsonable(tmp_path) == str(tmp_path)


def test_npy_round_trip_without_pickle(tmp_path):
    array = np.arange(12, dtype=np.int8).reshape(3, 4)
    save_npy_atomic(tmp_path / "c.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy", allow_pickle=False), array)


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch) -> None:
    import crossret.storage.atomic as io_module

    seen = []
    original = io_module.fsync_directory

    def record(directory):
        seen.append((directory, (tmp_path / "out.txt").read_text(encoding="utf-8")))  # the rename happened first
        original(directory)

    monkeypatch.setattr(io_module, "fsync_directory", record)
    io_module.write_text_atomic(tmp_path / "out.txt", "new")
    assert seen == [(tmp_path, "new")]


@pytest.mark.parametrize("content", [b"a: \xa6", b"a: " + b"[" * 20000, b"run: [1, 2]", b"run: abc", b"run: {1: 2}",
                                     b"run: {method: lsh}"])
def test_hostile_run_configs_are_file_format_errors(tmp_path, content) -> None:
    from crossret.errors import FileFormatError
    from crossret.experiment import RunConfig

    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=r"config\.yaml"):
        RunConfig.from_yaml(path)


def test_hostile_metrics_json_is_a_file_format_error(tmp_path) -> None:
    from crossret.errors import FileFormatError
    from crossret.experiment import read_run_metrics

    (tmp_path / "metrics.json").write_text("[" * 100000, encoding="utf-8")
    with pytest.raises(FileFormatError, match=r"metrics\.json"):
        read_run_metrics(tmp_path)


def test_a_full_disk_error_names_the_file_being_written(tmp_path, monkeypatch):
    """ENOSPC from write/fsync carries no file name; atomic_open attaches the target's, keeps the old
    file and removes the temporary."""
    import errno

    target = tmp_path / "codes.npy"
    write_text_atomic(target, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        save_npy_atomic(target, np.zeros(10))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["codes.npy"]


def test_a_failed_rename_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "index.crbi"

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", src, None, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError) as info:
        write_text_atomic(target, "x")
    assert info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_npz_headers_give_shapes_without_inflating_the_arrays(tmp_path, monkeypatch):
    import zipfile

    from crossret.errors import DataError
    from crossret.storage.safe_read import npz_headers

    path = tmp_path / "a.npz"
    np.savez_compressed(path, features=np.zeros((2000, 500), np.float32), labels=np.arange(7))
    reads = []
    original = zipfile.ZipExtFile.read

    def counting(self, n=-1):
        data = original(self, n)
        reads.append(len(data))
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting)
    headers = npz_headers(path)
    assert {k: (h.shape, h.dtype.str) for k, h in headers.items()} == {
        "features": ((2000, 500), "<f4"), "labels": ((7,), np.dtype(np.int_).str)}
    assert sum(reads) < 4096, "the arrays themselves were inflated"
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04" + b"x" * 40)
    with pytest.raises(DataError, match=r"bad\.npz"):
        npz_headers(tmp_path / "bad.npz")
