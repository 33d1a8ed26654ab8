"""Training augmentation: albumentations presets on HWC uint8 images, and the training batches of either backend.

Presets (aug.preset):
  seed       the reference recipe: HorizontalFlip, RandomRotate90, Rotate +-10 deg, Cutout
  crop_flip  pad-4 reflect + random crop back to the image's size, HorizontalFlip, Cutout
  none       nothing (normalization happens on the device, for every preset)

Pixel sizes (aug.pad, aug.cutout_size) are given for 32-pixel images and scale with the image
(aug_geometry.py), so every preset works at every size and shape.

Backends (aug.backend):
  albumentations  per image on the CPU, in a DataLoader (LoaderBatches)
  torch           per batch on the training device, from a uint8 copy of the split held there
                  (DeviceBatches): same presets, same distributions, no DataLoader

Progressive resizing (batches.ResizedBatches) and MixUp / CutMix (mix.MixedBatches) wrap either backend's
batches on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cifar_cam.config.choices import BACKENDS, PRESETS
from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD, MEAN_PIXEL, ImageArrays, mean_pixel
from cifar_cam.data.aug_geometry import Geometry, geometry
from cifar_cam.data.batches import Normalizer, balanced_weights, epoch_order, full_batches_end, shard
from cifar_cam.data.device_augment import DeviceBatches
from cifar_cam.errors import ConfigError


def _cutout(g: Geometry, p: float) -> A.CoarseDropout:
    return A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(g.cutout[0], g.cutout[0]),
                           hole_width_range=(g.cutout[1], g.cutout[1]), fill=g.fill, p=p)


def _quarter_turns(g: Geometry, p: float) -> A.BasicTransform:
    """RandomRotate90; on a non-square image only its half turn (both flips), with the half turn's chance p / 4."""
    if g.quarter_turns:
        return A.RandomRotate90(p=p)
    return A.Sequential([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)], p=p / 4)


def build_train_transform(aug: Mapping[str, Any], image_size: int | tuple[int, int] = 32,
                          fill: tuple[int, int, int] = MEAN_PIXEL) -> A.Compose:
    """The albumentations pipeline of a preset (HWC uint8 in, HWC uint8 out) for images of `image_size` (a side or
    (height, width)); Cutout fills with `fill` (the data set's mean colour)."""
    preset = aug["preset"]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    g = geometry(aug, height, width, fill)
    if preset == "seed":
        transforms = [
            A.HorizontalFlip(p=aug["hflip_p"]),
            _quarter_turns(g, aug["rot90_p"]),
            A.Rotate(limit=aug["rotate_limit"], border_mode=cv2.BORDER_REFLECT_101, p=aug["rotate_p"]),
            _cutout(g, aug["cutout_p"]),
        ]
    elif preset == "crop_flip":
        transforms = [
            A.PadIfNeeded(min_height=height + 2 * g.pad[0], min_width=width + 2 * g.pad[1],
                          border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(height=height, width=width),
            A.HorizontalFlip(p=aug["hflip_p"]),
            _cutout(g, aug["cutout_p"]),
        ]
    elif preset == "none":
        transforms = []
    else:
        raise ConfigError(f"aug.preset={preset!r} is not one of {list(PRESETS)}")
    return A.Compose(transforms)


def _reseed(transform: A.Compose, *key: int) -> None:
    """Gives every transform its own stream derived from `key` (one shared seed would correlate them)."""
    seeds = np.random.SeedSequence(list(key)).generate_state(len(transform.transforms) + 1)
    transform.set_random_seed(int(seeds[0]))
    for t, s in zip(transform.transforms, seeds[1:], strict=True):
        t.set_random_seed(int(s))


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding (index, epoch, batch number) keys.

    The order of epoch e depends only on (seed, e), and each batch's augmentation only on
    (seed, e, batch): a run resumed mid-epoch sees exactly the batches it would have seen,
    whatever the number of DataLoader workers.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, weights: Tensor | None = None) -> None:
        self.n, self.batch_size, self.seed, self.weights = n, batch_size, seed, weights
        self.rank, self.world_size = rank, world_size  # DDP: this rank's shard (see shard())
        self.shard_size = -(-n // world_size)
        self.end = full_batches_end(self.shard_size, batch_size, drop_last)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return max(0, self.end - self.start_batch * self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = shard(epoch_order(self.n, self.seed, self.epoch, self.weights), self.rank, self.world_size).tolist()
        for position in range(self.start_batch * self.batch_size, self.end):
            # Batch numbers are global (local batch b of rank r is b*W + r): no two ranks share augmentation draws.
            yield order[position], self.epoch, (position // self.batch_size) * self.world_size + self.rank


class AugmentedArrays(Dataset):
    """Applies the albumentations pipeline per image, reseeded per (epoch, batch)."""

    def __init__(self, arrays: ImageArrays, transform: A.Compose, seed: int) -> None:
        self.images, self.labels = arrays.images, arrays.labels
        self.transform, self.seed = transform, seed
        self._stream: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Tensor, int]:
        index, epoch, batch = key
        if (epoch, batch) != self._stream:
            _reseed(self.transform, self.seed, epoch, batch)
            self._stream = (epoch, batch)
        image = self.transform(image=self.images[index])["image"]
        # a memory-mapped split's rows are read-only: a copy where no transform made one
        return torch.from_numpy(np.require(image, requirements=["C", "W"])), int(self.labels[index])


class LoaderBatches:
    """Training batches through a DataLoader (albumentations backend), normalized on the device."""

    def __init__(self, arrays: ImageArrays, transform: A.Compose, *, batch_size: int, num_workers: int,
                 seed: int, device: torch.device, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD,
                 weights: Tensor | None = None) -> None:
        self.sampler = EpochSampler(len(arrays), batch_size, seed, rank, world_size, drop_last, weights)
        extra: dict[str, Any] = {}
        if num_workers > 0:  # tuned for tiny images: keep workers alive, a few batches in flight each
            extra = {"persistent_workers": True, "prefetch_factor": 4}
        self.loader = DataLoader(AugmentedArrays(arrays, transform, seed), batch_size=batch_size,
                                 sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", **extra)
        self.normalize = Normalizer(device, mean, std)
        self.device = device

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the data order and augmentation of `epoch`, starting at batch `start_batch`."""
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches left in this epoch."""
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            yield self.normalize(images), labels.to(self.device, non_blocking=True)


TrainBatches = LoaderBatches | DeviceBatches


def build_train_batches(arrays: ImageArrays, aug: Mapping[str, Any], *, batch_size: int, num_workers: int,
                        seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                        drop_last: bool = False, mean: tuple[float, ...] = CIFAR10_MEAN,
                        std: tuple[float, ...] = CIFAR10_STD, sampler: str | None = None) -> TrainBatches:
    """The training batches for `aug.backend` (DDP: of this rank's shard); (x, y) on the device, normalized with
    the data's `mean` and `std`. `sampler="balanced"`: each epoch draws the classes evenly (data.sampler).

    `drop_last`: every batch full (a compiled model sees one shape); the epoch's last partial batch is skipped.
    """
    backend = aug.get("backend", "albumentations")
    weights = balanced_weights(arrays.labels) if sampler == "balanced" else None
    if backend == "albumentations":
        transform = build_train_transform(aug, image_size=arrays.image_size, fill=mean_pixel(mean))
        return LoaderBatches(arrays, transform, batch_size=batch_size, num_workers=num_workers,
                             seed=seed, device=device, rank=rank, world_size=world_size, drop_last=drop_last,
                             mean=mean, std=std, weights=weights)
    if backend == "torch":  # num_workers is not used: there is no loader
        return DeviceBatches(arrays, aug, batch_size=batch_size, seed=seed, device=device, rank=rank,
                             world_size=world_size, drop_last=drop_last, mean=mean, std=std, weights=weights)
    raise ConfigError(f"aug.backend={backend!r} is not one of {list(BACKENDS)}")
