"""What `inputs=` names: images, folders (recursive, sorted), .tar.gz archives, globs, or a list of them.

No torch here: the CLI checks that the inputs exist before the model loads.
"""

from __future__ import annotations

import glob as globlib
import tarfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cifar_cam.data.decode import IMAGE_SUFFIXES
from cifar_cam.errors import DataError


@dataclass(frozen=True)
class Input:
    """One image to predict: the path shown, how to read its bytes, and the folder name above it."""

    path: str
    read: Callable[[], bytes]
    folder: str | None  # the name of the folder holding it (its class, in an ImageFolder tree)


# A truncated or corrupt archive raises any of these from tarfile / gzip
ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _is_image(name: str) -> bool:
    """An image suffix, and no hidden part (AppleDouble `._x.jpg`, `.ipynb_checkpoints/`)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in Path(name).parts)


def _tar_inputs(path: Path) -> list[Input]:
    """The archive's images in its own order, read through one open handle by member (no name lookups), so
    a .tar.gz is read forward: once to list it, once to read it."""
    try:
        tar = tarfile.open(path)
        members = [m for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
    except ARCHIVE_ERRORS as e:
        raise DataError(f"inputs={path} is not a readable .tar.gz ({type(e).__name__}: {e})") from None
    lock = threading.Lock()

    def reader(member: tarfile.TarInfo) -> Callable[[], bytes]:
        def read() -> bytes:
            with lock:  # read by predict's one reading thread, in archive order
                try:
                    data = tar.extractfile(member)
                    if data is None:
                        raise DataError(f"cannot read {member.name} in {path}")
                    return data.read()
                except ARCHIVE_ERRORS as e:
                    raise DataError(f"cannot read {member.name} in {path} ({type(e).__name__}: {e})") from None
        return read

    return [Input(f"{path}:{m.name}", reader(m), Path(m.name).parent.name or None) for m in members]


def _file_input(path: Path) -> Input:
    return Input(str(path), path.read_bytes, path.parent.name or None)


def _items(spec: Any) -> list[str]:
    return [str(x) for x in (list(spec) if OmegaConf.is_list(spec) or isinstance(spec, list | tuple) else [spec])]


def _is_glob(item: str) -> bool:
    return any(c in item for c in "*?[") and not Path(item).expanduser().exists()


MODEL_SUFFIXES = (".pt", ".onnx", ".pt2")


def check_model_file(ckpt: str) -> None:
    """Refuses (CheckpointError) a `ckpt=` that does not exist or has an unknown suffix: one line before torch
    loads (an exported model asked for CAM at another layer than its feature layer is refused once its card is
    read)."""
    from cifar_cam.errors import CheckpointError

    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise CheckpointError(f"ckpt={ckpt} does not exist; pass a train run dir, a .pt, .onnx or .pt2 file")
    if path.is_file() and path.suffix not in MODEL_SUFFIXES:
        raise CheckpointError(f"ckpt={ckpt}: unknown model format '{path.suffix}'; cifar-cam reads a train run dir, "
                              f"{', '.join(MODEL_SUFFIXES)}")


def check_inputs(spec: Any) -> None:
    """Refuses (DataError) an `inputs=` path that does not exist or a pattern that matches nothing."""
    for item in _items(spec):
        if _is_glob(item):
            if not globlib.glob(str(Path(item).expanduser()), recursive=True):
                raise DataError(f"inputs={item}: the pattern matches no file")
        elif not Path(item).expanduser().exists():
            raise DataError(f"inputs={item} does not exist (an image, a folder, a .tar.gz, a glob, or a list of "
                            "them; quote paths with commas, spaces or '=')")


def find_inputs(spec: Any) -> list[Input]:
    """The images `inputs=` names: files, folders (recursive, sorted), .tar.gz archives, globs, or a list."""
    check_inputs(spec)
    found: list[Input] = []
    for item in _items(spec):
        path = Path(item).expanduser()
        if _is_glob(item):
            for m in sorted(globlib.glob(str(path), recursive=True)):
                found += _expand(Path(m), explicit=False)
        else:
            found += _expand(path, explicit=True)
    if not found:
        raise DataError(f"inputs={spec}: no image found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _expand(path: Path, explicit: bool) -> list[Input]:
    if path.is_dir():
        return [_file_input(p) for p in sorted(path.rglob("*")) if p.is_file() and _is_image(str(p.relative_to(path)))]
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _tar_inputs(path)
    if _is_image(path.name) or explicit:  # a file named explicitly is tried whatever its suffix
        return [_file_input(path)]
    return []
