"""Domain and RetrievalSplit: conversion, validation and the views methods see."""

from __future__ import annotations

import numpy as np
import pytest

from crossret.data import Domain, RetrievalSplit
from crossret.errors import DataError


def _domain(n: int = 6, d: int = 3, name: str = "d", origin: str = "/x/d.npz") -> Domain:
    return Domain(name, np.arange(n * d, dtype=np.float64).reshape(n, d), np.arange(n) % 3, origin)


def test_converts_to_float32_and_int64_contiguous() -> None:
    dom = Domain("d", np.ones((4, 2), dtype=np.uint8), np.array([[1], [0], [2], [1]], dtype=np.uint8))
    assert dom.features.dtype == np.float32 and dom.features.flags.c_contiguous
    assert dom.labels.dtype == np.int64 and dom.labels.shape == (4,)
    assert (dom.n, dom.dim, len(dom)) == (4, 2, 4)
    np.testing.assert_array_equal(dom.classes, [0, 1, 2])


def test_row_labels_are_flattened_and_integral_floats_accepted() -> None:
    dom = Domain("d", np.zeros((3, 2)), np.array([[0.0, 2.0, 1.0]]))
    np.testing.assert_array_equal(dom.labels, [0, 2, 1])


@pytest.mark.parametrize(
    ("features", "labels", "pattern"),
    [
        (np.zeros(5), np.zeros(5), "2-D array"),
        (np.zeros((0, 3)), np.zeros(0), r"empty \(0 samples\)"),
        (np.zeros((3, 0)), np.zeros(3), "0 dimensions"),
        (np.array([["a"], ["b"]]), np.zeros(2), "must be numeric"),
        (np.zeros((3, 2)), np.zeros(2), "2 labels for 3 samples"),
        (np.zeros((3, 2)), np.zeros((3, 2)), "labels must be 1-D"),
        (np.zeros((3, 2)), np.array([0.0, 0.5, 1.0]), "must be integers"),
        (np.zeros((3, 2)), np.array(["a", "b", "c"]), "must be integers"),
        (np.zeros((3, 2)), np.array([0, -2, 1]), r"found -2"),
    ],
)
def test_invalid_inputs_name_the_origin(features: np.ndarray, labels: np.ndarray, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as err:
        Domain("d", features, labels, origin="/x/file.mat")
    assert str(err.value).startswith("/x/file.mat:")


def test_nan_rows_are_counted() -> None:
    x = np.zeros((5, 2))
    x[0, 0] = np.nan
    x[3, :] = np.inf
    with pytest.raises(DataError, match=r"2 sample\(s\) have NaN or inf"):
        Domain("d", x, np.zeros(5, dtype=int))


def test_unknown_label_minus_one_allowed_but_not_labelled() -> None:
    dom = Domain("d", np.zeros((3, 2)), np.array([0, -1, 1]))
    assert not dom.is_labelled
    np.testing.assert_array_equal(dom.classes, [0, 1])
    with pytest.raises(DataError, match=r"1 item\(s\) have unknown labels"):
        dom.require_labels()


def test_require_labels_needs_two_classes() -> None:
    with pytest.raises(DataError, match=r"1 class\(es\) present"):
        Domain("d", np.zeros((3, 2)), np.zeros(3, dtype=int), origin="/x/one.npz").require_labels()
    dom = _domain()
    assert dom.require_labels() is dom


def test_subset_with_features_without_labels() -> None:
    dom = _domain()
    sub = dom.subset(np.array([4, 1]), name="sub")
    np.testing.assert_array_equal(sub.features, dom.features[[4, 1]])
    np.testing.assert_array_equal(sub.labels, [1, 1])
    assert sub.name == "sub" and sub.origin == dom.origin
    moved = dom.with_features(dom.features * 2)
    np.testing.assert_array_equal(moved.labels, dom.labels)
    assert moved.features[1, 0] == 2 * dom.features[1, 0]
    hidden = dom.without_labels()
    assert (hidden.labels == -1).all() and dom.is_labelled  # the original keeps its labels


def test_split_views_and_hidden_target_labels() -> None:
    src, tgt, qry = _domain(name="s"), _domain(4, name="t"), _domain(2, name="q")
    split = RetrievalSplit(src, tgt, qry, "bench", {"split_seed": 5})
    assert split.cross_database is src and split.single_database is tgt
    assert (split.training_target().labels == -1).all()
    np.testing.assert_array_equal(split.training_target().features, tgt.features)
    summary = split.summary()
    assert summary["benchmark"] == "bench" and summary["dim"] == 3 and summary["split_seed"] == 5
    assert summary["source"] == {"name": "s", "n": 6} and summary["queries"] == {"n": 2}


def test_split_rejects_mixed_feature_sizes() -> None:
    with pytest.raises(DataError, match=r"feature sizes differ \(source 3, target 4, queries 3\)"):
        RetrievalSplit(_domain(), _domain(d=4), _domain(), "bench")
