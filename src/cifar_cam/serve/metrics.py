"""What `GET /metrics` reports (Prometheus text format, through prometheus-client): requests, latency, batching,
the queue, the model's load and warm-up, and what the model sees (predictions by class, top-1 confidence).

Each app has its own registry (several apps in one process, as in the tests, do not collide). With several worker
processes (serve.workers > 1) prometheus-client's multiprocess mode applies: PROMETHEUS_MULTIPROC_DIR is set before
the workers import it (`multiprocess_dir`), each writes its values there, and /metrics adds up every worker's.
`Metrics(enabled=False)` counts nothing (serve.metrics=false: no /metrics route either).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class _Off:
    """A metric that records nothing (serve.metrics=false): every call is a no-op."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, *args: Any) -> None: ...

    def dec(self, *args: Any) -> None: ...

    def set(self, *args: Any) -> None: ...

    def observe(self, *args: Any) -> None: ...


def multiprocess_dir(path: str | os.PathLike) -> Path:
    """Prepares a directory for the workers' values and names it in the environment they inherit (before they
    import prometheus-client); a directory already named there is kept. Left-over values of an earlier server
    (*.db files) are removed, or /metrics would add them up too."""
    chosen = Path(os.environ.get(MULTIPROC_ENV) or path)
    chosen.mkdir(parents=True, exist_ok=True)
    for stale in chosen.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(chosen)
    return chosen


class Metrics:
    """The server's counters, gauges and histograms (names start with cifar_cam_)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.multiprocess = enabled and bool(os.environ.get(MULTIPROC_ENV))
        self._children: dict[tuple[str, ...], Any] = {}
        self.live_gauges = enabled  # whether the queue / in-flight gauges are set as they change (see watch)
        if not enabled:
            off = _Off()
            for name in ("requests", "latency", "in_flight", "queue", "batch", "forward", "shed", "load", "warmup",
                         "model", "predictions", "confidence", "reloads"):
                setattr(self, name, off)
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cifar_cam_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("cifar_cam_request_seconds", "Seconds from a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("cifar_cam_requests_in_flight", "Requests being answered now (probes and /metrics "
                               "left out)", registry=r, multiprocess_mode="livesum")
        self.queue = Gauge("cifar_cam_queue_images", "Images waiting for a forward pass (serve.max_queue at most)",
                           registry=r, multiprocess_mode="livesum")
        self.batch = Histogram("cifar_cam_batch_images", "Images per forward pass (micro-batch size)",
                               buckets=BATCH_BUCKETS, registry=r)
        self.forward = Histogram("cifar_cam_forward_seconds", "Seconds per forward pass",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.shed = Counter("cifar_cam_shed", "Requests refused or cut short to protect the server, by reason "
                            "(queue_full: 503, timeout: 504, not_ready: 503)", ["reason"], registry=r)
        self.load = Gauge("cifar_cam_model_load_seconds", "Seconds the serving model took to load",
                          registry=r, multiprocess_mode="liveall")
        self.warmup = Gauge("cifar_cam_model_warmup_seconds", "Seconds the serving model's warm-up batch took",
                            registry=r, multiprocess_mode="liveall")
        self.model = Gauge("cifar_cam_model_info", "1 for the model answering now (its id and kind), 0 for one "
                           "replaced", ["model", "kind"], registry=r, multiprocess_mode="liveall")
        self.predictions = Counter("cifar_cam_predictions", "Images answered, by top-1 class", ["class"],
                                   registry=r)
        self.confidence = Histogram("cifar_cam_top1_confidence", "Top-1 probability of each image answered",
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.reloads = Counter("cifar_cam_model_reloads", "Model reloads (SIGHUP, POST /v1/admin/reload), by "
                               "result (ok, failed: the old model kept serving)", ["result"], registry=r)

    def child(self, metric: str, *labels: str) -> Any:
        """`getattr(self, metric).labels(*labels)`, kept: prometheus-client checks and locks on every labels()
        call (3 us), a kept child costs 1 us an increment. Label values are bounded (routes, statuses, classes)."""
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, metric).labels(*labels)
        return found

    def watch(self, queue: Any, in_flight: Any) -> None:
        """One process: the queue depth and the requests in flight read when /metrics is asked (nothing on the
        hot path); several (multiprocess mode) cannot call back, so the batcher and the middleware set them."""
        if self.enabled and not self.multiprocess:
            self.queue.set_function(queue)
            self.in_flight.set_function(in_flight)
            self.live_gauges = False

    def exposition(self) -> tuple[bytes, str]:
        """The text /metrics answers with and its content type: this process's values, or every worker's."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def process_exited(self) -> None:
        """A worker's live gauges leave the sum when it stops (multiprocess mode only)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())
