"""`cifar-cam export ckpt=<run | .pt>`: model.onnx / model.pt2 (and model.int8.onnx), each checked against
eager PyTorch before it is kept; model_card.json and export.json.

checkpoint -> eager DeployedModel (CPU, fp32, NCHW) -> each format to a temp file -> its logits on the
checkpoint's test set (or its first export.check_images) vs eager: max abs diff <= export.tolerance and the
same top-1 on every image -> [int8: calibrated on training images; accuracy and CPU speed beside fp32] ->
all files renamed into place together. A failed check keeps none of them (exit 1).
`export.calibration=<calibration.json or eval run dir>` puts its temperature into the card (model_card.json, the
ONNX metadata, the .pt2's extra file): the files still output raw logits; a Predictor applies softmax(logits / T).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cifar_cam.data.arrays import DataSplits
from cifar_cam.errors import CifarCamError, ConfigError, DataError
from cifar_cam.explain.calibration import Calibration, read_calibration
from cifar_cam.inference import contract, readers, writers
from cifar_cam.inference.predictor import Predictor
from cifar_cam.io import atomic_path, sha256, write_json
from cifar_cam.logs import percent
from cifar_cam.models import describe_model, head_averages, model_options
from cifar_cam.provenance import package_version
from cifar_cam.tasks.common import checkpoint_and_config, load_data, run_dir, setup_runtime
from cifar_cam.training.checkpoint import (
    check_classes,
    fit_of,
    model_from_checkpoint,
    normalization_of,
    stored_test_accuracy,
)

log = logging.getLogger("cifar_cam.export")

FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "int8": "model.int8.onnx"}
RUNNERS = {"onnx": "onnxruntime", "pt2": "torch.export", "int8": "onnxruntime int8"}
LATENCY_RUNS, LATENCY_WARMUP = 50, 5      # batch-1 latency: p50 / p99 over 50 timed runs
THROUGHPUT_BATCH, THROUGHPUT_RUNS = 256, 3  # batch-256 img/s: the best of 3 timed batches, after one warm-up
INT8_GOAL_POINTS = 0.5  # int8 accuracy within this many points of fp32 (a warning line otherwise)


def versions() -> dict[str, str | None]:
    """The versions an exported file was made with (its card)."""
    found: dict[str, str | None] = {"cifar_cam": package_version("cifar-cam"), "torch": torch.__version__}
    found.update({name: package_version(name) for name in ("onnx", "onnxruntime", "onnxscript")})
    return found


def model_card(payload: dict[str, Any], cfg: DictConfig, module: contract.DeployedModel, checked: bool,
               calibration: Calibration | None = None) -> dict[str, Any]:
    """What a deployed file says about itself (the ONNX metadata, the .pt2's extra file, model_card.json);
    with `calibration`, the temperature its probabilities take."""
    fit = fit_of(payload)
    height, width = fit.size
    with torch.inference_mode():
        _, features = module(torch.zeros(1, height, width, 3, dtype=torch.uint8))
    network = module.model
    layer = network.feature_layer
    averages = head_averages(network, features.float())
    has_cam = features.ndim == 4 and network.get_classifier().in_features == features.shape[1]
    path = Path(payload["path"]).resolve()
    classes = list(payload["classes"])
    mean, std = normalization_of(payload)
    accuracy, precision = stored_test_accuracy(path, with_precision=True)
    return {
        "format_version": contract.FORMAT_VERSION,
        "classes": classes,
        "num_classes": len(classes),
        "architecture": {"name": str(cfg.model.name), "source": str(cfg.model.get("source") or "cifar_cam"),
                         "description": describe_model(cfg.model), **model_options(cfg.model)},
        "feature_layer": layer,
        "cam_layers": list(network.cam_layers),
        "image_size": height if fit.square else [height, width],
        "resize": fit.to_dict(),  # how any image becomes the input: predict and serve do the same
        "input": {"name": contract.INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "color": "RGB",
                  "shape": [None, height, width, 3], "range": [0, 255]},
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [None, len(classes)]},
            {"name": "features", "dtype": "float32", "shape": [None, *features.shape[1:]], "layer": layer},
        ],
        "mean": list(mean), "std": list(std),
        "normalization": "inside the model: (pixels / 255 - mean) / std, NHWC -> NCHW",
        "cam": None if not has_cam else (
            f"CAM of class c = relu(sum_k {contract.FC_KEY}.weight[c, k] * features[k]), min-max scaled, bilinearly "
            "resized to the input: " + (f"equals Grad-CAM at {layer}" if averages else
                                        "the class activation map (the head does not average, so Grad-CAM differs)")),
        "cam_equals_gradcam": averages,
        "source": {"checkpoint": str(path), "sha256": sha256(path), "epoch": payload.get("epoch")},
        "test_accuracy": accuracy,
        "test_accuracy_precision": precision,  # what the run's test was computed at (eval.precision)
        "opset": int(cfg.export.opset),
        "versions": versions(),
        "checked": checked,
        "calibration": None if calibration is None else calibration.summary(),
    }


class Reference:
    """The check images, their labels and eager PyTorch's logits on them."""

    def __init__(self, module: torch.nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.logits = readers.run_torch(module, images, batch_size, features=False)[0]

    def accuracy(self, logits: np.ndarray) -> float:
        return float((logits.argmax(1) == self.labels).mean()) if len(self.labels) else 0.0


def file_logits(path: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The logits of the exported file at `path` as every user gets them: through the Predictor
    (onnxruntime's CPUExecutionProvider for .onnx, torch.export.load for .pt2)."""
    return Predictor.load(path, batch_size=batch_size, threads=torch.get_num_threads()).logits(images)


def checker(fmt: str, reference: Reference, tolerance: float, results: dict[str, Any],
            logits_of: Callable[[Path, np.ndarray, int], np.ndarray]) -> Callable[[Path], None]:
    """check(temp_path): `fmt`'s logits vs eager; the numbers into results[fmt]; CifarCamError when off."""

    def check(path: Path) -> None:
        start = time.perf_counter()
        logits = logits_of(path, reference.images, reference.batch_size)
        found = readers.compare_logits(reference.logits, logits)
        n, same = found.pop("images"), found.pop("top1_same")
        results[fmt] = {**found, "images": n, "accuracy": reference.accuracy(logits),
                        "seconds": round(time.perf_counter() - start, 3)}
        if not (found["max_abs_diff"] <= tolerance and same == n):
            raise CifarCamError(
                f"{FILES[fmt]} failed its check against eager PyTorch on {n} test images: {RUNNERS[fmt]} logits "
                f"differ by up to {found['max_abs_diff']:.3g} (export.tolerance={tolerance:g}), top-1 agrees on "
                f"{same}/{n}; no model file kept")

    return check


def calibration_set(splits: DataSplits, count: int, seed: int) -> np.ndarray:
    """`count` training images (a seeded pick; never val or test) to calibrate int8 on."""
    train = splits.train.images
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=min(count, len(train)), replace=False))
    return train[rows]


def speed(run: Callable[[np.ndarray], Any], images: np.ndarray) -> dict[str, float]:
    """Batch-1 p50 / p99 latency (ms) over LATENCY_RUNS runs and batch-THROUGHPUT_BATCH images per second."""
    one = np.ascontiguousarray(images[:1])
    for _ in range(LATENCY_WARMUP):
        run(one)
    times = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - start)
    big = np.ascontiguousarray(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])))  # repeats a small set
    run(big)
    best = float("inf")
    for _ in range(THROUGHPUT_RUNS):
        start = time.perf_counter()
        run(big)
        best = min(best, time.perf_counter() - start)
    ms = np.asarray(times) * 1000
    return {"batch1_p50_ms": round(float(np.percentile(ms, 50)), 3),
            "batch1_p99_ms": round(float(np.percentile(ms, 99)), 3),
            f"batch{THROUGHPUT_BATCH}_images_per_second": round(THROUGHPUT_BATCH / best, 1)}


def _load(cfg: DictConfig, payload: dict[str, Any]) -> DataSplits | None:
    """The checkpoint's data when the checks or int8 need it; DataError (exit 2) when they do and it is not there."""
    check, quantize = bool(cfg.export.check), cfg.export.quantize is not None
    if not check and not quantize:
        return None
    try:
        splits = load_data(cfg, payload)  # the checkpoint's own split: its test images, its training images
    except DataError as e:
        if check:
            raise DataError(f"cannot check the exported model on the checkpoint's test set: {e}; "
                            "export.check=false exports unchecked") from e
        raise DataError(f"export.quantize=int8 calibrates on the checkpoint's training images: {e}") from e
    check_classes(payload, splits)
    return splits


def export(cfg: DictConfig) -> dict[str, Any]:
    """Exports cfg.ckpt to each of export.formats (and int8), checked; returns what export.json holds."""
    started = time.perf_counter()
    out = run_dir()
    payload, cfg = checkpoint_and_config(cfg, "export")
    setup_runtime(cfg)  # seeds, threads; the export itself and its checks run on the CPU
    e = cfg.export
    # temperature scaling for the card (int8's calibration images are another thing: calibration_set below)
    scaling = read_calibration(e.calibration, "export.calibration") if e.get("calibration") else None
    if scaling is not None and scaling.classes not in (None, list(payload["classes"])):
        raise ConfigError(f"export.calibration={e.calibration} was fitted for other classes than ckpt={cfg.ckpt}'s; "
                          "calibrate this checkpoint (cifar-cam eval ckpt=... eval.calibrate=true)")
    formats = list(dict.fromkeys(e.formats))
    size = fit_of(payload).size
    model = writers.deployed(model_from_checkpoint(payload), *normalization_of(payload))  # CPU fp32 NCHW, eval
    splits = _load(cfg, payload)
    checked = bool(e.check)
    card = model_card(payload, cfg, model, checked, scaling)
    fc = contract.classifier_of(model.model)
    batch_size = int(cfg.eval.batch_size)

    reference = None
    if splits is not None:
        n = len(splits.test) if e.check_images is None else min(int(e.check_images), len(splits.test))
        start = time.perf_counter()
        reference = Reference(model, splits.test.images[:n], splits.test.labels[:n], batch_size)
        log.info("eager PyTorch on %d test images: accuracy %s (%.1f s)", n, percent(reference.accuracy(
            reference.logits)), time.perf_counter() - start)
    if not checked:
        log.warning("export.check=false: the exported files are not compared with eager PyTorch")

    checks: dict[str, Any] = {}
    written: dict[str, Path] = {}
    record: dict[str, Any] = {}

    def check_for(fmt: str, logits_of: Callable[[Path, np.ndarray, int], np.ndarray]) -> Callable[[Path], None] | None:
        return checker(fmt, reference, float(e.tolerance), checks, logits_of) if checked and reference else None

    with contextlib.ExitStack() as stack:  # every file a temp until all have passed; a failure removes them all
        temps = {}
        for fmt in formats:
            temps[fmt] = stack.enter_context(atomic_path(out / FILES[fmt], suffix=Path(FILES[fmt]).suffix))
            start = time.perf_counter()
            if fmt == "onnx":
                writers.to_onnx(model, temps[fmt], size, card, fc, opset=int(e.opset),
                                check=check_for(fmt, file_logits))
            else:
                writers.to_pt2(model, temps[fmt], size, card, fc, check=check_for(fmt, file_logits))
            record[fmt] = {"seconds": round(time.perf_counter() - start, 3)}
        if e.quantize == "int8":
            assert splits is not None and reference is not None  # _load made sure
            calibration = calibration_set(splits, int(e.calibration_images), int(cfg.seed))
            temps["int8"] = stack.enter_context(atomic_path(out / FILES["int8"], suffix=".onnx"))
            start = time.perf_counter()
            writers.quantize_int8(temps["onnx"], temps["int8"], calibration)
            record["int8"] = {"seconds": round(time.perf_counter() - start, 3)}
            record["quantize"] = quantize_report(model, temps, reference, calibration, checks)
        written = {fmt: out / FILES[fmt] for fmt in temps}
        for fmt, tmp in temps.items():
            record[fmt].update(file=FILES[fmt], bytes=tmp.stat().st_size, sha256=sha256(tmp))
    # past the stack: every file renamed into place

    report = {
        "checkpoint": card["source"]["checkpoint"], "checkpoint_sha256": card["source"]["sha256"],
        "checked": checked, "tolerance": float(e.tolerance),
        "check_images": None if reference is None else len(reference.labels),
        "eager_accuracy": None if reference is None else reference.accuracy(reference.logits),
        "checks": checks, "files": {k: v for k, v in record.items() if k in FILES},
        "quantize": record.get("quantize"), "opset": int(e.opset), "versions": card["versions"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(out / "model_card.json", card)
    write_json(out / "export.json", report)
    for fmt, path in written.items():
        info = record[fmt]
        log.info("wrote %s (%.2f MB, %.1f s): %s", path, info["bytes"] / 1e6, info["seconds"],
                 _file_line(fmt, checks.get(fmt), record.get("quantize")))
    log.info("wrote %s%s", out / "model_card.json", "" if scaling is None else
             f" (calibration: temperature {scaling.temperature:.4g} from {scaling.source})")
    log.info("wrote %s", out / "export.json")
    if "quantize" in record:
        s = record["quantize"]["speed"]
        key = f"batch{THROUGHPUT_BATCH}_images_per_second"
        log.info("CPU speed (%d threads), batch 1 p50 / p99 ms, batch %d img/s: %s", s["threads"], THROUGHPUT_BATCH,
                 "; ".join(f"{name} {s[name]['batch1_p50_ms']:.2f} / {s[name]['batch1_p99_ms']:.2f}, {s[name][key]:.0f}"
                           for name in ("torch", "onnx", "int8")))
    how = (f"checked against eager PyTorch on {len(reference.labels)} test images" if checked and reference
           else "unchecked: export.check=false")
    log.info("exported %s to %s (%s) in %.1f s", payload["path"], ", ".join(FILES[f] for f in written), how,
             time.perf_counter() - started)
    return report


def _file_line(fmt: str, check: dict[str, Any] | None, quantized: dict[str, Any] | None) -> str:
    """How a written file was checked, for its log line."""
    if fmt == "int8" and quantized is not None:
        acc = quantized["accuracy"]
        return (f"int8 accuracy {percent(acc['int8'])} vs fp32 {percent(acc['onnx'])} on {acc['images']} test images, "
                f"top-1 {quantized['int8_top1_agreement_with_fp32']:.1%} same as fp32")
    if check is None:
        return "unchecked (export.check=false)"
    return (f"{RUNNERS[fmt]} vs eager on {check['images']} test images: max abs diff {check['max_abs_diff']:.2g}, "
            f"top-1 {check['top1_agreement']:.0%} same")


def quantize_report(model: torch.nn.Module, temps: dict[str, Path], reference: Reference, calibration: np.ndarray,
                    checks: dict[str, Any]) -> dict[str, Any]:
    """int8 vs fp32 on the check images (accuracy, agreement) and CPU speed of eager torch, fp32 and int8 ONNX."""
    threads = torch.get_num_threads()
    fp32 = readers.onnx_session(temps["onnx"], threads)
    int8 = readers.onnx_session(temps["int8"], threads)
    fp32_logits = file_logits(temps["onnx"], reference.images, reference.batch_size)
    int8_logits = file_logits(temps["int8"], reference.images, reference.batch_size)
    accuracy = {"images": len(reference.labels), "eager": reference.accuracy(reference.logits),
                "onnx": reference.accuracy(fp32_logits), "int8": reference.accuracy(int8_logits)}
    agreement = readers.compare_logits(fp32_logits, int8_logits)
    drop = 100 * (accuracy["onnx"] - accuracy["int8"])
    if drop > INT8_GOAL_POINTS:
        log.warning("int8 accuracy %s is %.2f points below fp32's %s (goal: within %.1f)", percent(accuracy["int8"]),
                    drop, percent(accuracy["onnx"]), INT8_GOAL_POINTS)
    eager_cl = writers.deployed(model).to(memory_format=torch.channels_last)  # as eval / predict run it

    def torch_run(images: np.ndarray) -> Any:
        with torch.inference_mode():
            return eager_cl(torch.from_numpy(images))

    def session_run(session: Any) -> Callable[[np.ndarray], Any]:
        return lambda images: session.run(list(contract.OUTPUT_NAMES), {contract.INPUT_NAME: images})

    timed = {"threads": threads}
    for name, run in (("torch", torch_run), ("onnx", session_run(fp32)), ("int8", session_run(int8))):
        timed[name] = speed(run, reference.images)
    return {"calibration_images": len(calibration), "calibration_split": "train", "accuracy": accuracy,
            "int8_points_below_fp32": round(drop, 3), "int8_top1_agreement_with_fp32": agreement["top1_agreement"],
            "int8_max_abs_logit_diff": agreement["max_abs_diff"],
            "speed": {**timed, "torch_layout": "channels_last fp32, inference_mode"}}
