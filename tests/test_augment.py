"""The albumentations presets and the training batches."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch

from cifar_cam.data.augment import EpochSampler, build_train_batches, build_train_transform
from cifar_cam.data.sources import make_synthetic
from cifar_cam.errors import ConfigError

SEED = {"preset": "seed", "backend": "albumentations", "hflip_p": 0.5, "rot90_p": 0.5, "rotate_limit": 10,
        "rotate_p": 0.5, "cutout_size": 16, "cutout_p": 0.5}
CROP = {"preset": "crop_flip", "backend": "albumentations", "pad": 4, "hflip_p": 0.5, "cutout_size": 8,
        "cutout_p": 0.5}


def test_seed_preset_is_the_reference_recipe() -> None:
    t = build_train_transform(SEED)
    kinds = [type(x) for x in t.transforms]
    assert kinds == [A.HorizontalFlip, A.RandomRotate90, A.Rotate, A.CoarseDropout]
    rotate, cutout = t.transforms[2], t.transforms[3]
    assert tuple(rotate.limit) == (-10, 10)
    assert tuple(cutout.hole_height_range) == (16, 16) and tuple(cutout.num_holes_range) == (1, 1)


def test_crop_flip_preset() -> None:
    t = build_train_transform(CROP)
    assert [type(x) for x in t.transforms] == [A.PadIfNeeded, A.RandomCrop, A.HorizontalFlip, A.CoarseDropout]
    assert t.transforms[0].min_height == 40 and t.transforms[1].height == 32


def test_none_preset_is_identity_and_unknown_is_refused() -> None:
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(build_train_transform({"preset": "none"})(image=image)["image"], image)
    with pytest.raises(ConfigError, match="aug.preset='mixup'"):
        build_train_transform({"preset": "mixup"})


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    s = EpochSampler(50, batch_size=8, seed=1)
    s.epoch = 3
    first = list(s)
    assert sorted(i for i, _, _ in first) == list(range(50)) and {e for _, e, _ in first} == {3}
    assert [b for _, _, b in first] == [p // 8 for p in range(50)]
    assert list(s) == first
    s.start_batch = 2
    assert list(s) == first[16:] and len(s) == 34
    s.start_batch, s.epoch = 0, 4
    assert list(s) != first


def test_loader_batches_are_normalized_deterministic_and_resumable() -> None:
    train, _, _ = make_synthetic(10, 40, 10, 32, seed=0)

    def batches():
        return build_train_batches(train, SEED, batch_size=16, num_workers=0, seed=5, device=torch.device("cpu"))

    a = batches()
    a.set_epoch(2)
    xs = [(x.clone(), y.clone()) for x, y in a]
    assert len(xs) == 3 and xs[0][0].shape == (16, 3, 32, 32) and xs[0][0].dtype == torch.float32
    assert -3 < xs[0][0].mean() < 3
    b = batches()  # a fresh process-like object gives the same epoch...
    b.set_epoch(2, start_batch=1)  # ...also when starting mid-epoch
    assert len(b) == 2
    for (xa, ya), (xb, yb) in zip(xs[1:], b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(3)
    assert not torch.equal(next(iter(b))[0], xs[0][0])
