"""The airbench94 network (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024), written
from the paper's description.

A fixed 2x2 whitening convolution (24 filters: the eigenvectors of the training images' 2x2 patch
covariance, scaled by 1/sqrt(eigenvalue), and their negatives; only its bias trains), GELU, then three
conv groups (conv3x3, max-pool 2, BN, GELU, conv3x3, BN, GELU) of 64, 256 and 256 channels, a global
max-pool and a bias-free linear head whose logits are scaled by 1/9. Its BatchNorms keep
their scale at 1 (only the shift trains), use momentum 0.6 in the paper's sense (0.4 in PyTorch's) and
eps 1e-12; each convolution starts as an identity on its first input channels. 1.97M parameters.

`init_from_data(images)` sets the whitening filters from normalized training images (training calls it
before the first step of a new run); until then they are the identity on the first patch pixel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cifar_cam.models.base import Network

WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL**2   # 24: each eigenvector and its negative
WHITEN_EPS = 5e-4
LOGIT_SCALE = 1 / 9                        # airbench94's scaling of the head's output


class FixedScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (only the shift trains), with the paper's momentum and eps."""

    def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-12) -> None:
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class IdentityConv(nn.Conv2d):
    """conv3x3, 'same' padding, no bias, starting as the identity on its first in_channels outputs."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[:min(w.size(0), w.size(1))])


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = IdentityConv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FixedScaleBatchNorm(out_channels)
        self.conv2 = IdentityConv(out_channels, out_channels)
        self.norm2 = FixedScaleBatchNorm(out_channels)
        self.activ = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class Airbench(Network):
    """whiten, block1..block3, global max-pool, head (x 1/9)."""

    cam_layers = ("block2", "block3")
    feature_layer = "block3"
    stem = ("whiten",)

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] | list[int] = (64, 256, 256)) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 3 or min(widths) < 1 or num_classes < 1:
            raise ValueError(f"airbench needs model.widths = [a, b, c] (>= 1 each), got {widths}")
        self.whiten = nn.Conv2d(3, WHITEN_WIDTH, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        self.act = nn.GELU()
        self.block1 = ConvGroup(WHITEN_WIDTH, widths[0])
        self.block2 = ConvGroup(widths[0], widths[1])
        self.block3 = ConvGroup(widths[1], widths[2])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        with torch.no_grad():
            self.whiten.weight.zero_()
            for i in range(3):  # before init_from_data: pass each channel's top-left pixel through
                self.whiten.weight[i, i, 0, 0] = 1
                self.whiten.weight[i + 3, i, 0, 0] = -1

    @torch.no_grad()
    def init_from_data(self, images: Tensor, eps: float = WHITEN_EPS) -> None:
        """The whitening filters from normalized training images (N, 3, H, W): eigenvectors of the 2x2 patch
        covariance scaled by 1/sqrt(eigenvalue + eps), and their negatives."""
        c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1)  # (N, C, H', W', h, w)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)  # a row a patch, (c, h, w) order
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        scaled = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps).view(-1, 1)).float()
        scaled = scaled.reshape(-1, c, h, w)
        self.whiten.weight.copy_(torch.cat((scaled, -scaled)).to(self.whiten.weight))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(self.act(self.whiten(x)))))

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(features), 1)) * LOGIT_SCALE

    def get_classifier(self) -> nn.Linear:
        return self.head


def airbench(num_classes: int = 10, widths: tuple[int, int, int] | list[int] = (64, 256, 256)) -> Airbench:
    return Airbench(num_classes=num_classes, widths=widths)
