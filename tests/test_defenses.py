"""Defences: registry, shapes, and that they actually change patched images more than clean ones."""

from __future__ import annotations

import pytest
import torch

from quantpatch.defenses import DEFENSES, DefendedModel, create_defense
from quantpatch.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_keeps_shape_and_range(name: str) -> None:
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = create_defense(name)(images)
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1


def test_median_removes_isolated_spike() -> None:
    images = torch.zeros(1, 1, 9, 9)
    images[0, 0, 4, 4] = 1.0
    assert create_defense("median", kernel_size=3)(images).abs().max() == 0


def test_lgs_damps_a_high_frequency_patch_but_not_a_smooth_image() -> None:
    smooth = torch.linspace(0.2, 0.8, 28).repeat(1, 1, 28, 1)
    patched = smooth.clone()
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    patched[0, 0, 10:18, 10:18] = checker.float()
    lgs = create_defense("lgs")
    assert (lgs(smooth) - smooth).abs().max() < 0.05
    assert (lgs(patched) - patched)[0, 0, 10:18, 10:18].abs().mean() > 0.2


def test_defended_model_and_errors() -> None:
    model = DefendedModel(torch.nn.Flatten(), create_defense("median"))
    assert model(torch.rand(2, 1, 5, 5)).shape == (2, 25)
    with pytest.raises(UnknownNameError):
        create_defense("nope")
    with pytest.raises(ConfigError):
        create_defense("median", kernel_size=2)
    with pytest.raises(ConfigError):
        create_defense("median", bogus=1)
