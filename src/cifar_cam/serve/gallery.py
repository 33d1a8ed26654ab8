"""The gallery: a `cifar-cam gradcam` run's most confident mistakes (serve.gallery), read once at start-up, and its
routes; a request only ever names a key of the files found then, never a path."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse

from cifar_cam.errors import ConfigError
from cifar_cam.serve.openapi import errors
from cifar_cam.serve.settings import ApiError


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


def add_gallery_routes(app: FastAPI, gallery: Any) -> None:
    """GET /v1/gallery and its PNGs (serve.gallery); 404 when none is configured."""

    def no_gallery() -> ApiError:
        return ApiError(404, "no gallery on this server: start it with serve.gallery=<a cifar-cam gradcam run dir>")

    @app.get("/v1/gallery", summary="The model's mistakes (serve.gallery), most confident first",
             responses=errors(404))
    async def gallery_list(request: Request) -> list[dict[str, Any]]:
        if gallery is None:
            raise no_gallery()
        root = request.scope.get("root_path", "").rstrip("/")
        return [{**e, "images": {layer: f"{root}/v1/gallery/{e['rank']}/{layer}.png" for layer in e["layers"]}}
                for e in gallery.entries]

    @app.get("/v1/gallery/{rank}/{layer}.png", summary="One mistake's Grad-CAM PNG at one layer",
             response_class=FileResponse, responses={200: {"content": {"image/png": {"schema": {
                 "type": "string", "format": "binary"}}}}, **errors(404)})
    async def gallery_png(rank: str, layer: str) -> FileResponse:
        if gallery is None:
            raise no_gallery()
        file = gallery.files.get((rank, layer))  # a key looked up, never a path joined
        if file is None:
            known = sorted({name for _, name in gallery.files})
            raise ApiError(404, f"no gallery image for rank {rank[:20]!r} at layer {layer[:20]!r}; GET /v1/gallery "
                                f"lists them (layers: {', '.join(known)})")
        return FileResponse(file, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
