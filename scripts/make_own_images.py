"""A small "own images" set for the docs' worked example: some CIFAR-10 classes re-saved larger, as a bare tree.

    python scripts/make_own_images.py OUT [--data ../shared/data/cifar10-jpg.tar.gz] [--classes cat dog horse]
                                          [--per-class 1200] [--size 64] [--seed 0]

Reads the JPEG copy of CIFAR-10 (../shared/data), picks `--per-class` images of each class from its train and
test folders (seeded), upscales each to `--size` px (bicubic) and writes OUT/<class>/<n>.{jpg,png,webp}: a
folder of class folders with no split, in mixed formats, as people hold their images. `cifar-cam data` and
`cifar-cam train data=folder data.root=OUT` split it themselves (data.split).
"""

from __future__ import annotations

import argparse
import random
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np

FORMATS = (".jpg", ".jpg", ".png", ".webp")  # mostly JPEG, as photo folders are


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" /
                        "cifar10-jpg.tar.gz")
    parser.add_argument("--classes", nargs="+", default=["cat", "dog", "horse"])
    parser.add_argument("--per-class", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    if not opts.data.is_file():
        sys.exit(f"make_own_images: {opts.data} not found; pass --data <cifar10-jpg.tar.gz>")
    if opts.out.exists() and any(opts.out.iterdir()):
        sys.exit(f"make_own_images: {opts.out} is not empty; pass a new folder")
    with tarfile.open(opts.data) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_class: dict[str, list[tarfile.TarInfo]] = {c: [] for c in opts.classes}
        for m in members:
            parts = Path(m.name).parts
            if len(parts) >= 3 and parts[-2] in by_class:
                by_class[parts[-2]].append(m)
        rng = random.Random(opts.seed)
        for name, found in by_class.items():
            if len(found) < opts.per_class:
                sys.exit(f"make_own_images: class {name!r} has {len(found)} images, fewer than --per-class")
            (opts.out / name).mkdir(parents=True, exist_ok=True)
            for n, member in enumerate(sorted(rng.sample(found, opts.per_class), key=lambda m: m.name)):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                image = cv2.resize(image, (opts.size, opts.size), interpolation=cv2.INTER_CUBIC)
                cv2.imwrite(str(opts.out / name / f"{n:05d}{FORMATS[n % len(FORMATS)]}"), image)
    print(f"wrote {len(opts.classes)} x {opts.per_class} images at {opts.size} px to {opts.out}")


if __name__ == "__main__":
    main()
