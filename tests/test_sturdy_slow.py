"""`make test-full` only: the cases the sturdier-core issue was found with, at full count."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

SMALL = ["data=synthetic", "data.subset=32", "data.val_size=8", "trainer.epochs=1"]


@pytest.mark.slow
def test_eight_concurrent_width_4_runs_five_times_leave_40_summaries(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CIFAR_CAM_CACHE": str(tmp_path / ".cache")}
    for _ in range(5):
        procs = [subprocess.Popen([sys.executable, "-m", "cifar_cam", "train", *SMALL, "model.width=4"], cwd=tmp_path,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(8)]
        for p in procs:
            _, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-2000:]
    assert len(list((tmp_path / "outputs" / "train").glob("*/summary.json"))) == 40


@pytest.mark.slow
@pytest.mark.parametrize("width", range(1, 8))
def test_narrow_widths_train_on_cpu(width: int, tmp_path: Path) -> None:
    result = run_cli("train", *SMALL, f"model.width={width}", "trainer.channels_last=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training in NCHW" in result.stdout + result.stderr


@pytest.mark.slow
def test_timeout_ends_a_long_run_within_the_grace(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(["timeout", "20", sys.executable, "-m", "cifar_cam", "train", "data=synthetic",
                             "data.train_size=2000", "model.width=16", "trainer.epochs=100"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 124 and took < 20 + 30 + 5, (result.returncode, took)
    assert "SIGTERM" in result.stderr
