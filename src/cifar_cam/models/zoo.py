"""The zoo: every architecture by name, and how a `model` config section becomes a network.

`model.source` says where the architecture comes from: cifar_cam (ours, `model.name` one of
ARCHITECTURES), timm or torchvision (`model.name` any classification model of that library). The other
keys of the section are the builder's options (width, depth, widen, widths, small_input, ...); META_KEYS
are read by the rest of cifar-cam, not the builder.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from cifar_cam.models.airbench import airbench
from cifar_cam.models.base import Network
from cifar_cam.models.external import SMALL_BELOW, TimmNet, TorchvisionNet
from cifar_cam.models.preact_resnet import preact_resnet18
from cifar_cam.models.resnet import resnet18, resnet34, resnet50
from cifar_cam.models.resnet9 import resnet9
from cifar_cam.models.wide_resnet import wide_resnet

log = logging.getLogger("cifar_cam.models")

ARCHITECTURES: dict[str, Callable[..., Network]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "preact_resnet18": preact_resnet18,
    "wide_resnet": wide_resnet,
    "resnet9": resnet9,
    "airbench": airbench,
}
LIBRARIES = {"timm": TimmNet, "torchvision": TorchvisionNet}
META_KEYS = ("name", "source", "cam_layers", "pretrained", "freeze")


def takes(name: str, source: str = "cifar_cam") -> list[str]:
    """The options (model.* keys) the builder of `name` takes."""
    if source in LIBRARIES:
        return ["small_input"]
    builder = ARCHITECTURES[name]
    return [p for p in inspect.signature(builder).parameters if p != "num_classes"]


def small_input_of(value: Any, image_size: tuple[int, int]) -> bool:
    """model.small_input: true, false, or auto (true when the shorter side is under SMALL_BELOW px)."""
    if value in (None, "auto"):
        return min(image_size) < SMALL_BELOW
    return bool(value)


def build_model(name: str, num_classes: int, width: int | None = None, *, source: str = "cifar_cam",
                image_size: tuple[int, int] = (32, 32), cam_layers: Any = None, **options: Any) -> Network:
    """The network `name` of `source` for `num_classes` classes; ValueError (one line) for a name or an option
    it does not have. `cam_layers` (a list, or None / 'auto': the architecture's own) sets its default CAM
    layers."""
    if width is not None:
        options["width"] = width
    image_size = (int(image_size[0]), int(image_size[1]))
    if source in LIBRARIES:
        extra = sorted(set(options) - {"small_input"})
        if extra:
            raise ValueError(f"model={source} does not take model.{extra[0]} (it takes model.name, "
                             "model.small_input)")
        small = small_input_of(options.get("small_input"), image_size)
        model = LIBRARIES[source](name, num_classes, image_size, small)
        if model.stem:
            log.info("model: %s %s with its stem adapted to %dx%d inputs (model.small_input): %s replaced by a 3x3 "
                     "stride-1 convolution%s", source, name, *image_size, model.stem[0],
                     f", {', '.join(model.stem[1:])} removed" if len(model.stem) > 1 else "")
    elif source == "cifar_cam":
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}, or model=timm / "
                             "model=torchvision with model.name=<any of theirs>")
        allowed = takes(name)
        extra = sorted(set(options) - set(allowed))
        if extra:
            raise ValueError(f"model={name} does not take model.{extra[0]} (it takes "
                             f"{', '.join('model.' + k for k in allowed) or 'no options'})")
        model = ARCHITECTURES[name](num_classes=num_classes, **options)
    else:
        raise ValueError(f"model.source={source!r} is not one of cifar_cam, {', '.join(LIBRARIES)}")
    if cam_layers not in (None, "auto"):
        model.cam_layers = tuple(str(c) for c in cam_layers)
    return model


def model_options(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The builder's keyword arguments in a `model` config section (everything but META_KEYS)."""
    return {k: (list(v) if isinstance(v, list | tuple) or type(v).__name__ == "ListConfig" else v)
            for k, v in model_cfg.items() if k not in META_KEYS}


def model_from_config(model_cfg: Mapping[str, Any], num_classes: int, image_size: tuple[int, int]) -> Network:
    """The network a `model` config section (or a checkpoint's stored one) describes."""
    return build_model(str(model_cfg.get("name", "resnet18")), num_classes,
                       source=str(model_cfg.get("source") or "cifar_cam"), image_size=image_size,
                       cam_layers=model_cfg.get("cam_layers"), **model_options(model_cfg))


def describe_model(model_cfg: Mapping[str, Any]) -> str:
    """'resnet18 width 16', 'wide_resnet depth 16 widen 8', 'timm convnext_nano': for logs and titles."""
    name, source = str(model_cfg.get("name", "resnet18")), str(model_cfg.get("source") or "cifar_cam")
    shown = [f"{k} {v}" for k, v in model_options(model_cfg).items() if k != "small_input" and v is not None]
    return " ".join([*([source] if source != "cifar_cam" else []), name, *shown])
