"""What an augmentation preset does at a given image size, for both backends alike.

The presets' pixel sizes (aug.pad, aug.cutout_size) are given for 32-pixel images (CIFAR's) and scale with the
image: at 8 px the seed preset's 16-pixel Cutout is 4 pixels, at 64 px 32, so every preset works at every size
(a hole never outgrows the image, a crop never pads more than half of it). Quarter turns (RandomRotate90) keep a
square image's shape only: on a non-square image only the half turn is drawn, with the probability it has among
the four turns. Cutout fills with the data set's mean colour (after normalization, ~0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cifar_cam.config.choices import AUG_REFERENCE_SIDE as REFERENCE_SIDE
from cifar_cam.config.validate import check_aug_sizes


def scaled(pixels: int | float, side: int) -> int:
    """A length given for a 32-pixel side, at `side` pixels (at least 1 when it was at least 1)."""
    if pixels <= 0:
        return 0
    return max(1, round(float(pixels) * side / REFERENCE_SIDE))


@dataclass(frozen=True)
class Geometry:
    """A preset's sizes and draws at one image size."""

    height: int
    width: int
    pad: tuple[int, int]            # reflect padding of crop_flip's random crop, rows and columns
    cutout: tuple[int, int]         # Cutout's hole, rows and columns
    quarter_turns: bool             # RandomRotate90 may turn by 90 degrees (square images only)
    fill: tuple[int, int, int]      # Cutout's colour

    @property
    def square(self) -> bool:
        return self.height == self.width


def geometry(aug: Mapping[str, Any], height: int, width: int, fill: tuple[int, int, int]) -> Geometry:
    """The sizes the preset in `aug` takes at (height, width)."""
    preset = aug.get("preset", "none")
    pad = int(aug.get("pad", 0)) if preset == "crop_flip" else 0
    hole = int(aug.get("cutout_size", 0)) if preset in ("seed", "crop_flip") else 0
    check_aug_sizes(aug)
    pad_h, pad_w = min(scaled(pad, height), height // 2), min(scaled(pad, width), width // 2)
    hole_h, hole_w = min(scaled(hole, height), height), min(scaled(hole, width), width)
    return Geometry(height, width, (pad_h, pad_w), (hole_h, hole_w), height == width, fill)
