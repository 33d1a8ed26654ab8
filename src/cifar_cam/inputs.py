"""What `inputs=` names: images, folders (recursive, sorted), .tar.gz archives, globs, or a list of them.

No torch here: the CLI checks that the inputs exist before the model loads.
"""

from __future__ import annotations

import glob as globlib
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cifar_cam.errors import DataError
from cifar_cam.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Input:
    """One image to predict: the path shown, how to read its bytes, and the folder name above it."""

    path: str
    read: Callable[[], bytes]
    folder: str | None  # the name of the folder holding it (its class, in an ImageFolder tree)


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _tar_inputs(path: Path) -> list[Input]:
    try:  # in the archive's own order: a .tar.gz is read forward once, never seeking back
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"inputs={path} is not a readable .tar.gz ({e})") from None
    holder: dict[str, tarfile.TarFile] = {}
    lock = threading.Lock()

    def reader(name: str) -> Callable[[], bytes]:
        def read() -> bytes:
            with lock:  # one open archive, read by the producer thread in archive order
                tar = holder.get("tar") or holder.setdefault("tar", tarfile.open(path))
                member = tar.extractfile(name)
                if member is None:
                    raise DataError(f"cannot read {name} in {path}")
                return member.read()
        return read

    return [Input(f"{path}:{n}", reader(n), Path(n).parent.name or None) for n in names]


def _file_input(path: Path) -> Input:
    return Input(str(path), path.read_bytes, path.parent.name or None)


def _items(spec: Any) -> list[str]:
    return [str(x) for x in (list(spec) if OmegaConf.is_list(spec) or isinstance(spec, list | tuple) else [spec])]


def _is_glob(item: str) -> bool:
    return any(c in item for c in "*?[") and not Path(item).expanduser().exists()


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
        return [_file_input(p) for p in sorted(path.rglob("*")) if p.is_file() and _is_image(p.name)]
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _tar_inputs(path)
    if _is_image(path.name) or explicit:  # a file named explicitly is tried whatever its suffix
        return [_file_input(path)]
    return []
