"""Grad-CAM of our own: hooks (hooks.py) and the CAM math (gradcam.py). Numbers only; viz.py draws."""

from cifar_cam.cam.gradcam import (
    METHODS,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from cifar_cam.cam.hooks import LayerHooks, hook_count, resolve_layers

__all__ = ["METHODS", "EigenCAM", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "LayerHooks", "ScoreCAM",
           "XGradCAM", "hook_count", "resolve_layers"]
