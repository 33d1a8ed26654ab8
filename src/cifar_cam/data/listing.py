"""What a file data source holds, before a pixel is decoded: the images, their classes and splits.

`data=folder` takes a directory or a .tar/.tar.gz in one of three layouts:

    train/<class>/... + test/<class>/...           the test set given (as CIFAR's)
    train/<class>/... + val/<class>/... (+ test/)  val given too; without test/, val/ is the test set
    <class>/...                                    a bare tree of class folders, split by data.split

`data=csv` takes a CSV of `path,label[,split]` (a header row optional; paths relative to the CSV's folder or
absolute); without a split column its rows are split by data.split. Images may sit in subfolders of a class
folder; hidden files and files that are no image (by suffix) are skipped and counted.

Names are relative to the root (a CSV's paths as written), with '/' separators on every system: split.csv and
the checkpoint keep them, so a run's split can be found again under a moved root.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from cifar_cam.data.decode import IMAGE_SUFFIXES
from cifar_cam.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One image: its name (relative to the source's root), its class index, its split (None: to be split)."""

    name: str
    label: int
    split: str | None = None


@dataclass
class Listing:
    """Every image of a source, with where to read it from."""

    root: Path                      # the directory, archive or CSV, resolved
    kind: str                       # dir | tar | csv
    layout: str                     # train/test | train/val/test | train/val | classes | csv | csv+split
    classes: list[str]
    items: list[Item]
    skipped: list[str] = field(default_factory=list)   # files that are no image (by suffix), hidden ones aside
    stray: list[str] = field(default_factory=list)     # images outside any class folder, not used
    prefix: str = ""                # an archive's one top folder, left out of the names

    @property
    def base(self) -> Path:
        """Where relative names start: the directory itself, or the folder holding the CSV."""
        return self.root.parent if self.kind == "csv" else self.root

    def path_of(self, name: str) -> Path:
        """The file of a name (dir and csv kinds)."""
        path = Path(name)
        return path if path.is_absolute() else self.base / name

    def fingerprint(self, names: list[str] | None = None) -> str:
        """Changes when any listed file changes (its path, size, mtime) or, for an archive, the archive does."""
        h = hashlib.sha1(f"{self.kind}:{self.root}".encode())
        if self.kind == "tar":
            st = self.root.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        for name in sorted(names if names is not None else [i.name for i in self.items]):
            if self.kind != "tar":
                try:
                    st = self.path_of(name).stat()
                    h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
                except OSError:  # a file gone since listing: the decode pass names it
                    h.update(f"{name}:missing\n".encode())
            else:
                h.update(f"{name}\n".encode())
        return h.hexdigest()[:16]


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _walk_dir(root: Path) -> list[str]:
    """Every file below `root` as a '/'-separated relative name, and every folder as one ending in '/' (an empty
    class folder is named, not missed), sorted; hidden ones left out."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        rel = Path(dirpath).relative_to(root).as_posix()
        if rel != ".":
            names.append(f"{rel}/")
        for f in filenames:
            name = f if rel == "." else f"{rel}/{f}"
            if not _hidden(name):
                names.append(name)
    return sorted(names)


def tar_names(path: Path) -> tuple[list[str], str]:
    """The files of an archive (names without its one top folder, if it has one) and that prefix."""
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"data.root {str(path)!r} is not a readable .tar/.tar.gz ({type(e).__name__}: {e})") from None
    files = [f for f in (m.name.lstrip("./") for m in members if m.isfile()) if f and not _hidden(f)]
    folders = [f"{m.name.lstrip('./').rstrip('/')}/" for m in members if m.isdir()]
    tops = {f.split("/")[0] for f in files}
    prefix = ""
    if len(tops) == 1 and all("/" in f for f in files) and tops.pop() not in SPLITS:
        prefix = files[0].split("/")[0] + "/"
    folders = [f[len(prefix):] for f in folders if f.startswith(prefix) and len(f) > len(prefix) and not _hidden(f)]
    return sorted([f[len(prefix):] for f in files] + folders), prefix


def _tree_items(names: list[str], where: str) -> tuple[str, list[str], list[Item], list[str], list[str]]:
    """(layout, classes, items, skipped, stray) of the names of a directory or archive (folders end in '/')."""
    files = [n for n in names if not n.endswith("/")]
    tops = {n.split("/")[0] for n in files if "/" in n}
    skipped = [n for n in files if not _is_image(n)]
    images = [n for n in files if _is_image(n)]
    stray = [n for n in images if "/" not in n]
    if "train" in tops:
        present = [s for s in SPLITS if s in tops]
        if present == ["train"]:
            raise DataError(f"data.root {where!r} has train/ but no test/ or val/ next to it; add test/<class>/..., "
                            "or put the class folders at the top to have them split by data.split")
        by_split: dict[str, dict[str, list[str]]] = {s: {} for s in present}
        stray += [n for n in images if n.split("/")[0] not in present and "/" in n]
        for n in images:
            parts = n.split("/")
            if parts[0] in by_split and len(parts) >= 3:
                by_split[parts[0]].setdefault(parts[1], []).append(n)
            elif parts[0] in by_split:
                stray.append(n)
        empty = [f"{s}/{c}" for s in present for c in _dirs_of(names, s) if c not in by_split[s]]
        if empty:
            raise DataError(f"class folder {where}/{empty[0]} has no images; remove it or add images")
        classes = sorted(by_split["train"])
        if not classes:
            raise DataError(f"{where} has no train/ folder with class subfolders (expected train/<class>/<image>)")
        for s in present[1:]:
            if sorted(by_split[s]) != classes:
                only_train = sorted(set(classes) - set(by_split[s]))
                only_other = sorted(set(by_split[s]) - set(classes))
                raise DataError(f"train/ and {s}/ of {where!r} have different classes (only in train: {only_train}, "
                                f"only in {s}: {only_other}); both need the same class folders")
        # train + val without test: val/ is the held-out test set (as ImageNet's val is)
        names_of = {"train": "train", "val": "val" if "test" in present else "test", "test": "test"}
        items = [Item(n, classes.index(c), names_of[s]) for s in present for c in classes for n in by_split[s][c]]
        return "/".join(present), classes, items, skipped, stray
    by_class: dict[str, list[str]] = {}
    for n in images:
        if "/" in n:
            by_class.setdefault(n.split("/")[0], []).append(n)
    if not by_class:
        raise DataError(f"data.root {where!r} holds no class folders with images: use train/<class>/<image> + "
                        "test/<class>/<image>, or one folder of images per class")
    empty = [d for d in _dirs_of(names, None) if d not in by_class]
    if any(d in ("test", "val") for d in empty):
        raise DataError(f"data.root {where!r} has {', '.join(empty)}/ but no train/ next to it")
    if empty:
        raise DataError(f"class folder {where}/{empty[0]} has no images; remove it or add images")
    classes = sorted(by_class)
    return "classes", classes, [Item(n, classes.index(c)) for c in classes for n in by_class[c]], skipped, stray


def _dirs_of(names: list[str], under: str | None) -> list[str]:
    """The folder names directly below `under` (None: the top), empty ones included."""
    depth = 0 if under is None else 1
    return sorted({n.split("/")[depth] for n in names if len(n.split("/")) > depth + 1
                   and (under is None or n.split("/")[0] == under)})


def list_folder(root: str) -> Listing:
    """The images of a directory or .tar/.tar.gz (see the module docstring); DataError in one line."""
    path = Path(str(root)).expanduser()
    if not path.exists():
        raise DataError(f"data.root {root!r} does not exist; point data.root at a folder of class folders (or of "
                        "train/ and test/), or a .tar/.tar.gz of one")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"data.root {root!r} is a file but not a .tar/.tar.gz archive of an image folder tree "
                            "(a CSV of path,label is data=csv)")
        names, prefix = tar_names(path)
        kind = "tar"
    else:
        names, kind, prefix = _walk_dir(path), "dir", ""
    layout, classes, items, skipped, stray = _tree_items(names, str(root))
    return Listing(path.resolve(), kind, layout, classes, items, skipped, stray, prefix)


def list_csv(path_text: str) -> Listing:
    """The images a CSV of `path,label[,split]` names; DataError in one line for a missing file or a bad row."""
    path = Path(str(path_text)).expanduser()
    if not path.is_file():
        raise DataError(f"data.root={path_text!r}: no such CSV file; data=csv reads a CSV of path,label[,split]")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"data.root={path_text!r} is not a readable CSV ({type(e).__name__}: {e})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        header, rows = [c.strip().lower() for c in rows[0]], rows[1:]
    else:
        header = ["path", "label", "split"][: len(rows[0])] if rows else []
    if not rows:
        raise DataError(f"data.root={path_text!r} has no rows; write one line per image: path,label[,split]")
    with_split = "split" in header
    column = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    parsed: list[tuple[str, str, str | None]] = []
    for number, row in enumerate(rows, start=2 if header and header[0] == "path" else 1):
        try:
            name, label = row[column["path"]].strip(), row[column["label"]].strip()
            split = row[column["split"]].strip().lower() if with_split else None
        except (IndexError, KeyError):
            raise DataError(f"{path_text} line {number}: expected path,label{',split' if with_split else ''}, "
                            f"got {','.join(row)!r}") from None
        if not name or not label:
            raise DataError(f"{path_text} line {number}: an empty path or label")
        if split is not None and split not in SPLITS:
            raise DataError(f"{path_text} line {number}: split {split!r} is not one of {', '.join(SPLITS)}")
        parsed.append((name.replace(os.sep, "/"), label, split))
    classes = sorted({label for _, label, _ in parsed})
    skipped = [n for n, _, _ in parsed if not _is_image(n)]
    items = [Item(n, classes.index(lab), s) for n, lab, s in parsed if _is_image(n)]
    if with_split and not any(i.split == "test" for i in items):
        raise DataError(f"data.root={path_text!r} has a split column but no test rows; mark some rows test, or drop "
                        "the column to have the rows split by data.split")
    return Listing(path.resolve(), "csv", "csv+split" if with_split else "csv", classes, items, skipped)
