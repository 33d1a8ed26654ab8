"""The data cache: where `data=folder` keeps its decoded arrays, and `cifar-cam cache [--clear]`.

No torch here (nor anything that imports it): the CLI lists or clears the cache in a blink.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# What load_folder writes: folder-<fingerprint>-<image size>.npz, through io.atomic_path, whose temp
# name `.<name>.<random>.tmp.npz` is what a killed write leaves behind. Nothing else in the dir is ours.
_ENTRY = re.compile(r"folder-[0-9a-f]{16}-\d+\.npz")
_PARTIAL = re.compile(r"\.folder-[0-9a-f]{16}-\d+\.npz\.[^/]+\.tmp\.npz")


def cache_dir() -> Path:
    """$CIFAR_CAM_CACHE, else $XDG_CACHE_HOME/cifar-cam, else ~/.cache/cifar-cam (it may not exist yet)."""
    base = os.environ.get("CIFAR_CAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cifar-cam"
    )
    return Path(base)


def folder_cache_file(fingerprint: str, image_size: int) -> Path:
    """The cache file of one ImageFolder tree (its fingerprint) decoded at one image size."""
    return cache_dir() / f"folder-{fingerprint}-{image_size}.npz"


def shown(path: str | Path) -> str:
    """A path as the user reads it: the home dir as ~."""
    text, home = str(path), os.path.expanduser("~")
    return "~" + text[len(home):] if home not in ("", "/") and (text + "/").startswith(home + "/") else text


def megabytes(size: int) -> str:
    """Bytes as `185.3 MB` (MB = 10^6 bytes, as du -h --si and file managers count)."""
    return f"{size / 1e6:.1f} MB"


@dataclass
class Entry:
    """One file of the cache dir that this project wrote."""

    path: Path
    size: int
    mtime: float
    partial: bool  # the temp file of a write that never finished


def entries(directory: Path | None = None) -> list[Entry]:
    """The project's files in the cache dir, by name; [] when the dir does not exist. OSError if unreadable."""
    directory = cache_dir() if directory is None else directory
    found = []
    try:
        scan = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for item in scan:
        partial = bool(_PARTIAL.fullmatch(item.name))
        if not (partial or _ENTRY.fullmatch(item.name)) or not item.is_file(follow_symlinks=False):
            continue
        try:
            st = item.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed meanwhile (another `cache --clear`)
            continue
        found.append(Entry(Path(item.path), st.st_size, st.st_mtime, partial))
    return sorted(found, key=lambda e: (e.partial, e.path.name))


