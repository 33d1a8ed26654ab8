"""`cifar-cam gradcam`: every PNG exists, decodes, has the promised size and panels; gradcam.json; few mistakes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from cifar_cam.data.sources import DataSpec, build_splits
from cifar_cam.errors import ConfigError
from cifar_cam.tasks.gradcam import gradcam
from cifar_cam.training.checkpoint import load_checkpoint
from cifar_cam.viz import SINGLE_CAM_PX, SINGLE_CAM_SIZE, CamGridLayout
from conftest import compose_cfg, run_cli


def _png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} does not decode"
    return image


def _check_grid(path: Path, n: int, num_layers: int) -> None:
    """The grid has the layout's exact size, a drawn tile where each panel's tiles go and white where none."""
    image = _png(path)
    layout = CamGridLayout(n, num_layers)
    assert image.shape == (layout.size[1], layout.size[0], 3)
    slots = layout.rows * layout.columns
    for i in range(slots):
        for k in range(1 + num_layers):
            x, y = layout.tile_origin(i, k)
            tile = image[y + 4:y + layout.sub - 4, x + 4:x + layout.sub - 4]
            drawn = float(tile.mean()) < 250 or float(tile.std()) > 2
            assert drawn == (i < n), f"panel {i} tile {k}: drawn={drawn}, expected {i < n}"


def _floats(value: object) -> Iterator[float]:
    """Every float in a parsed JSON value."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _floats(item)


def _check_run(out: Path, layers: list[str]) -> dict:
    result = json.loads((out / "gradcam.json").read_text())
    entries = result["images"]
    n = len(entries)
    assert n == result["explained_images"] > 0
    _check_grid(out / "gradcam_grid.png", n, len(layers))
    files = sorted(p.name for p in (out / "gradcam").iterdir())
    assert files == sorted(f"{rank:03d}_{name}.png" for rank in range(n) for name in layers)
    for name in files:
        image = _png(out / "gradcam" / name)
        assert image.shape == (SINGLE_CAM_SIZE[1], SINGLE_CAM_SIZE[0], 3) and image.shape[1] >= 3 * SINGLE_CAM_PX
    activations = _png(out / "activations.png")
    assert activations.shape[0] >= min(5, n) * 100 and activations.shape[1] >= 5 * 100  # image + layer1..4 columns
    floats = list(_floats(result))
    assert floats and all(round(x, 4) == x for x in floats), floats  # for people: no 0.27259999999999995
    for entry in entries:
        assert "index" not in entry and 0 <= entry["test_row"] < result["test_images"]  # one row number, not two
        assert entry["true"] != entry["pred"] and entry["true_label"] != entry["pred_label"]
        assert 0 < entry["confidence"] <= 1 and entry["files"] == {k: f"gradcam/{entry['rank']:03d}_{k}.png"
                                                                   for k in layers}
    assert result["seconds"]["test_pass"] > 0 and result["seconds"]["gradcam"] > 0
    return result


def test_gradcam_writes_grid_files_and_json(trained_run: Path, tmp_path: Path) -> None:
    # data=synthetic is the checkpoint's own choice: its data settings stay, test_size=200 is added
    cfg = compose_cfg("gradcam", [f"ckpt={trained_run}", "data=synthetic", "data.test_size=200"], run_dir=tmp_path)
    accuracy = gradcam(cfg)
    result = _check_run(tmp_path, ["layer3", "layer4"])
    entries = result["images"]
    assert len(entries) == 25 and result["misclassified"] >= 25 and result["test_images"] == 200
    assert accuracy == pytest.approx(1 - result["misclassified"] / 200)
    confidences = [e["confidence"] for e in entries]
    assert confidences == sorted(confidences, reverse=True)  # gradcam.select=most_confident
    assert all(e["explained"] == e["pred"] for e in entries)  # the predicted class by default
    # "test_row" is the image's row in the test set: its label there is the entry's true label
    data = load_checkpoint(trained_run)["config"]["data"]
    splits = build_splits(DataSpec("synthetic", None, val_size=data["val_size"], subset=None, seed=42,
                          train_size=data["train_size"], test_size=200))
    assert [int(splits.test.labels[e["test_row"]]) for e in entries] == [e["true_label"] for e in entries]
    assert len({e["test_row"] for e in entries}) == 25


def test_fewer_mistakes_than_asked_writes_what_exists(trained_run: Path, tmp_path: Path) -> None:
    result = run_cli("gradcam", f"ckpt={trained_run}", "data=synthetic", "data.test_size=24", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = next((tmp_path / "outputs" / "gradcam").iterdir())
    summary = _check_run(out, ["layer3", "layer4"])
    n = summary["explained_images"]
    assert n == summary["misclassified"] < 25
    output = result.stdout + result.stderr
    assert f"only {n} of the 24 test images are misclassified (gradcam.num_images=25): explaining all {n}" in output
    log = (out / "gradcam.log").read_text()
    assert re.search(r"test pass: 24 images in [\d.]+ s", log)
    assert re.search(rf"Grad-CAM \(gradcam, predicted class\) of {n} images at layer3, layer4: [\d.]+ s", log)


def test_true_class_gradcam_plus_plus_and_a_nested_layer(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("gradcam", [f"ckpt={trained_run}", "gradcam.target=true", "gradcam.method=gradcam++",
                                  "gradcam.num_images=3", "gradcam.select=random", "gradcam.target_layers=[layer4.1]"],
                      run_dir=tmp_path)
    gradcam(cfg)
    result = _check_run(tmp_path, ["layer4.1"])
    assert len(result["images"]) == 3 and result["method"] == "gradcam++"
    assert all(e["explained"] == e["true"] for e in result["images"])


def test_unknown_layer_fails_before_any_work(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("gradcam", [f"ckpt={trained_run}", "gradcam.target_layers=[layer3,layer9]"], run_dir=tmp_path)
    with pytest.raises(ConfigError, match="'layer9' is not in the model; its CAM layers: layer3, layer4; "
                                          "its modules: conv1, bn1, relu, layer1"):
        gradcam(cfg)
    assert not (tmp_path / "gradcam.json").exists()


def test_several_methods_share_one_grid_of_correct_images_of_chosen_classes(trained_run: Path, tmp_path: Path) -> None:
    classes = load_checkpoint(trained_run)["classes"]
    chosen = [classes[0], classes[3]]
    cfg = compose_cfg("gradcam", [f"ckpt={trained_run}", "gradcam.methods=[gradcam,gradcam++]",
                                  "gradcam.select=correct", f"gradcam.classes=[{chosen[0]},{chosen[1]}]",
                                  "gradcam.num_images=4",
                                  "gradcam.target_layers=[layer4]"], run_dir=tmp_path)
    gradcam(cfg)
    result = json.loads((tmp_path / "gradcam.json").read_text())
    entries = result["images"]
    assert result["methods"] == ["gradcam", "gradcam++"] and "method" not in result and result["classes"] == chosen
    assert 0 < len(entries) <= 4
    assert all(e["true"] == e["pred"] and e["true"] in chosen for e in entries)  # correct ones, of those classes
    confidences = [e["confidence"] for e in entries]
    assert confidences == sorted(confidences, reverse=True)
    assert all(set(e["files"]) == {"gradcam layer4", "gradcam++ layer4"} for e in entries)
    assert sorted(p.name for p in (tmp_path / "gradcam").iterdir()) == sorted(
        f"{e['rank']:03d}_{m}_layer4.png" for e in entries for m in ("gradcam", "gradcam++"))
    # two panels a row: the image, then a column per method
    image = _png(tmp_path / "gradcam_grid.png")
    layout = CamGridLayout(len(entries), 2, cols=2)
    assert image.shape == (layout.size[1], layout.size[0], 3)


def test_a_class_the_data_lacks_is_named(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("gradcam", [f"ckpt={trained_run}", "gradcam.classes=[unicorn]"], run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"gradcam.classes: \['unicorn'\] not among the data's classes"):
        gradcam(cfg)


def test_metrics_score_every_method_layer_and_baseline_per_image(trained_run: Path, tmp_path: Path) -> None:
    import csv

    cfg = compose_cfg("gradcam", [f"ckpt={trained_run}", "gradcam.methods=[gradcam,layercam]", "gradcam.metrics=true",
                                  "gradcam.num_images=3", "gradcam.target_layers=[layer4]"], run_dir=tmp_path)
    gradcam(cfg)
    with open(tmp_path / "gradcam_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    pairs = {(r["method"], r["layer"]) for r in rows}
    assert pairs == {("gradcam", "layer4"), ("layercam", "layer4"), ("random", "-"), ("centre blob", "-")}
    assert len(rows) == 3 * 4 and {r["rank"] for r in rows} == {"0", "1", "2"}
    assert all(0 <= float(r["deletion_auc"]) <= 1 and 0 <= float(r["insertion_auc"]) <= 1 for r in rows)
    result = json.loads((tmp_path / "gradcam.json").read_text())
    assert set(result["metrics"]) == {"gradcam layer4", "layercam layer4", "random -", "centre blob -"}
    mean = sum(float(r["road"]) for r in rows if r["method"] == "gradcam") / 3
    assert result["metrics"]["gradcam layer4"]["road"] == pytest.approx(mean, abs=1e-4)
    assert _png(tmp_path / "gradcam_metrics.png").shape[1] > 1000


def test_smoothing_keys_reach_the_cam(trained_run: Path, tmp_path: Path) -> None:
    def layer4_maps(*extra: str) -> np.ndarray:
        out = tmp_path / ("-".join(extra).split(".")[-1].split("=")[0] if extra else "plain")
        gradcam(compose_cfg("gradcam", [f"ckpt={trained_run}", "gradcam.num_images=2", "gradcam.target_layers=[layer4]",
                                        *extra], run_dir=out))
        return _png(out / "gradcam" / "000_layer4.png")

    plain = layer4_maps()
    assert not np.array_equal(plain, layer4_maps("gradcam.eigen_smooth=true"))
    assert not np.array_equal(plain, layer4_maps("gradcam.aug_smooth=true"))
    assert json.loads((tmp_path / "aug_smooth" / "gradcam.json").read_text())["aug_smooth"] is True
