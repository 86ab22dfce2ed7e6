"""``PerImageAttack``: the base of white-box attacks that search each image's own perturbation.

Per-image attacks (``patch-pgd``, ``pgd-linf``, LaVAN's per-image mode) differ only in where
they start and how they step; the rest is one search loop kept here: gradient ascent on the
signed objective, each image keeping its best example (success outranks any loss), with an
optional early stop that drops fooled images from the batch. A subclass writes
``attack_batch`` (its start and its update) and calls ``search``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from quantpatch.attacks.base import SUCCESS_BONUS, Attack, BatchStep
from quantpatch.attacks.placement import Placement, make_canvas, prepare_paste, sample_placement
from quantpatch.errors import ConfigError

Render = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(rows, idx) -> adversarial images idx`` built from their rows of the searched variable."""
Update = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``(rows, grad, idx, step) -> new rows``: one ascent step of the searched variable."""


class PerImageAttack(Attack):
    """Base of per-image attacks: ``attack_batch`` optimises each image's own perturbation.

    ``early_stop``: drop an image from the batch at its first success. Faster, but the example
    then sits just past the decision boundary, which understates how well it transfers; by
    default every step (and restart) runs and each image keeps the successful example with
    the highest loss (success still outranks any loss).
    """

    universal = False

    def __init__(self, *, early_stop: bool = False, **common: Any) -> None:
        super().__init__(**common)
        if not isinstance(early_stop, bool):
            raise ConfigError(f"early_stop must be true or false, got {early_stop!r}")
        self.early_stop = early_stop

    def batch_step(
        self, models: Sequence[nn.Module], images: torch.Tensor, device: torch.device
    ) -> BatchStep:
        """``attack_batch`` on frozen copies of ``models``, batches sharing one seeded stream."""
        del images
        frozen = self.frozen_copies(models, device)
        generator = self.generator("perturb")
        return lambda x, y, _: self.attack_batch(frozen, x, self.attack_labels(y), generator)

    def attack_batch(
        self,
        models: Sequence[nn.Module],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Adversarial versions of one batch ``x`` (on the device).

        ``models`` are frozen fast copies; ``y`` are the ``attack_labels``; ``generator`` is
        the seeded "perturb" stream, shared by the batches in order.
        """
        raise NotImplementedError(f"{type(self).__name__} is per-image but has no attack_batch")

    # ----------------------------------------------------------------- helpers for subclasses
    def running(self, key: torch.Tensor) -> torch.Tensor:
        """Which images (by their best key so far) still get steps: all, or with
        ``early_stop`` the ones not yet successful."""
        if self.early_stop:
            return key < SUCCESS_BONUS / 2
        return torch.ones_like(key, dtype=torch.bool)

    def random_patches(
        self, x: torch.Tensor, generator: torch.Generator, placement: Placement | None = None
    ) -> tuple[torch.Tensor, Render]:
        """A uniform-noise patch per image at ``placement`` (default: drawn from ``eot``), and
        the render ``(rows, idx) -> images idx with their patch rows pasted`` for ``search``."""
        n, c, height, width = x.shape
        p = self.patch_size
        if placement is None:
            placement = sample_placement(n, (height, width), p, self.eot, generator)
        render = self.patch_render(x, placement)
        return torch.rand(n, c, p, p, generator=generator).to(x.device), render

    def patch_render(self, x: torch.Tensor, placement: Placement) -> Render:
        """``(rows, idx) -> images idx with patches rows pasted at their placements``."""
        plan = prepare_paste(placement, tuple(x.shape[-2:]), self.patch_size, x.device)
        mask = self.mask(x.device)

        def render(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return plan[idx](x[idx], make_canvas(rows, mask))

        return render

    def signed_objective(
        self, models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (score to maximise, success): ``objective`` per image, its sign set so
        that ascent helps the attack. Untargeted: score = CE of the true class; targeted:
        score = -CE of the target class."""
        loss, success = self.objective(models, images, labels, reduction="none")
        return (-loss if self.targeted else loss), success

    def search(
        self,
        models: Sequence[nn.Module],
        labels: torch.Tensor,
        variable: torch.Tensor,
        render: Render,
        update: Update,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image gradient ascent on ``variable`` (row i belongs to image i) for ``steps``
        (default ``self.steps``) steps; returns the best adversarial images seen and their keys
        (score, plus a bonus once successful).

        With ``early_stop`` only images that have not yet succeeded on every model stay in the
        batch, so a few hard images do not keep the whole batch busy. ``render(rows, idx)``
        builds the adversarial images ``idx`` from their rows of ``variable``; ``update(rows,
        grad, idx, step)`` returns the new rows (ascending the score). ``variable`` is updated
        in place.
        """
        active = torch.arange(len(labels), device=labels.device)
        best_key = torch.full((len(labels),), -torch.inf, device=labels.device)
        best_adv: torch.Tensor | None = None
        steps = self.steps if steps is None else steps
        for step in range(steps + 1):
            rows = variable[active].requires_grad_(True)
            adv = render(rows, active)
            score, success = self.signed_objective(models, adv, labels[active])
            with torch.no_grad():
                key = score.detach() + success.to(score.dtype) * SUCCESS_BONUS
                if best_adv is None:
                    best_adv = torch.empty_like(adv)
                better = key > best_key[active]
                best_adv[active[better]] = adv.detach()[better]
                best_key[active[better]] = key[better]
                keep = self.running(best_key[active])
            if step == steps or not bool(keep.any()):
                break
            (grad,) = torch.autograd.grad(score.sum(), rows)
            with torch.no_grad():
                active, rows, grad = active[keep], rows.detach()[keep], grad[keep]
                variable[active] = update(rows, grad, active, step)
        assert best_adv is not None
        return best_adv, best_key
