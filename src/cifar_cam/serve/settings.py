"""What `serve.*` sets for the app, and the error every route answers with: a status and a message a person can act
on, sent as JSON {"detail": message}."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

FORMATS = "PNG, JPEG, BMP, GIF, TIFF, WebP, PPM"


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
    max_queue: int = 256             # images waiting for a forward pass at most; more: 503 with Retry-After
    timeout_s: float = 30.0          # seconds one request may take in all; then 504
    metrics: bool = True             # GET /metrics and the counting behind it
    metrics_key: bool = False        # whether serve.api_key also guards /metrics
    access_log: str | None = None    # a JSON-lines file, one line a request ("-": standard output); None: off
    drain_s: float = 0.0             # after SIGTERM: seconds /readyz answers 503 before the server stops listening

    @classmethod
    def from_cfg(cls, serve: Any) -> Settings:
        """From the `serve` config node (or any mapping); unknown keys (host, port, workers) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: serve[k] for k in serve if k in names})

    @property
    def max_upload_bytes(self) -> int:
        return int(float(self.max_upload_mb) * 1024 * 1024)


class ApiError(Exception):
    """An HTTP error with a message a person can act on (becomes {"detail": message}); `headers` go with it
    (Retry-After on a 503)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers
