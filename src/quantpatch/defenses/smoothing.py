"""Spatial smoothing defences: median filter, Gaussian blur and Local Gradient Smoothing (LGS).

Patches concentrate high-frequency energy in a small region; smoothing spreads or removes it.
LGS (Naseer et al., WACV 2019) damps only pixels in windows whose gradient magnitude is high.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quantpatch.defenses.base import DEFENSES, InputDefense, check_float, check_int
from quantpatch.errors import ConfigError


@DEFENSES.register
class MedianFilter(InputDefense):
    """Median filter (kernel_size x kernel_size; removes salt-and-pepper-like patches).

    Piecewise linear, so autograd's gradient (through the selected pixel) is exact almost
    everywhere: no BPDA needed.
    """

    name = "median"
    differentiable = True

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = check_int("median kernel_size", kernel_size, minimum=1)
        if kernel_size % 2 == 0:
            raise ConfigError(f"median kernel_size must be odd, got {kernel_size}")

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        k, (b, c, h, w) = self.kernel_size, images.shape
        padded = F.pad(images, [k // 2] * 4, mode="replicate")
        windows = F.unfold(padded, k).view(b, c, k * k, h * w)
        return windows.median(dim=2).values.view(b, c, h, w)


@DEFENSES.register
class GaussianBlur(InputDefense):
    """Gaussian blur (sigma in px; kernel radius ceil(3 sigma))."""

    name = "gaussian-blur"
    differentiable = True

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        self.sigma = check_float("gaussian-blur sigma", sigma, 0.0, open_min=True)
        self.radius = math.ceil(3 * self.sigma)
        taps = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = torch.exp(-(taps**2) / (2 * self.sigma**2))
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Two 1-D depthwise convolutions (separable); edges replicated, so any size works."""
        c, k = images.shape[1], self.kernel.to(images.dtype)
        x = F.pad(images, [self.radius] * 4, mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        return x.clamp(0.0, 1.0)


@DEFENSES.register
class LocalGradientSmoothing(InputDefense):
    """Local Gradient Smoothing (Naseer et al. 2019; window, threshold, strength).

    Not differentiable in any useful way (a hard window threshold, and sqrt at 0 on flat
    regions), so attacks see it through BPDA, as in Chiang et al. (ICLR 2020), who broke it.
    """

    name = "lgs"
    differentiable = False

    def __init__(self, window: int = 5, threshold: float = 0.1, strength: float = 2.3) -> None:
        super().__init__()
        self.window = check_int("lgs window", window, minimum=1)
        self.threshold = check_float("lgs threshold", threshold, 0.0, 1.0)
        self.strength = check_float("lgs strength", strength, 0.0)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
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
        active = (window_mean > self.threshold).to(images.dtype)
        damping = (self.strength * normalised * active).clamp(0, 1)
        return images * (1 - damping)
