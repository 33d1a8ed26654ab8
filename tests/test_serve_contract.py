"""The OpenAPI document is the contract: schemathesis (the schema-driven API fuzzer) runs every check it has
(as `--checks all`) against the served app on loopback, a bounded number of generated requests per operation, with
the API key (so `ignored_auth` tries every guarded route without it) and a gallery (so its 200s are reached)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from cifar_cam.inference.predictor import Predictor  # noqa: E402
from cifar_cam.serve.app import create_app  # noqa: E402
from cifar_cam.serve.server import running  # noqa: E402
from cifar_cam.serve.settings import Settings  # noqa: E402
from test_serve import make_gallery  # noqa: E402

# A valid body by the schema is not always an image the server can decode: random bytes as `file` are refused
# with 400 / 413 / 415 (documented), which positive_data_acceptance must accept; the rest of its defaults stay.
# Every check schemathesis has (what `--checks all` asks for; named in this file, not on the command line, where
# it would override the one exception below).
CONFIG = """
[checks]
enabled = true

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "415"]

# A multipart part has no type: a number where the schema wants binary arrives as bytes like any file, and the
# batch route answers it per file (200 with that file's 415), as the schema's BatchItem says.
[[operations]]
include-path = "/v1/predict/batch"
checks.negative_data_rejection.enabled = false
"""


def test_schemathesis_all_checks_pass(trained_run: Path, tmp_path: Path) -> None:
    gallery = make_gallery(tmp_path / "gallery" / "run")
    settings = Settings(api_key="k", gallery=str(gallery), max_wait_ms=0, max_batch_images=4, max_upload_mb=1,
                        max_pixels=1_000_000, timeout_s=10)
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    app = create_app(Predictor.load(trained_run), settings, load=lambda: Predictor.load(trained_run))
    with running(app, log_level="critical") as (url, _):
        r = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp_path / "schemathesis.toml"), "run",
             f"{url}/openapi.json", "--max-examples", "12", "--seed", "7", "--workers", "1",
             "-H", "X-API-Key: k", "--request-timeout", "20", "--no-color", "--report-dir", str(tmp_path / "report"),
             "--phases", "examples,coverage,fuzzing"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240)
        out = r.stdout + r.stderr
        print(out[-3000:])
        assert r.returncode == 0, out[-8000:]
        assert httpx.get(f"{url}/readyz").status_code == 200  # the fuzzing left it serving
