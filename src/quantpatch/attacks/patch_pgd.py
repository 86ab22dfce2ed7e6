"""``patch-pgd``: the white-box, per-image adaptive patch attack.

Signed-gradient (PGD) ascent on each image's own patch pixels at a given or seeded random
location, with optional random restarts (new noise and, for random locations, a new place).
Each image keeps its best example over all restarts (with ``early_stop``, fooled images skip
the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS, PerImageAttack, check_int
from quantpatch.attacks.placement import EOT


@ATTACKS.register
class PatchPGD(PerImageAttack):
    """Per-image white-box patch PGD with random restarts.

    ``steps`` signed steps of size ``lr`` per restart. ``location``: "random" (seeded, per image), "center" or (top, left); overrides the
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
            patches, render = self.random_patches(x[todo], generator)
            adv, key = self.search(models, y[todo], patches, render, self._signed_step)
            better = key > best_key[todo]
            best_adv[todo[better]] = adv[better]
            best_key[todo[better]] = key[better]
        return best_adv

    def _signed_step(
        self, rows: torch.Tensor, grad: torch.Tensor, _: torch.Tensor, __: int
    ) -> torch.Tensor:
        return (rows + self.lr * grad.sign()).clamp(0.0, 1.0)

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["location"] = list(self.location) if isinstance(self.location, tuple) else self.location
        return out
