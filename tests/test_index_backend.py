"""The index backend protocol (crossret.retrieval.backend): both backends against a brute force, the
registry, ``as_packed``, and the ``--backend milvus`` paths of the CLI and the service.

Milvus runs on the in-memory stand-in of tests/_milvus_fake.py (no pymilvus, no server needed); the
embedded-server tests in tests/test_milvus.py check the real thing.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cli import cli
from _milvus_fake import collection_meta, install
from crossret.errors import CodeError, ConfigError, DataError, FileFormatError, MissingExtraError
from crossret.retrieval import milvus as milvus_module
from crossret.retrieval.backend import (
    BACKENDS,
    IndexBackend,
    build_index,
    check_backend,
    create_index,
    get_backend,
    open_index,
)
from crossret.retrieval.index import MISSING_DISTANCE, MISSING_ID, BinaryIndex
from crossret.retrieval.milvus import LOCATOR_PREFIX, MilvusBinaryIndex, read_locator
from crossret.retrieval.packing import as_packed, as_pm1, check_packed, pack_codes

URI = "http://fake-milvus:19530"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    return install(monkeypatch, URI)


def random_packed(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return pack_codes(rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, bits)))


def distances(queries: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances (Q, N) of packed codes."""
    return np.unpackbits(queries[:, None, :] ^ db[None, :, :], axis=2).sum(axis=2).astype(np.int64)


def brute_topk(queries: np.ndarray, db: np.ndarray, k: int, ids: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """The first k items by (distance, position), padded with (MISSING_DISTANCE, -1)."""
    d = distances(queries, db)
    n = db.shape[0]
    out_d = np.full((len(queries), k), MISSING_DISTANCE, np.int32)
    out_i = np.full((len(queries), k), MISSING_ID, np.int64)
    for q in range(len(queries)):
        order = np.lexsort((np.arange(n), d[q]))[:k]
        out_d[q, : len(order)] = d[q, order]
        out_i[q, : len(order)] = order if ids is None else ids[order]
    return out_d, out_i


def brute_range(queries: np.ndarray, db: np.ndarray, radius: int, ids: np.ndarray | None = None
                ) -> list[list[tuple[int, int]]]:
    d = distances(queries, db)
    rows = []
    for q in range(len(queries)):
        hit = np.flatnonzero(d[q] <= radius)
        hit = hit[np.lexsort((hit, d[q, hit]))]
        rows.append([(int(d[q, i]), int(i if ids is None else ids[i])) for i in hit])
    return rows


def as_rows(lims: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> list[list[tuple[int, int]]]:
    assert lims.dtype == np.int64 and dist.dtype == np.int32 and ids.dtype == np.int64
    return [list(zip(dist[a:b].tolist(), ids[a:b].tolist(), strict=True)) for a, b in itertools.pairwise(lims)]


def make_backend(name: str, db: np.ndarray, bits: int, ids: np.ndarray | None = None) -> Any:
    if name == "local":
        return build_index(db, bits, backend="local", ids=ids)
    return build_index(db, bits, backend="milvus", ids=ids, uri=URI, batch_size=97)


# --------------------------------------------------------------------------------------------
# the protocol, on the same data


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("with_ids", [False, True])
def test_both_backends_equal_a_brute_force(fake: Any, name: str, with_ids: bool) -> None:
    rng = np.random.default_rng(1)
    bits = 12  # 4096 codes for 400 items: many ties at every distance
    db, queries = random_packed(rng, 400, bits), random_packed(rng, 25, bits)
    ids = rng.permutation(10_000)[:400].astype(np.int64) * 3 + 1 if with_ids else None
    index = make_backend(name, db, bits, ids)
    assert isinstance(index, IndexBackend)
    assert (index.bits, index.ntotal, index.kind) == (bits, 400, "flat")
    for k in (1, 7, 50, 450):  # 450 > ntotal: padded rows
        got_d, got_i = index.search(queries, k)
        ref_d, ref_i = brute_topk(queries, db, k, ids)
        assert got_d.dtype == np.int32 and got_i.dtype == np.int64
        np.testing.assert_array_equal(got_d, ref_d)
        np.testing.assert_array_equal(got_i, ref_i)
    for radius in (0, 2, 5, 12, 100):
        assert as_rows(*index.range_search(queries, radius)) == brute_range(queries, db, radius, ids)
    codes, stored_ids = index.stored_items()
    np.testing.assert_array_equal(codes, db)
    assert (stored_ids is None) == (ids is None)
    if ids is not None:
        np.testing.assert_array_equal(stored_ids, ids)
    index.close()


def test_milvus_range_search_pages_past_the_limits(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny limits force every path: a first answer that fills its limit, larger limits, then windows.
    monkeypatch.setattr(milvus_module, "MAX_TOPK", 16)
    monkeypatch.setattr(milvus_module, "_RANGE_FIRST_LIMIT", 4)
    rng = np.random.default_rng(2)
    bits = 8
    db = np.concatenate([random_packed(rng, 90, bits), np.repeat(random_packed(rng, 1, bits), 30, axis=0)])
    queries = np.concatenate([db[-1:], random_packed(rng, 6, bits)])
    index = make_backend("milvus", db, bits)
    calls: list[tuple[int, str]] = []
    request = index._search_request

    def spy(q: np.ndarray, limit: int, where: str, radius: int | None = None) -> Any:
        calls.append((limit, where))
        return request(q, limit, where, radius=radius)

    monkeypatch.setattr(index, "_search_request", spy)
    for radius in (0, 1, 3, 8):
        assert as_rows(*index.range_search(queries, radius)) == brute_range(queries, db, radius)
    assert any(where.startswith("pos >= ") for _, where in calls)  # windows were needed
    assert {limit for limit, _ in calls} >= {4, 16}
    # Search with ties beyond MAX_TOPK resolves to the earliest positions too.
    np.testing.assert_array_equal(index.search(queries, 10)[1], brute_topk(queries, db, 10)[1])


def test_empty_and_bad_arguments_behave_alike(fake: Any) -> None:
    bits = 16
    local = create_index(bits)
    remote = create_index(bits, backend="milvus", uri=URI)
    q = np.zeros((2, 2), np.uint8)
    for index in (local, remote):
        assert isinstance(index, IndexBackend) and index.ntotal == 0
        d, i = index.search(q, 3)
        assert (i == MISSING_ID).all() and (d == MISSING_DISTANCE).all()
        lims, d, i = index.range_search(q, 16)
        assert lims.tolist() == [0, 0, 0] and d.size == 0 and i.size == 0
        lims, _, _ = index.range_search(q[:0], 1)
        assert lims.tolist() == [0]
        for bad in (-1, 1.5, True):
            with pytest.raises(ConfigError, match="radius must be a non-negative integer"):
                index.range_search(q, bad)
        with pytest.raises(CodeError, match="code lengths do not match"):
            index.range_search(np.zeros((1, 3), np.uint8), 1)
    remote.close()


def test_save_and_load_round_trip_on_both_backends(fake: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    bits = 20
    db, queries = random_packed(rng, 300, bits), random_packed(rng, 10, bits)
    ids = np.arange(300, dtype=np.int64)[::-1] * 2
    for name, path in (("local", tmp_path / "i.crbi"), ("milvus", tmp_path / "i.json")):
        index = make_backend(name, db, bits, ids)
        assert index.save(path) == path
        index.close()
        again = open_index(path, backend=name)
        assert isinstance(again, IndexBackend) and again.ntotal == 300 and again.bits == bits
        np.testing.assert_array_equal(again.search(queries, 9)[1], brute_topk(queries, db, 9, ids)[1])
        again.close()
    assert (tmp_path / "i.json").read_bytes().startswith(LOCATOR_PREFIX)
    record = read_locator(tmp_path / "i.json")
    assert (record["uri"], record["bits"], record["kind"], record["db_name"]) == (URI, bits, "flat", "")
    assert "token" not in record
    # The locator's collection, reached without the file.
    by_name = open_index(backend="milvus", collection=record["collection"], uri=URI)
    assert by_name.ntotal == 300
    by_name.close()


def test_locator_errors(fake: Any, tmp_path: Path) -> None:
    crbi = tmp_path / "i.crbi"
    BinaryIndex.from_packed(np.zeros((3, 1), np.uint8), 8).save(crbi)
    with pytest.raises(FileFormatError, match="is a crossret index file, not a Milvus locator; open it with the "
                                              "'local' backend"):
        open_index(crbi, backend="milvus")
    (tmp_path / "junk.json").write_text('{"crossret": "something else"}')
    with pytest.raises(FileFormatError, match="not a crossret Milvus locator"):
        open_index(tmp_path / "junk.json", backend="milvus")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="not a crossret Milvus locator"):
        read_locator(tmp_path / "bad.json")
    with pytest.raises(FileFormatError, match="no such Milvus locator"):
        read_locator(tmp_path / "missing.json")
    with pytest.raises(FileFormatError, match="bad magic"):
        open_index(tmp_path / "junk.json")  # a locator is not a local index file
    with pytest.raises(ConfigError, match="give a locator file"):
        open_index(backend="milvus", uri=URI)
    with pytest.raises(ConfigError, match="no collection 'nothing_here'"):
        open_index(backend="milvus", collection="nothing_here", uri=URI)


def test_registry(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert BACKENDS == ("local", "milvus")
    assert get_backend("local") is BinaryIndex and get_backend("milvus") is MilvusBinaryIndex
    for bad in ("faiss", "", None, "Local"):
        with pytest.raises(ConfigError) as info:
            check_backend(bad)
        assert str(info.value) == f"--backend {bad!r}: unknown index backend; choose one of local, milvus"
    with pytest.raises(ConfigError, match="takes no connection options"):
        open_index("x.crbi", uri=URI)
    with pytest.raises(ConfigError, match="give the index file"):
        open_index()
    with pytest.raises(ConfigError, match="train_size"):
        build_index(np.zeros((4, 1), np.uint8), 8, backend="milvus", uri=URI, train_size=2)
    with pytest.raises(ConfigError, match="nlist: given both"):
        build_index(np.zeros((4, 1), np.uint8), 8, "ivf", backend="milvus", params={"nlist": 2}, nlist=2, uri=URI)
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'crossret\[milvus\]'"):
        get_backend("milvus")


def test_milvus_overwrite_replaces_only_crossret_collections(fake: Any) -> None:
    first = MilvusBinaryIndex(8, uri=URI, collection="shared")
    first.close()
    with pytest.raises(ConfigError, match="already exists"):
        MilvusBinaryIndex(8, uri=URI, collection="shared")
    MilvusBinaryIndex(16, uri=URI, collection="shared", overwrite="crossret").close()
    assert collection_meta(URI, "shared")["bits"] == 16
    client = sys.modules["pymilvus"].MilvusClient(uri=URI)
    schema = client.create_schema(description="someone else's")
    client.create_collection("foreign", schema=schema)
    with pytest.raises(ConfigError, match="was not created by crossret; it is not replaced"):
        MilvusBinaryIndex(8, uri=URI, collection="foreign", overwrite="crossret")
    with pytest.raises(ConfigError, match="overwrite must be"):
        MilvusBinaryIndex(8, uri=URI, collection="x", overwrite="yes")


@pytest.mark.parametrize("as_list", [False, True])
def test_milvus_reads_codes_back_in_either_pymilvus_shape(fake: Any, monkeypatch: pytest.MonkeyPatch,
                                                         as_list: bool) -> None:
    import _milvus_fake

    monkeypatch.setitem(_milvus_fake.CODE_AS_LIST, "value", as_list)
    db = random_packed(np.random.default_rng(4), 50, 13)
    index = make_backend("milvus", db, 13)
    np.testing.assert_array_equal(index.stored_items()[0], db)


# --------------------------------------------------------------------------------------------
# as_packed: the two former call styles


def _old_metrics_to_packed(codes: Any, bits: int | None, name: str) -> tuple[np.ndarray, int]:
    """crossret.retrieval.metrics._to_packed before it became as_packed(origin="api")."""
    array = np.asarray(codes)
    if bits is not None and array.dtype == np.uint8:
        return check_packed(array, bits, allow_padding=True, name=name), int(bits)
    pm1 = as_pm1(array, name=name)
    length = pm1.shape[1]
    if bits is not None and length != bits:
        raise CodeError(f"{name}: rows have {length} bits but bits={bits} was given")
    return pack_codes(pm1), length


def _old_cli_as_packed(array: np.ndarray, bits: int | None, what: str) -> tuple[np.ndarray, int]:
    """crossret.cli._as_packed before it became as_packed(origin="cli")."""
    if array.ndim != 2:
        raise DataError(f"{what}: expected a 2-D array of codes (one row per item), got shape {array.shape}")
    if bits is not None and array.dtype == np.uint8 and array.shape[1] != bits:
        return check_packed(array, bits, allow_padding=True, name=what), bits
    if bits is not None and array.shape[1] != bits:
        raise DataError(f"{what}: codes have {array.shape[1]} bits but {bits} were expected; code lengths "
                        "must match")
    if array.dtype == np.uint8 and array.size and int(array.max()) > 1:
        raise DataError(f"{what}: holds uint8 values above 1, i.e. packed codes; pass --bits L to read them")
    return pack_codes(array, name=what), int(array.shape[1])


def _outcome(fn: Any, *args: Any) -> tuple[Any, ...]:
    try:
        packed, bits = fn(*args)
    except Exception as exc:  # the error type and message are part of the behaviour
        return ("error", type(exc), str(exc))
    return ("ok", packed.dtype, packed.tobytes(), packed.shape, bits)


def _cases() -> list[tuple[np.ndarray, int | None]]:
    rng = np.random.default_rng(5)
    pm1 = rng.choice(np.array([-1, 1], np.int8), size=(6, 12))
    packed = pack_codes(pm1)
    padded = np.zeros((6, 8), np.uint8)
    padded[:, :2] = packed
    zero_one = (pm1 > 0).astype(np.uint8)
    return [
        (pm1, None), (pm1, 12), (pm1, 16), (pm1.astype(np.float32), None), (pm1 > 0, None), (zero_one, None),
        (zero_one, 12), (zero_one, 10), (packed, 12), (padded, 12), (packed, None), (packed, 16), (packed, 9),
        (np.full((2, 2), 255, np.uint8), 12), (pm1[0], None), (pm1[0], 12), (np.zeros((2, 3, 4), np.int8), None),
        (np.full((2, 4), 2, np.int64), None), (np.array([[0.5, 1.0]]), None), (np.zeros((0, 12), np.int8), 12),
        (np.zeros((3, 0), np.int8), None), (np.array([["a", "b"]]), None),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_as_packed_keeps_both_old_behaviours(case: int) -> None:
    codes, bits = _cases()[case]
    assert _outcome(lambda c, b: as_packed(c, b, name="query codes"), codes, bits) == \
        _outcome(_old_metrics_to_packed, codes, bits, "query codes")
    assert _outcome(lambda c, b: as_packed(c, b, name="--queries", origin="cli"), codes, bits) == \
        _outcome(_old_cli_as_packed, codes, bits, "--queries")


def test_as_packed_rejects_an_unknown_origin() -> None:
    with pytest.raises(ValueError, match="origin"):
        as_packed(np.ones((1, 8), np.int8), origin="file")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# command line


def _codes_file(tmp_path: Path, name: str, codes: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, codes)
    return path


def test_cli_milvus_build_and_search_equal_local(fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(6)
    pm1 = rng.choice(np.array([-1, 1], np.int8), size=(300, 16))
    db = _codes_file(tmp_path, "db.npy", pm1)
    q = _codes_file(tmp_path, "q.npy", rng.choice(np.array([-1, 1], np.int8), size=(8, 16)))
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", db, "--out", tmp_path / "flat.crbi")
    assert code == 0, err
    code, out, err = cli(monkeypatch, capsys, "index", "build", "--codes", db, "--out", tmp_path / "m.json",
                         "--backend", "milvus", "--uri", URI, "--collection", "cli_codes")
    assert code == 0, err
    out = " ".join(out.split())
    assert f"Milvus collection cli_codes at {URI}, 300 codes, 16 bits, kind flat" in out
    assert read_locator(tmp_path / "m.json")["collection"] == "cli_codes"
    answers = []
    for args in ([tmp_path / "flat.crbi"], [tmp_path / "m.json", "--backend", "milvus"],
                 ["--backend", "milvus", "--uri", URI, "--collection", "cli_codes"]):
        code, out, err = cli(monkeypatch, capsys, "index", "search", *args, "--queries", q, "-k", "20", "--json")
        assert code == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1]))
    assert answers[0] == answers[1] == answers[2]
    ref_d, ref_i = brute_topk(pack_codes(np.load(q)), pack_codes(pm1), 20)
    assert answers[0]["ids"] == ref_i.tolist() and answers[0]["distances"] == ref_d.tolist()

    # Rebuilding over the same --out and collection needs --overwrite, which replaces both.
    args = ("index", "build", "--codes", db, "--out", tmp_path / "m.json", "--backend", "milvus", "--uri", URI,
            "--collection", "cli_codes")
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "already exists; pass --overwrite" in err
    code, _, err = cli(monkeypatch, capsys, *args, "--kind", "ivf", "--param", "nlist=4", "--overwrite")
    assert code == 0, err
    assert collection_meta(URI, "cli_codes")["kind"] == "ivf"
    (tmp_path / "notes.json").write_text("{}")
    code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", db, "--out", tmp_path / "notes.json",
                       "--backend", "milvus", "--uri", URI, "--collection", "other", "--overwrite")
    assert code == 2 and "is not a crossret index" in err  # other files are never replaced
    assert "other" not in fake.MilvusClient(uri=URI).collections  # refused before any collection is made


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("index", "search", "x.crbi", "--queries", "q.npy", "--backend", "faiss"),
         "error: --backend 'faiss': unknown index backend; choose one of local, milvus"),
        (("index", "build", "--codes", "c.npy", "--out", "o.crbi", "--backend", "Milvus"),
         "error: --backend 'Milvus': unknown index backend; choose one of local, milvus"),
        (("serve", "--index", "x.crbi", "--backend", "remote"),
         "error: --backend 'remote': unknown index backend; choose one of local, milvus"),
        (("index", "search", "x.crbi", "--queries", "q.npy", "--uri", URI),
         "error: --uri apply to --backend milvus, not --backend local"),
        (("index", "search", "x.crbi", "--queries", "q.npy", "--collection", "c", "--uri", URI),
         "error: --uri and --collection apply to --backend milvus, not --backend local"),
        (("index", "search", "--backend", "milvus", "--uri", URI, "--queries", "q.npy"),
         "error: give a locator file written by MilvusBinaryIndex.save (crossret index build --backend milvus) or "
         "the collection name (collection=..., --collection)"),
        (("index", "search", "--backend", "milvus", "--collection", "c", "--text", "a man"),
         "error: --backend milvus searches binary codes (--queries); captions (--run, --text, --text-file) search a "
         "local GCKD gallery index"),
    ],
)
def test_cli_backend_errors_are_one_line(fake: Any, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                         message: str) -> None:
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2
    assert err.strip() == message


def test_cli_milvus_without_pymilvus(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    code, _, err = cli(monkeypatch, capsys, "index", "search", "--backend", "milvus", "--collection", "c",
                       "--queries", tmp_path / "q.npy")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "pip install 'crossret[milvus]'" in err


def test_cli_index_search_without_index_file_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # The local backend still requires INDEX_FILE, with click's own message.
    code, _, err = cli(monkeypatch, capsys, "index", "search", "--queries", "q.npy")
    assert code == 2 and "Missing argument 'index_file'." in err


# --------------------------------------------------------------------------------------------
# the service


def test_service_loads_a_milvus_index_like_a_local_one(fake: Any, tmp_path: Path) -> None:
    from crossret.serve.state import Query, ServiceLimits, ServiceState

    rng = np.random.default_rng(7)
    bits = 24
    db = random_packed(rng, 200, bits)
    ids = rng.permutation(5000)[:200].astype(np.int64)
    local = make_backend("local", db, bits, ids)
    local.save(tmp_path / "i.crbi")
    remote = make_backend("milvus", db, bits, ids)
    remote.save(tmp_path / "i.json")
    remote.close()
    limits = ServiceLimits(max_k=50)
    states = [ServiceState(None, index=tmp_path / "i.crbi", limits=limits),
              ServiceState(None, index=tmp_path / "i.json", limits=limits, backend="milvus"),
              ServiceState(None, limits=limits, backend="milvus",
                           backend_options={"collection": remote.collection, "uri": URI})]
    queries = [Query(kind="hex", value=row.tobytes().hex(), where=f"queries[{i}]") for i, row in enumerate(db[:5])]
    queries.append(Query(kind="id", value=int(ids[7]), where="queries[5]", exclude_self=True))
    answers = [state.search(queries, 12) for state in states]
    assert answers[0] == answers[1] == answers[2]
    assert [state.info()["size"] for state in states] == [200, 200, 200]
    assert states[1].info()["index_file"] == "i.json" and states[2].info()["index_file"] == remote.collection
    assert states[1].reload()["generation"] == 1  # a reload opens the collection again
    with pytest.raises(ConfigError, match="--max-k 16383 or less"):
        ServiceState(None, index=tmp_path / "i.json", limits=ServiceLimits(max_k=16384), backend="milvus")
    with pytest.raises(ConfigError, match="give --index LOCATOR"):
        ServiceState(None, backend="milvus", backend_options={"uri": URI})


def test_index_output_rule_covers_milvus_locators(tmp_path: Path) -> None:
    """``--overwrite`` may replace crossret's own index files of either backend, and nothing else."""
    from crossret.errors import ConfigError
    from crossret.retrieval.milvus import LOCATOR_PREFIX
    from crossret.runs import check_output_file

    locator = tmp_path / "index.milvus.json"
    locator.write_bytes(LOCATOR_PREFIX + b',\n  "collection": "c"\n}\n')
    with pytest.raises(ConfigError, match="exists"):
        check_output_file(locator, "index", overwrite=False)
    check_output_file(locator, "index", overwrite=True)  # crossret's own locator: may be replaced
    user_json = tmp_path / "notes.json"
    user_json.write_bytes(b'{\n  "crossret": "something else"\n}\n')
    with pytest.raises(ConfigError, match="not a crossret index"):
        check_output_file(user_json, "index", overwrite=True)
