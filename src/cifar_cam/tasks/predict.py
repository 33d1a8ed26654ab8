"""`cifar-cam predict ckpt=<run | .pt | .onnx | .pt2> inputs=<image | folder | .tar.gz | glob | [list]>`.

Writes predictions.csv and predictions.json (per image: path, status, top-k classes and
probabilities, calibrated as softmax(logits / T) with `predict.calibration=<calibration.json or eval run dir>`;
the true class where the image sits in a folder named after one of the model's
classes), and with `predict.cam=true` an overlay PNG per image and a contact sheet. Images are read
in sorted order (a .tar.gz in its own order) by one thread and decoded by a small pool one batch
ahead of the forward pass: memory holds about three batches (one being read, one queued, one being
predicted), however many images there are. An
unreadable image is one line and one CSV row marked `error: ...`; the others are still predicted,
and the command exits 1.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from cifar_cam import viz
from cifar_cam.data.decode import Fit, decode_rgb
from cifar_cam.errors import CifarCamError, DataError
from cifar_cam.inference.inputs import Input, find_inputs
from cifar_cam.inference.predictor import Predictor
from cifar_cam.io import cores, write_csv, write_json
from cifar_cam.logs import Bars, percent
from cifar_cam.tasks.common import resolve_num_threads, run_dir, seed_everything

log = logging.getLogger("cifar_cam.predict")


class SomeInputsFailed(CifarCamError):
    """Some images could not be read; the others were predicted (exit 1)."""

    exit_code = 1


@dataclass
class Batch:
    inputs: list[Input]
    pixels: np.ndarray          # uint8 (n_ok, S, S, 3)
    ok: list[int]               # positions in `inputs` that decoded
    errors: dict[int, str]      # position -> why it could not be read


def decoded_batches(inputs: list[Input], batch_size: int, size: Fit, max_pixels: int, threads: int
                    ) -> Iterator[Batch]:
    """Batches read (in order, one thread) and decoded (a pool) one batch ahead of the consumer; memory: about
    three batches. Close the generator (contextlib.closing) to stop the thread early."""
    ready: queue.Queue[Batch | BaseException | None] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read(item: Input) -> bytes | str:
        try:
            return item.read()
        except DataError as e:
            return str(e)
        except OSError as e:
            return f"cannot read {item.path}: {e.strerror or e}"

    def decode(item: Input, data: bytes | str) -> np.ndarray | str:
        if isinstance(data, str):
            return data
        try:
            return decode_rgb(data, item.path, size, max_pixels=max_pixels)
        except DataError as e:
            return str(e)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:  # cv2 decodes outside the GIL
                for start in range(0, len(inputs), batch_size):
                    if stop.is_set():
                        return
                    chunk = inputs[start:start + batch_size]
                    raw = [read(item) for item in chunk]  # one reader, in order; decoding in parallel
                    results = list(pool.map(decode, chunk, raw))
                    ok = [i for i, r in enumerate(results) if isinstance(r, np.ndarray)]
                    pixels = (np.stack([results[i] for i in ok]) if ok  # type: ignore[misc]
                              else np.zeros((0, *size.size, 3), np.uint8))
                    errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
                    ready.put(Batch(chunk, pixels, ok, errors))
            ready.put(None)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            ready.put(e)

    thread = threading.Thread(target=produce, name="decode", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on the full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def predict_images(cfg: DictConfig) -> float:
    """Predicts every image of `inputs`; returns the accuracy where true classes are known, else NaN."""
    out = run_dir()
    p = cfg.predict
    seed_everything(cfg.seed)
    threads = resolve_num_threads(cfg.trainer.get("num_threads", "auto"))
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    predictor = Predictor.load(cfg.ckpt, device=cfg.trainer.device, batch_size=p.batch_size,
                               precision=cfg.trainer.precision, threads=threads, max_pixels=p.max_pixels,
                               calibration=p.get("calibration"))
    if p.cam and not predictor.cam_layers:
        predictor.cam(np.zeros((0, 8, 8, 3), np.uint8))  # says why there is no CAM, in one line
    layer = str(p.layer or (predictor.cam_layers or ("",))[-1])  # null: the model's feature layer
    if p.cam and predictor.kind != "torch" and layer not in predictor.cam_layers:
        from cifar_cam.errors import ConfigError

        raise ConfigError(f"predict.layer={layer}: a {predictor.kind} model gives CAM at {predictor.cam_layers[-1]} "
                          f"only; pass predict.layer={predictor.cam_layers[-1]} or ckpt=<the .pt checkpoint>")
    if p.cam and predictor.kind == "torch":
        from cifar_cam.explain.hooks import resolve_layers

        resolve_layers(predictor.backend.model, [layer])  # a name the model lacks: one line, before any image
    inputs = split_inputs(cfg.ckpt, p.split) if p.get("split") else find_inputs(cfg.inputs)
    classes = set(predictor.classes)
    log.info("model: %s (%s, %d classes, %s); %d images", predictor.source, predictor.kind, len(classes),
             predictor.fit.describe(), len(inputs))
    if predictor.calibration is not None:
        log.info("probabilities calibrated: softmax(logits / %.4g) (%s)", predictor.temperature,
                 predictor.calibration.source)
    rows, sheet, failed = [], [], []
    k = min(int(p.topk), len(predictor.classes))
    cam_dir = out / "cam"
    batches = decoded_batches(inputs, int(p.batch_size), predictor.fit, int(p.max_pixels),
                              max(1, min(4, cores())))
    with contextlib.closing(batches), Bars("predict", len(inputs)) as bars:  # closing: the thread ends on errors
        bars.start_inner("images", len(inputs), images_per_step=1)
        done = 0
        for batch in batches:
            results = predictor.top(predictor.logits(batch.pixels), k) if batch.ok else []
            maps = (predictor.cam(batch.pixels, layer, targets=[r.indices[0] for r in results])
                    if p.cam and batch.ok else None)
            by_position = dict(zip(batch.ok, range(len(batch.ok)), strict=True))
            for i, item in enumerate(batch.inputs):
                truth = item.folder if item.folder in classes else None
                row: dict[str, Any] = {"path": item.path}
                if i in batch.errors:
                    row["status"] = f"error: {batch.errors[i]}"
                    failed.append(row)
                    log.warning("%s", batch.errors[i])
                else:
                    j = by_position[i]
                    result = results[j]
                    row["status"] = "ok"
                    row["classes"], row["probabilities"] = result.classes, [round(x, 6) for x in result.probabilities]
                    if maps is not None:
                        number = len(rows)
                        name = cam_dir / f"{number:05d}_{Path(item.path.split(':')[-1]).stem[:40]}.png"
                        cam_dir.mkdir(exist_ok=True)
                        title = f"{Path(item.path).name[:40]}\n{result.label} {result.probability:.0%}" + (
                            f" (true: {truth})" if truth else "")
                        viz.plot_cam_single(batch.pixels[j], maps[j], name, title=title, layer=layer)
                        row["cam"] = str(name.relative_to(out))
                        if len(sheet) < p.contact_sheet:
                            sheet.append((batch.pixels[j], maps[j], f"{result.label} {result.probability:.0%}"
                                          + (f"\ntrue {truth}" if truth else "")))
                if truth is not None:
                    row["true"] = truth
                    if row["status"] == "ok":  # an unreadable image is neither right nor wrong
                        row["correct"] = row["classes"][0] == truth
                rows.append(row)
            done += len(batch.inputs)
            bars.update_inner(done, f"{len(failed)} failed" if failed else "")
    accuracy = _write(out, rows, k, predictor, sheet, layer)
    if failed:
        raise SomeInputsFailed(f"{len(failed)} of {len(rows)} inputs could not be read (first: {failed[0]['path']}: "
                               f"{failed[0]['status'][7:]}); the others are in {out / 'predictions.csv'}")
    return float("nan") if accuracy is None else accuracy


def _write(out: Path, rows: list[dict[str, Any]], k: int, predictor: Predictor,
           sheet: list[tuple[np.ndarray, np.ndarray, str]], layer: str) -> float | None:
    """predictions.csv / .json, the contact sheet, and the accuracy lines; returns the accuracy or None."""
    has_truth = any("true" in r for r in rows)
    fields = ["path", "status", *(f for i in range(1, k + 1) for f in (f"top{i}", f"p{i}"))]
    fields += ["true", "correct"] if has_truth else []
    fields += ["cam"] if any("cam" in r for r in rows) else []
    flat = []
    for r in rows:
        f = {"path": r["path"], "status": r["status"], "true": r.get("true", ""), "cam": r.get("cam", "")}
        f["correct"] = "" if "correct" not in r else int(r["correct"])
        for i, (c, prob) in enumerate(zip(r.get("classes", []), r.get("probabilities", []), strict=True), start=1):
            f[f"top{i}"], f[f"p{i}"] = c, f"{prob:.4f}"
        flat.append(f)
    write_csv(out / "predictions.csv", flat, fields)
    judged = [r for r in rows if "true" in r and r["status"] == "ok"]
    accuracy = sum(r["correct"] for r in judged) / len(judged) if judged else None
    per_class = {}
    for c in predictor.classes:
        of_class = [r for r in judged if r["true"] == c]
        if of_class:
            per_class[c] = round(sum(r["correct"] for r in of_class) / len(of_class), 4)
    write_json(out / "predictions.json", {
        "model": predictor.source, "format": predictor.kind, "classes": predictor.classes,
        "image_size": list(predictor.image_size), "resize": predictor.fit.to_dict(), "topk": k, "images": len(rows),
        "temperature": predictor.temperature,
        "calibration": None if predictor.calibration is None else predictor.calibration.source,
        "failed": sum(r["status"] != "ok" for r in rows),
        "accuracy": None if accuracy is None else round(accuracy, 4), "judged": len(judged),
        "per_class_accuracy": per_class or None, "predictions": rows,
    })
    if sheet:
        images = np.stack([s[0] for s in sheet])
        viz.plot_cam_grid(images, {layer: np.stack([s[1] for s in sheet])}, [s[2] for s in sheet],
                          out / "contact_sheet.png", cols=10,
                          suptitle=f"{len(sheet)} images, Grad-CAM at {layer} of the predicted class")
    if accuracy is not None:
        log.info("accuracy %s on %d images in folders named after the model's classes; per class: %s",
                 percent(accuracy), len(judged), ", ".join(f"{c} {percent(a)}" for c, a in per_class.items()))
    log.info("wrote %s (%d images, %d failed)", out, len(rows), sum(r["status"] != "ok" for r in rows))
    return accuracy


def split_inputs(ckpt: str, split: str) -> list[Input]:
    """predict.split: the images of one split of the checkpoint's own data (a file source's run), each with its
    class as the folder it sits in (so accuracy is reported)."""
    from cifar_cam.data.sources import listing_of
    from cifar_cam.tasks.common import data_spec
    from cifar_cam.training.checkpoint import cached_checkpoint

    if Path(str(ckpt)).suffix in (".onnx", ".pt2"):
        raise DataError(f"predict.split={split} reads the split a training run kept: pass ckpt=<its run dir or .pt> "
                        "(an exported file has no data of its own)")
    payload = cached_checkpoint(ckpt, "best")
    data = payload.get("data") or {}
    rows = (data.get("split") or {}).get(split)
    if not rows:
        raise DataError(f"predict.split={split}: ckpt={ckpt} was not trained on a data=folder or data=csv split with "
                        f"{split} images; pass inputs=... instead")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(payload["config"])
    listing = listing_of(data_spec(cfg, payload))
    classes = list(payload["classes"])
    if listing.kind == "tar":
        import tarfile

        archive = tarfile.open(listing.root)
        members = {m.name.lstrip("./")[len(listing.prefix):]: m for m in archive.getmembers() if m.isfile()}

        def reader(name: str) -> Any:
            def read() -> bytes:
                f = archive.extractfile(members[name])
                return f.read() if f is not None else b""
            return read
    else:
        def reader(name: str) -> Any:
            return lambda: listing.path_of(name).read_bytes()
    return [Input(str(name), reader(str(name)), classes[int(label)]) for name, label in rows]
