"""Decoding a whole split at once: in parallel worker processes, straight into an on-disk uint8 array.

The parent writes an empty .npy of the split's shape; each worker decodes a chunk of images (decode.py, one
OpenCV thread each) and writes its rows into that file through a memory map, so no image crosses a pipe and
the parent never holds the data set in its own memory. A directory's files are read by the workers; an
archive is read once, forward, by the parent, which hands the bytes of a bounded number of chunks at a time
to the workers. Every unreadable image is collected (not raised): the caller decides what to do with them.
The workers are spawned (not forked from a process that may hold torch) and import only numpy and OpenCV /
Pillow, through cifar_cam.data.decode.

With one worker (or few images) everything runs in this process: no spawn cost.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_cam.data.decode import Fit, decode_image
from cifar_cam.errors import DataError

CHUNK = 256               # images a worker decodes per task
IN_PROCESS_BELOW = 2048   # fewer images than this: decoded in this process (spawning costs more than it saves)


@dataclass
class Decoded:
    """What a pass over a split found, row by row (rows of unreadable images hold zeros until compacted)."""

    ok: np.ndarray                      # bool (N,): decoded
    flags: np.ndarray                   # uint8 (N,): decode.py's conversion bits
    hashes: np.ndarray                  # uint64 (N,): of the decoded pixels (train/test duplicates)
    pixel_sum: np.ndarray               # float64 (3,): over the decoded images, for the mean
    pixel_sq: np.ndarray                # float64 (3,): sum of squares, for the std
    pixels: int = 0                     # pixels summed over (per channel)
    bad: dict[int, str] = field(default_factory=dict)  # row -> why it could not be decoded


def _pixel_hash(image: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little")


def _init_worker() -> None:
    try:
        import cv2

        cv2.setNumThreads(1)  # each worker one thread: the processes are the parallelism
    except ImportError:  # pragma: no cover - cv2 is a dependency
        pass


def decode_chunk(array_path: str, shape: tuple[int, ...], fit: dict[str, Any],
                 entries: list[tuple[int, str, str | bytes]]) -> dict[str, Any]:
    """A worker's task: decode (row, name, path or bytes) entries into rows of the .npy at `array_path`."""
    images = np.load(array_path, mmap_mode="r+")
    assert images.shape == tuple(shape)
    how = Fit.from_dict(fit)
    out: dict[str, Any] = {"rows": [], "flags": [], "hashes": [], "bad": {}, "sum": np.zeros(3), "sq": np.zeros(3),
                           "pixels": 0}
    for row, name, payload in entries:
        try:
            data = Path(payload).read_bytes() if isinstance(payload, str) else payload
            image, flags = decode_image(data, name, how)
        except DataError as e:
            out["bad"][row] = str(e)
            continue
        except OSError as e:
            out["bad"][row] = f"cannot read {name}: {e.strerror or e}"
            continue
        images[row] = image
        pixels = image.reshape(-1, 3).astype(np.float64)
        out["sum"] += pixels.sum(0)
        out["sq"] += (pixels * pixels).sum(0)
        out["pixels"] += len(pixels)
        out["rows"].append(row)
        out["flags"].append(flags)
        out["hashes"].append(_pixel_hash(image))
    images.flush()
    del images
    return out


def _chunks(entries: Iterator[tuple[int, str, str | bytes]], size: int) -> Iterator[list[tuple[int, str, str | bytes]]]:
    chunk: list[tuple[int, str, str | bytes]] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tar_entries(archive: Path, names: list[str], prefix: str) -> Iterator[tuple[int, str, bytes]]:
    """(row, name, bytes) of the wanted members, read forward in the archive's own order (a .tar.gz is one
    compressed stream: reading it out of order would decompress it again and again)."""
    rows = {name: row for row, name in enumerate(names)}
    found = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./")[len(prefix):]
                row = rows.get(name)
                if row is None or not member.isfile():
                    continue
                f = tar.extractfile(member)
                found.add(name)
                yield row, name, f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"data.root {str(archive)!r} cannot be read to the end ({type(e).__name__}: {e}); "
                        "it may be truncated") from None
    for name in names:
        if name not in found:
            yield rows[name], name, b""  # listed but gone: decoding says so


def decode_split(array_path: Path, shape: tuple[int, ...], fit: Fit,
                 entries: Iterator[tuple[int, str, str | bytes]], workers: int,
                 progress: Callable[[int], None] | None = None,
                 in_process_below: int = IN_PROCESS_BELOW) -> Decoded:
    """Decodes `entries` (row, name, path or bytes) into the .npy at `array_path` (created here, zeros), with
    `workers` processes (1, or fewer than `in_process_below` images: in this process); `progress(n)` after
    every chunk with the images done so far."""
    n = shape[0]
    images = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=shape)
    del images  # the workers write through their own maps
    result = Decoded(ok=np.zeros(n, bool), flags=np.zeros(n, np.uint8), hashes=np.zeros(n, np.uint64),
                     pixel_sum=np.zeros(3), pixel_sq=np.zeros(3))
    done = 0

    def take(part: dict[str, Any]) -> None:
        nonlocal done
        rows = np.asarray(part["rows"], np.int64)
        result.ok[rows] = True
        result.flags[rows] = np.asarray(part["flags"], np.uint8)
        result.hashes[rows] = np.asarray(part["hashes"], np.uint64)
        result.pixel_sum += part["sum"]
        result.pixel_sq += part["sq"]
        result.pixels += part["pixels"]
        result.bad.update(part["bad"])
        done += len(part["rows"]) + len(part["bad"])
        if progress is not None:
            progress(done)

    args = (str(array_path), tuple(shape), fit.to_dict())
    if workers <= 1 or n < in_process_below:
        for chunk in _chunks(entries, CHUNK):
            take(decode_chunk(*args, chunk))
        return result
    context = multiprocessing.get_context("spawn")  # a fork of a process holding torch's threads is unsafe
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        pending: set[Future] = set()
        for chunk in _chunks(entries, CHUNK):
            pending.add(pool.submit(decode_chunk, *args, chunk))
            if len(pending) >= 2 * workers:  # a bounded number of chunks in flight: an archive's bytes wait here
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    take(future.result())
        for future in pending:
            take(future.result())
    return result


def compact(array_path: Path, keep: np.ndarray, out_path: Path, block: int = 4096) -> None:
    """Copies the rows `keep` (bool) of the .npy at `array_path` into a new .npy, a block at a time."""
    source = np.load(array_path, mmap_mode="r")
    rows = np.flatnonzero(keep)
    target = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(len(rows), *source.shape[1:]))
    for start in range(0, len(rows), block):
        target[start:start + block] = source[rows[start:start + block]]
    target.flush()
    del target, source
