"""The torch backend (aug.backend=torch): distributions, pixels against albumentations, determinism, the CLI."""

from __future__ import annotations

import json
import math

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from cifar_cam.data.arrays import MEAN_PIXEL, ImageArrays
from cifar_cam.data.augment import build_train_batches
from cifar_cam.data.batches import Normalizer, epoch_order
from cifar_cam.data.device_augment import BatchParams, DeviceAugment, DeviceBatches
from cifar_cam.data.sources import make_synthetic
from cifar_cam.errors import ConfigError
from conftest import TINY, only_run_dir, run_cli

CPU = torch.device("cpu")
SEED = {"preset": "seed", "backend": "torch", "hflip_p": 0.5, "rot90_p": 0.5, "rotate_limit": 10,
        "rotate_p": 0.5, "cutout_size": 16, "cutout_p": 0.5}
CROP = {"preset": "crop_flip", "backend": "torch", "pad": 4, "hflip_p": 0.5, "cutout_size": 8, "cutout_p": 0.5}
NONE = {"preset": "none", "backend": "torch"}
N = 40_000  # draws per distribution test: 5 sigma of a rate near 0.5 is 0.0125


def draws(aug: dict, n: int = N) -> BatchParams:
    return DeviceAugment(aug, 32, CPU).draw(n, torch.Generator().manual_seed(0))


def within(rate: float, p: float, n: int) -> bool:
    """rate is within 5 standard errors of p."""
    return abs(rate - p) <= 5 * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def params(n: int, **kw: torch.Tensor) -> BatchParams:
    """No augmentation unless set: crop offsets default to the centre (pad) of crop_flip's window."""
    zeros, no = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
    p = {"top": zeros, "left": zeros, "flip": no, "rot90": zeros, "rotate": no, "angle": torch.zeros(n),
         "hole": no, "hole_top": zeros, "hole_left": zeros}
    return BatchParams(**{**p, **kw})


def apply(aug: dict, imgs: np.ndarray, p: BatchParams) -> torch.Tensor:
    return DeviceAugment(aug, 32, CPU).apply(torch.from_numpy(imgs), torch.arange(len(imgs)), p)


def normalized(imgs: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    return Normalizer(CPU)(torch.from_numpy(np.ascontiguousarray(np.stack(imgs))))


def full(n: int, value: float | int | bool) -> torch.Tensor:
    dtype = torch.bool if isinstance(value, bool) else torch.float32 if isinstance(value, float) else torch.int64
    return torch.full((n,), value, dtype=dtype)


# ----------------------------------------------------------------------------- distributions of the draws


@pytest.mark.parametrize("aug", [SEED, CROP])
def test_flip_and_cutout_rates_match_their_probabilities(aug: dict) -> None:
    p = draws(aug)
    assert within(p.flip.float().mean().item(), aug["hflip_p"], N)
    assert within(p.hole.float().mean().item(), aug["cutout_p"], N)
    q = draws({**aug, "hflip_p": 0.2, "cutout_p": 1.0})
    assert within(q.flip.float().mean().item(), 0.2, N) and bool(q.hole.all())


def test_crop_offsets_are_uniform_over_the_padded_window() -> None:
    p = draws(CROP)
    for offsets in (p.top, p.left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9  # 0..2*pad, both ends included (albumentations RandomCrop)
        for c in counts.tolist():
            assert within(c / N, 1 / 9, N)
    assert not torch.equal(p.top, p.left)
    seed = draws(SEED)  # no crop in the seed recipe
    assert int(seed.top.abs().max()) == 0 and int(seed.left.abs().max()) == 0


def test_cutout_square_lies_inside_the_image_uniformly() -> None:
    for aug in (SEED, CROP):
        p = draws(aug)
        last = 32 - aug["cutout_size"]  # albumentations: integers(0, H - hole + 1)
        for corner in (p.hole_top, p.hole_left):
            counts = torch.bincount(corner, minlength=last + 1)
            assert len(counts) == last + 1
            assert all(within(c / N, 1 / (last + 1), N) for c in counts.tolist())


def test_rotation_angles_are_uniform_within_the_limit() -> None:
    p = draws(SEED)
    assert within(p.rotate.float().mean().item(), SEED["rotate_p"], N)
    angles = p.angle[p.rotate]
    assert float(angles.abs().max()) <= 10 and float(angles.abs().max()) > 9.9
    assert torch.equal(p.angle[~p.rotate], torch.zeros(int((~p.rotate).sum())))
    m = len(angles)
    # uniform on [-10, 10]: mean 0, variance 100/3; a quarter in each 5-degree bin
    assert abs(float(angles.mean())) < 5 * math.sqrt(100 / 3 / m)
    assert abs(float(angles.var()) - 100 / 3) < 0.05 * 100 / 3
    bins = torch.histc(angles, bins=4, min=-10, max=10) / m
    assert all(within(b, 0.25, m) for b in bins.tolist())


def test_quarter_turns_follow_random_rotate90_with_its_probability() -> None:
    p = draws(SEED)
    counts = (torch.bincount(p.rot90, minlength=4) / N).tolist()
    # not applied (1 - p) or applied with factor 0: P(0) = 1 - p + p/4; P(k) = p/4 for k = 1, 2, 3
    assert within(counts[0], 0.5 + 0.125, N)
    assert all(within(c, 0.125, N) for c in counts[1:])
    assert int(draws(CROP).rot90.abs().max()) == 0 and not bool(draws(CROP).rotate.any())


def test_none_preset_draws_nothing() -> None:
    p = draws(NONE, 1000)
    assert not (p.flip.any() or p.hole.any() or p.rotate.any() or p.rot90.any() or p.top.any())


# ----------------------------------------------------------------------------- pixels against the reference ops


def test_crop_matches_reflect101_padding_and_crop() -> None:
    imgs = images()
    padded = [cv2.copyMakeBorder(im, 4, 4, 4, 4, cv2.BORDER_REFLECT_101) for im in imgs]
    for top, left in [(0, 0), (8, 8), (4, 4), (1, 7)]:
        out = apply(CROP, imgs, params(len(imgs), top=full(len(imgs), top), left=full(len(imgs), left)))
        assert torch.equal(out, normalized([p[top:top + 32, left:left + 32] for p in padded]))


def test_flip_and_quarter_turns_match_numpy() -> None:
    imgs = images()
    n = len(imgs)
    for k in range(4):
        for flip in (False, True):
            out = apply(SEED, imgs, params(n, flip=full(n, flip), rot90=full(n, k)))
            want = [np.rot90(im[:, ::-1] if flip else im, k) for im in imgs]  # HorizontalFlip, then RandomRotate90
            assert torch.equal(out, normalized(want)), (k, flip)
    out = apply(CROP, imgs, params(n, top=full(n, 4), left=full(n, 4), flip=full(n, True)))
    assert torch.equal(out, normalized([im[:, ::-1] for im in imgs]))


@pytest.mark.parametrize("angle", [10.0, -7.5, 3.0])
def test_rotation_matches_albumentations_rotate(angle: float) -> None:
    imgs = images()
    n = len(imgs)
    out = apply(SEED, imgs, params(n, rotate=full(n, True), angle=full(n, angle)))
    rotate = A.Rotate(limit=(angle, angle), border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    want = normalized([rotate(image=im)["image"] for im in imgs])
    # albumentations rounds to uint8: about half a grey level apart, never more than one
    levels = (out - want).abs() * 255 * torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert float(levels.max()) <= 1.0 and float(levels.mean()) < 0.35
    not_rotated = apply(SEED, imgs, params(n, rotate=full(n, False), angle=full(n, angle)))
    assert torch.equal(not_rotated, normalized(list(imgs)))


def test_cutout_fills_one_square_with_the_mean_pixel() -> None:
    imgs = np.zeros((4, 32, 32, 3), np.uint8)  # black: the hole (mean grey) stands out
    n = len(imgs)
    top, left = torch.tensor([0, 24, 5, 10]), torch.tensor([0, 24, 7, 3])
    hole = torch.tensor([True, True, True, False])
    out = apply(CROP, imgs, params(n, top=full(n, 4), left=full(n, 4), hole=hole, hole_top=top, hole_left=left))
    fill = normalized([np.full((32, 32, 3), MEAN_PIXEL, np.uint8)])[0, :, 0, 0]
    changed = (out != normalized(list(imgs))).any(1)
    for b in range(n):
        area = changed[b].nonzero()
        if not hole[b]:
            assert len(area) == 0
            continue
        assert len(area) == 64  # 8 x 8, whole inside the image
        assert area[:, 0].min() == top[b] and area[:, 1].min() == left[b]
        assert torch.allclose(out[b, :, top[b]:top[b] + 8, left[b]:left[b] + 8], fill.view(3, 1, 1).expand(3, 8, 8))
    assert float(fill.abs().max()) < 0.01  # the mean pixel normalizes to ~0


# ----------------------------------------------------------------------------- the batches


def synthetic(n: int = 100) -> ImageArrays:
    return make_synthetic(10, n, 1, 32, seed=3)[0]


def test_batches_shape_dtype_layout_and_normalization() -> None:
    train = synthetic()
    batches = build_train_batches(train, SEED, batch_size=32, num_workers=0, seed=1, device=CPU)
    assert isinstance(batches, DeviceBatches)
    batches.set_epoch(1)
    out = list(batches)
    assert len(batches) == 4 and [len(y) for _, y in out] == [32, 32, 32, 4]
    x, y = out[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    labels = torch.cat([y for _, y in out])
    assert torch.equal(labels, torch.from_numpy(train.labels)[epoch_order(len(train), 1, 1)])


def test_none_preset_equals_the_albumentations_backend() -> None:
    """Same order, same normalization: with nothing random both backends give identical batches."""
    train = synthetic(70)
    torch_b = build_train_batches(train, NONE, batch_size=16, num_workers=0, seed=4, device=CPU)
    alb_b = build_train_batches(train, {**NONE, "backend": "albumentations"}, batch_size=16, num_workers=0,
                                seed=4, device=CPU)
    for b in (torch_b, alb_b):
        b.set_epoch(2)
    pairs = list(zip(torch_b, alb_b, strict=True))
    assert len(pairs) == 5
    for (xt, yt), (xa, ya) in pairs:
        assert torch.equal(yt, ya) and torch.allclose(xt, xa, atol=1e-6)


def test_flip_rate_and_cutout_area_of_real_batches() -> None:
    """End to end on batches: a left-right asymmetric image comes out mirrored half the time."""
    gradient = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3))
    train = ImageArrays(np.repeat(gradient[None], 2000, 0).copy(), np.zeros(2000, np.int64), np.arange(2000))
    aug = {**CROP, "pad": 0}
    batches = build_train_batches(train, aug, batch_size=500, num_workers=0, seed=0, device=CPU)
    batches.set_epoch(0)
    x = torch.cat([x for x, _ in batches])
    plain, mirrored = normalized([gradient]), normalized([gradient[:, ::-1]])
    holes = (x != plain).any(1) & (x != mirrored).any(1)  # pixels that are neither: the Cutout square
    is_mirrored = (x[:, :, :, :2] - mirrored[:, :, :, :2]).abs().amax((1, 2, 3)) < 1e-6
    # (the left two columns decide, unless a hole covers them: count only images without one there)
    clear = ~holes[:, :, :2].any((1, 2))
    assert within(is_mirrored[clear].float().mean().item(), 0.5, int(clear.sum()))
    area = holes.sum((1, 2))
    assert set(area.unique().tolist()) <= {0, 64}
    assert within((area == 64).float().mean().item(), 0.5, len(area))


def test_same_seed_epoch_batch_same_batch_and_mid_epoch_resume() -> None:
    train = synthetic()

    def batches() -> DeviceBatches:
        return build_train_batches(train, SEED, batch_size=16, num_workers=0, seed=7, device=CPU)

    a = batches()
    a.set_epoch(3)
    first = [(x.clone(), y.clone()) for x, y in a]
    b = batches()
    b.set_epoch(3, start_batch=4)
    assert len(b) == 3
    rest = list(b)
    assert len(rest) == 3
    for (xa, ya), (xb, yb) in zip(first[4:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(3)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, a, strict=True))  # repeatable
    a.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], first[0][0])
    other = build_train_batches(train, SEED, batch_size=16, num_workers=0, seed=8, device=CPU)
    other.set_epoch(3)
    assert not torch.equal(next(iter(other))[0], first[0][0])


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="aug.pad=32"):
        DeviceAugment({**CROP, "pad": 32}, 32, CPU)
    with pytest.raises(ConfigError, match="aug.cutout_size=40"):
        DeviceAugment({**CROP, "cutout_size": 40}, 32, CPU)
    with pytest.raises(ConfigError, match="aug.backend='jax'"):
        build_train_batches(synthetic(), {**CROP, "backend": "jax"}, batch_size=8, num_workers=0, seed=0,
                            device=CPU)


# ----------------------------------------------------------------------------- the real CLI


def test_cli_trains_with_the_torch_backend(tmp_path) -> None:
    result = run_cli("train", *TINY, "aug=crop_flip", "aug.backend=torch", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = only_run_dir(tmp_path / "outputs" / "train")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0 <= summary["test_acc"] <= 1
    assert (run / "checkpoints" / "last.pt").exists()
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3
