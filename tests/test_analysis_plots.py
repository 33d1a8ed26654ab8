"""viz.py's analysis drawing: the overlay as a pure function, layouts, and PNGs that decode."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cifar_cam import viz


def test_overlay_is_a_pure_blend() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heatmap = rng.random((32, 32)).astype(np.float32)
    image_copy, heatmap_copy = image.copy(), heatmap.copy()
    blended = viz.overlay(image, heatmap)
    assert blended.shape == (32, 32, 3) and blended.dtype == np.uint8
    assert np.array_equal(image, image_copy) and np.array_equal(heatmap, heatmap_copy)  # inputs untouched
    assert np.array_equal(viz.overlay(image, heatmap, alpha=0.0), image)
    assert np.array_equal(viz.overlay(image, heatmap, alpha=1.0), viz.colorize(heatmap))
    # jet: 0 is dark blue, 1 is dark red
    assert viz.colorize(np.zeros((1, 1)))[0, 0].tolist() == [0, 0, 128]
    assert viz.colorize(np.ones((1, 1)))[0, 0].tolist() == [128, 0, 0]


@pytest.mark.parametrize("n, rows, cols", [(25, 5, 5), (7, 2, 5), (3, 1, 3), (1, 1, 1)])
def test_cam_grid_layout(n: int, rows: int, cols: int) -> None:
    layout = viz.CamGridLayout(n, num_layers=2)
    assert (layout.rows, layout.columns) == (rows, cols)
    width, height = layout.size
    assert width == 2 * layout.pad + cols * (3 * layout.sub + 2 * layout.gap) + (cols - 1) * layout.hsep
    last_x, last_y = layout.tile_origin(n - 1, 2)
    assert last_x + layout.sub <= width and last_y + layout.sub <= height


def test_curves_with_any_lr_schedule(tmp_path: Path) -> None:
    rows = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e, "val_loss": 2.1 / e, "val_acc": 0.19 * e,
             "lr": lr, "seconds": 1.0} for e, lr in enumerate([0.4, 0.26, 0.13, -0.004], start=1)]
    viz.plot_curves(rows, tmp_path / "onecycle.png")  # a non-positive LR cannot go on a log axis
    rows = [dict(r, lr=0.05 * 0.1 ** (i // 2), val_acc=None, val_loss=None) for i, r in enumerate(rows)]
    viz.plot_curves(rows, tmp_path / "plateau_no_val.png")
    for name in ("onecycle.png", "plateau_no_val.png"):
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.shape[1] > 1000


def test_confusion_matrix_and_mistakes_gallery(tmp_path: Path) -> None:
    confusion = np.array([[50, 3, 2], [4, 40, 6], [0, 9, 41]])
    viz.plot_confusion_matrix(confusion, ["cat", "dog", "frog"], tmp_path / "cm.png", title="test")
    images = np.random.default_rng(0).integers(0, 256, (25, 32, 32, 3), dtype=np.uint8)
    viz.plot_image_grid(images, ["cat -> dog\n90% sure"] * 25, tmp_path / "grid.png", suptitle="25 mistakes")
    cm, grid = cv2.imread(str(tmp_path / "cm.png")), cv2.imread(str(tmp_path / "grid.png"))
    assert cm is not None and min(cm.shape[:2]) > 400
    assert grid is not None and grid.shape[0] > 5 * 200 and grid.shape[1] > 5 * 200
