"""The model being served and its replacement: `ModelSlot.current` answers; `reload()` loads the file named by
`ckpt=` again, warms the new model up, checks it against its card, and only then swaps it in. Requests already
admitted finish on the model they started with; a file that fails to load or to pass the check is refused,
logged and counted, and the old model keeps serving.

A model's id (`sha256:` + the first 16 hex digits of the file's sha256) names it in every response's X-Model-Id
header; GET /v1/model has the rest: the file, its full sha256, the checkpoint it came from, its classes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_cam.io import sha256
from cifar_cam.serve.metrics import Metrics
from cifar_cam.serve.settings import FORMATS, Settings
from cifar_cam.training.checkpoint import stored_test_accuracy

if TYPE_CHECKING:
    from cifar_cam.inference.predictor import Predictor

log = logging.getLogger("cifar_cam.serve")

PROBE_IMAGES = 4


def input_hw(predictor: Predictor) -> tuple[int, int]:
    """(height, width) of the model's input."""
    return predictor.fit.size


class ModelCheckError(Exception):
    """A model that loaded but does not answer as its card says (or does not load): not served."""


def model_info(predictor: Predictor, settings: Settings) -> dict[str, Any]:
    """The model card /v1/model answers with; its `id` is in every response's X-Model-Id header."""
    card = dict(predictor.card)
    source = card.get("source") if isinstance(card.get("source"), dict) else {}
    sha = source.get("sha256") if predictor.kind != "torch" else None
    file_sha = sha256(predictor.source) if Path(predictor.source).is_file() else None
    accuracy = card.get("test_accuracy")
    if accuracy is None and predictor.kind == "torch" and Path(predictor.source).is_file():
        accuracy = stored_test_accuracy(Path(predictor.source))
    fit = predictor.fit
    return {
        "id": f"sha256:{file_sha[:16]}" if file_sha else "in-memory",
        "source": predictor.source,
        "source_sha256": file_sha,
        "checkpoint": source.get("checkpoint") if predictor.kind != "torch" else predictor.source,
        "checkpoint_sha256": sha or file_sha,
        "kind": predictor.kind,
        "classes": list(predictor.classes),
        "num_classes": len(predictor.classes),
        "image_size": fit.height if fit.square else [fit.height, fit.width],
        "input_size": [fit.height, fit.width],
        "resize": fit.to_dict(),
        "input": {"formats": FORMATS, "as": "multipart field 'file' (batch: 'files') or the raw request body",
                  "decoded_to": f"uint8 RGB {fit.describe()}; transparency over white, EXIF orientation applied",
                  "max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels,
                  "max_batch_images": settings.max_batch_images},
        "cam_layers": list(predictor.cam_layers),
        "topk_default": min(settings.topk, len(predictor.classes)),
        "test_accuracy": accuracy,
        "probabilities": "softmax(logits)" if predictor.calibration is None else
                         f"softmax(logits / {predictor.temperature:.6g})",
        "calibration": None if predictor.calibration is None else predictor.calibration.summary(),
        "card": card,
    }


@dataclass
class Loaded:
    """A model ready to serve: the Predictor, its card for /v1/model, how long it took to load and warm up."""

    predictor: Predictor
    info: dict[str, Any]
    load_seconds: float
    warmup_seconds: float | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        return str(self.info["id"])


def warm_up_and_check(predictor: Predictor) -> float:
    """Runs a warm-up batch and checks the answers against the model's card: one logit per class of the card,
    all finite, the card's feature shape, and an image gives the same logits alone as in a batch (what
    micro-batching relies on). Returns the warm-up's seconds; ModelCheckError names what is wrong."""
    h, w = input_hw(predictor)
    probe = np.random.default_rng(0).integers(0, 256, (PROBE_IMAGES, h, w, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    logits, features = predictor.backend.run(probe)
    seconds = time.perf_counter() - t0
    card = predictor.card
    classes = list(card.get("classes") or predictor.classes)
    said = card.get("image_size")
    if said is not None and (tuple(said) if isinstance(said, list | tuple) else (said, said)) != (h, w):
        raise ModelCheckError(f"its card says {said} px, the model takes {h}x{w}")
    if logits.shape != (PROBE_IMAGES, len(classes)):
        raise ModelCheckError(f"it gives logits of shape {tuple(logits.shape)} for {PROBE_IMAGES} images, its card "
                              f"names {len(classes)} classes")
    if not np.isfinite(logits).all():
        raise ModelCheckError("it gives non-finite logits (NaN or inf)")
    outputs = card.get("outputs")
    declared = outputs[1].get("shape") if isinstance(outputs, list) and len(outputs) > 1 else None
    if isinstance(declared, list) and list(features.shape[1:]) != list(declared[1:]):
        raise ModelCheckError(f"its features are {list(features.shape[1:])}, its card says {declared[1:]}")
    alone = predictor.backend.run(probe[:1])[0]
    scale = max(1.0, float(np.abs(logits).max()))
    if float(np.abs(alone[0] - logits[0]).max()) > 0.02 * scale:
        raise ModelCheckError("an image gets other logits alone than in a batch (BatchNorm in training mode?)")
    return seconds


class ModelSlot:
    """Holds the model answering now (`current`) and swaps in a new one on `reload()`."""

    def __init__(self, first: Loaded, settings: Settings, metrics: Metrics,
                 load: Callable[[], Predictor] | None = None) -> None:
        self.current, self.settings, self.metrics, self._load = first, settings, metrics, load
        self._lock = asyncio.Lock()
        self.reloads = 0
        metrics.model.labels(first.id, first.predictor.kind).set(1)
        metrics.load.set(first.load_seconds)

    def warmed_up(self, seconds: float) -> None:
        """The first model's warm-up batch ran (the server is ready)."""
        self.current.warmup_seconds = seconds
        self.metrics.warmup.set(seconds)

    def _prepare(self) -> Loaded:
        """The file loaded again, warmed up and checked (in a worker thread: the old model keeps serving)."""
        assert self._load is not None
        t0 = time.perf_counter()
        try:
            predictor = self._load()
        except Exception as e:  # CheckpointError, ConfigError, or whatever a torn file makes torch raise
            raise ModelCheckError(f"it does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                                  if str(e) else f"it does not load ({type(e).__name__})") from None
        load_seconds = time.perf_counter() - t0
        warmup = warm_up_and_check(predictor)
        return Loaded(predictor, model_info(predictor, self.settings), load_seconds, warmup)

    async def reload(self, why: str) -> dict[str, Any]:
        """Loads the model file again and swaps it in once warmed up and checked; one reload at a time.
        Raises ModelCheckError (logged, counted) when the new file is refused: the old model keeps serving."""
        if self._load is None:
            raise ModelCheckError("this server's model was handed to it in memory: there is no file to load again")
        async with self._lock:
            old = self.current
            t0 = time.perf_counter()
            try:
                new = await asyncio.to_thread(self._prepare)
            except ModelCheckError as e:
                self.metrics.reloads.labels("failed").inc()
                log.error("reload (%s) refused: %s is not served: %s; %s keeps serving", why, old.predictor.source,
                          e, old.id)
                raise
            self.current = new
            self.reloads += 1
            self.metrics.reloads.labels("ok").inc()
            self.metrics.model.labels(old.id, old.predictor.kind).set(0)
            self.metrics.model.labels(new.id, new.predictor.kind).set(1)
            self.metrics.load.set(new.load_seconds)
            self.metrics.warmup.set(new.warmup_seconds or 0.0)
            seconds = time.perf_counter() - t0
            log.info("reload (%s): now serving %s (%s; was %s), loaded, warmed up and checked in %.2f s", why,
                     new.id, new.predictor.source, old.id, seconds)
            return {"model": new.id, "previous": old.id, "source": new.predictor.source,
                    "seconds": round(seconds, 3), "changed": new.id != old.id}
