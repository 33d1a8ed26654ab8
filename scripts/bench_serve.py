"""How fast `cifar-cam serve` answers, against the Predictor in-process, in one run.

    python scripts/bench_serve.py [--widths 64,16] [--clients 1,16,64] [--requests 512]
    python scripts/bench_serve.py --production [--width 64] [--timeout-s 1] [--max-queue 64]

Per model width (random weights: speed does not depend on them): the Predictor's in-process batch-1
rate, then the server on loopback driven by K concurrent httpx
clients for a bounded number of requests of one 32x32 PNG, with CAM off and on, and with
micro-batching on (serve.max_wait_ms 5) and off (0). Prints throughput, p50 / p95 / p99 latency and
errors. The server runs in a forked child process; the clients (this process) share its 2 cores, so
the served figures include their cost.

--production instead measures what running it like production costs and gives: req/s and p50 / p99 with
/metrics on against off (and on with the access log), the runs interleaved and repeated, medians kept; then a
4x overload (requests sent open-loop at four times the measured capacity) with serve.timeout_s and
serve.max_queue set: the p99 of the answered requests, and the share shed (503) or cut (504). These clients
are raw asyncio HTTP/1.1 (one connection a request), lighter than httpx, so the server is what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
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


SERVER_PID: dict[str, int] = {}  # url -> the server process (its CPU time: a figure other load does not move)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def served_with(predictor: Predictor, settings: Settings, threads: int | None = None) -> Iterator[str]:
    """The app over `predictor` in a forked child process (its own GIL, as `cifar-cam serve` runs), on loopback;
    `threads`: torch's threads there (None: as this process)."""
    parent, child = multiprocessing.Pipe()
    stop = multiprocessing.Event()

    def serve() -> None:
        if threads:
            torch.set_num_threads(threads)
        with running(create_app(predictor, settings), log_level="critical") as (url, _):
            child.send(url)
            stop.wait()

    process = multiprocessing.get_context("fork").Process(target=serve, daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the server did not start")
        url = parent.recv()
        SERVER_PID[url] = process.pid
        yield url
    finally:
        stop.set()
        process.join(20)


def served(predictor: Predictor, wait_ms: float) -> contextlib.AbstractContextManager[str]:
    """The app with serve.max_wait_ms = `wait_ms` (the table's rows)."""
    return served_with(predictor, Settings(max_wait_ms=wait_ms, access_log=None))


# -- --production: metrics overhead and overload ---------------------------------------------------
def raw_request(url: str, png: bytes) -> bytes:
    host = url.removeprefix("http://")
    return (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {len(png)}"
            f"\r\nConnection: close\r\n\r\n").encode() + png


async def raw_post(url: str, request: bytes) -> tuple[int, float]:
    """One request on its own connection: (status, seconds); status -1 for a transport error."""
    host, port = url.removeprefix("http://").split(":")
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        await (reader.readexactly(length) if length is not None else reader.read())
        writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return -1, time.perf_counter() - start
    return status, time.perf_counter() - start


async def closed_loop(url: str, request: bytes, clients: int, requests: int) -> dict[str, float]:
    """`clients` concurrent clients, `requests` in all: req/s, p50, p99 (ms), errors, and the server's CPU ms per
    request (when its pid is known)."""
    results: list[tuple[int, float]] = []
    todo = iter(range(requests))

    async def client() -> None:
        for _ in todo:
            results.append(await raw_post(url, request))

    pid = SERVER_PID.get(url)
    cpu0 = cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    cpu = (cpu_seconds(pid) - cpu0) if pid else float("nan")
    ms = np.asarray([t for _, t in results]) * 1000
    return {"rps": requests / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "errors": sum(s != 200 for s, _ in results), "cpu_ms": 1000 * cpu / requests}


async def open_loop(url: str, request: bytes, rate: float, seconds: float) -> list[tuple[int, float]]:
    """Requests sent at `rate` a second for `seconds`, each on schedule whatever the earlier ones wait for."""
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(raw_post(url, request)))
    return list(await asyncio.gather(*tasks))


def metric_calls_us(n: int = 20000) -> float:
    """Microseconds of the metric calls one answered /v1/predict makes (a forward pass of one image included):
    the overhead of serve.metrics measured alone, without the noise of a shared machine."""
    import timeit

    from cifar_cam.serve.metrics import Metrics

    m = Metrics(True)

    def one_request() -> None:
        m.child("requests", "/v1/predict", "POST", "200").inc()
        m.child("latency", "/v1/predict").observe(0.012)
        m.child("predictions", "cat").inc()
        m.confidence.observe(0.91)
        m.batch.observe(1)
        m.forward.observe(0.004)

    return timeit.timeit(one_request, number=n) / n * 1e6


def production(args: argparse.Namespace, png: bytes) -> None:
    torch.manual_seed(0)
    predictor = Predictor.from_model(build_model("resnet18", num_classes=10, width=args.width), CLASSES, 32)
    base = dict(max_wait_ms=5.0, access_log=None)
    print(f"\n## metrics on / off: width {args.width}, {args.clients_production} clients, {args.requests} requests "
          f"a burst; the three servers ({args.threads} torch thread each) up at once, driven in turn, "
          f"{args.repeats} rounds; medians")
    variants = {"metrics off": Settings(metrics=False, **base), "metrics on": Settings(metrics=True, **base),
                "metrics on + access log": Settings(metrics=True, max_wait_ms=5.0, access_log="/dev/null")}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(served_with(predictor, settings, args.threads))
                for name, settings in variants.items()}
        requests = {name: raw_request(url, png) for name, url in urls.items()}
        for name, url in urls.items():
            asyncio.run(closed_loop(url, requests[name], args.clients_production, 64))  # warm-up
        for _ in range(args.repeats):  # a burst each, in turn: a load from elsewhere hits all three alike
            for name, url in urls.items():
                runs[name].append(asyncio.run(closed_loop(url, requests[name], args.clients_production,
                                                          args.requests)))
    print(f"{'':<24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'server CPU ms/req':>18}")
    median = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}
    for name, m in median.items():
        print(f"{name:<24} {m['rps']:>8.1f} {m['p50']:>8.1f} {m['p99']:>8.1f} {m['errors']:>6.0f} {m['cpu_ms']:>18.2f}"
              f"  (bursts: {', '.join(str(round(r['rps'])) for r in runs[name])} req/s)")
    off = median["metrics off"]
    calls = metric_calls_us()
    share = 100 * calls / 1000 / off["cpu_ms"]
    print(f"the metric calls of one request, timed alone: {calls:.1f} us = {share:.2f}% of the {off['cpu_ms']:.2f} ms "
          "of server CPU a request takes with metrics off")
    for name in ("metrics on", "metrics on + access log"):
        ratios = [on["rps"] / o["rps"] for on, o in zip(runs[name], runs["metrics off"], strict=True)]
        print(f"{name}: throughput cost {100 * (1 - float(np.median(ratios))):+.1f}% req/s (median of the rounds' "
              f"ratios), server CPU per request {100 * (median[name]['cpu_ms'] / off['cpu_ms'] - 1):+.1f}% "
              "(<= 5% wanted)")

    capacity = median["metrics on"]["rps"]
    rate = 4 * capacity
    settings = Settings(max_wait_ms=5.0, access_log=None, timeout_s=args.timeout_s, max_queue=args.max_queue)
    print(f"\n## 4x overload: {rate:.0f} req/s offered open-loop for {args.seconds:g} s (capacity "
          f"{capacity:.0f} req/s), serve.timeout_s={args.timeout_s:g}, serve.max_queue={args.max_queue}")
    with served_with(predictor, settings, args.threads) as url:
        results = asyncio.run(open_loop(url, raw_request(url, png), rate, args.seconds))
    statuses = [s for s, _ in results]
    answered = np.asarray([t for s, t in results if s == 200] or [float("nan")]) * 1000
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"sent {len(results)}: {counts} (-1: no answer)")
    print(f"answered (200): {counts.get(200, 0)} ({100 * counts.get(200, 0) / len(results):.1f}%), p50 "
          f"{np.percentile(answered, 50):.0f} ms, p99 {np.percentile(answered, 99):.0f} ms "
          f"(timeout_s {args.timeout_s * 1000:.0f} ms); shed 503: {100 * counts.get(503, 0) / len(results):.1f}%, "
          f"cut 504: {100 * counts.get(504, 0) / len(results):.1f}%; slowest answer of any kind "
          f"{max(t for _, t in results) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,16")
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--production", action="store_true", help="metrics overhead and 4x overload instead")
    parser.add_argument("--width", type=int, default=64, help="--production: the model's width")
    parser.add_argument("--clients-production", type=int, default=32, help="--production: closed-loop clients")
    parser.add_argument("--repeats", type=int, default=7, help="--production: bursts per variant")
    parser.add_argument("--timeout-s", type=float, default=1.0, help="--production: serve.timeout_s under overload")
    parser.add_argument("--max-queue", type=int, default=64, help="--production: serve.max_queue under overload")
    parser.add_argument("--seconds", type=float, default=10.0, help="--production: seconds of overload")
    parser.add_argument("--threads", type=int, default=1, help="--production: torch threads of each server (1: no "
                        "OpenMP spinning against the clients on the same cores)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.requests} requests per row; clients share the server's cores")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    if args.production:
        production(args, png)
        return
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
