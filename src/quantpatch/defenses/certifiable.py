"""Certifiable training: the base model learns on the inputs its certified defence will show it.

A certificate is only useful when the base classifier is right on ablated or masked images,
which a model trained on whole images rarely is. Each certified defence therefore offers
``train_transform(seed)``: a batched, seeded input transform that ``train_model`` (and
``build_quantized``, for QAT) applies to every training batch:

* ``RandomAblation`` (derandomized smoothing): each image becomes one uniformly drawn ablation,
  in the paper's encoding (``encode_ablation``), so the base model takes 2C channels;
* ``RandomMasks`` (PatchCleanser): each image gets up to two masks drawn from the defence's own
  mask set, the one- and two-mask images double masking classifies.

``create_ablation_model`` builds a zoo model with the 2C input channels of the encoding, and
``PlainInputAdapter`` lets a model trained on plain images sit behind smoothing, so a study can
compare plain and certifiably trained base models under the same defence.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from quantpatch.errors import ConfigError, ShapeError
from quantpatch.models import NormalizedClassifier, create_model

InputTransform = Callable[[torch.Tensor], torch.Tensor]
"""Images (N, C, H, W) in [0, 1] -> the base model's input for them (batched)."""


def encode_ablation(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Levine & Feizi's ablated input: (N, 2C, H, W) with (x, 1 - x) on kept pixels and (0, 0)
    on ablated ones, so an ablated pixel differs from every real value (a black pixel is
    (0, 1)). ``keep`` is bool (N or 1, 1, H, W); differentiable in ``images``."""
    if images.ndim != 4 or keep.ndim != 4 or keep.shape[1] != 1:
        raise ShapeError(
            f"need images (N, C, H, W) and keep (N, 1, H, W), got {tuple(images.shape)} "
            f"and {tuple(keep.shape)}"
        )
    kept = keep.to(images.dtype)
    return torch.cat([images * kept, (1 - images) * kept], dim=1)


class _AblationSource(Protocol):
    def ablation_set(self, image_hw: tuple[int, int]) -> Any: ...


class _MaskSource(Protocol):
    mask_value: float

    def mask_set(self, image_hw: tuple[int, int]) -> Any: ...


class RandomAblation:
    """Training input for a smoothed base model: each image encoded with one ablation of
    ``smoothing`` drawn uniformly per image (the paper draws one per batch; per image gives
    every batch every band position). Draws come from its own generator seeded with ``seed``.
    """

    def __init__(self, smoothing: _AblationSource, seed: int = 0) -> None:
        self.smoothing = smoothing
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        ablations = self.smoothing.ablation_set(tuple(images.shape[-2:]))
        drawn = torch.randint(len(ablations), (len(images),), generator=self.generator)
        return encode_ablation(images, ablations.keep(drawn).to(images.device))


class RandomMasks:
    """Training input for PatchCleanser: each image with ``masks`` draws (default 2) from its
    mask set plus "no mask", so a batch mixes clean, one-mask and two-mask images, the inputs
    double masking classifies. Masked pixels take the defence's ``mask_value``."""

    def __init__(self, cleanser: _MaskSource, seed: int = 0, masks: int = 2) -> None:
        if isinstance(masks, bool) or not isinstance(masks, int) or masks < 1:
            raise ConfigError(f"RandomMasks masks must be an integer >= 1, got {masks!r}")
        self.cleanser = cleanser
        self.masks = masks
        self.generator = torch.Generator().manual_seed(seed)
        self._keeps: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        keeps = self._choices(tuple(images.shape[-2:]))
        drawn = torch.randint(len(keeps), (len(images), self.masks), generator=self.generator)
        keep = keeps[drawn].all(dim=1).to(images.device)
        return torch.where(keep, images, self.cleanser.mask_value)

    def _choices(self, image_hw: tuple[int, int]) -> torch.Tensor:
        """(M + 1, 1, H, W): the defence's masks, then "no mask"."""
        if image_hw not in self._keeps:
            keep = self.cleanser.mask_set(image_hw).keep()
            self._keeps[image_hw] = torch.cat([keep, torch.ones_like(keep[:1])])
        return self._keeps[image_hw]


def certifiable_transform(defense: Any, seed: int = 0) -> InputTransform:
    """The training transform of a certified ``defense``; ``ConfigError`` for a defence that
    has none (input transformations, which need no special training)."""
    hook = getattr(defense, "train_transform", None)
    if hook is None:
        name = getattr(defense, "name", type(defense).__name__)
        raise ConfigError(f"defense '{name}' has no certifiable training")
    return hook(seed)


class PlainInputAdapter(nn.Module):
    """A model trained on plain C-channel images behind derandomized smoothing: it gets the
    kept pixels of the 2C encoding (ablated pixels 0), the plain model's view of an ablation.
    ``model`` may be a module (differentiable end to end) or any predictor (an ORT session)."""

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.model(encoded[:, : encoded.shape[1] // 2])


def create_ablation_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    weights: str | os.PathLike | None = None,
) -> NormalizedClassifier:
    """``create_model`` for a smoothed base model: 2 x ``in_channels`` input channels (the
    encoding of ``in_channels`` images), normalised with the dataset's ``mean``/``std`` on the
    x channels and ``1 - mean``/``std`` on the 1 - x channels."""
    return create_model(
        name,
        in_channels=2 * in_channels,
        num_classes=num_classes,
        image_size=image_size,
        mean=None if mean is None else _doubled(mean, in_channels, complement=True),
        std=None if std is None else _doubled(std, in_channels, complement=False),
        weights=weights,
    )


def _doubled(values: float | Sequence[float], channels: int, *, complement: bool) -> list[float]:
    per_channel = (
        [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    )
    if len(per_channel) == 1:
        per_channel *= channels
    if len(per_channel) != channels:
        raise ShapeError(f"{len(per_channel)} normalisation values for {channels} channels")
    second = [1.0 - v for v in per_channel] if complement else per_channel
    return per_channel + second
