"""The HTTP API of `cifar-cam serve` (FastAPI) over a `Predictor`.

    app = create_app(Predictor.load("outputs/train/<run>"), Settings())

Endpoints: `POST /v1/predict` (one image: multipart field `file`, or the raw body), `POST /v1/predict/batch`
(multipart field `files`), `GET /v1/model`, `GET /v1/gallery` and `GET /v1/gallery/{rank}/{layer}.png` (the
mistakes of a `cifar-cam gradcam` run, with serve.gallery), `GET /healthz`, `GET /docs` (Swagger UI from the package's
swagger-ui-bundle files: no CDN) and `GET /` (the page in `static/index.html`, or a placeholder).

Concurrent requests are gathered into one forward pass by `Batcher` (up to `max_batch` images, the first
waiting at most `max_wait_ms`; 0 turns gathering off); forward passes run one at a time in a worker thread,
decoding in the default thread pool, so the event loop only moves bytes. Uploads are read into memory, at most
`max_upload_mb` (413 from Content-Length before the body is read, and while reading a body without one), and
never written to disk; an image whose header says more than `max_pixels` is refused (413) before decoding.
Every error is JSON `{"detail": "<what to do>"}`.

For `uvicorn --factory` (serve.workers > 1), `factory()` builds the app from the JSON in the environment
variable CIFAR_CAM_SERVE_CONFIG: {"ckpt", "device", "precision", "threads", "batch_size", "settings": {...}}.
With `settings.calibration` (serve.calibration) the probabilities are softmax(logits / T); /v1/model says so.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cifar_cam.errors import ConfigError, DataError
from cifar_cam.images import decode_rgb, header_size

if TYPE_CHECKING:
    import uvicorn

    from cifar_cam.predictor import Predictor

log = logging.getLogger("cifar_cam.serve")

ENV = "CIFAR_CAM_SERVE_CONFIG"
STATIC = Path(__file__).parent / "static"
ALL_LAYERS = ("layer1", "layer2", "layer3", "layer4")
FORMATS = "PNG, JPEG, BMP, GIF, TIFF, WebP, PPM"
PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cifar-cam serve</title></head>
<body><h1>cifar-cam serve</h1>
<p>The API is up: <a href="docs">/docs</a> (OpenAPI), <a href="v1/model">/v1/model</a>,
<code>POST /v1/predict</code>.</p></body></html>
"""


@dataclass
class Settings:
    """What `serve.*` sets for the app (host, port and workers belong to the server, not here)."""

    api_key: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_batch_images: int = 64
    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000
    topk: int = 3
    gallery: str | None = None
    calibration: str | None = None   # a calibration.json / eval run dir: load_predictor applies its temperature
    overlay_size: int = 128

    @classmethod
    def from_cfg(cls, serve: Any) -> Settings:
        """From the `serve` config node (or any mapping); unknown keys (host, port, workers) are ignored.
        ConfigError when serve.gallery is set but is not a gradcam run dir."""
        names = {f.name for f in fields(cls)}
        settings = cls(**{k: serve[k] for k in serve if k in names})
        if settings.gallery:
            load_gallery(settings.gallery)  # a bad serve.gallery fails here, before a port is bound or a worker runs
        return settings

    @property
    def max_upload_bytes(self) -> int:
        return int(float(self.max_upload_mb) * 1024 * 1024)


class ApiError(Exception):
    """An HTTP error with a message a person can act on (becomes {"detail": message})."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- model info ------------------------------------------------------------------------------------
def _sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_info(predictor: Predictor, settings: Settings) -> dict[str, Any]:
    """The model card /v1/model answers with; its `id` is in every prediction."""
    card = dict(predictor.card)
    source = card.get("source") if isinstance(card.get("source"), dict) else {}
    sha = source.get("sha256") if predictor.kind != "torch" else None
    file_sha = _sha256(predictor.source)
    accuracy = card.get("test_accuracy")
    if accuracy is None and predictor.kind == "torch" and Path(predictor.source).is_file():
        from cifar_cam.tasks.export import stored_test_accuracy

        accuracy = stored_test_accuracy(Path(predictor.source))
    s = predictor.image_size
    return {
        "id": f"sha256:{file_sha[:16]}" if file_sha else "in-memory",
        "source": predictor.source,
        "source_sha256": file_sha,
        "checkpoint_sha256": sha or file_sha,
        "kind": predictor.kind,
        "classes": list(predictor.classes),
        "num_classes": len(predictor.classes),
        "image_size": s,
        "input": {"formats": FORMATS, "as": "multipart field 'file' (batch: 'files') or the raw request body",
                  "decoded_to": f"uint8 RGB {s}x{s}: the whole image resized (cv2 INTER_AREA, stretched, no crop); "
                                "transparency over white, EXIF orientation applied",
                  "max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels,
                  "max_batch_images": settings.max_batch_images},
        "cam_layers": list(predictor.backend.layers),
        "topk_default": min(settings.topk, len(predictor.classes)),
        "test_accuracy": accuracy,
        "probabilities": "softmax(logits)" if predictor.calibration is None else
                         f"softmax(logits / {predictor.temperature:.6g})",
        "calibration": None if predictor.calibration is None else predictor.calibration.summary(),
        "card": card,
    }


# -- micro-batching --------------------------------------------------------------------------------
@dataclass
class _Item:
    pixels: np.ndarray            # uint8 (S, S, 3)
    layer: str | None             # CAM layer, or None
    future: asyncio.Future


class Batcher:
    """Gathers concurrent requests into one forward pass: up to `max_batch` images, the first waiting at
    most `max_wait_ms` for others (0: one image a pass). Passes run one at a time in a worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float) -> None:
        self.predictor = predictor
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.pending: collections.deque[_Item] = collections.deque()
        self.passes = 0    # forward passes run
        self.images = 0    # images they held
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.pending:
            item = self.pending.popleft()
            if not item.future.done():
                item.future.set_exception(ApiError(503, "the server is shutting down; retry on another instance"))
        self.executor.shutdown(wait=True)

    async def run(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` in the forward thread (one at a time with the passes)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, pixels: np.ndarray, layer: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """One image's logits (and CAM map at `layer`), computed in a gathered pass."""
        if self._wake is None:
            raise ApiError(503, "the server is starting or stopping; retry in a moment")
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(pixels, layer, future))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.max_wait > 0 and len(self.pending) < self.max_batch:
                deadline = loop.time() + self.max_wait
                while len(self.pending) < self.max_batch and (left := deadline - loop.time()) > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
            n = self.max_batch if self.max_wait > 0 else 1
            batch = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
            batch = [b for b in batch if not b.future.done()]  # the client left
            if not batch:
                continue
            pixels = np.stack([b.pixels for b in batch])
            layers = [b.layer for b in batch]
            try:
                logits, maps = await loop.run_in_executor(self.executor, self._forward, pixels, layers)
            except Exception as e:  # noqa: BLE001  (each request answers with it)
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(e)
                continue
            self.passes += 1
            self.images += len(batch)
            for i, b in enumerate(batch):
                if not b.future.done():
                    b.future.set_result((logits[i], maps.get(i)))

    def _forward(self, pixels: np.ndarray, layers: list[str | None]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        logits = self.predictor.logits(pixels)
        maps: dict[int, np.ndarray] = {}
        for layer in sorted({x for x in layers if x}):
            idx = [i for i, x in enumerate(layers) if x == layer]
            cams = self.predictor.cam(pixels[idx], layer, targets=[int(logits[i].argmax()) for i in idx])
            maps.update({i: cams[j] for j, i in enumerate(idx)})
        return logits, maps


# -- reading requests ------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, in memory: 413 from Content-Length before reading it, or once more than `limit` bytes came."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length '{length[:40]}' is not a number of bytes") from None
        if n > limit:
            raise ApiError(413, f"the upload is {_mb(n)}, over serve.max_upload_mb={limit / (1024 * 1024):g}; "
                                "send a smaller image (the model sees 32x32 pixels)")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ApiError(413, f"the upload is over serve.max_upload_mb={limit / (1024 * 1024):g}; "
                                    "send a smaller image (the model sees 32x32 pixels)")
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the body was complete") from None
    return bytes(buf)


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    """A multipart/form-data body (already in memory) -> its parts; nothing touches the disk."""
    try:
        from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
    except ImportError:  # python-multipart < 0.0.13 named its module `multipart`
        from multipart.multipart import MultipartParser, MultipartState, parse_options_header  # type: ignore

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary; let your HTTP client build the body "
                            "(curl -F file=@image.png)")
    parts: list[Part] = []
    headers: dict[bytes, bytes] = {}
    cur: dict[str, Any] = {"field": b"", "value": b"", "data": bytearray()}

    def on_part_begin() -> None:
        headers.clear()
        cur["data"] = bytearray()
        if len(parts) >= max_parts:
            raise ApiError(413, f"more than {max_parts} parts in one request; send at most {max_parts} files")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["value"] += data[start:end]

    def on_header_end() -> None:
        headers[cur["field"].lower()] = cur["value"]
        cur["field"], cur["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        cur["data"] += data[start:end]

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        parts.append(Part(name, None if filename is None else Path(filename.decode("utf-8", "replace")).name,
                          bytes(cur["data"])))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        parser.write(body)
    except ApiError:
        raise
    except Exception as e:  # MultipartParseError and friends
        raise ApiError(400, f"malformed multipart body ({str(e)[:120]}); let your HTTP client build it "
                            "(curl -F file=@image.png)") from None
    if int(parser.state) != int(MultipartState.END):
        raise ApiError(400, "the multipart body is incomplete (no closing boundary); let your HTTP client build "
                            "it (curl -F file=@image.png)")
    return parts


def load_image(data: bytes, name: str, size: int, max_pixels: int) -> np.ndarray:
    """Upload bytes -> uint8 RGB (size, size, 3), or ApiError 422 (empty), 415 (not an image), 413 (too many
    pixels, from the header alone) or 400 (corrupt)."""
    if not data:
        raise ApiError(422, f"{name} is empty; send an image file ({FORMATS})")
    wh = header_size(data)
    if wh is None:
        raise ApiError(415, f"{name} is not an image file cifar-cam reads; send {FORMATS}")
    w, h = wh
    if w * h > max_pixels:
        raise ApiError(413, f"{name} is {w}x{h} ({w * h:,} pixels), over serve.max_pixels={max_pixels:,}; "
                            f"shrink it (the model sees {size}x{size}) or raise serve.max_pixels")
    try:
        return decode_rgb(data, name, size, max_pixels=max_pixels)
    except DataError as e:
        raise ApiError(400, str(e).replace("remove or replace it", "send the complete, intact file")) from None


def png_base64(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("cv2 could not encode a PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, size: int) -> str:
    """The Grad-CAM overlay of one model-sized image, enlarged to `size` px, as base64 PNG."""
    from cifar_cam import viz

    return png_base64(viz.overlay(viz.upscale(pixels, size), viz.upscale(heatmap.astype(np.float32), size)))


# -- the app ---------------------------------------------------------------------------------------
# -- the gallery: a `cifar-cam gradcam` run's mistakes ------------------------------------------------
@dataclass
class Gallery:
    """The mistakes in a gradcam run dir, most confident first; `files[(rank, layer)]` is each PNG's resolved
    path, found at start-up from gradcam.json (a request only ever names a key of this dict, never a path)."""

    root: Path
    entries: list[dict[str, Any]]
    files: dict[tuple[str, str], Path]


def load_gallery(path: str | os.PathLike) -> Gallery:
    """Reads `<path>/gradcam.json`; ConfigError (one line from the CLI) when it is not a gradcam run dir."""
    root = Path(path).expanduser()
    hint = "pass the run dir a `cifar-cam gradcam` run wrote (outputs/gradcam/<run>), or leave serve.gallery unset"
    if not root.is_dir():
        raise ConfigError(f"serve.gallery={path}: no such directory; {hint}")
    summary = root / "gradcam.json"
    if not summary.is_file():
        raise ConfigError(f"serve.gallery={path}: no gradcam.json in it; {hint}")
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"serve.gallery={path}: gradcam.json is unreadable ({str(e)[:120]}); {hint}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ConfigError(f"serve.gallery={path}: gradcam.json has no 'images' list; {hint}")
    base = root.resolve()
    entries: list[dict[str, Any]] = []
    files: dict[tuple[str, str], Path] = {}
    for item in images:
        try:
            rank = int(item["rank"])
            layer_files = dict(item["files"])
            entry = {"rank": rank, "test_row": int(item.get("test_row", -1)), "true": str(item["true"]),
                     "pred": str(item["pred"]), "confidence": float(item["confidence"]),
                     "explained": str(item.get("explained", item["pred"]))}
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"serve.gallery={path}: a gradcam.json entry is malformed ({e!r:.80}); {hint}") from None
        layers = []
        for layer, rel in layer_files.items():
            file = (base / str(rel)).resolve()
            if file.is_relative_to(base) and file.suffix == ".png" and file.is_file():
                files[(str(rank), str(layer))] = file
                layers.append(str(layer))
        if layers:
            entries.append({**entry, "layers": layers})
    entries.sort(key=lambda e: (-e["confidence"], e["rank"]))
    return Gallery(base, entries, files)


# -- the app ---------------------------------------------------------------------------------------
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


def _add_error_handlers(app: FastAPI) -> None:
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


def _add_gallery_routes(app: FastAPI, gallery: Any) -> None:
    """GET /v1/gallery and its PNGs (serve.gallery); 404 when none is configured."""

    def no_gallery() -> ApiError:
        return ApiError(404, "no gallery on this server: start it with serve.gallery=<a cifar-cam gradcam run dir>")

    @app.get("/v1/gallery", summary="The model's mistakes (serve.gallery), most confident first")
    async def gallery_list(request: Request) -> list[dict[str, Any]]:
        if gallery is None:
            raise no_gallery()
        root = request.scope.get("root_path", "").rstrip("/")
        return [{**e, "images": {layer: f"{root}/v1/gallery/{e['rank']}/{layer}.png" for layer in e["layers"]}}
                for e in gallery.entries]

    @app.get("/v1/gallery/{rank}/{layer}.png", summary="One mistake's Grad-CAM PNG at one layer",
             response_class=FileResponse)
    async def gallery_png(rank: str, layer: str) -> FileResponse:
        if gallery is None:
            raise no_gallery()
        file = gallery.files.get((rank, layer))  # a key looked up, never a path joined
        if file is None:
            known = sorted({name for _, name in gallery.files})
            raise ApiError(404, f"no gallery image for rank {rank[:20]!r} at layer {layer[:20]!r}; GET /v1/gallery "
                                f"lists them (layers: {', '.join(known)})")
        return FileResponse(file, media_type="image/png", headers={"Cache-Control": "max-age=3600"})


def _add_docs_and_page(app: FastAPI) -> None:
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
        self.n_classes, self.size = len(predictor.classes), predictor.image_size

    def check_query(self, topk: int | None, cam: bool, layer: str) -> tuple[int, str | None]:
        """(k, the CAM layer or None) of a request's query; ApiError 422 for one the model cannot answer."""
        predictor, n_classes = self.predictor, self.n_classes
        k = self.settings.topk if topk is None else topk
        if topk is not None and topk > n_classes:
            raise ApiError(422, f"topk={topk}: the model has {n_classes} classes; pass topk between 1 and "
                                f"{n_classes}")
        k = min(k, n_classes)
        if layer not in ALL_LAYERS:
            raise ApiError(422, f"layer={layer[:40]}: unknown layer; pass one of {', '.join(predictor.backend.layers)}")
        if cam and layer not in predictor.backend.layers:
            raise ApiError(422, f"layer={layer}: a {predictor.kind} model gives CAM at "
                                f"{', '.join(predictor.backend.layers)} only; serve the .pt checkpoint for others")
        return k, layer if cam else None

    async def image(self, data: bytes, name: str) -> np.ndarray:
        """An upload decoded to the model's input size (off the event loop); ApiError for a bad one."""
        return await asyncio.to_thread(load_image, data, name, self.size, self.settings.max_pixels)

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


def _single_upload(body: bytes, ctype: str) -> tuple[bytes, str]:
    """/v1/predict's image and how messages name it: a multipart field 'file', or the raw body."""
    if ctype.startswith("multipart/form-data"):
        parts = parse_multipart(body, ctype, max_parts=8)
        files = [p for p in parts if p.name == "file"]
        if not files:
            got = ", ".join(sorted({repr(p.name) for p in parts})) or "none"
            raise ApiError(422, f"multipart field 'file' is missing (fields sent: {got}); send the image as "
                                "-F file=@image.png, or as the raw body")
        if len(files) > 1:
            raise ApiError(422, f"{len(files)} 'file' fields: /v1/predict takes one image; "
                                "send several to /v1/predict/batch as 'files'")
        return files[0].data, f"upload '{files[0].filename or 'file'}'"
    if ctype.startswith("application/x-www-form-urlencoded"):
        raise ApiError(415, "a url-encoded form carries no file; send multipart/form-data (-F file=@image.png) "
                            "or the image bytes as the body")
    return body, "the request body"


def _batch_uploads(body: bytes, ctype: str, max_images: int) -> list[Part]:
    """/v1/predict/batch's multipart fields 'files' (at most `max_images`)."""
    parts = parse_multipart(body, ctype, max_parts=max_images + 8)
    files = [p for p in parts if p.name == "files"]
    if not files:
        got = ", ".join(sorted({repr(p.name) for p in parts})) or "none"
        raise ApiError(422, f"multipart field 'files' is missing (fields sent: {got}); "
                            "send -F files=@a.png -F files=@b.png")
    if len(files) > max_images:
        raise ApiError(413, f"{len(files)} files, over serve.max_batch_images={max_images}; "
                            "split them over several requests")
    return files


def _add_predict_routes(app: FastAPI, answers: Answers) -> None:
    """POST /v1/predict (one image: multipart or raw body) and /v1/predict/batch (multipart 'files')."""
    settings, predictor = answers.settings, answers.predictor
    topk_q = Query(None, ge=1, description=f"classes per image (default serve.topk={settings.topk})")
    cam_q = Query(False, description="add the Grad-CAM overlay of the top class (base64 PNG)")
    layer_q = Query("layer4", description=f"CAM layer: {', '.join(predictor.backend.layers)}")

    @app.post("/v1/predict", openapi_extra=IMAGE_BODY, summary="Top-k classes (and Grad-CAM) of one image")
    async def predict(request: Request, topk: int | None = topk_q, cam: bool = cam_q, layer: str = layer_q
                      ) -> dict[str, Any]:
        t0 = time.perf_counter()
        k, cam_layer = answers.check_query(topk, cam, layer)
        body = await read_body(request, settings.max_upload_bytes)
        data, name = _single_upload(body, request.headers.get("content-type", ""))
        out = await answers.answer(await answers.image(data, name), k, cam_layer)
        out["ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return out

    @app.post("/v1/predict/batch", openapi_extra=BATCH_BODY,
              summary=f"Top-k classes of up to {settings.max_batch_images} images (one result each)")
    async def predict_batch(request: Request, topk: int | None = topk_q, cam: bool = cam_q,
                            layer: str = layer_q) -> dict[str, Any]:
        t0 = time.perf_counter()
        k, cam_layer = answers.check_query(topk, cam, layer)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with the images as fields 'files' "
                                "(curl -F files=@a.png -F files=@b.png)")
        body = await read_body(request, settings.max_upload_bytes)
        files = _batch_uploads(body, ctype, settings.max_batch_images)

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


def create_app(predictor: Predictor, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving `predictor`: the batcher, the middleware, then the routes, step by step."""
    settings = settings or Settings()
    info = model_info(predictor, settings)
    batcher = Batcher(predictor, settings.max_batch, settings.max_wait_ms)
    size = predictor.image_size
    gallery = load_gallery(settings.gallery) if settings.gallery else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        batcher.start()
        await batcher.run(predictor.logits, np.zeros((1, size, size, 3), np.uint8))  # warm-up
        yield
        await batcher.stop()

    app = FastAPI(title="cifar-cam serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description=f"A {predictor.kind} CIFAR classifier ({len(predictor.classes)} classes, "
                              f"{size}x{size} px) with Grad-CAM. Every error is JSON {{\"detail\": message}}.")
    app.state.predictor, app.state.settings, app.state.batcher, app.state.info = predictor, settings, batcher, info
    app.state.gallery = gallery
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    _add_error_handlers(app)
    _add_gallery_routes(app, gallery)
    _add_docs_and_page(app)
    _add_predict_routes(app, Answers(predictor, settings, batcher, info["id"]))

    @app.get("/v1/model", summary="The model card: classes, input, accuracy, source checkpoint")
    async def model() -> dict[str, Any]:
        return info

    @app.get("/healthz", summary="Liveness (needs no API key)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": info["id"], "passes": batcher.passes, "images": batcher.images}

    return app


# -- running ---------------------------------------------------------------------------------------
def load_predictor(spec: dict[str, Any]) -> Predictor:
    """The Predictor a serve spec names ({"ckpt", "device", "precision", "threads", "batch_size", "settings"})."""
    from cifar_cam.predictor import Predictor

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


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port); OSError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **config: Any) -> Iterator[tuple[str, Any]]:
    """Serves `app` with uvicorn in a background thread (tests, benchmarks): yields (base URL, server)."""
    import uvicorn

    sock = bind(host, port)
    cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                         **config)
    server: uvicorn.Server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see the log)")
        time.sleep(0.01)
    try:
        yield url_of(sock), server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
