"""ResNet18 / 34 / 50 for small images, written from scratch in the shape of torchvision's resnet.py.

CIFAR variant (He et al. 2016, as in kuangliu/pytorch-cifar): a 3x3 stride-1 stem and no
max-pool, so layer1..layer4 see 32, 16, 8 and 4 pixels of a 32-px image. ResNet18 and 34 stack
basic blocks (two 3x3 convolutions), ResNet50 bottlenecks (1x1, 3x3, 1x1, four times wider out).
The modules carry torchvision's names (conv1, bn1, layer1..4, fc), so a torchvision state dict of
the same net loads into everything but the stem and the classifier.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cifar_cam.models.base import Network


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution for the shortcut projection."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """The shortcut of a block whose output differs from its input in size or channels (1x1 conv + BN), else None
    (the identity)."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (with the stride), 1x1 up to `expansion` x planes, with an identity or projection shortcut."""

    expansion: int = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Network):
    """ResNet with a CIFAR stem; `layer1..layer4` and `fc` named as in torchvision."""

    cam_layers = ("layer3", "layer4")
    feature_layer = "layer4"
    stem = ("conv1",)

    def __init__(self, layers: list[int], num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 block: type[BasicBlock] | type[Bottleneck] = BasicBlock) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.block = block
        self.in_planes = width
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0], stride=1)
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of each block: every block starts as identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (blocks - 1)
        layers = []
        for s in strides:
            layers.append(self.block(self.in_planes, planes, s))
            self.in_planes = planes * self.block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet18 (2-2-2-2 basic blocks), CIFAR variant: 11,173,962 parameters at width 64 and 10 classes."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, width=width)


def resnet34(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet34 (3-4-6-3 basic blocks), CIFAR variant."""
    return ResNet([3, 4, 6, 3], num_classes=num_classes, width=width)


def resnet50(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet50 (3-4-6-3 bottlenecks), CIFAR variant."""
    return ResNet([3, 4, 6, 3], num_classes=num_classes, width=width, block=Bottleneck)
