"""Reading uploads: the body in memory with a size cap (413 before it is read whole), multipart parsed without
touching the disk, an image decoded to the model's input size (refused from its header when it has too many
pixels), and the PNGs the answers carry."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect

from cifar_cam.data.decode import Fit, decode_rgb, header_size
from cifar_cam.errors import DataError
from cifar_cam.serve.settings import FORMATS, ApiError


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


def load_image(data: bytes, name: str, fit: Fit, max_pixels: int) -> np.ndarray:
    """Upload bytes -> uint8 RGB at the model's input as its card says (`fit`), or ApiError 422 (empty), 415 (not
    an image), 413 (too many
    pixels, from the header alone) or 400 (corrupt)."""
    if not data:
        raise ApiError(422, f"{name} is empty; send an image file ({FORMATS})")
    wh = header_size(data)
    if wh is None:
        raise ApiError(415, f"{name} is not an image file cifar-cam reads; send {FORMATS}")
    w, h = wh
    if w * h > max_pixels:
        raise ApiError(413, f"{name} is {w}x{h} ({w * h:,} pixels), over serve.max_pixels={max_pixels:,}; "
                            f"shrink it (the model sees {fit.height}x{fit.width}) or raise serve.max_pixels")
    try:
        return decode_rgb(data, name, fit, max_pixels=max_pixels)
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


def single_upload(body: bytes, ctype: str) -> tuple[bytes, str]:
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


def batch_uploads(body: bytes, ctype: str, max_images: int) -> list[Part]:
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
