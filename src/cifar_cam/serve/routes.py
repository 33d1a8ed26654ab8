"""The routes: every error as JSON, the API key, /docs and the page, and the two predict routes with what they
share (`Answers`: the query checked, the image through the batcher within serve.timeout_s, the answer shaped)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifar_cam.serve.batcher import Batcher
from cifar_cam.serve.lifecycle import Lifecycle
from cifar_cam.serve.metrics import Metrics
from cifar_cam.serve.observe import SCOPE_MODEL, SCOPE_STARTED
from cifar_cam.serve.openapi import BATCH_BODY, IMAGE_BODY, PREDICT_ERRORS, BatchAnswer, Prediction, errors
from cifar_cam.serve.settings import ApiError, Settings
from cifar_cam.serve.uploads import Part, batch_uploads, load_image, overlay_png, png_base64, read_body, single_upload

if TYPE_CHECKING:
    from cifar_cam.serve.model_slot import Loaded, ModelSlot

log = logging.getLogger("cifar_cam.serve")


STATIC = Path(__file__).parent / "static"


PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cifar-cam serve</title></head>
<body><h1>cifar-cam serve</h1>
<p>The API is up: <a href="docs">/docs</a> (OpenAPI), <a href="v1/model">/v1/model</a>,
<code>POST /v1/predict</code>.</p></body></html>
"""


# with serve.api_key: no secret here, the page loads, the probes answer; /metrics too unless serve.metrics_key
OPEN_PATHS = frozenset(("/", "/docs", "/openapi.json", "/healthz", "/livez", "/readyz"))


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths that need no X-API-Key (besides the page's /static/* files)."""
    return OPEN_PATHS if settings.metrics_key else OPEN_PATHS | {"/metrics"}


class ApiKeyMiddleware:
    """Every /v1/* request needs header X-API-Key; the page (/, /static/*), /docs, /openapi.json and the probes
    (/healthz, /livez, /readyz; /metrics unless serve.metrics_key) do not (pure ASGI: nothing else is touched).
    Any other path needs it as well."""

    def __init__(self, app: Any, key: str, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or (path.startswith("/static/") and ".." not in path)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.is_open(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"x-api-key"), None)
            if given is None or not hmac.compare_digest(given, self.key):
                detail = ("header X-API-Key is missing: this server needs its serve.api_key" if given is None
                          else "header X-API-Key is wrong: send this server's serve.api_key")
                await JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "X-API-Key"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_detail(exc: RequestValidationError) -> str:
    out = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path", "header")]
        name = ".".join(loc) or "request"
        given = e.get("input")
        got = f"={given}" if isinstance(given, str | int | float) else ""
        out.append(f"{name}{got}: {e.get('msg', 'invalid')}")
    return "; ".join(out) + " (see /docs for the parameters)"


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON {"detail": message}: ours, validation (422), HTTP (404 names the path), crashes (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"{request.url.path}: no such endpoint (see /docs)"
        return JSONResponse({"detail": detail}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
                            500)


def add_docs_and_page(app: FastAPI) -> None:
    """/docs (Swagger UI from the package's files: no CDN), /static and the page at /."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/static/swagger", StaticFiles(directory=str(swagger_ui_path)), name="swagger")
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title="cifar-cam serve: API",
                                   swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/static/swagger/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        index = STATIC / "index.html"
        return HTMLResponse(index.read_text(encoding="utf-8") if index.is_file() else PLACEHOLDER)


class Answers:
    """What both predict routes do with an image: check the query, run it through the batcher within the
    request's time (serve.timeout_s), shape the answer and count what the model saw."""

    def __init__(self, slot: ModelSlot, settings: Settings, batcher: Batcher, metrics: Metrics,
                 lifecycle: Lifecycle) -> None:
        self.slot, self.settings, self.batcher, self.metrics = slot, settings, batcher, metrics
        self.lifecycle = lifecycle

    def model(self, request: Request) -> Loaded:
        """The model this request is answered by (the one serving when it arrived); 503 before warm-up."""
        reason = self.lifecycle.not_ready_reason()
        if reason is not None and not self.lifecycle.draining:  # while draining, requests are still answered
            self.metrics.shed.labels("not_ready").inc()
            raise ApiError(503, reason, {"Retry-After": "1"})
        model = self.slot.current
        request.scope[SCOPE_MODEL] = model.id
        return model

    async def within_deadline(self, request: Request, work: Any) -> Any:
        """`work` (a coroutine), or ApiError 504 once the request has taken serve.timeout_s in all."""
        started = request.scope.get(SCOPE_STARTED, time.monotonic())
        left = self.settings.timeout_s - (time.monotonic() - started)
        try:
            return await asyncio.wait_for(work, max(left, 0.001))
        except TimeoutError:
            self.metrics.shed.labels("timeout").inc()
            raise ApiError(504, f"no answer within serve.timeout_s={self.settings.timeout_s:g} s (the server is "
                                "busy); retry later or with fewer images") from None

    @staticmethod
    def check_query(model: Loaded, topk: int | None, cam: bool, layer: str | None, default_k: int
                    ) -> tuple[int, str | None]:
        """(k, the CAM layer or None) of a request's query; ApiError 422 for one the model cannot answer."""
        predictor = model.predictor
        n_classes = len(predictor.classes)
        if topk is not None and topk > n_classes:
            raise ApiError(422, f"topk={topk}: the model has {n_classes} classes; pass topk between 1 and "
                                f"{n_classes}")
        k = min(default_k if topk is None else topk, n_classes)
        if not predictor.cam_layers:  # an exported model whose head is more than a linear layer
            if cam:
                raise ApiError(422, "cam=true: this model has no CAM (its head is more than one linear layer over "
                                    "the pooled features); serve the .pt checkpoint for Grad-CAM")
            return k, None
        layer = layer or predictor.cam_layers[-1]  # none given: the model's feature layer
        if layer not in predictor.cam_layers:  # with cam=false too: the schema names this model's layers
            if predictor.kind != "torch":
                raise ApiError(422, f"layer={layer[:40]}: a {predictor.kind} model gives CAM at "
                                    f"{', '.join(predictor.cam_layers)} only; serve the .pt checkpoint for others")
            raise ApiError(422, f"layer={layer[:40]}: unknown layer; pass one of {', '.join(predictor.cam_layers)}")
        return k, layer if cam else None

    async def image(self, model: Loaded, data: bytes, name: str) -> np.ndarray:
        """An upload decoded to the model's input size (off the event loop); ApiError for a bad one."""
        return await asyncio.to_thread(load_image, data, name, model.predictor.fit, self.settings.max_pixels)

    async def answer(self, model: Loaded, pixels: np.ndarray, k: int, layer: str | None,
                     queued: asyncio.Future) -> dict[str, Any]:
        """Top-k classes of one image (and its CAM overlay at `layer`) once its pass ran (`queued`: the future
        Batcher.enqueue gave)."""
        logits, heatmap = await queued
        pred = model.predictor.top(logits[None], k)[0]
        self.metrics.child("predictions", pred.classes[0]).inc()
        self.metrics.confidence.observe(pred.probabilities[0])
        out: dict[str, Any] = {"classes": pred.classes, "probabilities": [round(p, 6) for p in pred.probabilities],
                               "model": model.id}
        if layer is not None and heatmap is not None:
            out["layer"] = layer
            out["overlay_png"] = await asyncio.to_thread(overlay_png, pixels, heatmap, self.settings.overlay_size)
            out["input_png"] = png_base64(pixels)  # the model's view (size x size)
        return out


def add_predict_routes(app: FastAPI, answers: Answers) -> None:
    """POST /v1/predict (one image: multipart or raw body) and /v1/predict/batch (multipart 'files')."""
    settings, predictor = answers.settings, answers.slot.current.predictor
    layers, n_classes = list(predictor.cam_layers), len(predictor.classes)
    # the schema's bounds are the model's (checked by check_query, whose messages say what to pass instead)
    topk_q = Query(None, ge=1, description=f"classes per image, at most {n_classes} (default serve.topk="
                                           f"{settings.topk})", json_schema_extra={"maximum": n_classes})
    cam_q = Query(False, description="add the Grad-CAM overlay of the top class (base64 PNG)")
    layer_q = Query(None, description=f"CAM layer: {', '.join(layers) or 'none'} (default: the last)",
                    json_schema_extra={"enum": layers} if layers else None)

    @app.post("/v1/predict", openapi_extra=IMAGE_BODY, summary="Top-k classes (and Grad-CAM) of one image",
              response_model=None, responses={200: {"model": Prediction}, **errors(*PREDICT_ERRORS)})
    async def predict(request: Request, topk: int | None = topk_q, cam: bool = cam_q, layer: str | None = layer_q
                      ) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = answers.model(request)
        k, cam_layer = answers.check_query(model, topk, cam, layer, settings.topk)

        async def work() -> dict[str, Any]:
            body = await read_body(request, settings.max_upload_bytes)
            data, name = single_upload(body, request.headers.get("content-type", ""))
            with answers.batcher.reserve(1):  # 503 before the decode when the queue is full
                pixels = await answers.image(model, data, name)
                queued = answers.batcher.enqueue(model, pixels, cam_layer)
            return await answers.answer(model, pixels, k, cam_layer, queued)

        out = await answers.within_deadline(request, work())
        out["ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    @app.post("/v1/predict/batch", openapi_extra=BATCH_BODY, response_model=None,
              summary=f"Top-k classes of up to {settings.max_batch_images} images (one result each)",
              responses={200: {"model": BatchAnswer}, **errors(*PREDICT_ERRORS)})
    async def predict_batch(request: Request, topk: int | None = topk_q, cam: bool = cam_q,
                            layer: str | None = layer_q) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = answers.model(request)
        k, cam_layer = answers.check_query(model, topk, cam, layer, settings.topk)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with the images as fields 'files' "
                                "(curl -F files=@a.png -F files=@b.png)")

        async def decode(i: int, part: Part) -> tuple[dict[str, Any], np.ndarray | None]:
            name = part.filename or f"files[{i}]"
            item: dict[str, Any] = {"index": i, "name": name}
            try:
                return item, await answers.image(model, part.data, f"upload '{name}'")
            except ApiError as e:
                item.update(status=e.status, detail=e.detail)
                return item, None

        async def one(item: dict[str, Any], pixels: np.ndarray, queued: asyncio.Future) -> None:
            try:
                item.update(await answers.answer(model, pixels, k, cam_layer, queued))
                item["status"] = 200
                del item["model"]
            except ApiError as e:
                item.update(status=e.status, detail=e.detail)

        async def work() -> list[dict[str, Any]]:
            body = await read_body(request, settings.max_upload_bytes)
            files = batch_uploads(body, ctype, settings.max_batch_images)
            with answers.batcher.reserve(len(files)):  # all of the request's images, or none (503)
                decoded = await asyncio.gather(*(decode(i, p) for i, p in enumerate(files)))
                good = [(item, pixels) for item, pixels in decoded if pixels is not None]
                queued = [answers.batcher.enqueue(model, pixels, cam_layer) for _, pixels in good]
            await asyncio.gather(*(one(item, pixels, q) for (item, pixels), q in zip(good, queued, strict=True)))
            return [item for item, _ in decoded]

        results = await answers.within_deadline(request, work())
        return {"model": model.id, "results": results, "ms": round((time.perf_counter() - t0) * 1000, 3)}
