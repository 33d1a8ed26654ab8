"""`cifar-cam serve ckpt=<run | .pt | .onnx | .pt2>`: the HTTP API and page (FastAPI + uvicorn).

Binds serve.host:serve.port (127.0.0.1:8000; port 0 picks a free one, logged), logs the URL (a warning
when the host is not loopback: the network can reach it), and serves until Ctrl-C / SIGTERM, which turn
/readyz to 503, finish the requests in flight and exit 0. SIGHUP loads the ckpt= file again (the old model
serves until the new one is warmed up and checked). serve.workers > 1 runs that many processes over one
socket, each loading the model through `cifar_cam.serve.app:factory`, their metrics added up through
prometheus-client's multiprocess directory (<run dir>/prometheus unless PROMETHEUS_MULTIPROC_DIR is set).
A relative serve.access_log lands in the run dir.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cifar_cam.errors import CifarCamError
from cifar_cam.serve.app import ENV, create_app, load_predictor, spec_json
from cifar_cam.serve.gallery import load_gallery
from cifar_cam.serve.metrics import multiprocess_dir
from cifar_cam.serve.server import GRACE_S, bind, is_loopback, server_class, url_of
from cifar_cam.serve.settings import Settings
from cifar_cam.tasks.common import resolve_num_threads, run_dir, seed_everything

log = logging.getLogger("cifar_cam.serve")


class ServeError(CifarCamError):
    """The server could not start (the port is taken, the host is not ours)."""

    exit_code = 1


def serve(cfg: DictConfig) -> None:
    """Serves cfg.ckpt until Ctrl-C / SIGTERM."""
    import uvicorn

    s = cfg.serve
    seed_everything(cfg.seed)
    threads = resolve_num_threads(cfg.trainer.get("num_threads", "auto"))
    settings = Settings.from_cfg(s)
    if settings.access_log and settings.access_log != "-" and not Path(settings.access_log).expanduser().is_absolute():
        settings.access_log = str(run_dir() / settings.access_log)
    if settings.gallery:
        load_gallery(settings.gallery)  # a bad serve.gallery fails here, before a port is bound or a worker runs
    workers = int(s.workers)
    host, port = str(s.host), int(s.port)
    spec = spec_json(str(cfg.ckpt), str(cfg.trainer.device), str(cfg.trainer.precision), threads, settings,
                     batch_size=max(int(settings.max_batch), int(settings.max_batch_images)), workers=workers)
    t0 = time.perf_counter()
    predictor = load_predictor(json.loads(spec))  # one line (exit 2) for a bad ckpt, before binding anything
    load_seconds = time.perf_counter() - t0
    try:
        sock = bind(host, port)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another serve.port "
                         "(0: any free port) or serve.host") from None
    url = url_of(sock)
    common: dict[str, Any] = {"log_config": None, "access_log": False, "lifespan": "on", "server_header": False,
                              "timeout_graceful_shutdown": GRACE_S}
    log.info("model: %s (%s, %d classes, %d px)%s", predictor.source, predictor.kind, len(predictor.classes),
             predictor.image_size, "" if predictor.calibration is None else
             f"; probabilities softmax(logits / {predictor.temperature:.4g}) ({predictor.calibration.source})")
    if workers > 1:
        del predictor  # each worker loads its own
        os.environ[ENV] = spec
        if settings.metrics:
            log.info("metrics of the %d workers: %s", workers, multiprocess_dir(run_dir() / "prometheus"))
        config = uvicorn.Config("cifar_cam.serve.app:factory", factory=True, workers=workers, **common)
    else:
        config = uvicorn.Config(create_app(predictor, settings, lambda: load_predictor(json.loads(spec)),
                                           load_seconds), **common)
    log.info("serving at %s (API docs: %s/docs; %d worker%s; Ctrl-C to stop, SIGHUP to reload %s)", url, url,
             workers, "s" if workers > 1 else "", cfg.ckpt)
    if not is_loopback(host):
        log.warning("serve.host=%s is not loopback: other machines can reach this server%s", host,
                    "" if settings.api_key else " (and serve.api_key is not set)")
    try:
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn < 0.30
                Multiprocess(config, target=server_class()(config).run, sockets=[sock]).run()
            else:
                Multiprocess(config, sockets=[sock]).run()  # returns (0) once its workers stopped
        else:
            server_class()(config).run(sockets=[sock])
    finally:
        sock.close()
    log.info("stopped")
