"""The HTTP API of `cifar-cam serve` (FastAPI) over a `Predictor`: `create_app` puts the parts together.

    app = create_app(Predictor.load("outputs/train/<run>"), Settings())

Endpoints (routes.py): `POST /v1/predict` (one image: multipart field `file`, or the raw body),
`POST /v1/predict/batch` (multipart field `files`), `GET /v1/model`, `GET /v1/gallery` and
`GET /v1/gallery/{rank}/{layer}.png` (the mistakes of a `cifar-cam gradcam` run, with serve.gallery: gallery.py),
`GET /healthz`, `GET /docs` (Swagger UI from the package's swagger-ui-bundle files: no CDN) and `GET /` (the page in
`static/index.html`, or a placeholder).

Concurrent requests are gathered into one forward pass (batcher.py); forward passes run one at a time in a worker
thread, decoding in the default thread pool, so the event loop only moves bytes. Uploads are read into memory, at
most `max_upload_mb`, and never written to disk (uploads.py). Every error is JSON `{"detail": "<what to do>"}`.

For `uvicorn --factory` (serve.workers > 1), `factory()` builds the app from the JSON in the environment
variable CIFAR_CAM_SERVE_CONFIG: {"ckpt", "device", "precision", "threads", "batch_size", "settings": {...}}.
With `settings.calibration` (serve.calibration) the probabilities are softmax(logits / T); /v1/model says so.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI

from cifar_cam.io import sha256
from cifar_cam.serve.batcher import Batcher
from cifar_cam.serve.gallery import add_gallery_routes, load_gallery
from cifar_cam.serve.routes import Answers, ApiKeyMiddleware, add_docs_and_page, add_error_handlers, add_predict_routes
from cifar_cam.serve.settings import FORMATS, Settings
from cifar_cam.training.checkpoint import stored_test_accuracy

if TYPE_CHECKING:
    from cifar_cam.inference.predictor import Predictor

ENV = "CIFAR_CAM_SERVE_CONFIG"


def model_info(predictor: Predictor, settings: Settings) -> dict[str, Any]:
    """The model card /v1/model answers with; its `id` is in every prediction."""
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


def create_app(predictor: Predictor, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving `predictor`: the batcher, the middleware, then the routes, step by step."""
    settings = settings or Settings()
    info = model_info(predictor, settings)
    batcher = Batcher(predictor, settings.max_batch, settings.max_wait_ms)
    height, width = predictor.image_size
    gallery = load_gallery(settings.gallery) if settings.gallery else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        await batcher.run(predictor.logits, np.zeros((1, height, width, 3), np.uint8))  # warm-up
        yield
        await batcher.stop()

    app = FastAPI(title="cifar-cam serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description=f"A {predictor.kind} image classifier ({len(predictor.classes)} classes, "
                              f"{height}x{width} px) with Grad-CAM. Every error is JSON {{\"detail\": message}}.")
    app.state.predictor, app.state.settings, app.state.batcher, app.state.info = predictor, settings, batcher, info
    app.state.gallery = gallery
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    add_error_handlers(app)
    add_gallery_routes(app, gallery)
    add_docs_and_page(app)
    add_predict_routes(app, Answers(predictor, settings, batcher, info["id"]))

    @app.get("/v1/model", summary="The model card: classes, input, accuracy, source checkpoint")
    async def model() -> dict[str, Any]:
        return info

    @app.get("/healthz", summary="Liveness (needs no API key)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": info["id"], "passes": batcher.passes, "images": batcher.images}

    return app


def load_predictor(spec: dict[str, Any]) -> Predictor:
    """The Predictor a serve spec names ({"ckpt", "device", "precision", "threads", "batch_size", "settings"})."""
    from cifar_cam.inference.predictor import Predictor

    threads = spec.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    settings = spec.get("settings", {})
    return Predictor.load(spec["ckpt"], device=spec.get("device", "cpu"), batch_size=int(spec.get("batch_size", 256)),
                          precision=spec.get("precision", "fp32"), threads=threads,
                          max_pixels=int(settings.get("max_pixels", 40_000_000)),
                          calibration=settings.get("calibration"))


def factory() -> FastAPI:
    """`uvicorn --factory cifar_cam.serve.app:factory`: the app from the JSON in $CIFAR_CAM_SERVE_CONFIG."""
    text = os.environ.get(ENV)
    if not text:
        raise RuntimeError(f"{ENV} is not set: it holds the JSON serve spec (cifar-cam serve sets it)")
    spec = json.loads(text)
    return create_app(load_predictor(spec), Settings(**spec.get("settings", {})))


def spec_json(ckpt: str, device: str, precision: str, threads: int | None, settings: Settings,
              batch_size: int = 256) -> str:
    return json.dumps({"ckpt": ckpt, "device": device, "precision": precision, "threads": threads,
                       "batch_size": batch_size, "settings": asdict(settings)})


