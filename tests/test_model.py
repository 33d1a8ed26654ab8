"""ResNet18, CIFAR variant."""

from __future__ import annotations

import pytest
import torch

from cifar_cam.models import build_model, resnet18


def test_parameter_count_matches_reference() -> None:
    assert sum(p.numel() for p in resnet18().parameters()) == 11_173_962


def test_cifar_stem_keeps_resolution_and_layers_are_named() -> None:
    model = resnet18(num_classes=10, width=8).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, o.shape[-1]))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert sizes == {"layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4}


@pytest.mark.parametrize(("width", "classes"), [(16, 10), (8, 3)])
def test_width_and_classes(width: int, classes: int) -> None:
    model = build_model("resnet18", num_classes=classes, width=width)
    assert model.fc.out_features == classes and model.conv1.out_channels == width
    assert model.layer4[-1].conv2.out_channels == 8 * width


def test_unknown_model_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", num_classes=10)

