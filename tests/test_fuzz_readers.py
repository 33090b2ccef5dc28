"""Untrusted files: every reader gives a correct result or a clean CrossretError, never a crash, a
hang or a huge allocation.

Two parts:

* targeted cases: files whose *declared* sizes (an .npy shape, a zip member's size, a MAT cell
  array's element count, an HDF5 dataset's shape, a .crbi payload length, a faiss vector length,
  an image's pixel count) exceed what they hold are refused with an error naming the file, before
  anything of the declared size is allocated;
* property-based: valid files written by crossret's own writers (the seeds of the fuzz targets in
  ``fuzz/targets.py``) are truncated, bit-flipped, overwritten and spliced by hypothesis, and the
  JSON header of a saved index has its fields replaced; each mutant goes through the same target
  functions the atheris harness (``fuzz/run.py``) runs, which accept a result or a CrossretError
  and let anything else through (and check what a reader returns).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossret.errors import CrossretError, DataError, FileFormatError
from crossret.storage.safe_read import check_npy_file, load_npy, load_npz_array, npz_members

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from targets import TARGETS, run_target

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])

FILE_TARGETS = ("npy", "npz", "mat", "h5", "csv", "wiki", "index", "index_payload", "packed", "person", "image")


@functools.cache
def seeds(name: str) -> tuple[bytes, ...]:
    return tuple(TARGETS[name].seeds())


# ---------------------------------------------------------------------------------------------- mutations
@st.composite
def mutants(draw: st.DrawFn, name: str) -> bytes:
    """A seed of ``name`` with 1-3 random mutations: truncation, bit flips, byte runs, splices."""
    data = bytearray(draw(st.sampled_from(seeds(name))))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("truncate", "flip", "overwrite", "insert", "delete", "int")))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "int" and len(data) >= pos + 4:
            # A plausible size field: replaced by an extreme value.
            value = draw(st.sampled_from((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000, 255)))
            data[pos:pos + 4] = struct.pack("<I", value)
    return bytes(data)


@pytest.mark.parametrize("name", FILE_TARGETS)
def test_seeds_read_back(name: str, tmp_path: Path) -> None:
    for seed in seeds(name):
        run_target(name, seed, tmp_path)


@pytest.mark.parametrize("name", FILE_TARGETS)
def test_mutated_files_give_a_result_or_a_crossret_error(name: str, tmp_path: Path) -> None:
    @SETTINGS
    @given(data=mutants(name))
    def check(data: bytes) -> None:
        run_target(name, data, tmp_path)

    check()


@pytest.mark.parametrize("name", ("npy", "index", "packed"))
def test_truncated_at_every_header_offset(name: str, tmp_path: Path) -> None:
    seed = max(seeds(name), key=len)
    for end in range(min(len(seed), 200)):
        run_target(name, seed[:end], tmp_path)


# ---------------------------------------------------------------------------------------------- npy / npz
def _npy_with_shape(shape: tuple[int, ...], dtype: str = "<f8", payload: bytes = b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


@pytest.mark.parametrize("shape", [(10**12,), (2**40, 2**40), (3, 5), (-1,), (2**63, 4)])
def test_npy_declaring_more_than_present_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = tmp_path / "big.npy"
    path.write_bytes(_npy_with_shape(shape))
    for mmap in (False, True):
        with pytest.raises(DataError) as err:
            load_npy(path, "codes", mmap=mmap)
        assert str(path) in str(err.value)
    with pytest.raises(DataError, match="declares"):
        check_npy_file(path)


def test_npy_object_dtype_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    path.write_bytes(_npy_with_shape((2,), "|O"))
    with pytest.raises(DataError, match="Python objects"):
        load_npy(path, "codes")


def _zip_with_member(name: str, member: bytes, compress: int, declared_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as archive:
        archive.writestr(name, member)
    raw = bytearray(buf.getvalue())
    if declared_size is not None:  # patch the uncompressed size in the local header and the directory
        for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            at = raw.find(signature)
            raw[at + offset:at + offset + 4] = struct.pack("<I", declared_size)
    return bytes(raw)


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_member_declaring_a_huge_shape_is_refused(tmp_path: Path, compress: int) -> None:
    path = tmp_path / "big.npz"
    path.write_bytes(_zip_with_member("features.npy", _npy_with_shape((10**6, 10**6)), compress))
    with pytest.raises(DataError, match="declares") as err:
        load_npz_array(path, "features")
    assert str(path) in str(err.value)
    from crossret.data.readers import read_domain

    with pytest.raises(DataError):
        read_domain(path)


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_zip_member_declaring_more_than_its_bytes_is_refused(tmp_path: Path, compress: int) -> None:
    path = tmp_path / "lying.npz"
    path.write_bytes(_zip_with_member("features.npy", _npy_with_shape((8,)), compress, declared_size=2**31))
    with pytest.raises(DataError, match=r"declares|corrupt") as err:
        npz_members(path)
    assert str(path) in str(err.value)


def test_npz_round_trip_matches_numpy(tmp_path: Path) -> None:
    arrays = {"a": np.arange(12, dtype=">i4").reshape(3, 4), "b": np.asfortranarray(np.ones((2, 3))),
              "c": np.zeros((0, 5), np.float32), "d": np.float64(2.5)}
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)
        assert sorted(npz_members(path)) == sorted(arrays)
        for key, value in arrays.items():
            got = load_npz_array(path, key)
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)


# ---------------------------------------------------------------------------------------------- MAT / HDF5
def _mat5(elements: bytes) -> bytes:
    header = b"MATLAB 5.0 MAT-file, crafted".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"
    return header + elements


def _tag(mdtype: int, payload: bytes) -> bytes:
    return struct.pack("<II", mdtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _matrix(mclass: int, dims: tuple[int, ...], name: bytes, body: bytes) -> bytes:
    flags = _tag(6, struct.pack("<II", mclass, 0))
    content = flags + _tag(5, struct.pack(f"<{len(dims)}i", *dims)) + _tag(1, name) + body
    return struct.pack("<II", 14, len(content)) + content


@pytest.mark.parametrize("case", ["cell", "struct", "empty-struct", "numeric-type-0", "beyond-end", "v4"])
def test_mat_declared_sizes_are_checked_before_scipy_reads(tmp_path: Path, case: str) -> None:
    from crossret.data.readers import read_domain

    labels = _matrix(6, (1, 2), b"label", _tag(9, struct.pack("<2d", 1, 2)))
    if case == "cell":  # 10^9 cell elements in a few bytes: scipy would allocate 8 GB of object pointers
        body = _matrix(1, (30000, 30000), b"deepfea", b"")
    elif case == "struct":
        body = _matrix(2, (50000, 50000), b"deepfea", _tag(5, struct.pack("<i", 4)) + _tag(1, b"abcd"))
    elif case == "empty-struct":  # no fields: scipy loops over every declared element
        body = _matrix(2, (2**30, 2**30), b"deepfea", _tag(5, struct.pack("<i", 4)) + _tag(1, b""))
    elif case == "numeric-type-0":  # scipy indexes its type table with 0 and crashes the process
        body = _matrix(6, (1, 2), b"deepfea", _tag(0, struct.pack("<2d", 1, 2)))
    else:
        body = _matrix(6, (1, 2), b"deepfea", _tag(9, struct.pack("<2d", 1, 2)))
    data = _mat5(body + labels)
    if case == "beyond-end":
        data = data[:-8]
    if case == "v4":  # a MAT v4 record declaring a 50000 x 50000 double matrix
        data = struct.pack("<5i", 0, 50000, 50000, 0, 8) + b"deepfea\0" + b"\0" * 64
    path = tmp_path / "crafted.mat"
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_mat_compressed_variable_declaring_more_than_deflate_can_give(tmp_path: Path) -> None:
    from crossret.data.readers import read_domain

    inner = zlib.compress(struct.pack("<II", 14, 2**31) + b"\0" * 64)
    path = tmp_path / "z.mat"
    path.write_bytes(_mat5(struct.pack("<II", 15, len(inner)) + inner))
    with pytest.raises(DataError, match=r"deflate|declares"):
        read_domain(path)


@pytest.mark.parametrize("patch", ["row-index", "column-pointers"])
def test_sparse_matrix_with_bad_indices_is_refused_not_densified(tmp_path: Path, patch: str) -> None:
    """scipy reads a sparse matrix's indices as stored; toarray() then read/wrote out of bounds (a crash)."""
    import scipy.io
    import scipy.sparse

    from crossret.data.readers import read_domain

    path = tmp_path / "surf.mat"
    scipy.io.savemat(path, {"fts": scipy.sparse.csc_matrix(np.eye(4)), "labels": np.arange(4)},
                     do_compression=False)
    raw = bytearray(path.read_bytes())
    if patch == "row-index":  # the row indices 0, 1, 2, 3: point one far outside
        at = raw.find(struct.pack("<4i", 0, 1, 2, 3))
        raw[at + 4:at + 8] = struct.pack("<i", 10**6)
    else:  # column pointers 0, 1, 2, 3, 4 -> 0, 0, 3, 0, 0: no stored value, pointers into nothing
        at = raw.find(struct.pack("<5i", 0, 1, 2, 3, 4))
        raw[at:at + 20] = struct.pack("<5i", 0, 0, 3, 0, 0)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sparse"):
        read_domain(path)


def test_sparse_matrix_too_large_to_densify(tmp_path: Path) -> None:
    import scipy.io
    import scipy.sparse

    from crossret.data.readers import read_domain

    path = tmp_path / "surf.mat"
    scipy.io.savemat(path, {"fts": scipy.sparse.csc_matrix((2**20, 2**12)), "labels": np.arange(2**20)})
    with pytest.raises(DataError, match="dense"):
        read_domain(path)


def test_nearly_empty_sparse_matrix_is_not_densified(tmp_path: Path) -> None:
    """A 16.6M x 6 one-hot 'Y' with no stored value in a 1 KB file made 100 MB dense and 1.3 GB of temporaries."""
    import scipy.io
    import scipy.sparse

    from crossret.data.crossmodal import read_wikipedia_mat

    onehot = scipy.sparse.csc_matrix((16_645_891, 6), dtype=np.uint8)
    data = {"X1": np.ones((4, 6)), "X2": np.ones((3, 6)), "Y": onehot,
            "split": {"ind_train": np.array([[1, 2, 3, 4]]), "ind_test": np.array([[5, 6]])}}
    path = tmp_path / "wiki.mat"
    scipy.io.savemat(path, {"data": data})
    with pytest.raises(DataError, match="sparse") as err:
        read_wikipedia_mat(path)
    assert str(path) in str(err.value)


def test_hdf5_dataset_declaring_more_than_stored(tmp_path: Path) -> None:
    import h5py

    from crossret.data.readers import read_domain

    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", shape=(10**6, 10**5), dtype="f8", chunks=(8, 8))  # nothing written
        handle["target"] = np.arange(10**6 % 7 + 3)
    with pytest.raises(DataError, match="declares") as err:
        read_domain(path)
    assert str(path) in str(err.value)


def test_real_mat_files_pass_the_size_checks(shared_data: Path) -> None:
    from crossret.data.declared_sizes import check_mat_sizes

    files = sorted(shared_data.glob("*/*.mat"))
    assert files
    for path in files:
        check_mat_sizes(path)


# ---------------------------------------------------------------------------------------------- indexes
def _index_file(tmp_path: Path, kind: str = "flat") -> Path:
    from crossret.retrieval import BinaryIndex

    codes = np.random.default_rng(0).integers(0, 256, (20, 2), dtype=np.uint8)
    return BinaryIndex.from_packed(codes, 16, kind).save(tmp_path / f"{kind}.crbi")


def _rewrite(path: Path, header: dict, payload: bytes | None = None) -> None:
    from crossret.storage.sealed import PREFIX as prefix

    raw = path.read_bytes()
    magic, version, length = prefix.unpack_from(raw)
    body = raw[prefix.size + length:] if payload is None else payload
    text = json.dumps(header).encode()
    path.write_bytes(prefix.pack(magic, version, len(text)) + text + body)


def _header(path: Path) -> dict:
    from crossret.storage.sealed import PREFIX

    raw = path.read_bytes()
    _, _, length = PREFIX.unpack_from(raw)
    return json.loads(raw[PREFIX.size:PREFIX.size + length])


@pytest.mark.parametrize("params", [{"M": 4, "efSearch": 2**30}, {"M": 4, "efConstruction": 2**25}])
def test_stored_search_parameters_far_beyond_use_are_refused(tmp_path: Path, params: dict) -> None:
    from crossret.retrieval import BinaryIndex

    codes = np.random.default_rng(0).integers(0, 256, (20, 2), dtype=np.uint8)
    path = BinaryIndex.from_packed(codes, 16, "hnsw", M=4).save(tmp_path / "h.crbi")
    header = _header(path)
    header["params"] = params
    _rewrite(path, header)
    with pytest.raises(FileFormatError, match="far beyond"):
        BinaryIndex.load(path)


def test_multihash_flip_count_that_would_never_finish_is_refused(tmp_path: Path) -> None:
    from crossret.retrieval import BinaryIndex

    codes = np.random.default_rng(0).integers(0, 256, (20, 8), dtype=np.uint8)
    path = BinaryIndex.from_packed(codes, 64, "multihash", b=64, nhash=1).save(tmp_path / "m.crbi")
    header = _header(path)
    header["params"] = {**header["params"], "nflip": 32}  # C(64, <= 32) ~ 10**18 keys per query
    _rewrite(path, header)
    with pytest.raises(FileFormatError, match="nflip"):
        BinaryIndex.load(path)


def test_untrained_stored_index_is_refused(tmp_path: Path) -> None:
    from crossret.retrieval import BinaryIndex

    path = _index_file(tmp_path)
    payload = bytearray(BinaryIndex.load(path)._serialize().tobytes())
    payload[20] = 0  # IBxF header: the is_trained flag
    _reframe(path, bytes(payload))
    with pytest.raises(FileFormatError, match="not trained"):
        BinaryIndex.load(path)


def test_index_payload_declared_larger_than_the_file(tmp_path: Path) -> None:
    from crossret.retrieval import BinaryIndex

    path = _index_file(tmp_path)
    header = _header(path)
    header["payload_bytes"] = header["faiss_bytes"] = 2**40
    _rewrite(path, header)
    with pytest.raises(FileFormatError, match="truncated") as err:
        BinaryIndex.load(path)
    assert str(path) in str(err.value)


_WEIRD = (None, -1, 0, 2**70, 1.5, "x", [], {}, True, {"nprobe": -3}, {"efSearch": 2**40}, {"bogus": 1},
          {"nprobe": 2**31}, {"nflip": 70}, {"b": 3, "nhash": 1}, {"efSearch": "8"}, "ivf", "hnsw", "flat",
          "multihash", "BFlat", "BHash8", "lsb-first", "msb-first", 64, 16, 17, 8, 128)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "multihash"])
def test_index_header_fields_replaced(tmp_path: Path, kind: str) -> None:
    """Every header field replaced by each weird value: the load works (and searches) or is a FileFormatError."""
    path = _index_file(tmp_path, kind) if kind != "ivf" else None
    if path is None:
        from crossret.retrieval import BinaryIndex

        codes = np.random.default_rng(0).integers(0, 256, (80, 2), dtype=np.uint8)
        path = BinaryIndex.from_packed(codes, 16, "ivf", nlist=2).save(tmp_path / "ivf.crbi")
    original = path.read_bytes()
    (tmp_path / "work").mkdir()
    for field in sorted(_header(path)):  # every field x every value: a few hundred loads
        for value in _WEIRD:
            path.write_bytes(original)
            header = _header(path)
            header[field] = value
            _rewrite(path, header)
            run_target("index", path.read_bytes(), tmp_path / "work")


def _reframe(path: Path, payload: bytes) -> None:
    """Replace the faiss payload and recompute the sizes and checksum (a crafted, not a damaged, file)."""
    import hashlib

    header = _header(path)
    header.update(payload_bytes=len(payload), faiss_bytes=len(payload), ids_bytes=0,
                  sha256=hashlib.sha256(payload).hexdigest())
    _rewrite(path, header, payload)


@pytest.mark.parametrize("patch", ["vector-length", "hnsw-neighbour", "hnsw-ef-search", "ivf-list-size", "ivf-nprobe",
                                   "trailing"])
def test_crafted_faiss_payloads_are_refused_before_faiss_reads_them(tmp_path: Path, patch: str) -> None:
    """Checksums recomputed: faiss would allocate 2**35 list entries (2 GB touched for a 2 KB file), a
    2**30-candidate search heap per query (8 GB, minutes), or follow a neighbour id out of range."""
    from crossret.retrieval import BinaryIndex

    kind = {"vector-length": "flat", "hnsw-neighbour": "hnsw", "hnsw-ef-search": "hnsw", "ivf-list-size": "ivf",
            "ivf-nprobe": "ivf", "trailing": "flat"}[patch]
    codes = np.random.default_rng(0).integers(0, 256, (60, 2), dtype=np.uint8)
    index = BinaryIndex.from_packed(codes, 16, kind, **({"nlist": 1} if kind == "ivf" else {}))
    path = index.save(tmp_path / "i.crbi")
    payload = bytearray(index._serialize().tobytes())
    if patch == "vector-length":  # IBxF: the code vector's length field follows the 25-byte header
        payload[25:33] = struct.pack("<Q", 2**40)
    elif patch == "hnsw-neighbour":  # one neighbour slot of the graph points far outside the index
        at = _hnsw_neighbours(payload)
        payload[at:at + 4] = struct.pack("<i", 10**6)
    elif patch == "hnsw-ef-search":  # entry point, max level, efConstruction, then efSearch follow the graph
        at = _hnsw_neighbours(payload)
        (count,) = struct.unpack_from("<Q", payload, at - 8)
        efs = at + 4 * count + 12
        payload[efs:efs + 4] = struct.pack("<i", 2**30)
    elif patch == "ivf-nprobe":  # nprobe follows the header and nlist; faiss' search fails on 0
        payload[33:41] = struct.pack("<Q", 0)
    elif patch == "ivf-list-size":  # one inverted list claims far more entries than stored
        at = payload.find(b"full") + 4 + 8
        payload[at:at + 8] = struct.pack("<Q", 2**35)
    else:
        payload += b"\0" * 8
    _reframe(path, bytes(payload))
    with pytest.raises(FileFormatError, match="faiss payload") as err:
        BinaryIndex.load(path)
    assert str(path) in str(err.value)


def _hnsw_neighbours(payload: bytes) -> int:
    """Offset of the first neighbour id of a serialized binary HNSW index (faiss' IBHf layout)."""
    at = 25  # fourcc + binary index header
    for itemsize in (8, 4, 4, 8):  # assign_probas, cum_nneighbor_per_level, levels, offsets
        (count,) = struct.unpack_from("<Q", payload, at)
        at += 8 + count * itemsize
    return at + 8


def test_every_index_kind_round_trips_through_the_payload_checks(tmp_path: Path) -> None:
    for seed in seeds("index"):
        run_target("index", seed, tmp_path)  # loads and searches every kind (asserts inside)


# ---------------------------------------------------------------------------------------------- sidecar, json, images
@pytest.mark.parametrize("sidecar", [
    b"[" * 100000, b'{"bits": 1e400}', b'{"bits": 12.5, "n": 6, "width": 2}', b"\xff\xfe",
    b'{"format": "crossret-packed-codes", "bit_order": "lsb-first", "bits": 1000, "n": 6, "width": 2}',
    b'{"format": "crossret-packed-codes", "bit_order": "lsb-first", "bits": "12", "n": 6, "width": 2}',
    b'{"bits": 1' + b"0" * 5000 + b"}",
])
def test_bad_packed_codes_sidecar(tmp_path: Path, sidecar: bytes) -> None:
    from crossret.retrieval.streaming import read_packed_codes

    np.save(tmp_path / "c.npy", np.zeros((6, 2), np.uint8))
    (tmp_path / "c.npy.json").write_bytes(sidecar)
    with pytest.raises(FileFormatError) as err:
        read_packed_codes(tmp_path / "c.npy")
    assert "c.npy.json" in str(err.value)


@pytest.mark.parametrize("content", [
    b"[" * 100000, b'[{"id": 1' + b"1" * 5000 + b"}]",
    b'[{"split": "train", "captions": ["a man"], "file_path": "a\\u0000b.jpg", "id": 1}]',
    b'[{"split": "train", "captions": ["a man"], "file_path": "a\\ud800.jpg", "id": 1}]',
    b'[{"split": "train", "captions": ["a man"], "file_path": "a.jpg", "id": 99999999999999999999999}]',
])
def test_bad_person_annotations(tmp_path: Path, content: bytes) -> None:
    from crossret.data.person import load_person_dataset

    (tmp_path / "reid_raw.json").write_bytes(content)
    for check_images in (True, False):
        with pytest.raises(DataError) as err:
            load_person_dataset("cuhk-pedes", tmp_path, check_images=check_images)
        assert "reid_raw.json" in str(err.value)


def test_image_header_declaring_more_pixels_than_the_file_holds(tmp_path: Path) -> None:
    from crossret.data.person import load_image

    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(png, format="PNG")
    raw = bytearray(png.getvalue())
    raw[16:24] = struct.pack(">II", 60000, 60000)  # IHDR width and height (CRC now wrong too)
    path = tmp_path / "big.png"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_crossret_errors_only(tmp_path: Path) -> None:
    """Random bytes under every name: a CrossretError (or a result), nothing else."""
    rng = np.random.default_rng(7)
    for name in FILE_TARGETS:
        for size in (0, 1, 7, 64, 600):
            try:
                run_target(name, rng.integers(0, 256, size, dtype=np.uint8).tobytes(), tmp_path)
            except CrossretError:  # pragma: no cover - targets catch these themselves
                pass


def test_hdf5_external_storage_and_links_are_not_followed(tmp_path: Path) -> None:
    import h5py

    from crossret.data.readers import read_domain

    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(6, dtype="<f8").tobytes())
    path = tmp_path / "external.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("data", shape=(3, 2), dtype="<f8", external=[(str(outside), 0, 48)])
        handle["target"] = np.arange(3)
    with pytest.raises(DataError, match="outside the file"):
        read_domain(path)
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as handle:
        handle["data"] = h5py.ExternalLink(str(path), "target")
        handle["target"] = np.arange(3)
    with pytest.raises(DataError, match="no known set of arrays"):
        read_domain(linked)


def _bits_lsb_first(*fields: tuple[int, int]) -> np.ndarray:
    """Pack ``(value, width)`` fields least significant bit first into uint8 (faiss' BitstringWriter)."""
    bits = [(value >> i) & 1 for value, width in fields for i in range(width)]
    bits += [0] * (-len(bits) % 8)
    return np.packbits(np.array(bits, np.uint8), bitorder="little")


def test_multihash_bit_table_scan_counts_ids_and_refuses_bad_records() -> None:
    from crossret.retrieval.hamming import _scan_bit_table

    # one bucket: a 4-bit key 0b1010, a 3-bit count 2, then the 3-bit ids 1 and 5
    table = _bits_lsb_first((0b1010, 4), (2, 3), (1, 3), (5, 3))
    assert _scan_bit_table(table, 4, 3, 1, 6) == 2
    assert _scan_bit_table(table, 4, 3, 1, 5) == -2  # id 5 >= ntotal
    assert _scan_bit_table(table, 4, 3, 1, 1) == -1  # lists more ids than the index holds
    assert _scan_bit_table(table, 4, 3, 2, 6) == -1  # a second bucket would run past the bits
    assert _scan_bit_table(table[:1], 4, 3, 1, 6) == -1  # truncated before the ids
