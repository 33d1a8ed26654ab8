"""MixUp / CutMix (aug.mix): each batch blended with a shuffled copy of itself on the device, after any resizing,
for either augmentation backend, with soft targets (N, C). Every draw comes from (seed, epoch, batch): a resumed
epoch mixes as the uninterrupted one did."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


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
