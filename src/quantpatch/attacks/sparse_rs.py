"""``sparse-rs``: Sparse-RS patches (Croce et al., AAAI 2022), a query-only per-image attack.

Random search over each image's patch location and pixels together, scored by the margin
loss from the model's outputs alone: no gradients, so the model may be any callable (a torch
module, a lambda, an ONNX Runtime int8 session). Every iteration evaluates all images still
being attacked in one forward pass. Location moves (every ``loc_period``-th iteration, by up to
a share of the image side that shrinks to 0) alternate with pixel updates (a square, whose area
starts at ``p_init`` of the patch and halves along the paper's schedule, set to a random corner
of the colour cube). A candidate is kept when it lowers the image's margin.

Like any query attack it stops an image at its first success: further queries would only buy
a larger margin. It builds on ``Attack`` itself, not on ``PerImageAttack``: it takes no
gradient, so it needs neither frozen differentiable copies nor the gradient search loop. ``queries`` is the exact budget per image, the first evaluation included;
``queries_used`` records what each image of the last ``perturb`` spent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import ATTACKS, SUCCESS_BONUS, Attack, BatchStep, check_int
from quantpatch.attacks.placement import _check_fits, paste_at
from quantpatch.attacks.query import (
    Predictor,
    max_shift,
    query_functions,
    resample_squares,
    runtime_threads,
    score,
    shift_corners,
    square_side,
    stripe_patches,
)
from quantpatch.errors import ConfigError


def check_share(name: str, value: object) -> float:
    """A share in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


@ATTACKS.register
class SparseRS(Attack):
    """Sparse-RS per-image patch: query-only random search over location and pixels.

    ``queries``: budget per image (every evaluated image counts, the first one included);
    ``candidates``: proposals per image evaluated in the same forward pass (each one a query);
    ``p_init``: share of the patch resampled at first; ``loc_period``: every how many
    iterations the location moves instead of the pixels. After ``perturb``, ``queries_used``
    holds each image's spent queries (a long tensor).
    """

    name = "sparse-rs"
    kind = "patch"
    needs_gradients = False
    default_steps = 0

    def __init__(
        self,
        *,
        patch_size: int = 8,
        queries: int = 1000,
        candidates: int = 1,
        p_init: float = 0.4,
        loc_period: int = 4,
        shape: str = "square",
        targeted: bool = False,
        target_class: int | None = None,
        batch_size: int = 128,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            patch_size=patch_size, shape=shape, targeted=targeted, target_class=target_class,
            batch_size=batch_size, seed=seed, progress=progress,
        )  # fmt: skip
        self.queries = check_int("queries", queries, minimum=1)
        self.candidates = check_int("candidates", candidates, minimum=1)
        self.p_init = check_share("p_init", p_init)
        self.loc_period = check_int("loc_period", loc_period, minimum=2)
        self.queries_used: torch.Tensor | None = None

    def perturb(
        self,
        models: Sequence[Predictor],
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Adversarial images, searched with ``models`` queried as black boxes; sets
        ``queries_used`` (one count per image)."""
        self.queries_used = torch.zeros(len(images), dtype=torch.long)
        return super().perturb(models, images, labels, device)  # type: ignore[arg-type]

    def batch_step(
        self, models: Sequence[Predictor], images: torch.Tensor, device: torch.device
    ) -> BatchStep:
        """The random search on one batch, ``models`` queried as black boxes (not copied)."""
        del images
        query = query_functions(models, resolve_device(device))
        generator = self.generator("perturb")

        def step(x: torch.Tensor, y: torch.Tensor, index: slice) -> torch.Tensor:
            with runtime_threads(models):
                adv, used = self.search(query, x, self.attack_labels(y), generator)
            assert self.queries_used is not None
            self.queries_used[index] = used.cpu()
            return adv

        return step

    # ----------------------------------------------------------------- the search
    def search(
        self,
        query: Sequence[Predictor],
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: the best adversarial image per image and the queries each spent."""
        n, channels, height, width = x.shape
        p = self.patch_size
        _check_fits(p, height, width)
        mask = self.mask(x.device)
        patches = stripe_patches(n, channels, p, generator).to(x.device)
        tops = torch.randint(0, height - p + 1, (n,), generator=generator).to(x.device)
        lefts = torch.randint(0, width - p + 1, (n,), generator=generator).to(x.device)
        margin, success = score(query, paste_at(x, patches, tops, lefts, mask), y, self.targeted)
        best = _Best(patches, tops, lefts, margin, success, torch.ones_like(tops))
        spent, iteration = 1, 0
        while spent < self.queries and not bool(best.success.all()):
            active = (~best.success).nonzero().squeeze(1)
            iteration += 1
            k = min(self.candidates, self.queries - spent)  # never past the budget
            rows = active.repeat_interleave(k)
            cand = self.propose(
                best.patches[rows], best.tops[rows], best.lefts[rows], x.shape, spent,
                iteration, generator,
            )  # fmt: skip
            result = score(query, paste_at(x[rows], *cand, mask), y[rows], self.targeted)
            best.accept(active, k, cand, *result)
            spent += k
        return paste_at(x, best.patches, best.tops, best.lefts, mask), best.used

    def propose(
        self,
        patches: torch.Tensor,
        tops: torch.Tensor,
        lefts: torch.Tensor,
        image_shape: torch.Size,
        spent: int,
        iteration: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates: moved patches on every ``loc_period``-th iteration (while the move
        range is not yet 0), else a resampled square of the pixels."""
        height, width = image_shape[-2:]
        p, progress = self.patch_size, spent / self.queries
        shifts = max_shift(progress, height), max_shift(progress, width)
        if iteration % self.loc_period == 0 and max(shifts) > 0:
            tops = shift_corners(tops, shifts[0], height - p, generator)
            lefts = shift_corners(lefts, shifts[1], width - p, generator)
            return patches, tops, lefts
        side = square_side(progress, p, self.p_init)
        return resample_squares(patches, side, generator), tops, lefts


@dataclass
class _Best:
    """Each image's best patch and location so far, its margin and success, and the queries
    it has spent."""

    patches: torch.Tensor
    tops: torch.Tensor
    lefts: torch.Tensor
    margin: torch.Tensor
    success: torch.Tensor
    used: torch.Tensor

    def accept(
        self,
        active: torch.Tensor,
        k: int,
        candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        margin: torch.Tensor,
        success: torch.Tensor,
    ) -> None:
        """Charge the ``k`` candidates of each ``active`` image (rows in image order), and keep
        each image's best one where it succeeds or lowers the margin."""
        self.used[active] += k
        key = (margin - success.float() * SUCCESS_BONUS).view(-1, k)
        pick = key.argmin(dim=1) + torch.arange(len(active), device=margin.device) * k
        better = success[pick] | (margin[pick] < self.margin[active])
        keep, pick = active[better], pick[better]
        self.patches[keep] = candidates[0][pick]
        self.tops[keep], self.lefts[keep] = candidates[1][pick], candidates[2][pick]
        self.margin[keep], self.success[keep] = margin[pick], success[pick]
