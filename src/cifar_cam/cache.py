"""The data cache: where `data=folder` keeps its decoded arrays, and `cifar-cam cache [--clear]`.

No torch here (nor anything that imports it): the CLI lists or clears the cache in a blink.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CACHE_HELP = "list the data cache (decoded data=folder arrays, ~/.cache/cifar-cam); --clear removes it"

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


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _list(directory: Path) -> None:
    found = entries(directory)
    if not found:
        print(f"the data cache is empty: nothing in {shown(directory)} (data=folder writes its decoded arrays there)")
        return
    for e in found:
        stamp = datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
        note = "  (partial: an interrupted write)" if e.partial else ""
        print(f"{megabytes(e.size):>10}  {stamp}  {e.path.name}{note}")
    total = sum(e.size for e in found)
    print(f"{megabytes(total):>10}  total, {_files(len(found))} in {shown(directory)} "
          "(`cifar-cam cache --clear` removes them)")


def _clear(directory: Path) -> None:
    removed = total = 0
    for e in entries(directory):
        try:
            e.path.unlink()
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError as err:
            raise OSError(f"cannot remove {shown(e.path)}: {err.strerror or err}") from err
        removed += 1
        total += e.size
        print(f"removed {shown(e.path)} ({megabytes(e.size)})")
    if removed:
        print(f"removed {_files(removed)}, {megabytes(total)}, from {shown(directory)}")
    else:
        print(f"nothing to remove: no cached arrays in {shown(directory)}")


def cache_main(args: list[str]) -> int:
    """`cifar-cam cache [--clear]`: lists (or removes) the decoded-array files of data=folder; the exit code."""
    parser = argparse.ArgumentParser(
        prog="cifar-cam cache",
        description="data=folder decodes an ImageFolder (a directory or .tar.gz of JPEGs) once and keeps the "
                    "arrays as one .npz per dataset and image size (CIFAR-10: about 185 MB at 32 px, 415 MB at "
                    "48 px). Lists those files: size, date, name; then the total.",
        epilog="The cache dir is $CIFAR_CAM_CACHE, else $XDG_CACHE_HOME/cifar-cam, else ~/.cache/cifar-cam; "
               "only the files cifar-cam wrote there are listed or removed. A removed file is decoded again "
               "on the next run that needs it.",
    )
    parser.add_argument("--clear", action="store_true", help="remove the cached arrays (and partial writes)")
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # --help (0) or a bad argument (2, usage already on stderr)
        return e.code if isinstance(e.code, int) else 2
    directory = cache_dir()
    try:
        if ns.clear:
            _clear(directory)
        else:
            _list(directory)
    except OSError as e:
        message = str(e) if e.filename is None else f"{shown(e.filename)}: {e.strerror or e}"
        print(f"cifar-cam cache: error: {message}", file=sys.stderr)
        return 1
    return 0
