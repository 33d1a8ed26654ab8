#!/usr/bin/env python
"""Every zoo model's size and training speed on this machine: parameters, GFLOPs an image (multiply-adds x 2 at
the input size) and the training ceiling (forward + backward + SGD step on one resident random batch, with
cifar-cam's defaults: channels_last, precision auto = bf16 on CPUs with AMX, no compile). The model table of
docs/benchmarks.md (section 12) takes these columns beside each model's 15-minute test accuracy.

Each model is built from its own YAML (conf/model/<name>.yaml, plus the overrides below), exactly as `train`
builds it. The models run in rounds (--repeat), one after another, and the img/s printed is each model's best
round: a shared machine drifts from minute to minute.

    python scripts/bench_models.py                           # the whole zoo at 32 px, batch 128
    python scripts/bench_models.py --models resnet18 airbench --steps 3
    python scripts/bench_models.py --quick                   # seconds: every model runs, nothing is measured
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import ceiling  # noqa: E402

from cifar_cam.models import conv_flops, count_parameters, model_from_config  # noqa: E402
from cifar_cam.training.device import precision_name, resolve_precision  # noqa: E402

# (label, conf/model/<file>, overrides): the rows of the table
ZOO = [
    ("airbench", "airbench", {}),
    ("resnet18 width 16", "resnet18", {"width": 16}),
    ("resnet18", "resnet18", {}),
    ("resnet9", "resnet9", {}),
    ("preact_resnet18", "preact_resnet18", {}),
    ("resnet34", "resnet34", {}),
    ("resnet50", "resnet50", {}),
    ("wrn16_8", "wrn16_8", {}),
    ("wrn28_10", "wrn28_10", {}),
    ("timm resnet10t", "timm", {"name": "resnet10t"}),
    ("torchvision mobilenet_v3_small", "torchvision", {"name": "mobilenet_v3_small"}),
]


def model_cfg(file: str, overrides: dict) -> dict:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{file}.yaml")
    return {**OmegaConf.to_container(cfg, resolve=True), **overrides}


def images_per_second(model: nn.Module, batch_size: int, steps: int, side: int, dtype: torch.dtype | None) -> float:
    """Training ceiling (bench.py's): `steps` timed fwd + bwd + SGD steps on one resident batch, after two untimed."""
    run = ceiling(model.to(memory_format=torch.channels_last), batch_size, steps, 2, torch.device("cpu"), dtype,
                  torch.channels_last, side)
    t0 = time.perf_counter()
    images = run()
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="labels or conf/model names to run (default: the whole zoo)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps a round")
    p.add_argument("--repeat", type=int, default=2, help="rounds; each model's best round is printed")
    p.add_argument("--side", type=int, default=32, help="image side in px")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="batch 4, one step, one round: checks that every model runs")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeat = 4, 1, 1
    rows = [r for r in ZOO if not args.models or r[0] in args.models or r[1] in args.models]
    if not rows:
        p.error(f"no model matches {args.models}; choose from: {', '.join(r[0] for r in ZOO)}")
    dtype = resolve_precision(args.precision, torch.device("cpu"))
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, "
          f"{precision_name(dtype)}, channels_last, batch {args.batch_size}, {args.side} px, "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    torch.manual_seed(0)
    models = {label: model_from_config(model_cfg(file, over), 10, (args.side, args.side)) for label, file, over in rows}
    results = {label: {"params": count_parameters(m), "gflops": conv_flops(m, (args.side, args.side)) / 1e9,
                       "img_s": 0.0} for label, m in models.items()}
    for _ in range(args.repeat):
        for label, m in models.items():
            speed = images_per_second(m, args.batch_size, args.steps, args.side, dtype)
            results[label]["img_s"] = max(results[label]["img_s"], speed)
    print("\n| model | parameters | GFLOPs an image | train img/s |\n|---|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['params'] / 1e6:.2f}M | {r['gflops']:.2f} | {r['img_s']:,.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
