"""Live, ready, draining: what /livez and /readyz answer, and the signals of a process that serves.

Live while the process answers HTTP. Ready once the model is loaded and its warm-up batch ran (and passed its
check), and no longer once a stop began: on SIGTERM (or SIGINT) /readyz turns 503 first, the server keeps answering
for serve.drain_s seconds (so a load balancer stops sending) and until the requests in flight are done (at most
DRAIN_LIMIT_S), and only then does uvicorn stop listening and exit. SIGHUP reloads the model file (model_slot.py).
Signals reach only the main thread: a server run in a thread (tests) calls `drain()` / reloads directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("cifar_cam.serve")

DRAIN_LIMIT_S = 30.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Lifecycle:
    """Readiness and draining of one server process."""

    def __init__(self, drain_s: float = 0.0) -> None:
        self.drain_s = float(drain_s)
        self.ready = False
        self.draining = False
        self.problem: str | None = None   # why the model is not served (a failed warm-up check)
        self.in_flight = 0                # requests being answered, probes and /metrics left out
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def not_ready_reason(self) -> str | None:
        """None when ready; else what /readyz and a refused request say."""
        if self.draining:
            return "the server is stopping (draining): send requests to another instance"
        if self.problem:
            return f"the model is not served: {self.problem}"
        if not self.ready:
            return "the model is warming up; retry in a moment"
        return None

    async def drain(self, then: Callable[[], None] | None = None) -> None:
        """Not ready from now on; waits serve.drain_s, then for the requests in flight (at most DRAIN_LIMIT_S),
        then calls `then` (uvicorn's own stop)."""
        self.draining = True
        start = time.monotonic()
        await asyncio.sleep(self.drain_s)
        while self.in_flight > 0 and time.monotonic() - start < self.drain_s + DRAIN_LIMIT_S:
            await asyncio.sleep(0.02)
        if then is not None:
            then()

    def install_signals(self, reload: Callable[[str], Coroutine[Any, Any, Any]]) -> bool:
        """In the main thread: SIGTERM / SIGINT drain before uvicorn's handler stops the server; SIGHUP reloads.
        False (nothing installed) elsewhere."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._loop = loop = asyncio.get_running_loop()

        def on_stop(sig: int, frame: Any) -> None:
            previous = self._previous.get(sig)
            if self.draining or not callable(previous):  # a second signal: stop now
                if callable(previous):
                    previous(sig, frame)
                return
            log.info("stopping (%s): not ready any more; finishing the %d request%s in flight%s",
                     signal.Signals(sig).name, self.in_flight, "" if self.in_flight == 1 else "s",
                     f" after serve.drain_s={self.drain_s:g} s" if self.drain_s else "")
            loop.call_soon_threadsafe(lambda: loop.create_task(self.drain(lambda: previous(sig, frame))))

        def on_hup(sig: int, frame: Any) -> None:
            async def reload() -> None:
                with contextlib.suppress(Exception):  # refused: logged and counted by the reload itself
                    await reload_fn("SIGHUP")

            loop.call_soon_threadsafe(lambda: loop.create_task(reload()))

        reload_fn = reload
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, on_stop)
        if hasattr(signal, "SIGHUP"):
            self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        return True

    def restore_signals(self) -> None:
        """The handlers from before `install_signals` (at shutdown)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, handler in self._previous.items():
            with contextlib.suppress(TypeError, ValueError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
