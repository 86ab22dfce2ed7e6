"""CIFAR-style ResNets (He et al. 2016, sec. 4.2): 3 stages of 16/32/64 channels, 6n+2 layers.

Shortcuts that change shape use option B (1x1 conv + BN projection) rather than option A
(zero-padded identity): it costs a few thousand parameters but is built only from Conv2d/BN,
so the quantizer covers every path and ONNX export needs no custom padding ops. A global
average pool makes the net work for any image size >= 8 (28 and 32 px alike).
"""

from __future__ import annotations

import torch
from torch import nn

from quantpatch.models._base import MODELS, check_args


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2 = conv_bn(out_ch, out_ch, 3, 1)
        self.shortcut = (
            conv_bn(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv 3x3/16, three stages of ``depth`` blocks (16, 32, 64 ch), GAP, Linear."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, 16, 3, 1), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [
                BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                for i in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@MODELS.register
def resnet20(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-20 (0.27M params; option-B 1x1 projection shortcuts)."""
    check_args("resnet20", in_channels, num_classes, image_size, min_size=8)
    return CifarResNet(3, in_channels, num_classes)


@MODELS.register
def resnet56(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-56 (0.86M params; option-B 1x1 projection shortcuts)."""
    check_args("resnet56", in_channels, num_classes, image_size, min_size=8)
    return CifarResNet(9, in_channels, num_classes)
