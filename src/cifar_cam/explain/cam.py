"""The CAM family: Grad-CAM, Grad-CAM++, HiResCAM, XGradCAM, LayerCAM, EigenCAM, ScoreCAM (numbers only;
drawing lives in viz.py).

One forward and one backward pass per batch. The backward is `torch.autograd.grad` with
respect to the hooked activations only, so autograd stops at the earliest target layer and
never computes a weight gradient (far cheaper than a full `loss.backward()`). EigenCAM and
ScoreCAM use no gradients and skip it; ScoreCAM adds one forward per (image, channel), batched.

Every method equals pytorch-grad-cam 1.5.7 (our reference, tests/test_cam*.py); each class says
which of its conventions it follows. The normalization is the library's: ReLU, min-max per image
at the layer's resolution, bilinear upsampling to the input size (align_corners=False, what its
cv2.resize does), then min-max again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifar_cam.errors import ConfigError
from cifar_cam.explain.hooks import LayerHooks, resolve_layers

DEFAULT_LAYERS = ("layer3", "layer4")  # the ResNets'; a Network's own are model.cam_layers
EPS_SCALE = 1e-7  # pytorch-grad-cam's scale_cam_image: x / (1e-7 + max)
# pytorch-grad-cam's default test-time augmentations for aug_smooth (BaseCAM.__init__, via ttach):
# every combination of a horizontal flip (off, on) and a multiplier of the normalized input.
AUG_FLIPS = (False, True)
AUG_FACTORS = (0.9, 1.0, 1.1)


def min_max(maps: Tensor) -> Tensor:
    """Scales each (H, W) map of an (N, H, W) batch to [0, 1] (all-zero maps stay zero)."""
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / (EPS_SCALE + maps.amax(dim=(1, 2), keepdim=True))


def normalized_maps(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h, w) raw maps -> (N, H, W) maps in [0, 1] at `size`: ReLU, min-max, bilinear upsampling, min-max."""
    cam = torch.relu(cam)
    cam = F.interpolate(min_max(cam)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return min_max(cam)


def weighted_maps(weights: Tensor, activations: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C) channel weights x (N, C, h, w) activations -> (N, H, W) maps in [0, 1] at `size`
    (also the CAM of a deployed model: deploy.cam_from_features)."""
    return normalized_maps((weights[:, :, None, None] * activations).sum(dim=1), size)


def first_principal_component(features: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h, w): each image's centred C-dim feature vectors (one per position)
    projected on their first right singular vector (pytorch-grad-cam's get_2d_projection).

    The singular vector's sign is arbitrary, and the map after ReLU depends on it. We match the
    reference's sign exactly by running the same `np.linalg.svd` (LAPACK gesdd) on the same float32
    matrices on the CPU: torch's SVD picks the other sign for about a third of random inputs.
    NaNs become 0 as in the reference. (`full_matrices=False` gives bit-identical V to its
    full_matrices=True without the (hw x hw) U.)
    """
    x = features.detach().float().cpu().numpy().copy()
    x[np.isnan(x)] = 0
    n, c, h, w = x.shape
    rows = x.reshape(n, c, h * w).transpose(0, 2, 1)  # (N, positions, channels)
    rows = rows - rows.mean(axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    projection = (rows @ vt[:, 0, :, None])[..., 0]
    return torch.from_numpy(np.ascontiguousarray(projection, dtype=np.float32)).reshape(n, h, w).to(features.device)


class GradCAM:
    """Grad-CAM heatmaps for target layers: `with GradCAM(model, ["layer3", "layer4"]) as cam: cam(images)`.

    `method=` picks a class from METHODS (`GradCAM(model, layers, method="layercam")` is a LayerCAM).
    A weighting method overrides `channel_weights`; one that is not "weights x activations"
    overrides `layer_cam`, the raw (N, h, w) map of one layer before ReLU and normalization.

    `eigen_smooth=True`: the reference's eigen smoothing. The map is the first principal component
    of the per-channel terms (weights x activations, or the elementwise products of HiResCAM and
    LayerCAM) instead of their sum over channels; sign as `first_principal_component`.
    `aug_smooth=True`: the reference's test-time augmentation. The mean of the normalized maps of
    the 6 inputs {no flip, horizontal flip} x {0.9, 1.0, 1.1} times the normalized image, each map
    flipped back; targets=None explains each augmented input's own predicted class, as the
    reference does. The mean is not rescaled (its maximum can be below 1).
    """

    method: ClassVar[str] = "gradcam"
    uses_gradients: ClassVar[bool] = True

    def __new__(cls, model: nn.Module, target_layers: Sequence[str] = DEFAULT_LAYERS,
                method: str | None = None, *, aug_smooth: bool = False, eigen_smooth: bool = False) -> GradCAM:
        chosen = cls if method is None else METHODS.get(method)
        if chosen is None:
            raise ConfigError(f"Grad-CAM method {method!r} is not one of {list(METHODS)}")
        if not issubclass(chosen, cls):
            raise ConfigError(f"{cls.__name__} cannot compute method {method!r}; use GradCAM(..., method={method!r})")
        return super().__new__(chosen)

    def __init__(self, model: nn.Module, target_layers: Sequence[str] = DEFAULT_LAYERS,
                 method: str | None = None, *, aug_smooth: bool = False, eigen_smooth: bool = False) -> None:
        self.model = model
        self.target_layers = list(resolve_layers(model, target_layers))  # unknown names fail here, not mid-call
        self.aug_smooth = bool(aug_smooth)
        self.eigen_smooth = bool(eigen_smooth)
        self._hooks: LayerHooks | None = None

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """One weight per channel (N, C): Grad-CAM's spatial mean of the gradients."""
        return gradients.mean(dim=(2, 3))

    def combine(self, terms: Tensor) -> Tensor:
        """(N, C, h, w) per-channel terms -> (N, h, w): their sum, or their first principal component."""
        return first_principal_component(terms) if self.eigen_smooth else terms.sum(dim=1)

    def layer_cam(self, activations: Tensor, gradients: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        """The (N, h, w) map of one layer before ReLU and normalization: channel weights x activations."""
        assert gradients is not None
        return self.combine(self.channel_weights(activations, gradients)[:, :, None, None] * activations)

    def __call__(self, images: Tensor, targets: Tensor | Sequence[int] | None = None) -> dict[str, Tensor]:
        """Maps {layer: (N, H, W) float32 CPU tensor in [0, 1]} for normalized (N, 3, H, W) images.

        targets=None explains each image's predicted class; otherwise one class index per image.
        """
        if images.dim() != 4:
            raise ValueError(f"images must be a normalized (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        if not self.aug_smooth:
            return self._maps(images, targets)
        n = images.shape[0]
        if targets is not None:
            targets = torch.as_tensor(targets, dtype=torch.long).flatten()
            if len(targets) != n:
                raise ValueError(f"targets has {len(targets)} entries for {n} images; give one class per image")
        augmentations = [(flip, factor) for flip in AUG_FLIPS for factor in AUG_FACTORS]
        # All augmented copies in one batch: BatchNorm runs in eval mode, so images stay independent.
        batch = torch.cat([(images.flip(-1) if flip else images) * factor for flip, factor in augmentations])
        maps = self._maps(batch, None if targets is None else targets.repeat(len(augmentations)))
        smoothed = {}
        for name, layer_maps in maps.items():
            per_augmentation = layer_maps.reshape(len(augmentations), n, *layer_maps.shape[1:])
            restored = [m.flip(-1) if flip else m for m, (flip, _) in zip(per_augmentation, augmentations, strict=True)]
            smoothed[name] = torch.stack(restored).mean(dim=0)
        return smoothed

    def _maps(self, images: Tensor, targets: Tensor | Sequence[int] | None) -> dict[str, Tensor]:
        """One forward (and backward when the method uses gradients), then each layer's normalized map."""
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else images.device
        was_training = self.model.training
        self.model.eval()  # BatchNorm with running statistics: images do not influence each other
        try:
            with (torch.inference_mode(False), torch.set_grad_enabled(self.uses_gradients),
                  LayerHooks(self.model, self.target_layers) as hooks):
                self._hooks = hooks
                # A fresh leaf that requires grad: works under inference_mode and with frozen weights;
                # autograd.grad below never reaches it, so this costs nothing.
                x = images.detach().to(device).clone().float().requires_grad_(self.uses_gradients)
                logits = self.model(x)
                activations = hooks.checked_outputs()
                classes = logits.argmax(dim=1) if targets is None else self._targets(targets, logits)
                if self.uses_gradients:
                    score = logits.gather(1, classes[:, None]).sum()  # images are independent: one backward for all
                    gradients: Sequence[Tensor | None] = torch.autograd.grad(score, list(activations.values()))
                else:
                    gradients = [None] * len(activations)
            size = (images.shape[-2], images.shape[-1])
            with torch.no_grad():  # hooks are gone: ScoreCAM's extra forwards are not recorded
                x = x.detach()
                return {name: normalized_maps(self.layer_cam(a.detach().float(), None if g is None else g.float(),
                                                             x, classes), size).cpu()
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


class HiResCAM(GradCAM):
    """HiResCAM (Draelos & Carin 2020): sum over channels of gradients x activations, position by position.

    As pytorch-grad-cam: no channel weights; eigen_smooth takes the principal component of the
    elementwise products (the reference warns that this voids HiResCAM's faithfulness guarantee).
    """

    method: ClassVar[str] = "hirescam"

    def layer_cam(self, activations: Tensor, gradients: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        """sum_c g * A."""
        assert gradients is not None
        return self.combine(gradients * activations)


class XGradCAM(GradCAM):
    """XGrad-CAM (Fu et al. 2020) with pytorch-grad-cam's weights: w = sum_hw(g * A) / (sum_hw(A) + 1e-7)."""

    method: ClassVar[str] = "xgradcam"

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """sum_hw(g A / (sum_hw(A) + 1e-7)): the division inside the sum, as the reference."""
        sum_activations = activations.sum(dim=(2, 3), keepdim=True)
        return (gradients * activations / (sum_activations + 1e-7)).sum(dim=(2, 3))


class LayerCAM(GradCAM):
    """LayerCAM (Jiang et al. 2021): sum over channels of relu(gradients) x activations, position by position.

    As pytorch-grad-cam: no extra scaling of shallow layers; eigen_smooth takes the principal
    component of the elementwise products.
    """

    method: ClassVar[str] = "layercam"

    def layer_cam(self, activations: Tensor, gradients: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        """sum_c relu(g) * A."""
        assert gradients is not None
        return self.combine(gradients.clamp(min=0) * activations)


class EigenCAM(GradCAM):
    """EigenCAM (Muhammad & Yeasin 2020): the first principal component of the activations; class-agnostic.

    As pytorch-grad-cam: activations centred per channel over the positions, projected on the first
    right singular vector of numpy's SVD, whose sign we match exactly (see first_principal_component;
    tests compare with the sign as is, not up to sign). No backward pass; targets are ignored
    beyond validation; eigen_smooth changes nothing.
    """

    method: ClassVar[str] = "eigencam"
    uses_gradients: ClassVar[bool] = False

    def layer_cam(self, activations: Tensor, gradients: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        """The activations' first principal component."""
        return first_principal_component(activations)


class ScoreCAM(GradCAM):
    """Score-CAM (Wang et al. 2020) with pytorch-grad-cam's conventions; no gradients.

    Each activation channel is upsampled to the input size with bilinear align_corners=True (the
    reference's nn.UpsamplingBilinear2d, unlike the final maps), scaled to [0, 1] per channel by
    (m - min) / (max - min + 1e-8), and multiplies the normalized input; the channel's weight is
    the softmax over channels of the target class's logit (not its probability) on that masked
    input. One forward per (image, channel), `mask_batch_size` masked inputs per forward.
    """

    method: ClassVar[str] = "scorecam"
    uses_gradients: ClassVar[bool] = False
    mask_batch_size: ClassVar[int] = 256

    def channel_weights_from_scores(self, activations: Tensor, images: Tensor, classes: Tensor) -> Tensor:
        """(N, C) softmax over channels of the target logit on each channel-masked image."""
        n, c = activations.shape[:2]
        maps = activations.flatten(0, 1)[:, None]  # (N*C, 1, h, w), image-major
        image_of = torch.arange(n, device=images.device).repeat_interleave(c)
        scores = []
        for start in range(0, n * c, self.mask_batch_size):  # masks made per batch: N*C full-size ones add up
            batch = slice(start, start + self.mask_batch_size)
            masks = F.interpolate(maps[batch], size=images.shape[-2:], mode="bilinear", align_corners=True)
            low, high = masks.amin(dim=(2, 3), keepdim=True), masks.amax(dim=(2, 3), keepdim=True)
            which = image_of[batch]
            logits = self.model(images[which] * ((masks - low) / (high - low + 1e-8)))
            scores.append(logits.gather(1, classes[which, None])[:, 0])
        return torch.cat(scores).reshape(n, c).float().softmax(dim=1)

    def layer_cam(self, activations: Tensor, gradients: Tensor | None, images: Tensor, classes: Tensor) -> Tensor:
        """Score weights x activations."""
        weights = self.channel_weights_from_scores(activations, images, classes)
        return self.combine(weights[:, :, None, None] * activations)


METHODS: dict[str, type[GradCAM]] = {cam.method: cam for cam in (
    GradCAM, GradCAMPlusPlus, HiResCAM, XGradCAM, LayerCAM, EigenCAM, ScoreCAM)}
