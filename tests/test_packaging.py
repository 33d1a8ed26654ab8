"""A plain (non-editable) wheel carries the configs, so `cifar-cam` works from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_wheel_ships_every_config(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(REPO), "-w", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("cifar_cam-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"cifar_cam/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
    assert "cifar_cam/cli.py" in names
    page = {f"cifar_cam/serve/static/{p.name}" for p in (REPO / "src" / "cifar_cam" / "serve" / "static").iterdir()}
    assert {"cifar_cam/serve/app.py", "cifar_cam/serve/static/index.html"} | page <= names


def test_config_dir_holds_the_main_configs() -> None:
    from cifar_cam.cli import COMMANDS
    from cifar_cam.io import config_dir

    for name, _, _ in COMMANDS.values():
        assert (Path(config_dir()) / f"{name}.yaml").is_file(), name
