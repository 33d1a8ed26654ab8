"""Training augmentation: albumentations presets on HWC uint8 images, and the training batches.

Presets (aug.preset):
  seed       the reference recipe: HorizontalFlip, RandomRotate90, Rotate +-10 deg, Cutout
  crop_flip  pad-4 reflect + random 32x32 crop, HorizontalFlip, Cutout
  none       nothing (normalization happens on the device, for every preset)

Backends (aug.backend):
  albumentations  per image on the CPU, in a DataLoader (LoaderBatches)
  torch           per batch on the training device, from a uint8 copy of the split held there
                  (DeviceBatches): same presets, same distributions, no DataLoader

Progressive resizing (trainer.progressive_resize): ResizedBatches shrinks either backend's batches
on the device for the epochs the schedule lists.

MixUp / CutMix (aug.mix): MixedBatches blends each batch with a shuffled copy of itself on the device,
after any resizing, for either backend, and turns the labels into soft targets (N, C).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cifar_cam.choices import BACKENDS, PRESETS
from cifar_cam.data import CIFAR10_MEAN, CIFAR10_STD, ImageArrays, Normalizer
from cifar_cam.errors import ConfigError

# Cutout fills with the dataset mean: after normalization the hole is ~0, not a black square.
MEAN_PIXEL = tuple(round(255 * m) for m in CIFAR10_MEAN)


def _cutout(size: int, p: float) -> A.CoarseDropout:
    return A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(size, size),
                           hole_width_range=(size, size), fill=MEAN_PIXEL, p=p)


def build_train_transform(aug: Mapping[str, Any], image_size: int = 32) -> A.Compose:
    """The albumentations pipeline of a preset (HWC uint8 in, HWC uint8 out)."""
    preset = aug["preset"]
    if preset == "seed":
        transforms = [
            A.HorizontalFlip(p=aug["hflip_p"]),
            A.RandomRotate90(p=aug["rot90_p"]),
            A.Rotate(limit=aug["rotate_limit"], border_mode=cv2.BORDER_REFLECT_101, p=aug["rotate_p"]),
            _cutout(aug["cutout_size"], aug["cutout_p"]),
        ]
    elif preset == "crop_flip":
        padded = image_size + 2 * aug["pad"]
        transforms = [
            A.PadIfNeeded(min_height=padded, min_width=padded, border_mode=cv2.BORDER_REFLECT_101),
            A.RandomCrop(height=image_size, width=image_size),
            A.HorizontalFlip(p=aug["hflip_p"]),
            _cutout(aug["cutout_size"], aug["cutout_p"]),
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


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of `n` training images in `epoch` (a CPU int64 tensor); both backends use it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


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


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding (index, epoch, batch number) keys.

    The order of epoch e depends only on (seed, e), and each batch's augmentation only on
    (seed, e, batch): a run resumed mid-epoch sees exactly the batches it would have seen,
    whatever the number of DataLoader workers.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size  # DDP: this rank's shard (see shard())
        self.shard_size = -(-n // world_size)
        self.end = full_batches_end(self.shard_size, batch_size, drop_last)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return max(0, self.end - self.start_batch * self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = shard(epoch_order(self.n, self.seed, self.epoch), self.rank, self.world_size).tolist()
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
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.labels[index])


class LoaderBatches:
    """Training batches through a DataLoader (albumentations backend), normalized on the device."""

    def __init__(self, arrays: ImageArrays, transform: A.Compose, *, batch_size: int, num_workers: int,
                 seed: int, device: torch.device, rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        self.sampler = EpochSampler(len(arrays), batch_size, seed, rank, world_size, drop_last)
        extra: dict[str, Any] = {}
        if num_workers > 0:  # tuned for tiny images: keep workers alive, a few batches in flight each
            extra = {"persistent_workers": True, "prefetch_factor": 4}
        self.loader = DataLoader(AugmentedArrays(arrays, transform, seed), batch_size=batch_size,
                                 sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", **extra)
        self.normalize = Normalizer(device)
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


# ----------------------------------------------------------------------------- the torch backend


@dataclass
class BatchParams:
    """The random draws of one batch, one entry per image, all on the device."""

    top: Tensor        # int64 crop row offset into the padded image, uniform in 0..2*pad
    left: Tensor       # int64 crop column offset, uniform in 0..2*pad
    flip: Tensor       # bool: mirrored left-right
    rot90: Tensor      # int64 counter-clockwise quarter turns (np.rot90), 0..3
    rotate: Tensor     # bool: small rotation applied
    angle: Tensor      # float32 degrees, uniform in [-rotate_limit, rotate_limit]; 0 where not rotated
    hole: Tensor       # bool: Cutout applied
    hole_top: Tensor   # int64 top row of the Cutout square, uniform in 0..H-cutout_size
    hole_left: Tensor  # int64 left column of the Cutout square


def _reflect101(r: Tensor, size: int) -> Tensor:
    """Index r in [-(size-1), 2(size-1)] mirrored into the image as cv2.BORDER_REFLECT_101 does (-1 -> 1)."""
    r = r.abs()
    return (size - 1) - ((size - 1) - r).abs()


class DeviceAugment:
    """A preset as batched tensor ops on the device, drawing from the albumentations distributions.

    Composition order: crop (crop_flip), flip, RandomRotate90 then Rotate (seed), Cutout: the order of
    the albumentations pipelines. Crop, flip and quarter turns are one index map into the uint8 images
    (a single gather, no padded copy); Rotate is a bilinear grid_sample with REFLECT_101 borders.
    """

    def __init__(self, aug: Mapping[str, Any], image_size: int, device: torch.device) -> None:
        preset = aug["preset"]
        if preset not in PRESETS:
            raise ConfigError(f"aug.preset={preset!r} is not one of {list(PRESETS)}")
        seed_preset, crop_preset = preset == "seed", preset == "crop_flip"
        self.size = image_size
        self.pad = int(aug["pad"]) if crop_preset else 0
        self.hflip_p = float(aug["hflip_p"]) if preset != "none" else 0.0
        self.rot90_p = float(aug["rot90_p"]) if seed_preset else 0.0
        self.rotate_limit = float(aug["rotate_limit"]) if seed_preset else 0.0
        self.rotate_p = float(aug["rotate_p"]) if seed_preset else 0.0
        self.cutout_size = int(aug["cutout_size"]) if preset != "none" else 0
        self.cutout_p = float(aug["cutout_p"]) if preset != "none" else 0.0
        if self.pad >= image_size:
            raise ConfigError(f"aug.pad={self.pad} must be smaller than the image size ({image_size} pixels)")
        if self.cutout_size > image_size:
            raise ConfigError(f"aug.cutout_size={self.cutout_size} is larger than the images ({image_size} pixels)")
        self.device = device
        # Normalization on NHWC floats: (x - 255 mean) / (255 std); Cutout's fill is the normalized mean pixel.
        self.shift = torch.tensor([255 * m for m in CIFAR10_MEAN], device=device)
        self.scale = torch.tensor([1 / (255 * s) for s in CIFAR10_STD], device=device)
        self.fill = (torch.tensor(MEAN_PIXEL, dtype=torch.float32, device=device) - self.shift) * self.scale
        self._rows = torch.arange(image_size, device=device).view(1, -1, 1)
        self._cols = torch.arange(image_size, device=device).view(1, 1, -1)

    def draw(self, n: int, generator: torch.Generator) -> BatchParams:
        """The random parameters of `n` images from `generator` (a fixed sequence of draws)."""
        dev, s = self.device, self.size

        def uniform_int(high: int) -> Tensor:  # uniform in 0..high-1
            return torch.randint(0, high, (n,), generator=generator, device=dev)

        def chance(p: float) -> Tensor:  # rand in [0, 1): p=0 never, p=1 always
            return torch.rand(n, generator=generator, device=dev) < p

        top, left = uniform_int(2 * self.pad + 1), uniform_int(2 * self.pad + 1)
        flip = chance(self.hflip_p)
        rot90 = torch.where(chance(self.rot90_p), uniform_int(4), 0)
        rotate = chance(self.rotate_p)
        angle = (2 * torch.rand(n, generator=generator, device=dev) - 1) * self.rotate_limit
        angle = torch.where(rotate, angle, 0.0)
        hole = chance(self.cutout_p)
        hole_top, hole_left = uniform_int(s - self.cutout_size + 1), uniform_int(s - self.cutout_size + 1)
        return BatchParams(top, left, flip, rot90, rotate, angle, hole, hole_top, hole_left)

    def apply(self, images: Tensor, index: Tensor, params: BatchParams) -> Tensor:
        """images[index] (uint8 NHWC on the device) augmented and normalized: float NCHW, channels_last strides."""
        s, i, j = self.size, self._rows, self._cols
        a, b = i, j  # (1, H, 1) and (1, 1, W): index maps stay this small unless quarter turns mix them
        if self.rot90_p > 0:  # output pixel (i, j) after np.rot90(., k) reads the flipped crop at (a, b)
            k = params.rot90.view(-1, 1, 1)
            a = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, s - 1 - i, s - 1 - j)))
            b = torch.where(k == 0, j, torch.where(k == 1, s - 1 - i, torch.where(k == 2, s - 1 - j, i)))
        b = torch.where(params.flip.view(-1, 1, 1), s - 1 - b, b)
        # The crop window in the reflect-padded image, mapped back into the unpadded one.
        rows = _reflect101(a + params.top.view(-1, 1, 1) - self.pad, s)
        cols = _reflect101(b + params.left.view(-1, 1, 1) - self.pad, s)
        pixel = (index.view(-1, 1, 1) * s + rows) * s + cols  # (n, H, W) into the flat pixel list
        x = images.view(-1, 3)[pixel].float().sub_(self.shift).mul_(self.scale)  # (n, H, W, 3), as Normalizer
        if self.rotate_p > 0 and self.rotate_limit > 0:
            x = self._rotate(x, params)
        if self.cutout_p > 0 and self.cutout_size > 0:
            c = self.cutout_size
            top, left = params.hole_top.view(-1, 1, 1), params.hole_left.view(-1, 1, 1)
            inside = (i >= top) & (i < top + c) & (j >= left) & (j < left + c) & params.hole.view(-1, 1, 1)
            x = torch.where(inside.unsqueeze(-1), self.fill, x)
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def _rotate(self, x: Tensor, params: BatchParams) -> Tensor:
        """albumentations Rotate: about the centre ((W-1)/2, (H-1)/2), bilinear, BORDER_REFLECT_101.

        With align_corners=True, grid coordinates -1/+1 are the centres of the border pixels, so
        grid_sample's 'reflection' mirrors about them: exactly REFLECT_101. Rotating normalized
        values equals rotating pixels and then normalizing (bilinear weights sum to 1). Every image
        goes through grid_sample and torch.where keeps the unrotated ones: no data-dependent shapes,
        so no host sync.
        """
        nchw = x.permute(0, 3, 1, 2)
        rad = params.angle * (torch.pi / 180)
        cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
        # cv2's forward matrix is [[cos, sin], [-sin, cos]]; grid_sample wants output -> input: its inverse.
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(nchw.shape), align_corners=True)
        rotated = F.grid_sample(nchw, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        return torch.where(params.rotate.view(-1, 1, 1, 1), rotated, nchw).permute(0, 2, 3, 1)


class DeviceBatches:
    """Training batches augmented on the device (aug.backend=torch): no DataLoader, no workers.

    The whole split is held on the device as uint8 (4x less memory and traffic than float); each
    batch is gathered, augmented and normalized there. As with LoaderBatches, the order of epoch e
    comes from (seed, e) and each batch's draws from (seed, e, batch), so a resumed run continues
    exactly.
    """

    def __init__(self, arrays: ImageArrays, aug: Mapping[str, Any], *, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        n, height, width, _ = arrays.images.shape
        if height != width:
            raise ConfigError(f"aug.backend=torch needs square images, got {height}x{width}; set data.image_size")
        self.images = torch.as_tensor(np.ascontiguousarray(arrays.images)).to(device)
        self.labels = torch.as_tensor(arrays.labels, dtype=torch.int64).to(device)
        self.augment = DeviceAugment(aug, image_size=height, device=device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world_size = rank, world_size  # DDP: this rank's shard (see shard())
        self.shard_size = -(-len(self.labels) // world_size)
        self.end = full_batches_end(self.shard_size, batch_size, drop_last)
        self.epoch, self.start_batch = 0, 0
        self.generator = torch.Generator(device=device)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the data order and augmentation of `epoch`, starting at batch `start_batch`."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches left in this epoch."""
        total = (self.end + self.batch_size - 1) // self.batch_size
        return max(0, total - self.start_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = shard(epoch_order(len(self.labels), self.seed, self.epoch), self.rank, self.world_size)
        order = order.to(self.device)
        for batch in range(self.start_batch, self.start_batch + len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            # Global batch number (local b of rank r is b*W + r), as EpochSampler: no two ranks share draws.
            self.generator.manual_seed(batch_seed(self.seed, self.epoch, batch * self.world_size + self.rank))
            params = self.augment.draw(len(index), self.generator)
            yield self.augment.apply(self.images, index, params), self.labels[index]


# ----------------------------------------------------------------------------- progressive resizing


def epoch_image_size(schedule: Sequence[int] | None, epoch: int, full_size: int) -> int:
    """The training image size of `epoch` (1-based): schedule[epoch - 1] while the schedule lasts, then full size."""
    if schedule and epoch <= len(schedule):
        return int(schedule[epoch - 1])
    return full_size


def downscale(images: Tensor, size: int) -> Tensor:
    """Normalized NCHW batches shrunk to size x size by area averaging (each output pixel the mean of its window).

    The convnet is resolution-agnostic up to its global pooling, and its cost grows with the pixel
    count, so small epochs are cheap. Area averaging is cheaper than antialiased bilinear and exact
    for integer factors (figures in docs/benchmarks.md).
    """
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


class ResizedBatches:
    """Wraps training batches (either backend) so that every image comes out at `size` x `size` pixels."""

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], size: int) -> None:
        self.batches, self.size = batches, size

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.batches:
            yield downscale(images, self.size), labels


# ----------------------------------------------------------------------------- MixUp / CutMix


def mix_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one batch's mixing draws, from (seed, epoch, batch) alone; apart from the augmentation's."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, epoch, batch, 0x6D6978]))  # "mix"


def cutmix_box(size: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) of about (1 - lam) of a size x size image, centred uniformly and clipped
    at the borders (Yun et al. 2019, as timm's rand_bbox)."""
    cut = int(size * np.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(size)), int(rng.integers(size))
    top, bottom = np.clip([cy - cut // 2, cy + cut // 2], 0, size)
    left, right = np.clip([cx - cut // 2, cx + cut // 2], 0, size)
    return int(top), int(bottom), int(left), int(right)


def mix_batch(images: Tensor, labels: Tensor, num_classes: int, mix: Mapping[str, Any],
              rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """One batch mixed with a permutation of itself: (images, soft targets (N, C)).

    With probability aug.mix_p the batch is mixed: MixUp blends whole images, x = lam x_i + (1 - lam) x_j with
    lam ~ Beta(mixup_alpha, mixup_alpha); CutMix pastes a box of x_j into x_i with lam ~ Beta(cutmix_alpha,
    cutmix_alpha), lam then set to the kept area. The target is lam one_hot(y_i) + (1 - lam) one_hot(y_j)
    (one lam per batch, as timm's batch mode). An unmixed batch gets one-hot targets. Every draw comes from
    `rng`, so the same (seed, epoch, batch) mixes alike on any device.
    """
    targets = F.one_hot(labels, num_classes).to(torch.float32)
    mode = mix["mix"]
    if rng.random() >= float(mix.get("mix_p", 1.0)):
        return images, targets
    if mode == "both":
        mode = "mixup" if rng.random() < 0.5 else "cutmix"
    perm = torch.from_numpy(rng.permutation(len(labels))).to(images.device)
    if mode == "mixup":
        alpha = float(mix["mixup_alpha"])
        lam = float(rng.beta(alpha, alpha))
        images = images.lerp(images[perm], 1.0 - lam)
    else:
        alpha = float(mix["cutmix_alpha"])
        lam = float(rng.beta(alpha, alpha))
        top, bottom, left, right = cutmix_box(images.shape[-1], lam, rng)
        images = images.clone()
        images[:, :, top:bottom, left:right] = images[perm][:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-1] * images.shape[-2])
    return images, targets.lerp(targets[perm], 1.0 - lam)


class MixedBatches:
    """Wraps one epoch's training batches (either backend, resized or not) with MixUp / CutMix (mix_batch).

    Batch b of this epoch draws from mix_rng(seed, epoch, global batch number): a resumed epoch starting at
    `start_batch` mixes its batches as the uninterrupted run did; DDP ranks draw apart (b*W + r, as the
    augmentation does).
    """

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], mix: Mapping[str, Any], *, num_classes: int,
                 seed: int, epoch: int, start_batch: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.batches, self.mix, self.num_classes = batches, mix, num_classes
        self.seed, self.epoch, self.start_batch, self.rank, self.world_size = seed, epoch, start_batch, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch, (images, labels) in enumerate(self.batches, start=self.start_batch):
            rng = mix_rng(self.seed, self.epoch, batch * self.world_size + self.rank)
            yield mix_batch(images, labels, self.num_classes, self.mix, rng)


TrainBatches = LoaderBatches | DeviceBatches


def build_train_batches(arrays: ImageArrays, aug: Mapping[str, Any], *, batch_size: int, num_workers: int,
                        seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                        drop_last: bool = False) -> TrainBatches:
    """The training batches for `aug.backend` (DDP: of this rank's shard); normalized (x, y) on the device.

    `drop_last`: every batch full (a compiled model sees one shape); the epoch's last partial batch is skipped.
    """
    backend = aug.get("backend", "albumentations")
    if backend == "albumentations":
        transform = build_train_transform(aug, image_size=arrays.images.shape[1])
        return LoaderBatches(arrays, transform, batch_size=batch_size, num_workers=num_workers,
                             seed=seed, device=device, rank=rank, world_size=world_size, drop_last=drop_last)
    if backend == "torch":  # num_workers is not used: there is no loader
        return DeviceBatches(arrays, aug, batch_size=batch_size, seed=seed, device=device, rank=rank,
                             world_size=world_size, drop_last=drop_last)
    raise ConfigError(f"aug.backend={backend!r} is not one of {list(BACKENDS)}")
