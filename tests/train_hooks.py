"""Test-only `cifar-cam` entry point that parks the process at a known point, so a test can kill it there.

Run as `python tests/train_hooks.py <command> [overrides]`; without the variables below it is plain
`cifar-cam`. Nothing in the package knows about these hooks.

CIFAR_CAM_TEST_HANG_SAVE=N   the Nth torch.save writes half the checkpoint, then hangs (SIGKILL it mid-write)
CIFAR_CAM_TEST_HOLD_STEP=N   after training step N of this process, wait until a signal arrives
CIFAR_CAM_TEST_BLOCK_STEP=N  training step N of this process blocks forever in native code (a mutex locked
                             twice, with the GIL released), as a stuck oneDNN kernel does
CIFAR_CAM_TEST_MARKER=PATH   written once the process is parked
"""

from __future__ import annotations

import ctypes
import io
import os
import time
from pathlib import Path
from typing import Any

import torch

import cifar_cam.training.loop as loop
from cifar_cam.cli.main import main


def _park(marker: Path) -> None:
    marker.write_text(str(os.getpid()))


def hang_on_save(n: int, marker: Path) -> None:
    """The nth torch.save into a file object writes half its bytes (flushed, fsynced) and never returns."""
    real_save = torch.save
    calls = 0

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls != n or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _park(marker)
        while True:
            time.sleep(1)

    torch.save = save


def hold_after_step(n: int, marker: Path) -> None:
    """After the nth training step, the stop check waits until SIGINT/SIGTERM has been received."""
    real_train_one_epoch = loop.train_one_epoch
    steps = 0

    def train_one_epoch(*args: Any, should_stop: Any, **kwargs: Any) -> Any:
        def held_should_stop() -> bool:
            nonlocal steps
            steps += 1
            if steps == n:
                _park(marker)
                while not should_stop():
                    time.sleep(0.01)
            return should_stop()

        return real_train_one_epoch(*args, should_stop=held_should_stop, **kwargs)

    loop.train_one_epoch = train_one_epoch


def block_at_step(n: int, marker: Path) -> None:
    """The nth training step never returns: it waits on a mutex it already holds, inside libc."""
    real_train_one_epoch = loop.train_one_epoch
    steps = 0
    libc = ctypes.CDLL(None)  # CDLL calls release the GIL, as torch's kernels do
    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER on glibc

    def train_one_epoch(*args: Any, heartbeat: Any, **kwargs: Any) -> Any:
        def blocking_heartbeat(step: int) -> None:
            nonlocal steps
            heartbeat(step)
            steps += 1
            if steps == n:
                _park(marker)
                libc.pthread_mutex_lock(mutex)
                libc.pthread_mutex_lock(mutex)  # a default mutex locked twice: blocks forever; signals don't end it

        return real_train_one_epoch(*args, heartbeat=blocking_heartbeat, **kwargs)

    loop.train_one_epoch = train_one_epoch


if __name__ == "__main__":
    marker_path = Path(os.environ.get("CIFAR_CAM_TEST_MARKER", "parked"))
    if os.environ.get("CIFAR_CAM_TEST_HANG_SAVE"):
        hang_on_save(int(os.environ["CIFAR_CAM_TEST_HANG_SAVE"]), marker_path)
    if os.environ.get("CIFAR_CAM_TEST_HOLD_STEP"):
        hold_after_step(int(os.environ["CIFAR_CAM_TEST_HOLD_STEP"]), marker_path)
    if os.environ.get("CIFAR_CAM_TEST_BLOCK_STEP"):
        block_at_step(int(os.environ["CIFAR_CAM_TEST_BLOCK_STEP"]), marker_path)
    main()
