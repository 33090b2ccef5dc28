"""BinaryIndex / DenseIndex: exactness against numpy brute force, persistence, input errors."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import faiss
import numpy as np
import pytest

from crossret.errors import CodeError, ConfigError, DataError, FileFormatError
from crossret.retrieval import BinaryIndex, DenseIndex, pack_codes
from crossret.retrieval.index import MISSING_DISTANCE, read_index_header
from crossret.retrieval.packing import pad_packed

BITS = [7, 16, 48, 64, 100, 128]


# ------------------------------------------------------------------ helpers


def tied_codes(rng: np.random.Generator, n: int, bits: int, free_bits: int = 6) -> np.ndarray:
    """±1 codes where only a few bit positions vary: distances take few values, so ties abound."""
    base = rng.choice([-1, 1], size=bits)
    codes = np.tile(base, (n, 1))
    free = rng.choice(bits, size=min(free_bits, bits), replace=False)
    codes[:, free] = rng.choice([-1, 1], size=(n, free.size))
    return codes.astype(np.int8)


def brute_hamming(q_pm1: np.ndarray, db_pm1: np.ndarray) -> np.ndarray:
    """Hamming distances from the ±1 inner product: d = (L - <q, x>) / 2."""
    bits = q_pm1.shape[1]
    return (bits - q_pm1.astype(np.int64) @ db_pm1.astype(np.int64).T) // 2


def brute_knn(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by (distance, id), padded like the index (id -1, distance int32 max)."""
    n = dist.shape[1]
    ids = np.broadcast_to(np.arange(n), dist.shape)
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    d = np.take_along_axis(dist, order, 1)
    if k > n:
        pad = k - n
        d = np.hstack([d, np.full((dist.shape[0], pad), MISSING_DISTANCE)])
        order = np.hstack([order, np.full((dist.shape[0], pad), -1)])
    return d, order


def tied_setup(bits: int, n: int = 600, nq: int = 25, seed: int = 0):
    rng = np.random.default_rng(seed + bits)
    db = tied_codes(rng, n, bits)
    q = np.vstack([tied_codes(rng, nq - 2, bits), db[:2]])  # include exact duplicates of db items
    return db, q, brute_hamming(q, db)


# ------------------------------------------------------------------ exactness (flat)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 7, 100, 600, 605])
def test_flat_search_matches_brute_force_with_ties(bits: int, k: int) -> None:
    db, q, dist = tied_setup(bits)
    index = BinaryIndex.from_packed(pack_codes(db), bits)
    d, ids = index.search(pack_codes(q), k)
    ref_d, ref_ids = brute_knn(dist, k)
    assert d.dtype == np.int32 and ids.dtype == np.int64
    assert d.shape == ids.shape == (q.shape[0], k)
    np.testing.assert_array_equal(d, ref_d)
    np.testing.assert_array_equal(ids, ref_ids)  # ties broken by id, also at the k boundary


@pytest.mark.parametrize("threads", [1, 2])
def test_flat_tie_guarantee_single_query_and_thread_counts(threads: int) -> None:
    bits = 64
    db, q, dist = tied_setup(bits, n=3000, nq=9)
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        index = BinaryIndex.from_packed(pack_codes(db), bits)
        for k in (5, 50, 400):
            for rows in (slice(0, 1), slice(None)):
                d, ids = index.search(pack_codes(q[rows]), k)
                ref_d, ref_ids = brute_knn(dist[rows], k)
                np.testing.assert_array_equal(d, ref_d)
                np.testing.assert_array_equal(ids, ref_ids)
    finally:
        faiss.omp_set_num_threads(old)


@pytest.mark.parametrize("bits", BITS)
def test_flat_range_search_is_inclusive_and_exact(bits: int) -> None:
    db, q, dist = tied_setup(bits, n=300)
    index = BinaryIndex.from_packed(pack_codes(db), bits)
    for radius in sorted({0, 1, 2, bits // 2, bits, bits + 3}):
        lims, d, ids = index.range_search(pack_codes(q), radius)
        assert lims.dtype == np.int64 and d.dtype == np.int32 and ids.dtype == np.int64
        assert lims.shape == (q.shape[0] + 1,) and lims[0] == 0 and lims[-1] == d.size == ids.size
        for i in range(q.shape[0]):
            expect = np.flatnonzero(dist[i] <= radius)
            expect = expect[np.lexsort((expect, dist[i, expect]))]
            np.testing.assert_array_equal(ids[lims[i] : lims[i + 1]], expect)
            np.testing.assert_array_equal(d[lims[i] : lims[i + 1]], dist[i, expect])
    # radius == bits returns everything
    lims, _, _ = index.range_search(pack_codes(q), bits)
    assert np.all(np.diff(lims) == db.shape[0])


def test_padded_input_gives_identical_results() -> None:
    bits = 100
    db, q, _ = tied_setup(bits)
    index = BinaryIndex.from_packed(pack_codes(db), bits)
    a = index.search(pack_codes(q), 10)
    b = index.search(pad_packed(pack_codes(q), bits), 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = BinaryIndex.from_packed(pad_packed(pack_codes(db), bits), bits)
    np.testing.assert_array_equal(other.search(pack_codes(q), 10)[1], a[1])


# ------------------------------------------------------------------ k > ntotal, empty, incremental


def test_k_larger_than_ntotal_is_padded() -> None:
    rng = np.random.default_rng(1)
    db = pack_codes(rng.choice([-1, 1], size=(3, 32)))
    index = BinaryIndex.from_packed(db, 32)
    d, ids = index.search(db[:2], 5)
    assert np.all(ids[:, 3:] == -1) and np.all(d[:, 3:] == np.iinfo(np.int32).max)
    assert np.all(ids[:, :3] >= 0) and np.all(d[:, :3] <= 32)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_empty_index_search_is_all_padding(kind: str) -> None:
    index = BinaryIndex(16, kind)
    assert index.ntotal == 0
    q = pack_codes(np.ones((2, 16)))
    d, ids = index.search(q, 3)
    assert ids.shape == (2, 3) and np.all(ids == -1) and np.all(d == MISSING_DISTANCE)
    if kind == "flat":
        lims, d, ids = index.range_search(q, 16)
        assert lims.tolist() == [0, 0, 0] and d.size == ids.size == 0


def test_zero_queries_give_empty_results() -> None:
    index = BinaryIndex.from_packed(pack_codes(np.ones((4, 16))), 16)
    d, ids = index.search(np.zeros((0, 2), np.uint8), 3)
    assert d.shape == ids.shape == (0, 3)


def test_incremental_add_equals_single_add() -> None:
    rng = np.random.default_rng(2)
    db = pack_codes(tied_codes(rng, 200, 48))
    a = BinaryIndex(48)
    a.add(db[:50])
    a.add(db[50:])
    b = BinaryIndex.from_packed(db, 48)
    assert a.ntotal == b.ntotal == 200
    np.testing.assert_array_equal(a.search(db[:20], 30)[1], b.search(db[:20], 30)[1])


# ------------------------------------------------------------------ approximate kinds


def test_ivf_with_all_lists_probed_equals_flat() -> None:
    rng = np.random.default_rng(3)
    bits = 64
    db = pack_codes(rng.choice([-1, 1], size=(2000, bits)))
    q = pack_codes(rng.choice([-1, 1], size=(40, bits)))
    ivf = BinaryIndex.from_packed(db, bits, "ivf")
    nlist = ivf.params["nlist"]
    assert nlist == BinaryIndex.default_nlist(2000) and 1 <= nlist <= 2000 // 39
    ivf.set_params(nprobe=nlist)
    flat = BinaryIndex.from_packed(db, bits)
    d_ivf, ids_ivf = ivf.search(q, 20)
    d_flat, _ = flat.search(q, 20)
    np.testing.assert_array_equal(d_ivf, d_flat)
    true = brute_hamming(pack_to_pm1(q, bits), pack_to_pm1(db, bits))
    np.testing.assert_array_equal(np.take_along_axis(true, ids_ivf, 1), d_ivf)
    for radius in (20, 28):
        a, b = ivf.range_search(q, radius), flat.range_search(q, radius)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def pack_to_pm1(packed: np.ndarray, bits: int) -> np.ndarray:
    from crossret.retrieval import unpack_codes

    return unpack_codes(packed, bits)


def test_ivf_explicit_construction_needs_training() -> None:
    rng = np.random.default_rng(4)
    db = pack_codes(rng.choice([-1, 1], size=(400, 32)))
    index = BinaryIndex(32, "ivf", nlist=4, nprobe=4)
    assert not index.is_trained and index.needs_training
    assert not BinaryIndex(32).needs_training and not BinaryIndex(32, "hnsw").needs_training
    with pytest.raises(ConfigError, match="not trained"):
        index.search(db[:1], 1)
    with pytest.raises(ConfigError, match="not trained"):
        index.add(db)
    index.train(db)
    assert not index.needs_training
    index.add(db)
    assert index.ntotal == 400
    lazy = BinaryIndex(32, "ivf")  # nlist chosen from the training-set size
    lazy.train(db)
    assert lazy.params["nlist"] == BinaryIndex.default_nlist(400)
    with pytest.raises(ConfigError, match="at least nlist"):
        BinaryIndex.from_packed(db[:3], 32, "ivf", nlist=8)


def test_hnsw_recall_at_10() -> None:
    rng = np.random.default_rng(5)
    bits = 64
    centers = rng.choice([-1, 1], size=(40, bits))
    db_pm1 = centers[rng.integers(0, 40, 2000)]
    flips = rng.random(db_pm1.shape) < 0.1
    db = pack_codes(np.where(flips, -db_pm1, db_pm1))
    q = db[rng.choice(2000, 100, replace=False)]
    d_flat, _ = BinaryIndex.from_packed(db, bits).search(q, 10)
    d_hnsw, _ = BinaryIndex.from_packed(db, bits, "hnsw", M=16, efSearch=64).search(q, 10)
    # Distance-based recall: a result counts when it is as close as the true 10th neighbour (robust to ties).
    recall = np.mean(d_hnsw <= d_flat[:, -1:])
    assert recall >= 0.9


@pytest.mark.parametrize("kind", ["BIVF8", "BHNSW16", "BFlat"])
def test_faiss_factory_strings(kind: str) -> None:
    rng = np.random.default_rng(6)
    db = pack_codes(rng.choice([-1, 1], size=(800, 100)))
    index = BinaryIndex.from_packed(db, 100, kind)
    d, ids = index.search(db[:5], 3)
    assert np.all(ids[:, 0] == np.arange(5)) and np.all(d[:, 0] == 0)


def test_multihash_results_are_a_subset_of_exact() -> None:
    rng = np.random.default_rng(12)
    bits = 48
    centers = rng.choice([-1, 1], size=(30, bits))
    db_pm1 = centers[rng.integers(0, 30, 3000)]
    db_pm1 = np.where(rng.random(db_pm1.shape) < 0.08, -db_pm1, db_pm1)
    db, q = pack_codes(db_pm1), pack_codes(db_pm1[:40])
    true = brute_hamming(db_pm1[:40], db_pm1)
    d_flat, _ = BinaryIndex.from_packed(db, bits).search(q, 20)
    index = BinaryIndex.from_packed(db, bits, "multihash", b=12, nhash=3)
    assert index.params == {"b": 12, "nhash": 3, "nflip": 0} and index.is_trained
    for nflip in (0, 1, 2):
        index.set_params(nflip=nflip)
        d, ids = index.search(q, 20)
        found = ids >= 0
        # every result is a real item at its true distance, rows sorted, never closer than exact
        np.testing.assert_array_equal(np.where(found, np.take_along_axis(true, np.maximum(ids, 0), 1), d), d)
        assert np.all(np.diff(d, axis=1) >= 0) and np.all(d >= d_flat)
        assert np.all(found[:, 0]) and np.all(d[:, 0] == 0)  # each query is in the database
        for row_ids in ids:  # no item twice
            assert len(set(row_ids[row_ids >= 0].tolist())) == int((row_ids >= 0).sum())
        lims, rd, rids = index.range_search(q, 6)
        assert rd.size and rd.max() <= 6
        flat_lims, _, flat_ids = BinaryIndex.from_packed(db, bits).range_search(q, 6)
        for i in range(len(q)):
            assert set(rids[lims[i]:lims[i + 1]].tolist()) <= set(flat_ids[flat_lims[i]:flat_lims[i + 1]].tolist())
    # flipping every bit of one key enumerates all buckets: the candidates are the whole database
    full = BinaryIndex.from_packed(db, bits, "multihash", b=4, nhash=1, nflip=4)
    np.testing.assert_array_equal(full.search(q, 20)[0], d_flat)


def test_packed_key_sort_equals_lexsort() -> None:
    from crossret.retrieval.index import _sort_binary_rows, _sort_rows

    rng = np.random.default_rng(13)
    dist = rng.integers(0, 5, (50, 30)).astype(np.int32)
    internal = rng.permutation(5000)[:1500].reshape(50, 30).astype(np.int64)
    internal[::7, -4:] = -1  # missing slots, some with faiss' int32-min distance
    dist[::14, -4:] = np.iinfo(np.int32).min
    expected = _sort_rows(np.where(internal < 0, MISSING_DISTANCE, dist).astype(np.int32), internal)
    for got in (_sort_binary_rows(dist, internal),
                _sort_binary_rows(dist, np.where(internal == internal.max(), 1 << 40, internal))):
        np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(_sort_binary_rows(dist, internal)[1], expected[1])


def test_multihash_parameter_checks() -> None:
    assert BinaryIndex(48, "multihash").params == {"b": 16, "nhash": 3, "nflip": 0}
    assert BinaryIndex(8, "multihash").params == {"b": 8, "nhash": 1, "nflip": 0}
    with pytest.raises(ConfigError, match="exceeds the 48-bit"):
        BinaryIndex(48, "multihash", b=16, nhash=4)  # 64 bits: the last table would hash the padding
    with pytest.raises(ConfigError, match="exceeds the 48-bit"):
        BinaryIndex(48, "multihash", b=49)
    with pytest.raises(ConfigError, match="nflip"):
        BinaryIndex(48, "multihash", b=4, nflip=5)
    with pytest.raises(ConfigError, match="unknown parameter"):
        BinaryIndex(48, "multihash", nprobe=2)
    with pytest.raises(ConfigError, match="nflip applies to multi-hash"):
        BinaryIndex(48).set_params(nflip=1)
    index = BinaryIndex(48, "multihash", b=4)
    with pytest.raises(ConfigError, match="cannot exceed"):
        index.set_params(nflip=5)
    assert index.params["nflip"] == 0 and index._faiss_index.nflip == 0


# ------------------------------------------------------------------ user ids


def test_user_ids_are_returned_and_validated() -> None:
    rng = np.random.default_rng(7)
    db = pack_codes(tied_codes(rng, 50, 32))
    user = np.arange(50, dtype=np.int64) * 10 + 1000
    index = BinaryIndex.from_packed(db, 32, ids=user)
    plain = BinaryIndex.from_packed(db, 32)
    d, ids = index.search(db[:5], 60)
    d0, ids0 = plain.search(db[:5], 60)
    np.testing.assert_array_equal(d, d0)
    np.testing.assert_array_equal(ids, np.where(ids0 >= 0, user[np.maximum(ids0, 0)], -1))
    lims, _, rids = index.range_search(db[:5], 3)
    lims0, _, rids0 = plain.range_search(db[:5], 3)
    np.testing.assert_array_equal(lims, lims0)
    np.testing.assert_array_equal(rids, user[rids0])
    with pytest.raises(ConfigError, match="every add"):
        index.add(db[:2])
    with pytest.raises(ConfigError, match="unique"):
        index.add(db[:1], ids=[1000])
    with pytest.raises(ConfigError, match=">= 0"):
        BinaryIndex(32).add(db[:1], ids=[-5])
    with pytest.raises(ConfigError, match="1-D"):
        BinaryIndex(32).add(db[:2], ids=[1])


# ------------------------------------------------------------------ persistence


KINDS = [("flat", {}), ("ivf", {"nprobe": 3}), ("hnsw", {"M": 8}), ("BIVF8", {}), ("BHNSW8", {}),
         ("multihash", {"b": 10, "nflip": 2})]


@pytest.mark.parametrize(("kind", "params"), KINDS)
@pytest.mark.parametrize("with_ids", [False, True])
def test_save_load_round_trip(tmp_path: Path, kind: str, params: dict, with_ids: bool) -> None:
    rng = np.random.default_rng(8)
    bits = 100
    db = pack_codes(rng.choice([-1, 1], size=(900, bits)))
    user = rng.permutation(10_000)[:900].astype(np.int64) if with_ids else None
    index = BinaryIndex.from_packed(db, bits, kind, ids=user, **params)
    path = tmp_path / "codes.crbin"
    assert index.save(path) == path
    loaded = BinaryIndex.load(path)
    assert (loaded.bits, loaded.kind, loaded.ntotal, loaded.params) == (bits, kind, 900, index.params)
    q = db[:30]
    for a, b in zip(index.search(q, 15), loaded.search(q, 15), strict=True):
        np.testing.assert_array_equal(a, b)
    if "HNSW" not in kind.upper():
        for a, b in zip(index.range_search(q, 40), loaded.range_search(q, 40), strict=True):
            np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["codes.crbin"]  # no temp files left behind
    header = read_index_header(path)
    assert header["bits"] == bits and header["padded_bits"] == 128 and header["bit_order"] == "lsb-first"
    assert header["ntotal"] == 900 and header["faiss_version"] == faiss.__version__
    assert header["index_type"] == "binary" and len(header["sha256"]) == 64


def test_save_overwrites_atomically_and_is_not_pickle(tmp_path: Path) -> None:
    db = pack_codes(np.ones((3, 16)))
    path = tmp_path / "i.idx"
    path.write_bytes(b"old")
    BinaryIndex.from_packed(db, 16).save(path)
    data = path.read_bytes()
    assert data.startswith(b"CRBINIDX")
    assert not data.startswith(b"\x80")  # pickle protocol 2+ opcode
    with pytest.raises(Exception):  # noqa: B017 - any failure is fine: it must not unpickle
        pickle.loads(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.idx"]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    rng = np.random.default_rng(9)
    path = tmp_path / "victim.crbin"
    BinaryIndex.from_packed(pack_codes(rng.choice([-1, 1], size=(200, 64))), 64).save(path)
    return path


def _header_span(data: bytes) -> tuple[int, int]:
    (hlen,) = struct.unpack_from("<Q", data, 12)
    return 20, 20 + hlen


@pytest.mark.parametrize("cut", ["magic", "prefix", "header", "payload", "last_byte"])
def test_truncated_file(saved: Path, cut: str) -> None:
    data = saved.read_bytes()
    start, end = _header_span(data)
    keep = {"magic": 4, "prefix": 10, "header": (start + end) // 2, "payload": end + 100,
            "last_byte": len(data) - 1}[cut]
    saved.write_bytes(data[:keep])
    with pytest.raises(FileFormatError, match="truncated") as info:
        BinaryIndex.load(saved)
    assert saved.name in str(info.value)


def test_flipped_payload_byte(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-50] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum mismatch") as info:
        BinaryIndex.load(saved)
    assert saved.name in str(info.value)


def test_wrong_magic(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(b"NOTMAGIC" + data[8:])
    with pytest.raises(FileFormatError, match="not a crossret index file") as info:
        BinaryIndex.load(saved)
    assert saved.name in str(info.value)
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(FileFormatError, match="not a crossret index file"):
        BinaryIndex.load(npy)
    with pytest.raises(FileFormatError, match="no such index file"):
        BinaryIndex.load(tmp_path / "missing.idx")


def test_garbage_header(saved: Path) -> None:
    data = saved.read_bytes()
    start, end = _header_span(data)
    saved.write_bytes(data[:start] + b"\xff{garbage" * ((end - start) // 9) + b"x" * ((end - start) % 9)
                      + data[end:])
    with pytest.raises(FileFormatError, match="garbage header") as info:
        BinaryIndex.load(saved)
    assert saved.name in str(info.value)


def test_header_with_missing_field(saved: Path) -> None:
    data = saved.read_bytes()
    start, end = _header_span(data)
    header = data[start:end].replace(b'"sha256"', b'"sha999"')
    saved.write_bytes(data[:start] + header + data[end:])
    with pytest.raises(FileFormatError, match="sha256"):
        BinaryIndex.load(saved)


def test_future_version(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    struct.pack_into("<I", data, 8, 99)
    saved.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="newer crossret format version 99") as info:
        BinaryIndex.load(saved)
    assert saved.name in str(info.value)


def test_header_disagreeing_with_payload(saved: Path) -> None:
    data = saved.read_bytes()
    start, end = _header_span(data)
    header = data[start:end].replace(b'"ntotal": 200', b'"ntotal": 201')
    assert header != data[start:end]
    saved.write_bytes(data[:start] + header + data[end:])
    with pytest.raises(FileFormatError, match="201 items"):
        BinaryIndex.load(saved)


def test_loading_the_other_index_type(tmp_path: Path) -> None:
    path = tmp_path / "dense.idx"
    DenseIndex.from_embeddings(np.eye(4, dtype=np.float32)).save(path)
    with pytest.raises(FileFormatError, match=r"DenseIndex\.load"):
        BinaryIndex.load(path)
    bpath = tmp_path / "bin.idx"
    BinaryIndex.from_packed(pack_codes(np.ones((2, 8))), 8).save(bpath)
    with pytest.raises(FileFormatError, match=r"BinaryIndex\.load"):
        DenseIndex.load(bpath)


# ------------------------------------------------------------------ input errors


@pytest.fixture
def index64() -> BinaryIndex:
    rng = np.random.default_rng(10)
    return BinaryIndex.from_packed(pack_codes(rng.choice([-1, 1], size=(20, 64))), 64)


def test_wrong_dtype(index64: BinaryIndex) -> None:
    with pytest.raises(CodeError, match="uint8"):
        index64.search(np.zeros((2, 8), dtype=np.int64), 1)
    with pytest.raises(CodeError, match="uint8"):
        index64.add(np.zeros((2, 64), dtype=np.float32))


def test_mismatched_code_length_names_both(index64: BinaryIndex) -> None:
    q = pack_codes(np.ones((2, 16)))
    with pytest.raises(CodeError, match="16 bits") as info:
        index64.search(q, 1)
    assert "64-bit" in str(info.value)
    with pytest.raises(CodeError, match="do not match"):
        index64.add(pack_codes(np.ones((2, 128))))
    with pytest.raises(CodeError, match="2-D"):
        index64.search(np.zeros(8, np.uint8), 1)


def test_set_padding_bits_rejected() -> None:
    index = BinaryIndex.from_packed(pack_codes(np.ones((3, 7))), 7)
    bad = np.array([[0x80]], dtype=np.uint8)  # bit 7 of a 7-bit code
    with pytest.raises(CodeError, match="beyond"):
        index.search(bad, 1)
    with pytest.raises(CodeError, match="beyond"):
        BinaryIndex.from_packed(bad, 7)
    padded = np.zeros((1, 8), np.uint8)
    padded[0, 5] = 1  # a padding byte of the 64-bit padded form
    with pytest.raises(CodeError, match="padding"):
        index.search(padded, 1)


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3"])
def test_bad_k(index64: BinaryIndex, k: object) -> None:
    with pytest.raises(ConfigError, match="k must be"):
        index64.search(pack_codes(np.ones((1, 64))), k)  # type: ignore[arg-type]


def test_bad_radius_kind_and_params(index64: BinaryIndex) -> None:
    q = pack_codes(np.ones((1, 64)))
    with pytest.raises(ConfigError, match="radius"):
        index64.range_search(q, -1)
    with pytest.raises(ConfigError, match="unknown index kind"):
        BinaryIndex(64, "nonsense")
    with pytest.raises(ConfigError, match="unknown parameter"):
        BinaryIndex(64, "flat", nprobe=3)
    with pytest.raises(ConfigError, match="nlist must be"):
        BinaryIndex(64, "ivf", nlist=0)
    with pytest.raises(ConfigError, match="nprobe applies to IVF"):
        BinaryIndex(64, "BHNSW8", nprobe=3)
    with pytest.raises(CodeError, match="positive integer"):
        BinaryIndex(0)
    hnsw = BinaryIndex.from_packed(pack_codes(np.ones((3, 64))), 64, "hnsw")
    with pytest.raises(ConfigError, match="not supported"):
        hnsw.range_search(q, 3)
    with pytest.raises(ConfigError, match="nprobe applies to IVF"):
        hnsw.set_params(nprobe=2)
    assert "nprobe" not in hnsw.params


# ------------------------------------------------------------------ DenseIndex


def test_dense_flat_matches_numpy() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    q = rng.standard_normal((20, 24)).astype(np.float32)
    index = DenseIndex.from_embeddings(x)
    scores, ids = index.search(q, 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    ref = q @ x.T
    ref_ids = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_ids, 1), rtol=1e-5, atol=1e-5)


def test_dense_normalize_is_cosine_and_pads() -> None:
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 8)) * rng.uniform(0.1, 10, (5, 1))  # float64, varied norms
    index = DenseIndex.from_embeddings(x, normalize=True)
    scores, ids = index.search(x[:2] * 7.0, 7)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = xn[:2] @ xn.T
    np.testing.assert_allclose(scores[:, :5], np.take_along_axis(cos, ids[:, :5], 1), atol=1e-5)
    assert np.all(ids[:, 0] == [0, 1]) and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(ids[:, 5:] == -1) and np.all(np.isneginf(scores[:, 5:]))


def test_dense_ties_in_id_order() -> None:
    x = np.ones((6, 4), dtype=np.float32)
    _, ids = DenseIndex.from_embeddings(x).search(x[:1], 6)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize(("kind", "normalize"), [("flat", False), ("hnsw", True)])
def test_dense_save_load(tmp_path: Path, kind: str, normalize: bool) -> None:
    rng = np.random.default_rng(13)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    index = DenseIndex.from_embeddings(x, kind, normalize, ids=np.arange(500) + 7)
    path = tmp_path / "dense.crdns"
    index.save(path)
    loaded = DenseIndex.load(path)
    assert (loaded.dim, loaded.kind, loaded.normalize, loaded.ntotal) == (16, kind, normalize, 500)
    for a, b in zip(index.search(x[:20], 5), loaded.search(x[:20], 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert path.read_bytes().startswith(b"CRDNSIDX")
    assert read_index_header(path)["index_type"] == "dense"
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum mismatch"):
        DenseIndex.load(path)


def test_dense_hnsw_recall() -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    q = rng.standard_normal((50, 32)).astype(np.float32)
    _, exact = DenseIndex.from_embeddings(x, normalize=True).search(q, 10)
    _, approx = DenseIndex.from_embeddings(x, "hnsw", normalize=True).search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def test_dense_input_errors() -> None:
    x = np.ones((4, 8), dtype=np.float32)
    index = DenseIndex.from_embeddings(x)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        index.add(bad)
    with pytest.raises(DataError, match="NaN"):
        index.search(bad, 1)
    with pytest.raises(DataError, match="NaN"):
        DenseIndex.from_embeddings(np.full((2, 3), np.inf))
    with pytest.raises(DataError, match="dimension 5"):
        index.search(np.ones((2, 5), np.float32), 1)
    with pytest.raises(DataError, match="2-D"):
        index.search(np.ones(8, np.float32), 1)
    with pytest.raises(DataError, match="real-valued"):
        index.search(np.array([["a"] * 8]), 1)
    with pytest.raises(DataError, match="normalised"):
        DenseIndex.from_embeddings(np.zeros((2, 3)), normalize=True)
    with pytest.raises(ConfigError, match="k must be"):
        index.search(x, 0)
    with pytest.raises(ConfigError, match="unknown dense index kind"):
        DenseIndex(8, "ivf")
    with pytest.raises(DataError, match="positive integer"):
        DenseIndex(0)


def test_empty_index_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "empty.idx"
    BinaryIndex(100).save(path)
    loaded = BinaryIndex.load(path)
    assert loaded.ntotal == 0 and loaded.bits == 100
    loaded.add(pack_codes(np.ones((2, 100))), ids=[5, 9])  # an empty index may still start using ids
    assert loaded.search(pack_codes(np.ones((1, 100))), 3)[1].tolist() == [[5, 9, -1]]
    with pytest.raises(ConfigError, match="not trained"):
        BinaryIndex(64, "ivf").save(tmp_path / "untrained.idx")


# ------------------------------------------------------------------ numba flat kernel (hamming_topk)

TOPK_BITS = [8, 32, 48, 64, 100, 128, 256]


def few_distinct_packed(rng: np.random.Generator, n: int, bits: int, distinct: int = 5) -> np.ndarray:
    """Packed codes drawn from a few distinct codes: every distance is shared by many items."""
    pool = pack_codes(rng.choice([-1, 1], size=(distinct, bits)).astype(np.int8))
    return pool[rng.integers(0, distinct, n)]


def numpy_topk_reference(q_packed: np.ndarray, db_packed: np.ndarray, bits: int,
                         k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force with numpy popcounts: top-k by (distance, position), padded like the index."""
    from crossret.retrieval.packing import packed_to_words

    qw, dw = packed_to_words(q_packed, bits), packed_to_words(db_packed, bits)
    dist = np.bitwise_count(qw[:, None, :] ^ dw[None, :, :]).sum(axis=2, dtype=np.int64)
    return brute_knn(dist, k)


@pytest.mark.parametrize("bits", TOPK_BITS)
def test_numba_flat_search_matches_numpy_reference(bits: int) -> None:
    rng = np.random.default_rng(bits)
    n = 900
    db = few_distinct_packed(rng, n, bits)
    queries = np.vstack([few_distinct_packed(rng, 6, bits), pack_codes(rng.choice([-1, 1], size=(3, bits)))])
    index = BinaryIndex.from_packed(db, bits)
    for rows in (slice(0, 1), slice(None)):
        for k in (1, 37, n, n + 5):
            d, ids = index.search(queries[rows], k)
            ref_d, ref_ids = numpy_topk_reference(queries[rows], db, bits, k)
            np.testing.assert_array_equal(d, ref_d)
            np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.slow  # 12 cases over 140k codes
@pytest.mark.parametrize("bits", [32, 64, 128, 256])
@pytest.mark.parametrize("n_queries", [1, 3, 40])
def test_numba_flat_chunked_and_threaded_paths_agree(bits: int, n_queries: int) -> None:
    # > 2 x 65,536 items so that few queries split the database into chunks across threads; the
    # serial, per-query and per-chunk paths must give identical results (ties by position).
    from crossret.retrieval.hamming import hamming_topk
    from crossret.retrieval.packing import packed_to_words

    rng = np.random.default_rng(7)
    n = 140_003
    db = few_distinct_packed(rng, n, bits, distinct=12)
    queries = few_distinct_packed(rng, n_queries, bits, distinct=12)
    dw, qw = packed_to_words(db, bits), packed_to_words(queries, bits)
    dist = np.bitwise_count(qw[:, None, :] ^ dw[None, :, :]).sum(axis=2, dtype=np.int64)
    for k in (1, 100, 5000):
        ref_d, ref_ids = brute_knn(dist, k)
        for threads in (1, 2, 3):
            d, ids = hamming_topk(qw, dw, k, threads=threads)
            np.testing.assert_array_equal(d, ref_d)
            np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.parametrize("bits", [8, 48, 64, 128])
def test_numba_flat_search_equals_faiss_flat(bits: int) -> None:
    from crossret.retrieval.hamming import hamming_distances

    rng = np.random.default_rng(100 + bits)
    db = pack_codes(rng.choice([-1, 1], size=(5000, bits)))
    queries = pack_codes(rng.choice([-1, 1], size=(20, bits)))
    index = BinaryIndex.from_packed(db, bits)
    raw = faiss.IndexBinaryFlat(index.padded_bits)
    raw.add(pad_packed(db, bits))
    for k in (1, 100, 5000):
        d, ids = index.search(queries, k)
        fd, fi = raw.search(pad_packed(queries, bits), k)
        np.testing.assert_array_equal(d, fd)  # faiss returns each row sorted by distance
        # Items strictly closer than the k-th distance are the same set (the tied ones at the k-th
        # distance are the first by position in ours; faiss' heap is not bound to that).
        for row in range(queries.shape[0]):
            cut = d[row, -1]
            assert set(ids[row][d[row] < cut]) == set(fi[row][fd[row] < cut])
        np.testing.assert_array_equal(np.take_along_axis(hamming_distances(queries, db, bits), ids, 1), d)


def test_numba_flat_search_custom_ids_and_save_load(tmp_path: Path) -> None:
    bits = 48
    rng = np.random.default_rng(3)
    db = few_distinct_packed(rng, 700, bits, distinct=4)
    queries = few_distinct_packed(rng, 5, bits, distinct=4)
    user_ids = rng.permutation(10_000)[:700].astype(np.int64) + 5
    index = BinaryIndex(bits)
    index.add(db[:300], ids=user_ids[:300])
    index.add(db[300:], ids=user_ids[300:])
    ref_d, ref_pos = numpy_topk_reference(queries, db, bits, 710)
    ref_ids = np.where(ref_pos >= 0, user_ids[np.maximum(ref_pos, 0)], -1)
    path = index.save(tmp_path / "flat.crbi")
    loaded = BinaryIndex.load(path)
    assert read_index_header(path)["kind"] == "flat"
    for idx in (index, loaded):
        for k in (1, 250, 710):
            d, ids = idx.search(queries, k)
            np.testing.assert_array_equal(d, ref_d[:, :k])
            np.testing.assert_array_equal(ids, ref_ids[:, :k])
    empty = BinaryIndex(bits)
    d, ids = empty.search(queries, 3)
    assert (d == MISSING_DISTANCE).all() and (ids == -1).all()


# ------------------------------------------------------------------ sizes checked before faiss allocates


def test_faiss_kinds_search_with_k_clipped_to_the_database_and_pad_the_rest():
    """faiss sizes per-query heaps by k (HNSW: 100M slots -> std::bad_alloc); the index asks faiss for at
    most ntotal results and pads the rest, with the same answer as before."""
    rng = np.random.default_rng(3)
    codes = pack_codes(rng.choice([-1, 1], size=(40, 16)))
    class Spy:
        """The faiss index, recording the k of every search."""

        def __init__(self, real):
            self.real, self.seen = real, []

        def __getattr__(self, name):
            return getattr(self.real, name)

        def search(self, queries, k):
            self.seen.append(k)
            return self.real.search(queries, k)

    for kind, params in (("hnsw", {}), ("ivf", {"nlist": 2, "nprobe": 2})):
        index = BinaryIndex.from_packed(codes, 16, kind, **params)
        index._faiss_index = spy = Spy(index._faiss_index)
        seen = spy.seen
        dist, ids = index.search(codes[:3], 40 + 1000)
        assert seen == [40], "faiss was asked for more results than the index holds"
        assert dist.shape == ids.shape == (3, 1040)
        assert (ids[:, 40:] == -1).all() and (dist[:, 40:] == MISSING_DISTANCE).all()
        full_d, full_i = index.search(codes[:3], 40)
        assert np.array_equal(dist[:, :40], full_d) and np.array_equal(ids[:, :40], full_i)


def test_k_far_beyond_the_database_is_refused_for_every_kind():
    codes = pack_codes(np.ones((5, 16)))
    for kind in ("flat", "hnsw", "ivf"):
        index = BinaryIndex.from_packed(codes, 16, kind, **({"nlist": 1} if kind == "ivf" else {}))
        with pytest.raises(ConfigError, match=r"k=2000000000 exceeds the 5 database items"):
            index.search(codes, 2_000_000_000)
    dense = DenseIndex.from_embeddings(np.eye(4, dtype=np.float32), "hnsw")
    with pytest.raises(ConfigError, match=r"k=2000000000 exceeds the 4 database items"):
        dense.search(np.eye(4, dtype=np.float32), 2_000_000_000)
    scores, ids = dense.search(np.eye(4, dtype=np.float32)[:1], 6)  # a few padded slots are fine
    assert ids.shape == (1, 6) and (ids[0, 4:] == -1).all() and np.isneginf(scores[0, 4:]).all()


@pytest.mark.parametrize(("kind", "params", "named"), [
    ("hnsw", {"M": 2**31 - 1}, "M=2147483647"),
    ("hnsw", {"efConstruction": 2**30}, "efConstruction=1073741824"),
    ("hnsw", {"efSearch": 2**30}, "efSearch=1073741824"),
    ("multihash", {"b": 64, "nhash": 1, "nflip": 20}, "nflip=20"),
    ("BHNSW2000000000", {}, "M=2000000000"),
    ("BIVF99999999999", {}, "99999999999"),
])
def test_index_sizes_beyond_any_use_are_refused_before_faiss_sees_them(kind, params, named):
    with pytest.raises(ConfigError, match=named):
        BinaryIndex(64, kind, **params)


def test_set_params_refuses_a_runaway_efsearch_and_keeps_the_old_one():
    index = BinaryIndex.from_packed(pack_codes(np.ones((3, 16))), 16, "hnsw")
    with pytest.raises(ConfigError, match="efSearch=1073741824"):
        index.set_params(efSearch=2**30)
    assert index.params["efSearch"] == 64 and index._faiss_index.hnsw.efSearch == 64
    with pytest.raises(ConfigError, match="efSearch"):
        DenseIndex(4, "hnsw").set_params(efSearch=2**30)


def test_ivf_lists_and_hnsw_graphs_are_checked_against_memory(monkeypatch):
    import crossret.limits as limits

    monkeypatch.setattr(limits, "available_memory", lambda: 1 << 20)  # 1 MiB left
    with pytest.raises(ConfigError, match=r"nlist=100000: the IVF lists needs about .* only 1.0 MiB"):
        BinaryIndex(64, "ivf", nlist=100_000)
    with pytest.raises(ConfigError, match="nlist=100000"):
        BinaryIndex(64, "BIVF100000")
    index = BinaryIndex(64, "hnsw", M=4096)
    with pytest.raises(ConfigError, match=r"HNSW graph of 1000 items with M=4096"):
        index.add(pack_codes(np.ones((1000, 64))))
    assert index.ntotal == 0


def test_code_length_beyond_the_maximum_is_refused():
    from crossret.limits import MAX_BITS

    BinaryIndex(MAX_BITS)
    with pytest.raises(CodeError, match=f"longest supported code length of {MAX_BITS}"):
        BinaryIndex(MAX_BITS + 1)


def test_dense_index_metadata_round_trips_and_a_damaged_entry_is_refused(tmp_path):
    meta = {"paths": ["/data/a.jpg", "/data/b.jpg"], "model_sha256": "ab" * 32}
    index = DenseIndex.from_embeddings(np.eye(2, dtype=np.float32))
    index.meta = meta
    path = tmp_path / "gallery.crdi"
    index.save(path)
    assert DenseIndex.load(path).meta == meta
    raw = path.read_bytes()
    # Same length, another image: the payload checksum does not see it, the metadata checksum does.
    path.write_bytes(raw.replace(b"/data/b.jpg", b"/data/c.jpg"))
    with pytest.raises(FileFormatError, match="metadata does not match its checksum"):
        DenseIndex.load(path)
