"""How fast and how lean reading one's own images is: the parallel decode, the cache, the memory.

    python scripts/bench_data.py [decode] [epoch] [memory] [--images 4000] [--memory-gb 3] [--json out.json]

Three measurements, each in one run on this machine (the CPU is printed; compare the ratios):

- decode: images/s of decoding a folder of generated JPEGs (--side px, photo-like sizes) into the cache at 64 px,
  with every core (processes) against one process; the same files, the same code path (data.decode_pool).
- epoch: one epoch of training batches read from the cache (the data path `cifar-cam train` uses, aug=none)
  against the loader a user would otherwise write: torchvision ImageFolder + DataLoader(num_workers=cores),
  decoding and resizing the same files every epoch, the same batch size.
- memory: a generated folder whose decoded size at 224 px is >= --memory-gb, decoded and read for one epoch in
  a fresh process, against the same on a quarter of its images: the peak anonymous resident memory (RssAnon of
  the process and its decode workers, sampled every 20 ms) of each phase. The decoded images live in
  memory-mapped cache files (file-backed pages the kernel can drop), so the peak should stay flat.

Generated images are smooth colour fields with noise and a few shapes (JPEG quality 90), so that their files are
of a realistic size; they are written once under --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cifar_cam.provenance import cpu_model  # noqa: E402

CLASSES = 10
DECODE_SIZE = 64       # decode and epoch: the cache's image side
MEMORY_SIZE = 224      # memory: 224x224x3 = 147 KiB an image, decoded


# ---------------------------------------------------------------------------------------------- generated images

def _write_images(task: tuple[str, int, int, int]) -> int:
    import cv2

    folder, first, count, side = task
    rng = np.random.default_rng(first)
    for i in range(first, first + count):
        h, w = (int(v) for v in rng.integers(side * 3 // 4, side * 5 // 4, 2))
        low = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        image = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
        for _ in range(3):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(image, centre, int(rng.integers(4, side // 4)), [int(c) for c in rng.integers(0, 256, 3)], -1)
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(f"{folder}/c{i % CLASSES}/{i:06d}.jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return count


def jpeg_tree(root: Path, images: int, side: int) -> Path:
    """A bare class-folder tree of `images` JPEGs around `side` px (made once; reused when complete)."""
    done = root / ".complete"
    if done.exists() and done.read_text() == f"{images} {side}":
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(CLASSES):
        (root / f"c{c}").mkdir(parents=True)
    step = 500
    tasks = [(str(root), first, min(step, images - first), side) for first in range(0, images, step)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_images, tasks))
    done.write_text(f"{images} {side}")
    return root


def quarter_tree(root: Path, into: Path) -> Path:
    """A tree of links to every fourth image of `root`: the same images, a quarter of them."""
    if into.exists():
        return into
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        (into / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[::4]:
            (into / folder.name / path.name).symlink_to(path)
    return into


def fresh_cache(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["CIFAR_CAM_CACHE"] = str(path)
    return path


# ---------------------------------------------------------------------------------------------- decode

def bench_decode(root: Path, work: Path) -> dict[str, float]:
    from cifar_cam.data.decode import Fit
    from cifar_cam.data.decode_pool import decode_split
    from cifar_cam.data.listing import list_folder

    listing = list_folder(str(root))
    entries = [(row, item.name, str(listing.path_of(item.name))) for row, item in enumerate(listing.items)]
    fit, shape = Fit.of(DECODE_SIZE), (len(entries), DECODE_SIZE, DECODE_SIZE, 3)
    cores = os.cpu_count() or 1
    result: dict[str, float] = {"images": len(entries), "cores": cores}
    for _ in range(2):  # the second round counts: the files are in the page cache for both
        for workers in (1, cores):
            target = work / f"decode-{workers}.npy"
            started = time.perf_counter()
            decoded = decode_split(target, shape, fit, iter(entries), workers, in_process_below=0)
            seconds = time.perf_counter() - started
            assert decoded.ok.all(), "a generated image did not decode"
            result[f"img_s_{workers}"] = len(entries) / seconds
            target.unlink()
    result["parallel_speedup"] = result[f"img_s_{cores}"] / result["img_s_1"]
    print(f"decode {len(entries):,} JPEGs to {DECODE_SIZE} px: 1 process {result['img_s_1']:,.0f} img/s, "
          f"{cores} processes {result[f'img_s_{cores}']:,.0f} img/s: {result['parallel_speedup']:.2f}x")
    return result


# ---------------------------------------------------------------------------------------------- epoch

def _train_batches(root: Path, size: int, batch_size: int, workers: int, backend: str = "torch"
                   ) -> tuple[object, list[str], float]:
    """The training batches `cifar-cam train data=folder aug=none aug.backend=<backend>` reads (its data path,
    from the cache; num_workers=0, as data.num_workers=auto on 2 cores)."""
    import torch
    from omegaconf import OmegaConf

    from cifar_cam.data.augment import build_train_batches
    from cifar_cam.data.decode import Fit
    from cifar_cam.data.sources import DataSpec, build_splits

    started = time.perf_counter()
    splits = build_splits(DataSpec("folder", str(root), fit=Fit.of(size), split=(0.9, 0.0, 0.1), val_size=0,
                                   decode_workers=workers))
    seconds = time.perf_counter() - started
    aug = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "aug" / "none.yaml"), {"backend": backend})
    batches = build_train_batches(splits.train, aug, batch_size=batch_size,
                                  num_workers=0, seed=0, device=torch.device("cpu"), mean=splits.mean,
                                  std=splits.std)
    return batches, list(splits.train.names), seconds


def bench_epoch(root: Path, work: Path, batch_size: int = 128) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    cores = os.cpu_count() or 1
    fresh_cache(work / "cache-epoch")
    batches, names, decode_seconds = _train_batches(root, DECODE_SIZE, batch_size, cores)
    per_image, _, _ = _train_batches(root, DECODE_SIZE, batch_size, cores, backend="albumentations")
    folder = datasets.ImageFolder(str(root), transforms.Compose([
        transforms.Resize((DECODE_SIZE, DECODE_SIZE)), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]))
    index = {str(Path(path).relative_to(root)): i for i, (path, _) in enumerate(folder.samples)}
    train = Subset(folder, [index[name] for name in names])  # the same training images
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=cores)
    n = len(names)
    result: dict[str, float] = {"images": n, "decode_once_seconds": decode_seconds}
    for name, source in (("imagefolder", loader), ("cache", batches), ("cache_albumentations", per_image)):
        started, seen = time.perf_counter(), 0
        for images, labels in source:  # type: ignore[attr-defined]
            seen += len(labels)
            torch.as_tensor(images).sum()  # touch every pixel, as a step would
        result[f"{name}_epoch_seconds"] = time.perf_counter() - started
        assert seen == n, (name, seen, n)
    result["epoch_speedup"] = result["imagefolder_epoch_seconds"] / result["cache_epoch_seconds"]
    print(f"one epoch of {n:,} images at {DECODE_SIZE} px, batch {batch_size}: ImageFolder + DataLoader"
          f"(num_workers={cores}) {result['imagefolder_epoch_seconds']:.2f} s, cifar-cam's cache "
          f"{result['cache_epoch_seconds']:.2f} s (aug.backend=torch): {result['epoch_speedup']:.1f}x; "
          f"{result['cache_albumentations_epoch_seconds']:.2f} s (aug.backend=albumentations): "
          f"{result['imagefolder_epoch_seconds'] / result['cache_albumentations_epoch_seconds']:.1f}x "
          f"(decoding into the cache, once: {decode_seconds:.1f} s)")
    return result


# ---------------------------------------------------------------------------------------------- memory

def _anon_kib(pid: int) -> int:
    """RssAnon of `pid` and its children (the decode workers), in KiB."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class PeakAnon:
    """Samples the RssAnon of this process tree every 20 ms; `phase()` returns the peak since the last call."""

    def __init__(self) -> None:
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _anon_kib(os.getpid()))
            time.sleep(0.02)

    def phase(self) -> float:
        time.sleep(0.05)
        peak, self.peak = self.peak, _anon_kib(os.getpid())
        return peak / 1024**2  # GiB


def memory_run(root: Path, cache: Path) -> None:
    """In a fresh process: decode `root` at 224 px, then read one training epoch; prints the peaks as JSON."""
    fresh_cache(cache)
    sampler = PeakAnon()
    batches, names, seconds = _train_batches(root, MEMORY_SIZE, 128, os.cpu_count() or 1)
    decode_peak = sampler.phase()
    started = time.perf_counter()
    for images, _ in batches:  # type: ignore[attr-defined]
        images.sum()
    epoch_seconds = time.perf_counter() - started
    epoch_peak = sampler.phase()
    decoded = sum(p.stat().st_size for p in cache.rglob("images.npy"))
    print(json.dumps({"images": len(names), "decoded_gb": decoded / 1024**3, "decode_seconds": seconds,
                      "epoch_seconds": epoch_seconds, "decode_peak_anon_gb": decode_peak,
                      "epoch_peak_anon_gb": epoch_peak}))
    shutil.rmtree(cache, ignore_errors=True)


def bench_memory(work: Path, gigabytes: float) -> dict[str, object]:
    images = int(np.ceil(gigabytes * 1024**3 / (MEMORY_SIZE * MEMORY_SIZE * 3) / CLASSES)) * CLASSES
    started = time.perf_counter()
    full = jpeg_tree(work / f"memory-{images}", images, MEMORY_SIZE)
    quarter = quarter_tree(full, work / f"memory-{images}-quarter")
    print(f"memory: {images:,} JPEGs ({time.perf_counter() - started:.0f} s to make or find)", flush=True)
    runs: dict[str, dict[str, float]] = {}
    for name, root in (("quarter", quarter), ("full", full)):
        done = subprocess.run([sys.executable, __file__, "_memory-run", str(root), str(work / "cache-memory")],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the memory run on {root} failed:\n{done.stderr[-3000:]}")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = runs[name]
        print(f"  {name}: {r['images']:,} images, {r['decoded_gb']:.2f} GB decoded at {MEMORY_SIZE} px; peak RssAnon"
              f" decoding {r['decode_peak_anon_gb']:.2f} GB ({r['decode_seconds']:.0f} s), one epoch "
              f"{r['epoch_peak_anon_gb']:.2f} GB ({r['epoch_seconds']:.0f} s)", flush=True)
    ratios = {phase: runs["full"][f"{phase}_peak_anon_gb"] / runs["quarter"][f"{phase}_peak_anon_gb"]
              for phase in ("decode", "epoch")}
    print(f"memory: full / quarter peak RssAnon: decoding {ratios['decode']:.2f}x, one epoch {ratios['epoch']:.2f}x")
    return {"runs": runs, "full_over_quarter": ratios}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_memory-run"]:
        memory_run(Path(args[1]), Path(args[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", help="decode, epoch and/or memory (default: all three)")
    parser.add_argument("--images", type=int, default=8000, help="JPEGs for decode and epoch")
    parser.add_argument("--side", type=int, default=160, help="their size (each side drawn from 0.75x to 1.25x)")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="the memory set's decoded size at 224 px")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_data"), help="generated images, caches")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    opts = parser.parse_args(args)
    opts.what = opts.what or ["decode", "epoch", "memory"]
    if set(opts.what) - {"decode", "epoch", "memory"}:
        parser.error(f"unknown measurement(s) {sorted(set(opts.what) - {'decode', 'epoch', 'memory'})}; "
                     "choose from decode, epoch, memory")
    if opts.images < CLASSES or opts.memory_gb <= 0 or opts.side < 8:
        parser.error("--images must be >= 10, --side >= 8 and --memory-gb > 0")
    opts.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}", flush=True)
    result: dict[str, object] = {"cpu": cpu_model(), "cores": os.cpu_count()}
    if {"decode", "epoch"} & set(opts.what):
        root = jpeg_tree(opts.work / f"jpegs-{opts.images}-{opts.side}", opts.images, opts.side)
        if "decode" in opts.what:
            result["decode"] = bench_decode(root, opts.work)
        if "epoch" in opts.what:
            result["epoch"] = bench_epoch(root, opts.work)
    if "memory" in opts.what:
        result["memory"] = bench_memory(opts.work, opts.memory_gb)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
