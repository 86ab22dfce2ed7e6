"""The defence contract (``Defense``, ``Certifier``), the registry, the input-defence base
class (with BPDA) and ``DefendedModel``.

Two kinds of defence share ``DEFENSES``: input transformations (``InputDefense``: images in,
images out, put in front of a model by ``DefendedModel``) and certifying defences
(``Certifier``, e.g. ``PatchCleanser``) that wrap the whole prediction and can prove it. Both
take only parameters in their constructor (cheap, validated, so a study can build each once
before any training) and both answer ``predict(model, images, device) -> labels`` for any
model: an ``nn.Module`` or a plain callable images -> logits such as ``quant.onnx.OrtModel``.
A study finds everything it needs through this contract, never by class or attribute name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from quantpatch._registry import Registry
from quantpatch.errors import ConfigError, ShapeError
from quantpatch.models.train import predict_logits

Predictor = Callable[[torch.Tensor], torch.Tensor]
DEFENSES: Registry = Registry("defense")
"""Defence classes by name; ``create_defense(name, **params)`` builds one."""


def create_defense(name: str, **params: Any) -> Any:
    """Build the defence ``name`` (``DEFENSES.create``: the registries' one parameter check)."""
    return DEFENSES.create(name, **params)


class Defense:
    """What every defence answers, for any model (a module or a callable images -> logits)."""

    name: ClassVar[str] = ""

    @property
    def adaptive_via(self) -> str:
        """How an adaptive attack sees it: 'exact' gradients, straight-through ones ('bpda'),
        or none ('underlying-model': the white-box attack on the model behind it)."""
        return "underlying-model"

    def predict(
        self, model: Predictor, images: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Labels (CPU) of ``model`` behind this defence, batched."""
        raise NotImplementedError

    def scores(
        self,
        model: Predictor,
        images: torch.Tensor,
        num_classes: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """(N, num_classes) CPU scores whose argmax is ``predict``'s label: what a study
        scores the defended model by, and what a query attack through the defence climbs.
        Here one-hot; a defence whose decision has a margin (votes, agreeing masks) grades
        it, so a query attack sees progress before the label flips."""
        labels = self.predict(model, images, device)
        return torch.nn.functional.one_hot(labels, num_classes).float()

    def check_image_size(self, image_hw: tuple[int, int]) -> None:
        """Refuse (``PatchTooLargeError``, ``ConfigError``) images of ``image_hw`` this
        defence cannot work on: called by a study before any training."""


class Certifier(Defense):
    """A defence that proves, per clean image, that no patch of ``patch_size`` anywhere can
    change its prediction; the study certifies every model with it."""

    patch_size: int

    def certify(
        self,
        model: Predictor,
        images: torch.Tensor,
        labels: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(defended labels, certified) of clean ``images`` with true ``labels``, both (N,)
        on the CPU; an image is certified only when its defended label is its true label."""
        raise NotImplementedError

    def method(self, image_hw: tuple[int, int]) -> str:
        """How it certifies images of ``image_hw``, in words, for results."""
        raise NotImplementedError

    @property
    def adaptive_via(self) -> str:
        """'surrogate' where the defence offers a differentiable stand-in (``surrogate``),
        so an adaptive attack can be crafted through it; else the underlying model's."""
        has_own = type(self).surrogate is not Certifier.surrogate
        return "surrogate" if has_own else "underlying-model"

    def surrogate(self, model: nn.Module) -> nn.Module:
        """A differentiable stand-in for the defended classifier around ``model`` (images ->
        scores whose argmax tracks the defence's label), for adaptive attacks."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable surrogate")


class _StraightThrough(torch.autograd.Function):
    """Forward: the defended images; backward: the incoming gradient, unchanged, to the input."""

    @staticmethod
    def forward(ctx: Any, images: torch.Tensor, defended: torch.Tensor) -> torch.Tensor:
        return defended.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


@torch.fx.wrap
def straight_through(images: torch.Tensor, defended: torch.Tensor) -> torch.Tensor:
    """BPDA (Athalye et al. 2018): the value of ``defended``, the gradient of the identity.

    Wrapped for torch.fx, so tracing a model that holds a defence (``fast_frozen_copy`` does,
    to fold BatchNorm) keeps this node opaque instead of inlining its forward and silently
    turning the identity gradient back into the zero gradient of rounding.
    """
    return _StraightThrough.apply(images, defended)


class InputDefense(nn.Module, Defense):
    """Base of input transformations: images (N, C, H, W) in [0, 1] -> same shape, in [0, 1].

    A subclass writes ``transform`` (batched) and states ``differentiable``. When it is
    ``False`` (rounding, codecs, hard thresholds: zero or useless gradients), ``forward`` runs
    the real transform and passes gradients straight through (BPDA), so a ``DefendedModel``
    is a useful source for adaptive attacks. No registered defence is randomised, so attacks
    through them need no expectation over the defence's randomness.
    """

    name: ClassVar[str] = ""
    differentiable: ClassVar[bool] = True

    @property
    def adaptive_via(self) -> str:
        return "exact" if self.differentiable else "bpda"

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.differentiable:
            return self.transform(images)
        return straight_through(images, self.transform(images.detach()))

    def predict(
        self, model: Predictor, images: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Labels (CPU) of ``model`` behind this defence, batched."""
        return predict_logits(DefendedModel(model, self), images, device).argmax(dim=1)


class DefendedModel(nn.Module):
    """``model(defense(x))``: evaluate or attack a model behind an input defence.

    ``model`` may be an ``nn.Module`` (then this is differentiable end to end, with BPDA
    through non-differentiable defences) or any callable images -> logits (e.g. an ONNX
    Runtime session, evaluation only).
    """

    def __init__(self, model: Predictor, defense: InputDefense) -> None:
        super().__init__()
        if not isinstance(defense, InputDefense):
            raise ConfigError(f"DefendedModel needs an input defence, got {type(defense).__name__}")
        self.defense = defense
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.defense(images))


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], else ``ConfigError`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return int(value)


def check_float(
    name: str, value: Any, minimum: float, maximum: float = math.inf, *, open_min: bool = False
) -> float:
    """``value`` as a finite float in [minimum, maximum] (``(minimum, ...`` when ``open_min``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    low_ok = value > minimum if open_min else value >= minimum
    if not low_ok or value > maximum:
        low = f"> {minimum}" if open_min else f">= {minimum}"
        high = "" if maximum == math.inf else f" and <= {maximum}"
        raise ConfigError(f"{name} must be {low}{high}, got {value}")
    return float(value)


def check_images(images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got {tuple(images.shape)}")


def check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    """``check_images``, and one label per image."""
    check_images(images)
    if labels.shape != (len(images),):
        raise ShapeError(f"labels must be ({len(images)},), got {tuple(labels.shape)}")
