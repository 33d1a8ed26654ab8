"""cifar-cam: train, explain and use small-image classifiers, config-driven (Hydra).

The layout, top to bottom (a package imports only those below it): cli -> tasks -> serve -> inference ->
training, explain -> data, models -> config -> the leaves (errors, io, logs, provenance, viz).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["GradCAM", "Predictor", "load_model", "__version__"]


def __getattr__(name: str) -> Any:
    """`from cifar_cam import GradCAM, load_model` imports torch only then, so the CLI starts light
    (and a Ctrl-C while torch loads reaches the CLI's handler instead of printing a traceback)."""
    if name == "GradCAM":
        from cifar_cam.explain.cam import GradCAM

        return GradCAM
    if name == "Predictor":
        from cifar_cam.inference.predictor import Predictor

        return Predictor
    if name == "load_model":
        from cifar_cam.training.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'cifar_cam' has no attribute {name!r}")
