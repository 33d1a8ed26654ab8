"""How fast `cifar-cam serve` answers, against the Predictor in-process, in one run.

    python scripts/bench_serve.py [--widths 64,16] [--clients 1,16,64] [--requests 512]

Per model width (random weights: speed does not depend on them): the Predictor's in-process batch-1
rate, then the server on loopback driven by K concurrent httpx
clients for a bounded number of requests of one 32x32 PNG, with CAM off and on, and with
micro-batching on (serve.max_wait_ms 5) and off (0). Prints throughput, p50 / p95 / p99 latency and
errors. The server runs in a forked child process; the clients (this process) share its 2 cores, so
the served figures include their cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cifar_cam.inference.predictor import Predictor
from cifar_cam.models import build_model
from cifar_cam.provenance import cpu_model  # noqa: E402
from cifar_cam.serve.app import create_app
from cifar_cam.serve.server import running
from cifar_cam.serve.settings import Settings

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def in_process_rate(predictor: Predictor, image: np.ndarray, seconds: float = 3.0) -> float:
    """Batch-1 images per second of the Predictor itself (what one request needs, without HTTP)."""
    predictor.top(predictor.logits(image[None]), 3)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.top(predictor.logits(image[None]), 3)
        n += 1
    return n / (time.perf_counter() - start)


async def drive(url: str, png: bytes, clients: int, requests: int, cam: bool) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    todo = iter(range(requests))
    query = "?cam=true" if cam else ""

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in todo:
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/predict{query}", files={"file": ("x.png", png, "image/png")})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"rps": requests / wall, "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "errors": errors}


@contextlib.contextmanager
def served(predictor: Predictor, wait_ms: float) -> Iterator[str]:
    """The app over `predictor` in a forked child process (its own GIL, as `cifar-cam serve` runs), on loopback."""
    parent, child = multiprocessing.Pipe()
    stop = multiprocessing.Event()

    def serve() -> None:
        with running(create_app(predictor, Settings(max_wait_ms=wait_ms)), log_level="warning") as (url, _):
            child.send(url)
            stop.wait()

    process = multiprocessing.get_context("fork").Process(target=serve, daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the server did not start")
        yield parent.recv()
    finally:
        stop.set()
        process.join(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,16")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--requests", type=int, default=512)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.requests} requests per row; clients share the server's cores")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    print(f"{'width':>5} {'wait ms':>7} {'cam':>5} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8} {'errors':>6} {'vs in-process':>13}")
    for width in (int(w) for w in args.widths.split(",")):
        torch.manual_seed(0)
        predictor = Predictor.from_model(build_model("resnet18", num_classes=10, width=width), CLASSES, 32)
        base = in_process_rate(predictor, image)
        print(f"{width:>5} in-process Predictor, batch 1: {base:.1f} img/s", flush=True)
        for wait in (5.0, 0.0):
            with served(predictor, wait) as url:
                for cam in (False, True):
                    for clients in (int(c) for c in args.clients.split(",")):
                        r = asyncio.run(drive(url, png, clients, args.requests, cam))
                        print(f"{width:>5} {wait:>7g} {'on' if cam else 'off':>5} {clients:>7} {r['rps']:>8.1f} "
                              f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f} {r['errors']:>6} "
                              f"{r['rps'] / base:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
