#!/usr/bin/env python
"""CAM time per method: cifar-cam's GradCAM family against pytorch-grad-cam on the same model and images.

Both explain the predicted class of the same N normalized images at the same layers of a ResNet18
(CIFAR variant, --width channels, channels_last as the gradcam command runs it), and report the
median wall time of --repeats calls after one warm-up. Weights: --ckpt, or random (the time does
not depend on them). The maps are checked to agree before anything is timed.

    python scripts/bench_gradcam.py                       # width 64, 25 images, layer3 + layer4, every method
    python scripts/bench_gradcam.py --ckpt outputs/train/<run> --methods gradcam layercam
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


REFERENCE_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
                     "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
GRADIENT_FAMILY = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")  # one forward + one backward each


def main() -> None:
    """Parses the flags, checks that the maps agree, prints one line per method and implementation."""
    import pytorch_grad_cam

    from cifar_cam import GradCAM, load_model
    from cifar_cam.models import build_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a train run dir or .pt (default: random weights)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--images", type=int, default=25)
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    parser.add_argument("--methods", nargs="+", default=[*GRADIENT_FAMILY, "eigencam"], choices=list(REFERENCE_CLASSES))
    parser.add_argument("--scorecam-width", type=int, default=8,
                        help="ScoreCAM runs one forward per channel: timed on its own model of this width (0: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    def setup(width: int) -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = load_model(args.ckpt) if args.ckpt else build_model("resnet18", num_classes=10, width=width).eval()
        return model.to(memory_format=torch.channels_last), torch.randn(args.images, 3, 32, 32)

    def contenders(model: torch.nn.Module, images: torch.Tensor, method: str) -> tuple[Callable, Callable, float]:
        """Ours (a map per layer) and the reference (all layers in one call), and their largest map difference."""
        reference_cls = getattr(pytorch_grad_cam, REFERENCE_CLASSES[method])
        modules = [model.get_submodule(name) for name in args.layers]

        def ours() -> dict[str, torch.Tensor]:
            with GradCAM(model, args.layers, method=method) as cam:
                return cam(images)

        def reference_once() -> object:  # all layers in one call (one forward + full backward), averaged map
            with reference_cls(model=model, target_layers=modules) as cam:
                return cam(input_tensor=images, targets=None)

        diff = 0.0
        for name, module in zip(args.layers, modules, strict=True):  # checked layer by layer: the package averages
            with reference_cls(model=model, target_layers=[module]) as cam:
                ref = cam(input_tensor=images, targets=None)
            diff = max(diff, float((ours()[name] - torch.from_numpy(ref)).abs().max()))
        return ours, reference_once, diff

    model, images = setup(args.width)
    print(f"ResNet18 ({sum(p.numel() for p in model.parameters()):,} parameters), {args.images} images at "
          f"{', '.join(args.layers)}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    def forward() -> object:
        with torch.no_grad():
            return model(images)

    print(f"  forward pass alone (no_grad), for scale {median_seconds([forward], args.repeats)[0]:7.3f} s")
    print(f"  {'method':<10} {'cifar-cam':>10} {'pytorch-grad-cam (one call)':>28} {'ours / theirs':>14} "
          f"{'max |diff|':>11}")
    rows = [("", model, images, m) for m in args.methods if m != "scorecam"]
    if args.scorecam_width:
        small, small_images = setup(args.scorecam_width)
        rows.append((f" (width {args.scorecam_width})", small, small_images, "scorecam"))
    for note, m, x, method in rows:
        ours, theirs, diff = contenders(m, x, method)
        t_ours, t_theirs = median_seconds([ours, theirs], args.repeats if method != "scorecam" else 1)
        print(f"  {method + note:<10} {t_ours:9.3f}s {t_theirs:27.3f}s {t_ours / t_theirs:13.2f}x {diff:11.1e}")


if __name__ == "__main__":
    main()
