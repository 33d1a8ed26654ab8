"""A look at a file source's images as they are on disk, before they are resized: sizes, aspect ratios and
formats from the image headers (no pixel decoded) of a seeded sample, and the data.image_size it suggests.
`cifar-cam data` reports it."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifar_cam.data.decode import read_header
from cifar_cam.data.decode_pool import tar_entries
from cifar_cam.data.listing import Listing

SAMPLE = 2000  # images whose headers are read: enough for the medians, quick for a large set


@dataclass
class Survey:
    """What the headers of a sample of images say."""

    sampled: int
    heights: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)       # L (grayscale), RGB, RGBA, P, ...
    unidentified: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """min / median / max of the heights, widths and aspect ratios (width / height)."""
        if not self.heights:
            return {}
        h, w = np.array(self.heights), np.array(self.widths)

        def three(v: np.ndarray) -> dict[str, float]:
            return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}

        aspect = {k: round(v, 3) for k, v in three(w / h).items()}
        return {"height": three(h), "width": three(w), "aspect_ratio": aspect}

    def suggested_size(self) -> tuple[Any, str]:
        """(data.image_size, why): the median size rounded up to a multiple of 8 within 16..128 (a side, or
        [height, width] when the images are clearly not square)."""
        if not self.heights:
            return 32, "no image size known: CIFAR's 32"
        h, w = float(np.median(self.heights)), float(np.median(self.widths))

        def side(v: float) -> int:
            return int(min(128, max(16, 8 * np.ceil(v / 8))))

        why = f"the images' median size is {int(h)}x{int(w)} (height x width)"
        if min(h, w) < 16:
            why += "; 16 keeps a 2x2 map at the network's last stage"
        elif max(h, w) > 128:
            why += "; larger inputs cost the small-image networks time for little gain"
        if abs(w / h - 1) > 0.15:
            scale = side(min(h, w)) / min(h, w)
            return [side(h * scale), side(w * scale)], why + "; not square: data.resize=pad keeps the whole image"
        return side(min(h, w)), why


def survey(listing: Listing, seed: int = 0, sample: int = SAMPLE) -> Survey:
    """The headers of up to `sample` images of `listing` (a seeded pick), read without decoding the pixels."""
    names = [i.name for i in listing.items]
    picked = sorted(random.Random(seed).sample(names, min(sample, len(names))))
    found = Survey(len(picked))
    if listing.kind == "tar":
        entries = ((name, data) for _, name, data in tar_entries(listing.root, picked, listing.prefix))
    else:
        entries = ((name, _read(listing, name)) for name in picked)
    for name, data in entries:
        header = read_header(data) if data else None
        if header is None:
            found.unidentified.append(name)
            continue
        found.heights.append(header.height)
        found.widths.append(header.width)
        found.formats[header.format] += 1
        found.modes[header.mode or "RGB"] += 1
    return found


def _read(listing: Listing, name: str) -> bytes:
    try:
        with open(listing.path_of(name), "rb") as f:
            return f.read()
    except OSError:
        return b""
