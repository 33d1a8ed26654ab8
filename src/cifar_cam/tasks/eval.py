"""`cifar-cam eval ckpt=...`: test accuracy, loss, per-class accuracy, confusion matrix, mistakes."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from rich.table import Table

from cifar_cam import viz
from cifar_cam.engine import Predictions, metrics_from
from cifar_cam.logs import console
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

log = logging.getLogger("cifar_cam.eval")


def misclassified(predictions: Predictions, select: str = "most_confident", limit: int | None = None,
                  seed: int = 0, classes: list[int] | None = None) -> torch.Tensor:
    """Row numbers of wrong predictions: most confident first, in dataset order, or a seeded random pick;
    select='correct' gives the most confident right ones instead. `classes`: only images of these true labels."""
    keep = (predictions.predicted == predictions.labels) if select == "correct" else (
        predictions.predicted != predictions.labels)
    if classes is not None:
        keep &= torch.isin(predictions.labels, torch.as_tensor(classes, dtype=predictions.labels.dtype))
    rows = torch.nonzero(keep).flatten()
    if select in ("most_confident", "correct"):
        rows = rows[predictions.confidence[rows].argsort(descending=True, stable=True)]
    elif select == "random":
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return rows if limit is None else rows[:limit]


def eval_(cfg: DictConfig) -> float:
    """Evaluates a checkpoint on the test set; writes metrics.json and the analysis PNGs."""
    out = run_dir()
    payload, cfg = checkpoint_and_config(cfg, "eval")
    device = setup_runtime(cfg)
    splits = load_data(cfg)
    check_classes(payload, splits)
    predictions = predict_test(checkpoint_model(payload, device), splits, cfg, device, tta=cfg.eval.tta)
    result = metrics_from(predictions, splits.num_classes)

    metrics = {
        "accuracy": result.acc, "loss": result.loss, "n": result.n,
        "per_class_accuracy": dict(zip(splits.classes, result.per_class_acc, strict=True)),
        "confusion_matrix": result.confusion.tolist(),
        "checkpoint": payload["path"], "checkpoint_epoch": payload["epoch"], "tta": cfg.eval.tta,
    }
    write_json(out / "metrics.json", metrics)
    viz.plot_confusion_matrix(result.confusion.numpy(), splits.classes, out / "confusion_matrix.png",
                              title=f"test confusion matrix: accuracy {percent(result.acc)} (n={result.n})")
    wrong = misclassified(predictions, "most_confident", limit=25)
    classes = splits.classes
    titles = [f"{classes[int(predictions.labels[i])]} -> {classes[int(predictions.predicted[i])]}\n"
              f"{100 * float(predictions.confidence[i]):.0f}% sure" for i in wrong]
    viz.plot_image_grid(splits.test.images[wrong.numpy()], titles, out / "misclassified.png",
                        suptitle=f"{len(wrong)} most confident mistakes (true -> predicted)")

    table = Table(title=f"test accuracy {percent(result.acc)}, loss {result.loss:.4f}, n={result.n}")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    table.add_column("n", justify="right")
    table.add_column("most confused with")
    for c, name in enumerate(classes):
        row = result.confusion[c].clone()
        row[c] = -1
        other = int(row.argmax())
        confused = int(result.confusion[c, other]) if len(classes) > 1 else 0
        table.add_row(name, percent(result.per_class_acc[c]), str(int(result.confusion[c].sum())),
                      f"{classes[other]} ({confused})" if confused else "-")
    console().print(table)
    log.info("test accuracy %s, loss %.4f on %d images (%s, epoch %d)%s; wrote %s", percent(result.acc),
             result.loss, result.n, payload["path"], payload["epoch"], ", flip TTA" if cfg.eval.tta else "", out)
    return result.acc
