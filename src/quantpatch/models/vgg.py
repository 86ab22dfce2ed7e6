"""A narrow VGG-11 with BatchNorm for 28-32 px images.

Widths 32-64-128-128-256-256-256-256 (a quarter of Simonyan & Zisserman's, capped at 256)
and three 2x2 max-pools instead of five, so 28 px inputs end at 3x3 and 32 px at 4x4; a global
average pool and one Linear layer replace the original 3-layer classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from quantpatch.models._base import MODELS, check_args

# ints are 3x3 conv-BN-ReLU widths, "M" a 2x2 max-pool
VGG11_NARROW: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256, 256, 256, 256)


class VGG(nn.Module):
    def __init__(self, cfg: tuple[int | str, ...], in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(item)
                layers += [
                    nn.Conv2d(ch, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@MODELS.register
def vgg11_bn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Narrow VGG-11-BN, 3 pools + GAP (2.3M params; for 28-32 px)."""
    check_args("vgg11_bn", in_channels, num_classes, image_size, min_size=8)
    return VGG(VGG11_NARROW, in_channels, num_classes)
