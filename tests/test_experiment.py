"""The experiment runner: what methods may see, what a run directory holds, interruption."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from crossret.data import load_benchmark
from crossret.data.domain import Domain
from crossret.errors import ConfigError
from crossret.experiment import RunConfig, load_split, run_experiment
from crossret.hashing import registry
from crossret.hashing.base import HashMethod
from crossret.progress import no_progress


@dataclasses.dataclass
class SpyConfig:
    scale: float = 1.0


class SpyMethod(HashMethod):
    """Records what fit() was given; encodes with a fixed random projection."""

    name = "spy"
    config_class = SpyConfig
    seen: dict = {}  # noqa: RUF012

    def fit(self, source: Domain, target: Domain, progress=no_progress):
        SpyMethod.seen = {"source_labels": source.labels.copy(), "target_labels": target.labels.copy(),
                          "target_n": target.n}
        self.input_dim = source.dim
        self.projection = np.random.default_rng(self.seed).normal(size=(source.dim, self.bits))
        progress(1, 1, "fitted")
        return self

    def encode_real(self, features, domain="target"):
        return features @ self.projection

    def save(self, path):
        np.save(str(path) + ".npy", self.projection)


@pytest.fixture()
def spy_registered(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "spy", SpyMethod)
    return SpyMethod


def test_methods_never_see_target_labels(spy_registered):
    split = load_benchmark("demo", None)
    run_experiment(RunConfig(method="spy", benchmark="demo", bits=8), split=split)
    assert (SpyMethod.seen["target_labels"] == -1).all()
    assert SpyMethod.seen["target_n"] == split.target_train.n
    assert (SpyMethod.seen["source_labels"] >= 0).all()
    assert split.target_train.labels.min() >= 0, "the split itself keeps the labels for evaluation"


def test_interrupted_run_leaves_no_metrics(spy_registered, tmp_path):
    def interrupt(step, total, message=""):
        if message.startswith("evaluate"):
            raise KeyboardInterrupt

    config = RunConfig(method="spy", benchmark="demo", bits=8, out_dir=str(tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=interrupt)
    assert (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert "interrupted" in (tmp_path / "run" / "run.log").read_text()
    # the interrupted run is kept: a new run there needs --resume or --overwrite
    with pytest.raises(ConfigError, match=r"interrupted run.*--resume.*--overwrite"):
        run_experiment(config)
    assert (tmp_path / "run" / "config.yaml").exists()
    result = run_experiment(config, overwrite=True)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["map_cross"] == result.metrics["map_cross"]


def test_config_yaml_round_trip(spy_registered, tmp_path):
    config = RunConfig(method="spy", benchmark="demo", bits=12, seed=3, ties="index", topk=20,
                       out_dir=str(tmp_path / "r"), method_config={"scale": 2.0})
    result = run_experiment(config)
    again = RunConfig.from_yaml(tmp_path / "r" / "config.yaml")
    assert again == config
    assert result.metrics["topk"] == 20 and "map_at_20_cross" in result.metrics
    assert result.metrics["method_config"] == {"scale": 2.0}


def test_same_seed_same_metrics(spy_registered):
    split = load_benchmark("demo", None)
    a = run_experiment(RunConfig(method="spy", benchmark="demo", bits=8, seed=1), split=split)
    b = run_experiment(RunConfig(method="spy", benchmark="demo", bits=8, seed=1), split=split)
    c = run_experiment(RunConfig(method="spy", benchmark="demo", bits=8, seed=2), split=split)
    assert a.metrics["map_cross"] == b.metrics["map_cross"]
    np.testing.assert_array_equal(a.codes["queries"], b.codes["queries"])
    assert not np.array_equal(a.codes["queries"], c.codes["queries"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ties": "random"}, "--ties"),
        ({"topk": 0}, "--topk"),
        ({"benchmark": None}, "--benchmark"),
        ({"source": "a.npz"}, "either --benchmark"),
        ({"query_fraction": 1.5}, "fraction"),
    ],
)
def test_invalid_configs(kwargs, message):
    config = RunConfig(method="lsh", benchmark="demo", bits=8)
    config = dataclasses.replace(config, **kwargs)
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_custom_domain_files(tmp_path):
    split = load_benchmark("demo", None)
    np.savez(tmp_path / "s.npz", features=split.source.features, labels=split.source.labels)
    np.savez(tmp_path / "t.npz", features=split.target_train.features, labels=split.target_train.labels)
    config = RunConfig(method="lsh", bits=8, source=str(tmp_path / "s.npz"), target=str(tmp_path / "t.npz"),
                       n_queries=50)
    custom = load_split(config)
    assert custom.source.n == split.source.n and custom.queries.n == 50
    assert custom.target_train.n == split.target_train.n - 50
    assert custom.protocol["split_seed"] == 313


def test_saved_model_in_run_directory_reproduces_the_codes(tmp_path):
    from crossret.hashing.registry import load_method

    result = run_experiment(RunConfig(method="itq", benchmark="demo", bits=16, out_dir=str(tmp_path / "r")))
    model = load_method(tmp_path / "r" / "model.npz")
    np.testing.assert_array_equal(model.encode(result.split.queries.features), result.codes["queries"])
    np.testing.assert_array_equal(np.load(tmp_path / "r" / "codes" / "queries_codes.npy"), result.codes["queries"])
