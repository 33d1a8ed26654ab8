"""scripts/gpu_check.sh --dry-run: the GPU check's plan fits its budget and every command line it would run is valid.

No GPU, no network, no .gpu/ files: the dry run only plans, pre-checks each `cifar-cam` line with the CLI's
torch-free check (all in one process) and writes gpu_check.json with every step "planned".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["setup", "env", "bench_quick", "synthetic", "pytest_cuda", "fast2_eager", "fast2_compiled", "fast_seeds",
         "bench_ceiling"]


def dry_run(out: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict[str, Any] | None]:
    """Runs the dry run into `out` with extra environment; returns the process and gpu_check.json (None if absent)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    environment.update(OUT=str(out), GPU_CHECK_PYTHON=sys.executable, **env)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120,
                            env=environment, cwd=out)
    path = out / "gpu_check.json"
    return result, json.loads(path.read_text()) if path.exists() else None


def cifar_cam_lines(doc: dict[str, Any], command: str) -> list[dict[str, Any]]:
    return [v for v in doc["validation"] if v["command"].startswith(f"cifar-cam {command} ")]


def test_dry_run_plans_every_step_within_the_budget_and_every_line_is_valid(tmp_path: Path) -> None:
    result, doc = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert doc["mode"] == "dry-run" and doc["passed"] is True
    assert [s["name"] for s in doc["steps"]] == STEPS
    assert [s["number"] for s in doc["steps"]] == ["0", "1", "2", "3", "4", "5a", "5b", "6", "7"]
    assert {s["status"] for s in doc["steps"]} == {"planned"}
    planned = sum(s["timeout_planned"] for s in doc["steps"])
    assert planned == doc["planned_seconds"] <= doc["budget_seconds"] == 360  # ~6 minutes, room for a rerun
    call = doc["device_call"]
    assert call["carry"] == [".gpu"] and doc["budget_seconds"] + 30 <= call["timeout_s"] <= 600
    assert [s["name"] for s in doc["steps"] if s["flexible"]] == ["fast_seeds", "bench_ceiling"]
    assert all(s["commands"] for s in doc["steps"]), "every step records what it would run"

    checked = [v for v in doc["validation"] if v["command"].startswith("cifar-cam ")]
    assert checked and all(v["ok"] is True for v in checked), [v for v in checked if not v["ok"]]
    trains = cifar_cam_lines(doc, "train")
    assert len(trains) == 7  # muon + fp16 on synthetic data, fast eager + compiled, 3 seeds of fast
    assert all("trainer.device=cuda" in v["command"] and "hydra.run.dir=" in v["command"] for v in trains)
    fast = [v["command"] for v in trains if "experiment=fast" in v["command"]]
    assert all("data=folder" in c and "data.root=" in c and "cifar10-jpg.tar.gz" in c for c in fast)
    assert sum("trainer.compile=false" in c for c in fast) == sum("trainer.compile=true" in c for c in fast) == 1
    assert [m.group(1) for c in fast if (m := re.search(r" seed=(\d+) ", c))] == ["0", "1", "2"]
    assert len(cifar_cam_lines(doc, "eval")) == len(cifar_cam_lines(doc, "gradcam")) == 1
    benches = [v for v in doc["validation"] if "scripts/bench.py" in v["command"]]
    assert len(benches) == 2 and all(v["ok"] is True for v in benches)
    assert "--quick" in benches[0]["command"] and "--batch-size 500" in benches[1]["command"]
    assert list(tmp_path.iterdir()) == [tmp_path / "gpu_check.json"]  # nothing else written there


def test_a_refused_override_fails_the_dry_run_and_names_the_key(tmp_path: Path) -> None:
    result, doc = dry_run(tmp_path, GPU_CHECK_EXTRA="trainer.epochz=3")
    assert result.returncode == 1
    assert doc is not None and doc["passed"] is False and doc["extra_overrides"] == ["trainer.epochz=3"]
    refused = [v for v in doc["validation"] if v["ok"] is False]
    assert refused == cifar_cam_lines(doc, "train")  # the extra overrides go on train lines only
    assert all("unknown config key 'trainer.epochz'" in v["error"] for v in refused)
    assert "trainer.epochz" in result.stderr


def test_a_plan_over_the_budget_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result, doc = dry_run(tmp_path, GPU_CHECK_BUDGET="100")
    assert result.returncode == 1 and doc is None
    assert "exceed the budget" in result.stderr
