"""δ calibrated on the labelled source (crossret.textimage.calibration): the mutual-nearest pairs against a
reference computed another way, the threshold rule on hand-made scores (ties included), and the run options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossret.errors import ConfigError, DataError
from crossret.textimage.calibration import calibrate_delta, delta_from_scores, mutual_pair_scores
from crossret.textimage.pipeline import GckdRunConfig


def _features(n_text: int, n_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (n_image,), generator=g)
    centres = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    image = torch.nn.functional.normalize(centres[ids] + 0.6 * torch.randn(n_image, 8, generator=g), dim=1)
    text_ids = torch.randint(0, 6, (n_text,), generator=g)
    text = torch.nn.functional.normalize(centres[text_ids] + 0.6 * torch.randn(n_text, 8, generator=g), dim=1)
    return text, image, text_ids.numpy(), ids.numpy()


def _reference_pairs(text: torch.Tensor, image: torch.Tensor, text_ids: np.ndarray, image_ids: np.ndarray
                     ) -> list[tuple[float, bool]]:
    """Mutual nearest neighbours by a per-caption loop in float64 (no ties in random data)."""
    cosine = (text.double() @ image.double().T).numpy()
    pairs = []
    for k in range(cosine.shape[0]):
        j = int(np.argmax(cosine[k]))
        if int(np.argmax(cosine[:, j])) == k:
            pairs.append((cosine[k, j], bool(text_ids[k] == image_ids[j])))
    return sorted(pairs, key=lambda p: -p[0])


@pytest.mark.parametrize("chunk", [1024, 7])  # one block, and blocks of 7 captions
def test_mutual_pair_scores_match_a_per_caption_reference(chunk: int) -> None:
    text, image, text_ids, image_ids = _features(60, 25, seed=1)
    scores, correct = mutual_pair_scores(text, image, text_ids, image_ids, chunk=chunk)
    reference = _reference_pairs(text, image, text_ids, image_ids)
    assert len(reference) >= 5
    np.testing.assert_allclose(scores, [s for s, _ in reference], atol=1e-6)
    assert correct.tolist() == [c for _, c in reference]
    assert np.all(np.diff(scores) <= 0)


def test_the_threshold_is_the_longest_prefix_that_reaches_the_precision() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, False, True, True, False])  # prefix precisions 1, .5, .67, .75, .6
    for precision, delta, pairs in ((0.5, 0.5, 5), (0.6, 0.5, 5), (0.7, 0.6, 4), (0.8, 0.9, 1), (1.0, 0.9, 1)):
        result = delta_from_scores(scores, correct, precision=precision)
        assert (result.delta, result.pairs, result.reached) == (delta, pairs, True), precision
        assert result.pair_precision == pytest.approx(correct[:pairs].mean())
        assert result.overall_precision == pytest.approx(0.6) and result.mutual_pairs == 5


def test_tied_scores_are_admitted_together() -> None:
    # At δ = 0.8 all three 0.8 pairs are admitted (precision 2/4), so the prefix ending inside the tie does not count.
    scores = np.array([0.9, 0.8, 0.8, 0.8])
    correct = np.array([True, True, False, False])
    result = delta_from_scores(scores, correct, precision=0.6)
    assert (result.delta, result.pairs) == (0.9, 1)
    assert delta_from_scores(scores, correct, precision=0.5).delta == 0.8


def test_no_prefix_reaching_the_precision_admits_nothing() -> None:
    result = delta_from_scores(np.array([0.7, 0.6]), np.array([False, True]), precision=0.9)
    assert (result.delta, result.pairs, result.pair_precision, result.reached) == (1.0, 0, None, False)
    empty = delta_from_scores(np.zeros(0), np.zeros(0, dtype=bool), precision=0.5)
    assert (empty.delta, empty.reached, empty.overall_precision) == (1.0, False, None)


def test_calibrate_delta_admits_exactly_the_pairs_it_counts() -> None:
    text, image, text_ids, image_ids = _features(80, 30, seed=2)
    result = calibrate_delta(text, image, text_ids, image_ids, precision=0.5)
    assert result.reached and (result.captions, result.images) == (80, 30)
    # Mining at that δ over the same features (mutual_nearest_pairs, cosine >= δ) finds the counted pairs.
    from crossret.textimage.losses import mutual_nearest_pairs

    rows, cols = mutual_nearest_pairs(text @ image.T, result.delta)
    assert rows.numel() == result.pairs
    assert np.mean(text_ids[rows.numpy()] == image_ids[cols.numpy()]) == pytest.approx(result.pair_precision)
    assert result.pair_precision >= 0.5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": 0.0}, "precision=0.0 must be in (0, 1]"),
    ({"precision": 1.5}, "must be in (0, 1]"),
])
def test_bad_precision_is_refused(kwargs: dict, message: str) -> None:
    text, image, text_ids, image_ids = _features(5, 5, seed=0)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calibrate_delta(text, image, text_ids, image_ids, **kwargs)


def test_mismatched_ids_are_refused() -> None:
    text, image, text_ids, image_ids = _features(5, 4, seed=0)
    with pytest.raises(DataError, match="caption ids for 5 captions"):
        mutual_pair_scores(text, image, text_ids[:3], image_ids)
    with pytest.raises(DataError, match="sorted from the highest"):
        delta_from_scores(np.array([0.1, 0.2]), np.array([True, True]), precision=0.5)


@pytest.mark.parametrize(("values", "message"), [
    ({"delta_precision": 0.5}, "use it with stage 'adapt' and --set cd_itm_mining=banks"),
    ({"delta_precision": 0.5, "stage": "pretrain", "train": {"cd_itm_mining": "banks"}}, "stage 'adapt'"),
    ({"delta_precision": 0.0, "train": {"cd_itm_mining": "banks"}}, r"delta_precision=0.0 \(--delta-precision\)"),
    ({"delta_precision": True, "train": {"cd_itm_mining": "banks"}}, "must be a precision in"),
    ({"delta_split": "dev"}, r"delta_split='dev' \(--delta-split\) must be train, val or test"),
])
def test_run_options_are_checked(values: dict, message: str) -> None:
    base = {"stage": "adapt", "source_dir": "s", "target_dir": "t"}
    with pytest.raises(ConfigError, match=message):
        GckdRunConfig.from_dict({**base, **values})
    ok = GckdRunConfig.from_dict({**base, "delta_precision": 0.5, "train": {"cd_itm_mining": "banks"}})
    assert ok.delta_precision == 0.5 and ok.delta_split is None
