"""What every network of the zoo offers the rest of cifar-cam: a feature map, a head, its CAM layers.

A `Network` is an ordinary classifier (`forward(x) -> logits`) that also splits into
`forward_features(x)` (the last convolutional map, the one exported beside the logits) and
`forward_head(features)`; `get_classifier()` is its final linear layer (replaced for another class
count, read for CAM without PyTorch). Class attributes declare the rest:

- `cam_layers`: the default target layers of `gradcam` (module paths, e.g. ("layer3", "layer4"));
- `feature_layer`: the module whose output `forward_features` returns (Grad-CAM there is the CAM of
  the exported features);
- `stem`: the modules a small-input adaptation replaced (a pretrained file's tensors there are not
  loaded);
- `no_muon`: parameter-name prefixes that `optimizer=muon` leaves to SGD although they are filters.

Whether the head averages (so that the CAM of the exported features equals Grad-CAM at the feature
layer) is measured, not declared: `head_averages(model)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


class Network(nn.Module):
    """A classifier in two parts: `forward_features` then `forward_head` (see the module docstring)."""

    cam_layers: tuple[str, ...] = ()
    feature_layer: str = ""
    stem: tuple[str, ...] = ()
    no_muon: tuple[str, ...] = ()

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def get_classifier(self) -> nn.Linear:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def head_averages(model: Network, features: Tensor) -> bool:
    """Whether the head is global average pooling then the classifier (then the classifier's weights over the
    feature map are the CAM that Grad-CAM at the feature layer computes): checked on `features` (N, C, h, w)."""
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear) or features.ndim != 4 or fc.in_features != features.shape[1]:
        return False
    probe = torch.randn_like(features)
    with torch.no_grad():
        expected = fc(probe.mean(dim=(2, 3)))
        got = model.forward_head(probe)
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def probe_forward(model: nn.Module, image_size: tuple[int, int], hook: Callable[[nn.Module, Any, Any], None],
                  modules: Iterable[nn.Module]) -> None:
    """One forward pass of a zero image at `image_size`, in eval mode and without gradients, with `hook` as a forward
    hook on each of `modules` (what conv_flops and the stem adaptation measure); the model's mode is restored."""
    hooks = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def conv_flops(model: nn.Module, image_size: tuple[int, int]) -> float:
    """Multiply-adds of one forward pass at `image_size` (convolutions and linear layers; GFLOPs as papers count
    them, one multiply-add = 2 FLOPs), measured with forward hooks on a zero image."""
    total = 0.0

    def hook(module: nn.Module, _: Any, out: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += out.numel() / out.shape[0] * (module.in_channels // module.groups) * kh * kw
        else:
            total += out.numel() / out.shape[0] * module.in_features

    probe_forward(model, image_size, hook, (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))))
    return 2 * total
