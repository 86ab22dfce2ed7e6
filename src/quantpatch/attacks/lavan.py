"""``lavan``: LaVAN (Karmon et al. 2018), localized and visible adversarial noise.

The patch sits at one fixed location with no rotation or scaling. ``mode="universal"`` learns
one patch on the train split (``UniversalAttack``'s fit: Adam, like ``universal`` but without
EOT); ``mode="per-image"`` optimises a patch per image (Adam, batched) at that location in
``perturb`` (``PerImageAttack``'s search). The paper has both modes under one name, so does the
registry: the class inherits both bases, and each instance runs the one its ``mode`` picks.

``location="search"`` (universal mode) is the best-fixed-location threat model: before the fit,
a short probe fit at each position of a coarse grid (and the centre) is scored on training
images, and the patch is then learned and pasted at the position whose probe fooled the model
most often. Next to ``universal`` (EOT over random placements, Brown et al.) it separates what
the placement costs from what the patch pixels can do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from quantpatch.attacks.base import ATTACKS, Attack, BatchStep
from quantpatch.attacks.per_image import PerImageAttack
from quantpatch.attacks.placement import EOT, grid_corners, paste_at
from quantpatch.attacks.universal_base import UniversalAttack
from quantpatch.data._types import Split
from quantpatch.errors import ConfigError, ShapeError

MODES = ("universal", "per-image")
_BETA1, _BETA2 = 0.9, 0.999  # Adam defaults
SEARCH_GRID = 3  # probed positions per side (plus the centre when the grid misses it)
PROBE_SHARE = 0.1  # of ``steps``, spent on the probe fit at each position
SEARCH_IMAGES = 512  # training images each probed patch is scored on


@ATTACKS.register
class LaVAN(UniversalAttack, PerImageAttack):
    """LaVAN fixed-location patch, universal or per-image.

    ``location``: "center", (top, left) or, in universal mode, "search": the best position of
    a 3 x 3 grid plus the centre, chosen by probe fits of ``ceil(steps / 10)`` steps each
    (scored on up to 512 training images), then fitted there for ``steps`` steps; the choice
    is ``searched_location`` and is saved in ``state_dict``. ``mode``: "universal" |
    "per-image".

    The class attribute ``universal`` describes the default mode; an instance's own attribute
    follows its ``mode`` (``early_stop`` applies to the per-image mode). ``fit``, ``perturb``
    and the saved state are those of the mode's base (``mode_base``).
    """

    name = "lavan"
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
        search = isinstance(location, str) and location == "search"
        if search and mode != "universal":
            raise ConfigError(
                "lavan location 'search' picks one position for a universal patch; per-image "
                "patches with a per-image position search are 'patch-pgd'"
            )
        eot = self.eot if location is None or search else replace(self.eot, location=location)
        if eot.location == "random":
            raise ConfigError("lavan uses a fixed location: 'center', 'search' or (top, left)")
        self.eot = eot
        self.location = "search" if search else eot.location
        self.searched_location = None  # set once a search placed the patch (fit or load)
        self.mode = mode
        self.universal = mode == "universal"  # type: ignore[misc]  # instance follows mode

    # ----------------------------------------------------------------- the mode's base
    @property
    def mode_base(self) -> type[Attack]:
        """The base whose ``fit``, ``batch_step`` and state this instance's ``mode`` uses."""
        return UniversalAttack if self.universal else PerImageAttack

    def fit(self, models: Sequence[nn.Module], train: Split, device: torch.device | str) -> None:
        """Universal mode: learn the patch; per-image mode: nothing to learn."""
        self.mode_base.fit(self, models, train, device)

    def batch_step(
        self, models: Sequence[nn.Module], images: torch.Tensor, device: torch.device
    ) -> BatchStep:
        """Universal mode: paste the patch; per-image mode: search each image's patch."""
        return self.mode_base.batch_step(self, models, images, device)

    def choose_placement(
        self, models: Sequence[nn.Module], train: Split, device: torch.device
    ) -> None:
        """``location="search"``: fix ``eot`` at the best probed position (else nothing)."""
        if self.location != "search":
            return
        self._place_at(self.search_location(models, train, device))

    def search_location(
        self, models: Sequence[nn.Module], train: Split, device: torch.device
    ) -> tuple[int, int]:
        """The candidate (top, left) whose probe patch fools frozen ``models`` on the most
        scored training images (ties: the higher loss when untargeted, lower when targeted,
        then the earlier candidate). Every probe starts from the same noise and sees the same
        batches (the seeded "search" stream), so only the position differs."""
        image_hw = tuple(int(v) for v in train.images.shape[-2:])
        p = self.patch_size
        tops, lefts = grid_corners(image_hw, p, SEARCH_GRID)
        candidates = list(zip(tops.tolist(), lefts.tolist(), strict=True))
        centre = ((image_hw[0] - p) // 2, (image_hw[1] - p) // 2)
        if centre not in candidates:
            candidates.append(centre)
        probe_steps = math.ceil(self.steps * PROBE_SHARE)
        chosen = torch.randperm(len(train), generator=self.generator("search-score"))
        scored = Split(train.images[chosen[:SEARCH_IMAGES]], train.labels[chosen[:SEARCH_IMAGES]])
        best: tuple[tuple[int, float], tuple[int, int]] | None = None
        for top, left in candidates:
            eot = replace(self.eot, location=(top, left))
            patch, _ = self.fit_patch(
                models, train, device, eot, probe_steps, self.generator("search")
            )
            key = self._score_at(models, scored, patch, (top, left), device)
            if best is None or key > best[0]:
                best = (key, (top, left))
        assert best is not None
        return best[1]

    @torch.no_grad()
    def _score_at(
        self,
        models: Sequence[nn.Module],
        scored: Split,
        patch: torch.Tensor,
        corner: tuple[int, int],
        device: torch.device,
    ) -> tuple[int, float]:
        """(images fooled, loss in the attack's direction) of ``patch`` pasted at ``corner``."""
        hits, total = 0, 0.0
        patch, mask = patch.to(device), self.mask(device)
        for start in range(0, len(scored), self.batch_size):
            x = scored.images[start : start + self.batch_size].to(device)
            y = self.attack_labels(scored.labels[start : start + self.batch_size].to(device))
            top, left = (torch.full((len(x),), v) for v in corner)
            loss, fooled = self.objective(models, paste_at(x, patch, top, left, mask), y)
            hits += int(fooled.sum())
            total += float(loss) * len(x)
        return hits, (-total if self.targeted else total)

    def _place_at(self, corner: tuple[int, int]) -> None:
        self.searched_location = corner
        self.eot = replace(self.eot, location=corner)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The base state, plus ``"location"`` (top, left) where a search placed the patch."""
        state = super().state_dict()
        if state and self.searched_location is not None:
            state["location"] = torch.tensor(self.searched_location, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the patch and, for ``location="search"``, where it was placed."""
        saved = state.get("location")
        if self.location != "search":
            if saved is not None:
                raise ConfigError("a searched lavan state needs lavan with location 'search'")
            self.mode_base.load_state_dict(self, state)
            return
        if not isinstance(saved, torch.Tensor) or saved.shape != (2,) or saved.is_floating_point():
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else None
            raise ShapeError(
                f"a searched lavan state needs an integer (2,) 'location', got {shape}"
            )
        corner = (int(saved[0]), int(saved[1]))
        replace(self.eot, location=corner)  # a bad corner is refused before anything changes
        super().load_state_dict(state)
        self._place_at(corner)

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
