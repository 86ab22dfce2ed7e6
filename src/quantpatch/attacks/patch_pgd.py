"""``patch-pgd``: the white-box, per-image adaptive patch attack.

Signed-gradient (PGD) ascent on each image's own patch pixels. Where the patch goes matters as
much as its pixels, so by default the position is searched per image by successive halving:
every position of a coarse grid gets a few steps, the best third a few more, and the rest of
the budget goes to the best one. ``steps`` is the whole budget, probes included (as for every
per-image attack: one step is one forward/backward pass of an image). Restarts repeat that
with fresh noise; each image keeps its best example over all of them (with ``early_stop``,
fooled images skip the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS, check_int
from quantpatch.attacks.per_image import PerImageAttack
from quantpatch.attacks.placement import EOT, Placement, grid_corners
from quantpatch.errors import ConfigError

SEARCH_GRID = 3  # probed positions per side: 9 in all
HALVING = ((SEARCH_GRID**2, 4), (3, 6))
"""Probe rounds: (positions kept per image, percent of ``steps`` each gets); the best one of the
last round gets what is left. Steps 50: 9 x 2 + 3 x 3 + 23 = 50 passes per image, and the
chosen position has had 28 of them. Measured against the former exhaustive probe (9 x 5 steps,
then 45 more at the best position: 90 passes), ASR on trained lenet and resnet20, fp32 and w2a2,
white-box and transferred, stays within its interval at about twice the images/s
(``benchmarks/patch_pgd_speed.py``)."""
FINAL_SHARE = 45
"""Percent of ``steps`` the chosen position gets at least after its probes: a tiny budget then
runs a few passes over ``steps`` (10: 9 + 3 + 5 = 17) rather than leave it unoptimised."""


@ATTACKS.register
class PatchPGD(PerImageAttack):
    """Per-image white-box patch PGD with a placement search and restarts.

    ``location``: "search" (default) runs successive halving over a 3 x 3 grid of positions
    spread over the image (``HALVING``): all 9 for ``ceil(steps / 25)`` steps, each image's
    best 3 for ``ceil(steps * 0.06)`` more, its best one for the rest of ``steps``; "random"
    (one seeded random position per image and restart, drawn from ``eot``), "center" or
    (top, left) keep one position. ``restarts``: independent starts. Every setting costs
    ``steps`` forward/backward passes per image and restart (the search at least 9 + 3 when
    ``steps`` is below 25: see ``FINAL_SHARE``). The first round runs 9 copies of each batch, so lower ``batch_size``
    for big models.
    """

    name = "patch-pgd"
    kind = "patch"
    default_steps = 100
    default_lr = 0.05
    default_eot = EOT(rotation_max_deg=0.0)
    halving: ClassVar[tuple[tuple[int, int], ...]] = HALVING

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
        """Successive halving over the grid positions: each round searches the (image,
        position) pairs still in the race, all of them in one batch, from where the last round
        left their patches; then each image keeps its best ``keep`` positions by best key."""
        n, cells = len(x), SEARCH_GRID**2
        tops, lefts = grid_corners(tuple(x.shape[-2:]), self.patch_size, SEARCH_GRID)
        everywhere = Placement.at(tops.repeat(n), lefts.repeat(n), self.patch_size)
        pair_adv = x.repeat_interleave(cells, 0)  # each pair's best example (so far: clean)
        patches, _ = self.random_patches(pair_adv, gen, everywhere)
        pair_key = torch.full((n, cells), -torch.inf, device=x.device)
        racing = torch.ones(n, cells, dtype=torch.bool, device=x.device)
        for round_index, steps in enumerate(self._round_steps()):
            if round_index:  # keep each image's best positions; fooled ones stop with early_stop
                keep = self.halving[round_index][0] if round_index < len(self.halving) else 1
                ranked = pair_key.masked_fill(~racing, -torch.inf)
                racing = torch.zeros_like(racing).scatter_(
                    1, ranked.topk(keep, dim=1).indices, True
                )
                racing &= self.running(pair_key.amax(dim=1))[:, None]
            pairs = racing.view(-1).nonzero().squeeze(1)
            if len(pairs) == 0:
                break
            image, cell = pairs // cells, (pairs % cells).cpu()
            render = self.patch_render(
                x[image], Placement.at(tops[cell], lefts[cell], self.patch_size)
            )
            rows = patches[pairs]
            adv, key = self.search(models, y[image], rows, render, self._signed_step, steps)
            patches[pairs] = rows
            better = key > pair_key.view(-1)[pairs]
            pair_adv[pairs[better]] = adv[better]
            pair_key.view(-1)[pairs[better]] = key[better]
        pick = pair_key.argmax(dim=1) + torch.arange(n, device=x.device) * cells
        return pair_adv[pick], pair_key.view(-1)[pick]

    def _round_steps(self) -> list[int]:
        """Steps per kept position in each halving round; the last round gets what is left
        (at least ``FINAL_SHARE`` % of ``steps``)."""
        probes = [-(-self.steps * percent // 100) for _, percent in self.halving]  # rounded up
        spent = sum(keep * steps for (keep, _), steps in zip(self.halving, probes, strict=True))
        return [*probes, max(self.steps - spent, -(-self.steps * FINAL_SHARE // 100))]

    def _signed_step(
        self, rows: torch.Tensor, grad: torch.Tensor, _: torch.Tensor, __: int
    ) -> torch.Tensor:
        return (rows + self.lr * grad.sign()).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["location"] = list(self.location) if isinstance(self.location, tuple) else self.location
        return out
