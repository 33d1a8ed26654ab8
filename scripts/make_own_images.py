"""Small "own images" sets from the JPEG copy of CIFAR-10: the docs' worked example and the transfer experiment.

    python scripts/make_own_images.py OUT [--data ../shared/data/cifar10-jpg.tar.gz] [--classes cat dog horse]
                                          [--per-class 1200] [--size 64] [--seed 0] [--keep-split]

Without --keep-split: `--per-class` images of each class from the archive's train and test folders (seeded),
resized to `--size` px (bicubic) and written as OUT/<class>/<n>.{jpg,png,webp}: a folder of class folders with
no split, in mixed formats, as people hold their images (`cifar-cam train data=folder data.root=OUT` splits it
by data.split). With --keep-split: OUT/train/<class>/ gets `--per-class` of the class's training images (seeded)
and OUT/test/<class>/ all of its test images, as JPEGs (the transfer experiment: few training images, the full
test set).
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
    parser.add_argument("--keep-split", action="store_true", help="train/ (--per-class each) and test/ (all)")
    opts = parser.parse_args(argv)
    if not opts.data.is_file():
        sys.exit(f"make_own_images: {opts.data} not found; pass --data <cifar10-jpg.tar.gz>")
    if opts.out.exists() and any(opts.out.iterdir()):
        sys.exit(f"make_own_images: {opts.out} is not empty; pass a new folder")
    with tarfile.open(opts.data) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_class: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            parts = Path(m.name).parts
            if len(parts) >= 3 and parts[-2] in opts.classes:
                split = "test" if "test" in parts[:-2] else "train"
                by_class.setdefault((parts[-2] if not opts.keep_split else f"{split}/{parts[-2]}", split), []).append(m)
        rng = random.Random(opts.seed)
        wanted: dict[str, list[tarfile.TarInfo]] = {}
        for (folder, split), found in sorted(by_class.items()):
            if opts.keep_split and split == "test":
                wanted[folder] = found  # every test image
            else:
                wanted.setdefault(folder, []).extend(found)
        for folder, found in wanted.items():
            take = len(found) if opts.keep_split and folder.startswith("test/") else opts.per_class
            if len(found) < take:
                sys.exit(f"make_own_images: {folder!r} has {len(found)} images, fewer than --per-class")
            (opts.out / folder).mkdir(parents=True, exist_ok=True)
            for n, member in enumerate(sorted(rng.sample(found, take), key=lambda m: m.name)):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
                if image.shape[:2] != (opts.size, opts.size):
                    image = cv2.resize(image, (opts.size, opts.size), interpolation=cv2.INTER_CUBIC)
                suffix = ".jpg" if opts.keep_split else FORMATS[n % len(FORMATS)]
                cv2.imwrite(str(opts.out / folder / f"{n:05d}{suffix}"), image)
    print(f"wrote {sum(len(list((opts.out / f).iterdir())) for f in wanted)} images of {len(opts.classes)} classes at "
          f"{opts.size} px to {opts.out}")


if __name__ == "__main__":
    main()
