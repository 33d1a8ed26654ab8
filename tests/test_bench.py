"""scripts/bench.py --quick: every path of the benchmark runs and the JSON holds the numbers it printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BENCH = REPO / "scripts" / "bench.py"


def test_quick_bench_writes_every_number(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "result.json"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["ceiling_img_s"] > 0 and data["reference_img_s"] > 0
    assert set(data["cifar_cam_img_s"]) == {"albumentations", "torch"}
    for backend, img_s in data["cifar_cam_img_s"].items():
        assert img_s > 0
        assert data["ratio_to_ceiling"][backend] == pytest.approx(img_s / data["ceiling_img_s"])
        assert data["ratio_to_reference"][backend] == pytest.approx(img_s / data["reference_img_s"])
        assert f"aug.backend={backend}: b/a = {data['ratio_to_ceiling'][backend]:.3f}" in result.stdout
    assert {k: len(v) for k, v in data["runs"].items()} == {
        "ceiling": 1, "cifar_cam_albumentations": 1, "cifar_cam_torch": 1, "reference": 1}
    assert data["runs"]["reference"] == [data["reference_img_s"]]
    s = data["settings"]
    assert (s["width"], s["batch_size"], s["images"], s["compile"], s["quick"]) == (8, 32, 128, False, True)
    assert s["device"] == "cpu" and s["num_params"] == 176_402 and data["date"] and "--quick" in data["command"]


def test_bench_refuses_bad_arguments(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--backends", "jax"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "--backends: 'jax' is not one of" in result.stderr
