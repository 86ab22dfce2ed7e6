"""``UniversalAttack``: the base of attacks that learn one patch for all images.

A universal attack is two halves with a saved patch between them: ``fit`` learns the patch
on the train split (by default the EOT fit of Brown et al.: Adam on the batch-mean objective
over random placements, with its curve recorded), and ``perturb`` only pastes it, so the
study can cache the patch and score the same images on every target. A subclass states its
defaults, or replaces ``learn_patch`` (generative, query-only) or ``choose_placement``
(a location search); the fit loop, the paste and the saved state stay here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import Attack, BatchStep
from quantpatch.attacks.placement import (
    EOT,
    apply_patch,
    make_canvas,
    prepare_paste,
    sample_placement,
)
from quantpatch.data._types import Split
from quantpatch.errors import CorruptFileError, QuantpatchError, ShapeError

# Move the whole train split to the device once when it is at most this large.
_RESIDENT_BYTES = 1 << 30
# About this many points per fit curve (each the mean over the steps since the last one).
FIT_CURVE_POINTS = 20


class FitPoint(NamedTuple):
    """One point of a universal fit's curve, averaged over the steps since the previous point.

    ``step``: steps done so far; ``loss``: mean batch loss (the cross-entropy the fit
    minimises when targeted and maximises otherwise, averaged over the models); ``success``:
    share of those steps' patched training images that every model misclassifies (targeted:
    classifies as the target). Clean-wrong images count too, so it is a training signal close
    to, not the same as, the evaluated ASR.
    """

    step: int
    loss: float
    success: float


class UniversalAttack(Attack):
    """Base of universal attacks: ``fit`` learns a (C, p, p) ``patch``, ``perturb`` pastes it.

    ``perturb`` ignores ``models`` (every target model of a transfer grid sees the same
    images) and pastes at seeded ``paste_eot`` placements; ``state_dict`` saves the patch
    and the fit's curve.
    """

    universal = True

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self.patch: torch.Tensor | None = None
        self.fit_curve: list[FitPoint] = []
        """The last fit's curve (``learn_patch``); empty before a fit or when loaded from a
        state without one."""

    # ----------------------------------------------------------------- the contract
    def fit(self, models: Sequence[nn.Module], train: Split, device: torch.device | str) -> None:
        """Learn the universal patch on ``train``."""
        self.patch = self.learn_patch(models, train, device)

    def batch_step(
        self, models: Sequence[nn.Module], images: torch.Tensor, device: torch.device
    ) -> BatchStep:
        """Paste ``self.patch`` at placements drawn from ``paste_eot`` with the seeded
        "perturb" stream: image i's placement depends only on the seed and i."""
        del models
        patch = require_patch(self, images).to(device)
        _, _, height, width = images.shape
        placements = sample_placement(
            len(images), (height, width), self.patch_size, self.paste_eot, self.generator("perturb")
        )
        mask = self.mask(device)

        @torch.no_grad()
        def paste(x: torch.Tensor, _: torch.Tensor, index: slice) -> torch.Tensor:
            return apply_patch(x, patch, placements[index], mask)

        return paste

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"patch": (C, p, p), "fit_curve": (K, 3) float64 rows (step, loss, success)}``
        once a patch exists (the curve only when one was recorded), else ``{}``."""
        if self.patch is None:
            return {}
        state = {"patch": self.patch.detach().cpu().clone()}
        if self.fit_curve:
            state["fit_curve"] = torch.tensor(self.fit_curve, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a patch saved by ``state_dict`` (shape and range are checked)."""
        patch = state.get("patch")
        p = self.patch_size
        if not isinstance(patch, torch.Tensor) or patch.ndim != 3 or patch.shape[1:] != (p, p):
            shape = tuple(patch.shape) if isinstance(patch, torch.Tensor) else None
            raise ShapeError(f"state must hold a (C, {p}, {p}) 'patch', got {shape}")
        if not bool(torch.isfinite(patch).all()) or patch.min() < 0 or patch.max() > 1:
            raise CorruptFileError("patch values must be finite and in [0, 1]")
        curve = _fit_curve_from(state.get("fit_curve"))
        self.patch = patch.detach().float().cpu().clone()
        self.fit_curve = curve

    # ----------------------------------------------------------------- what subclasses change
    @property
    def paste_eot(self) -> EOT:
        """Where ``perturb`` pastes the patch: by default where it was learned."""
        return self.eot

    def learn_patch(
        self, models: Sequence[nn.Module], train: Split, device: torch.device | str
    ) -> torch.Tensor:
        """Learn a (C, p, p) patch on ``train``: Adam on the batch-mean cross-entropy averaged
        over ``models`` (of the target class when targeted, else of the true class, maximised)
        and over placements drawn from ``eot``; returns it on the CPU and keeps the fit's
        curve in ``fit_curve``. ``choose_placement`` runs first (a subclass may fix where the
        patch goes, e.g. LaVAN's location search).
        """
        device = resolve_device(device)
        if len(train) == 0:
            raise ShapeError("cannot fit a universal patch on an empty train split")
        frozen = self.frozen_copies(models, device)
        self.choose_placement(frozen, train, device)
        patch, self.fit_curve = self.fit_patch(
            frozen, train, device, self.eot, self.steps, self.generator("fit")
        )
        return patch

    def choose_placement(
        self, models: Sequence[nn.Module], train: Split, device: torch.device
    ) -> None:
        """Called by ``learn_patch`` before the fit with frozen ``models``: by default the
        patch is learned where ``eot`` says."""

    def fit_patch(
        self,
        models: Sequence[nn.Module],
        train: Split,
        device: torch.device,
        eot: EOT,
        steps: int,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, list[FitPoint]]:
        """The universal fit itself on frozen ``models``: (patch on the CPU, its curve).

        All randomness is drawn up front from ``gen``, so the loop itself is just paste +
        forward + backward. The curve is summed on the device and read every
        ``ceil(steps / FIT_CURVE_POINTS)`` steps, so recording it neither draws random numbers
        nor changes the patch.
        """
        _, channels, height, width = train.images.shape
        p, batch = self.patch_size, self.batch_size
        patch = torch.rand(channels, p, p, generator=gen)
        index = torch.randint(len(train), (steps, batch), generator=gen)
        placements = sample_placement(steps * batch, (height, width), p, eot, gen)
        plan = prepare_paste(placements, (height, width), p, device)
        images, labels = resident_split(train, device)
        index = index.to(images.device)
        labels = self.attack_labels(labels[index].to(device))  # (steps, batch), gathered once
        patch = patch.to(device).requires_grad_(True)
        mask = self.mask(device)
        optimizer = torch.optim.Adam(
            [patch], lr=self.lr, maximize=not self.targeted, fused=device.type == "cuda"
        )
        every = max(1, math.ceil(steps / FIT_CURVE_POINTS))
        curve: list[FitPoint] = []
        window_loss = torch.zeros((), dtype=torch.float64, device=device)
        window_hits = torch.zeros((), dtype=torch.int64, device=device)
        bar = tqdm(total=steps, desc=f"fit {self.name}", disable=not self.progress, leave=False)
        with bar:
            for step in range(steps):
                x = images[index[step]].to(device, non_blocking=True)
                adv = plan[step * batch : (step + 1) * batch](x, make_canvas(patch, mask))
                loss, fooled = self.objective(models, adv, labels[step])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    patch.clamp_(0.0, 1.0)
                    window_loss += loss.detach()
                    window_hits += fooled.sum()
                if (step + 1) % every == 0 or step == steps - 1:
                    done = step + 1 - (curve[-1].step if curve else 0)
                    curve.append(FitPoint(step + 1, float(window_loss) / done,
                                          int(window_hits) / (done * batch)))  # fmt: skip
                    window_loss.zero_()
                    window_hits.zero_()
                    # the curve's own mean (already read off the device): no stale value,
                    # no extra sync, no float() of a tensor that requires grad
                    bar.set_postfix(ce=f"{curve[-1].loss:.3f}", refresh=False)
                bar.update(1)
        return patch.detach().cpu(), curve


def require_patch(attack: UniversalAttack, images: torch.Tensor) -> torch.Tensor:
    """The learned patch, checked against the images' channels."""
    if attack.patch is None:
        raise QuantpatchError(f"{type(attack).__name__}: call fit() or load_state_dict() first")
    if attack.patch.shape[0] != images.shape[1]:
        raise ShapeError(
            f"the patch has {attack.patch.shape[0]} channels, images have {images.shape[1]}"
        )
    return attack.patch


def resident_split(train: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split on ``device`` when it is small enough, else left where it is (batches move)."""
    if train.images.numel() * train.images.element_size() <= _RESIDENT_BYTES:
        return train.images.to(device), train.labels.to(device)
    return train.images, train.labels


def _fit_curve_from(value: Any) -> list[FitPoint]:
    """A saved (K, 3) curve back as points (absent: no curve); anything else is refused."""
    if value is None:
        return []
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[1] != 3:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        raise ShapeError(
            f"a saved fit_curve must be (K, 3) rows (step, loss, success), got {shape}"
        )
    rows = value.detach().double().cpu()
    steps, success = rows[:, 0], rows[:, 2]
    if (
        not bool(torch.isfinite(rows).all())
        or bool((steps != steps.round()).any() or (steps < 1).any())
        or bool((steps[1:] <= steps[:-1]).any())
        or bool((success < 0).any() or (success > 1).any())
    ):
        raise CorruptFileError("fit_curve needs increasing whole steps and successes in [0, 1]")
    return [FitPoint(int(step), float(loss), float(hit)) for step, loss, hit in rows.tolist()]
