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
