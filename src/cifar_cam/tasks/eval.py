"""`cifar-cam eval ckpt=...`: test accuracy, loss, per-class accuracy, confusion matrix, mistakes, calibration.

Always: the top-label ECE (15 equal-width bins) and NLL of the test set in metrics.json, and reliability.png.
`eval.calibrate=true`: a temperature fitted on the val split the run held out of training (never on test), the
test ECE / NLL after it in metrics.json, and calibration.json, which `predict.calibration=`, `serve.calibration=`
and `export.calibration=` read.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from cifar_cam import viz
from cifar_cam.data.arrays import DataSplits
from cifar_cam.data.batches import EvalBatches
from cifar_cam.errors import ConfigError
from cifar_cam.explain import calibration as cal
from cifar_cam.io import write_json
from cifar_cam.logs import console, percent
from cifar_cam.tasks.common import (
    checkpoint_and_config,
    checkpoint_model,
    eval_precision,
    load_data,
    run_dir,
    setup_runtime,
    test_logits,
)
from cifar_cam.training.checkpoint import check_classes, normalization_of
from cifar_cam.training.device import resolve_precision
from cifar_cam.training.engine import SplitLogits, collect_logits, metrics_from, misclassified, tta_suffix

log = logging.getLogger("cifar_cam.eval")


# What decides which training images were held out as val: the run's own values, or the "val" split would
# hold images the model was trained on
VAL_SPLIT_KEYS = ("data.source", "data.val_size", "data.train_size")  # the seed: the checkpoint's own, always


def check_val_split(cfg: DictConfig, payload: dict[str, Any]) -> None:
    """Refuses (one line, exit 2) a val split other than the one the checkpoint's run held out of training."""
    stored = OmegaConf.create(payload["config"])
    for key in VAL_SPLIT_KEYS:
        run_value, value = OmegaConf.select(stored, key, default=None), OmegaConf.select(cfg, key, default=None)
        if run_value != value:
            raise ConfigError(f"eval.calibrate=true fits on the val split the run held out of training, but {key}="
                              f"{value} differs from the run's {key}={run_value} (that split would hold images it "
                              f"trained on); pass {key}={run_value}")


def calibrate(test: SplitLogits, val: SplitLogits, splits: DataSplits, cfg: DictConfig, payload: dict[str, Any]
              ) -> dict[str, Any]:
    """The temperature fitted on the val logits, and ECE / NLL before and after it on val and on test."""
    from cifar_cam.io import sha256

    temperature = cal.fit_temperature(val.logits.numpy(), val.labels.numpy())
    return {
        "temperature": temperature,
        "probabilities": "softmax(logits / temperature)",
        "method": "temperature scaling: T minimizing the val NLL (LBFGS on log T)",
        "fitted_on": {"split": "val", "size": len(val.labels), "seed": int(cfg.seed), "data": str(cfg.data.source),
                      "tta": cfg.eval.tta},
        "ece_bins": cal.ECE_BINS,
        "val": cal.scores(val.logits.numpy(), val.labels.numpy(), temperature),
        "test": cal.scores(test.logits.numpy(), test.labels.numpy(), temperature),
        "classes": list(splits.classes),
        "checkpoint": {"path": str(payload["path"]), "epoch": payload["epoch"], "sha256": sha256(payload["path"])},
    }


def eval_(cfg: DictConfig) -> float:
    """Evaluates a checkpoint on the test set; writes metrics.json, the analysis PNGs (and calibration.json)."""
    out = run_dir()
    payload, cfg = checkpoint_and_config(cfg, "eval")
    calibrating = bool(OmegaConf.select(cfg, "eval.calibrate", default=False))
    if calibrating:
        check_val_split(cfg, payload)
    device = setup_runtime(cfg)
    splits = load_data(cfg, payload, out).normalized_as(*normalization_of(payload))  # the run's data, as trained
    check_classes(payload, splits)
    model = checkpoint_model(payload, device)
    predictions = test_logits(model, splits, cfg, device, tta=cfg.eval.tta)
    result = metrics_from(predictions, splits.num_classes)
    logits, labels = predictions.logits.numpy(), predictions.labels.numpy()
    curves = {"as trained (T = 1)": cal.reliability(logits, labels)}

    metrics = {
        "accuracy": result.acc, "loss": result.loss, "n": result.n,
        "ece": curves["as trained (T = 1)"].ece, "nll": cal.nll(logits, labels), "ece_bins": cal.ECE_BINS,
        "per_class_accuracy": dict(zip(splits.classes, result.per_class_acc, strict=True)),
        "confusion_matrix": result.confusion.tolist(),
        "checkpoint": payload["path"], "checkpoint_epoch": payload["epoch"], "tta": cfg.eval.tta,
        "precision": eval_precision(cfg),  # what accuracy was computed at (eval.precision)
        "reliability": curves["as trained (T = 1)"].to_dict(),
    }
    fitted = None
    if calibrating:
        assert splits.val is not None  # config.py refuses data.val_size=0 with eval.calibrate
        val_batches = EvalBatches(splits.val, cfg.eval.batch_size, device, splits.mean, splits.std)
        val = collect_logits(model, val_batches, device=device,
                             amp_dtype=resolve_precision(eval_precision(cfg), device), tta=cfg.eval.tta)
        fitted = calibrate(predictions, val, splits, cfg, payload)
        t = fitted["temperature"]
        curves[f"calibrated (T = {t:.3g})"] = after = cal.reliability(logits, labels, t)
        metrics.update(temperature=t, ece_calibrated=after.ece, nll_calibrated=fitted["test"]["nll_after"],
                       reliability_calibrated=after.to_dict(), calibration="calibration.json")
        write_json(out / "calibration.json", fitted)
    write_json(out / "metrics.json", metrics)
    viz.plot_reliability({name: curve.to_dict() for name, curve in curves.items()}, out / "reliability.png",
                         title=f"test reliability, {cal.ECE_BINS} bins (n={result.n})")
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
    log.info("test accuracy %s, loss %.4f on %d images (%s, epoch %d; %s%s); wrote %s", percent(result.acc),
             result.loss, result.n, payload["path"], payload["epoch"], eval_precision(cfg),
             tta_suffix(cfg.eval.tta), out)
    if fitted is None:
        log.info("test ECE %s (top-label, %d bins), NLL %.4f; eval.calibrate=true fits a temperature on val",
                 percent(metrics["ece"]), cal.ECE_BINS, metrics["nll"])
    else:
        v, t = fitted["val"], fitted["test"]
        log.info("temperature %.4f fitted on the %d val images (ECE %s -> %s, NLL %.4f -> %.4f); on test: ECE %s -> "
                 "%s, NLL %.4f -> %.4f; wrote %s", fitted["temperature"], v["n"], percent(v["ece_before"]),
                 percent(v["ece_after"]), v["nll_before"], v["nll_after"], percent(t["ece_before"]),
                 percent(t["ece_after"]), t["nll_before"], t["nll_after"], out / "calibration.json")
    return result.acc
