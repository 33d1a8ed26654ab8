"""cifar-cam: train, explain and use small-image classifiers, config-driven (Hydra).

The layout, top to bottom (a package imports only those below it): cli -> tasks -> serve -> inference ->
training, explain -> data, models -> config -> the leaves (errors, io, logs, provenance, viz).
"""

from __future__ import annotations

import os
from typing import Any

# No command opens a connection the user did not ask for. These are read when the library is imported, so they
# go first (anything of cifar_cam imports this module before itself): albumentations asks PyPI for a newer
# version of itself (DNS + HTTPS, up to 2 s) unless told not to; onnxruntime (1.32's Linux build) sends usage
# events to Microsoft from a native thread after its import; model hubs stay offline (model.pretrained is always
# a local file); MLflow and the hub send no usage data. A value the user set is kept.
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
for _name, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

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
