"""The OpenAPI document says what the server does: each route's answers (the 200 body, and every error it can
give, all as {"detail": message}), the request bodies as the server reads them, the headers on every response
(X-Request-ID, X-Model-Id; Retry-After on a 503), and the API key when serve.api_key is set. A client generated
from it handles every answer; tests/test_serve_contract.py holds the server to it with schemathesis."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from cifar_cam.serve.settings import FORMATS


class ErrorBody(BaseModel):
    """Every error: what went wrong and what to do."""

    detail: str = Field(description="what went wrong and what to do")


class Prediction(BaseModel):
    classes: list[str] = Field(description="top-k classes, most probable first")
    probabilities: list[float]
    model: str = Field(description="the model's id (as in the X-Model-Id header)")
    ms: float = Field(description="milliseconds the server spent on the request")
    layer: str | None = Field(None, description="with cam=true: the CAM layer")
    overlay_png: str | None = Field(None, description="with cam=true: the Grad-CAM overlay, base64 PNG")
    input_png: str | None = Field(None, description="with cam=true: the image as the model saw it, base64 PNG")


class BatchItem(BaseModel):
    index: int
    name: str
    status: int = Field(description="200, or the status this image alone would have got")
    classes: list[str] | None = None
    probabilities: list[float] | None = None
    detail: str | None = Field(None, description="why this image has no answer")
    layer: str | None = None
    overlay_png: str | None = None
    input_png: str | None = None


class BatchAnswer(BaseModel):
    model: str
    results: list[BatchItem]
    ms: float


class Health(BaseModel):
    status: str
    model: str
    passes: int
    images: int


class Ready(BaseModel):
    status: str
    model: str


class Reloaded(BaseModel):
    model: str = Field(description="the id of the model serving now")
    previous: str
    source: str
    seconds: float
    changed: bool = Field(description="whether the file's content changed")


class Restarting(BaseModel):
    detail: str


WHY = {
    400: "a corrupt image, a malformed multipart body, or a body that ended early",
    401: "serve.api_key is set and the header X-API-Key is missing or wrong",
    403: "remote reload is off: serve.api_key is not set (SIGHUP reloads)",
    404: "nothing here (no such route, gallery or gallery image)",
    409: "the model file failed to load or its check: the old model keeps serving",
    413: "the body is over serve.max_upload_mb, the image over serve.max_pixels, or too many files",
    415: "not an image, or not multipart/form-data where it is needed",
    422: "a bad field or query parameter",
    503: "not ready (warming up or draining), or the queue is full (serve.max_queue): retry after Retry-After",
    504: "the request took longer than serve.timeout_s",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
EVERY_RESPONSE = {
    "X-Request-ID": {"description": "the request's id: the client's X-Request-ID, or one made for it",
                     "schema": {"type": "string"}},
    "X-Model-Id": {"description": "the id of the model that answered (GET /v1/model has its details)",
                   "schema": {"type": "string"}},
}
PREDICT_ERRORS = (400, 413, 415, 422, 503, 504)


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these error statuses, each {"detail": message}."""
    return {code: {"model": ErrorBody, "description": WHY[code], **({"headers": RETRY_AFTER} if code == 503 else {})}
            for code in codes}


def _binary(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary", "description": description}


IMAGE_BODY = {
    "requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": _binary(f"one image ({FORMATS})")}}},
        "application/octet-stream": {"schema": _binary(f"the image file's bytes ({FORMATS})")},
        "image/*": {"schema": _binary("the image file's bytes")},
    }, "required": True, "description": "one image: multipart field `file`, or the raw body"},
}


BATCH_BODY = {
    "requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "minItems": 1, "items": _binary("an image"),
                      "description": "images, at most serve.max_batch_images"}}}},
    }, "required": True},
}


def install(app: FastAPI, open_paths: frozenset[str] | None) -> None:
    """app.openapi() with the headers every response carries, and the API key scheme on every path but
    `open_paths` (None: no serve.api_key, no scheme)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if open_paths is not None:
            schema.setdefault("components", {})["securitySchemes"] = {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                if open_paths is not None and path not in open_paths:
                    op["security"] = [{"ApiKey": []}]
                    responses.setdefault("401", {"description": WHY[401], "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
                if "422" in responses:  # FastAPI's own 422 body is a list; ours, as every error, {"detail": message}
                    responses["422"] = {"description": WHY[422], "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                for response in responses.values():
                    response.setdefault("headers", {}).update(EVERY_RESPONSE)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
