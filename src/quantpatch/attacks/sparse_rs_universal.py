"""``sparse-rs-universal``: the universal Sparse-RS patch (Croce et al., AAAI 2022), query-only.

One patch for all images, searched by random search on a fixed training batch: each pass
pastes the candidate into every training image and keeps it when it fools more of them (ties:
a lower mean hinge margin of the images not yet fooled). Placement, our choice among the
paper's options: every image gets its own random location (drawn from ``eot``: by default
anywhere, unrotated), and every ``loc_period``-th pass draws fresh ones (whenever ``eot`` varies
them) and re-scores the current patch there instead of proposing pixels, so the patch cannot
rely on one spot. ``perturb`` pastes it like ``universal`` (at ``eval_eot`` placements), so it
caches like any universal patch.

The budget is ``steps`` forward passes of the training batch (the first evaluation included),
i.e. ``steps x min(batch_size, len(train))`` image queries, recorded in ``queries_used``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import ATTACKS, check_int
from quantpatch.attacks.placement import (
    EOT,
    PastePlan,
    make_canvas,
    prepare_paste,
    sample_placement,
)
from quantpatch.attacks.query import (
    Predictor,
    query_functions,
    resample_squares,
    runtime_threads,
    score,
    square_side,
    stripe_patches,
)
from quantpatch.attacks.sparse_rs import check_share
from quantpatch.attacks.universal import UniversalPatch
from quantpatch.data._types import Split
from quantpatch.errors import ShapeError


@ATTACKS.register
class SparseRSUniversal(UniversalPatch):
    """Universal Sparse-RS patch: query-only random search over a training batch.

    ``steps``: forward passes of the training batch of ``batch_size`` images (the budget);
    ``p_init`` and ``loc_period`` as in ``sparse-rs`` (here a "location move" redraws every
    image's random location). After ``fit``, ``queries_used`` holds the image queries spent.
    """

    name = "sparse-rs-universal"
    kind = "patch"
    needs_gradients = False
    default_steps = 1000
    default_eot = EOT(rotation_max_deg=0.0)

    def __init__(
        self,
        *,
        patch_size: int = 8,
        steps: int | None = None,
        batch_size: int = 128,
        p_init: float = 0.4,
        loc_period: int = 4,
        shape: str = "square",
        targeted: bool = False,
        target_class: int | None = None,
        eot: EOT | Mapping[str, Any] | None = None,
        eval_eot: EOT | Mapping[str, Any] | None = None,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__(
            eval_eot=eval_eot, patch_size=patch_size, steps=steps, batch_size=batch_size,
            shape=shape, targeted=targeted, target_class=target_class, eot=eot, seed=seed,
            progress=progress,
        )  # fmt: skip
        self.steps = check_int("steps", self.steps, minimum=1)
        self.p_init = check_share("p_init", p_init)
        self.loc_period = check_int("loc_period", loc_period, minimum=2)
        self.queries_used = 0

    def learn_patch(
        self, models: Sequence[Predictor], train: Split, device: torch.device | str
    ) -> torch.Tensor:
        """Random search for the patch on ``batch_size`` seeded training images."""
        device = resolve_device(device)
        if len(train) == 0:
            raise ShapeError("cannot fit a universal patch on an empty train split")
        query = query_functions(models, device)
        gen = self.generator("fit")
        index = torch.randperm(len(train), generator=gen)[: self.batch_size]
        x = train.images[index].to(device)
        y = self.attack_labels(train.labels[index].to(device))
        p, mask = self.patch_size, self.mask(device)
        patch = stripe_patches(1, x.shape[1], p, gen).to(device)
        paste = self._placements(len(x), x.shape, gen, device)

        def evaluate(candidate: torch.Tensor) -> tuple[int, float]:
            """(fooled, -mean hinge margin): larger is better."""
            margin, success = score(query, paste(x, make_canvas(candidate, mask)), y, self.targeted)
            return int(success.sum()), -float(margin.clamp(min=0).mean())

        moves = self.eot.location == "random" or self.eot.transforms
        bar = tqdm(range(1, self.steps), desc=f"fit {self.name}", disable=not self.progress,
                   leave=False)  # fmt: skip
        with runtime_threads(models):
            best = evaluate(patch)
            for step in bar:
                if step % self.loc_period == 0 and moves:
                    paste = self._placements(len(x), x.shape, gen, device)
                    best = evaluate(patch)
                    continue
                side = square_side(step / self.steps, p, self.p_init)
                candidate = resample_squares(patch, side, gen)
                tried = evaluate(candidate)
                if tried > best:
                    patch, best = candidate, tried
        self.queries_used = self.steps * len(x)
        return patch[0].cpu()

    def _placements(
        self, n: int, shape: torch.Size, gen: torch.Generator, device: torch.device
    ) -> PastePlan:
        """A paste plan for one random placement per training image, drawn from ``eot``."""
        hw = (int(shape[-2]), int(shape[-1]))
        return prepare_paste(sample_placement(n, hw, self.patch_size, self.eot, gen), hw,
                             self.patch_size, device)  # fmt: skip
