"""scripts/gpu_check.sh --dry-run: the GPU check's plan fits its budget and every command line it would run is valid.

No GPU, no network, no .gpu/ files: the dry run only plans, pre-checks each `cifar-cam` line with the CLI's
torch-free check (all in one process) and writes gpu_check.json with every step "planned". Its python half,
scripts/gpu_check_report.py, is also fed a made-up work dir: what a GPU run would leave, read back into figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
REPORT = REPO / "scripts" / "gpu_check_report.py"
STEPS = ["setup", "env", "bench_quick", "synthetic", "pytest_cuda", "fast2_eager", "fast2_compiled", "cpu_quick",
         "fast_seeds", "bench_ceiling"]


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
    assert [s["number"] for s in doc["steps"]] == ["0", "1", "2", "3", "4", "5a", "5b", "5c", "6", "7"]
    assert {s["status"] for s in doc["steps"]} == {"planned"}
    planned = sum(s["timeout_planned"] for s in doc["steps"])
    assert planned == doc["planned_seconds"] <= doc["budget_seconds"] == 400  # ~7 minutes, room for a rerun
    call = doc["device_call"]
    assert call["carry"] == [".gpu"] and doc["budget_seconds"] + 30 <= call["timeout_s"] <= 600
    assert [s["name"] for s in doc["steps"] if s["flexible"]] == ["fast_seeds", "bench_ceiling"]
    assert all(s["commands"] for s in doc["steps"]), "every step records what it would run"

    checked = [v for v in doc["validation"] if v["command"].startswith("cifar-cam ")]
    assert checked and all(v["ok"] is True for v in checked), [v for v in checked if not v["ok"]]
    trains = cifar_cam_lines(doc, "train")
    assert len(trains) == 8  # muon + fp16 on synthetic data, fast eager + compiled, cpu_quick, 3 seeds of fast
    quick = [v["command"] for v in trains if "experiment=cpu_quick" in v["command"]]
    assert len(quick) == 1 and "trainer.time_budget=null" in quick[0] and "cifar10-jpg.tar.gz" in quick[0]
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


# -- scripts/gpu_check_report.py on what a run would leave ----------------------------------------------------------


def load_report() -> ModuleType:
    """scripts/gpu_check_report.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolves the annotations through it
    spec.loader.exec_module(module)
    return module


def fake_train_run(runs: Path, name: str, epoch_seconds: list[float], **summary: Any) -> None:
    """A run dir as `cifar-cam train` leaves it: summary.json and metrics.csv."""
    (runs / name).mkdir(parents=True)
    (runs / name / "summary.json").write_text(json.dumps({"device": "cuda:0", **summary}))
    rows = "".join(f"{i + 1},{s}\n" for i, s in enumerate(epoch_seconds))
    (runs / name / "metrics.csv").write_text("epoch,seconds\n" + rows)


def test_the_report_reads_the_figures_of_a_run_and_fails_a_pass_whose_checks_do_not_hold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = load_report()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    plan = re.findall(r'^    "(\w+\|\w+\|\d+\|(?:fixed|flex)\|.*)"$', SCRIPT.read_text(), re.MULTILINE)
    assert len(plan) == len(STEPS)
    (work / "plan.tsv").write_text("\n".join(plan) + "\n")  # as the driver writes it from PLAN
    runs = work / "runs"
    fake_train_run(runs, "fast2_eager", [9.0, 4.0], test_acc=0.5)
    fake_train_run(runs, "fast2_compiled", [30.0, 2.0], test_acc=0.5, compile_seconds=25.0, recompiles=0)
    fake_train_run(runs, "cpu_quick", [2.0] * 10, test_acc=0.93, wall_seconds=30.0)
    fake_train_run(runs, "fast_seed0", [3.0] * 26, test_acc=0.94, wall_seconds=100.0)
    (runs / "fast_seed1").mkdir()  # cut short by the step's timeout: no summary.json
    (work / "seeds.tsv").write_text("2\tskipped\t40\t100\n0\t0\t101\n")
    for key, value in dict(GC_REPO=REPO, GC_WORK=work, GC_OUT=out, GC_DRY=0, GC_DEVICE="cuda", GC_BUDGET=400,
                           GC_STARTED="now", GC_DEVICE_CALL_TIMEOUT=460).items():
        monkeypatch.setenv(key, str(value))

    for name in ("fast2_eager", "fast2_compiled", "cpu_quick"):
        assert report.main(["finish", name, "pass", "0", "0", "2500000", "35"]) == 0
    assert report.main(["finish", "fast_seeds", "timeout", "124", "0", "1000000", "150"]) == 0
    assert report.main(["finish", "synthetic", "pass", "0", "0", "0", "50"]) == 0  # passed, but left no runs
    assert report.main(["finish", "bench_ceiling", "not_selected", "-1", "0", "0", "0"]) == 0

    doc = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in doc["steps"]}
    assert {k: steps[k]["status"] for k in ("fast2_eager", "fast_seeds", "synthetic", "bench_ceiling", "env")} == {
        "fast2_eager": "pass", "fast_seeds": "timeout", "synthetic": "fail", "bench_ceiling": "not_selected",
        "env": "not_run"}
    assert steps["fast2_eager"]["seconds"] == 2.5 and steps["bench_ceiling"]["rc"] == -1
    assert "the muon run finished on the device" in steps["synthetic"]["figures"]["failed_checks"]
    seeds = steps["fast_seeds"]["figures"]
    assert [(s["seed"], s["rc"], s["finished"]) for s in seeds["seeds"]] == [(0, 0, True), (1, None, False)]
    assert seeds["skipped"] == [{"seed": 2, "seconds_left": 40, "last_seed_seconds": 100}]
    assert seeds["finished"] == 1 and seeds["mean_test_acc"] == 0.94 and seeds["stdev_test_acc"] is None
    assert doc["summary"]["compile_speedup_epoch2"] == 2.0 and doc["summary"]["compile_seconds"] == 25.0
    assert doc["summary"]["cpu_quick_test_acc"] == 0.93 and doc["summary"]["cpu_quick_wall_seconds"] == 30.0
    planned = sum(int(row.split("|")[2]) for row in plan if "|bench_ceiling|" not in row)
    assert doc["passed"] is False and doc["planned_seconds"] == planned  # bench_ceiling's seconds not counted
