"""``patch-pgd``: the white-box, per-image adaptive patch attack.

Signed-gradient (PGD) ascent on each image's own patch pixels. Where the patch goes matters as
much as its pixels, so by default the position is searched per image: every position of a
coarse grid is probed for a few steps, and the rest of the budget goes to the best one.
Restarts repeat that with fresh noise; each image keeps its best example over all of them
(with ``early_stop``, fooled images skip the rest).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS, check_int
from quantpatch.attacks.per_image import PerImageAttack
from quantpatch.attacks.placement import EOT, Placement, grid_corners
from quantpatch.errors import ConfigError

SEARCH_GRID = 3  # probed positions per side: 9 in all
PROBE_SHARE = 0.1  # of ``steps``, spent on each probed position


@ATTACKS.register
class PatchPGD(PerImageAttack):
    """Per-image white-box patch PGD with a placement search and restarts.

    ``location``: "search" (default) probes a 3 x 3 grid of positions spread over the image
    for ``ceil(steps / 10)`` steps each, then continues at each image's best one for the rest
    of ``steps``; "random" (one seeded random position per image and restart, drawn from
    ``eot``), "center" or (top, left) keep one position. ``restarts``: independent starts.
    Default budget (steps 100, restarts 1): 9 x 10 + 90 = 180 forward/backward passes per
    image. The probe runs 9 copies of each batch, so lower ``batch_size`` for big models.
    """

    name = "patch-pgd"
    kind = "patch"
    default_steps = 100
    default_lr = 0.05
    default_eot = EOT(rotation_max_deg=0.0)

    def __init__(
        self,
        *,
        location: str | Sequence[int] = "search",
        restarts: int = 1,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if location == "search":
            if self.eot.transforms:
                raise ConfigError("location 'search' tries unrotated, unscaled patches only")
            self.location = location
        else:
            self.eot = replace(self.eot, location=location)
            self.location = self.eot.location
        self.restarts = check_int("restarts", restarts, minimum=1)

    def attack_batch(
        self,
        models: Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """``restarts`` starts (with ``early_stop`` only for images not yet fooled); each image
        keeps its best example over all of them."""
        best_adv, best_key = x.clone(), torch.full((len(x),), -torch.inf, device=x.device)
        for _restart in range(self.restarts):
            todo = self.running(best_key).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            start = self._searched if self.location == "search" else self._placed
            adv, key = start(models, x[todo], y[todo], generator)
            better = key > best_key[todo]
            best_adv[todo[better]] = adv[better]
            best_key[todo[better]] = key[better]
        return best_adv

    def _placed(
        self, models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One start at one position per image (drawn from ``eot``)."""
        patches, render = self.random_patches(x, gen)
        return self.search(models, y, patches, render, self._signed_step)

    def _searched(
        self, models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe every grid position (all images x positions in one batch), then continue each
        image's best probe for the remaining steps."""
        n, cells = len(x), SEARCH_GRID**2
        tops, lefts = grid_corners(tuple(x.shape[-2:]), self.patch_size, SEARCH_GRID)
        probe_steps = min(self.steps, math.ceil(self.steps * PROBE_SHARE))
        everywhere = Placement.at(tops.repeat(n), lefts.repeat(n), self.patch_size)
        patches, render = self.random_patches(x.repeat_interleave(cells, 0), gen, everywhere)
        ys = y.repeat_interleave(cells)
        adv, key = self.search(models, ys, patches, render, self._signed_step, probe_steps)
        pick = key.view(n, cells).argmax(dim=1) + torch.arange(n, device=x.device) * cells
        best_adv, best_key = adv[pick], key[pick]
        todo = self.running(best_key).nonzero().squeeze(1)
        rows = pick[todo].cpu() % cells  # each image's chosen grid position
        render = self.patch_render(x[todo], Placement.at(tops[rows], lefts[rows], self.patch_size))
        refined, key = self.search(
            models, y[todo], patches[pick[todo]], render, self._signed_step,
            self.steps - probe_steps,
        )  # fmt: skip
        better = key > best_key[todo]
        best_adv[todo[better]] = refined[better]
        best_key[todo[better]] = key[better]
        return best_adv, best_key

    def _signed_step(
        self, rows: torch.Tensor, grad: torch.Tensor, _: torch.Tensor, __: int
    ) -> torch.Tensor:
        return (rows + self.lr * grad.sign()).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["location"] = list(self.location) if isinstance(self.location, tuple) else self.location
        return out
