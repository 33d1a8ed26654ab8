"""The networks, built by name (`build_model`). Imports config and the leaves."""

from cifar_cam.models.resnet import MODELS, ResNet, build_model, resnet18

__all__ = ["MODELS", "ResNet", "build_model", "resnet18"]
