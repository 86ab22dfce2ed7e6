"""``gap``: Generative Adversarial Perturbations (Poursaeed et al., CVPR 2018), patch version.

The paper's universal mode: a small generator maps one fixed noise input z to the
perturbation, and is trained with gradients through the (frozen) source models. Here the
output is a patch (sigmoid, so always in [0, 1]) pasted at EOT placements exactly like the
``universal`` attack, and the loss is the paper's: the log of the cross-entropy towards the
target class when targeted, else towards each image's least likely class under the source
model (which pushes images far from their own class, not just over the nearest boundary).
Training the generator instead of the pixels reparameterises the search; ``state_dict``
holds its output patch, so ``perturb`` and the study cache treat it as any universal patch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init
from tqdm.auto import tqdm

from quantpatch._runtime import resolve_device
from quantpatch.attacks.base import ATTACKS, check_int
from quantpatch.attacks.placement import make_canvas, prepare_paste, sample_placement
from quantpatch.attacks.universal import UniversalPatch
from quantpatch.attacks.universal_base import resident_split
from quantpatch.data._types import Split
from quantpatch.errors import ShapeError

NOISE_CHANNELS = 8  # channels of the fixed noise input z (p x p)


class PatchGenerator(nn.Module):
    """Fixed noise z (k, p, p) -> patch (C, p, p): three 3x3 convolutions (size-preserving,
    ReLU between), sigmoid out. Small enough that the source models dominate the cost; z and
    the weights come from ``generator``."""

    def __init__(self, channels: int, size: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        noise = torch.randn(1, NOISE_CHANNELS, size, size, generator=generator)
        self.register_buffer("noise", noise)
        sides = (NOISE_CHANNELS, width, width, channels)
        convs = [skip_init(nn.Conv2d, a, b, 3, padding=1) for a, b in itertools.pairwise(sides)]
        self.net = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2])
        self.reset(generator)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.net(self.noise))[0]

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Seeded weights (uniform in +-1/sqrt(fan_in), torch's default range): the layers are
        built with ``skip_init``, so fitting never touches the global random stream."""
        for conv in self.net:
            if isinstance(conv, nn.Conv2d):
                bound = 1.0 / math.sqrt(conv.weight[0].numel())
                for param in (conv.weight, conv.bias):
                    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)


@ATTACKS.register
class GAP(UniversalPatch):
    """Generative Adversarial Perturbations: a generator from fixed noise to a universal patch.

    ``width``: the generator's hidden channels; ``steps``, ``lr`` (Adam on the generator
    weights), ``batch_size``, ``eot`` and ``eval_eot`` as in ``universal``.
    """

    name = "gap"
    kind = "patch"
    default_steps = 300
    default_lr = 0.01

    def __init__(self, *, width: int = 32, **common: Any) -> None:
        super().__init__(**common)
        self.width = check_int("width", width, minimum=1)

    def learn_patch(
        self, models: Sequence[nn.Module], train: Split, device: torch.device | str
    ) -> torch.Tensor:
        """Adam on the generator; all randomness (z, weights, batches, placements) is drawn up
        front from the seeded "fit" stream."""
        device = resolve_device(device)
        if len(train) == 0:
            raise ShapeError("cannot fit a universal patch on an empty train split")
        _, channels, height, width = train.images.shape
        p, steps, batch = self.patch_size, self.steps, self.batch_size
        gen = self.generator("fit")
        generator = PatchGenerator(channels, p, self.width, gen).to(device)
        index = torch.randint(len(train), (steps, batch), generator=gen)
        plan = prepare_paste(
            sample_placement(steps * batch, (height, width), p, self.eot, gen), (height, width),
            p, device,
        )  # fmt: skip
        images, _ = resident_split(
            train, device
        )  # the loss aims at the target or least likely class
        index, mask = index.to(images.device), self.mask(device)
        frozen = self.frozen_copies(models, device)
        optimizer = torch.optim.Adam(generator.parameters(), lr=self.lr)
        bar = tqdm(range(steps), desc=f"fit {self.name}", disable=not self.progress, leave=False)
        for step in bar:
            x = images[index[step]].to(device, non_blocking=True)
            adv = plan[step * batch : (step + 1) * batch](x, make_canvas(generator(), mask))
            loss = self.gap_loss(frozen, x, adv)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return generator().detach().cpu()

    def gap_loss(
        self, models: Sequence[nn.Module], clean: torch.Tensor, adv: torch.Tensor
    ) -> torch.Tensor:
        """log cross-entropy towards the target (targeted) or each clean image's least likely
        class under each model, averaged over the models; minimised."""
        total = adv.new_zeros(())
        for model in models:
            if self.targeted:
                aim = torch.full((len(adv),), int(self.target_class), device=adv.device)  # type: ignore[arg-type]
            else:
                with torch.no_grad():
                    aim = model(clean).argmin(dim=1)
            logits = model(adv)
            self._check_target(logits)
            total = total + torch.log(F.cross_entropy(logits, aim))
        return total / len(models)
