"""``pgd-linf``: classic pixel-level L-infinity PGD (Madry et al. 2018), the contrast case.

Not a patch: every pixel may move by at most ``eps``. Signed steps of ``alpha`` (default
``2.5 * eps / steps``) from a uniform random start inside the ball; the best example per image
is kept. Patch settings (``patch_size``, ``shape``, ``eot``) and ``lr`` are not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS, check_positive
from quantpatch.attacks.per_image import PerImageAttack


@ATTACKS.register
class PGDLinf(PerImageAttack):
    """Pixel-level L-inf PGD (eps, alpha, steps, random start)."""

    name = "pgd-linf"
    kind = "pixel"
    default_steps = 40

    def __init__(
        self,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        random_start: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.eps = check_positive("eps", eps)
        self.alpha = check_positive("alpha", alpha) if alpha is not None else None
        self.random_start = bool(random_start)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / max(self.steps, 1)

    def attack_batch(
        self,
        models: Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Signed steps on the adversarial images themselves, projected back onto the eps-ball
        and [0, 1] after every step. The iterate is always feasible, so the forward pass needs
        no clamp: a clamp there would pass no gradient to pixels sitting at 0 or 1 (most of an
        MNIST digit's background), which would then never move."""
        eps, alpha = self.eps, self.step_size
        if self.random_start:
            noise = torch.rand(x.shape, generator=generator).to(x.device, x.dtype) * (2 * eps) - eps
            start = (x + noise).clamp(0.0, 1.0)
        else:
            start = x.clone()

        def update(
            rows: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor, _: int
        ) -> torch.Tensor:
            stepped = rows + alpha * grad.sign()
            return torch.min(torch.max(stepped, x[idx] - eps), x[idx] + eps).clamp(0.0, 1.0)

        best, _ = self.search(models, y, start, lambda rows, _: rows, update)
        return best
