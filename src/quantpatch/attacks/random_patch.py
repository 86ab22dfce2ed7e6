"""``random``: a seeded uniform-noise patch, placed like the universal one: the baseline that
separates "an occluding square" from "an adversarial pattern"."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS
from quantpatch.attacks.universal import UniversalPatch
from quantpatch.data._types import Split
from quantpatch.errors import ShapeError


@ATTACKS.register
class RandomPatch(UniversalPatch):
    """Uniform-noise patch of the same size (seeded baseline).

    Noise in [0, 1], no optimisation, so it needs no source model (``source_free``). With the
    same seed it equals the universal attack's starting point.
    """

    name = "random"
    source_free = True
    default_steps = 0

    def learn_patch(
        self, models: Sequence[nn.Module], train: Split, device: torch.device | str
    ) -> torch.Tensor:
        del models, device
        if train.images.ndim != 4:
            raise ShapeError(f"images must be (N, C, H, W), got {tuple(train.images.shape)}")
        return self.noise(int(train.images.shape[1]))

    def perturb(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Paste the noise patch (drawn on first use when ``fit`` was skipped)."""
        if self.patch is None and images.ndim == 4:
            self.patch = self.noise(int(images.shape[1]))
        return super().perturb(models, images, labels, device)

    def noise(self, channels: int) -> torch.Tensor:
        p = self.patch_size
        return torch.rand(channels, p, p, generator=self.generator("fit"))
