"""The torch backend of the augmentation presets (aug.backend=torch): the same recipes as batched tensor ops on
the training device, drawing from the albumentations distributions, with no DataLoader and no workers. Images of
any size and shape: a preset's sizes at that size come from aug_geometry.py, as for albumentations."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cifar_cam.config.choices import PRESETS
from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD, ImageArrays, mean_pixel
from cifar_cam.data.aug_geometry import geometry
from cifar_cam.data.batches import batch_seed, epoch_order, full_batches_end, shard
from cifar_cam.errors import ConfigError


@dataclass
class BatchParams:
    """The random draws of one batch, one entry per image, all on the device."""

    top: Tensor        # int64 crop row offset into the padded image, uniform in 0..2*pad (rows)
    left: Tensor       # int64 crop column offset, uniform in 0..2*pad (columns)
    flip: Tensor       # bool: mirrored left-right
    rot90: Tensor      # int64 counter-clockwise quarter turns (np.rot90), 0..3 (0 or 2 on non-square images)
    rotate: Tensor     # bool: small rotation applied
    angle: Tensor      # float32 degrees, uniform in [-rotate_limit, rotate_limit]; 0 where not rotated
    hole: Tensor       # bool: Cutout applied
    hole_top: Tensor   # int64 top row of the Cutout hole, uniform in 0..H-hole height
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
    `image_size` is a side or (height, width); `mean` / `std` the data's normalization (Cutout fills with the
    mean colour).
    """

    def __init__(self, aug: Mapping[str, Any], image_size: int | tuple[int, int], device: torch.device,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> None:
        preset = aug["preset"]
        if preset not in PRESETS:
            raise ConfigError(f"aug.preset={preset!r} is not one of {list(PRESETS)}")
        seed_preset = preset == "seed"
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.geometry = g = geometry(aug, height, width, mean_pixel(mean))
        self.height, self.width = height, width
        self.pad_h, self.pad_w = g.pad
        self.hflip_p = float(aug["hflip_p"]) if preset != "none" else 0.0
        self.rot90_p = float(aug["rot90_p"]) if seed_preset else 0.0
        self.rotate_limit = float(aug["rotate_limit"]) if seed_preset else 0.0
        self.rotate_p = float(aug["rotate_p"]) if seed_preset else 0.0
        self.hole_h, self.hole_w = g.cutout
        self.cutout_p = float(aug["cutout_p"]) if preset != "none" else 0.0
        self.device = device
        # Normalization on NHWC floats: (x - 255 mean) / (255 std); Cutout's fill is the normalized mean pixel.
        self.shift = torch.tensor([255 * m for m in mean], device=device)
        self.scale = torch.tensor([1 / (255 * s) for s in std], device=device)
        self.fill = (torch.tensor(g.fill, dtype=torch.float32, device=device) - self.shift) * self.scale
        self._rows = torch.arange(height, device=device).view(1, -1, 1)
        self._cols = torch.arange(width, device=device).view(1, 1, -1)

    def draw(self, n: int, generator: torch.Generator) -> BatchParams:
        """The random parameters of `n` images from `generator` (a fixed sequence of draws)."""
        dev = self.device

        def uniform_int(high: int) -> Tensor:  # uniform in 0..high-1
            return torch.randint(0, high, (n,), generator=generator, device=dev)

        def chance(p: float) -> Tensor:  # rand in [0, 1): p=0 never, p=1 always
            return torch.rand(n, generator=generator, device=dev) < p

        top, left = uniform_int(2 * self.pad_h + 1), uniform_int(2 * self.pad_w + 1)
        flip = chance(self.hflip_p)
        rot90 = torch.where(chance(self.rot90_p), uniform_int(4), 0)
        if not self.geometry.quarter_turns:  # a non-square image keeps its shape: the half turn only
            rot90 = torch.where(rot90 == 2, rot90, 0)
        rotate = chance(self.rotate_p)
        angle = (2 * torch.rand(n, generator=generator, device=dev) - 1) * self.rotate_limit
        angle = torch.where(rotate, angle, 0.0)
        hole = chance(self.cutout_p)
        hole_top, hole_left = uniform_int(self.height - self.hole_h + 1), uniform_int(self.width - self.hole_w + 1)
        return BatchParams(top, left, flip, rot90, rotate, angle, hole, hole_top, hole_left)

    def apply(self, images: Tensor, index: Tensor, params: BatchParams) -> Tensor:
        """images[index] (uint8 NHWC on the device) augmented and normalized: float NCHW, channels_last strides."""
        h, w, i, j = self.height, self.width, self._rows, self._cols
        a, b = i, j  # (1, H, 1) and (1, 1, W): index maps stay this small unless quarter turns mix them
        if self.rot90_p > 0:  # output pixel (i, j) after np.rot90(., k) reads the flipped crop at (a, b)
            k = params.rot90.view(-1, 1, 1)
            if self.geometry.quarter_turns:  # square: h == w
                a = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, h - 1 - i, h - 1 - j)))
                b = torch.where(k == 0, j, torch.where(k == 1, w - 1 - i, torch.where(k == 2, w - 1 - j, i)))
            else:
                a, b = torch.where(k == 2, h - 1 - i, i), torch.where(k == 2, w - 1 - j, j)
        b = torch.where(params.flip.view(-1, 1, 1), w - 1 - b, b)
        # The crop window in the reflect-padded image, mapped back into the unpadded one.
        rows = _reflect101(a + params.top.view(-1, 1, 1) - self.pad_h, h)
        cols = _reflect101(b + params.left.view(-1, 1, 1) - self.pad_w, w)
        pixel = (index.view(-1, 1, 1) * h + rows) * w + cols  # (n, H, W) into the flat pixel list
        x = images.view(-1, 3)[pixel].float().sub_(self.shift).mul_(self.scale)  # (n, H, W, 3), as Normalizer
        if self.rotate_p > 0 and self.rotate_limit > 0:
            x = self._rotate(x, params)
        if self.cutout_p > 0 and self.hole_h > 0:
            top, left = params.hole_top.view(-1, 1, 1), params.hole_left.view(-1, 1, 1)
            inside = ((i >= top) & (i < top + self.hole_h) & (j >= left) & (j < left + self.hole_w)
                      & params.hole.view(-1, 1, 1))
            x = torch.where(inside.unsqueeze(-1), self.fill, x)
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def _rotate(self, x: Tensor, params: BatchParams) -> Tensor:
        """albumentations Rotate: about the centre ((W-1)/2, (H-1)/2), bilinear, BORDER_REFLECT_101.

        With align_corners=True, grid coordinates -1/+1 are the centres of the border pixels, so
        grid_sample's 'reflection' mirrors about them: exactly REFLECT_101. Rotating normalized
        values equals rotating pixels and then normalizing (bilinear weights sum to 1). Every image
        goes through grid_sample and torch.where keeps the unrotated ones: no data-dependent shapes,
        so no host sync. On a non-square image the grid's units differ per axis: the rotation is
        conjugated by their ratio, so it turns the pixels, not the unit square.
        """
        nchw = x.permute(0, 3, 1, 2)
        rad = params.angle * (torch.pi / 180)
        cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
        aspect = (self.height - 1) / max(self.width - 1, 1)  # 1 for a square image
        # cv2's forward matrix is [[cos, sin], [-sin, cos]]; grid_sample wants output -> input: its inverse.
        theta = torch.stack([torch.stack([cos, -sin * aspect, zero], 1), torch.stack([sin / aspect, cos, zero], 1)],
                            1)
        grid = F.affine_grid(theta, list(nchw.shape), align_corners=True)
        rotated = F.grid_sample(nchw, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
        return torch.where(params.rotate.view(-1, 1, 1, 1), rotated, nchw).permute(0, 2, 3, 1)


class DeviceBatches:
    """Training batches augmented on the device (aug.backend=torch): no DataLoader, no workers.

    On a GPU, a split that takes at most a quarter of its memory is held there as uint8 (4x less memory and
    traffic than float); otherwise (and on the CPU) each batch's rows are read from the split (a memory-mapped
    one stays on disk) and moved over. Either way each batch is augmented and normalized on the device. As
    with LoaderBatches, the order of epoch e comes from (seed, e) and each batch's draws from (seed, e, batch),
    so a resumed run continues exactly.
    """

    def __init__(self, arrays: ImageArrays, aug: Mapping[str, Any], *, batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD,
                 weights: Tensor | None = None) -> None:
        _, height, width, _ = arrays.images.shape
        self.arrays = arrays
        resident = device.type == "cuda" and arrays.images.nbytes <= torch.cuda.get_device_properties(
            device).total_memory // 4
        self.images = torch.as_tensor(np.ascontiguousarray(arrays.images)).to(device) if resident else None
        self.labels = torch.as_tensor(arrays.labels, dtype=torch.int64).to(device)
        self.augment = DeviceAugment(aug, (height, width), device, mean, std)
        self.batch_size, self.seed, self.device, self.weights = batch_size, seed, device, weights
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
        order = shard(epoch_order(len(self.labels), self.seed, self.epoch, self.weights), self.rank,
                      self.world_size)
        for batch in range(self.start_batch, self.start_batch + len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            # Global batch number (local b of rank r is b*W + r), as EpochSampler: no two ranks share draws.
            self.generator.manual_seed(batch_seed(self.seed, self.epoch, batch * self.world_size + self.rank))
            params = self.augment.draw(len(index), self.generator)
            if self.images is not None:
                images, rows = self.images, index.to(self.device)
            else:  # just this batch's rows, read from the split (a memory map reads them from disk)
                images = torch.from_numpy(self.arrays.images[index.numpy()]).to(self.device, non_blocking=True)
                rows = torch.arange(len(index), device=self.device)
            yield self.augment.apply(images, rows, params), self.labels[index.to(self.device)]
