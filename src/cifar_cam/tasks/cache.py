"""`cifar-cam cache [--clear]`: lists (or empties) the decoded-data cache that data=folder keeps. Not a Hydra app:
its arguments are flags, not overrides; no torch."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from cifar_cam.data.cache import cache_dir, entries, megabytes, remove, shown

CACHE_HELP = "list the data cache (decoded data=folder / csv splits, ~/.cache/cifar-cam); --clear removes it"


def _files(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _list(directory: Path) -> None:
    found = entries(directory)
    if not found:
        print(f"the data cache is empty: nothing in {shown(directory)} (data=folder and data=csv write their "
              "decoded splits there)")
        return
    for e in found:
        stamp = datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
        what = "partial: an interrupted write" if e.partial else e.describe
        print(f"{megabytes(e.size):>10}  {stamp}  {e.path.name}  {what}")
    total = sum(e.size for e in found)
    print(f"{megabytes(total):>10}  total, {_files(len(found))} in {shown(directory)} "
          "(`cifar-cam cache --clear` removes them)")


def _clear(directory: Path) -> None:
    removed = total = 0
    for e in entries(directory):
        try:
            remove(e)
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
        print(f"nothing to remove: no cached splits in {shown(directory)}")


def cache_main(args: list[str]) -> int:
    """`cifar-cam cache [--clear]`: lists (or removes) the decoded splits of data=folder / csv; the exit code."""
    parser = argparse.ArgumentParser(
        prog="cifar-cam cache",
        description="data=folder and data=csv decode each split of a data set once, in parallel, into the cache "
                    "(uint8 arrays read back as memory maps: one entry a split, image size and resize policy; "
                    "CIFAR-10's 60,000 images take about 184 MB at 32 px). Lists the entries: size on disk, date, "
                    "which split of which data root, how many images at what size; then the total.",
        epilog="The cache dir is $CIFAR_CAM_CACHE, else $XDG_CACHE_HOME/cifar-cam, else ~/.cache/cifar-cam; "
               "only the files cifar-cam wrote there are listed or removed. A removed file is decoded again "
               "on the next run that needs it.",
    )
    parser.add_argument("--clear", action="store_true", help="remove the cached splits (and partial writes)")
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
