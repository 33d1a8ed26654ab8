"""cifar_cam.io: every file is written atomically; a failed write leaves the old file and no temp file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cifar_cam.io import atomic_path, write_csv, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = write_json(tmp_path / "summary.json", {"test_acc": 0.9})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})  # not serializable: fails before any byte is written
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"test_acc": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_files_get_the_usual_mode_and_csv_cells(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "metrics.csv", [{"epoch": 1, "val_acc": None}], ("epoch", "val_acc"))
    assert path.read_text().splitlines() == ["epoch,val_acc", "1,"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_png_that_fails_mid_savefig_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from cifar_cam import viz

    rows = [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.2, "val_loss": 2.1, "val_acc": 0.2, "lr": 0.1}]
    target = viz.plot_curves(rows, tmp_path / "curves.png")
    good = target.read_bytes()

    def torn_savefig(self: Figure, fname: str | Path, **kwargs: object) -> None:
        Path(fname).write_bytes(good[:100])  # a disk that fills up after the header
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", torn_savefig)
    with pytest.raises(OSError):
        viz.plot_curves(rows, target)
    assert target.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_a_checkpoint_temp_file_is_what_the_stale_cleanup_finds(tmp_path: Path) -> None:
    from cifar_cam.training.checkpoint import remove_stale_temp_files

    with atomic_path(tmp_path / "last.pt") as tmp:
        assert tmp.parent == tmp_path and tmp.match(".*.pt.*.tmp")  # a kill here leaves it for the next run
        tmp.write_bytes(b"weights")
    assert remove_stale_temp_files(tmp_path) == [] and (tmp_path / "last.pt").read_bytes() == b"weights"
