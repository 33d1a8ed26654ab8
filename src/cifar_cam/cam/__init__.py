"""Grad-CAM of our own: hooks (hooks.py) and the CAM math (gradcam.py). Numbers only; viz.py draws."""

from cifar_cam.cam.gradcam import METHODS, GradCAM, GradCAMPlusPlus
from cifar_cam.cam.hooks import LayerHooks, hook_count, resolve_layers

__all__ = ["METHODS", "GradCAM", "GradCAMPlusPlus", "LayerHooks", "hook_count", "resolve_layers"]
