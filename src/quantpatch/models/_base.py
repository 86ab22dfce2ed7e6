"""The model registry, the normalising wrapper every created model wears, and size checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantpatch._registry import Registry
from quantpatch.errors import ShapeError

MODELS: Registry = Registry("model")
"""Factories ``f(in_channels, num_classes, image_size) -> nn.Module`` returning a bare network
that expects normalised input; ``create_model`` adds the ``Normalize`` layer in front."""


def _per_channel(values: float | Sequence[float], channels: int, what: str) -> torch.Tensor:
    """Broadcast a scalar or a 1-element sequence to ``channels`` values."""
    if isinstance(values, (int, float)):
        values = [float(values)]
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ShapeError(f"{what} has {len(values)} values but the model has {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


def _count(values: float | Sequence[float]) -> int:
    return 1 if isinstance(values, (int, float)) else len(values)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, kept as buffers so it moves and saves with the model.

    Normalisation lives inside the model so that attacks, patches and quantizers all see images
    in [0, 1], and a checkpoint carries the statistics it was trained with.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if channels is None:
            channels = max(_count(mean), _count(std))
        mean_t = _per_channel(mean, channels, "mean")
        std_t = _per_channel(std, channels, "std")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedClassifier(nn.Module):
    """A classifier taking [0, 1] images: ``net(normalize(x))``."""

    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def check_args(
    family: str, in_channels: int, num_classes: int, image_size: int, *, min_size: int
) -> None:
    """Reject arguments no network of ``family`` can be built for, with one clear message."""
    if in_channels < 1:
        raise ShapeError(f"{family}: in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise ShapeError(f"{family}: num_classes must be >= 2, got {num_classes}")
    if image_size < min_size:
        raise ShapeError(f"{family}: image_size must be >= {min_size}, got {image_size}")
