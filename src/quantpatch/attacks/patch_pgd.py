"""``patch-pgd``: the white-box, per-image adaptive patch attack.

Signed-gradient (PGD) ascent on each image's own patch pixels at a given or seeded random
location, with optional random restarts (new noise and, for random locations, a new place).
Images already fooled keep their best example and skip later restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import ATTACKS, SUCCESS_BONUS, Attack, check_int
from quantpatch.attacks.placement import EOT, make_canvas, prepare_paste, sample_placement


@ATTACKS.register
class PatchPGD(Attack):
    """Per-image white-box patch PGD with random restarts.

    ``steps`` signed steps of size ``lr`` per restart.

    ``location``: "random" (seeded, per image), "center" or (top, left); overrides the
    location of ``eot`` (default: no rotation or scaling). ``restarts``: total random starts.
    """

    name = "patch-pgd"
    universal = False
    kind = "patch"
    default_steps = 100
    default_lr = 0.05
    default_eot = EOT(rotation_max_deg=0.0)

    def __init__(
        self,
        *,
        location: str | Sequence[int] | None = None,
        restarts: int = 3,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if location is not None:
            self.eot = replace(self.eot, location=location)
        self.location = self.eot.location
        self.restarts = check_int("restarts", restarts, minimum=1)

    def perturb(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        device = resolve_device(device)
        gen = self.generator("perturb")
        mask = self.mask(device)

        def attack_batch(x: torch.Tensor, y: torch.Tensor, _: slice) -> torch.Tensor:
            y = self.attack_labels(y)
            best_adv, best_key = x.clone(), torch.full((len(x),), -torch.inf, device=device)
            for _restart in range(self.restarts):
                todo = (best_key < SUCCESS_BONUS / 2).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                adv, key = self._one_start(frozen, x[todo], y[todo], gen, mask)
                better = key > best_key[todo]
                best_adv[todo[better]] = adv[better]
                best_key[todo[better]] = key[better]
            return best_adv

        frozen = self.frozen_copies(models, device)
        return self.per_batch(images, labels, device, attack_batch, self.name)

    def _one_start(
        self,
        models: list[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        gen: torch.Generator,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, height, width = x.shape
        p = self.patch_size
        placement = sample_placement(n, (height, width), p, self.eot, gen)
        plan = prepare_paste(placement, (height, width), p, x.device)
        patch = torch.rand(n, c, p, p, generator=gen).to(x.device)

        def render(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return plan[idx](x[idx], make_canvas(rows, mask))

        def update(
            rows: torch.Tensor, grad: torch.Tensor, _: torch.Tensor, __: int
        ) -> torch.Tensor:
            return (rows + self.lr * grad.sign()).clamp(0.0, 1.0)

        return self.search(models, y, patch, render, update)

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["location"] = list(self.location) if isinstance(self.location, tuple) else self.location
        return out
