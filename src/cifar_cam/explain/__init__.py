"""Explaining a model: CAM hooks and the seven CAM methods (numbers only; viz draws), faithfulness scores and
calibration. Imports config, data, models and the leaves."""

from cifar_cam.explain.cam import METHODS, EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from cifar_cam.explain.hooks import LayerHooks, hook_count, resolve_layers

__all__ = ["METHODS", "EigenCAM", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "LayerHooks", "ScoreCAM",
           "XGradCAM", "hook_count", "resolve_layers"]
