"""Per-domain input centring: ``fit_per_domain``, ``encode(..., domain=...)`` and COUPLE's
``center_per_domain`` (training, encoding, saving, the CLI and the streaming encoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _couple_common import BITS, gaussian_domains, tiny
from crossret.data.domain import Domain
from crossret.errors import ConfigError, DataError
from crossret.hashing.couple import Couple
from crossret.hashing.encoding import encode_to_packed
from crossret.hashing.preprocessing import FeatureNormalizer, fit_per_domain
from crossret.hashing.registry import load_method, make_method
from crossret.retrieval.streaming import read_packed_codes


# ------------------------------------------------------------------ fit_per_domain
def test_fit_per_domain_subtracts_each_domains_own_mean():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 1.0, size=(50, 6))
    b = rng.normal(-2.0, 2.0, size=(30, 6))
    norm_a, norm_b = fit_per_domain(a, b)
    np.testing.assert_allclose(norm_a.mean_, a.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(norm_b.mean_, b.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(norm_a.transform(a).mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(norm_b.transform(b).mean(axis=0), 0.0, atol=1e-12)
    assert norm_a.center and not norm_a.scale
    np.testing.assert_array_equal(norm_a.scale_, np.ones(6))  # ordinary magnitudes: no rescaling


def test_fit_per_domain_shares_one_magnitude_scale():
    """Data of magnitude 1e30 is brought to RMS [0.5, 1) by one power of two common to both domains,
    computed from the per-domain-centred data of both (so the domains keep their relative scale)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 4)) * 1e30
    b = rng.standard_normal((20, 4)) * 4e30 + 1e31
    norm_a, norm_b = fit_per_domain(a, b)
    assert norm_a.global_scale == norm_b.global_scale
    assert np.log2(norm_a.global_scale).is_integer()
    centred = np.concatenate([a - a.mean(axis=0), b - b.mean(axis=0)])
    rms = np.sqrt(np.mean((centred / norm_a.global_scale) ** 2))
    assert 0.5 <= rms < 1.0
    np.testing.assert_array_equal(norm_a.scale_, norm_b.scale_)


def test_fit_per_domain_constant_feature_centres_to_exactly_zero():
    a = np.full((7, 3), 0.1)
    a[:, 1] = np.arange(7)
    b = np.full((5, 3), 0.3)
    norm_a, norm_b = fit_per_domain(a, b)
    assert (norm_a.transform(a)[:, [0, 2]] == 0).all()
    assert (norm_b.transform(b) == 0).all()


@pytest.mark.parametrize(("domains", "message"), [
    ((np.zeros((3, 2)), np.zeros((3, 4))), "feature sizes differ"),
    ((np.zeros((3, 2)), np.zeros((0, 2))), "non-empty 2-D"),
    ((np.zeros((3, 2)), np.array([[0.0, np.nan]])), "NaN or inf"),
    ((), "at least one domain"),
])
def test_fit_per_domain_rejects_bad_input(domains, message):
    with pytest.raises(DataError, match=message):
        fit_per_domain(*domains)


def test_feature_normalizer_round_trips_under_a_prefix():
    norm = fit_per_domain(np.arange(12.0).reshape(4, 3), np.ones((2, 3)))[0]
    back = FeatureNormalizer.from_state(norm.state("srcnorm_"), "srcnorm_")
    np.testing.assert_array_equal(back.mean_, norm.mean_)
    np.testing.assert_array_equal(back.scale_, norm.scale_)


# ------------------------------------------------------------------ encode(domain=...)
def _shifted_pair(shift: float = 5.0):
    """A target that is exactly the source translated by a constant vector (same labels)."""
    source, _ = gaussian_domains(seed=3)
    offset = shift * np.linspace(-1.0, 1.0, source.dim)
    target = Domain("tgt", source.features + offset, source.labels.copy())
    return source, target


def test_couple_per_domain_centring_removes_a_pure_translation():
    """With ``center_per_domain`` a target that is the source plus a constant vector becomes the same
    network input, so the source encoded as source and the target encoded as target get the same
    outputs; with pooled centring the translation stays and the outputs differ."""
    source, target = _shifted_pair()
    method = Couple(BITS, seed=0, config=tiny()).fit(source, target)
    as_source = method.encode_real(source.features, domain="source")
    as_target = method.encode_real(target.features, domain="target")
    np.testing.assert_allclose(as_target, as_source, atol=1e-5)
    np.testing.assert_array_equal(method.encode(target.features), method.encode(source.features, domain="source"))
    # The domain argument matters: the source encoded with the target's statistics is shifted.
    assert np.abs(method.encode_real(source.features) - as_source).max() > 1e-2

    pooled = Couple(BITS, seed=0, config=tiny(center_per_domain=False)).fit(source, target)
    assert pooled.source_normalizer is None
    np.testing.assert_array_equal(pooled.encode_real(source.features, domain="source"),
                                  pooled.encode_real(source.features, domain="target"))
    assert np.abs(pooled.encode_real(target.features) - pooled.encode_real(source.features)).max() > 1e-2


def test_couple_normalisers_hold_each_domains_training_mean():
    source, target = gaussian_domains(seed=4)
    method = Couple(BITS, seed=0, config=tiny(epochs=2)).fit(source, target)
    for normalizer, domain in ((method.source_normalizer, source), (method.normalizer, target)):
        np.testing.assert_allclose(normalizer.mean_, domain.features.astype(np.float64).mean(axis=0), atol=1e-12)


def test_unknown_domain_is_refused_by_every_method():
    source, target = gaussian_domains(seed=5)
    for name in ("lsh", "itq", "couple"):
        overrides = dict(tiny(epochs=1).__dict__) if name == "couple" else None
        method = make_method(name, BITS, overrides=overrides).fit(source, target)
        with pytest.raises(ConfigError, match="domain must be one of target, source, got 'tgt'"):
            method.encode(target.features, domain="tgt")


@pytest.mark.parametrize("name", ["lsh", "itq", "source-only"])
def test_methods_with_one_normaliser_ignore_the_domain(name):
    source, target = gaussian_domains(seed=6)
    overrides = {"epochs": 2} if name == "source-only" else None
    method = make_method(name, BITS, overrides=overrides).fit(source, target)
    np.testing.assert_array_equal(method.encode(target.features, domain="source"), method.encode(target.features))


# ------------------------------------------------------------------ persistence
def test_saved_couple_keeps_the_source_normaliser(tmp_path):
    source, target = _shifted_pair()
    method = Couple(BITS, seed=0, config=tiny(epochs=2)).fit(source, target)
    path = method.save(tmp_path / "model.pt")
    loaded = load_method(path)
    np.testing.assert_array_equal(loaded.source_normalizer.mean_, method.source_normalizer.mean_)
    for domain in ("source", "target"):
        np.testing.assert_array_equal(loaded.encode_real(source.features, domain=domain),
                                      method.encode_real(source.features, domain=domain))


def test_model_without_source_statistics_uses_one_normaliser_for_both(tmp_path):
    """A file written before per-domain statistics existed (no ``srcnorm_*`` arrays) still loads, and
    both domains are encoded with its single normaliser."""
    source, target = _shifted_pair()
    method = Couple(BITS, seed=0, config=tiny(epochs=2)).fit(source, target)
    method.source_normalizer = None  # what an older crossret saved
    loaded = load_method(method.save(tmp_path / "old.pt"))
    assert loaded.source_normalizer is None
    np.testing.assert_array_equal(loaded.encode_real(source.features, domain="source"),
                                  loaded.encode_real(source.features, domain="target"))


# ------------------------------------------------------------------ streaming encoder and CLI
def test_encode_to_packed_passes_the_domain_and_records_it(tmp_path):
    source, target = _shifted_pair()
    method = Couple(BITS, seed=0, config=tiny(epochs=2)).fit(source, target)
    out = tmp_path / "db.npy"
    encode_to_packed(method, source.features.astype(np.float32), out, batch_size=7, domain="source")
    codes, bits = read_packed_codes(out)
    from crossret.retrieval.packing import pack_codes

    assert bits == BITS
    np.testing.assert_array_equal(np.asarray(codes), pack_codes(method.encode(source.features, domain="source")))
    assert json.loads((tmp_path / "db.npy.json").read_text())["domain"] == "source"
    with pytest.raises(ConfigError, match="domain must be one of"):
        encode_to_packed(method, source.features, tmp_path / "x.npy", domain="both")
    assert not (tmp_path / "x.npy").exists()


def test_cli_index_encode_domain_option(tmp_path):
    from typer.testing import CliRunner

    from crossret.cli import app

    source, target = _shifted_pair()
    method = Couple(BITS, seed=0, config=tiny(epochs=2)).fit(source, target)
    run = tmp_path / "run"
    run.mkdir()
    method.save(run / "model.pt")
    features = tmp_path / "src.npy"
    np.save(features, source.features.astype(np.float32))
    runner = CliRunner()
    for domain in ("source", "target"):
        result = runner.invoke(app, ["index", "encode", "--run", str(run), "--features", str(features),
                                     "--out", str(tmp_path / f"{domain}.npy"), "--domain", domain, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["domain"] == domain
    source_codes = read_packed_codes(tmp_path / "source.npy")[0]
    target_codes = read_packed_codes(tmp_path / "target.npy")[0]
    assert not np.array_equal(np.asarray(source_codes), np.asarray(target_codes))
    bad = runner.invoke(app, ["index", "encode", "--run", str(run), "--features", str(features),
                              "--out", str(tmp_path / "bad.npy"), "--domain", "middle"])
    assert bad.exit_code != 0 and "middle" in bad.output
