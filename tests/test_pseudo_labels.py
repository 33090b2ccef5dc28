"""Centroid refinement of pseudo-labels (crossret.hashing.pseudo_labels) and COUPLE's
``label_refine=centroids`` option.

The refinement is checked against a per-sample Python implementation of spherical k-means written
from the definition; COUPLE's use of it is checked by capturing what its refreshes hand to it and
comparing the selection with the rule applied independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _couple_common import fit_codes, gaussian_domains, tiny, without_timings
from crossret.errors import ConfigError, DataError
from crossret.hashing.couple import Couple, CoupleConfig, _select_top
from crossret.hashing.couple import selection as couple_selection
from crossret.hashing.deep import ENCODE_BATCH
from crossret.hashing.pseudo_labels import CentroidRefinement, refine_by_centroids


def reference_refinement(features, labels, num_classes, max_iterations):
    """Spherical k-means from the definition, one sample and one class at a time."""
    rows = [np.asarray(r, dtype=np.float64) for r in features]
    unit = [r / np.linalg.norm(r) if np.linalg.norm(r) > 0 else r for r in rows]
    current = [int(v) for v in labels]
    centroids: dict[int, np.ndarray] = {}
    converged, iterations = False, 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (read after the loop)
        for k in range(num_classes):
            total = sum((u for u, lab in zip(unit, current, strict=True) if lab == k), np.zeros(len(unit[0])))
            if np.linalg.norm(total) > 0:
                centroids[k] = total / np.linalg.norm(total)
        updated = []
        for u, lab in zip(unit, current, strict=True):
            if not u.any():
                updated.append(lab)
                continue
            best = max(centroids, key=lambda k, u=u: (float(u @ centroids[k]), -k))
            updated.append(best)
        converged = updated == current
        current = updated
        if converged:
            break
    margins = []
    for u in unit:
        sims = sorted((float(u @ c) for c in centroids.values()), reverse=True)
        margins.append(0.0 if not u.any() else sims[0] - (sims[1] if len(sims) > 1 else -1.0))
    return np.array(current), np.array(margins), iterations, converged


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_per_sample_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 6))
    centres = rng.normal(size=(num_classes, 5)) * 2
    truth = rng.integers(0, num_classes, size=40)
    features = centres[truth] + rng.normal(size=(40, 5))
    noisy = np.where(rng.random(40) < 0.4, rng.integers(0, num_classes, size=40), truth)
    for max_iterations in (1, 2, 50):
        got = refine_by_centroids(features, noisy, num_classes, max_iterations)
        labels, margins, iterations, converged = reference_refinement(features, noisy, num_classes, max_iterations)
        assert isinstance(got, CentroidRefinement)
        assert got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.labels, labels)
        np.testing.assert_allclose(got.margin, margins, atol=1e-12)
        assert (got.iterations, got.converged) == (iterations, converged)


def test_converged_labels_are_a_fixed_point_and_margins_are_in_range():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(200, 8))
    got = refine_by_centroids(features, rng.integers(0, 4, size=200), 4, max_iterations=100)
    assert got.converged
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    centroids = np.stack([unit[got.labels == k].sum(0) for k in range(4)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.testing.assert_array_equal((unit @ centroids.T).argmax(1), got.labels)
    assert np.all((got.margin >= 0) & (got.margin <= 2))


def test_scattered_label_noise_on_separated_clusters_is_corrected():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    truth = np.repeat(np.arange(3), 30)
    features = centres[truth] + rng.normal(scale=0.5, size=(90, 3))
    noisy = truth.copy()
    flip = rng.choice(90, size=27, replace=False)  # 30 %: every class keeps its majority
    noisy[flip] = (truth[flip] + rng.integers(1, 3, size=27)) % 3
    assert (noisy != truth).sum() == 27
    got = refine_by_centroids(features, noisy, 3)
    np.testing.assert_array_equal(got.labels, truth)
    assert got.converged and got.iterations == 2  # one pass fixes all, the second confirms


def test_absent_classes_are_never_assigned_and_an_emptied_class_keeps_its_centroid():
    # Class 1 is carried by nobody; class 2 by two points that each sit in another class's cluster.
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05], [0.05, 0.95]])
    labels = np.array([0, 0, 3, 3, 2, 2])
    got = refine_by_centroids(features, labels, 4)
    np.testing.assert_array_equal(got.labels, [0, 0, 3, 3, 0, 3])
    expected = reference_refinement(features, labels, 4, 10)
    np.testing.assert_allclose(got.margin, expected[1], atol=1e-12)
    # The emptied class 2 (centroid at (0.5, 0.5)/‖·‖) still competes: it is every row's runner-up.
    centre2 = np.array([1.0, 1.0]) / np.sqrt(2)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert np.all(got.margin < 1 - 0.9 * (unit @ centre2))


def test_directionless_rows_keep_their_label_with_zero_margin():
    features = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    got = refine_by_centroids(features, np.array([0, 1, 1, 1]), 2)
    assert got.labels[1] == 1 and got.margin[1] == 0.0
    np.testing.assert_array_equal(got.labels, [0, 1, 1, 1])


def test_one_iteration_reports_not_converged_when_labels_moved():
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.05, 1.0]])
    got = refine_by_centroids(features, np.array([0, 1, 1, 1]), 2, max_iterations=1)
    assert got.iterations == 1 and not got.converged
    np.testing.assert_array_equal(got.labels, [0, 0, 1, 1])


@pytest.mark.parametrize(("features", "labels", "num_classes", "iterations", "message"), [
    (np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 2, 10, "non-empty"),
    (np.ones(3), np.zeros(3, dtype=np.int64), 2, 10, "non-empty"),
    (np.ones((3, 2)), np.zeros(4, dtype=np.int64), 2, 10, "3 feature rows"),
    (np.ones((3, 2)), np.zeros(3), 2, 10, "integers"),
    (np.ones((3, 2)), np.array([0, 1, 2]), 2, 10, r"\[0, 2\)"),
    (np.ones((3, 2)), np.array([0, -1, 1]), 2, 10, r"\[0, 2\)"),
    (np.ones((3, 2)), np.zeros(3, dtype=np.int64), 0, 10, "num_classes"),
    (np.ones((3, 2)), np.zeros(3, dtype=np.int64), True, 10, "num_classes"),
    (np.ones((3, 2)), np.zeros(3, dtype=np.int64), 2, 0, "max_iterations"),
    (np.array([[1.0, np.nan], [1.0, 0.0], [0.0, 1.0]]), np.zeros(3, dtype=np.int64), 2, 10, "NaN"),
])
def test_bad_input_is_a_clear_error(features, labels, num_classes, iterations, message):
    with pytest.raises(DataError, match=message):
        refine_by_centroids(features, labels, num_classes, iterations)


# ---------------------------------------------------------------------------------------- COUPLE


@pytest.mark.parametrize(("overrides", "message"), [
    ({"label_refine": "kmeans"}, "label_refine must be one of none, centroids"),
    ({"refine_iterations": 0}, "refine_iterations must be an integer >= 1"),
    ({"label_refine": "centroids", "select_rule": "positive"}, "select_rule=top-ratio"),
])
def test_couple_rejects_bad_refinement_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        CoupleConfig(**overrides).validate()


def test_refine_iterations_do_nothing_without_refinement():
    source, target = gaussian_domains()
    target = target.without_labels()
    a, codes_a = fit_codes(source, target, tiny())
    b, codes_b = fit_codes(source, target, tiny(refine_iterations=2))
    np.testing.assert_array_equal(codes_a, codes_b)
    assert without_timings(a.diagnostics["epochs"]) == without_timings(b.diagnostics["epochs"])
    assert not any("refine_changed" in record for record in a.diagnostics["epochs"])


def test_couple_selects_by_the_refined_labels_and_margins(monkeypatch):
    """Every refresh: the refinement sees the diffusion's labels and the target encoder features of the
    network the refresh is handed; the selection is the per-class top ratio by refined margin."""
    seen: list[dict] = []
    original_refresh, original_refine = Couple._refresh, couple_selection.refine_by_centroids

    def refresh(self, net, x_all, source_labels, n_s, num_classes, previous, ratio):
        was_training = net.training
        net.eval()
        with torch.no_grad():
            features = torch.cat([net(x_all[lo:lo + ENCODE_BATCH]).features
                                  for lo in range(0, x_all.shape[0], ENCODE_BATCH)])[n_s:].numpy()
        net.train(was_training)
        seen.append({"features": features, "ratio": ratio})
        return original_refresh(self, net, x_all, source_labels, n_s, num_classes, previous, ratio)

    def refine(features, labels, num_classes, max_iterations=10):
        result = original_refine(features, labels, num_classes, max_iterations)
        seen[-1].update(inputs=(features.copy(), labels.copy(), num_classes, max_iterations), result=result)
        return result

    monkeypatch.setattr(Couple, "_refresh", refresh)
    monkeypatch.setattr(couple_selection, "refine_by_centroids", refine)
    source, target = gaussian_domains(shift=3.0)
    method, _ = fit_codes(source, target.without_labels(), tiny(label_refine="centroids", refine_iterations=7))
    assert len(seen) == len(method.selection_history) == 3
    records = [r for r in method.diagnostics["epochs"] if "selected" in r]
    for call, history, record in zip(seen, method.selection_history, records, strict=True):
        features, labels, num_classes, iterations = call["inputs"]
        np.testing.assert_allclose(features, call["features"], rtol=1e-6, atol=1e-6)
        assert (num_classes, iterations) == (3, 7)
        result = call["result"]
        np.testing.assert_array_equal(history["pseudo_labels"], result.labels)
        expected = _select_top(result.margin, np.ones(labels.size, dtype=bool), result.labels, call["ratio"])
        np.testing.assert_array_equal(history["selected"], np.flatnonzero(expected))
        assert record["refine_changed"] == int((result.labels != labels).sum())
        assert record["refine_iterations"] == result.iterations
        assert record["refine_converged"] == result.converged
