"""What every data source ends as: uint8 images (N, H, W, 3) with int64 labels and their index in the source split,
the train / val / test splits with the class names, and the CIFAR-10 constants."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)


CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # not the (0.2023, 0.1994, 0.2010) found in many repos


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageArrays:
    """Images (N, H, W, 3) uint8, labels (N,) int64, and each image's index in its source split."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> ImageArrays:
        """The images at `rows`, keeping their source indices."""
        return ImageArrays(self.images[rows], self.labels[rows], self.index[rows])


@dataclass
class DataSplits:
    """What every command works on: train / val / test arrays and the class names."""

    train: ImageArrays
    val: ImageArrays | None
    test: ImageArrays
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def as_arrays(images: np.ndarray, labels: np.ndarray | list[int]) -> ImageArrays:
    labels = np.asarray(labels, dtype=np.int64)
    return ImageArrays(np.ascontiguousarray(images, dtype=np.uint8), labels, np.arange(len(labels)))


# Cutout fills with the dataset mean: after normalization the hole is ~0, not a black square.
MEAN_PIXEL = tuple(round(255 * m) for m in CIFAR10_MEAN)
