"""Sources, the stratified split, subset, and device normalization."""

from __future__ import annotations

import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD
from cifar_cam.data.batches import EvalBatches, Normalizer
from cifar_cam.data.decode import Fit
from cifar_cam.data.sources import DataSpec, build_splits, make_synthetic
from cifar_cam.data.splitting import stratified_split
from cifar_cam.errors import ConfigError, DataError


def load_folder(root: str, image_size: int = 32, cache: bool = True):  # noqa: ANN201
    """A train/test tree's (train, test, classes), no val split held out (as the old load_folder gave them)."""
    splits = build_splits(DataSpec("folder", root, val_size=0, fit=Fit.of(image_size), cache=cache))
    return splits.train, splits.test, splits.classes


def test_cifar10_statistics_are_the_correct_ones() -> None:
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def test_normalizer_matches_reference_formula() -> None:
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    x = Normalizer(torch.device("cpu"))(images)
    ref = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CIFAR10_STD).view(1, 3, 1, 1)
    assert x.shape == (4, 3, 32, 32)
    assert torch.allclose(x, ref, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_synthetic_is_deterministic_and_balanced() -> None:
    a_train, a_test, classes = make_synthetic(10, 200, 50, 32, seed=3)
    b_train, _, _ = make_synthetic(10, 200, 50, 32, seed=3)
    c_train, _, _ = make_synthetic(10, 200, 50, 32, seed=4)
    assert np.array_equal(a_train.images, b_train.images) and not np.array_equal(a_train.images, c_train.images)
    assert a_train.images.dtype == np.uint8 and a_train.images.shape == (200, 32, 32, 3)
    assert np.bincount(a_train.labels).tolist() == [20] * 10 and len(classes) == 10


def test_stratified_split_is_disjoint_proportional_and_seeded() -> None:
    labels = np.repeat(np.arange(10), [500] * 5 + [100] * 5)  # unbalanced on purpose
    train, val = stratified_split(labels, 600, seed=0)
    assert len(val) == 600 and len(train) == len(labels) - 600
    assert not set(train) & set(val) and set(train) | set(val) == set(range(len(labels)))
    per_class = np.bincount(labels[val], minlength=10)
    assert per_class.tolist() == [100] * 5 + [20] * 5  # exactly proportional
    assert np.array_equal(stratified_split(labels, 600, seed=0)[1], val)
    assert not np.array_equal(stratified_split(labels, 600, seed=1)[1], val)


def test_val_size_too_large_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data.val_size=100 leaves no training images \(the training set has 100\); "
                                          r"use data.val_size=10 or a fraction such as data.val_size=0.1"):
        stratified_split(np.zeros(100, np.int64), 100, seed=0)


def test_build_splits_subset_and_val() -> None:
    splits = build_splits(DataSpec("synthetic", None, val_size=40, subset=100, seed=0, train_size=400, test_size=30))
    assert len(splits.val) == 40 and len(splits.train) == 100 and len(splits.test) == 30
    assert np.bincount(splits.train.labels).tolist() == [10] * 10       # the subset is stratified too
    assert not set(splits.train.index) & set(splits.val.index)          # source indices stay disjoint
    no_val = build_splits(DataSpec("synthetic", None, val_size=0, subset=None, seed=0, train_size=400, test_size=30))
    assert no_val.val is None and len(no_val.train) == 400
    fraction = build_splits(DataSpec("synthetic", None, val_size=0.25, seed=0, train_size=400, test_size=30))
    assert len(fraction.val) == 100 and len(fraction.train) == 300  # data.val_size as a fraction of train


def _write_folder(root: Path, classes: dict[str, int], size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, (name, n) in enumerate(classes.items()):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.full((size, size, 3), 20 * c, np.uint8) + rng.integers(0, 5, (size, size, 3), dtype=np.uint8)
                cv2.imwrite(str(d / f"{i:04d}.png"), img)


def test_folder_directory_and_archive_decode_the_same(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _write_folder(root, {"cat": 3, "dog": 2})
    train, test, classes = load_folder(str(root), cache=False)
    assert classes == ["cat", "dog"] and train.images.shape == (5, 32, 32, 3)
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert train.images[3, 0, 0, 0] >= 20  # dog pixels, RGB order kept (grey images: any channel)
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    a_train, a_test, a_classes = load_folder(str(archive), cache=False)
    assert a_classes == classes and np.array_equal(a_train.images, train.images)
    assert np.array_equal(a_test.labels, test.labels)


def test_folder_cache_is_used_second_time(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _write_folder(root, {"a": 2, "b": 2})
    first = load_folder(str(root))[0]
    assert len(list((tmp_path / ".cache").glob("split-*"))) == 2  # train and test: an entry a split
    second = load_folder(str(root))[0]
    assert np.array_equal(first.images, second.images)
    assert isinstance(second.images, np.memmap)  # read back from disk, not held in memory


def test_folder_resizes_other_sizes(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _write_folder(root, {"a": 1, "b": 1}, size=48)
    train, _, _ = load_folder(str(root), image_size=32, cache=False)
    assert train.images.shape == (2, 32, 32, 3)


def test_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_folder(str(tmp_path / "nope"))
    root = tmp_path / "imgs"
    _write_folder(root, {"a": 1, "b": 1})
    bad = root / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not an image")
    splits = build_splits(DataSpec("folder", str(root), val_size=0, cache=False))
    assert [(s, n) for s, n, _ in splits.bad] == [("train", "train/a/broken.jpg")]
    assert "cannot decode image train/a/broken.jpg" in splits.bad[0][2] and len(splits.train) == 2  # the others


def test_eval_batches_cover_split_in_order() -> None:
    train, _, _ = make_synthetic(10, 70, 10, 32, seed=0)
    batches = EvalBatches(train, batch_size=32, device=torch.device("cpu"))
    got = [y for _, y in batches]
    assert len(batches) == 3 and [len(y) for y in got] == [32, 32, 6]
    assert torch.equal(torch.cat(got), torch.from_numpy(train.labels))
