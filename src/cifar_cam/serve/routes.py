"""The routes: every error as JSON, the API key, /docs and the page, and the two predict routes with what they
share (`Answers`: the query checked, the image through the batcher, the answer shaped)."""

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
from cifar_cam.serve.settings import FORMATS, ApiError, Settings
from cifar_cam.serve.uploads import Part, batch_uploads, load_image, overlay_png, png_base64, read_body, single_upload

if TYPE_CHECKING:
    from cifar_cam.inference.predictor import Predictor

log = logging.getLogger("cifar_cam.serve")


STATIC = Path(__file__).parent / "static"


PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cifar-cam serve</title></head>
<body><h1>cifar-cam serve</h1>
<p>The API is up: <a href="docs">/docs</a> (OpenAPI), <a href="v1/model">/v1/model</a>,
<code>POST /v1/predict</code>.</p></body></html>
"""


OPEN_PATHS = ("/", "/docs", "/openapi.json", "/healthz")  # with serve.api_key: no secret here, the page loads


class ApiKeyMiddleware:
    """Every /v1/* request needs header X-API-Key; the page (/, /static/*), /docs, /openapi.json and /healthz
    do not (pure ASGI: nothing else is touched). Any other path needs it as well."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    @staticmethod
    def is_open(path: str) -> bool:
        return path in OPEN_PATHS or (path.startswith("/static/") and ".." not in path)

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


IMAGE_BODY = {
    "requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary", "description": f"one image ({FORMATS})"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    }, "required": True, "description": "one image: multipart field `file`, or the raw body"},
}


BATCH_BODY = {
    "requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "images, at most serve.max_batch_images"}}}},
    }, "required": True},
}


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON {"detail": message}: ours, validation (422), HTTP (404 names the path), crashes (500)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status)

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
    """What both predict routes do with an image: check the query, run it through the batcher, shape the answer."""

    def __init__(self, predictor: Predictor, settings: Settings, batcher: Batcher, model_id: str) -> None:
        self.predictor, self.settings, self.batcher, self.model_id = predictor, settings, batcher, model_id
        self.n_classes, self.fit = len(predictor.classes), predictor.fit

    def check_query(self, topk: int | None, cam: bool, layer: str | None) -> tuple[int, str | None]:
        """(k, the CAM layer or None) of a request's query; ApiError 422 for one the model cannot answer."""
        predictor, n_classes = self.predictor, self.n_classes
        k = self.settings.topk if topk is None else topk
        if topk is not None and topk > n_classes:
            raise ApiError(422, f"topk={topk}: the model has {n_classes} classes; pass topk between 1 and "
                                f"{n_classes}")
        k = min(k, n_classes)
        if not predictor.cam_layers:  # an exported model whose head is more than a linear layer
            if cam:
                raise ApiError(422, "cam=true: this model has no CAM (its head is more than one linear layer over "
                                    "the pooled features); serve the .pt checkpoint for Grad-CAM")
            return k, None
        layer = layer or predictor.cam_layers[-1]  # none given: the model's feature layer
        if layer not in predictor.cam_layers:
            raise ApiError(422, f"layer={layer[:40]}: not a CAM layer of this model; pass one of "
                                f"{', '.join(predictor.cam_layers)}"
                                + ("" if predictor.kind == "torch" else " (serve the .pt checkpoint for others)"))
        return k, layer if cam else None

    async def image(self, data: bytes, name: str) -> np.ndarray:
        """An upload decoded to the model's input size (off the event loop); ApiError for a bad one."""
        return await asyncio.to_thread(load_image, data, name, self.fit, self.settings.max_pixels)

    async def answer(self, pixels: np.ndarray, k: int, layer: str | None) -> dict[str, Any]:
        """Top-k classes of one image (and its CAM overlay at `layer`), through the batcher."""
        logits, heatmap = await self.batcher.submit(pixels, layer)
        pred = self.predictor.top(logits[None], k)[0]
        out: dict[str, Any] = {"classes": pred.classes, "probabilities": [round(p, 6) for p in pred.probabilities],
                               "model": self.model_id}
        if layer is not None and heatmap is not None:
            out["layer"] = layer
            out["overlay_png"] = await asyncio.to_thread(overlay_png, pixels, heatmap, self.settings.overlay_size)
            out["input_png"] = png_base64(pixels)  # the model's view (size x size)
        return out


def add_predict_routes(app: FastAPI, answers: Answers) -> None:
    """POST /v1/predict (one image: multipart or raw body) and /v1/predict/batch (multipart 'files')."""
    settings, predictor = answers.settings, answers.predictor
    topk_q = Query(None, ge=1, description=f"classes per image (default serve.topk={settings.topk})")
    cam_q = Query(False, description="add the Grad-CAM overlay of the top class (base64 PNG)")
    layer_q = Query(None, description=f"CAM layer: {', '.join(predictor.cam_layers) or 'none'} (default: the last)")

    @app.post("/v1/predict", openapi_extra=IMAGE_BODY, summary="Top-k classes (and Grad-CAM) of one image")
    async def predict(request: Request, topk: int | None = topk_q, cam: bool = cam_q, layer: str | None = layer_q
                      ) -> dict[str, Any]:
        t0 = time.perf_counter()
        k, cam_layer = answers.check_query(topk, cam, layer)
        body = await read_body(request, settings.max_upload_bytes)
        data, name = single_upload(body, request.headers.get("content-type", ""))
        out = await answers.answer(await answers.image(data, name), k, cam_layer)
        out["ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    @app.post("/v1/predict/batch", openapi_extra=BATCH_BODY,
              summary=f"Top-k classes of up to {settings.max_batch_images} images (one result each)")
    async def predict_batch(request: Request, topk: int | None = topk_q, cam: bool = cam_q,
                            layer: str | None = layer_q) -> dict[str, Any]:
        t0 = time.perf_counter()
        k, cam_layer = answers.check_query(topk, cam, layer)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with the images as fields 'files' "
                                "(curl -F files=@a.png -F files=@b.png)")
        body = await read_body(request, settings.max_upload_bytes)
        files = batch_uploads(body, ctype, settings.max_batch_images)

        async def one(i: int, part: Part) -> dict[str, Any]:
            name = part.filename or f"files[{i}]"
            item: dict[str, Any] = {"index": i, "name": name}
            try:
                item.update(await answers.answer(await answers.image(part.data, f"upload '{name}'"), k, cam_layer))
                item["status"] = 200
                del item["model"]
            except ApiError as e:
                item.update(status=e.status, detail=e.detail)
            return item

        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(files)))
        return {"model": answers.model_id, "results": list(results),
                "ms": round((time.perf_counter() - t0) * 1000, 3)}
