"""Micro-batching: concurrent requests gathered into one forward pass (up to `max_batch` images, the first waiting
at most `max_wait_ms`; 0 turns gathering off). Passes run one at a time in a worker thread, so the event loop only
moves bytes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cifar_cam.serve.settings import ApiError

if TYPE_CHECKING:
    from cifar_cam.inference.predictor import Predictor


@dataclass
class _Item:
    pixels: np.ndarray            # uint8 (S, S, 3)
    layer: str | None             # CAM layer, or None
    future: asyncio.Future


class Batcher:
    """Gathers concurrent requests into one forward pass: up to `max_batch` images, the first waiting at
    most `max_wait_ms` for others (0: one image a pass). Passes run one at a time in a worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float) -> None:
        self.predictor = predictor
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.pending: collections.deque[_Item] = collections.deque()
        self.passes = 0    # forward passes run
        self.images = 0    # images they held
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
                item.future.set_exception(ApiError(503, "the server is shutting down; retry on another instance"))
        self.executor.shutdown(wait=True)

    async def run(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` in the forward thread (one at a time with the passes)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def submit(self, pixels: np.ndarray, layer: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """One image's logits (and CAM map at `layer`), computed in a gathered pass."""
        if self._wake is None:
            raise ApiError(503, "the server is starting or stopping; retry in a moment")
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Item(pixels, layer, future))
        self._wake.set()
        return await future

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
            n = self.max_batch if self.max_wait > 0 else 1
            batch = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
            batch = [b for b in batch if not b.future.done()]  # the client left
            if not batch:
                continue
            pixels = np.stack([b.pixels for b in batch])
            layers = [b.layer for b in batch]
            try:
                logits, maps = await loop.run_in_executor(self.executor, self._forward, pixels, layers)
            except Exception as e:  # noqa: BLE001  (each request answers with it)
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(e)
                continue
            self.passes += 1
            self.images += len(batch)
            for i, b in enumerate(batch):
                if not b.future.done():
                    b.future.set_result((logits[i], maps.get(i)))

    def _forward(self, pixels: np.ndarray, layers: list[str | None]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        logits = self.predictor.logits(pixels)
        maps: dict[int, np.ndarray] = {}
        for layer in sorted({x for x in layers if x}):
            idx = [i for i, x in enumerate(layers) if x == layer]
            cams = self.predictor.cam(pixels[idx], layer, targets=[int(logits[i].argmax()) for i in idx])
            maps.update({i: cams[j] for j, i in enumerate(idx)})
        return logits, maps
