"""``lavan``: LaVAN (Karmon et al. 2018), localized and visible adversarial noise.

The patch sits at one fixed location with no rotation or scaling. ``mode="universal"`` learns
one patch on the train split (the base class's universal fit: Adam, like ``universal`` but
without EOT); ``mode="per-image"`` optimises a patch per image (Adam, batched) at that
location in ``perturb``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS, PerImageAttack
from quantpatch.attacks.placement import EOT
from quantpatch.errors import ConfigError

MODES = ("universal", "per-image")
_BETA1, _BETA2 = 0.9, 0.999  # Adam defaults


@ATTACKS.register
class LaVAN(PerImageAttack):
    """LaVAN fixed-location patch, universal or per-image.

    ``location``: "center" or (top, left); ``mode``: "universal" | "per-image".

    The class attribute ``universal`` describes the default mode; an instance's own attribute
    follows its ``mode`` (``early_stop`` applies to the per-image mode).
    """

    name = "lavan"
    universal = True
    kind = "patch"
    default_steps = 300
    default_lr = 0.05
    default_eot = EOT(rotation_max_deg=0.0, location="center")

    def __init__(
        self,
        *,
        mode: str = "universal",
        location: str | Sequence[int] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if mode not in MODES:
            raise ConfigError(f"lavan mode must be one of {', '.join(MODES)}, got {mode!r}")
        if self.eot.transforms:
            raise ConfigError("lavan places the patch without rotation or scaling; use 'universal'")
        eot = self.eot if location is None else replace(self.eot, location=location)
        if eot.location == "random":
            raise ConfigError("lavan uses a fixed location: 'center' or (top, left)")
        self.eot = eot
        self.location = eot.location
        self.mode = mode
        self.universal = mode == "universal"  # type: ignore[misc]  # instance follows mode

    def attack_batch(
        self,
        models: Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Per-image mode: Adam ascent on each image's own patch at the fixed location."""
        patches, render = self.random_patches(x, generator)
        moment1, moment2 = torch.zeros_like(patches), torch.zeros_like(patches)

        def update(
            rows: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor, step: int
        ) -> torch.Tensor:
            """Adam ascent, per row (rows leave the batch once their image is fooled)."""
            moment1[idx] = _BETA1 * moment1[idx] + (1 - _BETA1) * grad
            moment2[idx] = _BETA2 * moment2[idx] + (1 - _BETA2) * grad * grad
            m_hat = moment1[idx] / (1 - _BETA1 ** (step + 1))
            v_hat = moment2[idx] / (1 - _BETA2 ** (step + 1))
            return (rows + self.lr * m_hat / (v_hat.sqrt() + 1e-8)).clamp(0.0, 1.0)

        best, _ = self.search(models, y, patches, render, update)
        return best

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["location"] = list(self.location) if isinstance(self.location, tuple) else self.location
        return out
