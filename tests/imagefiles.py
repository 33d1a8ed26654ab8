"""Image files for the tests of data=folder / data=csv: class folders of shapes in mixed formats, sizes and
colour modes (learnable in a few steps), corrupt files, and 8x8 grayscale digits."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "stripes")
COLORS = {"circle": (220, 40, 40), "square": (40, 200, 40), "stripes": (40, 40, 220)}


def shape_image(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB (height, width, 3): a noisy gray background with one coloured shape of `kind`."""
    img = (128 + rng.integers(0, 40, (height, width, 3))).astype(np.uint8)
    color = COLORS[kind]
    if kind == "circle":
        cv2.circle(img, (width // 2, height // 2), max(2, min(height, width) // 3), color, -1)
    elif kind == "square":
        cv2.rectangle(img, (width // 4, height // 4), (3 * width // 4, 3 * height // 4), color, -1)
    else:
        img[:: max(2, height // 6)] = color
    return img


def save(img: np.ndarray, path: Path, kind: int) -> Path:
    """Saves `img` as one of four kinds: 0 JPEG, 1 RGBA PNG (partly transparent), 2 grayscale PNG, 3 WebP."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == 0:
        path = path.with_suffix(".jpg")
        Image.fromarray(img).save(path, quality=95)
    elif kind == 1:
        path = path.with_suffix(".png")
        Image.fromarray(np.dstack([img, np.full(img.shape[:2], 220, np.uint8)])).save(path)
    elif kind == 2:
        path = path.with_suffix(".png")
        Image.fromarray(img[..., 0]).save(path)
    else:
        path = path.with_suffix(".webp")
        Image.fromarray(img).save(path, lossless=True)
    return path


def shapes_tree(root: Path, per_class: int = 30, sizes: tuple[int, int] = (30, 90), seed: int = 0,
                layout: str = "classes") -> Path:
    """Three classes of shapes in mixed formats and non-square sizes. layout: classes (bare class folders),
    train/test, or train/val/test (then every per_class image goes to a split by its number)."""
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1], 2))
            if layout == "classes":
                folder = root / kind
            else:
                splits = layout.split("/")
                folder = root / splits[i % len(splits)] / kind
            save(shape_image(kind, h, w, rng), folder / f"{kind}{i:03d}", i % 4)
    return root


def corrupt(path: Path) -> Path:
    """Makes `path` an unreadable image (a JPEG header, then garbage)."""
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"not an image" * 8)
    return path


DIGIT_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_PLAIN,
               cv2.FONT_HERSHEY_COMPLEX_SMALL)


def digit(d: int, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 grayscale digit: drawn at 32 px in a random font, shift and stroke, with noise, then shrunk."""
    big = np.zeros((32, 32), np.uint8)
    font = DIGIT_FONTS[int(rng.integers(len(DIGIT_FONTS)))]
    scale = {cv2.FONT_HERSHEY_PLAIN: 2.2, cv2.FONT_HERSHEY_COMPLEX_SMALL: 1.6}.get(font, 1.0)
    x, y = int(rng.integers(3, 10)), int(rng.integers(24, 30))
    cv2.putText(big, str(d), (x, y), font, scale, 255, int(rng.integers(2, 4)), cv2.LINE_AA)
    small = cv2.resize(big, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32)
    small += rng.normal(0, 12, small.shape)
    return np.clip(small, 0, 255).astype(np.uint8)


def digits_tree(root: Path, per_class: int = 180, seed: int = 0) -> Path:
    """A bare class-folder tree of 8x8 grayscale PNG digits, 10 classes (as sklearn's digits set: 1,797 images)."""
    rng = np.random.default_rng(seed)
    for d in range(10):
        folder = root / str(d)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(digit(d, rng)).save(folder / f"{i:04d}.png")
    return root
