"""Run-dir I/O: the conf dir, reserving run dirs, one writer per run dir, atomic writes, the core count.

Nothing here imports torch or the CLI: the CLI, the tasks, report and scripts/ all use it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cifar_cam.errors import ConfigError

LOCK_NAME = ".lock"
_HELD: dict[str, int] = {}  # run dir -> the lock file's fd, held for the life of the process


def config_dir() -> str:
    """The conf/ directory: packaged beside the code in a wheel, the repo's conf/ in a checkout."""
    spec = importlib.util.find_spec("cifar_cam.conf")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(list(spec.submodule_search_locations)[0]).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def reserve_dir(base: Path) -> Path:
    """Creates and returns base/<timestamp>[_N]: mkdir is atomic, so concurrent runs never share one."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for i in itertools.count():
        path = base / (stamp if i == 0 else f"{stamp}_{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def lock_run_dir(run_dir: Path) -> None:
    """Makes this process the one writer of `run_dir` until it exits; ConfigError naming the holder's pid if taken.

    flock is released by the kernel when its holder dies, however it dies, so a dead run's lock is taken
    over with no stale-file check. The lock file is the only thing written, and only when the lock is free.
    """
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"{run_dir} is in use by pid {holder} (another cifar-cam process writes it); wait for it "
                          "to end, or stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temp file beside `path` to write; on success fsynced and renamed onto `path`, on failure removed.

    A kill at any instant leaves the old file or the new one, never a torn one. The temp name is
    `.<name>.<random>.tmp<suffix>` (the suffix tells savefig / np.savez the format).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; ours get the usual mode
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes JSON atomically: a reader sees the old file or the new one."""
    text = json.dumps(obj, indent=2) + "\n"  # serialized first: an unserializable object leaves the old file
    return write_bytes(path, text.encode())


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Writes rows with these columns atomically; None becomes an empty cell."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return Path(path)


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints are ~90 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
