"""`cifar-cam serve` run like production: /metrics (parsed with prometheus-client's own parser), /livez and
/readyz, back-pressure (512 clients against a deliberately slow model), request and model ids, the access log,
and reloading the model file with no failed request."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
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
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cifar_cam.inference.predictor import Predictor  # noqa: E402
from cifar_cam.serve.app import create_app  # noqa: E402
from cifar_cam.serve.server import running  # noqa: E402
from cifar_cam.serve.settings import Settings  # noqa: E402
from conftest import Served  # noqa: E402
from test_serve import detail, png  # noqa: E402

CLASSES = [f"class{i}" for i in range(10)]


class FakeBackend:
    """A model in name only: logits from the pixels' mean, each pass taking `delay` seconds after `gate` opens
    (the slow model of the overload test, the slow warm-up of the readiness test)."""

    layers = ("layer4",)

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate, self.passes = delay, gate, 0

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)
        self.passes += 1
        mean = images.reshape(len(images), -1).mean(1, dtype=np.float32) / 255
        logits = np.stack([mean * (c + 1) for c in range(len(CLASSES))], 1).astype(np.float32)
        return logits, np.zeros((len(images), 8, 4, 4), np.float32)


def fake_predictor(delay: float = 0.0, gate: threading.Event | None = None) -> Predictor:
    return Predictor(FakeBackend(delay, gate), CLASSES, 32, np.zeros((10, 8), np.float32), "fake", "fake",
                     card={"classes": CLASSES, "image_size": 32})


def samples(client: Any, url: str = "", **headers: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus-client: {(sample name, sorted labels): value}."""
    r = client.get(f"{url}/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def total(found: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def wait_ready(client: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.02)


# -- /metrics ----------------------------------------------------------------------------------------
def test_metrics_move_as_requests_are_made(served: Served) -> None:
    c = served.client
    before = samples(c)
    for seed in range(3):
        assert c.post("/v1/predict", content=png(seed=seed)).status_code == 200
    assert c.post("/v1/predict", content=b"not an image").status_code == 415
    after = samples(c)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("cifar_cam_requests_total", route="/v1/predict", method="POST", status="200") == 3
    assert moved("cifar_cam_requests_total", route="/v1/predict", status="415") == 1
    assert moved("cifar_cam_request_seconds_count", route="/v1/predict") == 4
    assert moved("cifar_cam_request_seconds_bucket", route="/v1/predict", le="+Inf") == 4
    assert moved("cifar_cam_predictions_total") == 3 and moved("cifar_cam_top1_confidence_count") == 3
    assert 1 <= moved("cifar_cam_batch_images_count") <= 3 and moved("cifar_cam_batch_images_sum") == 3
    assert moved("cifar_cam_forward_seconds_count") == moved("cifar_cam_batch_images_count")
    assert ("cifar_cam_queue_images", ()) in after and ("cifar_cam_requests_in_flight", ()) in after
    assert total(after, "cifar_cam_model_warmup_seconds") > 0
    assert ("cifar_cam_model_load_seconds", ()) in after
    model_id = c.get("/v1/model").json()["id"]
    assert total(after, "cifar_cam_model_info", model=model_id, kind="torch") == 1
    classes = {dict(ls)["class"] for (n, ls), _ in after.items() if n == "cifar_cam_predictions_total"}
    assert classes <= set(served.predictor.classes)


def test_metrics_key_and_metrics_off() -> None:
    for metrics_key, status in ((False, 200), (True, 401)):
        app = create_app(fake_predictor(), Settings(api_key="k", metrics_key=metrics_key, max_wait_ms=0))
        with running(app) as (url, _), httpx.Client(base_url=url) as c:
            assert c.get("/metrics").status_code == status
            assert c.get("/metrics", headers={"X-API-Key": "k"}).status_code == 200
            assert c.get("/livez").status_code == 200 and c.get("/v1/model").status_code == 401
    with running(create_app(fake_predictor(), Settings(metrics=False))) as (url, _), httpx.Client(base_url=url) as c:
        r = c.get("/metrics")
        assert r.status_code == 404 and "no such endpoint" in detail(r)
        wait_ready(c)
        assert c.post("/v1/predict", content=png()).status_code == 200


# -- /livez and /readyz ------------------------------------------------------------------------------
def test_readyz_is_503_until_warmed_up_and_while_draining() -> None:
    gate = threading.Event()
    app = create_app(fake_predictor(gate=gate), Settings(max_wait_ms=0))
    with running(app, wait_ready=False) as (url, _), httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/livez").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "warming up" in detail(r) and r.headers["retry-after"] == "1"
        r = c.post("/v1/predict", content=png())
        assert r.status_code == 503 and "warming up" in detail(r)
        gate.set()
        wait_ready(c)
        assert c.get("/readyz").json()["status"] == "ready"
        assert c.post("/v1/predict", content=png()).status_code == 200
        lifecycle = app.state.lifecycle
        lifecycle.drain_s = 0.5
        asyncio.run_coroutine_threadsafe(lifecycle.drain(), app.state.batcher._task.get_loop())
        time.sleep(0.1)
        r = c.get("/readyz")
        assert r.status_code == 503 and "draining" in detail(r)
        assert c.get("/livez").status_code == 200
        assert c.post("/v1/predict", content=png()).status_code == 200  # still answered while draining


# 512 clients on their own connections, in a process of their own: a client sharing the server's interpreter
# (and its GIL) would measure its own scheduling as much as the server's answers. Raw asyncio, not httpx: a
# client for 512 would cost more than the server it measures. Prints [[status, seconds, headers, body]]; -1: no
# answer; the clock starts before the connection is opened.
STORM = r"""
import asyncio, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = sys.stdin.buffer.read()

async def one():
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        answer = await reader.read()
        writer.close()
    except OSError as e:
        return [-1, time.monotonic() - t0, {}, repr(e)]
    head, _, content = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return [int(lines[0].split()[1]), time.monotonic() - t0, headers, content.decode()]

async def main():
    return await asyncio.gather(*(one() for _ in range(n)))

print(json.dumps(asyncio.run(main())))
"""


def storm(url: str, body: bytes, clients: int) -> list[tuple[int, float, Any]]:
    """`clients` simultaneous POSTs of `body` to /v1/predict: [(status, seconds, (headers, body))]."""
    host, port = url.removeprefix("http://").split(":")
    done = subprocess.run([sys.executable, "-c", STORM, host, port, str(clients)], input=body,
                          capture_output=True, timeout=120, check=True)
    return [(status, seconds, (headers, content.encode())) for status, seconds, headers, content
            in json.loads(done.stdout)]


# -- back-pressure -----------------------------------------------------------------------------------
def test_512_clients_against_a_slow_model_are_all_answered_in_time() -> None:
    """max_queue 32 images, passes of 8 taking 0.2 s, timeout 1 s: every request gets 200, 503 (with
    Retry-After) or 504 within timeout_s + 1 s; none is dropped; the server answers normally afterwards."""
    settings = Settings(max_batch=8, max_wait_ms=5, max_queue=32, timeout_s=1.0)
    app = create_app(fake_predictor(delay=0.2), settings)
    body = png(seed=1)

    with running(app) as (url, _), httpx.Client(base_url=url, timeout=10) as c:
        wait_ready(c)
        results = storm(url, body, 512)
        statuses = [s for s, _, _ in results]
        counts = {s: statuses.count(s) for s in set(statuses)}
        slowest = max(t for _, t, _ in results)
        print(f"512 clients: {counts}; slowest answer {slowest:.2f} s")
        assert set(counts) <= {200, 503, 504}, [r for s, _, r in results if s not in (200, 503, 504)][:3]
        # the queue was used (its images answered, or cut at timeout_s when a loaded machine runs the passes late)
        # and the rest shed; how many of the admitted beat the timeout depends on the machine, not on the server
        assert counts.get(200, 0) + counts.get(504, 0) >= settings.max_batch and counts.get(503, 0) > 0
        assert slowest <= settings.timeout_s + 1, slowest
        for status, _, (headers, content) in results:
            assert headers["x-request-id"] and headers["x-model-id"] == "in-memory"
            if status != 200:
                assert isinstance(json.loads(content)["detail"], str)
            if status == 503:
                assert int(headers["retry-after"]) >= 1 and "max_queue" in json.loads(content)["detail"]
            if status == 504:
                assert "timeout_s" in json.loads(content)["detail"]
        shed = samples(c)
        assert total(shed, "cifar_cam_shed_total", reason="queue_full") == counts[503]
        assert total(shed, "cifar_cam_shed_total", reason="timeout") == counts.get(504, 0)
        time.sleep(0.3)  # the last pass in progress ends
        r = c.post("/v1/predict", content=body)
        assert r.status_code == 200 and r.json()["classes"]
        assert total(samples(c), "cifar_cam_queue_images") == 0


# -- which model answered, which request ---------------------------------------------------------------
def test_request_id_and_model_id_on_every_response(served: Served) -> None:
    c = served.client
    model_id = c.get("/v1/model").json()["id"]
    r = c.post("/v1/predict", content=png(), headers={"X-Request-ID": "abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123" and r.headers["x-model-id"] == model_id
    for r in (c.get("/v1/nothing"), c.get("/v1/predict"), c.post("/v1/predict", params={"topk": 0}, content=png()),
              c.get("/livez"), c.get("/metrics"), c.get("/"), c.get("/openapi.json")):
        assert r.headers["x-model-id"] == model_id, r.url
        assert len(r.headers["x-request-id"]) == 32, r.headers["x-request-id"]  # made: a uuid4's hex
    assert c.get("/livez", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != "bad id"
    log = Path(served.settings.access_log)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [x for x in lines if x["request_id"] == "abc-123"]
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["route"] == "/v1/predict"
    assert mine[0]["model"] == model_id and mine[0]["method"] == "POST" and mine[0]["ms"] > 0
    assert {x["status"] for x in lines} >= {200, 404, 405, 422}


def test_reload_needs_the_api_key(served: Served) -> None:
    r = served.client.post("/v1/admin/reload")
    assert r.status_code == 403 and "serve.api_key" in detail(r)


# -- reload ----------------------------------------------------------------------------------------
def other_checkpoint(source: Path, target: Path) -> Path:
    """A copy of checkpoint `source` with other weights (another model id, the same architecture)."""
    import torch

    payload = torch.load(source, weights_only=True, map_location="cpu")
    torch.manual_seed(1)
    payload["model"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                        for k, v in payload["model"].items()}
    torch.save(payload, target)
    return target


@pytest.fixture
def model_files(trained_run: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    live = tmp_path / "serving" / "model.pt"
    live.parent.mkdir()
    shutil.copy(trained_run / "checkpoints" / "best.pt", live)
    yield live, other_checkpoint(live, tmp_path / "next.pt")


def test_reload_swaps_the_model_with_no_failed_request_and_refuses_a_corrupt_file(
        model_files: tuple[Path, Path]) -> None:
    live, new = model_files
    app = create_app(Predictor.load(live), Settings(api_key="k", max_wait_ms=2))
    key = {"X-API-Key": "k"}
    seen: list[list[tuple[int, str]]] = [[] for _ in range(4)]
    stop = threading.Event()

    def client(url: str, out: list[tuple[int, str]]) -> None:
        with httpx.Client(base_url=url, headers=key, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", content=png(seed=len(out)))
                out.append((r.status_code, r.headers.get("x-model-id", "")))

    with running(app) as (url, _), httpx.Client(base_url=url, headers=key, timeout=60) as c:
        wait_ready(c)
        old_id = c.get("/v1/model").json()["id"]
        threads = [threading.Thread(target=client, args=(url, out)) for out in seen]
        for t in threads:
            t.start()
        time.sleep(0.3)
        os.replace(new, live)
        r = c.post("/v1/admin/reload")
        assert r.status_code == 200, r.text
        new_id = r.json()["model"]
        assert new_id != old_id and r.json()["previous"] == old_id and r.json()["changed"]
        time.sleep(0.3)
        live.write_bytes(b"not a checkpoint" * 100)  # a torn or wrong file
        r = c.post("/v1/admin/reload")
        assert r.status_code == 409 and "keeps serving" in detail(r) and new_id in detail(r)
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(30)
        answers = [a for out in seen for a in out]
        assert answers and all(status == 200 for status, _ in answers), {s for s, _ in answers}
        for out in seen:  # each client: the old model's answers, then the new one's, never back
            ids = [model for _, model in out]
            assert set(ids) <= {old_id, new_id} and ids == sorted(ids, key=lambda m: m == new_id), ids
        assert any(m == new_id for m in (model for out in seen for _, model in out))
        assert c.get("/v1/model").json()["id"] == new_id
        r = c.post("/v1/predict", content=png())
        assert r.status_code == 200 and r.headers["x-model-id"] == new_id
        found = samples(c, **key)
        assert total(found, "cifar_cam_model_reloads_total", result="ok") == 1
        assert total(found, "cifar_cam_model_reloads_total", result="failed") == 1
        assert total(found, "cifar_cam_model_info", model=new_id) == 1
        assert total(found, "cifar_cam_model_info", model=old_id) == 0


@pytest.mark.parametrize(("key", "value"), [("serve.max_queue", "0"), ("serve.timeout_s", "0"),
                                            ("serve.metrics_key", "maybe"), ("serve.drain_s", "-1")])
def test_new_serve_keys_are_validated(key: str, value: str) -> None:
    from cifar_cam.config.validate import validate
    from cifar_cam.errors import ConfigError
    from conftest import compose_cfg

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg("serve", ["ckpt=x", f"{key}={value}"]), "serve")


def test_two_workers_report_their_metrics_together(trained_run: Path, tmp_path: Path) -> None:
    """serve.workers=2: /metrics, whichever worker answers it, adds up both (prometheus-client's multiprocess
    directory in the run dir); SIGTERM stops both and exits 0."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CIFAR_CAM_CACHE": str(tmp_path / ".cache")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "cifar_cam", "serve", f"ckpt={trained_run}", "serve.workers=2",
                             f"serve.port={port}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                found = samples(httpx, url)  # a new connection each time: any worker may answer
                if len({dict(ls).get("pid") for (n, ls), _ in found.items()
                        if n == "cifar_cam_model_load_seconds"}) == 2:
                    break
            except (httpx.TransportError, AssertionError):
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the two workers did not start"
            time.sleep(0.2)
        for seed in range(12):
            assert httpx.post(f"{url}/v1/predict", content=png(seed=seed)).status_code == 200
        for _ in range(3):  # whichever worker answers the scrape, it counts both workers' requests
            found = samples(httpx, url)
            assert total(found, "cifar_cam_requests_total", route="/v1/predict", status="200") == 12
            assert total(found, "cifar_cam_predictions_total") == 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert "metrics of the 2 workers" in out, out
