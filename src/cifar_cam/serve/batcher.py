"""Micro-batching: concurrent requests gathered into one forward pass (up to `max_batch` images, the first waiting
at most `max_wait_ms`; 0 turns gathering off). Passes run one at a time in a worker thread, so the event loop only
moves bytes. At most `max_queue` images wait, queued or being decoded: beyond that `admit` refuses (503 with
Retry-After) instead of letting the wait grow without bound. Each image carries the model it was admitted with, and
a pass holds one model's images only, so a reload never moves a request to another model halfway."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_cam.serve.metrics import Metrics
from cifar_cam.serve.settings import ApiError

if TYPE_CHECKING:
    from cifar_cam.serve.model_slot import Loaded


@dataclass
class _Item:
    model: Loaded
    pixels: np.ndarray            # uint8 (S, S, 3)
    layer: str | None             # CAM layer, or None
    future: asyncio.Future


class Batcher:
    """Gathers concurrent requests into one forward pass: up to `max_batch` images, the first waiting at
    most `max_wait_ms` for others (0: one image a pass). Passes run one at a time in a worker thread."""

    def __init__(self, max_batch: int, max_wait_ms: float, max_queue: int = 256,
                 metrics: Metrics | None = None) -> None:
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000
        self.max_queue = max(1, int(max_queue))
        self.metrics = metrics or Metrics(enabled=False)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.pending: collections.deque[_Item] = collections.deque()
        self.reserved = 0  # images admitted and still being decoded (reserve)
        self.passes = 0    # forward passes run
        self.images = 0    # images they held
        self.pass_seconds = 0.05  # a running mean, for Retry-After
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
                item.future.set_exception(ApiError(503, "the server is shutting down; retry on another instance",
                                                   {"Retry-After": "1"}))
        self.metrics.queue.set(0)
        self.executor.shutdown(wait=True)

    async def run(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` in the forward thread (one at a time with the passes)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def retry_after(self) -> str:
        """Seconds until the queue has likely room again (Retry-After), at least 1."""
        passes = math.ceil(len(self.pending) / self.max_batch)
        return str(max(1, math.ceil(passes * self.pass_seconds)))

    def admit(self, n: int) -> None:
        """Room for `n` more images, or ApiError 503 with Retry-After (the queue is full: shed, do not wait)."""
        if self._wake is None:
            raise ApiError(503, "the server is starting or stopping; retry in a moment", {"Retry-After": "1"})
        waiting = len(self.pending) + self.reserved
        if waiting + n > self.max_queue:
            self.metrics.shed.labels("queue_full").inc()
            raise ApiError(503, f"the server is busy: {waiting} images wait already (serve.max_queue="
                                f"{self.max_queue}); retry after Retry-After seconds",
                           {"Retry-After": self.retry_after()})

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[None]:
        """Room for `n` images held while they are decoded (ApiError 503 when there is none): a full queue sheds a
        request before its upload costs a decode. Enqueue them inside the block."""
        self.admit(n)
        self.reserved += n
        try:
            yield
        finally:
            self.reserved -= n

    def enqueue(self, model: Loaded, pixels: np.ndarray, layer: str | None = None) -> asyncio.Future:
        """Queues one admitted image; the future gives its (logits, CAM map or None)."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(model, pixels, layer, future))
        if self.metrics.live_gauges:
            self.metrics.queue.set(len(self.pending))
        assert self._wake is not None
        self._wake.set()
        return future

    def _take(self) -> list[_Item]:
        """The next pass: up to max_batch waiting images of the first one's model, clients that left dropped."""
        n = self.max_batch if self.max_wait > 0 else 1
        model = self.pending[0].model
        batch = []
        while self.pending and len(batch) < n and self.pending[0].model is model:
            batch.append(self.pending.popleft())
        if self.metrics.live_gauges:
            self.metrics.queue.set(len(self.pending))
        return [b for b in batch if not b.future.done()]  # the client left, or its time ran out

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
            batch = self._take()
            if not batch:
                continue
            pixels = np.stack([b.pixels for b in batch])
            layers = [b.layer for b in batch]
            t0 = time.perf_counter()
            try:
                logits, maps = await loop.run_in_executor(self.executor, _forward, batch[0].model, pixels, layers)
            except Exception as e:  # noqa: BLE001  (each request answers with it)
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            self.pass_seconds = 0.8 * self.pass_seconds + 0.2 * seconds
            self.metrics.forward.observe(seconds)
            self.metrics.batch.observe(len(batch))
            self.passes += 1
            self.images += len(batch)
            for i, b in enumerate(batch):
                if not b.future.done():
                    b.future.set_result((logits[i], maps.get(i)))


def _forward(model: Loaded, pixels: np.ndarray, layers: list[str | None]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    predictor = model.predictor
    logits = predictor.logits(pixels)
    maps: dict[int, np.ndarray] = {}
    for layer in sorted({x for x in layers if x}):
        idx = [i for i, x in enumerate(layers) if x == layer]
        cams = predictor.cam(pixels[idx], layer, targets=[int(logits[i].argmax()) for i in idx])
        maps.update({i: cams[j] for j, i in enumerate(idx)})
    return logits, maps
