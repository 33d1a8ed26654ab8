"""The data cache: where it is, `cifar-cam cache [--clear]`, and the log lines of a data set decoded into it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cifar_cam.data.cache import cache_dir, entries
from cifar_cam.tasks.cache import CACHE_HELP, cache_main

FP = "0123456789abcdef"
KEY = "0123456789abcdef0123"


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache dir under XDG_CACHE_HOME (conftest's CIFAR_CAM_CACHE, which wins over it, removed)."""
    monkeypatch.delenv("CIFAR_CAM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "cifar-cam"


def _fake(directory: Path, name: str, size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"\0" * size)
    return path


def _entry(cache: Path, key: str, size: int, split: str = "train", count: int = 45000) -> Path:
    """A cache entry folder as data/files.py writes one: images.npy (faked by its size) and meta.json."""
    folder = cache / f"split-{key}"
    _fake(folder, "images.npy", size)
    meta = {"format": 1, "root": "/data/cifar10-jpg.tar.gz", "split": split, "count": count,
            "fit": {"size": [32, 32], "policy": "stretch", "fill": [114, 114, 114]}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _fill(cache: Path) -> dict[str, Path]:
    """Two entries, a partial write, an old-format file, and things that are not ours (one looks close)."""
    return {
        "a": _entry(cache, KEY, 1_500_000 - 200),
        "b": _entry(cache, "1" + KEY[1:], 2_000_000 - 200, split="test", count=10000),
        "tmp": _fake(cache / f".split-{KEY}.tmp-k3j_x9", "images.npy", 250_000).parent,
        "old": _fake(cache, f"folder-{FP}-32.npz", 100_000),
        "foreign": _fake(cache, "notes.txt", 10),
        "lookalike": _fake(cache, "folder-backup.npz", 10),
    }


def test_cache_dir_follows_xdg_and_the_override(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    assert cache_dir() == cache
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cifar-cam"
    monkeypatch.setenv("CIFAR_CAM_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_module_does_not_import_torch() -> None:
    code = "import sys, cifar_cam.tasks.cache; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_listing_shows_each_entry_its_data_root_split_count_and_size(cache: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    files = _fill(cache)
    assert cache_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5  # four entries and the total
    size = (files["a"] / "images.npy").stat().st_size + (files["a"] / "meta.json").stat().st_size
    assert f"{size / 1e6:.1f} MB" in lines[0] and files["a"].name in lines[0]
    assert lines[0].endswith("train of /data/cifar10-jpg.tar.gz, 45,000 images at 32x32 (stretch)")
    assert lines[1].endswith("test of /data/cifar10-jpg.tar.gz, 10,000 images at 32x32 (stretch)")
    assert "an old-format entry (.npz)" in lines[2] and files["old"].name in lines[2]
    assert "0.2 MB" in lines[3] and files["tmp"].name in lines[3] and "partial" in lines[3]
    assert "total, 4 entries" in lines[4] and str(cache) in lines[4]
    assert "notes.txt" not in "\n".join(lines) and "folder-backup" not in "\n".join(lines)
    assert all(p.exists() for p in files.values())  # listing touches nothing


def test_clear_removes_exactly_our_entries(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _fill(cache)
    assert cache_main(["--clear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines[:4]] == [
        f"removed {files['a']}", f"removed {files['b']}", f"removed {files['old']}", f"removed {files['tmp']}"]
    assert lines[4].startswith("removed 4 entries, 3.8 MB, from ") and len(lines) == 5
    assert not any(files[k].exists() for k in ("a", "b", "tmp", "old"))
    assert files["foreign"].exists() and files["lookalike"].exists()
    assert entries() == []
    assert cache_main([]) == 0 and "empty" in capsys.readouterr().out


def test_missing_dir_is_one_line_saying_where(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cache_main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "empty" in out[0] and str(cache) in out[0]
    assert cache_main(["--clear"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "nothing to remove" in out[0] and str(cache) in out[0]
    assert not cache.exists()  # neither command creates the dir


def test_errors_are_one_line_and_exit_1(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the dir should be")
    assert cache_main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("cifar-cam cache: error: ")
    assert len(captured.err.splitlines()) == 1 and str(cache) in captured.err


def test_clear_without_permission_is_an_error(cache: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    kept = _fake(cache, f"folder-{FP}-32.npz", 100)

    def refuse(self: Path, missing_ok: bool = False) -> None:  # as a read-only dir does (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)  # (an old-format entry is a file: removed with Path.unlink)
    assert cache_main(["--clear"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"cifar-cam cache: error: cannot remove {kept}: Permission denied\n"
    assert kept.exists() and "removed" not in captured.out


def test_help_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cache_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cifar-cam cache") and "--clear" in out
    assert cache_main(["--nope"]) == 2
    assert "cifar-cam cache: error:" in capsys.readouterr().err
    assert "\n" not in CACHE_HELP and "--clear" in CACHE_HELP


def test_a_decoded_data_set_is_logged_cached_and_listed(cache: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_cam.data.decode import Fit
    from cifar_cam.data.sources import DataSpec, build_splits

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            cv2.imwrite(str(root / split / c / "0.png"), np.full((8, 8, 3), 100, np.uint8))
    spec = DataSpec("folder", str(root), val_size=0, fit=Fit.of(8))
    with caplog.at_level(logging.INFO, logger="cifar_cam.data"):
        build_splits(spec)
    assert "decoding 4 images of" in caplog.text and "once: later runs read the cache" in caplog.text
    assert len(entries()) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cifar_cam.data"):
        build_splits(spec)
    assert "decoding" not in caplog.text  # read from the cache
    assert cache_main([]) == 0
    listed = capsys.readouterr().out
    assert f"train of {root}, 2 images at 8x8 (stretch)" in listed and f"test of {root}, 2 images" in listed
