"""Two classic patch defences: median filtering and Local Gradient Smoothing (LGS).

LGS (Naseer et al., WACV 2019) exploits that patches concentrate high-frequency energy: it
damps pixels in windows whose normalised gradient magnitude is high."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantpatch.defenses.base import DEFENSES
from quantpatch.errors import ConfigError


@DEFENSES.register
class MedianFilter(nn.Module):
    """k x k median filter (removes salt-and-pepper-like patches)."""

    name = "median"

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"median kernel_size must be odd and >= 1, got {kernel_size}")
        self.kernel_size = kernel_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k, (b, c, h, w) = self.kernel_size, images.shape
        padded = F.pad(images, [k // 2] * 4, mode="reflect")
        windows = F.unfold(padded, k).view(b, c, k * k, h * w)
        return windows.median(dim=2).values.view(b, c, h, w)


@DEFENSES.register
class LocalGradientSmoothing(nn.Module):
    """Local Gradient Smoothing (Naseer et al. 2019)."""

    name = "lgs"

    def __init__(self, window: int = 5, threshold: float = 0.1, strength: float = 2.3) -> None:
        super().__init__()
        if window < 1 or not 0 <= threshold <= 1 or strength < 0:
            raise ConfigError("lgs needs window >= 1, 0 <= threshold <= 1 and strength >= 0")
        self.window, self.threshold, self.strength = window, threshold, strength

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.mean(dim=1, keepdim=True)
        dy = F.pad(gray[..., 1:, :] - gray[..., :-1, :], (0, 0, 0, 1))
        dx = F.pad(gray[..., :, 1:] - gray[..., :, :-1], (0, 1, 0, 0))
        # Normalised by the largest possible magnitude (sqrt 2 in [0, 1] images) rather than
        # per image, so a smooth image is not "suppressed" just for being the roughest it has.
        normalised = torch.sqrt(dx**2 + dy**2) / 2**0.5
        # A window is suppressed when its mean normalised gradient exceeds the threshold.
        window_mean = F.avg_pool2d(normalised, self.window, stride=1, padding=self.window // 2,
                                   count_include_pad=False)  # fmt: skip
        window_mean = window_mean[..., : images.shape[-2], : images.shape[-1]]
        active = (window_mean > self.threshold).float()
        damping = (self.strength * normalised * active).clamp(0, 1)
        return images * (1 - damping)
