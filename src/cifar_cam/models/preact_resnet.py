"""Pre-activation ResNet18 (He et al. 2016, "Identity Mappings in Deep Residual Networks"), CIFAR variant.

Each block is BN -> ReLU -> conv, twice, added to its input (the shortcut projects the
pre-activated input when the shape changes); a last BN -> ReLU (`final`) precedes the pooling, so
`final` is the map the head and the exported CAM features see.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cifar_cam.models.base import Network
from cifar_cam.models.resnet import conv1x1, conv3x3


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 (with the stride), dropout, BN-ReLU-conv3x3, plus the input (or its 1x1 projection after the
    first BN-ReLU). Wide ResNet's block too; `dropout` is its option (0: none, no module that does anything)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = conv1x1(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.dropout(self.conv1(out))
        return self.conv2(self.relu(self.bn2(out))) + identity


class PreActResNet(Network):
    """Pre-activation ResNet: conv1, layer1..layer4 (widths w, 2w, 4w, 8w), final BN-ReLU, pool, fc."""

    cam_layers = ("layer3", "final")
    feature_layer = "final"
    stem = ("conv1",)

    def __init__(self, layers: list[int], num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be >= 1, got {num_classes} and {width}")
        self.in_planes = width
        self.conv1 = conv3x3(3, width)
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.final = nn.Sequential(nn.BatchNorm2d(width * 8), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.final(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def preact_resnet18(num_classes: int = 10, width: int = 64) -> PreActResNet:
    """Pre-activation ResNet18 (2-2-2-2 blocks)."""
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, width=width)
