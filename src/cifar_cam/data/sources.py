"""Data sources (cifar10, folder, synthetic) as uint8 arrays, and the stratified val split.

Every source ends as the same thing (arrays.py): `uint8` images of shape (N, H, W, 3) plus `int64` labels,
held in memory. Augmentation happens on these arrays (augment.py, device_augment.py); normalization happens on
the training device (batches.py), so a batch crosses to the GPU as uint8 (4x less traffic than float).
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from pathlib import Path

import numpy as np

from cifar_cam.config.choices import SOURCES
from cifar_cam.data.arrays import DataSplits, ImageArrays, as_arrays
from cifar_cam.data.cache import folder_cache_file, megabytes, shown
from cifar_cam.data.decode import DECODER_VERSION, IMAGE_SUFFIXES, decode_rgb
from cifar_cam.errors import ConfigError, DataError
from cifar_cam.io import atomic_path

log = logging.getLogger(__name__)


def load_cifar10(root: str) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """CIFAR-10 through torchvision (downloads to `root` the first time)."""
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(root, train=True, download=True)
        test = CIFAR10(root, train=False, download=True)
    except Exception as e:  # no network, a proxy, a corrupt archive: all say the same to the user
        raise DataError(
            f"could not load CIFAR-10 into data.root={root!r} ({type(e).__name__}: {e}); "
            "without internet use data=folder data.root=<ImageFolder dir or .tar.gz>"
        ) from e
    return as_arrays(train.data, train.targets), as_arrays(test.data, test.targets), list(train.classes)


def _class_files(names: list[str], split: str, where: str) -> dict[str, list[str]]:
    """Groups '<split>/<class>/<file>' paths by class; checks the layout."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == split:
            files = by_class.setdefault(parts[1], [])
            if Path(parts[2]).suffix.lower() in IMAGE_SUFFIXES:
                files.append(name)
        elif len(parts) == 2 and parts[0] == split:
            by_class.setdefault(parts[1], [])
    if not by_class:
        raise DataError(f"{where} has no {split}/ folder with class subfolders (expected {split}/<class>/<image>)")
    for cls, files in by_class.items():
        if not files:
            raise DataError(f"class folder {where}/{split}/{cls} has no images; remove it or add images")
    return {cls: sorted(by_class[cls]) for cls in sorted(by_class)}


class _FolderReader:
    """Lists and reads files of an ImageFolder tree given as a directory or a .tar(.gz) archive."""

    def __init__(self, root: str) -> None:
        self.root = root
        path = Path(root).expanduser()
        if not path.exists():
            raise DataError(f"data.root {root!r} does not exist; point data.root at a folder with train/ and test/")
        self.path = path
        self._tar: tarfile.TarFile | None = None
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise DataError(f"data.root {root!r} is a file but not a .tar/.tar.gz archive of an ImageFolder tree")
            self._tar = tarfile.open(path)
            members = [m for m in self._tar.getmembers() if m.isfile() or m.isdir()]
            names = [m.name.lstrip("./") for m in members]
            # An archive usually holds one top folder (cifar10-jpg/train/...): strip it.
            tops = {n.split("/")[0] for n in names if n}
            self.prefix = tops.pop() + "/" if len(tops) == 1 and "train" not in tops else ""
            self._members = {n[len(self.prefix):]: m
                             for n, m in zip(names, members, strict=True) if n.startswith(self.prefix)}
            self.names = [n for n, m in self._members.items() if n]
        else:
            names = []
            for split in ("train", "test"):
                split_dir = path / split
                if not split_dir.is_dir():
                    continue
                for cls_dir in split_dir.iterdir():
                    if cls_dir.is_dir():
                        names.append(f"{split}/{cls_dir.name}")
                        names += [f"{split}/{cls_dir.name}/{f.name}" for f in cls_dir.iterdir() if f.is_file()]
            self.names = names
        for split in ("train", "test"):
            if not any(n == split or n.startswith(split + "/") for n in self.names):
                raise DataError(f"data.root {root!r} has no {split}/ folder (expected {split}/<class>/<image>)")

    def read(self, name: str) -> bytes:
        if self._tar is None:
            return (self.path / name).read_bytes()
        f = self._tar.extractfile(self._members[name])
        assert f is not None
        return f.read()

    def fingerprint(self) -> str:
        """Changes when the tree or archive changes (path, sizes and mtimes) or the decoder does."""
        h = hashlib.sha1(str(self.path.resolve()).encode())
        h.update(f"decoder {DECODER_VERSION}".encode())
        if self._tar is not None:
            st = self.path.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            for name in sorted(self.names):
                st = (self.path / name).stat()
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _split_files(reader: _FolderReader, root: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The image files of train/ and test/ by class; both must have the same non-empty class folders."""
    train_files = _class_files(reader.names, "train", root)
    test_files = _class_files(reader.names, "test", root)
    if list(train_files) != list(test_files):
        only_train = sorted(set(train_files) - set(test_files))
        only_test = sorted(set(test_files) - set(train_files))
        raise DataError(
            f"train/ and test/ of {root!r} have different classes (only in train: {only_train}, "
            f"only in test: {only_test}); both need the same class folders"
        )
    return train_files, test_files


def load_folder(root: str, image_size: int = 32, cache: bool = True) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """An ImageFolder tree (`root/{train,test}/<class>/*`), or a .tar.gz of one, decoded once."""
    reader = _FolderReader(root)
    train_files, test_files = _split_files(reader, root)
    classes = list(train_files)
    cache_file = folder_cache_file(reader.fingerprint(), image_size)
    if cache and cache_file.exists():
        try:
            with np.load(cache_file) as z:
                size = megabytes(cache_file.stat().st_size)
                log.info("data: %s (cached arrays %s, %s)", root, shown(cache_file), size)
                return (
                    as_arrays(z["train_images"], z["train_labels"]),
                    as_arrays(z["test_images"], z["test_labels"]),
                    classes,
                )
        except Exception:  # a torn cache file is just a cache miss
            log.warning("data: ignoring unreadable cache %s", cache_file)

    def decode_split(files: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
        names = [(label, name) for label, cls in enumerate(classes) for name in files[cls]]
        images = np.empty((len(names), image_size, image_size, 3), np.uint8)
        for i, (_, name) in enumerate(names):
            images[i] = decode_rgb(reader.read(name), f"{root}/{name}", image_size)
        return images, np.array([label for label, _ in names], np.int64)

    log.info("data: decoding %s (once; cached afterwards)", root)
    train_images, train_labels = decode_split(train_files)
    test_images, test_labels = decode_split(test_files)
    if cache:
        try:
            with atomic_path(cache_file, suffix=".npz") as tmp:
                np.savez(tmp, train_images=train_images, train_labels=train_labels,
                         test_images=test_images, test_labels=test_labels)
                written = tmp.stat().st_size
        except OSError as e:
            log.warning("data: could not write cache %s (%s)", shown(cache_file), e)
        else:
            log.info("data: cached as %s, %s; `cifar-cam cache` lists, `cifar-cam cache --clear` removes",
                     shown(cache_file), megabytes(written))
    return as_arrays(train_images, train_labels), as_arrays(test_images, test_labels), classes


def make_synthetic(num_classes: int, train_size: int, test_size: int, image_size: int, seed: int
                   ) -> tuple[ImageArrays, ImageArrays, list[str]]:
    """A learnable stand-in for CIFAR: each class has its own colour and stripe frequency.

    Both cues survive flips, 90-degree rotations and Cutout, so every augmentation preset
    leaves the task learnable; per-image noise and brightness keep it from being trivial.
    """
    rng = np.random.default_rng(seed)
    colors = rng.uniform(40, 215, size=(num_classes, 3))
    freqs = 1 + np.arange(num_classes) % 4
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size

    def make(n: int) -> ImageArrays:
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        stripes = np.sin(2 * np.pi * freqs[labels, None, None] * (xx + yy)[None])  # (n, H, W)
        brightness = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
        images = colors[labels][:, None, None, :] * brightness + 30 * stripes[..., None]
        images = images + rng.normal(0, 20, size=images.shape)
        return as_arrays(np.clip(images, 0, 255).astype(np.uint8), labels)

    return make(train_size), make(test_size), [f"class{c}" for c in range(num_classes)]


# ----------------------------------------------------------------------------- splits


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row numbers into (train, val), each class in val in proportion to its size."""
    n = len(labels)
    if val_size <= 0:
        return np.arange(n), np.empty(0, np.int64)
    if val_size >= n:
        raise ConfigError(f"data.val_size={val_size} leaves no training images (the training set has {n}); lower it")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder allocation: exact total, proportional per class.
    quota = counts * val_size / n
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: val_size - take.sum()]:
        take[i] += 1
    val_rows = []
    for cls, k in zip(classes, take, strict=True):
        rows = np.flatnonzero(labels == cls)
        val_rows.append(rng.permutation(rows)[:k])
    val = np.sort(np.concatenate(val_rows))
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, val


def build_splits(source: str, root: str | None, *, val_size: int, subset: int | None, seed: int,
                 cache: bool = True, image_size: int = 32, num_classes: int = 10,
                 train_size: int = 640, test_size: int = 256) -> DataSplits:
    """Loads a source and splits it: val held out of train (stratified), then `subset` of the rest."""
    if source == "cifar10":
        train, test, classes = load_cifar10(str(root))
    elif source == "folder":
        train, test, classes = load_folder(str(root), image_size=image_size, cache=cache)
    elif source == "synthetic":
        train, test, classes = make_synthetic(num_classes, train_size, test_size, image_size, seed)
    else:
        raise ConfigError(f"data.source={source!r} is not one of {list(SOURCES)}")
    train_rows, val_rows = stratified_split(train.labels, val_size, seed)
    val = train.take(val_rows) if len(val_rows) else None
    if subset is not None and subset < len(train_rows):
        keep, _ = stratified_split(train.labels[train_rows], len(train_rows) - subset, seed + 1)
        train_rows = train_rows[keep]
    return DataSplits(train.take(train_rows), val, test, classes)


# ----------------------------------------------------------------------------- batches


def check_root(root: str) -> None:
    """Checks a folder data root's layout before any work starts: names only (images are decoded on load)."""
    _split_files(_FolderReader(root), root)
