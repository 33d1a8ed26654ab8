"""`cifar-cam gradcam ckpt=...`: Grad-CAM heatmaps of misclassified test images.

test pass (engine.predict) -> misclassified rows (tasks/eval.py) -> one Grad-CAM call for all of
them (cam/) -> gradcam_grid.png, gradcam/NNN_<layer>.png, activations.png, gradcam.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cifar_cam import viz
from cifar_cam.cam import GradCAM, LayerHooks, resolve_layers
from cifar_cam.data import Normalizer
from cifar_cam.tasks.common import (
    check_classes,
    checkpoint_and_config,
    checkpoint_model,
    load_data,
    percent,
    predict_test,
    run_dir,
    setup_runtime,
    write_json,
)
from cifar_cam.tasks.eval import misclassified

log = logging.getLogger("cifar_cam.gradcam")

ACTIVATION_IMAGES = 5  # rows of activations.png
JSON_DECIMALS = 4  # gradcam.json is for people: confidences and the accuracy to 4 decimals (0.2726)
SELECTED = {"most_confident": "most confident", "first": "first (in dataset order)", "random": "randomly chosen"}


def channel_mean_activations(model: torch.nn.Module, images: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """{layer: (N, h, w)} the mean over channels of each layer's output, one forward pass."""
    with torch.inference_mode(), LayerHooks(model, layers) as hooks:
        model(images)
        return {name: out.float().mean(dim=1).cpu().numpy() for name, out in hooks.checked_outputs().items()}


def image_panels(out: Path, images: np.ndarray, maps: dict[str, np.ndarray], index: np.ndarray,
                 labels: tuple[torch.Tensor, ...], classes: list[str], what: str) -> list[dict[str, Any]]:
    """gradcam/NNN_<layer>.png per explained image and layer; the gradcam.json entry of each image.

    An entry's `test_row` is the image's row in the test set, the N of "test image N" in the titles (the test
    split is never subsampled, so it is the row in the loaded arrays as well); `confidence`, the predicted
    class's probability, is rounded to JSON_DECIMALS.
    """
    true, pred, confidence, explained = labels
    entries = []
    for rank in range(len(index)):
        files = {}
        for name in maps:
            file = out / "gradcam" / f"{rank:03d}_{name}.png"
            viz.plot_cam_single(images[rank], maps[name][rank], file, layer=name, title=(
                f"#{rank:03d}  test image {int(index[rank])}: true {classes[int(true[rank])]}, predicted "
                f"{classes[int(pred[rank])]} ({100 * float(confidence[rank]):.1f}%)\n{what} "
                f"({classes[int(explained[rank])]}) at {name}"))
            files[name] = str(file.relative_to(out))
        entries.append({
            "rank": rank, "test_row": int(index[rank]), "true": classes[int(true[rank])],
            "true_label": int(true[rank]), "pred": classes[int(pred[rank])], "pred_label": int(pred[rank]),
            "confidence": round(float(confidence[rank]), JSON_DECIMALS),
            "explained": classes[int(explained[rank])], "files": files,
        })
    return entries


def gradcam(cfg: DictConfig) -> float:
    """Grad-CAM of misclassified test images: grid, one PNG per image and layer, activations, JSON. Returns test acc."""
    out = run_dir()
    payload, cfg = checkpoint_and_config(cfg, "gradcam")
    g = cfg.gradcam
    layers = [str(name) for name in g.target_layers]
    device = setup_runtime(cfg)
    model = checkpoint_model(payload, device)
    resolve_layers(model, layers)  # unknown layer names fail before the data loads, not after the test pass
    splits = load_data(cfg)
    check_classes(payload, splits)
    classes = splits.classes

    started = time.perf_counter()
    predictions = predict_test(model, splits, cfg, device)  # no TTA: the maps explain single forward passes
    test_seconds = time.perf_counter() - started
    n_test = len(predictions.labels)
    n_wrong = int((predictions.predicted != predictions.labels).sum())
    accuracy = 1 - n_wrong / max(n_test, 1)
    log.info("test pass: %d images in %.2f s; accuracy %s, %d misclassified", n_test, test_seconds,
             percent(accuracy), n_wrong)

    rows = misclassified(predictions, g.select, limit=g.num_images, seed=cfg.seed)
    if len(rows) < g.num_images:
        log.warning("only %d of the %d test images are misclassified (gradcam.num_images=%d): explaining %s",
                    n_wrong, n_test, g.num_images, f"all {len(rows)}" if len(rows) else "none")
    summary: dict[str, Any] = {
        "checkpoint": payload["path"], "checkpoint_epoch": payload["epoch"], "method": g.method,
        "explains": "true class" if g.target else "predicted class", "target_layers": layers, "select": g.select,
        "test_images": n_test, "misclassified": n_wrong,
        "test_accuracy": round(accuracy, JSON_DECIMALS), "explained_images": len(rows),
        "seconds": {"test_pass": round(test_seconds, 3)}, "images": [],
    }
    if len(rows) == 0:
        write_json(out / "gradcam.json", summary)
        log.info("no misclassified test images: nothing to explain; wrote %s", out / "gradcam.json")
        return accuracy

    images = splits.test.images[rows.numpy()]                   # (n, H, W, 3) uint8, for drawing
    x = Normalizer(device)(torch.from_numpy(images))            # what the model sees
    true, pred = predictions.labels[rows], predictions.predicted[rows]
    confidence = predictions.confidence[rows]
    explained = true if g.target else pred

    started = time.perf_counter()
    with GradCAM(model, layers, method=g.method) as cam:
        maps = {name: m.numpy() for name, m in cam(x, targets=explained).items()}
    cam_seconds = time.perf_counter() - started
    log.info("Grad-CAM (%s, %s class) of %d images at %s: %.2f s", g.method, summary["explains"].split()[0],
             len(rows), ", ".join(layers), cam_seconds)

    started = time.perf_counter()
    k = min(ACTIVATION_IMAGES, len(rows))
    stages = [name for name, _ in model.named_children() if name.startswith("layer")]
    activations = channel_mean_activations(model, x[:k], stages) if stages else {}

    index = splits.test.index[rows.numpy()]
    titles = [f"true {classes[int(t)]}  \u2192  pred {classes[int(p)]}\n{100 * float(c):.0f}% confident \u00b7 "
              f"test #{int(i)}" for t, p, c, i in zip(true, pred, confidence, index, strict=True)]
    what = f"the {summary['explains']}"
    viz.plot_cam_grid(images, maps, titles, out / "gradcam_grid.png", suptitle=(
        f"Grad-CAM ({g.method}) of {what} at {', '.join(layers)}: the {len(rows)} {SELECTED[g.select]} of "
        f"{n_wrong} mistakes on {n_test} test images (accuracy {percent(accuracy)})\n"
        f"each panel: the image, then its heatmap overlay per layer"))
    entries = image_panels(out, images, maps, index, (true, pred, confidence, explained), classes,
                           f"Grad-CAM ({g.method}) of {what}")
    if activations:
        sizes = {name: f"{a.shape[1]}x{a.shape[2]}" for name, a in activations.items()}
        viz.plot_activations(images[:k], activations, out / "activations.png", row_titles=[
            f"{classes[int(t)]}\u2192{classes[int(p)]}" for t, p in zip(true[:k], pred[:k], strict=True)],
            col_notes=sizes, suptitle="mean activation over channels, per layer (each map scaled to its own range)")
    draw_seconds = time.perf_counter() - started

    summary["images"] = entries
    summary["seconds"].update(gradcam=round(cam_seconds, 3), drawing=round(draw_seconds, 3))
    write_json(out / "gradcam.json", summary)
    log.info("drew gradcam_grid.png, %d gradcam/*.png%s in %.1f s; wrote %s", len(rows) * len(layers),
             " and activations.png" if activations else "", draw_seconds, out)
    return accuracy
