"""What every data source ends as: uint8 images (N, H, W, 3) with int64 labels and their index in the source split
(in memory, or a read-only memory map of the decoded-data cache), the train / val / test splits with the class
names and the per-channel mean and std the model normalizes with, and the CIFAR constants."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # not the (0.2023, 0.1994, 0.2010) found in many repos
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class ImageArrays:
    """Images (N, H, W, 3) uint8, labels (N,) int64, and each image's index in its source split."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    names: list[str] | None = None   # a file source's image names (relative to its root), row by row

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def take(self, rows: np.ndarray) -> ImageArrays:
        """The images at `rows`, keeping their source indices (a copy of just those rows)."""
        names = None if self.names is None else [self.names[i] for i in rows]
        return ImageArrays(self.images[rows], self.labels[rows], self.index[rows], names)


@dataclass
class DataSplits:
    """What every command works on: train / val / test arrays, the class names, the normalization, and what a
    checkpoint keeps to find these very splits again (`identity`)."""

    train: ImageArrays
    val: ImageArrays | None
    test: ImageArrays
    classes: list[str]
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    identity: dict[str, Any] = field(default_factory=dict)
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (split, name, why) of unreadable images
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train, test) names of identical images

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of every split's images."""
        return self.train.image_size

    def normalized_as(self, mean: Any, std: Any) -> DataSplits:
        """The same splits with another normalization (a checkpoint's own)."""
        return replace(self, mean=tuple(mean), std=tuple(std))


def as_arrays(images: np.ndarray, labels: np.ndarray | list[int]) -> ImageArrays:
    labels = np.asarray(labels, dtype=np.int64)
    return ImageArrays(np.ascontiguousarray(images, dtype=np.uint8), labels, np.arange(len(labels)))


def mean_pixel(mean: tuple[float, ...] = CIFAR10_MEAN) -> tuple[int, int, int]:
    """The data set's mean colour in 0..255: Cutout's fill, so that after normalization a hole is ~0."""
    return tuple(round(255 * m) for m in mean)  # type: ignore[return-value]


def channel_stats(images: np.ndarray, block: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (of pixels / 255) of uint8 images (N, H, W, 3), a block of images at a time."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for start in range(0, len(images), block):
        pixels = np.asarray(images[start:start + block], np.float64).reshape(-1, 3)
        total += pixels.sum(0)
        squares += (pixels * pixels).sum(0)
        count += len(pixels)
    return stats_from_sums(total, squares, count)


def stats_from_sums(total: np.ndarray, squares: np.ndarray, count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of pixels / 255 from per-channel sums of pixels and of their squares (0..255 values)."""
    if count == 0:
        return CIFAR10_MEAN, CIFAR10_STD
    mean = total / count
    var = np.maximum(squares / count - mean * mean, 0.0)
    std = np.maximum(np.sqrt(var), 1.0)  # a constant channel (a grayscale set's): no division by zero
    return tuple(round(float(m) / 255, 4) for m in mean), tuple(round(float(s) / 255, 4) for s in std)


# Cutout's fill for CIFAR-10 (augment.py takes the data set's own with mean_pixel)
MEAN_PIXEL = mean_pixel(CIFAR10_MEAN)
