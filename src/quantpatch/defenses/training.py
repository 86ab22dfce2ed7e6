"""Quantization-aware training defences: one model trained at every precision of a study at once.

Each recipe trains a ``SwitchablePrecision`` model (shared float weights, per-precision
quantizer ranges and BatchNorm) with its own objective; a study puts every precision of it in
the grid next to plain QAT. Formulated from the papers' descriptions (none released code):

* ``random-precision`` (DWQ, Fu et al. ICML 2021): every precision trained jointly; the model
  is also served at a random precision per image, and attacked with an expectation over
  precisions.
* ``patch-at`` (patch adversarial training across bit-widths, as in QADT-R, arXiv 2503.07058):
  each step crafts patches against a randomly drawn precision (per-image sign-gradient
  patches at random places, and a persistent universal patch updated every step) and trains
  every precision on them.
* ``disalign`` (cross-precision disalignment, as in TriQDef, arXiv 2508.12132): the squared
  cosine similarity of the fp32 and each quantized precision's input gradients is
  penalised, so that a patch made on one precision points elsewhere on the others.

``RECIPES`` maps names to classes; ``create_recipe(name, **params)`` validates the parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantpatch._registry import Registry
from quantpatch.attacks.placement import paste_at
from quantpatch.defenses.base import check_float, check_int
from quantpatch.errors import ConfigError
from quantpatch.models.train import TrainConfig, train_model
from quantpatch.quant import FP32, QuantSpec, calibrate, quantize, set_learnable
from quantpatch.quant.quantize import CALIBRATION_IMAGES, param_groups
from quantpatch.quant.switchable import SwitchablePrecision

RECIPES: Registry = Registry("recipe")


class Recipe:
    """A training objective for a switchable-precision model (override ``loss``)."""

    name = "recipe"
    random_inference = False
    """True: the model is also served (and attacked) at a random precision per image."""
    label_smoothing = 0.0
    """Of the training schedule (``train_recipe`` sets it), like plain QAT's loss."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int(f"{self.name} seed", seed, minimum=0)
        self.generator = torch.Generator().manual_seed(self.seed)

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}


def joint_loss(
    model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
):
    """Mean cross-entropy of every precision of ``model`` on the same batch."""
    losses = [F.cross_entropy(model.member(name)(images), labels, label_smoothing=smoothing)
              for name in model.names]  # fmt: skip
    return torch.stack(losses).mean()


@RECIPES.register
class RandomPrecision(Recipe):
    """DWQ-style: every precision trained jointly; served at a random precision per image."""

    name = "random-precision"
    random_inference = True

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        return joint_loss(model, images, labels, self.label_smoothing)


@RECIPES.register
class PatchAdversarial(Recipe):
    """Patch adversarial training: patches crafted on a random precision, all trained on them.

    ``patch_size`` px square patches; ``steps`` sign-gradient steps of ``step_size`` per
    per-image patch (random initialisation and place); ``universal_fraction`` of each batch
    carries instead a universal patch kept across batches (one step per batch, "free"
    adversarial training); ``weight`` of the patched loss against the clean one.
    """

    name = "patch-at"

    def __init__(
        self,
        patch_size: int = 7,
        steps: int = 5,
        step_size: float = 0.25,
        universal_fraction: float = 0.5,
        weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.patch_size = check_int("patch-at patch_size", patch_size, minimum=1)
        self.steps = check_int("patch-at steps", steps, minimum=1)
        self.step_size = check_float("patch-at step_size", step_size, 0.0, 1.0)
        self.universal_fraction = check_float(
            "patch-at universal_fraction", universal_fraction, 0.0, 1.0
        )
        self.weight = check_float("patch-at weight", weight, 0.0, 100.0)
        self.universal: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "steps": self.steps, "step_size": self.step_size,
                "universal_fraction": self.universal_fraction, "weight": self.weight,
                **super().params()}  # fmt: skip

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        clean = joint_loss(model, images, labels, self.label_smoothing)
        drawn = model.names[int(torch.randint(len(model.names), (1,), generator=self.generator))]
        with _evaluating(model.member(drawn)) as member:
            patched = self.patched(member, images, labels)
        adversarial = joint_loss(model, patched, labels, self.label_smoothing)
        return (clean + self.weight * adversarial) / (1 + self.weight)

    def patched(self, member: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """The batch with patches crafted against ``member``: the first ``universal_fraction``
        with the universal patch, the rest with their own per-image patches."""
        n, channels, height, width = images.shape
        p = self.patch_size
        if p > min(height, width):
            raise ConfigError(f"patch-at: a {p}px patch does not fit {height}x{width} images")
        tops = torch.randint(height - p + 1, (n,), generator=self.generator)
        lefts = torch.randint(width - p + 1, (n,), generator=self.generator)
        k = round(n * self.universal_fraction)
        if self.universal is None:
            self.universal = torch.rand(channels, p, p, generator=self.generator)
        universal = self._step(member, images[:k], labels[:k], tops[:k], lefts[:k],
                               self.universal.to(images.device).expand(k, -1, -1, -1), shared=True)  # fmt: skip
        if k:
            self.universal = universal[0].cpu()
        per_image = torch.rand(n - k, channels, p, p, generator=self.generator).to(images.device)
        for _ in range(self.steps):
            per_image = self._step(member, images[k:], labels[k:], tops[k:], lefts[k:], per_image)
        parts = [paste_at(images[rows], patch, tops[rows], lefts[rows])
                 for rows, patch in ((slice(0, k), universal), (slice(k, n), per_image))
                 if len(patch)]  # fmt: skip
        return torch.cat(parts).detach()

    def _step(self, member, images, labels, tops, lefts, patch, shared: bool = False):
        """One sign-gradient ascent step on the loss of ``member`` (a shared patch: on the
        batch-mean loss, so all images move it the same way)."""
        if not len(images):
            return patch
        patch = patch.detach().requires_grad_(True)
        loss = F.cross_entropy(member(paste_at(images, patch, tops, lefts)), labels)
        (grad,) = torch.autograd.grad(loss, patch)
        if shared:
            grad = grad.sum(dim=0, keepdim=True).expand_as(grad)
        return (patch + self.step_size * grad.sign()).clamp(0, 1).detach()


@RECIPES.register
class Disalignment(Recipe):
    """Cross-precision disalignment: fp32's input gradients turned away from each precision's.

    Every precision trained jointly, plus ``weight`` times the mean squared cosine similarity
    of fp32's input gradient and each quantized precision's. (Default 10: on a LeNet probe, 512 training digits, it halved the fp32-w2a2
    gradient alignment, where 1 moved it by a tenth and 100 cost 30 points of accuracy.) Fake-quant ops have no second derivative, so the quantized gradients enter
    as constants: the shared weights move fp32's gradient away from them."""

    name = "disalign"

    def __init__(self, weight: float = 10.0, seed: int = 0) -> None:
        super().__init__(seed)
        self.weight = check_float("disalign weight", weight, 0.0, 1000.0)

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight, **super().params()}

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        if FP32.name not in model.names or len(model.names) < 2:
            raise ConfigError("disalign needs fp32 and at least one quantized precision")
        x = images.detach().requires_grad_(True)
        losses = {name: F.cross_entropy(model.member(name)(x), labels,
                                        label_smoothing=self.label_smoothing)
                  for name in model.names}  # fmt: skip
        (reference,) = torch.autograd.grad(losses[FP32.name], x, create_graph=True)
        reference = reference.flatten(1)
        similarity = []
        for name in model.names:
            if name == FP32.name:
                continue
            (other,) = torch.autograd.grad(losses[name], x, retain_graph=True)
            similarity.append(F.cosine_similarity(reference, other.flatten(1), dim=1).pow(2))
        penalty = torch.stack(similarity).mean()
        return torch.stack(list(losses.values())).mean() + self.weight * penalty


def create_recipe(name: str, **params: Any) -> Recipe:
    """The recipe ``name`` (``RECIPES.create``: the registries' one parameter check)."""
    return RECIPES.create(name, **params)


def train_recipe(
    fp32_model: nn.Module,
    specs: list[QuantSpec],
    recipe: Recipe,
    train: Any,
    config: TrainConfig,
    *,
    calibration: str = "mse",
    first_last_bits: int | None = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SwitchablePrecision:
    """fp32 plus every quantized ``specs``, calibrated from ``fp32_model`` like plain QAT, tied
    into one switchable model and trained with ``recipe`` on ``config``'s schedule (LSQ
    scales learn, without weight decay); returned in eval mode with scales frozen."""
    generator = torch.Generator().manual_seed(config.seed)
    images = train.images[torch.randperm(len(train), generator=generator)[:CALIBRATION_IMAGES]]
    members = {}
    for spec in [FP32, *(s for s in specs if not s.is_float)]:
        member = quantize(fp32_model, spec, first_last_bits=first_last_bits).to(device)
        if not spec.is_float:
            calibrate(member, images, calibration, device, seed=config.seed)
        members[spec.name] = member
    model = SwitchablePrecision(members, seed=config.seed)
    recipe.label_smoothing = config.label_smoothing
    set_learnable(model, True)
    try:
        train_model(model, train, config, device, progress, f"QAT {recipe.name}",
                    param_groups=param_groups(model),
                    objective=lambda x, y: recipe.loss(model, x, y))  # fmt: skip
    finally:
        set_learnable(model, False)
    return model.eval()


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block (patches are crafted on the model as served),
    then back in its previous mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
