"""ResNet-9: the residual network of Myrtle.ai's DAWNBench CIFAR-10 entry (David Page, "How to train your
ResNet", 2018), as published in its blog posts.

prep (conv-BN-ReLU, w channels), layer1 (conv-BN-ReLU to 2w, max-pool, a residual pair of conv-BN-ReLU),
layer2 (to 4w, max-pool), layer3 (to 8w, max-pool, a residual pair), a global max-pool and a bias-free
classifier whose logits are scaled by 1/8. 6.57M parameters at w = 64. The head takes the maximum,
not the mean: the CAM of the exported features is the classic class activation map, not Grad-CAM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cifar_cam.models.base import Network
from cifar_cam.models.resnet import conv3x3

LOGIT_SCALE = 0.125


def conv_bn(in_planes: int, planes: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(in_planes, planes), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + (conv-BN-ReLU, conv-BN-ReLU)(x)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.res1 = conv_bn(planes, planes)
        self.res2 = conv_bn(planes, planes)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(Network):
    """prep, layer1..layer3, global max-pool, fc (x 1/8)."""

    cam_layers = ("layer2", "layer3")
    feature_layer = "layer3"
    stem = ("prep",)

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be >= 1, got {num_classes} and {width}")
        self.prep = conv_bn(3, width)
        self.layer1 = nn.Sequential(conv_bn(width, 2 * width), nn.MaxPool2d(2), Residual(2 * width))
        self.layer2 = nn.Sequential(conv_bn(2 * width, 4 * width), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(4 * width, 8 * width), nn.MaxPool2d(2), Residual(8 * width))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes, bias=False)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(self.prep(x))))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(features), 1)) * LOGIT_SCALE

    def get_classifier(self) -> nn.Linear:
        return self.fc


def resnet9(num_classes: int = 10, width: int = 64) -> ResNet9:
    return ResNet9(num_classes=num_classes, width=width)
