"""`cifar-cam gradcam ckpt=...`: Grad-CAM heatmaps of misclassified (or correctly classified) test images.

test pass (engine.predict) -> the rows to explain (tasks/eval.py) -> one CAM call per method for all of
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
from cifar_cam.data.batches import Normalizer
from cifar_cam.errors import ConfigError
from cifar_cam.explain.cam import GradCAM
from cifar_cam.explain.hooks import LayerHooks, resolve_layers
from cifar_cam.io import write_csv, write_json
from cifar_cam.logs import percent
from cifar_cam.tasks.common import (
    checkpoint_and_config,
    checkpoint_model,
    load_data,
    run_dir,
    setup_runtime,
    test_logits,
)
from cifar_cam.training.checkpoint import check_classes, normalization_of
from cifar_cam.training.engine import misclassified

log = logging.getLogger("cifar_cam.gradcam")

ACTIVATION_IMAGES = 5  # rows of activations.png
JSON_DECIMALS = 4  # gradcam.json is for people: confidences and the accuracy to 4 decimals (0.2726)
SELECTED = {"most_confident": "most confident", "first": "first (in dataset order)", "random": "randomly chosen",
            "correct": "most confident"}


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
            file = out / "gradcam" / f"{rank:03d}_{name.replace(' ', '_')}.png"
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


def warn_small_layers(model: torch.nn.Module, image: torch.Tensor, layers: list[str]) -> None:
    """One warning line for a CAM layer whose map is smaller than 2x2 at these images' size: one value an image."""
    for name, act in channel_mean_activations(model, image, layers).items():
        h, w = act.shape[-2:]
        if h < 2 or w < 2:
            log.warning("gradcam: %s is %dx%d at %dx%d images, so its map is a single value an image; an earlier "
                        "layer (gradcam.target_layers) keeps more of where the model looked", name, h, w,
                        image.shape[-2], image.shape[-1])


def class_labels(names: list[str] | None, classes: list[str]) -> list[int] | None:
    """gradcam.classes as label indices (None: every class); a name the data lacks is a ConfigError."""
    if names is None:
        return None
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ConfigError(f"gradcam.classes: {unknown} not among the data's classes {classes}")
    return [classes.index(n) for n in names]


def method_maps(model: torch.nn.Module, layers: list[str], methods: list[str], x: torch.Tensor,
                explained: torch.Tensor, smoothing: dict[str, bool]) -> dict[str, dict[str, np.ndarray]]:
    """{method: {layer: (N, H, W) maps}}, one CAM call per method for all images."""
    result = {}
    for method in methods:
        with GradCAM(model, layers, method=method, **smoothing) as cam:
            result[method] = {name: m.numpy() for name, m in cam(x, targets=explained).items()}
    return result


METRIC_FIELDS = ("rank", "test_row", "method", "layer", "deletion_auc", "insertion_auc", "road")


def faithfulness_rows(model: torch.nn.Module, x: torch.Tensor, by_method: dict[str, dict[str, np.ndarray]],
                      explained: torch.Tensor, index: np.ndarray, seed: int) -> list[dict[str, Any]]:
    """gradcam_metrics.csv's rows: deletion / insertion AUC and ROAD per image, method and layer, and for two
    baselines (a seeded random map, a centre blob: layer '-')."""
    from cifar_cam.explain.faithfulness import centre_blob_map, faithfulness, random_map

    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    maps = {(method, layer): torch.from_numpy(m).to(x.device) for method, layers in by_method.items()
            for layer, m in layers.items()}
    maps[("random", "-")] = random_map(n, h, w, seed=seed).to(x.device)
    maps[("centre blob", "-")] = centre_blob_map(n, h, w).to(x.device)
    # ties="random": Grad-CAM maps are 0 on much of the image after the ReLU; the reference would impute every
    # tied pixel at once and flatter sparse maps (identical numbers where a map has no ties)
    scores = faithfulness(model, x, {f"{m}|{layer}": v for (m, layer), v in maps.items()}, explained, ties="random",
                          seed=seed)
    rows = []
    for (method, layer), result in zip(maps, scores.values(), strict=True):
        for rank, r in enumerate(result.rows()):
            rows.append({"rank": rank, "test_row": int(index[rank]), "method": method, "layer": layer,
                         **{k: round(v, JSON_DECIMALS) for k, v in r.items()}})
    return rows


def write_metrics(out: Path, rows: list[dict[str, Any]], title: str) -> dict[str, dict[str, float]]:
    """gradcam_metrics.csv and gradcam_metrics.png; returns the means per method and layer (for gradcam.json)."""
    write_csv(out / "gradcam_metrics.csv", rows, METRIC_FIELDS)
    viz.plot_faithfulness(rows, out / "gradcam_metrics.png", title=title)
    means = metric_means(rows)
    best = max((k for k in means if not k.endswith(" -")),  # baselines (layer '-') do not compete
               key=lambda k: means[k]["insertion_auc"] - means[k]["deletion_auc"])
    log.info("highest insertion - deletion: %s; wrote gradcam_metrics.csv and gradcam_metrics.png", best)
    return means


def grid_title(g: DictConfig, methods: list[str], layers: list[str], what: str, predictions: Any,
               wanted: list[int] | None, explained: int) -> str:
    """gradcam_grid.png's two title lines: what is explained, and out of how many (within gradcam.classes)."""
    right = predictions.predicted == predictions.labels
    if wanted is not None:  # counted within the chosen classes
        right = right[torch.isin(predictions.labels, torch.tensor(wanted))]
    n_right, n_test = int(right.sum()), len(predictions.labels)
    of = f"{len(right) - n_right} mistakes" if g.select != "correct" else f"{n_right} correct predictions"
    among = f"{of}{'' if wanted is None else ' of ' + '/'.join(g.classes)} on {n_test} test images"
    if len(methods) == 1:
        accuracy = 1 - int((predictions.predicted != predictions.labels).sum()) / max(n_test, 1)
        return (f"Grad-CAM ({methods[0]}) of {what} at {', '.join(layers)}: the {explained} {SELECTED[g.select]} "
                f"of {among} (accuracy {percent(accuracy)})\neach panel: the image, then its heatmap overlay per layer")
    # two panels a row: wide enough for the title, a column per method (and layer) in each panel
    return f"{', '.join(methods)} of {what} at {', '.join(layers)}\nthe {explained} {SELECTED[g.select]} of {among}"


def metric_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{"<method> <layer>": mean of each score over the images} for gradcam.json."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['method']} {r['layer']}", []).append(r)
    return {k: {m: round(float(np.mean([r[m] for r in g])), JSON_DECIMALS) for m in METRIC_FIELDS[4:]}
            for k, g in groups.items()}


def gradcam(cfg: DictConfig) -> float:
    """CAMs of misclassified (select=correct: correct) test images, one method or several (gradcam.methods): grid,
    one PNG per image, layer (and method), activations, JSON. Returns the test accuracy."""
    out = run_dir()
    payload, cfg = checkpoint_and_config(cfg, "gradcam")
    g = cfg.gradcam
    methods = [str(m) for m in g.methods] if g.get("methods") else [str(g.method)]
    smoothing = {k: True for k in ("aug_smooth", "eigen_smooth") if g.get(k, False)}
    device = setup_runtime(cfg)
    model = checkpoint_model(payload, device)
    layers = [str(name) for name in (g.target_layers or model.cam_layers)]  # null: the architecture's own
    resolve_layers(model, layers)  # unknown layer names fail before the data loads, not after the test pass
    splits = load_data(cfg, payload, out).normalized_as(*normalization_of(payload))  # the run's data, as trained
    check_classes(payload, splits)
    classes = splits.classes
    wanted = class_labels(list(g.classes) if g.get("classes") else None, classes)  # a bad name: before the test pass

    started = time.perf_counter()
    predictions = test_logits(model, splits, cfg, device)  # no TTA: the maps explain single forward passes
    test_seconds = time.perf_counter() - started
    n_test = len(predictions.labels)
    n_wrong = int((predictions.predicted != predictions.labels).sum())
    accuracy = 1 - n_wrong / max(n_test, 1)
    log.info("test pass: %d images in %.2f s; accuracy %s, %d misclassified", n_test, test_seconds,
             percent(accuracy), n_wrong)

    rows = misclassified(predictions, g.select, limit=g.num_images, seed=cfg.seed, classes=wanted)
    kind = ("correctly classified" if g.select == "correct" else "misclassified") + (
        f" {'/'.join(g.classes)}" if wanted is not None else "")
    if len(rows) < g.num_images:
        log.warning("only %d of the %d test images are %s (gradcam.num_images=%d): explaining %s", len(rows), n_test,
                    kind, g.num_images, f"all {len(rows)}" if len(rows) else "none")
    summary: dict[str, Any] = {
        "checkpoint": payload["path"], "checkpoint_epoch": payload["epoch"],
        **({"methods": methods} if g.get("methods") else {"method": methods[0]}),
        "classes": None if wanted is None else list(g.classes), **smoothing,
        "explains": "true class" if g.target else "predicted class", "target_layers": layers, "select": g.select,
        "test_images": n_test, "misclassified": n_wrong,
        "test_accuracy": round(accuracy, JSON_DECIMALS), "explained_images": len(rows),
        "seconds": {"test_pass": round(test_seconds, 3)}, "images": [],
    }
    if len(rows) == 0:
        write_json(out / "gradcam.json", summary)
        log.info("no %s test images: nothing to explain; wrote %s", kind, out / "gradcam.json")
        return accuracy

    images = splits.test.images[rows.numpy()]                   # (n, H, W, 3) uint8, for drawing
    x = Normalizer(device, splits.mean, splits.std)(torch.from_numpy(np.ascontiguousarray(images)))  # the model's view
    warn_small_layers(model, x[:1], layers)
    true, pred = predictions.labels[rows], predictions.predicted[rows]
    confidence = predictions.confidence[rows]
    explained = true if g.target else pred

    started = time.perf_counter()
    by_method = method_maps(model, layers, methods, x, explained, smoothing)
    cam_seconds = time.perf_counter() - started
    log.info("Grad-CAM (%s, %s class) of %d images at %s: %.2f s", ", ".join(methods), summary["explains"].split()[0],
             len(rows), ", ".join(layers), cam_seconds)
    # One tile per method and layer: named by the layer for one method, by both for several.
    maps = {(name if len(methods) == 1 else f"{method} {name}"): m
            for method, layer_maps in by_method.items() for name, m in layer_maps.items()}

    started = time.perf_counter()
    k = min(ACTIVATION_IMAGES, len(rows))
    stages = [name for name, _ in model.named_children() if name.startswith("layer")] or list(model.cam_layers)
    activations = channel_mean_activations(model, x[:k], stages) if stages else {}

    index = splits.test.index[rows.numpy()]
    titles = [f"true {classes[int(t)]}  \u2192  pred {classes[int(p)]}\n{100 * float(c):.0f}% confident \u00b7 "
              f"test #{int(i)}" for t, p, c, i in zip(true, pred, confidence, index, strict=True)]
    what = f"the {summary['explains']}"
    viz.plot_cam_grid(images, maps, titles, out / "gradcam_grid.png", cols=5 if len(methods) == 1 else 2,
                      suptitle=grid_title(g, methods, layers, what, predictions, wanted, len(rows)))
    entries = image_panels(out, images, maps, index, (true, pred, confidence, explained), classes,
                           f"CAM ({', '.join(methods)}) of {what}")
    if activations:
        sizes = {name: f"{a.shape[1]}x{a.shape[2]}" for name, a in activations.items()}
        viz.plot_activations(images[:k], activations, out / "activations.png", row_titles=[
            f"{classes[int(t)]}\u2192{classes[int(p)]}" for t, p in zip(true[:k], pred[:k], strict=True)],
            col_notes=sizes, suptitle="mean activation over channels, per layer (each map scaled to its own range)")
    draw_seconds = time.perf_counter() - started

    if g.get("metrics", False):
        started = time.perf_counter()
        summary["metrics"] = write_metrics(out, faithfulness_rows(model, x, by_method, explained, index, cfg.seed),
                                           f"faithfulness of {len(rows)} {kind} test images' maps ({what}): mean "
                                           "and 25-75% per method")
        summary["seconds"]["metrics"] = round(time.perf_counter() - started, 3)
        log.info("faithfulness (deletion / insertion AUC, ROAD) in %.1f s", summary["seconds"]["metrics"])
    summary["images"] = entries
    summary["seconds"].update(gradcam=round(cam_seconds, 3), drawing=round(draw_seconds, 3))
    write_json(out / "gradcam.json", summary)
    log.info("drew gradcam_grid.png, %d gradcam/*.png%s in %.1f s; wrote %s", len(rows) * len(maps),
             " and activations.png" if activations else "", draw_seconds, out)
    return accuracy
