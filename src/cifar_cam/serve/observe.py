"""Every request seen from outside (pure ASGI middleware, outermost): an X-Request-ID taken from the client or
made, echoed; the model that answered in X-Model-Id; the count, latency and status in the metrics; one JSON line
in the access log (serve.access_log); and a crash turned into a JSON 500 that still carries both headers."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from starlette.responses import JSONResponse
from starlette.routing import Match

log = logging.getLogger("cifar_cam.serve")

REQUEST_ID = b"x-request-id"
MODEL_ID = b"x-model-id"
# a client's request id is kept when it is short and plain (it lands in a log and a header), else one is made
_GOOD_ID = re.compile(rb"^[A-Za-z0-9._:/+=@-]{1,128}$")
# probes and scrapes: not "in flight" (a stop does not wait for them), still counted and logged
QUIET_PATHS = frozenset(("/livez", "/readyz", "/healthz", "/metrics"))
SCOPE_MODEL = "cifar_cam.model"       # the id of the model that answered (set by the predict routes)
SCOPE_STARTED = "cifar_cam.started"   # time.monotonic() at arrival: the request's serve.timeout_s counts from it


def open_access_log(target: str | None) -> IO[str] | None:
    """serve.access_log: None (off), "-" (standard output) or a file, appended one line a request."""
    if not target:
        return None
    if target == "-":
        return sys.stdout
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", buffering=1)  # line-buffered: one write per line, `tail -f` works


class Observer:
    """The outermost middleware: request id, model id, metrics, access log, crash -> JSON 500."""

    def __init__(self, app: Any, state: Any, router: Any) -> None:
        self.app, self.state, self.router = app, state, router  # state: app.state (slot, metrics, lifecycle, ...)

    def _route(self, scope: dict[str, Any]) -> str:
        """The route's template (bounded label values), or "other" for a path no route takes."""
        route = scope.get("route")
        if route is None:  # refused before routing (401): find the route the path would have reached
            for candidate in self.router.routes:
                if candidate.matches(scope)[0] == Match.FULL:
                    route = candidate
                    break
        return str(getattr(route, "path", None) or "other")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        scope[SCOPE_STARTED] = started
        given = next((v for k, v in scope["headers"] if k == REQUEST_ID), None)
        request_id = given.decode() if given is not None and _GOOD_ID.match(given) else uuid.uuid4().hex
        state, quiet = self.state, scope["path"] in QUIET_PATHS
        metrics, lifecycle = state.metrics, state.lifecycle
        status, answered = 500, False
        if not quiet:
            lifecycle.in_flight += 1
            if metrics.live_gauges:
                metrics.in_flight.inc()

        async def send_with_ids(message: dict[str, Any]) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                answered, status = True, message["status"]
                model = scope.get(SCOPE_MODEL) or state.slot.current.id
                message = {**message, "headers": [*message.get("headers", ()), (REQUEST_ID, request_id.encode()),
                                                  (MODEL_ID, model.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        except Exception as e:  # the server survives any request: a JSON 500, logged with its traceback
            log.error("%s %s (request %s): %s: %s", scope["method"], scope["path"], request_id, type(e).__name__, e,
                      exc_info=e)
            if not answered:
                await JSONResponse({"detail": f"internal error ({type(e).__name__}); the server log has the details "
                                              f"(request {request_id})"}, 500)(scope, receive, send_with_ids)
            status = 500
        finally:
            seconds = time.monotonic() - started
            if not quiet:
                lifecycle.in_flight -= 1
                if metrics.live_gauges:
                    metrics.in_flight.dec()
            route = self._route(scope)
            if metrics.enabled:
                metrics.child("requests", route, scope["method"], str(status)).inc()
                metrics.child("latency", route).observe(seconds)
            if state.access_log is not None:
                self._log_line(scope, request_id, route, status, seconds)

    def _log_line(self, scope: dict[str, Any], request_id: str, route: str, status: int, seconds: float) -> None:
        client = scope.get("client")
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": request_id,
                "method": scope["method"], "path": scope["path"], "route": route, "status": status,
                "ms": round(seconds * 1000, 3), "model": scope.get(SCOPE_MODEL) or self.state.slot.current.id,
                "client": client[0] if client else None}
        try:
            self.state.access_log.write(json.dumps(line) + "\n")
        except (OSError, ValueError) as e:  # a full disk must not fail the requests
            log.warning("access log: %s; no more lines are written", e)
            self.state.access_log = None
