"""Structural check of a serialized faiss index *before* faiss reads it.

faiss' readers trust the bytes: a vector's declared length is allocated (and zero-filled) before it
is read, an inverted list of ``n`` entries or a hash-table of ``sz`` buckets is reserved up front,
and nothing checks that the neighbour ids of an HNSW graph, the ids of an inverted list or the ids
of a multi-hash table are inside the index — a search would then read out of bounds. The checked
payload sits behind a SHA-256 in crossret's index files, so only a crafted file (checksum
recomputed) gets here; this module makes such a file a clean error instead of a crash.

Only the layouts crossret writes are accepted (whatever its ``kind`` or faiss factory string
produces): binary ``IBxF`` (flat), ``IBwF`` (IVF, over a flat or HNSW quantizer, array inverted
lists, no direct map), ``IBHf`` (HNSW), ``IBHm`` (multi-hash), ``IBHh`` (hash); dense ``IxFI``
(flat, inner product) and ``IHNf`` (HNSW over flat). Layouts follow faiss' ``index_read.cpp``
(``read_index_binary`` / ``read_index``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["FaissLayoutError", "check_binary_payload", "check_dense_payload"]


#: Largest HNSW efSearch / efConstruction accepted from a file: faiss allocates that many candidates
#: per query, so a crafted 2**30 costs gigabytes (and minutes) on the first search.
MAX_EF = 1 << 20
#: Largest number of hash keys one multi-hash / hash search may probe per table, sum_{i <= nflip} C(b, i):
#: nflip = 32 of b = 64 bits would enumerate ~10**18 keys (a search that never ends).
MAX_FLIP_PROBES = 1 << 20


def flip_probes(b: int, nflip: int) -> int:
    """Keys a hash search probes per table: every key within Hamming distance ``nflip`` of ``b`` bits."""
    return sum(math.comb(b, i) for i in range(min(max(nflip, 0), b) + 1))


class FaissLayoutError(ValueError):
    """The bytes are not a well-formed faiss index of a layout crossret writes."""


def _fourcc(code: str) -> int:
    return int.from_bytes(code.encode("ascii"), "little")


class _Reader:
    def __init__(self, data: Any) -> None:
        self.data = memoryview(data).cast("B")
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            raise FaissLayoutError(f"{what} needs {n} bytes but only {self.left} are left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> int | float:
        dtype = np.dtype(fmt)
        return np.frombuffer(self.take(dtype.itemsize, what), dtype)[0].item()

    def i32(self, what: str) -> int:
        return int(self.scalar("<i4", what))

    def i64(self, what: str) -> int:
        return int(self.scalar("<i8", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<u8", what))

    def u8(self, what: str) -> int:
        return int(self.scalar("u1", what))

    def fourcc(self) -> int:
        return int(self.scalar("<u4", "the index type code"))

    def vector(self, fmt: str, what: str) -> np.ndarray:
        """faiss' READVECTOR: a uint64 element count, then the elements."""
        dtype = np.dtype(fmt)
        count = self.u64(f"the length of {what}")
        if count * dtype.itemsize > self.left:
            raise FaissLayoutError(f"{what} declares {count} elements but only {self.left} bytes are left")
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype)


def _name(code: int) -> str:
    raw = int(code).to_bytes(4, "little")
    return raw.decode("ascii") if all(32 <= c < 127 for c in raw) else raw.hex()


# --------------------------------------------------------------------------------------------- binary


def _binary_header(r: _Reader) -> dict[str, int]:
    d = r.i32("d")
    code_size = r.i32("code_size")
    ntotal = r.i64("ntotal")
    is_trained = r.u8("is_trained")
    r.i32("metric_type")
    if d <= 0 or d % 8 or code_size != d // 8:
        raise FaissLayoutError(f"invalid binary dimensions d={d}, code_size={code_size}")
    if ntotal < 0:
        raise FaissLayoutError(f"negative ntotal {ntotal}")
    if is_trained not in (0, 1):
        raise FaissLayoutError(f"invalid is_trained flag {is_trained}")
    return {"d": d, "code_size": code_size, "ntotal": ntotal, "is_trained": is_trained}


def _read_binary(r: _Reader, depth: int = 0) -> dict[str, Any]:
    if depth > 2:
        raise FaissLayoutError("binary indexes nested too deeply")
    code = r.fourcc()
    if code == _fourcc("IBxF"):
        info = _binary_header(r)
        xb = r.vector("u1", "the codes")
        if xb.size != info["ntotal"] * info["code_size"]:
            raise FaissLayoutError(f"{xb.size} code bytes for {info['ntotal']} codes of {info['code_size']} bytes")
        return {**info, "type": "IBxF"}
    if code == _fourcc("IBwF"):
        return _read_binary_ivf(r, depth)
    if code == _fourcc("IBHf"):
        info = _binary_header(r)
        _read_hnsw(r, info["ntotal"])
        storage = _read_binary(r, depth + 1)
        _same_storage(info, storage, "IBxF")
        return {**info, "type": "IBHf"}
    if code == _fourcc("IBHm"):
        return _read_binary_multihash(r, depth)
    if code == _fourcc("IBHh"):
        return _read_binary_hash(r)
    raise FaissLayoutError(f"binary index type {_name(code)!r} is not one crossret writes")


def _same_storage(info: dict[str, Any], storage: dict[str, Any], kind: str) -> None:
    if storage["type"] != kind or storage["d"] != info["d"] or storage["ntotal"] != info["ntotal"]:
        raise FaissLayoutError(
            f"the stored vectors ({storage['type']}, d={storage['d']}, {storage['ntotal']} items) do not match the "
            f"index (d={info['d']}, {info['ntotal']} items)"
        )


def _read_binary_ivf(r: _Reader, depth: int) -> dict[str, Any]:
    info = _binary_header(r)
    nlist = r.u64("nlist")
    nprobe = r.u64("nprobe")
    quantizer = _read_binary(r, depth + 1)
    if quantizer["type"] not in ("IBxF", "IBHf") or quantizer["d"] != info["d"] or quantizer["ntotal"] != nlist:
        raise FaissLayoutError(f"the coarse quantizer ({quantizer['type']}, d={quantizer['d']}, "
                               f"{quantizer['ntotal']} centroids) does not match nlist={nlist}, d={info['d']}")
    if nlist < 1 or not 1 <= nprobe < 1 << 31:
        raise FaissLayoutError(f"invalid IVF nlist={nlist} / nprobe={nprobe} (a search needs nprobe >= 1)")
    map_type = r.u8("the direct-map type")
    direct = r.vector("<i8", "the direct map")
    if map_type != 0 or direct.size:
        raise FaissLayoutError("an IVF direct map is stored (crossret never writes one)")
    if r.fourcc() != _fourcc("ilar"):
        raise FaissLayoutError("the inverted lists are not stored with the index")
    if r.u64("the number of inverted lists") != nlist or r.u64("the list code size") != info["code_size"]:
        raise FaissLayoutError("the inverted lists do not match nlist / code_size")
    list_type = r.fourcc()
    if list_type == _fourcc("full"):
        sizes = r.vector("<u8", "the list sizes").astype(object)
        if len(sizes) != nlist:
            raise FaissLayoutError(f"{len(sizes)} list sizes for {nlist} lists")
        sizes = [int(s) for s in sizes]
    elif list_type == _fourcc("sprs"):
        pairs = r.vector("<u8", "the list sizes")
        if pairs.size % 2:
            raise FaissLayoutError("odd number of entries in the sparse list sizes")
        sizes = [0] * nlist
        for index, size in pairs.reshape(-1, 2).tolist():
            if index >= nlist:
                raise FaissLayoutError(f"list {index} out of range for {nlist} lists")
            sizes[index] = int(size)
    else:
        raise FaissLayoutError(f"unknown inverted-list size encoding {_name(list_type)!r}")
    if sum(sizes) != info["ntotal"]:
        raise FaissLayoutError(f"the inverted lists hold {sum(sizes)} entries for ntotal={info['ntotal']}")
    # faiss resizes every list before reading any: all of it must be present.
    if sum(sizes) * (info["code_size"] + 8) > r.left:
        raise FaissLayoutError("the inverted lists declare more entries than the payload holds")
    for size in sizes:
        if size:
            r.take(size * info["code_size"], "list codes")
            ids = np.frombuffer(r.take(size * 8, "list ids"), "<i8")
            if ids.min() < 0 or ids.max() >= info["ntotal"]:
                raise FaissLayoutError(f"an inverted list holds ids outside 0..{info['ntotal'] - 1}")
    return {**info, "type": "IBwF"}


def _read_bits(buf: np.ndarray, pos: int, nbit: int) -> int:
    """``nbit`` bits at bit ``pos`` of ``buf``, least significant first (faiss' BitstringReader)."""
    if pos + nbit > buf.size * 8:
        raise FaissLayoutError("a hash table reads past its bit string")
    if not nbit:
        return 0
    first, last = pos >> 3, (pos + nbit + 7) >> 3
    return (int.from_bytes(buf[first:last].tobytes(), "little") >> (pos & 7)) & ((1 << nbit) - 1)


def _read_binary_multihash(r: _Reader, depth: int) -> dict[str, Any]:
    info = _binary_header(r)
    storage = _read_binary(r, depth + 1)
    _same_storage(info, storage, "IBxF")
    b, nhash, nflip = r.i32("b"), r.i32("nhash"), r.i32("nflip")
    from crossret.retrieval.hamming import _scan_bit_table  # compiled (numba)

    ntotal = info["ntotal"]
    if not 1 <= b <= 64 or nhash < 1 or nhash * b > info["d"] or not 0 <= nflip <= b \
            or flip_probes(b, nflip) > MAX_FLIP_PROBES:
        raise FaissLayoutError(f"invalid multi-hash parameters b={b}, nhash={nhash}, nflip={nflip}")
    for _ in range(nhash):
        id_bits = r.i32("id_bits")
        buckets = r.u64("the number of buckets")
        buf = r.vector("u1", "a hash table")
        if not 0 <= id_bits <= 62 or (ntotal > 1 and ntotal > 1 << id_bits):
            raise FaissLayoutError(f"invalid id width {id_bits} for {ntotal} items")
        if buckets > ntotal or buf.size != ((b + id_bits) * buckets + ntotal * id_bits + 7) // 8:
            raise FaissLayoutError("a hash table's size does not match its buckets and items")
        total = int(_scan_bit_table(np.ascontiguousarray(buf), b, id_bits, buckets, ntotal)) if buckets else 0
        if total == -2:
            raise FaissLayoutError(f"a hash table holds ids outside 0..{ntotal - 1}")
        # faiss writes a bucket's size with id_bits bits, so a bucket of all 2**id_bits items (or the one
        # item of a 1-item index) reads back as empty: fewer ids than items is faiss' own format.
        if total < 0:
            raise FaissLayoutError("a hash table's buckets list more ids than it holds")
    return {**info, "type": "IBHm"}


def _read_binary_hash(r: _Reader) -> dict[str, Any]:
    info = _binary_header(r)
    b, nflip = r.i32("b"), r.i32("nflip")
    buckets = r.u64("the number of buckets")
    il_nbit = r.i32("the bucket-size width")
    if not 1 <= b <= 64 or not 0 <= nflip <= b or flip_probes(b, nflip) > MAX_FLIP_PROBES \
            or not 0 <= il_nbit <= 62 or buckets > info["ntotal"]:
        raise FaissLayoutError(f"invalid hash parameters b={b}, nflip={nflip}, buckets={buckets}")
    # faiss allocates (b + il_nbit) * buckets bytes before reading the table.
    if (b + il_nbit) * buckets > 8 * r.left:
        raise FaissLayoutError("the hash table declares more buckets than the payload holds")
    buf = r.vector("u1", "the hash table")
    if buf.size * 8 < (b + il_nbit) * buckets:
        raise FaissLayoutError("the hash table is shorter than its buckets")
    total = pos = 0
    for _bucket in range(buckets):
        count = _read_bits(buf, pos + b, il_nbit)
        pos += b + il_nbit
        ids = r.vector("<i8", "bucket ids")
        vecs = r.vector("u1", "bucket codes")
        if ids.size != count or vecs.size != count * info["code_size"]:
            raise FaissLayoutError("a bucket's ids or codes do not match its size")
        if count and (ids.min() < 0 or ids.max() >= info["ntotal"]):
            raise FaissLayoutError(f"a bucket holds ids outside 0..{info['ntotal'] - 1}")
        total += count
    if total > info["ntotal"]:
        raise FaissLayoutError(f"the buckets hold {total} ids for {info['ntotal']} items")
    return {**info, "type": "IBHh"}


# --------------------------------------------------------------------------------------------- HNSW


def _read_hnsw(r: _Reader, ntotal: int) -> None:
    probas = r.vector("<f8", "assign_probas")
    cum = r.vector("<i4", "cum_nneighbor_per_level").astype(np.int64)
    levels = r.vector("<i4", "levels").astype(np.int64)
    offsets = r.vector("<u8", "offsets")
    neighbors = r.vector("<i4", "neighbors").astype(np.int64)
    entry_point, max_level = r.i32("entry_point"), r.i32("max_level")
    ef_construction, ef_search = r.i32("efConstruction"), r.i32("efSearch")
    r.i32("(unused)")
    if probas.size < 1 or not np.all(np.isfinite(probas)) or probas.min() < 0 or probas.max() > 1:
        raise FaissLayoutError("invalid HNSW level probabilities")
    if cum.size != probas.size + 1 or cum[0] != 0 or np.any(np.diff(cum) < 0):
        raise FaissLayoutError("invalid HNSW neighbours-per-level table")
    if not 1 <= ef_construction <= MAX_EF or not 1 <= ef_search <= MAX_EF:
        raise FaissLayoutError(f"HNSW efConstruction={ef_construction} / efSearch={ef_search} outside 1..{MAX_EF} "
                               "(a search allocates efSearch entries per query)")
    if levels.size != ntotal or offsets.size != ntotal + 1:
        raise FaissLayoutError(f"HNSW levels/offsets ({levels.size}, {offsets.size}) do not match {ntotal} items")
    if ntotal == 0:
        if neighbors.size or offsets[0] != 0 or entry_point != -1 or max_level != -1:
            raise FaissLayoutError("an empty HNSW graph holds neighbours or an entry point")
        return
    if levels.min() < 1 or levels.max() >= cum.size:
        raise FaissLayoutError("HNSW node levels out of range")
    counts = np.diff(offsets.astype(np.int64)) if offsets.max() < 1 << 62 else None
    if counts is None or offsets[0] != 0 or np.any(counts != cum[levels]) or int(offsets[-1]) != neighbors.size:
        raise FaissLayoutError("HNSW neighbour offsets do not match the node levels")
    if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= ntotal):
        raise FaissLayoutError(f"HNSW neighbours outside 0..{ntotal - 1}")
    if not 0 <= entry_point < ntotal or max_level != levels[entry_point] - 1:
        raise FaissLayoutError(f"invalid HNSW entry point {entry_point} / max level {max_level}")
    # A neighbour listed at level l must itself reach level l (search walks its level-l list next).
    slot = np.arange(neighbors.size) - np.repeat(offsets[:-1].astype(np.int64), counts)
    slot_level = np.searchsorted(cum, slot, side="right") - 1
    linked = neighbors >= 0
    if np.any(levels[neighbors[linked]] <= slot_level[linked]):
        raise FaissLayoutError("an HNSW node links to a node below its level")


# --------------------------------------------------------------------------------------------- dense


def _dense_header(r: _Reader) -> dict[str, int]:
    d = r.i32("d")
    ntotal = r.i64("ntotal")
    r.i64("(unused)")
    r.i64("(unused)")
    is_trained = r.u8("is_trained")
    metric = r.i32("metric_type")
    if metric > 1:
        r.scalar("<f4", "metric_arg")
    if d <= 0 or ntotal < 0 or is_trained not in (0, 1):
        raise FaissLayoutError(f"invalid dense index header d={d}, ntotal={ntotal}")
    return {"d": d, "ntotal": ntotal, "metric": metric}


def _read_dense(r: _Reader, depth: int = 0) -> dict[str, Any]:
    code = r.fourcc()
    if code == _fourcc("IxFI"):
        info = _dense_header(r)
        xb = r.vector("<f4", "the vectors")  # faiss' READXBVECTOR: the count is in floats
        if xb.size != info["ntotal"] * info["d"]:
            raise FaissLayoutError(f"{xb.size} floats for {info['ntotal']} vectors of dimension {info['d']}")
        return {**info, "type": "IxFI"}
    if code == _fourcc("IHNf") and depth == 0:
        info = _dense_header(r)
        _read_hnsw(r, info["ntotal"])
        storage = _read_dense(r, depth + 1)
        _same_storage(info, storage, "IxFI")
        return {**info, "type": "IHNf"}
    raise FaissLayoutError(f"dense index type {_name(code)!r} is not one crossret writes")


# --------------------------------------------------------------------------------------------- entry points


def _check_whole(data: Any, read: Any) -> dict[str, Any]:
    r = _Reader(data)
    info = read(r)
    if r.left:
        raise FaissLayoutError(f"{r.left} unexpected bytes after the index")
    return info


def check_binary_payload(data: Any) -> dict[str, Any]:
    """Check a ``faiss.serialize_index_binary`` payload; returns its ``type``, ``d``, ``ntotal``."""
    return _check_whole(data, _read_binary)


def check_dense_payload(data: Any) -> dict[str, Any]:
    """Check a ``faiss.serialize_index`` payload of a dense crossret index."""
    return _check_whole(data, _read_dense)
