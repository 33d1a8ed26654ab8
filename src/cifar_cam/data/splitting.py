"""Seeded, stratified splits of labels: the val split held out of train, a data set without one split into
train / val / test by fractions, and a training subset. Each class keeps its share (largest remainder, exact
totals); the same seed gives the same rows on any machine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cifar_cam.errors import ConfigError


def resolve_count(value: int | float, n: int, key: str) -> int:
    """An images count given as a number (5000) or a fraction of `n` (0.1); ConfigError when out of range."""
    if isinstance(value, float) and 0 < value < 1:
        return int(round(value * n))
    count = int(value)
    if count != value or count < 0:
        raise ConfigError(f"{key}={value} must be a number of images >= 0 or a fraction in (0, 1)")
    return count


def _quota(counts: np.ndarray, total: int, n: int) -> np.ndarray:
    """How many of each class a part of `total` (of `n`) takes: proportional, largest remainder, exact sum."""
    quota = counts * total / n
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: total - take.sum()]:
        take[i] += 1
    return take


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of row numbers into (train, val), each class in val in proportion to its size."""
    n = len(labels)
    if val_size <= 0:
        return np.arange(n), np.empty(0, np.int64)
    if val_size >= n:
        suggestion = max(1, n // 10)
        raise ConfigError(f"data.val_size={val_size} leaves no training images (the training set has {n}); "
                          f"use data.val_size={suggestion} or a fraction such as data.val_size=0.1")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    val_rows = []
    for cls, k in zip(classes, _quota(counts, val_size, n), strict=True):
        rows = np.flatnonzero(labels == cls)
        val_rows.append(rng.permutation(rows)[:k])
    val = np.sort(np.concatenate(val_rows))
    return np.setdiff1d(np.arange(n), val, assume_unique=True), val


def split_by_fractions(labels: np.ndarray, fractions: Sequence[float], seed: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified (train, val, test) rows of a data set that has no split (data.split=[0.8,0.1,0.1]):
    within each class, a shuffled order cut at the fractions; every class with 3+ images has a test image."""
    train_f, val_f, test_f = (float(f) for f in fractions)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        m = len(rows)
        n_test = int(round(m * test_f / (train_f + val_f + test_f)))
        n_val = int(round(m * val_f / (train_f + val_f + test_f)))
        if test_f > 0 and n_test == 0 and m >= 3:
            n_test = 1
        if val_f > 0 and n_val == 0 and m - n_test >= 2:
            n_val = 1
        parts[2].append(rows[:n_test])
        parts[1].append(rows[n_test:n_test + n_val])
        parts[0].append(rows[n_test + n_val:])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts)
    return train, val, test


def pick_subset(labels: np.ndarray, subset: int | None, seed: int) -> np.ndarray:
    """Row numbers of `subset` images (all when None or more), stratified and seeded, in order."""
    n = len(labels)
    if subset is None or subset >= n:
        return np.arange(n)
    keep, _ = stratified_split(labels, n - subset, seed + 1)
    return keep


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class (every class, zeros included)."""
    return np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
