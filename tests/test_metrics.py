"""Rates and their eligibility rules: what an attack can honestly claim."""

from __future__ import annotations

import pytest
import torch

from quantpatch.errors import ShapeError
from quantpatch.metrics import Rate, attack_success, difference_interval, wilson_interval


def test_untargeted_counts_only_clean_correct_images() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 2, 0])  # image 3 is already wrong
    adv = torch.tensor([1, 1, 0, 1])
    assert attack_success(clean, adv, labels) == Rate(2, 3)


def test_targeted_needs_clean_correct_and_not_already_the_target() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4])
    clean = torch.tensor([0, 1, 2, 7, 7])  # images 3 and 4 are wrong when clean
    adv = torch.tensor([7, 7, 2, 7, 7])
    # eligible: clean-correct (0, 1, 2) and label != 7 -> 3 images; hits on 0 and 1
    assert attack_success(clean, adv, labels, target=7) == Rate(2, 3)
    # an image whose label is the target is never eligible
    assert attack_success(clean, adv, labels, target=0) == Rate(0, 2)


def test_wilson_interval_is_well_behaved_at_the_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 50)
    assert low == 0.0 and 0.0 < high < 0.1
    low, high = wilson_interval(50, 50)
    assert 0.9 < low < 1.0 and high == 1.0


def test_shapes_are_checked() -> None:
    with pytest.raises(ShapeError):
        attack_success(torch.zeros(3), torch.zeros(3), torch.zeros(4))


def test_difference_interval_matches_newcombe() -> None:
    """Newcombe (1998), Table II example: 56/70 - 48/80, method 10: 0.0524 to 0.3339."""
    diff, low, high = difference_interval(Rate(56, 70), Rate(48, 80))
    assert diff == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    same = difference_interval(Rate(0, 10), Rate(0, 10))
    assert same[0] == 0 and same[1] < 0 < same[2]
