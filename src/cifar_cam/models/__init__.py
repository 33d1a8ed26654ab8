"""The networks: the zoo by name (`build_model`, `model_from_config`) and what each declares (`Network`).
Imports the leaves only."""

from cifar_cam.models.base import Network, conv_flops, count_parameters, head_averages
from cifar_cam.models.resnet import ResNet, resnet18
from cifar_cam.models.zoo import (
    ARCHITECTURES,
    LIBRARIES,
    META_KEYS,
    build_model,
    describe_model,
    model_from_config,
    model_options,
    takes,
)

MODELS = ARCHITECTURES  # the name the package exported before the zoo

__all__ = ["ARCHITECTURES", "LIBRARIES", "META_KEYS", "MODELS", "Network", "ResNet", "build_model", "conv_flops",
           "count_parameters", "describe_model", "head_averages", "model_from_config", "model_options", "resnet18",
           "takes"]
