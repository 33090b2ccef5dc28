"""Streaming encode, batched index builds, recall@k, and the `crossret index encode|build|recall` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _cli import cli
from crossret.data.domain import Domain
from crossret.errors import CodeError, ConfigError, DataError
from crossret.hashing import make_method
from crossret.hashing.encoding import encode_to_packed
from crossret.retrieval import BinaryIndex, pack_codes, unpack_codes
from crossret.retrieval.streaming import (
    build_index_from_packed,
    open_features,
    read_packed_codes,
    recall_at_k,
    sidecar_path,
)

DIM = 24


@pytest.fixture(scope="module")
def method():
    """A fitted LSH with a code length that is neither a multiple of 8 nor of 64."""
    rng = np.random.default_rng(0)
    src = Domain("s", rng.standard_normal((200, DIM)).astype(np.float32), rng.integers(0, 3, 200))
    tgt = Domain("t", rng.standard_normal((150, DIM)).astype(np.float32), np.full(150, -1))
    return make_method("lsh", bits=20, seed=1).fit(src, tgt)


def raw_features(tmp_path: Path, n: int = 1000, seed: int = 1) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    path = tmp_path / "features.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    return path, x


# ------------------------------------------------------------------ streaming encode


def test_streamed_codes_equal_in_memory_codes(method, tmp_path: Path) -> None:
    path, x = raw_features(tmp_path)
    features = open_features(path, shape=x.shape, dtype="float32")
    assert isinstance(features, np.memmap)
    calls: list[tuple[int, int]] = []
    # 1000 rows in batches of 300: three full batches and a ragged one of 100.
    result = encode_to_packed(method, features, tmp_path / "codes.npy", batch_size=300,
                              progress=lambda step, total, msg="": calls.append((step, total)))
    expected = pack_codes(method.encode(x))
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), expected)
    assert (result.n, result.bits, result.width) == (1000, 20, 3)
    assert [s for s, _ in calls] == [0, 300, 600, 900, 1000] and {t for _, t in calls} == {1000}
    meta = json.loads(sidecar_path(tmp_path / "codes.npy").read_text())
    assert meta["bits"] == 20 and meta["n"] == 1000 and meta["bit_order"] == "lsb-first"
    # The same from a .npy path (opened memory-mapped inside).
    np.save(tmp_path / "x.npy", x)
    encode_to_packed(method, tmp_path / "x.npy", tmp_path / "codes2.npy", batch_size=1000)
    np.testing.assert_array_equal(np.load(tmp_path / "codes2.npy"), expected)


def test_nan_in_a_later_batch_leaves_no_output(method, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1000, DIM)).astype(np.float32)
    x[650, 3] = np.nan
    out = tmp_path / "codes.npy"
    with pytest.raises(DataError, match=r"rows 600\.\.899.*first at row 650"):
        encode_to_packed(method, x, out, batch_size=300)
    assert list(tmp_path.iterdir()) == []  # no output, no temp file, no sidecar
    # An existing output (and its sidecar) survive a failed re-encode untouched.
    encode_to_packed(method, x[:600], out, batch_size=300)
    before, side_before = out.read_bytes(), sidecar_path(out).read_text()
    with pytest.raises(DataError, match="rows 600"):
        encode_to_packed(method, x, out, batch_size=300)
    assert out.read_bytes() == before and sidecar_path(out).read_text() == side_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "codes.npy.json"]


def test_encode_input_errors(method, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expects 24"):
        encode_to_packed(method, np.zeros((5, 7), np.float32), tmp_path / "c.npy")
    with pytest.raises(ConfigError, match="batch_size"):
        encode_to_packed(method, np.zeros((5, DIM), np.float32), tmp_path / "c.npy", batch_size=0)
    with pytest.raises(DataError, match="not found"):
        open_features(tmp_path / "missing.npy")
    assert not (tmp_path / "c.npy").exists()


def test_read_packed_codes_takes_bits_from_the_sidecar(method, tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((50, DIM)).astype(np.float32)
    encode_to_packed(method, x, tmp_path / "c.npy")
    codes, bits = read_packed_codes(tmp_path / "c.npy")
    assert bits == 20 and codes.shape == (50, 3)
    with pytest.raises(CodeError, match="20-bit"):
        read_packed_codes(tmp_path / "c.npy", bits=24)
    sidecar_path(tmp_path / "c.npy").unlink()
    with pytest.raises(ConfigError, match="code length"):
        read_packed_codes(tmp_path / "c.npy")
    assert read_packed_codes(tmp_path / "c.npy", bits=20)[1] == 20


# ------------------------------------------------------------------ batched builds


def test_batched_build_equals_in_memory_build(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    db = pack_codes(rng.choice([-1, 1], size=(2500, 48)))
    np.save(tmp_path / "db.npy", db)
    q = db[:30]
    reference = BinaryIndex.from_packed(db, 48).search(q, 25)
    streamed = build_index_from_packed(tmp_path / "db.npy", 48, batch_size=700)  # ragged last batch
    assert streamed.ntotal == 2500
    for a, b in zip(reference, streamed.search(q, 25), strict=True):
        np.testing.assert_array_equal(a, b)
    ids = np.arange(2500, dtype=np.int64) * 3
    with_ids = build_index_from_packed(db, 48, batch_size=1000, ids=ids)
    np.testing.assert_array_equal(with_ids.search(q, 5)[1], ids[reference[1][:, :5]])
    # IVF: the training sample is seeded, so two builds agree; nlist comes from N, not the sample.
    a = build_index_from_packed(db, 48, "ivf", batch_size=600, seed=7, train_size=1000)
    b = build_index_from_packed(db, 48, "ivf", batch_size=600, seed=7, train_size=1000)
    assert a.params["nlist"] == BinaryIndex.default_nlist(2500)
    for x, y in zip(a.search(q, 10), b.search(q, 10), strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ConfigError, match="bits"):
        build_index_from_packed(db)


# ------------------------------------------------------------------ recall@k


def brute_recall(approx: BinaryIndex, db: np.ndarray, q: np.ndarray, bits: int, k: int) -> float:
    """Recall by brute force: a returned id is a hit when its true distance <= the true k-th distance."""
    qp, dp = unpack_codes(q, bits).astype(np.int64), unpack_codes(db, bits).astype(np.int64)
    true = (bits - qp @ dp.T) // 2
    kth = np.sort(true, axis=1)[:, k - 1]
    _, ids = approx.search(q, k)
    hits = [(np.take(true[i], ids[i][ids[i] >= 0]) <= kth[i]).sum() for i in range(len(q))]
    return float(np.mean(np.asarray(hits) / k))


def test_recall_flat_vs_flat_is_one_and_bad_ivf_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    bits = 32
    db = pack_codes(rng.choice([-1, 1], size=(3000, bits)))
    q = pack_codes(rng.choice([-1, 1], size=(40, bits)))
    flat = BinaryIndex.from_packed(db, bits)
    assert recall_at_k(flat, flat, q, 10) == 1.0
    bad = BinaryIndex.from_packed(db, bits, "ivf", nlist=32, nprobe=1)  # random codes, one list of 32
    recall = recall_at_k(bad, flat, q, 10)
    assert recall < 1.0
    assert recall == pytest.approx(brute_recall(bad, db, q, bits, 10), abs=1e-12)
    per_query = recall_at_k(bad, flat, q, 10, per_query=True)
    assert per_query.shape == (40,) and per_query.mean() == pytest.approx(recall)


def test_recall_counts_tied_items_as_hits() -> None:
    a, b = np.zeros((1, 16), np.int8) - 1, np.ones((1, 16), np.int8)
    db = pack_codes(np.vstack([a, a, a, b]))
    flat = BinaryIndex.from_packed(db, 16)
    # Same codes, other ids: returns a different one of the tied copies of `a` as its nearest item.
    other = BinaryIndex.from_packed(db[::-1].copy(), 16)
    assert not np.array_equal(flat.search(db[:1], 2)[1], other.search(db[:1], 2)[1])
    assert recall_at_k(other, flat, db[:1], 2) == 1.0
    assert recall_at_k(other, flat, db[:1], 10) == 1.0  # k > N: denominator is N
    with pytest.raises(ConfigError, match="exact flat"):
        recall_at_k(flat, BinaryIndex.from_packed(db, 16, "hnsw"), db[:1], 2)
    with pytest.raises(ConfigError, match="differ"):
        recall_at_k(flat, BinaryIndex.from_packed(db[:2], 16), db[:1], 2)


# ------------------------------------------------------------------ CLI




def test_cli_encode_build_search_recall(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = cli(monkeypatch, capsys, "run", "lsh", "--benchmark", "demo", "--bits", "20", "--out", run)
    assert code == 0, err
    from crossret.hashing.registry import load_method

    method = load_method(run / "model.npz")
    x = np.random.default_rng(6).standard_normal((900, method.input_dim)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    codes = tmp_path / "codes.npy"
    code, out, err = cli(monkeypatch, capsys, "index", "encode", "--run", run, "--features", tmp_path / "x.npy",
                         "--out", codes, "--batch-size", "256", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n"] == 900 and summary["bits"] == 20
    expected = pack_codes(method.encode(x))
    np.testing.assert_array_equal(np.load(codes), expected)
    # Raw float32 input with --shape gives the same file.
    x.tofile(tmp_path / "x.f32")
    code, _, err = cli(monkeypatch, capsys, "index", "encode", "--run", run, "--features", tmp_path / "x.f32",
                       "--shape", f"900,{method.input_dim}", "--out", tmp_path / "codes_raw.npy")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "codes_raw.npy"), expected)

    # build takes the code length from the sidecar; flat and multihash
    for kind, extra in (("flat", []), ("multihash", ["--param", "b=5", "--param", "nflip=1"])):
        code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", codes, "--kind", kind, *extra,
                           "--batch-size", "300", "--out", tmp_path / f"{kind}.crbi")
        assert code == 0, err
    flat = BinaryIndex.load(tmp_path / "flat.crbi")
    assert flat.bits == 20 and flat.ntotal == 900
    np.save(tmp_path / "q.npy", expected[:25])
    code, out, err = cli(monkeypatch, capsys, "index", "search", tmp_path / "flat.crbi", "--queries",
                         tmp_path / "q.npy", "-k", "4", "--json")
    assert code == 0, err
    assert np.all(np.asarray(json.loads(out.strip().splitlines()[-1])["distances"])[:, 0] == 0)
    code, out, err = cli(monkeypatch, capsys, "index", "recall", tmp_path / "multihash.crbi", "--exact",
                         tmp_path / "flat.crbi", "--queries", tmp_path / "q.npy", "-k", "5", "--param", "nflip=2",
                         "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    mh = BinaryIndex.load(tmp_path / "multihash.crbi")
    mh.set_params(nflip=2)
    assert result["recall"] == recall_at_k(mh, flat, expected[:25], 5) and 0 < result["recall"] <= 1
    assert result["params"] == {"b": 5, "nhash": 4, "nflip": 2}

    # errors: a bad --param, a bad row in the features, a run without a model
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", codes, "--kind", "multihash",
                       "--param", "b=x", "--out", tmp_path / "bad.crbi")
    assert code == 2 and "integers" in err
    x[700] = np.inf
    np.save(tmp_path / "x_bad.npy", x)
    code, _, err = cli(monkeypatch, capsys, "index", "encode", "--run", run, "--features", tmp_path / "x_bad.npy",
                       "--out", tmp_path / "bad.npy", "--batch-size", "256")
    assert code == 2 and "rows 512..767" in err and not (tmp_path / "bad.npy").exists()
    code, _, err = cli(monkeypatch, capsys, "index", "encode", "--run", tmp_path, "--features", tmp_path / "x.npy",
                       "--out", tmp_path / "bad.npy")
    assert code == 2 and "no model" in err
