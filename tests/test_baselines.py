"""Baseline hashing methods: LSH, ITQ, source-only (and their save/load)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from crossret.data.domain import Domain
from crossret.errors import ConfigError, DataError, FileFormatError
from crossret.hashing import available_methods, make_method
from crossret.hashing.itq import ITQ, ITQConfig, itq_rotation
from crossret.hashing.lsh import LSH, LSHConfig
from crossret.hashing.networks import HashNet, pairwise_similarity_loss, quantization_loss
from crossret.hashing.preprocessing import FeatureNormalizer
from crossret.hashing.registry import load_method
from crossret.hashing.source_only import SourceOnly, SourceOnlyConfig
from crossret.storage.sealed import open_payload


# ---------------------------------------------------------------------------------------- helpers
def blobs(n_per_class: int, num_classes: int, dim: int, seed: int, spread: float = 1.0) -> tuple:
    """Gaussian blobs with fixed (seed-independent) centres, so train/test share a distribution."""
    centres = np.random.default_rng(1234).normal(0.0, 3.0, size=(num_classes, dim))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    features = centres[labels] + spread * rng.standard_normal((labels.size, dim))
    return features.astype(np.float32), labels


def unlabelled(features: np.ndarray, name: str = "target") -> Domain:
    return Domain(name, features, np.full(len(features), -1))


def mean_average_precision(q_codes, q_labels, db_codes, db_labels) -> float:
    """Brute-force MAP@all: sort the database by Hamming distance (ties by index)."""
    q = np.asarray(q_codes, dtype=np.float64)
    db = np.asarray(db_codes, dtype=np.float64)
    hamming = 0.5 * (q.shape[1] - q @ db.T)
    aps = []
    for i in range(len(q)):
        relevant = (db_labels[np.argsort(hamming[i], kind="stable")] == q_labels[i]).astype(float)
        if relevant.sum() == 0:
            continue
        precision = np.cumsum(relevant) / np.arange(1, relevant.size + 1)
        aps.append(precision[relevant > 0].mean())
    return float(np.mean(aps))


def test_brute_force_map_helper() -> None:
    codes = np.array([[1, 1], [1, -1], [-1, -1]])
    # Query [1, 1] of class 0: database order by distance is items 0 (cls 0), 1 (cls 1), 2 (cls 0).
    assert mean_average_precision(codes[:1], np.array([0]), codes, np.array([0, 1, 0])) == pytest.approx(
        (1 + 2 / 3) / 2
    )


class PoisonTarget:
    """A stand-in target that fails the test on *any* attribute access."""

    def __getattr__(self, item: str):
        raise AssertionError(f"source-only read target.{item}")


@pytest.fixture(scope="module")
def two_domains() -> tuple[Domain, Domain, np.ndarray, np.ndarray]:
    x, y = blobs(60, 5, 32, seed=0)
    xt, yt = blobs(30, 5, 32, seed=1)
    xt = xt + 0.5  # a mild domain shift
    return Domain("source", x, y), unlabelled(xt), xt, yt


# ---------------------------------------------------------------------------------------- registry
def test_registry_and_overrides() -> None:
    assert {"lsh", "itq", "source-only"} <= set(available_methods())
    method = make_method("itq", 16, seed=3, overrides={"n_iter": 5})
    assert isinstance(method, ITQ) and method.config.n_iter == 5 and method.seed == 3
    with pytest.raises(ConfigError, match="n_iter"):
        make_method("itq", 16, overrides={"n_iter": -1})
    with pytest.raises(ConfigError, match="pair_loss"):
        make_method("source-only", 16, overrides={"pair_loss": "nope"})
    with pytest.raises(ConfigError, match="overflow"):
        make_method("itq", 16, overrides={"overflow": "zeros"})


# ---------------------------------------------------------------------------------------- normaliser
def test_normalizer_uses_training_statistics_only() -> None:
    train = np.array([[0.0, 1.0], [2.0, 1.0]])
    norm = FeatureNormalizer(center=True, scale=True).fit(train)
    np.testing.assert_allclose(norm.mean_, [1.0, 1.0])
    np.testing.assert_allclose(norm.scale_, [1.0, 1.0])  # constant feature keeps scale 1
    queries = np.array([[100.0, -5.0]])
    np.testing.assert_allclose(norm.transform(queries), [[99.0, -6.0]])
    np.testing.assert_allclose(norm.mean_, [1.0, 1.0])
    restored = FeatureNormalizer.from_state(norm.state())
    np.testing.assert_array_equal(restored.transform(queries), norm.transform(queries))


# ---------------------------------------------------------------------------------------- ITQ
def test_itq_rotation_is_orthogonal_and_loss_non_increasing() -> None:
    x, _ = blobs(50, 4, 24, seed=0)
    source = Domain("s", x, np.zeros(len(x), dtype=int))
    method = ITQ(16, seed=0).fit(source, unlabelled(x[:10]))
    r = method.rotation
    assert r is not None and r.shape == (16, 16)
    np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-6)
    history = np.asarray(method.loss_history)
    assert history.size == method.config.n_iter + 1
    assert (np.diff(history) <= 1e-10).all(), history
    assert history[-1] < history[0]  # it actually learned something from the random start
    assert method.diagnostics["quantization_loss_first"] == pytest.approx(history[0])
    assert method.diagnostics["quantization_loss_last"] == pytest.approx(history[-1])
    assert 0 < method.diagnostics["explained_variance"] <= 1


def test_itq_rotation_function_directly() -> None:
    v = np.random.default_rng(0).standard_normal((200, 8))
    r, history = itq_rotation(v, 30, np.random.default_rng(1))
    np.testing.assert_allclose(r.T @ r, np.eye(8), atol=1e-10)
    assert (np.diff(history) <= 1e-12).all()
    codes = np.where(v @ r >= 0, 1.0, -1.0)
    assert np.square(codes - v @ r).sum() / v.size == pytest.approx(history[-1])


def test_itq_separates_two_clusters() -> None:
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(20)
    direction /= np.linalg.norm(direction)
    x = rng.standard_normal((400, 20))
    cluster = np.repeat([0, 1], 200)
    x += np.where(cluster == 0, -6.0, 6.0)[:, None] * direction
    method = ITQ(8, seed=0).fit(Domain("s", x[:300], cluster[:300]), unlabelled(x[300:]))
    codes = method.encode(x).astype(np.float64)
    hamming = 0.5 * (8 - codes @ codes.T)
    same = cluster[:, None] == cluster[None, :]
    assert hamming[~same].mean() > hamming[same].mean() + 2.0
    np.fill_diagonal(hamming, np.inf)
    nearest = np.argmin(hamming, axis=1)  # ties -> lowest index; still should be own cluster
    assert (cluster[nearest] == cluster).mean() > 0.95


def test_itq_seeded(two_domains) -> None:
    source, target, xt, _ = two_domains
    a = ITQ(16, seed=7).fit(source, target).encode(xt)
    b = ITQ(16, seed=7).fit(source, target).encode(xt)
    c = ITQ(16, seed=8).fit(source, target).encode(xt)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.int8 and set(np.unique(a)) <= {-1, 1}


@pytest.mark.parametrize("overflow", ["padded", "random-projection", "rotations"])
def test_itq_more_bits_than_dimensions(overflow: str) -> None:
    x, y = blobs(40, 3, 10, seed=0)
    method = ITQ(32, seed=0, config=ITQConfig(overflow=overflow)).fit(Domain("s", x, y), unlabelled(x[:5]))
    codes = method.encode(x)
    assert codes.shape == (len(x), 32)
    assert method.diagnostics["pca_rank"] == 10
    assert method.diagnostics["overflow"] == overflow
    assert method.diagnostics["overflow_bits"] == 22
    assert method.rotation is not None
    np.testing.assert_allclose(method.rotation @ method.rotation.T, np.eye(len(method.rotation)), atol=1e-6)
    assert (np.diff(method.loss_history) <= 1e-10).all()
    # No constant bits: every extra bit still carries information about the data.
    assert (np.abs(codes.mean(axis=0)) < 1).all()


def test_itq_more_bits_than_samples_and_rank_deficient() -> None:
    rng = np.random.default_rng(0)
    few = Domain("s", rng.standard_normal((5, 20)), np.arange(5))
    method = ITQ(16, seed=0).fit(few, unlabelled(rng.standard_normal((1, 20))))
    assert method.diagnostics["pca_rank"] <= 5
    assert method.encode(rng.standard_normal((3, 20))).shape == (3, 16)
    # 12 features that are copies of 3: rank 3.
    base = rng.standard_normal((100, 3))
    dup = Domain("s", np.repeat(base, 4, axis=1), np.zeros(100, dtype=int))
    method = ITQ(8, seed=0).fit(dup, unlabelled(dup.features[:2]))
    assert method.diagnostics["pca_rank"] == 3
    assert method.diagnostics["overflow_bits"] == 5


def test_itq_uses_target_features_but_not_labels(two_domains) -> None:
    source, target, xt, yt = two_domains
    with_labels = Domain("target", xt, yt)  # even if labels were passed, they must not matter
    a = ITQ(16, seed=0).fit(source, target).encode(xt)
    b = ITQ(16, seed=0).fit(source, with_labels).encode(xt)
    np.testing.assert_array_equal(a, b)
    c = ITQ(16, seed=0, config=ITQConfig(use_target=False)).fit(source, target)
    assert c.diagnostics["n_train"] == source.n


def test_encode_errors() -> None:
    for method in (ITQ(8), LSH(8), SourceOnly(8)):
        with pytest.raises(ConfigError, match="fit"):
            method.encode(np.zeros((2, 4), dtype=np.float32))
    x, y = blobs(20, 2, 6, seed=0)
    method = ITQ(4).fit(Domain("s", x, y), unlabelled(x))
    with pytest.raises(DataError, match=r"\(N, 6\)"):
        method.encode(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        method.encode(np.full((1, 6), np.nan, dtype=np.float32))


# ---------------------------------------------------------------------------------------- LSH
def test_lsh_hamming_estimates_angle() -> None:
    rng = np.random.default_rng(0)
    train = rng.standard_normal((500, 30))
    method = LSH(4096, seed=0).fit(Domain("s", train, np.zeros(500, dtype=int)), unlabelled(train[:50]))
    pairs = rng.standard_normal((20, 2, 30))
    pairs[:5, 1] = pairs[:5, 0] + 0.3 * rng.standard_normal((5, 30))  # some close pairs too
    assert method.normalizer is not None
    for a, b in pairs:
        ca, cb = a - method.normalizer.mean_, b - method.normalizer.mean_
        angle = np.arccos(np.clip(ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb), -1, 1))
        codes = method.encode(np.stack([a, b]))
        differing = float((codes[0] != codes[1]).mean())
        # std of the estimate is <= sqrt(0.25 / 4096) ~ 0.008; allow ~4 sigma
        assert differing == pytest.approx(angle / np.pi, abs=0.03)


def test_lsh_seeded_and_centred_on_training_data_only(two_domains) -> None:
    source, target, xt, _ = two_domains
    a = LSH(32, seed=1).fit(source, target)
    b = LSH(32, seed=1).fit(source, target)
    c = LSH(32, seed=2).fit(source, target)
    np.testing.assert_array_equal(a.encode(xt), b.encode(xt))
    assert not np.array_equal(a.encode(xt), c.encode(xt))
    assert a.normalizer is not None
    expected_mean = np.concatenate([source.features, target.features]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(a.normalizer.mean_, expected_mean, rtol=1e-10)
    mean_before = a.normalizer.mean_.copy()
    queries = xt + 100.0
    codes_batch = a.encode(queries)
    np.testing.assert_array_equal(a.normalizer.mean_, mean_before)
    # Encoding one query alone gives the same code as encoding it in a batch (no batch statistics).
    np.testing.assert_array_equal(a.encode(queries[:1]), codes_batch[:1])
    src_only = LSH(32, seed=1, config=LSHConfig(use_target=False)).fit(source, target)
    assert src_only.normalizer is not None
    np.testing.assert_allclose(src_only.normalizer.mean_, source.features.astype(np.float64).mean(axis=0), rtol=1e-10)


# ---------------------------------------------------------------------------------------- source-only
FAST = SourceOnlyConfig(epochs=15, hash_hidden=128)


def test_source_only_high_map_on_blobs() -> None:
    x, y = blobs(60, 5, 32, seed=0, spread=2.0)
    xq, yq = blobs(20, 5, 32, seed=1, spread=2.0)
    messages: list[tuple[int, int, str]] = []
    method = SourceOnly(16, seed=0, config=FAST).fit(
        Domain("s", x, y), PoisonTarget(), progress=lambda s, t, m: messages.append((s, t, m))
    )
    score = mean_average_precision(method.encode(xq), yq, method.encode(x), y)
    assert score > 0.9, score
    assert method.diagnostics["source_train_accuracy"] > 0.9
    assert method.diagnostics["epochs"] == FAST.epochs
    assert [m[0] for m in messages] == list(range(1, FAST.epochs + 1))
    assert "ce" in messages[-1][2] and messages[-1][1] == FAST.epochs
    assert (method.predict(xq) == yq).mean() > 0.9


def test_source_only_reproducible_codes_pm1_and_rng_untouched(two_domains) -> None:
    source, _, xt, _ = two_domains
    rng_state = torch.get_rng_state()
    a = SourceOnly(16, seed=3, config=FAST).fit(source, PoisonTarget())
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's global RNG is left alone
    b = SourceOnly(16, seed=3, config=FAST).fit(source, PoisonTarget())
    c = SourceOnly(16, seed=4, config=FAST).fit(source, PoisonTarget())
    np.testing.assert_array_equal(a.encode_real(xt), b.encode_real(xt))
    codes = a.encode(xt)
    np.testing.assert_array_equal(codes, b.encode(xt))
    assert not np.array_equal(codes, c.encode(xt))
    assert codes.dtype == np.int8 and set(np.unique(codes)) == {-1, 1}
    # Encoding is per-sample (eval-mode batch norm): a single row codes the same as in a batch.
    np.testing.assert_array_equal(a.encode(xt[:1]), codes[:1])


def test_source_only_never_reads_target(two_domains) -> None:
    source, _, xt, _ = two_domains
    a = SourceOnly(8, seed=0, config=FAST).fit(source, PoisonTarget())  # any access would raise
    other = unlabelled(np.random.default_rng(9).standard_normal((7, 32)).astype(np.float32))
    b = SourceOnly(8, seed=0, config=FAST).fit(source, other)
    np.testing.assert_array_equal(a.encode(xt), b.encode(xt))
    assert a.normalizer is not None
    np.testing.assert_allclose(a.normalizer.mean_, source.features.astype(np.float64).mean(axis=0), rtol=1e-10)


def test_source_only_requires_labelled_source() -> None:
    x, _ = blobs(10, 2, 4, seed=0)
    with pytest.raises(DataError, match="unknown labels"):
        SourceOnly(8, config=FAST).fit(unlabelled(x), unlabelled(x))


def test_hashnet_shapes_and_losses() -> None:
    net = HashNet(4096, 64, 31)
    assert net.encoder_dim == 1024  # a 4096-d input does not get a 4096 x 4096 encoder
    small = HashNet(20, 12, 3, encoder_dim=16, hash_hidden=0, dropout=0.1)
    small.eval()
    out = small(torch.randn(5, 20))
    assert out.features.shape == (5, 16) and out.hash.shape == (5, 12) and out.logits.shape == (5, 3)
    assert (out.hash.abs() < 1).all()
    h = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    labels = torch.tensor([0, 0, 1])
    # perfect codes: same-class cos 1 (target 1.1), different-class cos -1 -> clipped to 0 (target 0)
    assert float(pairwise_similarity_loss(h, labels, "couple")) == pytest.approx(5 * 0.01 / 9, rel=1e-5)
    assert float(pairwise_similarity_loss(h, labels, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(quantization_loss(h)) == 0.0
    assert float(pairwise_similarity_loss(-h, labels, "dpsh")) == pytest.approx(
        float(pairwise_similarity_loss(h, labels, "dpsh"))
    )
    with pytest.raises(ConfigError):
        HashNet(10, 0, 3)


# ---------------------------------------------------------------------------------------- save / load
def _fitted(name: str, source: Domain, target: Domain):
    overrides = {"epochs": 3, "hash_hidden": 32} if name == "source-only" else {}
    return make_method(name, 24, seed=5, overrides=overrides).fit(source, target)


@pytest.mark.parametrize("name", ["lsh", "itq", "source-only"])
def test_save_load_round_trip(name: str, tmp_path: Path, two_domains) -> None:
    source, target, xt, _ = two_domains
    method = _fitted(name, source, target)
    path = method.save(tmp_path / f"{name}.model")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file
    restored = type(method).load(path)
    np.testing.assert_array_equal(restored.encode(xt), method.encode(xt))
    np.testing.assert_array_equal(restored.encode_real(xt), method.encode_real(xt))
    assert restored.bits == 24 and restored.seed == 5 and restored.input_dim == 32
    assert restored.config == method.config
    assert restored.diagnostics.keys() == method.diagnostics.keys()
    generic = load_method(path)
    assert type(generic) is type(method)
    np.testing.assert_array_equal(generic.encode(xt), method.encode(xt))


@pytest.mark.parametrize("name", ["lsh", "itq", "source-only"])
def test_corrupt_files_raise_file_format_error(name: str, tmp_path: Path, two_domains) -> None:
    source, target, _, _ = two_domains
    method = _fitted(name, source, target)
    good = method.save(tmp_path / "good.bin").read_bytes()
    cls = type(method)

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a model" * 100)
    flipped = tmp_path / "flipped.bin"
    flipped.write_bytes(good[:100] + bytes(b ^ 0xFF for b in good[100:400]) + good[400:])
    for bad in (truncated, garbage, flipped, tmp_path / "missing.bin"):
        with pytest.raises(FileFormatError, match=bad.name):
            cls.load(bad)
    # One bit of a stored array (near the end: tensor/array data, which no parser would notice).
    for offset in (len(good) // 2, len(good) - 200):
        one_bit = tmp_path / f"one_bit_{offset}.bin"
        one_bit.write_bytes(good[:offset] + bytes([good[offset] ^ 1]) + good[offset + 1:])
        with pytest.raises(FileFormatError, match=rf"{one_bit.name}: checksum mismatch"):
            cls.load(one_bit)


def test_foreign_and_mismatched_files(tmp_path: Path, two_domains) -> None:
    source, target, _, _ = two_domains
    lsh_path = _fitted("lsh", source, target).save(tmp_path / "lsh.npz")
    with pytest.raises(FileFormatError, match="'lsh'"):
        ITQ.load(lsh_path)
    # A foreign npz (no header), and one holding a pickled object array: both refused.
    np.savez(tmp_path / "foreign.npz", features=np.zeros(3))
    np.savez(tmp_path / "pickled.npz", __header__=np.array([{"a": 1}], dtype=object))
    for name in ("foreign.npz", "pickled.npz"):
        with pytest.raises(FileFormatError, match=name):
            LSH.load(tmp_path / name)
    # A header from a newer format version.
    # (A method file is a sealed container around an npz; files without the container are still read.)
    with open_payload(lsh_path, "crossret.hashing.method", 1) as (_, stream), np.load(stream) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays["__header__"].tobytes().decode())
    header["version"] = 999
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(FileFormatError, match="newer"):
        LSH.load(tmp_path / "future.npz")
    # Arrays inconsistent with the header.
    arrays["__header__"] = np.frombuffer(json.dumps({**header, "version": 1, "bits": 7}).encode(), np.uint8)
    np.savez(tmp_path / "inconsistent.npz", **arrays)
    with pytest.raises(FileFormatError, match="inconsistent"):
        LSH.load(tmp_path / "inconsistent.npz")
    # A torch checkpoint that is not ours.
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert zipfile.is_zipfile(tmp_path / "other.pt")
    with pytest.raises(FileFormatError, match=r"other\.pt"):
        SourceOnly.load(tmp_path / "other.pt")


def test_save_before_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fit"):
        LSH(8).save(tmp_path / "x.npz")


def test_method_file_declaring_a_huge_array_is_refused_before_allocating(tmp_path: Path, two_domains) -> None:
    import io as _io_module

    from crossret.storage.sealed import write_sealed

    source, target, _, _ = two_domains
    path = _fitted("lsh", source, target).save(tmp_path / "lsh.npz")
    buffer = _io_module.BytesIO()
    with open_payload(path, "crossret.hashing.method", 1) as (_, stream), zipfile.ZipFile(stream) as original, \
            zipfile.ZipFile(buffer, "w") as crafted:
        for info in original.infolist():
            crafted.writestr(info.filename, original.read(info))
        # a valid .npy header declaring 2**33 float64 (64 GiB) followed by 32 bytes of data
        member = _io_module.BytesIO()
        np.lib.format.write_array_header_1_0(member, {"descr": "<f8", "fortran_order": False, "shape": (1 << 33,)})
        crafted.writestr("huge.npy", member.getvalue() + bytes(32))
    write_sealed(tmp_path / "huge.npz", "crossret.hashing.method", 1, buffer.getvalue())
    with pytest.raises(FileFormatError, match=r"huge\.npz: huge\.npy.*") as info:
        LSH.load(tmp_path / "huge.npz")
    assert "MemoryError" not in str(info.value)  # refused from the header, not after a failed allocation
