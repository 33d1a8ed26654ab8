"""Batches on the training device: normalization, the fixed-order evaluation batches, the seeded epoch order and
its DDP shards that both augmentation backends share, and progressive resizing.

Images cross to the device as uint8 (4x less traffic than float) and are normalized there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD, ImageArrays
from cifar_cam.io import cores


class Normalizer:
    """uint8 NHWC batch -> normalized float NCHW on the device (channels_last comes free)."""

    def __init__(self, device: torch.device, mean: tuple[float, ...] = CIFAR10_MEAN,
                 std: tuple[float, ...] = CIFAR10_STD) -> None:
        # (x/255 - mean)/std == (x - 255 mean) / (255 std): one subtract, one multiply.
        self.shift = torch.tensor([255 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, 3, 1, 1)
        self.device = device

    def __call__(self, images: Tensor) -> Tensor:
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return (x - self.shift) * self.scale


class EvalBatches:
    """Fixed-order batches of one split, normalized on the device with the data's (or the model's) mean and std;
    no augmentation. The images are read a batch at a time (a memory-mapped split stays on disk)."""

    def __init__(self, arrays: ImageArrays, batch_size: int, device: torch.device,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> None:
        self.images = arrays.images
        self.labels = torch.from_numpy(np.array(arrays.labels))
        self.batch_size = batch_size
        self.normalize = Normalizer(device, tuple(mean), tuple(std))
        self.device = device

    def __len__(self) -> int:
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            stop = start + self.batch_size
            batch = torch.from_numpy(np.require(self.images[start:stop], requirements=["C", "W"]))
            yield self.normalize(batch), self.labels[start:stop].to(self.device, non_blocking=True)


def resolve_num_workers(num_workers: int | str) -> int:
    """`auto`: no workers on <= 2 cores (they only compete with the model there), else cores - 1, max 8."""
    if num_workers == "auto":
        n = cores()
        return 0 if n <= 2 else min(8, n - 1)
    return int(num_workers)


def epoch_order(n: int, seed: int, epoch: int, weights: Tensor | None = None) -> Tensor:
    """The shuffled order of `n` training images in `epoch` (a CPU int64 tensor); both backends use it.

    With `weights` (data.sampler=balanced: 1 / the size of each image's class) the epoch draws `n` images with
    replacement in proportion to them, so every class comes up as often; seeded alike.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is not None:
        return torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def balanced_weights(labels: np.ndarray) -> Tensor:
    """Each image's draw weight under data.sampler=balanced: 1 / the number of images of its class."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels)
    return torch.from_numpy(1.0 / counts[labels]).double()


def shard(order: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s part of an epoch's order for DDP: every world_size-th image, after padding the order
    (by wrapping around) to a multiple of world_size so that every rank gets as many images.

    Local batch b of all ranks together holds images b*W*B .. (b+1)*W*B of the order: one step of W ranks
    sees what one process with batch size W*B would. world_size 1 returns the order unchanged.
    """
    if world_size == 1:
        return order
    per_rank = -(-len(order) // world_size)
    padded = order.repeat(-(-per_rank * world_size // len(order)))[: per_rank * world_size]
    return padded[rank::world_size]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one batch's augmentation draws, from (seed, epoch, batch) alone."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, batch]).generate_state(1, np.uint64)[0])


def full_batches_end(shard_size: int, batch_size: int, drop_last: bool) -> int:
    """Where an epoch's positions end: the shard's end, or (drop_last) the end of its last full batch."""
    return shard_size - shard_size % batch_size if drop_last else shard_size


def epoch_image_size(schedule: Sequence[int] | None, epoch: int, full_size: int) -> int:
    """The training image size of `epoch` (1-based): schedule[epoch - 1] while the schedule lasts, then full size.
    A size is the images' height; their width follows in proportion (the same number for square images)."""
    if schedule and epoch <= len(schedule):
        return int(schedule[epoch - 1])
    return full_size


def downscale(images: Tensor, size: int) -> Tensor:
    """Normalized NCHW batches shrunk to a height of `size` (the width in proportion) by area averaging (each output
    pixel the mean of its window).

    The convnet is resolution-agnostic up to its global pooling, and its cost grows with the pixel
    count, so small epochs are cheap. Area averaging is cheaper than antialiased bilinear and exact
    for integer factors (figures in docs/benchmarks.md).
    """
    height, width = images.shape[-2], images.shape[-1]
    if height == size:
        return images
    return F.interpolate(images, size=(size, max(1, round(size * width / height))), mode="area")


class ResizedBatches:
    """Wraps training batches (either backend) so that every image comes out `size` pixels high."""

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], size: int) -> None:
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.batches:
            yield downscale(images, self.size), labels
