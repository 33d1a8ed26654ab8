"""cifar-cam: a config-driven experiment runner for CIFAR-10 (ResNet18, Grad-CAM, LR finder)."""

from cifar_cam.cam import GradCAM
from cifar_cam.checkpoint import load_model

__version__ = "0.1.0"
__all__ = ["GradCAM", "load_model", "__version__"]
