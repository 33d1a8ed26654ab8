"""`cifar-cam serve`: every endpoint, limit and error case, against ONE real uvicorn server on loopback
(a session fixture over the tiny trained run), plus the real command under SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cifar_cam.inference.predictor import Predictor
from cifar_cam.serve.app import create_app
from cifar_cam.serve.server import running
from cifar_cam.serve.settings import Settings
from conftest import MAX_BATCH_IMAGES, MAX_UPLOAD_MB, Served, only_run_dir  # noqa: E402  (the shared server)


def png(size: tuple[int, int] = (32, 32), seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header claiming width x height (400 M pixels), with no pixel data worth decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def detail(r: Any) -> str:
    body = r.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], body
    return body["detail"]


# -- endpoints -------------------------------------------------------------------------------------
def test_healthz_and_model_card(served: Served) -> None:
    h = served.client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = served.client.get("/v1/model").json()
    assert m["classes"] == served.predictor.classes and m["num_classes"] == 10
    assert m["image_size"] == 32 and m["kind"] == "torch" and m["id"].startswith("sha256:")
    assert m["source"].endswith("best.pt") and m["cam_layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert m["input"]["max_upload_mb"] == MAX_UPLOAD_MB and isinstance(m["test_accuracy"], float)
    assert h.json()["model"] == m["id"]


def test_predict_multipart_and_raw_agree_with_predictor(served: Served) -> None:
    data = png(seed=3)
    expected = served.predictor([np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(data)))],
                                topk=5)[0]
    a = served.client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}, params={"topk": 5})
    b = served.client.post("/v1/predict?topk=5", content=data, headers={"content-type": "application/octet-stream"})
    for r in (a, b):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["classes"] == expected.classes
        assert np.allclose(body["probabilities"], expected.probabilities, atol=1e-5)
        assert body["model"] == served.client.get("/v1/model").json()["id"] and body["ms"] > 0
        assert "overlay_png" not in body
    default = served.client.post("/v1/predict", content=data).json()
    assert len(default["classes"]) == served.settings.topk


@pytest.mark.parametrize("layer", ["layer4", "layer2"])
def test_predict_cam_overlay(served: Served, layer: str) -> None:
    r = served.client.post("/v1/predict", params={"cam": "true", "layer": layer}, content=png(seed=1))
    assert r.status_code == 200, r.text
    body = r.json()
    from PIL import Image

    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (128, 128) and body["layer"] == layer
    assert Image.open(io.BytesIO(base64.b64decode(body["input_png"]))).size == (32, 32)


def test_batch_one_result_each_with_per_file_errors(served: Served) -> None:
    files = [("files", ("a.png", png(seed=1), "image/png")), ("files", ("junk.txt", b"hello", "text/plain")),
             ("files", ("b.png", png((64, 48), seed=2), "image/png")), ("files", ("bomb.png", bomb_png(), "image/png")),
             ("files", ("cut.png", png(seed=4)[:60], "image/png"))]
    r = served.client.post("/v1/predict/batch", files=files, params={"topk": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == ["a.png", "junk.txt", "b.png", "bomb.png", "cut.png"]
    assert [x["status"] for x in results] == [200, 415, 200, 413, 400]
    single = served.client.post("/v1/predict", content=png(seed=1), params={"topk": 2}).json()
    assert results[0]["classes"] == single["classes"] and len(results[2]["classes"]) == 2
    assert all(isinstance(x["detail"], str) for x in results if x["status"] != 200)
    over = [("files", (f"{i}.png", png(seed=i), "image/png")) for i in range(MAX_BATCH_IMAGES + 1)]
    r = served.client.post("/v1/predict/batch", files=over)
    assert r.status_code == 413 and "max_batch_images" in detail(r)
    r = served.client.post("/v1/predict/batch", files={"file": ("a.png", png(), "image/png")})
    assert r.status_code == 422 and "'files'" in detail(r)
    assert served.client.post("/v1/predict/batch", content=png()).status_code == 415


def test_malformed_multipart_is_400(served: Served) -> None:
    for ctype in ("multipart/form-data", "multipart/form-data; boundary=x"):
        r = served.client.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": ctype})
        assert r.status_code == 400 and "multipart" in detail(r)


def test_docs_offline_and_page(served: Served) -> None:
    r = served.client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    own = served.url
    outside = [u for u in re.findall(r"https?://[^\s\"'<>)]+", r.text) if not u.startswith(own)]
    assert outside == [], outside
    for asset in re.findall(r"(?:src|href)=\"([^\"]+)\"", r.text):
        assert served.client.get(asset).status_code == 200, asset
    spec = served.client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(spec["paths"])
    page = served.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# -- limits and errors -----------------------------------------------------------------------------
def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, str]:
    """Sends raw HTTP on a socket (headers we choose, a body that may lie about its length); the response."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def _length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n")[0], re.I)
    return int(m.group(1)) if m else 0


def test_content_length_over_limit_refused_before_the_body(served: Served) -> None:
    big = MAX_UPLOAD_MB * 1024 * 1024 * 50
    t0 = time.perf_counter()
    status, text = raw_request(served.url, f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n"
                                           "Content-Type: image/png\r\n", b"\x89PNG")  # 4 bytes of 50 MB
    assert status == 413 and "max_upload_mb" in text and time.perf_counter() - t0 < 5


def test_streamed_body_over_limit(served: Served) -> None:
    limit = MAX_UPLOAD_MB * 1024 * 1024

    def chunks() -> Iterator[bytes]:
        for _ in range(limit // 65536 + 4):
            yield b"\0" * 65536

    try:
        r = served.client.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
    except httpx.TransportError:  # the server may close before the client finished sending
        status, text = raw_request(
            served.url, "POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n",
            b"".join(b"10000\r\n" + b"\0" * 65536 + b"\r\n" for _ in range(limit // 65536 + 2)) + b"0\r\n\r\n")
        assert status == 413 and "max_upload_mb" in text
    else:
        assert r.status_code == 413 and "max_upload_mb" in detail(r)
    assert served.client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("body", "status", "words"), [
    (b"this is not an image at all", 415, "not an image"),
    (png()[:50], 400, "corrupt"),
    (b"", 422, "empty"),
    (bomb_png(), 413, "max_pixels"),
], ids=["not-an-image", "truncated", "empty", "bomb"])
def test_bad_images(served: Served, body: bytes, status: int, words: str) -> None:
    before = len(served.calls)
    for r in (served.client.post("/v1/predict", content=body),
              served.client.post("/v1/predict", files={"file": ("u.png", body, "image/png")})):
        assert r.status_code == status, r.text
        assert words in detail(r)
    assert len(served.calls) == before  # never reached the model


@pytest.mark.parametrize(("params", "files", "words"), [
    ({"topk": 0}, None, "topk"),
    ({"topk": 11}, None, "10 classes"),
    ({"topk": "many"}, None, "topk"),
    ({"layer": "layer9", "cam": "true"}, None, "unknown layer"),
    ({"layer": "../../etc/passwd"}, None, "unknown layer"),
    ({"cam": "perhaps"}, None, "cam"),
    ({}, {"image": ("a.png", b"x", "image/png")}, "'file' is missing"),
], ids=["topk-0", "topk-over-classes", "topk-text", "unknown-layer", "path-as-layer", "cam-not-bool",
        "missing-field"])
def test_bad_fields_and_queries_are_422(served: Served, params: dict, files: Any, words: str) -> None:
    if files is None:
        r = served.client.post("/v1/predict", params=params, content=png())
    else:
        r = served.client.post("/v1/predict", params=params, files=files)
    assert r.status_code == 422, r.text
    assert words in detail(r)


def test_cam_on_a_layer_the_model_lacks(served: Served, trained_run: Path, tmp_path: Path) -> None:
    """An ONNX-like backend (CAM at layer4 only): layer2 is refused with 422, layer4 works."""
    predictor = Predictor.load(trained_run)
    predictor.backend.layers, predictor.kind = ("layer4",), "onnx"  # what an .onnx / .pt2 model offers
    with running(create_app(predictor, Settings(max_wait_ms=0))) as (url, _), httpx.Client(base_url=url) as c:
        r = c.post("/v1/predict", params={"cam": "true", "layer": "layer2"}, content=png())
        assert r.status_code == 422 and "layer4 only" in detail(r)
        assert c.post("/v1/predict", params={"cam": "true"}, content=png()).status_code == 200


def test_not_found_and_wrong_method_are_json(served: Served) -> None:
    assert served.client.get("/v1/nothing").status_code == 404 and detail(served.client.get("/v1/nothing"))
    r = served.client.get("/v1/predict")
    assert r.status_code == 405 and detail(r)


def test_api_key(trained_run: Path) -> None:
    """With serve.api_key every /v1/* request needs X-API-Key; the page, its assets, /docs, /openapi.json and
    /healthz do not (they hold no secret, and the page must load to ask for the key)."""
    predictor = Predictor.load(trained_run)
    with running(create_app(predictor, Settings(api_key="s3cret", max_wait_ms=0))) as (url, _), \
            httpx.Client(base_url=url) as c:
        for path in ("/healthz", "/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json",
                     "/static/swagger/swagger-ui-bundle.js"):
            assert c.get(path).status_code == 200, path
        assert 'id="api-key"' in c.get("/").text
        for path in ("/v1/model", "/v1/gallery", "/v1/gallery/0/layer4.png", "/v1/nothing", "/elsewhere",
                     "/static/../v1/model"):
            r = c.get(path)
            assert r.status_code == 401 and "X-API-Key" in detail(r), path
        for path in ("/v1/predict", "/v1/predict/batch"):
            r = c.post(path, content=png())
            assert r.status_code == 401 and "missing" in detail(r), path
        r = c.post("/v1/predict", content=png(), headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "wrong" in detail(r)
        r = c.post("/v1/predict", content=png(), headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200 and r.json()["classes"]
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = c.get("/v1/gallery", headers={"X-API-Key": "s3cret"})  # past the key: no gallery configured
        assert r.status_code == 404 and "serve.gallery" in detail(r)


# -- the gallery (serve.gallery) -------------------------------------------------------------------
def make_gallery(root: Path) -> Path:
    """A gradcam run dir as `cifar-cam gradcam` writes it: gradcam.json and gradcam/NNN_<layer>.png (the
    entries out of confidence order; one names a file outside the dir, one a file that is missing)."""
    (root / "gradcam").mkdir(parents=True)
    (root.parent / "secret.png").write_bytes(png(seed=99))
    confidences = [0.61, 0.93, 0.75]
    images = []
    for rank, conf in enumerate(confidences):
        files = {}
        for layer in ("layer3", "layer4"):
            rel = f"gradcam/{rank:03d}_{layer}.png"
            (root / rel).write_bytes(png((40, 30), seed=10 * rank + int(layer[-1])))
            files[layer] = rel
        images.append({"rank": rank, "test_row": 100 + rank, "true": "cat", "true_label": 3, "pred": f"dog{rank}",
                       "pred_label": 5, "confidence": conf, "explained": f"dog{rank}", "files": files})
    images.append({"rank": 3, "test_row": 7, "true": "cat", "true_label": 3, "pred": "car", "pred_label": 1,
                   "confidence": 0.99, "explained": "car", "files": {"layer4": "../secret.png",
                                                                      "layer3": "gradcam/missing.png"}})
    (root / "gradcam.json").write_text(json.dumps({"method": "gradcam", "images": images}))
    return root


@pytest.fixture(scope="module")
def gallery_served(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    root = make_gallery(tmp_path_factory.mktemp("gallery") / "run")
    app = create_app(Predictor.load(trained_run), Settings(gallery=str(root), max_wait_ms=0))
    with running(app) as (url, _), httpx.Client(base_url=url, timeout=30) as c:
        yield c, root


def test_gallery_lists_the_mistakes_most_confident_first(gallery_served: tuple[Any, Path]) -> None:
    c, root = gallery_served
    r = c.get("/v1/gallery")
    assert r.status_code == 200, r.text
    items = r.json()
    assert [m["rank"] for m in items] == [1, 2, 0]  # rank 3's files are outside the dir or missing: left out
    assert [m["confidence"] for m in items] == [0.93, 0.75, 0.61]
    first = items[0]
    assert (first["true"], first["pred"], first["test_row"], first["explained"]) == ("cat", "dog1", 101, "dog1")
    assert first["images"] == {"layer3": "/v1/gallery/1/layer3.png", "layer4": "/v1/gallery/1/layer4.png"}
    for m in items:
        for layer, url in m["images"].items():
            got = c.get(url)
            assert got.status_code == 200 and got.headers["content-type"] == "image/png"
            assert got.content == (root / f"gradcam/{m['rank']:03d}_{layer}.png").read_bytes()


@pytest.mark.parametrize("path", [
    "/v1/gallery/9/layer4.png", "/v1/gallery/1/layer9.png", "/v1/gallery/3/layer4.png", "/v1/gallery/3/layer3.png",
    "/v1/gallery/..%2f..%2fetc/passwd.png", "/v1/gallery/%2e%2e/layer4.png", "/v1/gallery/..%2fx/layer4.png",
    "/v1/gallery/1/..%2f..%2f..%2fsecret.png", "/v1/gallery/1/%2e%2e%2fgradcam.json.png",
    "/v1/gallery/1/%2Fetc%2Fpasswd.png", "/v1/gallery/01/layer4.png",
], ids=["rank", "layer", "outside", "missing", "traversal", "dotdot-rank", "dotdot-x", "dotdot-layer",
        "json", "absolute", "leading-zero"])
def test_gallery_unknown_or_traversal_is_404(gallery_served: tuple[Any, Path], path: str) -> None:
    c, _ = gallery_served
    # raw HTTP: the client must not resolve the dots or re-encode the path before the server sees it
    status, text = raw_request(c.base_url.__str__().rstrip("/"), f"GET {path} HTTP/1.1\r\nHost: x\r\n")
    assert status == 404, (path, text)
    body = json.loads(text)
    assert isinstance(body["detail"], str) and "root:" not in text and "PNG" not in text


def test_no_gallery_is_404_json(served: Served) -> None:
    for path in ("/v1/gallery", "/v1/gallery/0/layer4.png"):
        r = served.client.get(path)
        assert r.status_code == 404 and "serve.gallery" in detail(r), path


@pytest.mark.parametrize("what", ["missing-dir", "no-json", "bad-json", "no-images"])
def test_gallery_dir_is_checked_at_start(trained_run: Path, tmp_path: Path, what: str) -> None:
    from cifar_cam.errors import ConfigError

    root = tmp_path / "run"
    if what != "missing-dir":
        root.mkdir()
    if what == "bad-json":
        (root / "gradcam.json").write_text("{not json")
    if what == "no-images":
        (root / "gradcam.json").write_text(json.dumps({"method": "gradcam"}))
    with pytest.raises(ConfigError, match=r"serve\.gallery=.*gradcam") as e:
        create_app(Predictor.load(trained_run), Settings(gallery=str(root)))
    assert "\n" not in str(e.value)


def test_serve_command_bad_gallery_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    r = run_cli("serve", f"ckpt={trained_run}", "serve.port=0", f"serve.gallery={tmp_path}", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "gradcam.json" in lines[0] and "Traceback" not in r.stderr, r.stderr


# -- batching --------------------------------------------------------------------------------------
def test_concurrent_requests_share_forward_passes(served: Served) -> None:
    images = [png(seed=100 + i) for i in range(16)]
    one_by_one = [served.client.post("/v1/predict", content=im, params={"topk": 10}).json() for im in images]

    async def together() -> list[dict]:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as c:
            rs = await asyncio.gather(*(c.post("/v1/predict", content=im, params={"topk": 10}) for im in images))
        return [r.json() for r in rs]

    before = len(served.calls)
    gathered = asyncio.run(together())
    passes = len(served.calls) - before
    assert passes < len(images), served.calls[before:]
    for a, b in zip(one_by_one, gathered, strict=True):
        assert a["classes"] == b["classes"]
        assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-5)


# -- robustness ------------------------------------------------------------------------------------
def settled_rss_mb() -> float:
    """VmRSS after glibc hands its free heap back (malloc_trim): live memory, not the allocator's caches.
    The client threads run in this process too; their bodies are allocated once, outside the loop."""
    import ctypes

    with_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if with_trim is not None:
        with_trim(0)
    return rss_mb()


def test_1000_bad_requests_then_a_good_one(served: Served) -> None:
    good = png(seed=7)
    expected = served.client.post("/v1/predict", content=good).json()
    noise, cut, bomb = b"not an image " * 50, good[:80], bomb_png()
    big = b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1)
    too_many = [("files", ("a", b"zz", "image/png"))] * (MAX_BATCH_IMAGES + 1)
    kinds: list[Any] = [
        lambda c: c.post("/v1/predict", content=noise),                                     # 415
        lambda c: c.post("/v1/predict", content=cut),                                       # 400
        lambda c: c.post("/v1/predict", content=bomb),                                      # 413 pixels
        lambda c: c.post("/v1/predict", params={"topk": 0}, content=good),                  # 422
        lambda c: c.post("/v1/predict", params={"layer": "nope", "cam": "1"}, content=good),  # 422
        lambda c: c.post("/v1/predict", files={"other": ("a", good, "image/png")}),         # 422
        lambda c: c.post("/v1/predict", content=b""),                                       # 422
        lambda c: c.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
        lambda c: c.post("/v1/predict/batch", files=too_many),                              # 413 count
        lambda c: c.post("/v1/predict", content=big),                                       # 413 size
        lambda c: c.post("/v1/predict", params={"cam": "true", "layer": "layer5"}, files={"file": ("a", good)}),
        lambda c: c.post("/v1/predict", content=good, headers={"content-type": "application/x-www-form-urlencoded"}),
    ]

    def mix(n: int) -> dict[int, int]:
        statuses: dict[int, int] = {}
        lock = threading.Lock()

        def worker(offset: int) -> None:
            with httpx.Client(base_url=served.url, timeout=30) as c:
                for i in range(offset, n, 8):
                    try:
                        r = kinds[i % len(kinds)](c)
                        code = r.status_code
                        assert code >= 400 and detail(r)
                    except httpx.TransportError:
                        code = -1
                    with lock:
                        statuses[code] = statuses.get(code, 0) + 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return statuses

    mix(240)  # warm-up: every kind, every thread pool at its size
    base = settled_rss_mb()
    statuses = mix(1000)
    assert sum(statuses.values()) == 1000
    assert set(statuses) <= {400, 413, 415, 422, -1} and statuses.get(-1, 0) <= 10, statuses
    assert {400, 413, 415, 422} <= set(statuses), statuses
    r = served.client.post("/v1/predict", content=good)
    assert r.status_code == 200 and r.json()["classes"] == expected["classes"]
    after = settled_rss_mb()
    print(f"1000 bad requests: {statuses}; RSS {base:.0f} MB after warm-up, {after:.0f} MB after")
    assert after - base < 50, (base, after)


def test_factory_reads_the_spec_from_the_environment(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each process of serve.workers > 1 runs (uvicorn --factory cifar_cam.serve.app:factory)."""
    from cifar_cam.serve.app import ENV, factory, spec_json

    monkeypatch.setenv(ENV, spec_json(str(trained_run), "cpu", "fp32", 1, Settings(topk=2, api_key="k")))
    with running(factory()) as (url, _), httpx.Client(base_url=url, headers={"X-API-Key": "k"}) as c:
        assert c.get("/v1/model").json()["topk_default"] == 2
        assert len(c.post("/v1/predict", content=png()).json()["classes"]) == 2


# -- the real command ------------------------------------------------------------------------------
def test_serve_command_reloads_on_sighup_and_drains_on_sigterm(trained_run: Path, tmp_path: Path) -> None:
    """The real process: ready after warm-up; SIGHUP loads the ckpt= file again (a new model id in the header);
    on SIGTERM /readyz turns 503 while a request in flight (half its body sent) is still answered, then exit 0."""
    from test_serve_ops import other_checkpoint

    live = tmp_path / "model.pt"
    shutil.copy(trained_run / "checkpoints" / "best.pt", live)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CIFAR_CAM_CACHE": str(tmp_path / ".cache")}
    proc = subprocess.Popen([sys.executable, "-m", "cifar_cam", "serve", f"ckpt={live}", "serve.port=0"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: dict[str, str] = {}
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving at (http://\S+)", line)
            if m:
                found["url"] = m.group(1)
                ready.set()

    def until(check: Any, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if check():
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(60), "".join(lines)
        url = found["url"]
        until(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200)
        first = httpx.post(url + "/v1/predict", content=png())
        assert first.status_code == 200
        other_checkpoint(live, tmp_path / "next.pt").replace(live)
        proc.send_signal(signal.SIGHUP)
        until(lambda: httpx.post(url + "/v1/predict", content=png()).headers["x-model-id"]
              != first.headers["x-model-id"])
        # a request in flight when SIGTERM comes (half its body sent) is still answered
        host, port = url.removeprefix("http://").split(":")
        body = png(seed=5)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                      + body[:100])
            time.sleep(0.3)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            r = httpx.get(url + "/readyz", timeout=5)  # draining: still listening, no longer ready
            assert r.status_code == 503 and "draining" in r.json()["detail"], r.text
            s.sendall(body[100:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        code = proc.wait(10)
        assert code == 0, "".join(lines)
        assert time.monotonic() - t0 < 10
        assert any("stopping (SIGTERM)" in line for line in lines), "".join(lines)
        assert any("reload (SIGHUP): now serving" in line for line in lines), "".join(lines)
        access = [json.loads(x) for x in (only_run_dir(tmp_path / "outputs" / "serve") / "access.jsonl")
                  .read_text().splitlines()]
        assert {x["route"] for x in access} >= {"/readyz", "/v1/predict"}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
