"""``universal``: the EOT adversarial patch of Brown et al. (2017), "Adversarial Patch".

Adam on the patch pixels (clamped to [0, 1] after every step); each step draws a batch from the
train split and a random location, rotation and scale per image. All randomness of a fit is
drawn up front from one seeded generator, so the loop itself is just paste + forward + backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import ATTACKS, Attack, check_inputs, require_patch
from quantpatch.attacks.placement import (
    EOT,
    apply_patch,
    make_canvas,
    prepare_paste,
    sample_placement,
)
from quantpatch.data._types import Split
from quantpatch.errors import ShapeError

# Move the whole train split to the device once when it is at most this large.
_RESIDENT_BYTES = 1 << 30


@ATTACKS.register
class UniversalPatch(Attack):
    """Brown et al. 2017 EOT universal patch: Adam on pixels over random placements.

    ``eval_eot`` sets how ``perturb`` places the learned patch (default: the training ``eot``).
    """

    name = "universal"
    universal = True
    kind = "patch"
    default_steps = 300
    default_lr = 0.05

    def __init__(self, *, eval_eot: EOT | Mapping[str, Any] | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.eval_eot = EOT.coerce(eval_eot, self.eot)

    def fit(self, models: Sequence[nn.Module], train: Split, device: torch.device | str) -> None:
        self.patch = fit_universal(self, models, train, device, self.eot)

    def perturb(
        self,
        models: Sequence[nn.Module],
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str,
    ) -> torch.Tensor:
        """Paste the learned patch at seeded ``eval_eot`` placements (models are not used, so
        every target model of a transfer grid sees the same images)."""
        del models
        return paste_universal(self, images, labels, device, self.eval_eot)


def fit_universal(
    attack: Attack,
    models: Sequence[nn.Module],
    train: Split,
    device: torch.device | str,
    eot: EOT,
) -> torch.Tensor:
    """Learn a (C, p, p) patch on ``train``: Adam on the batch-mean cross-entropy averaged over
    ``models`` (of the target class when targeted, else of the true class, maximised) and over
    placements drawn from ``eot``; returns it on the CPU."""
    device = resolve_device(device)
    if len(train) == 0:
        raise ShapeError("cannot fit a universal patch on an empty train split")
    _, channels, height, width = train.images.shape
    p, steps, batch = attack.patch_size, attack.steps, attack.batch_size
    gen = attack.generator("fit")
    patch = torch.rand(channels, p, p, generator=gen)
    index = torch.randint(len(train), (steps, batch), generator=gen)
    placements = sample_placement(steps * batch, (height, width), p, eot, gen)
    plan = prepare_paste(placements, (height, width), p, device)
    images, labels = _resident(train, device)
    index = index.to(images.device)
    labels = attack.attack_labels(labels[index].to(device))  # (steps, batch), gathered once
    patch = patch.to(device).requires_grad_(True)
    mask = attack.mask(device)
    optimizer = torch.optim.Adam(
        [patch], lr=attack.lr, maximize=not attack.targeted, fused=device.type == "cuda"
    )
    frozen = attack.frozen_copies(models, device)
    bar = tqdm(total=steps, desc=f"fit {attack.name}", disable=not attack.progress, leave=False)
    with bar:
        for step in range(steps):
            x = images[index[step]].to(device, non_blocking=True)
            adv = plan[step * batch : (step + 1) * batch](x, make_canvas(patch, mask))
            loss = attack.mean_ce(frozen, adv, labels[step])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0.0, 1.0)
            if attack.progress and (step % 25 == 0 or step == steps - 1):
                bar.set_postfix(ce=f"{float(loss):.3f}", refresh=False)
            bar.update(1)
    return patch.detach().cpu()


def paste_universal(
    attack: Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device | str,
    eot: EOT,
) -> torch.Tensor:
    """``attack.patch`` pasted at placements drawn from ``eot`` with the seeded "perturb"
    stream; image i's placement depends only on the seed and i."""
    check_inputs(images, labels)
    patch = require_patch(attack, images)
    device = resolve_device(device)
    n, _, height, width = images.shape
    placements = sample_placement(
        n, (height, width), attack.patch_size, eot, attack.generator("perturb")
    )
    patch_d, mask = patch.to(device), attack.mask(device)
    out = []
    with torch.no_grad():
        for start in range(0, n, attack.batch_size):
            index = slice(start, start + attack.batch_size)
            x = images[index].to(device, non_blocking=True)
            out.append(apply_patch(x, patch_d, placements[index], mask).to(images.device))
    return torch.cat(out) if out else images.clone()


def _resident(train: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split on ``device`` when it is small enough, else left where it is (batches move)."""
    if train.images.numel() * train.images.element_size() <= _RESIDENT_BYTES:
        return train.images.to(device), train.labels.to(device)
    return train.images, train.labels
