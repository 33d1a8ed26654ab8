"""The deployed model's contract, shared by export (ONNX, torch.export) and the Predictor.

A deployed model takes raw pixels and gives logits and the model's feature map:

- input `images`: uint8, (N, H, W, 3), RGB, at the checkpoint's image size; the batch is dynamic;
- output `logits`: float32 (N, num_classes);
- output `features`: float32 (N, C, h, w), the map of the architecture's feature layer (the last of
  its CAM layers: layer4 for the ResNets, 4x4 for 32-px inputs).

Normalization (the data's mean / std) and the NHWC -> NCHW change happen inside, so a caller needs
no PyTorch and no constants. The class activation map of class c is `sum_k fc.weight[c, k] *
features[k]` (`cam_from_features`); where the head is global average pooling and one linear layer
(the ResNets, WRN, timm / torchvision nets that average) it equals Grad-CAM at that layer after ReLU
and min-max scaling; the card says which (`cam`). The card carries the classifier's weights.

The card (`model_card.json`, the ONNX metadata, the .pt2's extra file) is one JSON dict under
CARD_KEY; the classifier weights for CAM travel beside it under FC_KEY.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD

CARD_KEY = "cifar_cam"            # ONNX metadata_props key / .pt2 extra file "cifar_cam.json": the model card
FC_KEY = "cifar_cam_fc"           # {"weight": [[...]], "bias": [...]}: the classifier, for CAM without torch
FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAMES = "images", ("logits", "features")


class DeployedModel(nn.Module):
    """uint8 NHWC RGB pixels -> (logits, features): a trained Network with its normalization inside."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...] = CIFAR10_MEAN,
                 std: tuple[float, ...] = CIFAR10_STD) -> None:
        super().__init__()
        self.model = model
        # (x/255 - mean)/std == (x - 255 mean) / (255 std), as data.Normalizer does: the same floats
        self.register_buffer("shift", torch.tensor([255 * m for m in mean]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = (images.permute(0, 3, 1, 2).float() - self.shift) * self.scale
        features = self.model.forward_features(x)
        return self.model.forward_head(features), features


def classifier_of(model: nn.Module) -> dict[str, Any]:
    """The final linear layer as plain lists (FC_KEY's value; a classifier without bias: zeros)."""
    fc = model.get_classifier()
    bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
    return {"weight": fc.weight.detach().cpu().float().tolist(), "bias": bias.detach().cpu().float().tolist()}


def cam_from_features(features: np.ndarray | Tensor, fc_weight: np.ndarray | Tensor, classes: Any,
                      size: tuple[int, int]) -> np.ndarray:
    """CAM of `classes[i]` for image i from its layer4 `features` (N, C, h, w) and the classifier's weight
    (num_classes, C): (N, H, W) float32 maps in [0, 1] at `size`, normalized as our Grad-CAM (equal to
    Grad-CAM at layer4, whose channel weights are these divided by h*w)."""
    from cifar_cam.explain.cam import weighted_maps

    features = torch.as_tensor(np.asarray(features, np.float32))
    weights = torch.as_tensor(np.asarray(fc_weight, np.float32))[torch.as_tensor(np.asarray(classes), dtype=torch.long)]
    return weighted_maps(weights, features, size).numpy()
