"""Milvus backend (crossret.retrieval.milvus): results equal to faiss, ids, errors.

The server tests start the embedded Milvus server of the ``milvus`` package on loopback, with its data
in a temporary directory, once for the module; they are skipped with the reason when pymilvus or the
server package is missing or the server does not come up. ``CROSSRET_TEST_MILVUS_URI`` points them
at a running server instead. The tests at the top need no server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossret.errors import CodeError, ConfigError
from crossret.retrieval.index import MISSING_DISTANCE, MISSING_ID, BinaryIndex
from crossret.retrieval.milvus import (
    INSTALL_HINT,
    MAX_TOPK,
    MilvusBinaryIndex,
    MilvusConnectionError,
    _pymilvus,
)
from crossret.retrieval.packing import pack_codes

SERVER_START_TIMEOUT_S = 180.0


def random_packed(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return pack_codes(rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, bits)))


# --------------------------------------------------------------------------------------------
# without a server


def test_importing_crossret_does_not_import_pymilvus() -> None:
    code = (
        "import sys, crossret, crossret.retrieval, crossret.retrieval.milvus\n"
        "from crossret.retrieval import MilvusBinaryIndex\n"
        "assert 'pymilvus' not in sys.modules, 'pymilvus imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_pymilvus_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # makes `import pymilvus` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'crossret\[milvus\]'"):
        _pymilvus()
    with pytest.raises(ImportError, match="pymilvus") as info:
        MilvusBinaryIndex(64)
    assert INSTALL_HINT in str(info.value)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((0,), {}, CodeError, "positive integer"),
        ((True,), {}, CodeError, "positive integer"),
        ((64, "hnsw"), {}, ConfigError, "choose 'flat'"),
        ((64, "flat"), {"nlist": 4}, ConfigError, "unknown parameter"),
        ((64, "ivf"), {"nlist": 0}, ConfigError, "nlist must be an integer >= 1"),
        ((64, "ivf"), {"nprobe": 2.5}, ConfigError, "nprobe"),
        ((64,), {"collection": "bad-name"}, ConfigError, "collection name"),
        ((64,), {"collection": "1abc"}, ConfigError, "collection name"),
        ((64,), {"batch_size": 0}, ConfigError, "batch_size"),
        ((64,), {"consistency_level": "Weak"}, ConfigError, "consistency_level"),
        ((64,), {"uri": "http://127.0.0.1:1", "port": 1}, ConfigError, "either uri"),
        ((64,), {"uri": ""}, ConfigError, "uri must be"),
        ((64,), {"port": 0}, ConfigError, "port"),
    ],
)
def test_arguments_are_checked_before_connecting(args: tuple, kwargs: dict, error: type, match: str) -> None:
    # None of these reach pymilvus or the network.
    with pytest.raises(error, match=match):
        MilvusBinaryIndex(*args, **kwargs)


def test_unreachable_server_is_a_connection_error() -> None:
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'crossret[milvus]')")
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    with pytest.raises(MilvusConnectionError, match=r"cannot connect to a Milvus server at http://127.0.0.1:1"):
        MilvusBinaryIndex(64, uri="http://127.0.0.1:1", timeout=5)
    with pytest.raises(MilvusConnectionError):
        MilvusBinaryIndex.connect("anything", host="127.0.0.1", port=1, timeout=5)


class _IndexParams:
    def __init__(self) -> None:
        self.indexes: list[dict[str, Any]] = []

    def add_index(self, **kwargs: Any) -> None:
        self.indexes.append(kwargs)


class FakeClient:
    """Just enough of pymilvus.MilvusClient to build a collection and record inserts (no server)."""

    def __init__(self) -> None:
        self.inserts: list[list[dict[str, Any]]] = []
        self.calls: list[str] = []
        self.closed = False

    def has_collection(self, name: str, **_: Any) -> bool:
        return False

    def create_collection(self, name: str, **kwargs: Any) -> None:
        self.calls.append("create_collection")
        self.schema = kwargs["schema"]

    def prepare_index_params(self) -> _IndexParams:
        return _IndexParams()

    def create_index(self, name: str, params: _IndexParams, **_: Any) -> None:
        self.calls.append("create_index")
        self.index_params = params.indexes

    def insert(self, name: str, rows: list[dict[str, Any]], **_: Any) -> dict[str, int]:
        self.inserts.append(rows)
        return {"insert_count": len(rows)}

    def search(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("search must not be called with invalid arguments")

    def close(self) -> None:
        self.closed = True


def test_batched_inserts_and_validation_with_a_fake_client() -> None:
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'crossret[milvus]')")
    rng = np.random.default_rng(0)
    client = FakeClient()
    index = MilvusBinaryIndex(12, "ivf", client=client, collection="fake", batch_size=100)
    assert client.calls == ["create_collection"]  # IVF without nlist: the index waits for data
    codes = random_packed(rng, 250, 12)
    index.add(codes)
    # nlist follows BinaryIndex's default for the first batch; nprobe defaults to min(8, nlist).
    assert index.params == {"nlist": BinaryIndex.default_nlist(250), "nprobe": min(8, BinaryIndex.default_nlist(250))}
    assert client.index_params[0]["index_type"] == "BIN_IVF_FLAT"
    assert client.index_params[0]["metric_type"] == "HAMMING"
    assert [len(rows) for rows in client.inserts] == [100, 100, 50]
    rows = [row for batch in client.inserts for row in batch]
    assert [row["pos"] for row in rows] == list(range(250))
    assert all(row["uid"] == -1 for row in rows)
    # 12-bit codes are stored in 2 bytes (a 16-dim BINARY_VECTOR); 64-bit padding is trimmed away.
    padded = np.zeros((250, 8), np.uint8)
    padded[:, :2] = codes
    index.add(padded[:3])
    assert all(row["code"] == codes[i].tobytes() for i, row in enumerate(rows))
    assert client.inserts[-1][0]["code"] == codes[0].tobytes() and client.inserts[-1][0]["pos"] == 250
    assert len(index) == 253
    code_field = next(f for f in client.schema.fields if f.name == "code")
    assert code_field.params["dim"] == 16

    with pytest.raises(CodeError, match="code lengths do not match"):
        index.add(np.zeros((2, 3), np.uint8))
    with pytest.raises(CodeError, match="beyond the declared 12-bit"):
        index.add(np.full((2, 2), 255, np.uint8))
    with pytest.raises(CodeError, match="uint8"):
        index.search(codes.astype(np.int16), 3)
    for bad_k in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="k must be a positive integer"):
            index.search(codes[:2], bad_k)
    with pytest.raises(ConfigError, match="limit of 16384"):
        index.search(codes[:2], MAX_TOPK + 1)
    with pytest.raises(ConfigError, match="pass ids to every add"):
        index.add(codes[:2], ids=[7, 8])
    index.close()
    assert not client.closed  # a client passed in belongs to the caller
    with pytest.raises(ConfigError, match="closed"):
        index.search(codes[:2], 3)


# --------------------------------------------------------------------------------------------
# the embedded server


def _reuse_unpacked_binaries(milvus: Any, data_dir: Path) -> None:
    """Link the server binaries unpacked by an earlier run into ``data_dir/bin``.

    The ``milvus`` package unpacks ~250 MB of LZMA-compressed binaries into every new data directory
    (15-20 s on two cores); it skips files whose checksum marker matches, so links to a cached copy
    are accepted as they are. Any failure just falls back to unpacking.
    """
    unpack = getattr(milvus, "_initialize_data_files", None)
    if unpack is None:
        return
    default = Path.home() / ".cache" / "crossret" / f"milvus-{getattr(milvus, '__version__', 'unknown')}"
    cache = Path(os.environ.get("CROSSRET_MILVUS_BIN_CACHE", default))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".lock", "w") as lock:  # two test runs must not unpack into the cache at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            unpack(str(cache))  # a no-op when the cached files are complete
        bin_dir = data_dir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for item in (cache / "bin").iterdir():
            (bin_dir / item.name).symlink_to(item)
    except OSError:
        with contextlib.suppress(OSError):
            for item in (data_dir / "bin").iterdir():
                item.unlink()


def _wait_healthy(server: Any, deadline: float) -> None:
    url = f"http://127.0.0.1:{server.webservice_port}/healthz"
    while time.monotonic() < deadline:
        if server.server_proc is None or server.server_proc.poll() is not None:
            raise RuntimeError("the server process exited")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if b"OK" in response.read():
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"not healthy within {SERVER_START_TIMEOUT_S:g} s")


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a Milvus server for this module: the embedded one, started on loopback, or an external one."""
    pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'crossret[milvus]')")
    external = os.environ.get("CROSSRET_TEST_MILVUS_URI")
    if external:
        yield external
        return
    milvus = pytest.importorskip("milvus", reason="the embedded Milvus server is not installed "
                                                  "(pip install 'crossret[milvus]')")
    if not hasattr(milvus, "MilvusServer"):
        pytest.skip("the installed 'milvus' package has no embedded MilvusServer")
    data_dir = tmp_path_factory.mktemp("milvus")
    started = time.perf_counter()
    _reuse_unpacked_binaries(milvus, data_dir)
    server = milvus.MilvusServer(milvus.MilvusServerConfig(data_dir=str(data_dir)), wait_for_started=False)
    # Components advertise loopback to each other instead of the machine's first address.
    for component in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode"):
        server.config.set(f"{component}.ip", "127.0.0.1")
    try:
        server.start()
        # Our own wait: the package's waits 180 s even when the server process has died.
        _wait_healthy(server, time.monotonic() + SERVER_START_TIMEOUT_S)
    except Exception as exc:
        server.stop()
        log = data_dir / "logs" / "milvus-stderr.log"
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        pytest.skip(f"the embedded Milvus server did not start ({exc}); {tail}")
    os.environ["CROSSRET_MILVUS_START_SECONDS"] = f"{time.perf_counter() - started:.1f}"  # read by the report
    try:
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()


@pytest.fixture
def make_index(milvus_uri: str) -> Iterator[Any]:
    """Factory for collections that are dropped after the test."""
    made: list[MilvusBinaryIndex] = []

    def make(*args: Any, **kwargs: Any) -> MilvusBinaryIndex:
        builder = kwargs.pop("builder", MilvusBinaryIndex.from_packed)
        index = builder(*args, uri=milvus_uri, **kwargs)
        made.append(index)
        return index

    yield make
    for index in made:
        with contextlib.suppress(Exception):
            if not index._dropped:
                if index._client is None:
                    index = MilvusBinaryIndex.connect(index.collection, uri=milvus_uri)
                index.drop()
        index.close()


def assert_same_as_faiss(db: np.ndarray, queries: np.ndarray, bits: int, k: int, index: MilvusBinaryIndex,
                         ids: np.ndarray | None = None) -> None:
    """Distances equal faiss IndexBinaryFlat; ids equal BinaryIndex flat's (distance, position) order."""
    ref = BinaryIndex.from_packed(db, bits, ids=ids)
    ref_dist, ref_ids = ref.search(queries, k)
    dist, got = index.search(queries, k)
    assert dist.dtype == np.int32 and got.dtype == np.int64
    np.testing.assert_array_equal(dist, ref_dist)
    np.testing.assert_array_equal(got, ref_ids)


EQUALITY_BITS = (32, 48, 64, 128)


@pytest.fixture(scope="module")
def equality_cases(milvus_uri: str) -> Iterator[dict[tuple[str, int], tuple[np.ndarray, np.ndarray, Any]]]:
    """(database, queries, index) for flat and IVF at each code length, built concurrently.

    Most of a build is waiting on the server (load, flush, index build), so threads overlap it.
    Flat collections stay unflushed (served from a growing segment); IVF ones are flushed by
    from_packed, so their sealed segment is searched through its BIN_IVF_FLAT index.
    """
    def build(case: tuple[str, int]) -> tuple[np.ndarray, np.ndarray, MilvusBinaryIndex]:
        kind, bits = case
        rng = np.random.default_rng(bits + (100 if kind == "ivf" else 0))
        db, queries = random_packed(rng, 2000, bits), random_packed(rng, 30, bits)
        if kind == "flat":
            index = MilvusBinaryIndex.from_packed(db, bits, "flat", flush=False, uri=milvus_uri)
        else:
            index = MilvusBinaryIndex.from_packed(db, bits, "ivf", nlist=8, nprobe=8, uri=milvus_uri)
        return db, queries, index

    cases = [(kind, bits) for kind in ("flat", "ivf") for bits in EQUALITY_BITS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case: pool.submit(build, case) for case in cases}
    built = {case: future.result() for case, future in futures.items() if future.exception() is None}
    try:
        for future in futures.values():
            future.result()  # re-raise the first build error, after collecting the rest for cleanup
        yield built
    finally:
        for _, _, index in built.values():
            with contextlib.suppress(Exception):
                index.drop()
            index.close()


@pytest.mark.slow
@pytest.mark.parametrize("bits", EQUALITY_BITS)
def test_flat_equals_faiss(equality_cases: dict, bits: int) -> None:
    db, queries, index = equality_cases["flat", bits]
    assert len(index) == 2000 and index.dim == 8 * ((bits + 7) // 8)
    assert_same_as_faiss(db, queries, bits, 20, index)
    # Without tie resolution distances are still exact; the id sets agree except in the last group.
    index.exact_ties = False
    try:
        dist, got = index.search(queries, 20)
    finally:
        index.exact_ties = True
    ref_dist, ref_ids = BinaryIndex.from_packed(db, bits).search(queries, 20)
    np.testing.assert_array_equal(dist, ref_dist)
    for row in range(queries.shape[0]):
        inner = dist[row] < dist[row, -1]
        assert set(got[row, inner]) == set(ref_ids[row, inner])


@pytest.mark.slow
@pytest.mark.parametrize("bits", EQUALITY_BITS)
def test_ivf_with_all_lists_probed_equals_faiss(equality_cases: dict, bits: int) -> None:
    db, queries, index = equality_cases["ivf", bits]
    assert index.params == {"nlist": 8, "nprobe": 8}
    segments = getattr(index._client, "list_loaded_segments", None)
    if segments is not None:  # pymilvus >= 2.5: check that the IVF index really serves the search
        loaded = segments(index.collection)
        assert loaded and all(seg.index_name == "code" for seg in loaded), loaded
    assert_same_as_faiss(db, queries, bits, 20, index)


@pytest.mark.slow
def test_mass_ties_resolve_to_the_earliest_positions(make_index: Any) -> None:
    # 17000 copies of one code: a distance group larger than Milvus's 16384 results per request.
    rng = np.random.default_rng(7)
    bits = 16
    few = random_packed(rng, 5, bits)
    db = np.concatenate([np.repeat(few[:1], 17000, axis=0), few[rng.integers(0, 5, 1500)],
                         random_packed(rng, 500, bits)])
    queries = np.concatenate([few[:2], random_packed(rng, 3, bits)])
    index = make_index(db, bits, "flat", flush=False)
    assert_same_as_faiss(db, queries, bits, 50, index)  # few[0]: 17000 items at distance 0
    assert_same_as_faiss(db, queries[1:2], bits, MAX_TOPK, index)  # the largest k Milvus allows


@pytest.mark.slow
def test_custom_ids_round_trip(make_index: Any, milvus_uri: str) -> None:
    rng = np.random.default_rng(3)
    bits = 64
    db, queries = random_packed(rng, 1500, bits), random_packed(rng, 20, bits)
    ids = rng.permutation(10**6)[:1500].astype(np.int64) * 7 + 3
    index = make_index(db[:1000], bits, "flat", ids=ids[:1000], flush=False)
    index.add(db[1000:], ids=ids[1000:])
    assert len(index) == 1500
    assert_same_as_faiss(db, queries, bits, 30, index, ids=ids)
    _, own = index.search(db[[5, 1200]], 1)
    np.testing.assert_array_equal(own[:, 0], ids[[5, 1200]])
    # k above ntotal: the BinaryIndex padding (-1, int32 max) at the end of each row.
    dist, got = index.search(queries[:2], 1600)
    assert (got[:, 1500:] == MISSING_ID).all() and (dist[:, 1500:] == MISSING_DISTANCE).all()
    assert set(got[0, :1500]) == set(ids.tolist())

    # A second connection reads bits, kind, count and the ids mode back from the collection.
    with MilvusBinaryIndex.connect(index.collection, uri=milvus_uri, bits=bits) as again:
        assert (again.bits, again.kind, len(again)) == (bits, "flat", 1500)
        assert_same_as_faiss(db, queries, bits, 30, again, ids=ids)
        with pytest.raises(ConfigError, match="unique"):
            again.add(db[:1], ids=ids[:1])  # duplicate of a stored id, found on the server
        with pytest.raises(ConfigError, match="pass ids to every add"):
            again.add(db[:1])
        with pytest.raises(ConfigError, match=">= 0"):
            again.add(db[:1], ids=[-4])
        again.add(db[:1], ids=[5])
        assert len(again) == 1501
        _, found = again.search(db[:1], 2)
        assert set(found[0]) == {ids[0], 5}


@pytest.mark.slow
def test_errors_against_a_server(make_index: Any, milvus_uri: str) -> None:
    rng = np.random.default_rng(5)
    db = random_packed(rng, 100, 48)
    index = make_index(db, 48, "flat", flush=False, collection="crossret_test_errors")
    with pytest.raises(ConfigError, match="no collection 'crossret_test_missing'"):
        MilvusBinaryIndex.connect("crossret_test_missing", uri=milvus_uri)
    with pytest.raises(CodeError, match="holds 48-bit codes but bits=64"):
        MilvusBinaryIndex.connect("crossret_test_errors", uri=milvus_uri, bits=64)
    with pytest.raises(ConfigError, match="already exists"):
        MilvusBinaryIndex(48, uri=milvus_uri, collection="crossret_test_errors")
    with pytest.raises(CodeError, match="rows have 16 bytes"):
        index.search(random_packed(rng, 2, 128), 5)  # 128-bit queries against 48-bit codes
    with pytest.raises(CodeError, match="beyond the declared 48-bit"):
        index.search(random_packed(rng, 2, 64), 5)  # 8 bytes pass as 64-bit padding, but bits are set there
    with pytest.raises(CodeError, match="rows have 4 bytes"):
        index.add(random_packed(rng, 2, 32))
    with pytest.raises(CodeError, match="uint8"):
        index.add(db.astype(np.float32))
    with pytest.raises(ConfigError, match="limit of 16384"):
        index.search(db[:1], 16385)
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        index.search(db[:1], 0)
    assert len(index) == 100  # nothing was added by the failed calls
    dist, _ = index.search(db[:3], 1)
    np.testing.assert_array_equal(dist[:, 0], [0, 0, 0])
    index.drop()
    assert index._dropped
    with pytest.raises(ConfigError, match="dropped"):
        index.search(db[:1], 1)
    with pytest.raises(ConfigError, match="no collection"):
        MilvusBinaryIndex.connect("crossret_test_errors", uri=milvus_uri)


@pytest.mark.slow
def test_range_search_stored_items_and_locator_against_a_server(make_index: Any, milvus_uri: str,
                                                                tmp_path: Path) -> None:
    # The protocol methods that rely on server behaviour: the range-search radius (Milvus keeps
    # distance < radius for HAMMING), BINARY_VECTOR values read back by query, and save/load by locator.
    from crossret.retrieval.backend import IndexBackend, open_index

    rng = np.random.default_rng(11)
    bits = 24
    db, queries = random_packed(rng, 1200, bits), random_packed(rng, 15, bits)
    ids = rng.permutation(10**5)[:1200].astype(np.int64)
    ref = BinaryIndex.from_packed(db, bits, ids=ids)
    for flush in (False, True):  # growing segment, then sealed and indexed
        index = make_index(db, bits, "flat", ids=ids, flush=flush)
        assert isinstance(index, IndexBackend)
        for radius in (0, 6, 9, 24):
            got, want = index.range_search(queries, radius), ref.range_search(queries, radius)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
        codes, stored = index.stored_items()
        np.testing.assert_array_equal(codes, db)
        np.testing.assert_array_equal(stored, ids)
    locator = index.save(tmp_path / "index.json")
    with open_index(locator, backend="milvus") as again:
        assert (again.bits, again.ntotal, again.collection) == (bits, 1200, index.collection)
        assert_same_as_faiss(db, queries, bits, 25, again, ids=ids)


@pytest.mark.slow
def test_cli_backend_milvus_against_a_server(milvus_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from _cli import cli

    rng = np.random.default_rng(12)
    db = random_packed(rng, 500, 32)
    np.save(tmp_path / "db.npy", db)
    np.save(tmp_path / "q.npy", db[:4])
    name = "crossret_test_cli"
    common = ("--backend", "milvus", "--uri", milvus_uri)
    try:
        code, _, err = cli(monkeypatch, capsys, "index", "build", "--codes", tmp_path / "db.npy", "--bits", 32,
                           "--out", tmp_path / "m.json", "--collection", name, *common)
        assert code == 0, err
        code, out, err = cli(monkeypatch, capsys, "index", "search", tmp_path / "m.json", "--queries",
                             tmp_path / "q.npy", "-k", "5", "--json", *common)
        assert code == 0, err
        answer = json.loads(out.strip().splitlines()[-1])
        ref_d, ref_i = BinaryIndex.from_packed(db, 32).search(db[:4], 5)
        assert answer["ids"] == ref_i.tolist() and answer["distances"] == ref_d.tolist()
    finally:
        with contextlib.suppress(Exception), MilvusBinaryIndex.connect(name, uri=milvus_uri) as index:
            index.drop()
