"""The data cache: where it is, `cifar-cam cache [--clear]`, and load_folder's log lines about it."""

from __future__ import annotations

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


def _fill(cache: Path) -> dict[str, Path]:
    """Two cache files, a partial write, and files that are not ours (one looks close)."""
    return {
        "a": _fake(cache, f"folder-{FP}-32.npz", 1_500_000),
        "b": _fake(cache, f"folder-{FP}-48.npz", 2_000_000),
        "tmp": _fake(cache, f".folder-{FP}-32.npz.k3j_x9.tmp.npz", 250_000),
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


def test_listing_shows_each_entry_size_and_total(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _fill(cache)
    assert cache_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # three entries and the total
    assert "1.5 MB" in lines[0] and lines[0].endswith(files["a"].name)
    assert "2.0 MB" in lines[1] and lines[1].endswith(files["b"].name)
    assert "0.2 MB" in lines[2] and files["tmp"].name in lines[2] and "partial" in lines[2]
    assert "3.8 MB" in lines[3] and "total, 3 files" in lines[3] and str(cache) in lines[3]
    assert "notes.txt" not in "\n".join(lines) and "folder-backup" not in "\n".join(lines)
    assert all(p.exists() for p in files.values())  # listing touches nothing


def test_clear_removes_exactly_our_entries(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _fill(cache)
    assert cache_main(["--clear"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"removed {files['a']} (1.5 MB)", f"removed {files['b']} (2.0 MB)",
                         f"removed {files['tmp']} (0.2 MB)"]
    assert lines[3] == f"removed 3 files, 3.8 MB, from {cache}" and len(lines) == 4
    assert not files["a"].exists() and not files["b"].exists() and not files["tmp"].exists()
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

    monkeypatch.setattr(Path, "unlink", refuse)
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


def test_load_folder_logs_the_cache_file_and_its_size(cache: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from cifar_cam.data.sources import load_folder

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            cv2.imwrite(str(root / split / c / "0.png"), np.full((8, 8, 3), 100, np.uint8))
    with caplog.at_level(logging.INFO, logger="cifar_cam.data"):
        load_folder(str(root), image_size=8)
    [written] = entries()
    size = f"{written.size / 1e6:.1f} MB"
    assert f"cached as {written.path}, {size}; `cifar-cam cache` lists" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cifar_cam.data"):
        load_folder(str(root), image_size=8)
    assert f"data: {root} (cached arrays {written.path}, {size})" in caplog.text
