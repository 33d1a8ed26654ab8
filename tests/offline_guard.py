"""Runs cifar-cam commands in this one fresh process under a socket guard (tests/test_offline.py starts it).

    python tests/offline_guard.py <work dir> <trained run dir>

An audit hook (installed before anything of cifar_cam, albumentations or torch is imported) refuses and records
every socket connect to anything but loopback or a unix socket, and every name lookup of a host that is not
loopback. Then train, eval, gradcam, predict, export, lr-find and serve (a real `cifar-cam serve` in this
process: two requests, then SIGTERM) run through the CLI's own `main`. Prints one JSON line: the commands run and
the refused connections.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys

REFUSED: list[str] = []
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _loopback(host: object) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): the local wildcard
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").split("%")[0]
    if host in LOOPBACK_NAMES or host == "":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _guard(event: str, args: tuple) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            REFUSED.append(f"connect {address!r}")
            raise ConnectionRefusedError(f"socket guard: no connection to {address!r}")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                   "socket.gethostbyaddr") and not _loopback(args[0]):
        REFUSED.append(f"{event} {args[0]!r}")
        raise OSError(f"socket guard: no lookup of {args[0]!r}")


sys.addaudithook(_guard)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from cifar_cam.cli.main import main

    GlobalHydra.instance().clear()
    try:
        main(list(args))
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"cifar-cam {' '.join(args)} exited {e.code}") from None


def serve(run_dir: str) -> None:
    """`cifar-cam serve` in this process: another thread asks /readyz and /v1/predict, then sends SIGTERM."""
    import signal
    import threading
    import time
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    answers: list[int] = []

    def client() -> None:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                        answers.append(r.status)
                        break
                except OSError:  # not listening yet, or 503 before the warm-up
                    time.sleep(0.1)
            with open(os.path.join("images", "0.png"), "rb") as f:
                request = urllib.request.Request(url + "/v1/predict", data=f.read(), method="POST",
                                                 headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=10) as r:
                answers.append(r.status)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=client, daemon=True).start()
    run("serve", f"ckpt={run_dir}", f"serve.port={port}")
    if answers != [200, 200]:
        raise RuntimeError(f"serve answered {answers}")


def main() -> None:
    work, trained = sys.argv[1], sys.argv[2]
    os.chdir(work)
    import numpy as np
    from PIL import Image

    os.makedirs("images", exist_ok=True)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"images/{i}.png")
    tiny = ["data=synthetic", "data.train_size=64", "data.val_size=16", "data.test_size=32", "data.batch_size=16",
            "model.width=8", "eval.batch_size=32"]
    done = []
    fast = ["trainer.channels_last=false", "trainer.precision=fp32"]  # (width 8: slow oneDNN paths on some CPUs)
    for args in (["train", *tiny, *fast, "trainer.epochs=1", "logger=[csv,mlflow]"],
                 ["lr-find", *tiny, *fast, "lr_find.num_iter=18"],
                 ["eval", f"ckpt={trained}"],
                 ["gradcam", f"ckpt={trained}", "gradcam.num_images=2"],
                 ["predict", f"ckpt={trained}", "inputs=images"],
                 ["export", f"ckpt={trained}", "export.formats=[onnx]"]):
        run(*args)
        done.append(args[0])
    serve(trained)
    done.append("serve")
    print(json.dumps({"commands": done, "refused": REFUSED,
                      "env": {k: os.environ.get(k) for k in ("NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE")}}))


if __name__ == "__main__":
    main()
