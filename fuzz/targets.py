"""Fuzz targets over crossret's readers of untrusted files and its packing / metrics functions.

Every target is a function ``run(data: bytes, work: Path) -> None`` that feeds ``data`` to one reader
(written to a file under ``work``) or decodes arguments for the packing / metrics functions from it,
and *uses* whatever comes back. The contract checked: any input gives a result or a
:class:`crossret.errors.CrossretError`. Any other exception, a crash, a hang (libFuzzer's
``-timeout``) or a huge allocation (``-rss_limit_mb``) is a finding; results of the packing /
metrics functions are also compared with a straightforward reference (an ``AssertionError`` is a
finding too).

``seeds(name)`` gives valid inputs written by crossret's (or the format's own) writers, which the
fuzzers mutate: ``fuzz/run.py`` (atheris / libFuzzer) and ``tests/test_fuzz_readers.py`` (hypothesis)
share these targets and seeds. Nothing binary is committed; seeds are generated on the fly.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossret.errors import CrossretError


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes, Path], None]
    seeds: Callable[[], list[bytes]]
    heavy: bool = False  # imports torch (slow start)
    owned: bool = True  # the code under test is owned by the reliability work (else: report findings)


def guarded(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; a CrossretError is an accepted outcome (returns None)."""
    try:
        return fn()
    except CrossretError:
        return None


def _read_file_quietly(data: bytes, path: Path, reader: Callable[[Path], Any]) -> Any:
    """Write ``data`` to ``path`` and read it with ``reader``, library warnings silenced; a
    CrossretError is an accepted outcome (returns None)."""
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return guarded(lambda: reader(path))


def _touch(array: Any) -> None:
    """Read every byte of an array (memory-mapped reads fault here if the file is short)."""
    array = np.asarray(array)
    if array.dtype.hasobject:
        raise AssertionError("a reader returned an object array")
    array.tobytes()


def _to_bytes(write: Callable[[Path], Any], name: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        write(path)
        return path.read_bytes()


# ------------------------------------------------------------------------------------------------ npy
def _run_npy(data: bytes, work: Path) -> None:
    from crossret.storage.safe_read import check_npy_file, load_npy

    path = work / "a.npy"
    path.write_bytes(data)
    for mmap in (False, True):
        array = guarded(lambda mmap=mmap: load_npy(path, "array", mmap=mmap))
        if array is not None:
            _touch(array)
            del array
    guarded(lambda: check_npy_file(path))


def _seeds_npy() -> list[bytes]:
    out = []
    for array in (np.arange(12, dtype=np.uint8).reshape(3, 4), np.ones((2, 3), np.float32),
                  np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)), np.float64(3.5), np.zeros((0, 4)),
                  np.array([b"ab", b"c"]), np.zeros(2, dtype=[("a", "<i2"), ("b", "<f4")])):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.arange(4, dtype=np.int16), version=(2, 0))
    out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ feature files
def _read_features(path: Path) -> None:
    from crossret.data.readers import detect_format, read_domain

    guarded(lambda: detect_format(path))
    for role in ("source", "target"):
        domain = guarded(lambda role=role: read_domain(path, role=role))
        if domain is not None:
            assert domain.features.dtype == np.float32 and domain.features.ndim == 2
            assert domain.labels.dtype == np.int64 and domain.labels.shape == (domain.features.shape[0],)
            assert bool(np.isfinite(domain.features).all())
            _touch(domain.features)


def _feature_runner(ext: str) -> Callable[[bytes, Path], None]:
    def run(data: bytes, work: Path) -> None:
        path = work / f"features{ext}"
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _read_features(path)

    return run


def _small_domain(n: int = 5, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).round(2), (np.arange(n) % 2 + 1).astype(np.float64)


def _seeds_npz() -> list[bytes]:
    x, y = _small_domain()
    return [
        _to_bytes(lambda p: np.savez(p, features=x.astype(np.float32), labels=y.astype(np.int64)), "a.npz"),
        _to_bytes(lambda p: np.savez_compressed(p, features=x, labels=y), "b.npz"),
        _to_bytes(lambda p: np.savez(p, deepfea=x, label=y.reshape(-1, 1)), "c.npz"),
    ]


def _seeds_mat() -> list[bytes]:
    import scipy.io
    import scipy.sparse

    x, y = _small_domain()
    seeds = []
    for compress in (False, True):
        seeds.append(_to_bytes(lambda p, c=compress: scipy.io.savemat(p, {"deepfea": x, "label": y.reshape(-1, 1)},
                                                                          do_compression=c), "a.mat"))
    seeds.append(_to_bytes(lambda p: scipy.io.savemat(p, {"X_src": x.T, "Y_src": y, "X_tar": x.T, "Y_tar": y}),
                           "jda.mat"))
    seeds.append(_to_bytes(lambda p: scipy.io.savemat(p, {"fts": scipy.sparse.csc_matrix(np.abs(x).round()),
                                                          "labels": y}), "surf.mat"))
    seeds.append(_to_bytes(lambda p: scipy.io.savemat(p, {"feas": x, "labels": y}, format="4"), "v4.mat"))
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0], cells[0, 1] = x, "text"
    seeds.append(_to_bytes(lambda p: scipy.io.savemat(p, {"deepfea": x, "label": y, "c": cells,
                                                          "s": {"a": np.arange(2)}}), "cells.mat"))
    return seeds


def _seeds_h5() -> list[bytes]:
    import h5py

    x, y = _small_domain()

    def plain(path: Path) -> None:
        with h5py.File(path, "w") as handle:
            handle["data"] = x.astype(np.float32)
            handle["target"] = y.astype(np.int32)

    def mat73(path: Path) -> None:
        with h5py.File(path, "w", userblock_size=512) as handle:
            handle.create_dataset("deepfea", data=x.T, compression="gzip")
            handle["label"] = y.reshape(1, -1)
        with open(path, "r+b") as raw:
            raw.write(b"MATLAB 7.3 MAT-file".ljust(116, b" "))
            raw.seek(124)
            raw.write(b"\x00\x02IM")

    return [_to_bytes(plain, "a.h5"), _to_bytes(mat73, "b.h5")]


def _seeds_csv() -> list[bytes]:
    return [b"f1,f2,label\n0.5,1.5,0\n2,3,1\n-1e3,4.25,1\n", b"1,2,3\n4,5,6\n", b"\xef\xbb\xbfa,b\n1,2\n"]


# ------------------------------------------------------------------------------------------------ wikipedia
def _run_wiki(data: bytes, work: Path) -> None:
    from crossret.data.crossmodal import category_transfer_split, read_wikipedia_mat

    sets = _read_file_quietly(data, work / "wiki.mat", read_wikipedia_mat)
    if sets is not None:
        train, test = sets
        _touch(train.image), _touch(test.text)
        guarded(lambda: category_transfer_split(train, test, source_classes=(0,)))


def _seeds_wiki() -> list[bytes]:
    import scipy.io
    import scipy.sparse

    rng = np.random.default_rng(0)
    n = 6
    onehot = np.zeros((3, n), bool)
    onehot[np.arange(n) % 3, np.arange(n)] = True
    split = {"ind_train": np.array([[1, 2, 3, 4]]), "ind_test": np.array([[5, 6]])}
    data = {"X1": rng.normal(size=(4, n)).round(2), "X2": rng.normal(size=(3, n)).round(2),
            "Y": scipy.sparse.csc_matrix(onehot), "split": split}
    return [_to_bytes(lambda p, c=c: scipy.io.savemat(p, {"data": data}, do_compression=c), "wiki.mat")
            for c in (False, True)]


# ------------------------------------------------------------------------------------------------ person
_PERSON = (("cuhk-pedes", "reid_raw.json"), ("icfg-pedes", "ICFG-PEDES.json"), ("rstpreid", "data_captions.json"))


def _run_person(data: bytes, work: Path) -> None:
    from crossret.data.person import build_eval_view, build_train_pairs, load_person_dataset

    if not data:
        return
    name, file_name = _PERSON[data[0] % len(_PERSON)]
    root = work / "person"
    root.mkdir(exist_ok=True)
    (root / file_name).write_bytes(data[1:])
    for check_images in (False, True):
        dataset = guarded(lambda c=check_images: load_person_dataset(name, root, check_images=c))
        if dataset is not None:
            dataset.summary()
            guarded(lambda d=dataset: build_train_pairs(d, None))
            guarded(lambda d=dataset: build_train_pairs(d, None, hide_ids=True))
            guarded(lambda d=dataset: build_eval_view(d, None).relevant_counts())
    (root / file_name).unlink()


def _seeds_person() -> list[bytes]:
    seeds = []
    for selector, (name, _file) in enumerate(_PERSON):
        key = "img_path" if name == "rstpreid" else "file_path"
        base = 1 if name == "cuhk-pedes" else 0
        splits = ("train", "test", "val" if name != "icfg-pedes" else "test")
        entries = [{"split": splits[i], "captions": [f"A man in a red coat, number {i}.", "walks-by"],
                    key: f"cam_a/{i:04d}.jpg", "id": base + i // 2, "processed_tokens": [["a"]]} for i in range(3)]
        seeds.append(bytes([selector]) + json.dumps(entries).encode())
    return seeds


# ------------------------------------------------------------------------------------------------ images
def _run_image(data: bytes, work: Path) -> None:
    from crossret.data.person import load_image

    image = _read_file_quietly(data, work / "image.bin", load_image)
    if image is not None:
        assert image.mode == "RGB"
        np.asarray(image).sum()


def _seeds_image() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
    out = []
    for fmt, image in (("PNG", rgb), ("JPEG", rgb), ("GIF", rgb.convert("P")), ("BMP", rgb), ("TIFF", rgb),
                       ("PNG", rgb.convert("L")), ("WEBP", rgb)):
        buf = io.BytesIO()
        try:
            image.save(buf, format=fmt)
        except (OSError, KeyError):  # a codec this PIL build lacks
            continue
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------------------ indexes
_INDEX_KINDS: tuple[tuple[str, str, dict[str, int]], ...] = (
    ("binary", "flat", {}), ("binary", "ivf", {"nlist": 2}), ("binary", "hnsw", {"M": 4}),
    ("binary", "multihash", {}), ("binary", "BHash8", {}), ("binary", "BIVF2_HNSW4", {}),
    ("dense", "flat", {}), ("dense", "hnsw", {"M": 4}),
)
_BITS = 16
_DIM = 4


def _small_index(kind_index: int, ids: bool = False) -> Any:
    from crossret.retrieval.index import BinaryIndex, DenseIndex

    family, kind, params = _INDEX_KINDS[kind_index]
    rng = np.random.default_rng(kind_index)
    if family == "binary":
        codes = rng.integers(0, 256, (12, _BITS // 8), dtype=np.uint8)
        with _Silence():
            return BinaryIndex.from_packed(codes, _BITS, kind, ids=np.arange(12) * 2 if ids else None, **params)
    return DenseIndex.from_embeddings(rng.normal(size=(12, _DIM)).astype(np.float32), kind,
                                      ids=np.arange(12) * 2 if ids else None, **params)


class _Silence:
    """Silence faiss' stderr chatter (k-means warnings) while building seeds."""

    def __enter__(self) -> None:
        self._fd = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._fd, 2)
        os.close(self._fd)


def _use_index(index: Any) -> None:
    from crossret.retrieval.index import BinaryIndex

    rng = np.random.default_rng(1)
    if isinstance(index, BinaryIndex):
        width = (index.bits + 7) // 8
        queries = rng.integers(0, 256, (3, width), dtype=np.uint8)
        if index.bits % 8:
            queries[:, -1] &= (1 << (index.bits % 8)) - 1
        for k in (1, 5, 40):
            dist, ids = index.search(queries, k)
            assert dist.shape == ids.shape == (3, k)
            _check_ids(index, ids)
        result = guarded(lambda: index.range_search(queries, 3))
        if result is not None:
            lims, dist, ids = result
            assert lims.shape == (4,) and dist.shape == ids.shape == (int(lims[-1]),)
            _check_ids(index, ids)
    else:
        queries = rng.normal(size=(3, index.dim)).astype(np.float32)
        for k in (1, 5, 40):
            scores, ids = index.search(queries, k)
            assert scores.shape == ids.shape == (3, k)
            _check_ids(index, ids)
    repr(index)


def _check_ids(index: Any, ids: np.ndarray) -> None:
    """Returned ids are -1 (missing) or ids of indexed items."""
    found = ids[ids >= 0]
    assert ids.min(initial=0) >= -1
    if index._ids is None:
        assert found.max(initial=-1) < index.ntotal, (found.max(), index.ntotal)
    else:
        assert np.isin(found, index._ids).all()


def _run_index_file(data: bytes, work: Path) -> None:
    from crossret.retrieval.index import BinaryIndex, DenseIndex, read_index_header

    path = work / "index.crx"
    path.write_bytes(data)
    guarded(lambda: read_index_header(path))
    for cls in (BinaryIndex, DenseIndex):
        index = guarded(lambda cls=cls: cls.load(path))
        if index is not None:
            _use_index(index)


def _seeds_index_file() -> list[bytes]:
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(_INDEX_KINDS)):
            for ids in (False, True):
                path = Path(tmp) / "i"
                _small_index(i, ids).save(path)
                out.append(path.read_bytes())
    return out


def _run_index_payload(data: bytes, work: Path) -> None:
    """Structure-aware: ``data`` = kind selector byte + a faiss payload; the frame around it (sizes and
    SHA-256) is made valid here, so mutations reach the faiss-layout checks and faiss itself."""
    from crossret.retrieval import index as index_module

    if not data:
        return
    family, kind, params = _INDEX_KINDS[data[0] % len(_INDEX_KINDS)]
    payload = data[1:]
    ntotal = 0
    if family == "binary" and len(payload) >= 20:
        ntotal = struct.unpack_from("<q", payload, 12)[0]
    elif family == "dense" and len(payload) >= 16:
        ntotal = struct.unpack_from("<q", payload, 8)[0]
    header: dict[str, Any] = {"kind": kind, "ntotal": int(ntotal), "params": dict(params),
                              "faiss_bytes": len(payload), "ids_bytes": 0, "faiss_version": "fuzz"}
    if family == "binary":
        header.update(index_type="binary", bits=_BITS, padded_bits=64, bit_order="lsb-first")
        magic, cls = index_module._BINARY_MAGIC, index_module.BinaryIndex
    else:
        header.update(index_type="dense", dim=_DIM, metric="inner_product", normalize=False)
        magic, cls = index_module._DENSE_MAGIC, index_module.DenseIndex
    path = work / "payload.crx"
    path.write_bytes(index_module._CONTAINERS[magic].seal(header, payload))
    index = guarded(lambda: cls.load(path))
    if index is not None:
        _use_index(index)


def _seeds_index_payload() -> list[bytes]:
    out = []
    for i, (family, _kind, _params) in enumerate(_INDEX_KINDS):
        index = _small_index(i)
        raw = index._serialize().tobytes()
        out.append(bytes([i]) + raw)
        del family
    return out


# ------------------------------------------------------------------------------------------------ packed codes
def _run_packed(data: bytes, work: Path) -> None:
    from crossret.retrieval.streaming import build_index_from_packed, read_packed_codes, sidecar_path

    if len(data) < 2:
        return
    size = int.from_bytes(data[:2], "little")
    path = work / "codes.npy"
    path.write_bytes(data[2:2 + size])
    side = sidecar_path(path)
    if len(data) > 2 + size:
        side.write_bytes(data[2 + size:])
    elif side.exists():
        side.unlink()
    for bits in (None, 12):
        result = guarded(lambda bits=bits: read_packed_codes(path, bits))
        if result is not None:
            codes, got_bits = result
            _touch(codes)
            index = guarded(lambda codes=codes, b=got_bits: build_index_from_packed(codes, b))
            if index is not None:
                _use_index(index)


def _seeds_packed() -> list[bytes]:
    from crossret.retrieval.packing import pack_codes

    codes = pack_codes(np.where(np.random.default_rng(0).random((6, 12)) > 0.5, 1, -1))
    buf = io.BytesIO()
    np.save(buf, codes)
    npy = buf.getvalue()
    side = json.dumps({"format": "crossret-packed-codes", "bits": 12, "n": 6, "width": 2,
                       "bit_order": "lsb-first", "method": "lsh"}).encode()
    return [len(npy).to_bytes(2, "little") + npy + side, len(npy).to_bytes(2, "little") + npy]


# ------------------------------------------------------------------------------------------------ not owned here
def _run_method(data: bytes, work: Path) -> None:
    from crossret.hashing.persistence import read_method_file
    from crossret.hashing.registry import load_method

    path = work / "model.npz"
    path.write_bytes(data)
    guarded(lambda: read_method_file(path))
    method = guarded(lambda: load_method(path))
    if method is not None and isinstance(method.input_dim, int) and 0 < method.input_dim <= 4096:
        guarded(lambda: method.encode(np.zeros((2, method.input_dim), np.float32)))


def _seeds_method() -> list[bytes]:
    from crossret.data.domain import Domain
    from crossret.hashing.registry import make_method

    x, y = _small_domain(20, 6)
    source = Domain("s", x.astype(np.float32), y.astype(np.int64) - 1)
    out = []
    for name in ("lsh", "itq"):
        method = make_method(name, 8, seed=0).fit(source, source)
        out.append(_to_bytes(method.save, "m.npz"))
    return out


def _run_rundir(data: bytes, work: Path) -> None:
    from crossret.experiment import RunConfig, read_run_metrics
    from crossret.storage.safe_read import read_yaml_mapping

    (work / "config.yaml").write_bytes(data)
    (work / "metrics.json").write_bytes(data)
    guarded(lambda: read_yaml_mapping(work / "config.yaml"))
    guarded(lambda: RunConfig.from_yaml(work / "config.yaml"))
    guarded(lambda: read_run_metrics(work))


def _seeds_rundir() -> list[bytes]:
    import yaml

    return [yaml.safe_dump({"run": {"method": "lsh", "bits": 16, "seed": 0, "benchmark": "demo"}}).encode(),
            json.dumps({"method": "lsh", "map_cross": 0.5, "precision_at": {"100": 0.2}}).encode(),
            b"a: &x [1, 2]\nb: *x\n"]


def _run_checkpoint(data: bytes, work: Path) -> None:
    from crossret.textimage.checkpoint import load_albef_checkpoint

    path = work / "ck.pth"
    path.write_bytes(data)
    guarded(lambda: load_albef_checkpoint(path, model=_tiny_albef(), strict=False))


_TINY: list[Any] = []


def _tiny_albef() -> Any:
    if not _TINY:
        from crossret.textimage.albef import AlbefConfig, AlbefModel

        _TINY.append(AlbefModel(AlbefConfig.tiny()))
    return _TINY[0]


def _seeds_checkpoint() -> list[bytes]:
    import torch

    state = {k: v for k, v in list(_tiny_albef().state_dict().items())[:3]}
    buf = io.BytesIO()
    torch.save({"model": {"visual_encoder." + k: v.clone() for k, v in state.items()}}, buf)
    return [buf.getvalue()]


def _run_vocab(data: bytes, work: Path) -> None:
    from crossret.textimage.tokenize import load_bert_vocab

    path = work / "vocab.txt"
    path.write_bytes(data)
    guarded(lambda: load_bert_vocab(path, max_length=16))


def _seeds_vocab() -> list[bytes]:
    return ["\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "##s"]).encode() + b"\n"]


# ------------------------------------------------------------------------------------------------ packing / metrics
class Draw:
    """Arguments decoded from fuzzer bytes (a tiny FuzzedDataProvider that hypothesis can feed too)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        value = 0
        for _ in range(max(1, (span.bit_length() + 7) // 8)):
            value = value << 8 | self.byte()
        return lo + value % span

    def choice(self, options: Any) -> Any:
        return options[self.int(0, len(options) - 1)]

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")


_SPECIAL = (0.0, -0.0, 1.0, -1.0, 0.5, np.nan, np.inf, -np.inf, 1e308, -1e-308, 2.0, 3.0)
_DTYPES = (np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float32, np.float64, np.bool_, np.complex64, "U1")


def _draw_array(draw: Draw, rows: int, cols: int, *, kind: str = "codes") -> np.ndarray:
    dtype = draw.choice(_DTYPES) if draw.byte() < 40 else (np.int8 if kind == "codes" else np.uint8)
    shape = (rows, cols) if draw.byte() >= 20 else draw.choice([(rows,), (rows, cols, 1), (), (0, cols), (rows, 0)])
    n = int(np.prod(shape))
    mode = draw.byte() % 4
    if mode == 0:
        values = np.array([draw.choice((-1, 1)) for _ in range(n)], dtype=np.float64)
    elif mode == 1:
        values = np.array([draw.choice((0, 1)) for _ in range(n)], dtype=np.float64)
    elif mode == 2:
        values = np.array([draw.choice(_SPECIAL) for _ in range(n)], dtype=np.float64)
    else:
        values = np.frombuffer(draw.raw(n), dtype=np.uint8).astype(np.float64)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if dtype == "U1":
            return values.astype(str).reshape(shape)
        return values.astype(dtype).reshape(shape)


def _draw_int(draw: Draw) -> Any:
    return draw.choice((0, 1, 2, 7, 8, 9, 12, 16, 63, 64, 65, 100, -1, -8, 2**40, 2**70, np.int8(120),
                        np.uint64(2**63 + 5), True, 3.0, None, "8"))


def reference_pack(codes: np.ndarray) -> np.ndarray:
    """Bit j of a code in byte j // 8, bit j % 8 (least significant first); +1 / 1 / True is a set bit."""
    n, length = codes.shape
    out = np.zeros((n, (length + 7) // 8), np.uint8)
    for i in range(n):
        for j in range(length):
            if codes[i, j] > 0:
                out[i, j // 8] |= 1 << (j % 8)
    return out


def _run_packing(data: bytes, work: Path) -> None:
    from crossret.retrieval import packing

    draw = Draw(data)
    rows, cols = draw.int(0, 5), draw.int(0, 70)
    array = _draw_array(draw, rows, cols)
    bits = _draw_int(draw)
    op = draw.int(0, 7)
    if op == 0:
        packed = guarded(lambda: packing.pack_codes(array))
        if packed is not None:
            assert array.ndim == 2 and array.dtype.kind in "biuf" and array.shape[1] > 0
            signs = packing.as_pm1(array)
            np.testing.assert_array_equal(packed, reference_pack(signs))
            np.testing.assert_array_equal(packing.unpack_codes(packed, array.shape[1]), signs)
    elif op == 1:
        signs = guarded(lambda: packing.as_pm1(array))
        if signs is not None:
            assert signs.dtype == np.int8 and set(np.unique(signs).tolist()) <= {-1, 1}
            assert signs.shape == array.shape
    elif op == 2:
        out = guarded(lambda: packing.binarize(array))
        if out is not None:
            with np.errstate(invalid="ignore"):
                np.testing.assert_array_equal(out, np.where(np.asarray(array, dtype=np.float64) >= 0, 1, -1))
    elif op == 3:
        raw = _draw_array(draw, rows, draw.int(0, 12), kind="packed")
        unpacked = guarded(lambda: packing.unpack_codes(raw, bits))
        if unpacked is not None:
            assert unpacked.shape == (raw.shape[0], int(bits))
            np.testing.assert_array_equal(packing.pack_codes(unpacked), raw[:, :(int(bits) + 7) // 8])
    elif op == 4:
        raw = _draw_array(draw, rows, draw.int(0, 12), kind="packed")
        multiple = draw.choice((64, 8, 32, 0, -8, 7, 128, 2**40))
        padded = guarded(lambda: packing.pad_packed(raw, bits, multiple))
        if padded is not None:
            width = -(-int(bits) // multiple) * multiple // 8
            assert padded.shape == (raw.shape[0], width)
            common = min(width, raw.shape[1])
            np.testing.assert_array_equal(padded[:, :common], raw[:, :common])
            assert not padded[:, common:].any()
    elif op == 5:
        raw = _draw_array(draw, rows, draw.int(0, 12), kind="packed")
        words = guarded(lambda: packing.packed_to_words(raw, bits))
        if words is not None:
            assert words.dtype == np.uint64 and words.shape == (raw.shape[0], -(-int(bits) // 64))
    elif op == 6:
        raw = _draw_array(draw, rows, draw.int(0, 12), kind="packed")
        guarded(lambda: packing.check_packed(raw, bits, allow_padding=bool(draw.byte() & 1)))
    else:
        for fn in (packing.packed_width, packing.padded_bits):
            value = guarded(lambda fn=fn: fn(bits))
            if value is not None:
                assert isinstance(value, int) and value > 0


def reference_hamming_ap(q: np.ndarray, db: np.ndarray, q_lab: np.ndarray, db_lab: np.ndarray,
                         topk: int | None) -> tuple[np.ndarray, np.ndarray]:
    """AP and AP@k per query with ties broken by database order (stable sort), from ±1 codes."""
    n_db = db.shape[0]
    k = n_db if topk is None else min(topk, n_db)
    ap, apk = np.zeros(q.shape[0]), np.zeros(q.shape[0])
    for i in range(q.shape[0]):
        dist = (q[i][None, :] != db).sum(axis=1)
        order = np.argsort(dist, kind="stable")
        rel = (db_lab[order] == q_lab[i]) & (db_lab[order] != -1)
        hits = np.cumsum(rel)
        precision = hits / np.arange(1, n_db + 1)
        ap[i] = precision[rel].sum() / rel.sum() if rel.any() else 0.0
        apk[i] = precision[:k][rel[:k]].sum() / rel[:k].sum() if rel[:k].any() else 0.0
    return ap, apk


def _run_metrics(data: bytes, work: Path) -> None:
    from crossret.retrieval.metrics import evaluate_hamming, mean_average_precision

    draw = Draw(data)
    n_q, n_db, length = draw.int(0, 4), draw.int(0, 9), draw.int(1, 70)
    well_formed = draw.byte() >= 60
    if well_formed:
        q = np.where(np.frombuffer(draw.raw(n_q * length), np.uint8).reshape(n_q, length) & 1, 1, -1)
        db = np.where(np.frombuffer(draw.raw(n_db * length), np.uint8).reshape(n_db, length) & 1, 1, -1)
        q_lab = np.array([draw.int(-1, 3) for _ in range(n_q)])
        db_lab = np.array([draw.int(-1, 3) for _ in range(n_db)])
    else:
        q, db = _draw_array(draw, n_q, length), _draw_array(draw, n_db, length)
        q_lab, db_lab = _draw_array(draw, n_q, 1, kind="labels"), _draw_array(draw, n_db, 1, kind="labels")
        if draw.byte() & 1:
            q_lab, db_lab = q_lab.reshape(-1), db_lab.reshape(-1)
    ties = draw.choice(("expected", "index", "index", "random"))
    topk = draw.choice((None, None, 1, 2, 3, 5, 100, 0, -3, 2**70, 2.5))
    ns = draw.choice(((), (1,), (1, 2, 5), (100,), (0,), (2**63,)))
    chunk = draw.choice((1, 2, 3, 262144, 0))
    bits = None
    if draw.byte() < 30:
        bits = _draw_int(draw)
    result = guarded(lambda: evaluate_hamming(q, db, q_lab, db_lab, bits=bits, ties=ties, topk=topk,
                                              precision_ns=ns, chunk_size=chunk))
    if result is None:
        return
    assert 0.0 <= result.map <= 1.0 + 1e-12 and result.ap.shape == (q.shape[0],)
    for value in result.precision_at.values():
        assert 0.0 <= value <= 1.0 + 1e-12
    if well_formed and bits is None:
        ap, apk = reference_hamming_ap(q, db, q_lab.astype(np.int64), db_lab.astype(np.int64), topk)
        if ties == "index":
            np.testing.assert_allclose(result.ap, ap, rtol=1e-9, atol=1e-12)
            if topk is not None:
                np.testing.assert_allclose(result.ap_at_k, apk, rtol=1e-9, atol=1e-12)
        else:  # the expectation over tie orders is bounded by the best and worst orders
            assert np.all(result.ap >= 0) and np.all(result.ap <= 1 + 1e-12)
        value = mean_average_precision(q, db, q_lab, db_lab, ties=ties)
        assert abs(value - result.map) < 1e-12


def reference_ranking(scores: np.ndarray, q_ids: np.ndarray, g_ids: np.ndarray, ks: list[int]) -> dict[str, float]:
    """Rank-k / mAP / mINP with a stable descending order (ties in gallery order)."""
    n_q = scores.shape[0]
    out = dict.fromkeys([f"rank{k}" for k in ks], 0.0)
    ap_total = inp_total = 0.0
    for i in range(n_q):
        order = sorted(range(scores.shape[1]), key=lambda g: -scores[i, g])
        ranks = [r + 1 for r, g in enumerate(order) if g_ids[g] == q_ids[i]]
        if not ranks:
            continue
        for k in set(ks):
            out[f"rank{k}"] += (ranks[0] <= k) / n_q
        ap_total += sum(j / pos for j, pos in enumerate(ranks, start=1)) / len(ranks)
        inp_total += len(ranks) / ranks[-1]
    out.update(map=ap_total / n_q, minp=inp_total / n_q)
    return out


def _run_ranking(data: bytes, work: Path) -> None:
    from crossret.retrieval.metrics import dense_retrieval_metrics, ranking_metrics

    draw = Draw(data)
    n_q, n_g, dim = draw.int(0, 4), draw.int(0, 7), draw.int(0, 3)
    well_formed = draw.byte() >= 60
    ks = draw.choice(((1, 5, 10), (1,), (2**70,), (0,), (), (1, 1)))
    chunk = draw.choice((1, 2, 1024, 0))
    if well_formed:
        scores = np.array([[draw.choice((0.0, -0.0, 1.0, 0.5, -2.0, np.inf, -np.inf)) for _ in range(n_g)]
                           for _ in range(n_q)]).reshape(n_q, n_g)
        q_ids = np.array([draw.int(0, 3) for _ in range(n_q)])
        g_ids = np.array([draw.int(0, 3) for _ in range(n_g)])
    else:
        scores = _draw_array(draw, n_q, n_g, kind="scores")
        q_ids, g_ids = _draw_array(draw, n_q, 1, kind="labels"), _draw_array(draw, n_g, 1, kind="labels")
    result = guarded(lambda: ranking_metrics(scores, q_ids, g_ids, ks=ks, chunk_size=chunk))
    if result is not None:
        for key in ("map", "minp"):
            assert 0.0 <= result[key] <= 1.0 + 1e-12
        if well_formed:
            expected = reference_ranking(scores, q_ids, g_ids, list(ks))
            for key, value in expected.items():
                assert abs(result[key] - value) < 1e-9, (key, result[key], value)
    query = _draw_array(draw, n_q, dim, kind="emb")
    gallery = _draw_array(draw, n_g, dim, kind="emb")
    guarded(lambda: dense_retrieval_metrics(query, gallery, q_ids, g_ids, ks=ks, chunk_size=chunk))


def _run_hamming(data: bytes, work: Path) -> None:
    from crossret.retrieval import hamming

    draw = Draw(data)
    op = draw.int(0, 7)
    ints = [draw.choice((0, 1, 2, 3, 5, 64, 65, 1000, -1, 2**62, 2**70, True, 1.5)) for _ in range(6)]
    if op == 0:
        value = guarded(lambda: hamming.harmonic_difference(ints[0], ints[1]))
        if value is not None and ints[1] <= 64:
            assert abs(value - sum(1.0 / (ints[0] + i) for i in range(1, ints[1] + 1))) < 1e-9
    elif op == 1:
        guarded(lambda: hamming.expected_group_sum(*ints[:4]))
    elif op == 2:
        value = guarded(lambda: hamming.expected_truncated_ap(draw.choice((0.0, 1.5, np.nan)), *ints[:5]))
        if value is not None:
            assert np.isfinite(value)
    elif op in (3, 4, 5):
        n_q, n_db, width = draw.int(0, 3), draw.int(0, 5), draw.int(0, 2)
        q_words = _draw_array(draw, n_q, width, kind="words")
        db_words = _draw_array(draw, n_db, width, kind="words")
        if draw.byte() & 1:
            q_words = np.frombuffer(draw.raw(8 * n_q * width), np.uint64).reshape(n_q, width)
            db_words = np.frombuffer(draw.raw(8 * n_db * width), np.uint64).reshape(n_db, width)
        stride = draw.choice((1, 2, 65, 129, 17))
        q_lab = np.zeros(q_words.shape[0] if q_words.ndim else 0, np.int32)
        db_lab = np.zeros(db_words.shape[0] if db_words.ndim else 0, np.int32)
        if op == 3:
            hist = np.zeros((q_lab.size, 2 * stride), np.int64)
            guarded(lambda: hamming.distance_histograms(q_words, q_lab, db_words, db_lab, hist))
        elif op == 4:
            k = draw.choice((1, 3, 10, 0, -1, 2**40))
            result = guarded(lambda: hamming.hamming_topk(q_words, db_words, k, threads=draw.choice((None, 1, 0))))
            if result is not None:
                dist, ids = result
                assert dist.shape == ids.shape == (q_words.shape[0], k)
        else:
            shape = (q_lab.size, stride)
            state = [np.zeros(shape, np.int64) for _ in range(4)]
            ns = np.array([1, 3], np.int64)
            guarded(lambda: hamming.index_rank_pass(q_words, q_lab, db_words, db_lab, *state, ints[0], ns,
                                                    np.zeros(q_lab.size), np.zeros(q_lab.size),
                                                    np.zeros(q_lab.size, np.int64),
                                                    np.zeros((q_lab.size, 2), np.int64)))
    elif op == 6:
        counts = _draw_array(draw, draw.int(0, 3), draw.int(0, 4), kind="counts")
        if counts.dtype.kind not in "biuf" or draw.byte() & 1:
            counts = np.frombuffer(draw.raw(8 * 6), np.int64).reshape(2, 3) % 5
        counts = counts.astype(np.int64, copy=False)
        rel = np.minimum(counts, np.frombuffer(draw.raw(8 * counts.size), np.int64).reshape(counts.shape) % 3) \
            if draw.byte() & 1 else counts
        guarded(lambda: hamming.expected_rank_metrics(counts, rel, ints[0], np.array([1, 2], np.int64)))
    else:
        q = _draw_array(draw, draw.int(0, 3), draw.int(0, 3), kind="packed")
        db = _draw_array(draw, draw.int(0, 3), draw.int(0, 3), kind="packed")
        guarded(lambda: hamming.hamming_distances(q, db, ints[0]))


def _random_seeds(n: int = 6, size: int = 96) -> Callable[[], list[bytes]]:
    def seeds() -> list[bytes]:
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]

    return seeds


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("npy", _run_npy, _seeds_npy),
    Target("npz", _feature_runner(".npz"), _seeds_npz),
    Target("mat", _feature_runner(".mat"), _seeds_mat),
    Target("h5", _feature_runner(".h5"), _seeds_h5),
    Target("csv", _feature_runner(".csv"), _seeds_csv),
    Target("wiki", _run_wiki, _seeds_wiki),
    Target("index", _run_index_file, _seeds_index_file),
    Target("index_payload", _run_index_payload, _seeds_index_payload),
    Target("packed", _run_packed, _seeds_packed),
    Target("packing", _run_packing, _random_seeds()),
    Target("metrics", _run_metrics, _random_seeds()),
    Target("ranking", _run_ranking, _random_seeds()),
    Target("hamming", _run_hamming, _random_seeds()),
    Target("person", _run_person, _seeds_person, heavy=True),
    Target("image", _run_image, _seeds_image, heavy=True),
    # Readers owned elsewhere (hashing/persistence.py, experiment.py, storage.safe_read.read_yaml_mapping,
    # textimage/checkpoint.py, textimage/tokenize.py): fuzzed for the report, not part of the default test.
    Target("method", _run_method, _seeds_method, owned=False),
    Target("rundir", _run_rundir, _seeds_rundir, heavy=True, owned=False),
    Target("checkpoint", _run_checkpoint, _seeds_checkpoint, heavy=True, owned=False),
    Target("vocab", _run_vocab, _seeds_vocab, heavy=True, owned=False),
)}


def run_target(name: str, data: bytes, work: Path) -> None:
    """Run one target on ``data`` inside the scratch folder ``work`` (numpy warnings silenced)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        TARGETS[name].run(data, work)
