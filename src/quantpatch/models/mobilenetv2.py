"""MobileNetV2 (Sandler et al. 2018), CIFAR variant with width multiplier 0.5.

Changes from the ImageNet net, as in common CIFAR ports: the stem conv has stride 1 and the
second stage (24 ch) stride 1, so only three stages downsample (32 -> 16 -> 8 -> 4 px; 28 px
ends at 4x4). Width 0.5 (channels rounded to multiples of 8) keeps it CPU friendly; the last
1x1 conv keeps 1280 channels, as torchvision does for multipliers <= 1. ReLU6 as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from quantpatch.models._base import MODELS, check_args

# expansion t, output channels c, repeats n, first stride s (CIFAR strides)
CIFAR_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_act(
    in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, width: float = 0.5, last_channels: int = 1280
    ) -> None:
        super().__init__()
        ch = make_divisible(32 * width)
        layers: list[nn.Module] = [conv_bn_act(in_channels, ch, 3, 1)]
        for expand, c, n, s in CIFAR_SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(ch, out_ch, s if i == 0 else 1, expand))
                ch = out_ch
        last = make_divisible(last_channels * max(1.0, width))
        layers.append(conv_bn_act(ch, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@MODELS.register
def mobilenetv2(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """MobileNetV2 x0.5, CIFAR strides (3 downsamples; 0.7M params)."""
    check_args("mobilenetv2", in_channels, num_classes, image_size, min_size=8)
    return MobileNetV2(in_channels, num_classes)
