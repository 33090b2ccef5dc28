"""benchmarks/gckd_probe.py: attribute labels by identity rank, the probe against its majority, the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
_SPEC = importlib.util.spec_from_file_location(
    "gckd_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "gckd_probe.py")
probe_script = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe_script)


def test_attribute_labels_map_person_ids_by_rank_within_the_split() -> None:
    people = [SimpleNamespace(gender=g) for g in ("m", "f", "f", "m", "f")]
    # a test split of identities 3 and 4 numbered 1-based (as CUHK-PEDES files do), images out of order
    labels = probe_script.attribute_labels(np.array([5, 4, 5, 4]), people, 3, "gender")
    assert labels.tolist() == ["f", "m", "f", "m"]


def test_probe_reads_a_separable_attribute_and_reports_the_majority() -> None:
    rng = np.random.default_rng(0)
    y_train = np.array(["a"] * 30 + ["b"] * 10)
    y_test = np.array(["a"] * 5 + ["b"] * 15)
    x_train = rng.normal(size=(40, 4)) + 4.0 * (y_train == "b")[:, None]
    x_test = rng.normal(size=(20, 4)) + 4.0 * (y_test == "b")[:, None]
    got = probe_script.probe(x_train, y_train, x_test, y_test)
    assert got["majority"] == pytest.approx(5 / 20)
    assert got["accuracy"] == 1.0
    # one class in training: nothing to fit, the majority is the answer
    one = probe_script.probe(x_train, np.array(["a"] * 40), x_test, y_test)
    assert one == {"accuracy": 0.25, "majority": 0.25}


def test_table_has_a_row_per_source_and_attribute() -> None:
    cell = {"accuracy": 0.5, "majority": 0.25}
    models = {m: dict.fromkeys(probe_script.FIELDS, cell) for m in ("pixels", "generic", "source-trained")}
    row = {"source": "C", "models": models}
    text = probe_script.table([row])
    assert text.count("| C | ") == len(probe_script.FIELDS)
    assert "| C | gender | 25.0 % | 50.0 % | 50.0 % | 50.0 % |" in text


def test_pixel_features_are_the_resized_images_in_unit_range(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (6, 4), (0, 0, 255)).save(tmp_path / "b.png")
    view = SimpleNamespace(image_paths=("a.png", str(tmp_path / "b.png")))
    got = probe_script.pixel_features(view, tmp_path, (2, 3))  # (height, width)
    assert got.shape == (2, 2 * 3 * 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0].reshape(2, 3, 3)[..., 0], np.ones((2, 3)))
    np.testing.assert_array_equal(got[1].reshape(2, 3, 3)[..., 2], np.ones((2, 3)))
    assert got.min() == 0.0
