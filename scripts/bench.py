#!/usr/bin/env python
"""Training throughput on this machine: the ceiling, cifar-cam's real epoch, and the reference loop.

All three run in one process, on the same model (ResNet18 at --width) and --batch-size:

  (a) ceiling    forward + backward + SGD step on resident random tensors: no data pipeline at all
  (b) cifar-cam  engine.train_one_epoch over augment.build_train_batches, once per aug.backend,
                 with cifar-cam's defaults (channels_last, torch.compile unless --no-compile,
                 precision auto: bf16 on CUDA and on CPUs with AMX, else fp32) and the --preset recipe from conf/aug/
  (c) reference  the loop of the original project: a map-style Dataset applying albumentations per
                 sample (the same recipe plus Normalize + ToTensorV2) in a DataLoader with workers,
                 fp32, NCHW, no compile, `.item()` every step

(a) shares (b)'s settings, so b/a is what the data path and the loop cost; b/c is the speed-up over
the original way of training. The parts run in rounds (--repeat), back to back, in alternating order
(a b c, then c b a, ...), and each ratio is the median over rounds of the ratio within one round: a
machine whose speed drifts from minute to minute (shared VMs do, by 30%) slows both sides of a
ratio alike. The img/s printed for each part is its best round. Images are synthetic
(make_synthetic): throughput does not depend on their content, and JPEG decoding happens once,
before training, in both projects.

    python scripts/bench.py --device cpu --json bench.json
    python scripts/bench.py --quick          # seconds: checks that every path runs, measures nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import torch
from albumentations.pytorch import ToTensorV2
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cifar_cam.config.choices import BACKENDS, PRESETS
from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD, ImageArrays
from cifar_cam.data.augment import build_train_batches, build_train_transform
from cifar_cam.data.batches import resolve_num_workers
from cifar_cam.data.sources import make_synthetic
from cifar_cam.io import config_dir, write_json
from cifar_cam.models import build_model
from cifar_cam.training.device import autocast, precision_name, resolve_precision
from cifar_cam.training.engine import train_one_epoch

NUM_CLASSES = 10


def sync(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """The device in words: GPU name, or CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, {torch.get_num_threads()} torch threads"


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """cifar-cam's default optimizer (conf/optimizer/sgd.yaml), also used by the reference."""
    cfg = OmegaConf.load(Path(config_dir()) / "optimizer" / "sgd.yaml")
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


Run = Callable[[], int]  # one timed run of a part: trains, returns the number of images it trained on


def interleaved(parts: dict[str, Run], device: torch.device, repeat: int) -> dict[str, list[float]]:
    """Images per second of each part in each of `repeat` rounds; odd rounds run the parts in reverse order.

    Running every part once per round, with the order reversed every other round, spreads a drift of
    the machine's speed over all parts alike instead of charging it to whichever part ran during it.
    """
    runs: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(repeat):
        for name in (list(parts) if r % 2 == 0 else list(reversed(parts))):
            sync(device)
            t0 = time.perf_counter()
            images = parts[name]()
            sync(device)
            runs[name].append(images / (time.perf_counter() - t0))
    return runs


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator[r] / denominator[r] (img/s measured in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


# ----------------------------------------------------------------------------- (a) ceiling


def ceiling(model: nn.Module, batch_size: int, steps: int, warmup: int, device: torch.device,
            amp_dtype: torch.dtype | None, memory_format: torch.memory_format, side: int = 32) -> Run:
    """fwd + bwd + step on one resident random batch of `side`-px images: what the model alone can do (warmed up).
    scripts/bench_models.py times every zoo model with it."""
    criterion = nn.CrossEntropyLoss()
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    x = torch.randn(batch_size, 3, side, side, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    model.train()

    def step() -> None:
        with autocast(device, amp_dtype):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    for _ in range(warmup):
        step()

    def run() -> int:
        for _ in range(steps):
            step()
        return steps * batch_size

    return run


# ----------------------------------------------------------------------------- (b) cifar-cam


def cifar_cam_epoch(model: nn.Module, arrays: ImageArrays, aug: dict[str, Any], *, batch_size: int,
                    num_workers: int, warmup: int, device: torch.device, amp_dtype: torch.dtype | None) -> Run:
    """Real training epochs (1, 2, ...) through build_train_batches + train_one_epoch, after `warmup` steps."""
    criterion = nn.CrossEntropyLoss()
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    batches = build_train_batches(arrays, aug, batch_size=batch_size, num_workers=num_workers, seed=0,
                                  device=device)
    log_every = 1 if device.type == "cpu" else 50  # trainer.log_every=auto, as train.py resolves it
    steps = 0

    def warmed_up() -> bool:
        nonlocal steps
        steps += 1
        return steps >= warmup

    # Warm-up: compilation, DataLoader workers starting; then whole epochs are timed. The stop flag is read at
    # every metrics read, so log_every=1 here: `warmup` steps exactly.
    batches.set_epoch(0)
    train_one_epoch(model, batches, optimizer, criterion, device=device, amp_dtype=amp_dtype, scaler=scaler,
                    log_every=1, should_stop=warmed_up)
    epoch = 0

    def run() -> int:
        nonlocal epoch
        epoch += 1
        batches.set_epoch(epoch)
        result = train_one_epoch(model, batches, optimizer, criterion, device=device, amp_dtype=amp_dtype,
                                 scaler=scaler, log_every=log_every, epoch=epoch)
        return result.totals.count

    return run


# ----------------------------------------------------------------------------- (c) reference


class ReferenceDataset(Dataset):
    """Map-style, as in the original project: one albumentations call per image, CHW float out."""

    def __init__(self, arrays: ImageArrays, transform: A.Compose) -> None:
        self.images, self.labels, self.transform = arrays.images, arrays.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(image=self.images[i])["image"], int(self.labels[i])


def reference_epoch(arrays: ImageArrays, aug: dict[str, Any], *, width: int, batch_size: int, num_workers: int,
                    warmup: int, device: torch.device) -> Run:
    """The original training loop: per-sample augmentation in workers, fp32 NCHW, .item() every step."""
    recipe = build_train_transform(aug)
    transform = A.Compose([*recipe.transforms, A.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD), ToTensorV2()])
    loader = DataLoader(ReferenceDataset(arrays, transform), batch_size=batch_size, shuffle=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    model = build_model("resnet18", num_classes=NUM_CLASSES, width=width).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = sgd(model)
    model.train()

    def epoch(limit: int | None = None) -> int:
        seen, running_loss, correct = 0, 0.0, 0
        for step, (images, labels) in enumerate(loader):
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += labels.size(0)
            if limit is not None and step + 1 >= limit:
                break
        return seen

    epoch(limit=warmup)
    return epoch


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64, help="ResNet18 width (64 = the full 11.2M-parameter model)")
    p.add_argument("--images", type=int, default=2560,
                   help="training images for (b) and (c); rounded down to whole batches")
    p.add_argument("--preset", choices=PRESETS, default="seed", help="augmentation recipe (conf/aug/) for (b), (c)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="aug.backend values to time in (b)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the model in (a) and (b) (trainer.compile)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last model in (a) and (b) (trainer.channels_last)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="(a) and (b); auto = bf16 on CUDA and on CPUs with AMX, else fp32 (trainer.precision)")
    p.add_argument("--workers", default="auto", help="DataLoader workers of (b)'s albumentations backend")
    p.add_argument("--reference-workers", type=int, default=2, help="DataLoader workers of (c)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed part")
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds: each part is timed once per round, in alternating order; img/s is a part's best "
                        "round, a ratio the median of its within-round ratios (every round is in the JSON's 'runs')")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings that run in seconds (width 8, batch 32, 128 images, no compile)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.batch_size, args.images, args.compile, args.warmup = 8, 32, 128, False, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available here; use --device cpu")
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in args.backends:
        if b not in BACKENDS:
            p.error(f"--backends: {b!r} is not one of {list(BACKENDS)}")
    if min(args.batch_size, args.width, args.warmup, args.repeat) < 1:
        p.error("--batch-size, --width, --warmup and --repeat must be >= 1")
    args.images = max(args.batch_size, args.images // args.batch_size * args.batch_size)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs (a), (b) per backend and (c); prints the table and ratios; returns (and writes) the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    amp_dtype = resolve_precision(args.precision, device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    arrays, _, _ = make_synthetic(NUM_CLASSES, args.images, 1, 32, seed=0)
    aug = dict(OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "aug" / f"{args.preset}.yaml")))
    workers = resolve_num_workers(args.workers if args.workers == "auto" else int(args.workers))
    steps = args.images // args.batch_size

    model = build_model("resnet18", num_classes=NUM_CLASSES, width=args.width).to(device, memory_format=memory_format)
    num_params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model, dynamic=False) if args.compile else model  # once, shared by (a) and (b)
    print(f"device: {device} ({machine(device)}), torch {torch.__version__}")
    print(f"model: ResNet18 width {args.width} ({num_params:,} parameters), batch {args.batch_size}, "
          f"{args.images} images, precision {precision_name(amp_dtype)}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {'compiled' if args.compile else 'eager'}; "
          f"aug preset {args.preset}", flush=True)

    # Set up and warm up every part first (compilation, workers), then time them in interleaved rounds.
    parts: dict[str, Run] = {"ceiling": ceiling(step_model, args.batch_size, steps, args.warmup, device, amp_dtype,
                                                memory_format)}
    for backend in args.backends:
        parts[f"cifar_cam_{backend}"] = cifar_cam_epoch(
            step_model, arrays, {**aug, "backend": backend}, batch_size=args.batch_size, num_workers=workers,
            warmup=args.warmup, device=device, amp_dtype=amp_dtype)
    parts["reference"] = reference_epoch(arrays, aug, width=args.width, batch_size=args.batch_size,
                                         num_workers=args.reference_workers, warmup=args.warmup, device=device)
    runs = interleaved(parts, device, args.repeat)

    def report(label: str, img_s: list[float]) -> float:
        print(f"{label:<46s}{max(img_s):9.1f} img/s" + (f"  (rounds: {', '.join(f'{v:.1f}' for v in img_s)})"
                                                        if len(img_s) > 1 else ""), flush=True)
        return max(img_s)

    results: dict[str, Any] = {"ceiling_img_s": report("(a) ceiling (resident random batch)", runs["ceiling"])}
    results["cifar_cam_img_s"] = {b: report(f"(b) cifar-cam epoch, aug.backend={b}", runs[f"cifar_cam_{b}"])
                                  for b in args.backends}
    results["reference_img_s"] = report(f"(c) reference loop ({args.reference_workers} workers)", runs["reference"])
    results["ratio_to_ceiling"] = {b: paired_ratio(runs[f"cifar_cam_{b}"], runs["ceiling"]) for b in args.backends}
    results["ratio_to_reference"] = {b: paired_ratio(runs[f"cifar_cam_{b}"], runs["reference"])
                                     for b in args.backends}
    for b in args.backends:
        print(f"aug.backend={b}: b/a = {results['ratio_to_ceiling'][b]:.3f}   "
              f"b/c = {results['ratio_to_reference'][b]:.3f}" + ("   (medians of the ratios within each round)"
                                                                  if args.repeat > 1 else ""))
    results["settings"] = {
        "device": str(device), "machine": machine(device), "torch": torch.__version__,
        "python": platform.python_version(), "batch_size": args.batch_size, "width": args.width,
        "num_params": num_params, "images": args.images, "preset": args.preset, "backends": args.backends,
        "compile": args.compile, "channels_last": args.channels_last,
        "precision": precision_name(amp_dtype), "workers": workers,
        "reference_workers": args.reference_workers, "warmup": args.warmup, "repeat": args.repeat,
        "quick": args.quick,
    }
    results["runs"] = runs
    results["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["command"] = " ".join(["scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    if args.json is not None:
        write_json(args.json, results)  # atomic: a killed bench never leaves a torn results file
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
