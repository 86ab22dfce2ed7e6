"""The small MNIST CNN of the patch/quantization literature: conv32-conv64-fc128-fc10."""

from __future__ import annotations

import torch
from torch import nn

from quantpatch.models._base import MODELS, check_args


class LeNet(nn.Module):
    """conv32(3x3)-ReLU-conv64(3x3)-ReLU-maxpool2-fc128-ReLU-fc, no padding."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        side = (image_size - 4) // 2  # two unpadded 3x3 convs, then a 2x2 max-pool
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register
def lenet(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Small CNN conv32-conv64-maxpool-fc128-fc (1.2M params at 28 px; MNIST-class data)."""
    check_args("lenet", in_channels, num_classes, image_size, min_size=6)
    return LeNet(in_channels, num_classes, image_size)
