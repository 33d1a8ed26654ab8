"""Wide ResNet (Zagoruyko & Komodakis 2016): WRN-depth-widen, for 32-px images.

conv1 (16 channels), then three groups of (depth - 4) / 6 pre-activation blocks at 16k, 32k and 64k
channels (k = widen; the second and third group halve the size), a last BN -> ReLU (`final`),
global average pooling and the classifier. Dropout between a block's two convolutions is the
paper's option (0 here by default). WRN-16-8 has 11.0M parameters, WRN-28-10 36.5M.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cifar_cam.models.base import Network
from cifar_cam.models.preact_resnet import PreActBlock
from cifar_cam.models.resnet import conv3x3


class WideResNet(Network):
    """WRN-`depth`-`widen`: conv1, block1..block3, final BN-ReLU, pool, fc."""

    cam_layers = ("block2", "final")
    feature_layer = "final"
    stem = ("conv1",)

    def __init__(self, num_classes: int = 10, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"wide_resnet needs model.depth = 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen < 1 or num_classes < 1:
            raise ValueError(f"model.widen and the class count must be >= 1, got {widen} and {num_classes}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = conv3x3(3, widths[0])
        self.block1 = self._group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._group(widths[2], widths[3], n, 2, dropout)
        self.final = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_planes: int, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(*[PreActBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, dropout)
                               for i in range(n)])

    def forward_features(self, x: Tensor) -> Tensor:
        return self.final(self.block3(self.block2(self.block1(self.conv1(x)))))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def get_classifier(self) -> nn.Linear:
        return self.fc


def wide_resnet(num_classes: int = 10, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> WideResNet:
    return WideResNet(num_classes=num_classes, depth=depth, widen=widen, dropout=dropout)
