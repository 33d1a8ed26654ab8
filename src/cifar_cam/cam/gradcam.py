"""Grad-CAM and Grad-CAM++: numbers only (drawing lives in viz.py).

One forward and one backward pass per batch. The backward is `torch.autograd.grad` with
respect to the hooked activations only, so autograd stops at the earliest target layer and
never computes a weight gradient (far cheaper than a full `loss.backward()`).

The normalization matches pytorch-grad-cam (our reference in tests/test_cam.py): ReLU,
min-max per image at the layer's resolution, bilinear upsampling to the input size
(align_corners=False, what its cv2.resize does), then min-max again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifar_cam.cam.hooks import LayerHooks, resolve_layers
from cifar_cam.errors import ConfigError

DEFAULT_LAYERS = ("layer3", "layer4")
EPS_SCALE = 1e-7  # pytorch-grad-cam's scale_cam_image: x / (1e-7 + max)


def min_max(maps: Tensor) -> Tensor:
    """Scales each (H, W) map of an (N, H, W) batch to [0, 1] (all-zero maps stay zero)."""
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / (EPS_SCALE + maps.amax(dim=(1, 2), keepdim=True))


def weighted_maps(weights: Tensor, activations: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C) channel weights x (N, C, h, w) activations -> (N, H, W) maps in [0, 1] at `size`: ReLU,
    min-max, bilinear upsampling, min-max (also the CAM of a deployed model: deploy.cam_from_features)."""
    cam = torch.relu((weights[:, :, None, None] * activations).sum(dim=1))
    cam = F.interpolate(min_max(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return min_max(cam)


class GradCAM:
    """Grad-CAM heatmaps for target layers: `with GradCAM(model, ["layer3", "layer4"]) as cam: cam(images)`.

    `method="gradcam++"` gives a GradCAMPlusPlus; the methods differ only in `channel_weights`.
    """

    method: ClassVar[str] = "gradcam"

    def __new__(cls, model: nn.Module, target_layers: Sequence[str] = DEFAULT_LAYERS,
                method: str | None = None) -> GradCAM:
        chosen = cls if method is None else METHODS.get(method)
        if chosen is None:
            raise ConfigError(f"Grad-CAM method {method!r} is not one of {list(METHODS)}")
        if not issubclass(chosen, cls):
            raise ConfigError(f"{cls.__name__} cannot compute method {method!r}; use GradCAM(..., method={method!r})")
        return super().__new__(chosen)

    def __init__(self, model: nn.Module, target_layers: Sequence[str] = DEFAULT_LAYERS,
                 method: str | None = None) -> None:
        self.model = model
        self.target_layers = list(resolve_layers(model, target_layers))  # unknown names fail here, not mid-call
        self._hooks: LayerHooks | None = None

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """One weight per channel (N, C): Grad-CAM's spatial mean of the gradients."""
        return gradients.mean(dim=(2, 3))

    def layer_maps(self, activations: Tensor, gradients: Tensor, size: tuple[int, int]) -> Tensor:
        """(N, C, h, w) activations and gradients -> (N, H, W) maps in [0, 1] at the input size."""
        return weighted_maps(self.channel_weights(activations, gradients), activations, size)

    def __call__(self, images: Tensor, targets: Tensor | Sequence[int] | None = None) -> dict[str, Tensor]:
        """Maps {layer: (N, H, W) float32 CPU tensor in [0, 1]} for normalized (N, 3, H, W) images.

        targets=None explains each image's predicted class; otherwise one class index per image.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be a normalized (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else images.device
        was_training = self.model.training
        self.model.eval()  # BatchNorm with running statistics: images do not influence each other
        try:
            with torch.inference_mode(False), torch.enable_grad(), LayerHooks(self.model, self.target_layers) as hooks:
                self._hooks = hooks
                # A fresh leaf that requires grad: works under inference_mode and with frozen weights;
                # autograd.grad below never reaches it, so this costs nothing.
                x = images.detach().to(device).clone().float().requires_grad_(True)
                logits = self.model(x)
                activations = hooks.checked_outputs()
                classes = logits.argmax(dim=1) if targets is None else self._targets(targets, logits)
                score = logits.gather(1, classes[:, None]).sum()  # images are independent: one backward for all
                gradients = torch.autograd.grad(score, list(activations.values()))
            size = (images.shape[-2], images.shape[-1])
            with torch.no_grad():
                return {name: self.layer_maps(a.detach().float(), g.float(), size).cpu()
                        for (name, a), g in zip(activations.items(), gradients, strict=True)}
        finally:
            self._hooks = None
            self.model.train(was_training)

    @staticmethod
    def _targets(targets: Tensor | Sequence[int], logits: Tensor) -> Tensor:
        classes = torch.as_tensor(targets, dtype=torch.long, device=logits.device).flatten()
        n, num_classes = logits.shape
        if len(classes) != n:
            raise ValueError(f"targets has {len(classes)} entries for {n} images; give one class per image")
        if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            raise ValueError(f"targets must be class indices in [0, {num_classes - 1}], got {classes.tolist()}")
        return classes

    def release(self) -> None:
        """Removes any hook still in place (hooks live only inside a call; this is the safety net)."""
        if self._hooks is not None:
            self._hooks.release()
            self._hooks = None

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # returns None: exceptions propagate


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018) with pytorch-grad-cam's weights."""

    method: ClassVar[str] = "gradcam++"

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """alpha = g^2 / (2 g^2 + sum_hw(A) g^3 + 1e-6) (0 where g = 0); w = sum_hw(alpha relu(g))."""
        g2 = gradients.pow(2)
        g3 = g2 * gradients
        sum_activations = activations.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_activations * g3 + 1e-6)
        alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
        return (alpha * gradients.clamp(min=0)).sum(dim=(2, 3))


METHODS: dict[str, type[GradCAM]] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
