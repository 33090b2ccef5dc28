"""ITM positive sampling with RaSa's weak positives (losses.sample_weak_positives): invariants, p = 0 leaves
the ALBEF pairing and the generator untouched, the swap rate follows p, the partner draw is uniform."""

from __future__ import annotations

import pytest
import torch

from crossret.errors import ConfigError, DataError
from crossret.textimage.losses import sample_weak_positives


def test_probability_zero_is_the_own_pair_and_does_not_draw() -> None:
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state().clone()
    assert torch.equal(sample_weak_positives(ids, 0.0, gen), torch.arange(6))
    assert torch.equal(gen.get_state(), before)


@pytest.mark.parametrize("seed", range(5))
def test_probability_one_swaps_every_row_that_has_a_partner(seed: int) -> None:
    ids = torch.tensor([4, 4, 4, 7, 7, 9, -1, -1, 4])  # 9 and the unknowns (-1) have no partner
    rows = sample_weak_positives(ids, 1.0, torch.Generator().manual_seed(seed))
    assert rows.dtype == torch.int64 and rows.shape == (9,)
    for i, j in enumerate(rows.tolist()):
        if i in (5, 6, 7):
            assert j == i
        else:
            assert j != i and ids[j] == ids[i]


def test_swap_rate_and_uniform_partner() -> None:
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_weak_positives(ids, 0.3, gen) for _ in range(4000)])  # (4000, 8)
    swapped = draws != torch.arange(8)
    assert abs(swapped.float().mean().item() - 0.3) < 0.02
    assert bool((ids[draws] == ids).all())  # always the same identity
    partners = draws[:, 0][swapped[:, 0]]  # row 0's partners: 1, 2, 3 with probability 1/3 each
    counts = torch.bincount(partners, minlength=4)[1:].float() / partners.numel()
    assert counts.sub(1 / 3).abs().max().item() < 0.04


def test_deterministic_given_the_generator() -> None:
    ids = torch.tensor([1, 1, 2, 2, 2, 3, 3])
    a = sample_weak_positives(ids, 0.5, torch.Generator().manual_seed(42))
    b = sample_weak_positives(ids, 0.5, torch.Generator().manual_seed(42))
    assert torch.equal(a, b)


def test_errors() -> None:
    ids = torch.tensor([0, 0])
    for p in (-0.1, 1.5, True):
        with pytest.raises(ConfigError, match="probability"):
            sample_weak_positives(ids, p)
    with pytest.raises(DataError, match=r"\(B,\)"):
        sample_weak_positives(ids.view(1, 2), 0.5)
    assert sample_weak_positives(torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
