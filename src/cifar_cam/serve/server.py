"""Running the app: a listening socket, its URL, uvicorn in a thread (tests, benchmarks) or as the process's server
(`cifar-cam serve`: a signal is a clean stop)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI

log = logging.getLogger("cifar_cam.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port); OSError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, wait_ready: bool = True,
            **config: Any) -> Iterator[tuple[str, Any]]:
    """Serves `app` with uvicorn in a background thread (tests, benchmarks): yields (base URL, server), once the
    model has warmed up unless `wait_ready` is false."""
    import uvicorn

    sock = bind(host, port)
    cfg = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                         **config)
    server: uvicorn.Server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start (see the log)")
        time.sleep(0.01)
    lifecycle = getattr(app.state, "lifecycle", None) if wait_ready else None
    while lifecycle is not None and not (lifecycle.ready or lifecycle.problem):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the model did not warm up (see the log)")
        time.sleep(0.005)
    try:
        yield url_of(sock), server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


GRACE_S = 5


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_class() -> Any:
    """uvicorn's Server class with a clean exit on SIGINT / SIGTERM (imported only when serving)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a stop asked for by SIGINT / SIGTERM is a clean exit (0): uvicorn would raise
        the signal again once it has shut down."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:  # the app's lifecycle has drained (and logged the stop) before this
                log.debug("%s: uvicorn stops listening (at most %d s more for open connections)",
                          signal.Signals(sig).name, GRACE_S)
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server
