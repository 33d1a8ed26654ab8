#!/usr/bin/env python
"""Grad-CAM step time: cifar-cam's GradCAM against pytorch-grad-cam on the same model and images.

Both explain the predicted class of the same N normalized images at the same layers of a ResNet18
(CIFAR variant, --width channels, channels_last as the gradcam command runs it), and report the
median wall time of --repeats calls after one warm-up. Weights: --ckpt, or random (the time does
not depend on them). The maps are checked to agree before anything is timed.

    python scripts/bench_gradcam.py                       # width 64, 25 images, layer3 + layer4
    python scripts/bench_gradcam.py --ckpt outputs/train/<run> --method gradcam++
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function over `repeats` rounds, after one warm-up call each.

    The functions take turns within each round, so load from other processes hits all of them alike.
    """
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            started = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - started)
    return [statistics.median(bucket) for bucket in times]


def main() -> None:
    """Parses the flags, checks that the maps agree, prints one line per implementation."""
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam import GradCAMPlusPlus as ReferenceGradCAMPlusPlus

    from cifar_cam import GradCAM, load_model
    from cifar_cam.models import build_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a train run dir or .pt (default: random weights)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    parser.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.ckpt) if args.ckpt else build_model("resnet18", num_classes=10, width=args.width).eval()
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(args.images, 3, 32, 32)
    reference_cls = ReferenceGradCAM if args.method == "gradcam" else ReferenceGradCAMPlusPlus
    modules = [model.get_submodule(name) for name in args.layers]

    def ours() -> dict[str, torch.Tensor]:
        with GradCAM(model, args.layers, method=args.method) as cam:
            return cam(images)

    def reference() -> list:
        maps = []
        for module in modules:  # one layer per call: the package averages several layers into one map
            with reference_cls(model=model, target_layers=[module]) as cam:
                maps.append(cam(input_tensor=images, targets=None))
        return maps

    def reference_once() -> object:  # all layers in one call (one forward + full backward), averaged map
        with reference_cls(model=model, target_layers=modules) as cam:
            return cam(input_tensor=images, targets=None)

    ours_maps, reference_maps = ours(), reference()
    diff = max(float((ours_maps[name] - torch.from_numpy(ref)).abs().max())
               for name, ref in zip(args.layers, reference_maps, strict=True))
    print(f"ResNet18 ({sum(p.numel() for p in model.parameters()):,} parameters), {args.images} images, "
          f"{args.method} at {', '.join(args.layers)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"max |ours - pytorch-grad-cam| = {diff:.1e}")
    def forward() -> object:
        with torch.no_grad():
            return model(images)

    t_forward, t_ours, t_once, t_ref = median_seconds([forward, ours, reference_once, reference], args.repeats)
    print(f"  forward pass alone (no_grad), for scale                      {t_forward:6.3f} s")
    print(f"  cifar-cam GradCAM (one forward, autograd.grad to the layers)  {t_ours:6.3f} s")
    print(f"  pytorch-grad-cam, all layers in one call (one averaged map)  {t_once:6.3f} s  ({t_once / t_ours:.1f}x)")
    print(f"  pytorch-grad-cam, one call per layer (a map per layer)       {t_ref:6.3f} s  ({t_ref / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
