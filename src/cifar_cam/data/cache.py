"""The data cache: where `data=folder` / `data=csv` keep each decoded split, read back as a memory map.

One entry is one split of one data set at one image size and resize policy: a folder `split-<key>/` holding
`images.npy` (uint8, N x H x W x 3), `labels.npy`, `hashes.npy` (of the decoded pixels) and `meta.json` (the
data root, the split, the size, the image names, the unreadable files, the per-channel mean and std). The key
hashes the files (names, sizes, mtimes), the labels, the size, the policy and the decoder's version, so a
changed file, size or policy decodes anew. An entry is written under a temporary name and renamed into place
whole: a killed write leaves a `.split-<key>.tmp-*` folder, never a half entry.

No torch here (nor anything that imports it): `cifar-cam cache` lists or clears the cache in a blink.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENTRY = re.compile(r"split-[0-9a-f]{20}")
PARTIAL = re.compile(r"\.split-[0-9a-f]{20}\.tmp-[^/]+")
# what cifar-cam wrote before entries were folders (one .npz per data set and size): listed and cleared too
LEGACY = re.compile(r"folder-[0-9a-f]{16}-\d+\.npz")
LEGACY_PARTIAL = re.compile(r"\.folder-[0-9a-f]{16}-\d+\.npz\.[^/]+\.tmp\.npz")
META = "meta.json"
FORMAT = 1


def cache_dir() -> Path:
    """$CIFAR_CAM_CACHE, else $XDG_CACHE_HOME/cifar-cam, else ~/.cache/cifar-cam (it may not exist yet)."""
    base = os.environ.get("CIFAR_CAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cifar-cam"
    )
    return Path(base)


def entry_key(*parts: Any) -> str:
    """The key of an entry: a hash of what its content depends on."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entry_dir(key: str, directory: Path | None = None) -> Path:
    return (cache_dir() if directory is None else directory) / f"split-{key}"


def shown(path: str | Path) -> str:
    """A path as the user reads it: the home dir as ~."""
    text, home = str(path), os.path.expanduser("~")
    return "~" + text[len(home):] if home not in ("", "/") and (text + "/").startswith(home + "/") else text


def megabytes(size: int) -> str:
    """Bytes as `185.3 MB` (MB = 10^6 bytes, as du -h --si and file managers count)."""
    return f"{size / 1e6:.1f} MB"


def read_meta(path: Path) -> dict[str, Any] | None:
    """An entry's meta.json, or None when it is not a complete entry of this format."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def write_entry(target: Path, build: Callable[[Path], None]) -> Path:
    """Builds an entry in a temporary folder beside `target` (`build(folder)`), then renames it into place.
    Another process that finished the same entry first wins; ours is dropped. A failure leaves nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # the same entry, made meanwhile by another run
            if read_meta(target) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass
class Entry:
    """One thing in the cache dir that this project wrote."""

    path: Path
    size: int                       # bytes on disk
    mtime: float
    partial: bool                   # a write that never finished
    meta: dict[str, Any] | None = None  # a complete entry's meta.json (None: a partial or an old-format file)

    @property
    def describe(self) -> str:
        """'train of /data/cifar10-jpg.tar.gz, 45,000 images at 32x32 (stretch)' (or what it is)."""
        m = self.meta
        if m is None:
            return "an old-format entry (.npz)" if LEGACY.fullmatch(self.path.name) else ""
        size = "x".join(str(s) for s in m.get("fit", {}).get("size", []))
        return (f"{m.get('split')} of {m.get('root')}, {m.get('count', 0):,} images at {size} "
                f"({m.get('fit', {}).get('policy', 'stretch')})")


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries(directory: Path | None = None) -> list[Entry]:
    """The project's entries in the cache dir, complete ones first; [] when the dir does not exist (OSError if it
    cannot be read)."""
    directory = cache_dir() if directory is None else directory
    found = []
    try:
        scan = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for item in scan:
        name = item.name
        is_dir = item.is_dir(follow_symlinks=False)
        partial = (is_dir and bool(PARTIAL.fullmatch(name))) or (not is_dir and bool(LEGACY_PARTIAL.fullmatch(name)))
        ours = partial or (is_dir and ENTRY.fullmatch(name)) or (not is_dir and LEGACY.fullmatch(name))
        if not ours:
            continue
        path = Path(item.path)
        try:
            st, size = item.stat(follow_symlinks=False), _du(path)
        except FileNotFoundError:  # removed meanwhile (another `cache --clear`)
            continue
        meta = read_meta(path) if is_dir and not partial else None
        if is_dir and not partial and meta is None:
            partial = True  # an entry folder without a readable meta.json: not usable, cleared with the rest
        found.append(Entry(path, size, st.st_mtime, partial, meta))
    return sorted(found, key=lambda e: (e.partial, e.meta is None, e.path.name))


def remove(entry: Entry) -> None:
    """Deletes one entry (a folder or an old-format file)."""
    if entry.path.is_dir():
        shutil.rmtree(entry.path)
    else:
        entry.path.unlink()
