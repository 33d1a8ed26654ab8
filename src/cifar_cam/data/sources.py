"""The data sources as train / val / test splits: cifar10 and cifar100 (torchvision), synthetic (generated), and the
file sources folder and csv (listing.py -> files.py: decoded once into the cache, read back as memory maps).

Every source ends as the same thing (arrays.DataSplits): uint8 images (N, H, W, 3), int64 labels, the class
names, and the per-channel mean and std the model normalizes with (CIFAR's published constants; the training
split's own for the other sources). Augmentation happens on these arrays (augment.py, device_augment.py);
normalization happens on the training device (batches.py), so a batch crosses to the GPU as uint8.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_cam.config.choices import SOURCES
from cifar_cam.data.arrays import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DataSplits,
    ImageArrays,
    as_arrays,
    channel_stats,
)
from cifar_cam.data.decode import Fit
from cifar_cam.data.files import assign_splits, load_splits, stored_split
from cifar_cam.data.listing import Listing, list_csv, list_folder
from cifar_cam.data.splitting import class_counts, pick_subset, resolve_count, stratified_split
from cifar_cam.errors import ConfigError, DataError

log = logging.getLogger("cifar_cam.data")

IMBALANCE = 10  # a class with fewer than 1/IMBALANCE of the largest class's training images is named


@dataclass(frozen=True)
class DataSpec:
    """What `data.*` (and, for a checkpoint's data, what it stored) says to load; plain values, no config."""

    source: str
    root: str | None = None
    seed: int = 42                         # the split's and the generator's seed (a checkpoint's: its run's)
    val_size: int | float = 0.1            # images, or a fraction of train, held out for model selection
    subset: int | None = None              # train on only this many images (stratified, seeded)
    split: tuple[float, ...] | None = (0.8, 0.1, 0.1)  # a file source without a split of its own
    fit: Fit = Fit(32, 32)
    cache: bool = True
    decode_workers: int = 1
    num_classes: int = 10                  # synthetic
    train_size: int = 640
    test_size: int = 256
    stored: dict[str, Any] | None = None   # a checkpoint's split of a file source: {split: [[name, label], ...]}


def load_cifar(root: str, which: str = "cifar10") -> tuple[ImageArrays, ImageArrays, list[str]]:
    """CIFAR-10 or CIFAR-100 through torchvision (downloads to `root` the first time: the one connection a command
    makes on its own, and only for these sources)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset = CIFAR10 if which == "cifar10" else CIFAR100
    try:
        train = dataset(root, train=True, download=True)
        test = dataset(root, train=False, download=True)
    except Exception as e:  # no network, a proxy, a corrupt archive: all say the same to the user
        raise DataError(
            f"could not load {which.upper()} into data.root={root!r} ({type(e).__name__}: {e}); "
            "without internet use data=folder data.root=<image folder tree or .tar.gz>"
        ) from e
    return as_arrays(train.data, train.targets), as_arrays(test.data, test.targets), list(train.classes)


def make_synthetic(num_classes: int, train_size: int, test_size: int, image_size: Any, seed: int
                   ) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """A learnable stand-in for CIFAR: each class has its own colour and stripe frequency (a side or (H, W)).

    Both cues survive flips, 90-degree rotations and Cutout, so every augmentation preset
    leaves the task learnable; per-image noise and brightness keep it from being trivial.
    """
    height, width = Fit.of(image_size).size
    rng = np.random.default_rng(seed)
    colors = rng.uniform(40, 215, size=(num_classes, 3))
    freqs = 1 + np.arange(num_classes) % 4
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]

    def make(n: int) -> ImageArrays:
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        stripes = np.sin(2 * np.pi * freqs[labels, None, None] * (xx + yy)[None])  # (n, H, W)
        brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
        images = colors[labels][:, None, None, :] * brightness + 30 * stripes[..., None]
        images = images + rng.normal(0, 20, size=images.shape)
        return as_arrays(np.clip(images, 0, 255).astype(np.uint8), labels)

    return make(train_size), make(test_size), [f"class{c}" for c in range(num_classes)]


def _array_splits(train: ImageArrays, test: ImageArrays, spec: DataSpec) -> tuple[ImageArrays, ImageArrays | None]:
    """A source with its test set given: val held out of train (stratified), then `subset` of the rest."""
    n_val = resolve_count(spec.val_size, len(train), "data.val_size")
    train_rows, val_rows = stratified_split(train.labels, n_val, spec.seed)
    val = train.take(val_rows) if len(val_rows) else None
    train_rows = train_rows[pick_subset(train.labels[train_rows], spec.subset, spec.seed)]
    return train.take(train_rows), val


def listing_of(spec: DataSpec) -> Listing:
    """The images a file source holds (DataError in one line for a missing or malformed root)."""
    if spec.root is None or str(spec.root) == "":
        raise ConfigError(f"data.root is required for data={spec.source}")
    return list_csv(str(spec.root)) if spec.source == "csv" else list_folder(str(spec.root))


def _file_splits(spec: DataSpec) -> DataSplits:
    listing = listing_of(spec)
    if spec.stored is not None:
        per_split = stored_split(spec.stored)
        log.info("data: the checkpoint's own split of %s (%s)", listing.root,
                 ", ".join(f"{s} {len(v):,}" for s, v in per_split.items()))
    else:
        per_split = assign_splits(listing, fractions=spec.split, val_size=spec.val_size, subset=spec.subset,
                                  seed=spec.seed)
    if listing.skipped:
        log.info("data: %d files that are no image skipped (first: %s)", len(listing.skipped), listing.skipped[0])
    if listing.stray:
        log.info("data: %d images outside any class folder not used (first: %s)", len(listing.stray),
                 listing.stray[0])
    found = load_splits(listing, per_split, spec.fit, cache=spec.cache, workers=spec.decode_workers)
    if found.conversions:
        total = sum(len(v) for v in per_split.values())
        log.info("data: of %s images, %s", f"{total:,}", ", ".join(f"{n:,} {what}" for what, n in
                                                                    found.conversions.items()))
    if found.duplicates:
        pairs = "; ".join(f"{a} = {b}" for a, b in found.duplicates[:3])
        log.warning("data: %d test images are exact copies of training images (the test set leaks into "
                    "training: its accuracy is too high): %s%s", len(found.duplicates), pairs,
                    " ..." if len(found.duplicates) > 3 else "")
    identity = {"source": spec.source, "root": str(listing.root), "layout": listing.layout, "seed": spec.seed,
                "fit": spec.fit.to_dict(),
                "split": {s: [[n, int(lab)] for n, lab in zip(a.names or [], a.labels.tolist(), strict=True)]
                          for s, a in found.arrays.items()}}
    return DataSplits(found.arrays["train"], found.arrays.get("val"), found.arrays["test"], listing.classes,
                      found.mean, found.std, identity, found.bad, found.duplicates)


def build_splits(spec: DataSpec) -> DataSplits:
    """Loads a source and splits it (val held out of train, then `subset` of the rest), with its normalization."""
    if spec.source in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(str(spec.root), spec.source)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if spec.source == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    elif spec.source == "synthetic":
        train, test, classes = make_synthetic(spec.num_classes, spec.train_size, spec.test_size, spec.fit.size,
                                              spec.seed)
    elif spec.source in ("folder", "csv"):
        return _file_splits(spec)
    else:
        raise ConfigError(f"data.source={spec.source!r} is not one of {list(SOURCES)}")
    train, val = _array_splits(train, test, spec)
    if spec.source == "synthetic":  # computed on the training split only, as for a file source
        mean, std = channel_stats(train.images)
    identity = {"source": spec.source, "seed": spec.seed}
    return DataSplits(train, val, test, classes, mean, std, identity)  # type: ignore[arg-type]


def describe(splits: DataSplits, source: str) -> None:
    """The log lines of a loaded data set: its splits and size, the class counts, a strong imbalance named."""
    height, width = splits.image_size
    log.info("data: %s, %d classes; train %s, val %s, test %s images at %dx%d; mean %s std %s", source,
             splits.num_classes, f"{len(splits.train):,}", f"{0 if splits.val is None else len(splits.val):,}",
             f"{len(splits.test):,}", height, width, list(splits.mean), list(splits.std))
    counts = class_counts(splits.train.labels, splits.num_classes)
    shown_counts = [f"{c} {n:,}" for c, n in zip(splits.classes, counts.tolist(), strict=True)]
    if len(shown_counts) > 12:
        shown_counts = [*shown_counts[:5], "...", *shown_counts[-3:]]
    log.info("data: training images per class: %s (smallest %s, largest %s)", ", ".join(shown_counts),
             f"{counts.min():,}", f"{counts.max():,}")
    small = [c for c, n in zip(splits.classes, counts.tolist(), strict=True) if n * IMBALANCE < counts.max()]
    if small:
        log.warning("data: strong class imbalance: %s ha%s fewer than a tenth of the largest class's %s training "
                    "images; data.sampler=balanced draws the classes evenly", ", ".join(small[:10]),
                    "s" if len(small) == 1 else "ve", f"{counts.max():,}")


def check_root(root: str, source: str = "folder") -> None:
    """A file source's root is there and of the right kind (a folder or archive; a CSV file), before torch loads;
    its layout is read (and refused in one line) when the data loads, before any image is decoded."""
    path = Path(str(root)).expanduser()
    if source == "csv":
        if not path.is_file():
            raise DataError(f"data.root={root!r}: no such CSV file; data=csv reads a CSV of path,label[,split]")
        return
    if not path.exists():
        raise DataError(f"data.root {root!r} does not exist; point data.root at a folder of class folders (or of "
                        "train/ and test/), or a .tar/.tar.gz of one")
    if path.is_file() and not tarfile.is_tarfile(path):
        raise DataError(f"data.root {root!r} is a file but not a .tar/.tar.gz archive of an image folder tree "
                        "(a CSV of path,label is data=csv)")
