"""The HTTP API of `cifar-cam serve` (FastAPI) over a `Predictor`: `create_app` puts the parts together.

    app = create_app(Predictor.load("outputs/train/<run>"), Settings())

Endpoints (routes.py): `POST /v1/predict` (one image: multipart field `file`, or the raw body),
`POST /v1/predict/batch` (multipart field `files`), `GET /v1/model`, `GET /v1/gallery` and
`GET /v1/gallery/{rank}/{layer}.png` (the mistakes of a `cifar-cam gradcam` run, with serve.gallery: gallery.py),
`POST /v1/admin/reload` (the model file loaded again: model_slot.py), the probes `GET /livez`, `GET /readyz`
and `GET /healthz` (lifecycle.py), `GET /metrics` (Prometheus: metrics.py), `GET /docs` (Swagger UI from the
package's swagger-ui-bundle files: no CDN) and `GET /` (the page in `static/index.html`, or a placeholder).

Concurrent requests are gathered into one forward pass (batcher.py), at most serve.max_queue images waiting and
serve.timeout_s a request; forward passes run one at a time in a worker thread, decoding in the default thread
pool, so the event loop only moves bytes. Uploads are read into memory, at most `max_upload_mb`, and never
written to disk (uploads.py). Every error is JSON `{"detail": "<what to do>"}`; every response carries
X-Request-ID and X-Model-Id (observe.py); the OpenAPI document says all of it (openapi.py).

For `uvicorn --factory` (serve.workers > 1), `factory()` builds the app from the JSON in the environment
variable CIFAR_CAM_SERVE_CONFIG: {"ckpt", "device", "precision", "threads", "batch_size", "settings": {...}}.
With `settings.calibration` (serve.calibration) the probabilities are softmax(logits / T); /v1/model says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from cifar_cam.serve import openapi
from cifar_cam.serve.batcher import Batcher
from cifar_cam.serve.gallery import add_gallery_routes, load_gallery
from cifar_cam.serve.lifecycle import Lifecycle
from cifar_cam.serve.metrics import Metrics
from cifar_cam.serve.model_slot import (
    Loaded,
    ModelCheckError,
    ModelSlot,
    input_hw,
    model_info,
    warm_up_and_check,
)
from cifar_cam.serve.observe import Observer, open_access_log
from cifar_cam.serve.routes import (
    Answers,
    ApiKeyMiddleware,
    add_docs_and_page,
    add_error_handlers,
    add_predict_routes,
    open_paths,
)
from cifar_cam.serve.settings import ApiError, Settings

if TYPE_CHECKING:
    from cifar_cam.inference.predictor import Predictor

ENV = "CIFAR_CAM_SERVE_CONFIG"
log = logging.getLogger("cifar_cam.serve")


def create_app(predictor: Predictor, settings: Settings | None = None, load: Callable[[], Predictor] | None = None,
               load_seconds: float = 0.0, workers: int = 1) -> FastAPI:
    """The FastAPI app serving `predictor`, step by step: the model's slot, the batcher, the middleware, the routes.

    `load` gives the model file loaded again (a reload; default: `predictor.source` when it is a file);
    `workers` > 1: this is one of several processes (uvicorn --factory), whose warm-up finishes before the
    process counts as started, and whose reload replaces every worker (SIGHUP to uvicorn's supervisor)."""
    settings = settings or Settings()
    metrics = Metrics(settings.metrics)
    if load is None and Path(predictor.source).is_file():
        spec = {"ckpt": predictor.source, "batch_size": predictor.batch_size, "settings": asdict(settings)}
        load = lambda: load_predictor(spec)  # noqa: E731
    slot = ModelSlot(Loaded(predictor, model_info(predictor, settings), load_seconds), settings, metrics, load)
    lifecycle = Lifecycle(settings.drain_s)
    batcher = Batcher(settings.max_batch, settings.max_wait_ms, settings.max_queue, metrics)
    metrics.watch(lambda: len(batcher.pending), lambda: lifecycle.in_flight)
    gallery = load_gallery(settings.gallery) if settings.gallery else None

    async def warm_up() -> None:
        try:
            seconds = await batcher.run(warm_up_and_check, predictor)
        except ModelCheckError as e:
            lifecycle.problem = str(e)
            log.error("the model is not served: %s (%s)", e, predictor.source)
            raise
        slot.warmed_up(seconds)
        lifecycle.ready = True

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        app.state.access_log = open_access_log(settings.access_log)
        lifecycle.install_signals(slot.reload)
        if workers > 1:
            await warm_up()  # uvicorn's supervisor counts a worker as started (and retires the old) only after this
            task = None
        else:
            task = asyncio.get_running_loop().create_task(warm_up(), name="warm-up")  # /readyz 503 until done
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # the error is logged in warm_up
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await batcher.stop()
            lifecycle.restore_signals()
            if app.state.access_log not in (None, sys.stdout):
                app.state.access_log.close()
            metrics.process_exited()

    height, width = input_hw(predictor)
    app = FastAPI(title="cifar-cam serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description=f"A {predictor.kind} image classifier ({len(predictor.classes)} classes, "
                              f"{height}x{width} px) with Grad-CAM. Every error is JSON {{\"detail\": message}}; "
                              "every response carries X-Request-ID and X-Model-Id.")
    state = app.state
    state.predictor, state.settings, state.batcher, state.slot = predictor, settings, batcher, slot
    state.metrics, state.lifecycle, state.gallery, state.access_log = metrics, lifecycle, gallery, None
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key, open_paths=open_paths(settings))
    app.add_middleware(Observer, state=state, router=app.router)  # outermost: 401s get ids and counts too
    add_error_handlers(app)
    add_gallery_routes(app, gallery)
    add_docs_and_page(app)
    add_predict_routes(app, Answers(slot, settings, batcher, metrics, lifecycle))
    add_operations_routes(app, slot, lifecycle, metrics, settings, workers)
    openapi.install(app, open_paths(settings) if settings.api_key else None)
    return app


def add_operations_routes(app: FastAPI, slot: ModelSlot, lifecycle: Lifecycle, metrics: Metrics,
                          settings: Settings, workers: int) -> None:
    """/v1/model, the probes (/healthz, /livez, /readyz), /metrics and POST /v1/admin/reload."""
    batcher = app.state.batcher

    @app.get("/v1/model", summary="The model answering now: id, classes, input, accuracy, source checkpoint",
             response_model=None)
    async def model() -> dict[str, Any]:
        current = slot.current
        return {**current.info, "load_seconds": round(current.load_seconds, 3),
                "warmup_seconds": None if current.warmup_seconds is None else round(current.warmup_seconds, 4),
                "reloads": slot.reloads}

    @app.get("/healthz", summary="Liveness, with counts (needs no API key)", response_model=None,
             responses={200: {"model": openapi.Health}})
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": slot.current.id, "passes": batcher.passes, "images": batcher.images}

    @app.get("/livez", summary="Live: the process answers HTTP (a failing liveness probe restarts it)",
             response_model=None, responses={200: {"model": openapi.Ready}})
    async def livez() -> dict[str, Any]:
        return {"status": "live", "model": slot.current.id}

    @app.get("/readyz", summary="Ready: the model is warmed up and the server is not stopping (else 503)",
             response_model=None, responses={200: {"model": openapi.Ready}, **openapi.errors(503)})
    async def readyz() -> dict[str, Any]:
        reason = lifecycle.not_ready_reason()
        if reason is not None:
            raise ApiError(503, reason, {"Retry-After": "1"})
        return {"status": "ready", "model": slot.current.id}

    if settings.metrics:
        @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response,
                 responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
        async def metrics_text() -> Response:
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

    @app.post("/v1/admin/reload", summary="Load the model file (ckpt=) again; it serves once warmed up and checked",
              response_model=None, responses={200: {"model": openapi.Reloaded}, 202: {"model": openapi.Restarting},
                                               **openapi.errors(403, 409)})
    async def reload(request: Request) -> Any:
        if not settings.api_key:
            raise ApiError(403, "POST /v1/admin/reload needs serve.api_key (and the header X-API-Key); without one, "
                                "send the server SIGHUP")
        if workers > 1:  # every worker is replaced, one at a time, by uvicorn's supervisor
            os.kill(os.getppid(), signal.SIGHUP)
            from fastapi.responses import JSONResponse

            return JSONResponse({"detail": f"replacing the {workers} workers one at a time; each serves the "
                                           "new file once it has warmed up"}, 202)
        try:
            return await slot.reload("POST /v1/admin/reload")
        except ModelCheckError as e:
            raise ApiError(409, f"reload refused: {e}; {slot.current.id} keeps serving") from None


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
    settings = Settings(**spec.get("settings", {}))
    t0 = time.perf_counter()
    try:
        predictor = load_predictor(spec)
    except Exception:
        # a worker replacing another (SIGHUP) found a broken file: counted (the workers share the metrics
        # directory), and uvicorn keeps the old worker serving
        Metrics(settings.metrics).reloads.labels("failed").inc()
        raise
    return create_app(predictor, settings, lambda: load_predictor(spec), time.perf_counter() - t0,
                      workers=int(spec.get("workers", 2)))


def spec_json(ckpt: str, device: str, precision: str, threads: int | None, settings: Settings,
              batch_size: int = 256, workers: int = 1) -> str:
    return json.dumps({"ckpt": ckpt, "device": device, "precision": precision, "threads": threads,
                       "batch_size": batch_size, "workers": workers, "settings": asdict(settings)})
