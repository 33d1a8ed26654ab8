"""A file source (data=folder, data=csv) from its listing to decoded splits: which image goes to which split, then
each split decoded once, in parallel, into the cache (or a temporary folder with data.cache=false) and read back
as a memory map, so a data set larger than the machine's memory trains.

The split is decided on the names, before anything is decoded: the layout's own (train/, val/, test/ or a CSV's
split column), else data.split's fractions (seeded, stratified); then the val split held out of train where the
layout has none (data.val_size), then data.subset of the training images. A checkpoint keeps the split it was
trained on (`stored`), which eval, gradcam, predict and export use as it is.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cifar_cam.data.arrays import ImageArrays, stats_from_sums
from cifar_cam.data.cache import FORMAT, META, entry_dir, entry_key, megabytes, read_meta, shown, write_entry
from cifar_cam.data.decode import DECODER_VERSION, Fit, conversion_counts
from cifar_cam.data.decode_pool import compact, decode_split, tar_entries
from cifar_cam.data.listing import SPLITS, Item, Listing
from cifar_cam.data.splitting import pick_subset, resolve_count, split_by_fractions, stratified_split
from cifar_cam.errors import ConfigError, DataError

log = logging.getLogger("cifar_cam.data")


@dataclass
class FileSplits:
    """The decoded splits of a file source and what decoding found."""

    arrays: dict[str, ImageArrays]                      # train, test, and val when there is one
    mean: tuple[float, float, float]                    # of the training split
    std: tuple[float, float, float]
    bad: list[tuple[str, str, str]] = field(default_factory=list)   # (split, name, why) of unreadable images
    conversions: dict[str, int] = field(default_factory=dict)     # what decoding did, summed over the splits
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train name, test name), same pixels


def assign_splits(listing: Listing, *, fractions: Any, val_size: int | float, subset: int | None, seed: int
                  ) -> dict[str, list[Item]]:
    """The images of each split (train, test, and val when there is one), each split in label, then name order."""
    items = listing.items
    if all(i.split is None for i in items):  # a bare tree or a CSV without a split column: data.split
        if fractions is None or len(fractions) != 3:
            raise ConfigError(f"data.split={fractions} must be three fractions [train, val, test], e.g. [0.8,0.1,0.1]")
        labels = np.array([i.label for i in items])
        rows = split_by_fractions(labels, fractions, seed)
        items = [Item(items[r].name, items[r].label, split) for split, part in zip(SPLITS, rows, strict=True)
                 for r in part]
    by_split: dict[str, list[Item]] = {s: [i for i in items if i.split == s] for s in SPLITS}
    if not by_split["test"]:
        raise DataError(f"{listing.root} gives no test images (data.split={fractions}: a test fraction > 0, or more "
                        "images per class)")
    if not by_split["val"] and listing.layout not in ("classes", "csv"):  # held out of train, as for CIFAR
        train = by_split["train"]
        n_val = resolve_count(val_size, len(train), "data.val_size")
        keep, val = stratified_split(np.array([i.label for i in train]), n_val, seed)
        by_split["train"], by_split["val"] = [train[r] for r in keep], [train[r] for r in val]
    train = by_split["train"]
    keep = pick_subset(np.array([i.label for i in train]), subset, seed)
    by_split["train"] = [train[r] for r in keep]
    if not by_split["train"]:
        raise DataError(f"{listing.root} leaves no training images with this split (data.split, data.val_size)")
    return {s: sorted(v, key=lambda i: (i.label, i.name)) for s, v in by_split.items() if v or s != "val"}


def stored_split(stored: dict[str, list[list[Any]]]) -> dict[str, list[Item]]:
    """The split a checkpoint kept ({split: [[name, label], ...]}) as items."""
    return {s: [Item(str(n), int(label), s) for n, label in rows] for s, rows in stored.items() if rows}


_TEMP_DIRS: list[Path] = []


def _scratch() -> Path:
    """A folder for decoded splits that are not cached (data.cache=false), removed when the process ends."""
    if not _TEMP_DIRS:
        _TEMP_DIRS.append(Path(tempfile.mkdtemp(prefix="cifar-cam-data-")))
        atexit.register(lambda: shutil.rmtree(_TEMP_DIRS[0], ignore_errors=True))
    return _TEMP_DIRS[0]


def _entries_of(listing: Listing, items: list[Item]) -> Any:
    names = [i.name for i in items]
    if listing.kind == "tar":
        return tar_entries(listing.root, names, listing.prefix)
    return ((row, name, str(listing.path_of(name))) for row, name in enumerate(names))


def _build(folder: Path, listing: Listing, split: str, items: list[Item], fit: Fit, workers: int,
           progress: Callable[[int], None]) -> None:
    """Decodes one split into `folder`: images.npy (the readable ones only), labels.npy, hashes.npy, meta.json."""
    raw = folder / "decoded.npy"
    shape = (len(items), fit.height, fit.width, 3)
    found = decode_split(raw, shape, fit, _entries_of(listing, items), workers, progress)
    if found.bad:
        compact(raw, found.ok, folder / "images.npy")
        raw.unlink()
    else:
        raw.rename(folder / "images.npy")
    labels = np.array([i.label for i in items], np.int64)[found.ok]
    np.save(folder / "labels.npy", labels)
    np.save(folder / "hashes.npy", found.hashes[found.ok])
    mean, std = stats_from_sums(found.pixel_sum, found.pixel_sq, found.pixels)
    meta = {"format": FORMAT, "root": str(listing.root), "kind": listing.kind, "split": split,
            "fit": fit.to_dict(), "decoder": DECODER_VERSION, "count": int(found.ok.sum()),
            "names": [i.name for i, ok in zip(items, found.ok, strict=True) if ok],
            "bad": [[items[r].name, why] for r, why in sorted(found.bad.items())],
            "conversions": conversion_counts(found.flags[found.ok]), "mean": mean, "std": std,
            "created": datetime.now().isoformat(timespec="seconds")}
    (folder / META).write_text(json.dumps(meta))


def _open(folder: Path) -> tuple[ImageArrays, dict[str, Any], np.ndarray]:
    meta = read_meta(folder)
    if meta is None:
        raise DataError(f"the cached split {shown(folder)} is damaged (no meta.json); `cifar-cam cache --clear` "
                        "removes it")
    images = np.load(folder / "images.npy", mmap_mode="r")  # file-backed pages: the kernel keeps what fits
    labels = np.load(folder / "labels.npy")
    return ImageArrays(images, labels, np.arange(len(labels)), list(meta["names"])), meta, np.load(
        folder / "hashes.npy")


def load_splits(listing: Listing, per_split: dict[str, list[Item]], fit: Fit, *, cache: bool, workers: int
                ) -> FileSplits:
    """Each split decoded (or found in the cache) and opened as a memory map; what decoding found, gathered."""
    from cifar_cam.logs import Bars

    base = None if cache else _scratch()
    folders = {}
    for split, items in per_split.items():
        key = entry_key(listing.kind, str(listing.root), listing.fingerprint([i.name for i in items]),
                        [[i.name, i.label] for i in items], fit.to_dict(), DECODER_VERSION, split)
        folders[split] = entry_dir(key, base)
    todo = {s: per_split[s] for s, f in folders.items() if read_meta(f) is None}
    if todo:
        total = sum(len(v) for v in todo.values())
        log.info("data: decoding %s images of %s into %s (%s, %d process%s; once: later runs read the cache)",
                 f"{total:,}", listing.root, shown(next(iter(folders.values())).parent), fit.describe(), workers,
                 "es" if workers > 1 else "")
        started, done = time.monotonic(), 0
        with Bars("decode", len(todo)) as bars:
            for n, (split, items) in enumerate(todo.items()):
                bars.start_inner(f"decoding {split}", len(items), images_per_step=1)
                write_entry(folders[split], lambda f, s=split, i=items: _build(f, listing, s, i, fit, workers,
                                                                              bars.update_inner))
                done += len(items)
                bars.advance_outer(n + 1)
        seconds = time.monotonic() - started
        size = sum((folders[s] / "images.npy").stat().st_size for s in todo)
        log.info("data: decoded %s images in %.1f s (%.0f img/s), %s on disk", f"{done:,}", seconds,
                 done / max(seconds, 1e-9), megabytes(size))
    arrays, metas, hashes = {}, {}, {}
    for split, folder in folders.items():
        arrays[split], metas[split], hashes[split] = _open(folder)
    bad = [(s, name, why) for s in SPLITS if s in metas for name, why in metas[s]["bad"]]
    conversions: dict[str, int] = {}
    for meta in metas.values():
        for what, n in meta.get("conversions", {}).items():
            conversions[what] = conversions.get(what, 0) + n
    return FileSplits(arrays, tuple(metas["train"]["mean"]), tuple(metas["train"]["std"]), bad, conversions,
                      _duplicates(arrays, hashes))


def _duplicates(arrays: dict[str, ImageArrays], hashes: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(train name, test name) of the test images whose decoded pixels equal a training image's."""
    train, test = hashes.get("train"), hashes.get("test")
    if train is None or test is None:
        return []
    first = {}
    for row, h in enumerate(train.tolist()):
        first.setdefault(h, row)
    names_train, names_test = arrays["train"].names or [], arrays["test"].names or []
    candidates = [(first[h], row) for row, h in enumerate(test.tolist()) if h in first]
    same = [(a, b) for a, b in candidates
            if np.array_equal(arrays["train"].images[a], arrays["test"].images[b])]  # a hash is not proof
    return [(names_train[a], names_test[b]) for a, b in same]
