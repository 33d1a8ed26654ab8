"""scripts/bench.py --quick: every path of the benchmark runs and the JSON holds the numbers it printed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from cifar_cam.training.device import precision_name, resolve_precision
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
    runs = data["runs"]
    assert {k: len(v) for k, v in runs.items()} == {  # --repeat 2 by default: two rounds
        "ceiling": 2, "cifar_cam_albumentations": 2, "cifar_cam_torch": 2, "reference": 2}
    assert data["reference_img_s"] == max(runs["reference"]) and data["ceiling_img_s"] == max(runs["ceiling"])
    for backend, img_s in data["cifar_cam_img_s"].items():
        mine = runs[f"cifar_cam_{backend}"]
        assert img_s == max(mine) > 0
        # ratios pair the rounds: the mean of two within-round ratios, not best / best
        assert data["ratio_to_ceiling"][backend] == pytest.approx(
            (mine[0] / runs["ceiling"][0] + mine[1] / runs["ceiling"][1]) / 2)
        assert data["ratio_to_reference"][backend] == pytest.approx(
            (mine[0] / runs["reference"][0] + mine[1] / runs["reference"][1]) / 2)
        assert f"aug.backend={backend}: b/a = {data['ratio_to_ceiling'][backend]:.3f}" in result.stdout
    s = data["settings"]
    assert (s["width"], s["batch_size"], s["images"], s["compile"], s["quick"]) == (8, 32, 128, False, True)
    assert s["device"] == "cpu" and s["num_params"] == 176_402 and data["date"] and "--quick" in data["command"]
    assert s["precision"] == precision_name(resolve_precision("auto", torch.device("cpu")))  # bf16 only with AMX


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_alternate_their_order_and_ratios_pair_within_a_round() -> None:
    bench = load_bench()
    order: list[str] = []

    def part(name: str, images: int) -> Callable[[], int]:
        def run() -> int:
            order.append(name)
            return images
        return run

    runs = bench.interleaved({"a": part("a", 10), "b": part("b", 20), "c": part("c", 30)}, torch.device("cpu"), 3)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in runs.items()} == {"a": 3, "b": 3, "c": 3} and min(runs["a"]) > 0
    # A machine twice as fast in round 2: best/best would say 2.0, the paired median says 1.0.
    assert bench.paired_ratio([10.0, 20.0, 10.0], [10.0, 10.0, 10.0]) == 1.0
    assert bench.paired_ratio([9.0, 20.0], [10.0, 20.0]) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0], [1.0, 2.0])


def test_bench_refuses_bad_arguments(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--backends", "jax"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "--backends: 'jax' is not one of" in result.stderr


def test_bench_models_prints_each_models_size_and_speed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/bench_models.py --quick in process: a table row per chosen model, its JSON the same numbers."""
    spec = importlib.util.spec_from_file_location("bench_models", REPO / "scripts" / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "models.json"
    assert module.main(["--quick", "--models", "airbench", "resnet9", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == {"airbench", "resnet9"}
    assert data["airbench"]["params"] == 1_972_792 and data["resnet9"]["params"] == 6_573_120
    assert 0.2 < data["airbench"]["gflops"] < 0.3 and all(r["img_s"] > 0 for r in data.values())
    assert "| airbench | 1.97M | 0.24 |" in printed and "| resnet9 | 6.57M | 0.76 |" in printed
    with pytest.raises(SystemExit):
        module.main(["--models", "vgg"])
