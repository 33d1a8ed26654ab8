"""`cifar-cam data`: a look at a data set before training it, in a run dir of its own.

data.json: the classes with their counts per split, the images' sizes and aspect ratios (min, median, max) and
formats (from the headers of a sample, before resizing), the unreadable files, the test images that are copies of
training images, what decoding converted, the mean / std the model would normalize with, and a suggested
data.image_size; samples.png (a row of images per class), augmented.png (the first training batch after the chosen
aug, as the model sees it), split.csv and bad_images.txt. Loading decodes the data into the cache, so a training
run that follows starts at once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cifar_cam import viz
from cifar_cam.data.arrays import DataSplits
from cifar_cam.data.augment import build_train_batches
from cifar_cam.data.sources import build_splits, describe, listing_of
from cifar_cam.data.splitting import class_counts
from cifar_cam.data.survey import survey
from cifar_cam.io import write_bytes
from cifar_cam.tasks.common import checkpoint_and_config, data_spec, run_dir, setup_runtime, write_json, write_split_csv
from cifar_cam.training.checkpoint import normalization_of

log = logging.getLogger("cifar_cam.data")


def _counts(splits: DataSplits) -> dict[str, dict[str, int]]:
    """{class: {split: images}}."""
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    per_split = {s: class_counts(a.labels, splits.num_classes).tolist() for s, a in parts.items() if a is not None}
    return {c: {s: per_split[s][i] for s in per_split} for i, c in enumerate(splits.classes)}


def _samples(splits: DataSplits, per_class: int, max_classes: int) -> tuple[np.ndarray, list[str]]:
    """The first training images of each of the first classes, a row a class."""
    images, titles = [], []
    labels = np.asarray(splits.train.labels)
    for c, name in enumerate(splits.classes[:max_classes]):
        rows = np.flatnonzero(labels == c)[:per_class]
        for j, r in enumerate(rows):
            images.append(np.asarray(splits.train.images[r]))
            titles.append(name if j == 0 else "")
    return np.stack(images), titles


def _augmented(splits: DataSplits, cfg: DictConfig, n: int) -> np.ndarray:
    """The first training batch after the chosen augmentation, back in 0..255 for the eye."""
    batches = build_train_batches(splits.train, cfg.aug, batch_size=min(n, len(splits.train)), num_workers=0,
                                  seed=cfg.seed, device=torch.device("cpu"), mean=splits.mean, std=splits.std,
                                  sampler=cfg.data.get("sampler"))
    batches.set_epoch(1)
    images, _ = next(iter(batches))
    mean = torch.tensor(splits.mean).view(1, 3, 1, 1)
    std = torch.tensor(splits.std).view(1, 3, 1, 1)
    pixels = ((images.float() * std + mean) * 255).clamp(0, 255).round().byte()
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def inspect_data(cfg: DictConfig) -> float:
    """Writes data.json, samples.png, augmented.png (and split.csv, bad_images.txt); returns the number of images."""
    out = run_dir()
    payload = None
    if cfg.get("ckpt"):
        payload, cfg = checkpoint_and_config(cfg, "data")
    setup_runtime(cfg)
    spec = data_spec(cfg, payload)
    report: dict[str, Any] = {"source": spec.source, "root": spec.root}
    seen = None
    if spec.source in ("folder", "csv"):
        listing = listing_of(spec)
        seen = survey(listing, seed=spec.seed)
        report.update(root=str(listing.root), layout=listing.layout, non_image_files=len(listing.skipped),
                      non_image_examples=listing.skipped[:10], outside_class_folders=len(listing.stray))
    splits = build_splits(spec)
    if payload is not None:
        splits = splits.normalized_as(*normalization_of(payload))
    describe(splits, spec.source)
    write_split_csv(out, splits)
    if splits.bad:
        write_bytes(out / "bad_images.txt", "".join(f"{s}\t{n}\t{why}\n" for s, n, why in splits.bad).encode())
        log.warning("data: %d unreadable images, named in %s (first: %s)", len(splits.bad), out / "bad_images.txt",
                    splits.bad[0][1])
    if splits.duplicates:
        log.warning("data: %d test images are exact copies of training images (first: %s = %s)",
                    len(splits.duplicates), *splits.duplicates[0])
    height, width = splits.image_size
    if seen is not None and seen.heights:
        suggested, why = seen.suggested_size()
        report.update(sampled_headers=seen.sampled, sizes=seen.stats(), formats=dict(seen.formats),
                      color_modes=dict(seen.modes), unidentified_in_sample=seen.unidentified[:10])
    else:
        suggested, why = [height, width] if height != width else height, "the source's own size"
    sizes = {"train": len(splits.train), "val": 0 if splits.val is None else len(splits.val), "test": len(splits.test)}
    report.update(
        classes=_counts(splits), num_classes=splits.num_classes, images=sizes, image_size=[height, width],
        fit=spec.fit.to_dict(), mean=list(splits.mean), std=list(splits.std),
        unreadable=len(splits.bad), unreadable_examples=[[s, n, w] for s, n, w in splits.bad[:10]],
        train_test_duplicates=len(splits.duplicates), duplicate_examples=[list(d) for d in splits.duplicates[:10]],
        suggested_image_size=suggested, suggestion=why,
    )
    write_json(out / "data.json", report)
    look = cfg.look
    images, titles = _samples(splits, int(look.samples_per_class), int(look.max_classes))
    viz.plot_image_grid(images, titles, out / "samples.png", cols=int(look.samples_per_class),
                        suptitle=f"{spec.source}: {min(splits.num_classes, int(look.max_classes))} of "
                                 f"{splits.num_classes} classes, training images at {height}x{width}")
    batch = _augmented(splits, cfg, int(look.augmented))
    viz.plot_image_grid(batch, [""] * len(batch), out / "augmented.png", cols=8,
                        suptitle=f"one training batch after aug={cfg.aug.preset} ({cfg.aug.backend}), as the model "
                                 "sees it")
    log.info("suggested data.image_size=%s (%s)", suggested, why)
    log.info("wrote %s", out)
    return float(sum(sizes.values()))
