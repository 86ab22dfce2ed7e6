"""Quantization-aware training defences: one model trained at every precision of a study at once.

Each recipe trains a ``SwitchablePrecision`` model (shared float weights, per-precision
quantizer ranges and BatchNorm) with its own objective; a study puts every precision of it in
the grid next to plain QAT. Formulated from the papers (DWQ's code is public, the others'
is not):

* ``dwq`` (Double-Win Quant, Fu et al. ICML 2021, GATECH-EIC/Double-Win-Quant): random-precision
  adversarial training. Each batch draws one precision, crafts adversarial examples on it and
  trains that precision alone on them (switchable BatchNorm); the model is served at a random
  precision per image.
* ``random-precision``: DWQ's random precision without its adversarial training: every
  precision trained jointly on clean images, served at a random precision per image.
* ``patch-at`` (patch adversarial training across bit-widths, as in QADT-R, arXiv 2503.07058):
  each step crafts patches against a randomly drawn precision (per-image sign-gradient
  patches at random places, and a persistent universal patch updated every step) and trains
  every precision on them.
* ``disalign`` (cross-precision disalignment, as in TriQDef, arXiv 2508.12132): the squared
  cosine similarity of the fp32 and each quantized precision's input gradients is
  penalised, both gradients differentiated (scales frozen for the penalty, eval-mode
  BatchNorm as attackers see it), so that a patch made on one precision points elsewhere on
  the others; optionally TriQDef's feature term (penultimate features) and structure term
  (soft Edge IoU and HOG cosine of the input gradients).

A random-precision model is attacked with the exact expectation over its members (the mean
loss of every precision, ``quant.switchable.attack_members``), and scored as served.

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
from quantpatch.analysis.gradients import hog_descriptor, soft_edge_iou
from quantpatch.attacks.placement import paste_at
from quantpatch.defenses.base import check_float, check_int
from quantpatch.errors import ConfigError
from quantpatch.models.train import TrainConfig, train_model
from quantpatch.quant import FP32, FakeQuantizer, QuantSpec, calibrate, quantize, set_learnable
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

    def draw_precision(self, model: SwitchablePrecision) -> str:
        """One of ``model``'s precisions, uniformly, from the recipe's seeded stream."""
        return model.names[int(torch.randint(len(model.names), (1,), generator=self.generator))]

    def random_places(self, images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, ...]:
        """(tops, lefts): a seeded random place inside each image for a ``patch_size`` patch."""
        n, _, height, width = images.shape
        if patch_size > min(height, width):
            raise ConfigError(
                f"{self.name}: a {patch_size}px patch does not fit {height}x{width} images"
            )
        tops = torch.randint(height - patch_size + 1, (n,), generator=self.generator)
        lefts = torch.randint(width - patch_size + 1, (n,), generator=self.generator)
        return tops, lefts


def joint_loss(
    model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
):
    """Mean cross-entropy of every precision of ``model`` on the same batch."""
    losses = [F.cross_entropy(model.member(name)(images), labels, label_smoothing=smoothing)
              for name in model.names]  # fmt: skip
    return torch.stack(losses).mean()


@RECIPES.register
class RandomPrecision(Recipe):
    """DWQ's random precision without adversarial training: every precision trained jointly on
    clean images; served at a random precision per image."""

    name = "random-precision"
    random_inference = True

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        return joint_loss(model, images, labels, self.label_smoothing)


MAX_PLACEMENTS = 64
"""patch-at's placement search: each candidate is one more forward of the batch."""


@RECIPES.register
class PatchAdversarial(Recipe):
    """Patch adversarial training: patches crafted on a random precision, all trained on them.

    ``patch_size`` px square patches; ``steps`` sign-gradient steps of ``step_size`` per
    per-image patch (random initialisation and place); ``placements`` > 1 searches the place
    as the attacks it meets do: after half the steps each per-image patch is tried at that
    many places (its own and random others, one batched forward without gradients) and
    finishes at the one of highest loss; ``universal_fraction`` of each batch carries instead
    a universal patch kept across batches (one step per batch, "free" adversarial training);
    ``weight`` of the patched loss against the clean one.
    """

    name = "patch-at"

    def __init__(
        self,
        patch_size: int = 7,
        steps: int = 5,
        step_size: float = 0.25,
        placements: int = 1,
        universal_fraction: float = 0.5,
        weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.patch_size = check_int("patch-at patch_size", patch_size, minimum=1)
        self.steps = check_int("patch-at steps", steps, minimum=1)
        self.placements = check_int("patch-at placements", placements, 1, MAX_PLACEMENTS)
        self.step_size = check_float("patch-at step_size", step_size, 0.0, 1.0)
        self.universal_fraction = check_float(
            "patch-at universal_fraction", universal_fraction, 0.0, 1.0
        )
        self.weight = check_float("patch-at weight", weight, 0.0, 100.0)
        self.universal: torch.Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"patch_size": self.patch_size, "steps": self.steps, "step_size": self.step_size,
                "placements": self.placements, "universal_fraction": self.universal_fraction, "weight": self.weight,
                **super().params()}  # fmt: skip

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        clean = joint_loss(model, images, labels, self.label_smoothing)
        drawn = self.draw_precision(model)
        with _evaluating(model.member(drawn)) as member:
            patched = self.patched(member, images, labels)
        adversarial = joint_loss(model, patched, labels, self.label_smoothing)
        return (clean + self.weight * adversarial) / (1 + self.weight)

    def patched(self, member: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """The batch with patches crafted against ``member``: the first ``universal_fraction``
        with the universal patch, the rest with their own per-image patches."""
        n, channels = images.shape[:2]
        p = self.patch_size
        tops, lefts = self.random_places(images, p)
        k = round(n * self.universal_fraction)
        if self.universal is None:
            self.universal = torch.rand(channels, p, p, generator=self.generator)
        universal = self._step(member, images[:k], labels[:k], tops[:k], lefts[:k],
                               self.universal.to(images.device).expand(k, -1, -1, -1), shared=True)  # fmt: skip
        if k:
            self.universal = universal[0].cpu()
        per_image = torch.rand(n - k, channels, p, p, generator=self.generator).to(images.device)
        searched = self.steps // 2 if self.placements > 1 else self.steps
        for step in range(self.steps):
            if step == searched:
                tops[k:], lefts[k:] = self.worst_places(member, images[k:], labels[k:],
                                                        per_image, tops[k:], lefts[k:])  # fmt: skip
            per_image = self._step(member, images[k:], labels[k:], tops[k:], lefts[k:], per_image)
        parts = [paste_at(images[rows], patch, tops[rows], lefts[rows])
                 for rows, patch in ((slice(0, k), universal), (slice(k, n), per_image))
                 if len(patch)]  # fmt: skip
        return torch.cat(parts).detach()

    def worst_places(self, member, images, labels, patches, tops, lefts):
        """(tops, lefts): for each image, of its current place and ``placements`` - 1 random
        others, the one where its patch gives ``member`` the highest loss (one forward)."""
        if not len(images):
            return tops, lefts
        others = [self.random_places(images, self.patch_size) for _ in range(self.placements - 1)]
        all_tops = torch.stack([tops, *(t for t, _ in others)])  # (P, N)
        all_lefts = torch.stack([lefts, *(left for _, left in others)])
        count = len(all_tops)
        with torch.no_grad():
            pasted = paste_at(images.repeat(count, 1, 1, 1), patches.repeat(count, 1, 1, 1),
                              all_tops.flatten(), all_lefts.flatten())  # fmt: skip
            losses = F.cross_entropy(member(pasted), labels.repeat(count), reduction="none")
        best = losses.view(count, -1).argmax(dim=0).cpu()
        columns = torch.arange(len(images))
        return all_tops[best, columns], all_lefts[best, columns]

    def _step(self, member, images, labels, tops, lefts, patch, shared: bool = False):
        return patch_step(member, images, labels, tops, lefts, patch, self.step_size, shared)


def patch_step(member, images, labels, tops, lefts, patch, step_size: float, shared=False):
    """One sign-gradient ascent step of ``step_size`` on the loss of ``member`` (a shared
    patch: on the batch-mean loss, so all images move it the same way)."""
    if not len(images):
        return patch
    patch = patch.detach().requires_grad_(True)
    loss = F.cross_entropy(member(paste_at(images, patch, tops, lefts)), labels)
    (grad,) = torch.autograd.grad(loss, patch)
    if shared:
        grad = grad.sum(dim=0, keepdim=True).expand_as(grad)
    return (patch + step_size * grad.sign()).clamp(0, 1).detach()


@RECIPES.register
class DoubleWinQuant(Recipe):
    """DWQ: random-precision adversarial training, served at a random precision per image.

    Each batch draws one precision uniformly, crafts adversarial examples on it as it trains
    (training-mode BatchNorm, as DWQ's code does) and trains that precision alone on them,
    which moves the shared weights and that precision's own BatchNorm and ranges. ``attack``:
    ``"fgsm"`` (DWQ's default, "fast" adversarial training: one step of ``1.25 eps`` from a
    uniform start in the ``eps`` ball), ``"pgd"`` (``steps`` steps of ``eps / 4`` from a uniform
    start; DWQ's PGD-7 of 2/255 at 8/255 on CIFAR-10) or ``"patch"`` (a per-image
    ``patch_size`` patch at a random place, ``steps`` sign steps of 0.25 from noise). DWQ
    draws from a contiguous bit range (e.g. 4-16); here the draw is over the study's
    precisions. ``eps`` 0.1 is the study's pixel-PGD budget on [0, 1] images.
    """

    name = "dwq"
    random_inference = True

    def __init__(
        self,
        attack: str = "pgd",
        eps: float = 0.1,
        steps: int = 7,
        patch_size: int = 7,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        if attack not in DWQ_ATTACKS:
            raise ConfigError(f"dwq attack must be one of {', '.join(DWQ_ATTACKS)}, got {attack!r}")
        self.attack = attack
        self.eps = check_float("dwq eps", eps, 0.0, 1.0)
        self.steps = check_int("dwq steps", steps, minimum=1)
        self.patch_size = check_int("dwq patch_size", patch_size, minimum=1)

    def params(self) -> dict[str, Any]:
        return {"attack": self.attack, "eps": self.eps, "steps": self.steps,
                "patch_size": self.patch_size, **super().params()}  # fmt: skip

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        drawn = self.draw_precision(model)
        member = model.member(drawn)
        adversarial = self.adversarial(member, images, labels)
        return F.cross_entropy(member(adversarial), labels, label_smoothing=self.label_smoothing)

    def adversarial(self, member: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        """The batch attacked on ``member`` as it is (detached; weights get no gradient)."""
        if self.attack == "patch":
            return self._patched(member, images, labels)
        start = (torch.rand(images.shape, generator=self.generator) * 2 - 1) * self.eps
        adversarial = (images + start.to(images.device)).clamp(0, 1)
        steps, step_size = (
            (1, 1.25 * self.eps) if self.attack == "fgsm" else (self.steps, self.eps / 4)
        )
        for _ in range(steps):
            adversarial = adversarial.detach().requires_grad_(True)
            loss = F.cross_entropy(member(adversarial), labels)
            (grad,) = torch.autograd.grad(loss, adversarial)
            moved = adversarial.detach() + step_size * grad.sign()
            adversarial = moved.clamp(images - self.eps, images + self.eps).clamp(0, 1)
        return adversarial.detach()

    def _patched(self, member: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        n, channels = images.shape[:2]
        p = self.patch_size
        tops, lefts = self.random_places(images, p)
        patch = torch.rand(n, channels, p, p, generator=self.generator).to(images.device)
        for _ in range(self.steps):
            patch = patch_step(member, images, labels, tops, lefts, patch, 0.25)
        return paste_at(images, patch, tops, lefts).detach()


DWQ_ATTACKS = ("fgsm", "pgd", "patch")


@RECIPES.register
class Disalignment(Recipe):
    """Cross-precision disalignment (TriQDef's terms): each precision's view of an input
    turned away from fp32's, so a patch made on one precision points elsewhere on the others.

    Every precision trained jointly, plus, averaged over the quantized precisions against fp32:
    ``weight`` x the squared cosine of the input gradients; ``feature_weight`` x the squared
    centred cosine of the penultimate features (the last Linear layer's input: TriQDef's feature
    disalignment); ``structure_weight`` x the mean of the soft Edge IoU and the HOG cosine of
    the two |input gradient| maps (its gradient perceptual dissonance, on the structure
    measures the gradient-alignment analysis reports). Every term is differentiated through
    both precisions: the penalty pass runs with frozen quantizer scales (the fixed-scale
    native fake-quant op has a second derivative, LSQ's learnable op has none) and eval-mode
    BatchNorm, as an attacker sees the model. Default weight 1
    (``benchmarks/disalign_alignment.py``, resnet20, one epoch on 4,000 digits): fp32-w2a2
    mean |cosine| 0.39 after joint training, 0.18 with this penalty (clean -1.4 / -1.2
    points at fp32 / w2a2). The TriQDef terms at 0.1 each cost w2a2 most of its accuracy
    there (35 % clean), so they default to 0. TriQDef's bit-width curriculum is not
    implemented: every precision trains from the first step."""

    name = "disalign"

    def __init__(
        self,
        weight: float = 1.0,
        feature_weight: float = 0.0,
        structure_weight: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.weight = check_float("disalign weight", weight, 0.0, 1000.0)
        self.feature_weight = check_float("disalign feature_weight", feature_weight, 0.0, 1000.0)
        self.structure_weight = check_float(
            "disalign structure_weight", structure_weight, 0.0, 1000.0
        )

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight, "feature_weight": self.feature_weight,
                "structure_weight": self.structure_weight, **super().params()}  # fmt: skip

    def loss(self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor):
        if FP32.name not in model.names or len(model.names) < 2:
            raise ConfigError("disalign needs fp32 and at least one quantized precision")
        joint = joint_loss(model, images, labels, self.label_smoothing)
        terms = self.penalties(model, images, labels)
        weights = {"gradient": self.weight, "feature": self.feature_weight,
                   "structure": self.structure_weight}  # fmt: skip
        return joint + sum(weights[name] * term for name, term in terms.items())

    def penalties(
        self, model: SwitchablePrecision, images: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The alignment terms whose weight is not 0 (``gradient`` always), each a mean over
        the quantized precisions of its similarity to fp32, with a graph through both."""
        x = images.detach().requires_grad_(True)
        gradients, features = {}, {}
        with _evaluating(model), _frozen_scales(model):
            for name in model.names:
                member = model.member(name)
                with _penultimate(member, enabled=self.feature_weight > 0) as captured:
                    loss = F.cross_entropy(member(x), labels)
                (gradient,) = torch.autograd.grad(loss, x, create_graph=True)
                gradients[name] = gradient
                features[name] = captured
        reference, reference_features = gradients.pop(FP32.name), features.pop(FP32.name)
        pairs = {"gradient": [F.cosine_similarity(reference.flatten(1), g.flatten(1)).square()
                              for g in gradients.values()]}  # fmt: skip
        if self.feature_weight > 0:
            pairs["feature"] = [
                _centred_cosine(reference_features[0], f[0]).square() for f in features.values()
            ]
        if self.structure_weight > 0:
            pairs["structure"] = [_structure_agreement(reference, g) for g in gradients.values()]
        return {name: torch.stack(values).mean() for name, values in pairs.items()}


def _centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine of two (B, D) feature rows after each precision's batch mean is
    removed: post-ReLU features share a large positive mean that would dominate a raw cosine."""
    return F.cosine_similarity(a - a.mean(dim=0), b - b.mean(dim=0))


def _structure_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the mean of soft Edge IoU and HOG cosine of two input-gradient maps' |values|,
    each map scaled to unit norm first (input gradients are ~1e-4: ``smooth`` must see one scale)."""
    maps = [g.abs() / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12) for g in (a, b)]
    hog = [hog_descriptor(m, smooth=1e-4) for m in maps]
    return (soft_edge_iou(*maps) + F.cosine_similarity(*hog)) / 2


@contextlib.contextmanager
def _penultimate(member: nn.Module, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """A list that receives the flattened input of ``member``'s last Linear layer during the
    block (its penultimate features), or stays empty when not ``enabled``."""
    captured: list[torch.Tensor] = []
    if not enabled:
        yield captured
        return
    linears = [m for m in member.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("disalign feature_weight needs a model ending in a Linear layer")
    handle = linears[-1].register_forward_pre_hook(
        lambda _, inputs: captured.append(inputs[0].flatten(1))
    )
    try:
        yield captured
    finally:
        handle.remove()


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
def _frozen_scales(model: nn.Module) -> Iterator[None]:
    """Every learnable quantizer on its fixed-scale op for the block, then learnable again.
    Only ``requires_grad`` changes, never a value: the graph of the joint loss, built on the
    same scales, stays valid. (LSQ keeps scales positive in practice; its forward reads
    ``|s|``, the fixed op ``s``.)"""
    learnable = [q for q in model.modules() if isinstance(q, FakeQuantizer) and q.learnable]
    for quantizer in learnable:
        quantizer.scale.requires_grad_(False)
    try:
        yield
    finally:
        for quantizer in learnable:
            quantizer.scale.requires_grad_(True)


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
