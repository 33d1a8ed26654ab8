"""trainer.time_budget and trainer.plan through the trainer: within budget, a plan replays, a resume is exact.

The planner and the revisable LR schedules on stubbed times are tests/test_budget.py's.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest

from cifar_cam.config.validate import validate
from cifar_cam.errors import ConfigError
from cifar_cam.training.budget import planner as budget
from cifar_cam.training.budget.planner import Plan, RunFacts
from conftest import compose_cfg
from test_resume import ENV, WAIT, start_hooked, wait_for

# 400 synthetic images in batches of 32: 13 steps an epoch; the shape: a quarter of the epochs at 16 px,
# a quarter at 24, the rest at 32
BUDGETED = ["data=synthetic", "data.train_size=400", "data.val_size=0", "data.test_size=128", "data.batch_size=32",
            "model.width=8", "eval.batch_size=128", "scheduler=onecycle", "trainer.epochs=4",
            "trainer.progressive_resize=[16,24]", "trainer.num_threads=1"]


def rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv without its timing column."""
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_budgeted_run_ends_within_its_budget_and_its_plan_replays_to_the_same_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cam.tasks.train import train

    monkeypatch.setattr(budget, "RESERVE_MIN_SECONDS", 3.0)  # a short budget for a test (the default is 10 s)
    run = tmp_path / "budgeted"
    train(compose_cfg("train", [*BUDGETED, "trainer.time_budget=10s"], run_dir=run))
    summary = json.loads((run / "summary.json").read_text())
    plan = Plan.load(run / "plan.json")
    # the stated margin: the whole command within the budget, plus at most what a 1.5x slowdown in the last epoch
    # could add (plan.overrun_bound(); 0 when the reserve covers it)
    assert summary["wall_seconds"] <= 10 + plan.overrun_bound(), (summary["wall_seconds"], plan.to_dict())
    assert summary["time_budget_seconds"] == 10 and summary["planned_epochs"] == plan.epochs == len(rows(run))
    assert plan.epochs >= 2 and plan.sizes[-1] == 32 and plan.sizes == sorted(plan.sizes)
    assert plan.total_steps == plan.epochs * 13 and plan.revisions[-1][1] == plan.total_steps
    assert float(rows(run)[-1]["lr"]) < 1e-4  # the schedule reached its floor at the planned end
    # the plan is the run's state, not an edit of its config: the checkpoint keeps the config as composed
    from cifar_cam.training.checkpoint import load_checkpoint

    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["config"]["trainer"]["epochs"] == 4 and last["config"]["trainer"]["progressive_resize"] == [16, 24]
    assert last["plan"] == plan.to_dict()

    replay = tmp_path / "replay"
    train(compose_cfg("train", [*BUDGETED, f"trainer.plan={run / 'plan.json'}"], run_dir=replay))
    assert rows(replay) == rows(run)  # bit for bit: the same epochs, sizes and LR at every step
    assert Plan.load(replay / "plan.json").to_dict() == plan.to_dict()
    assert json.loads((replay / "summary.json").read_text())["time_budget_seconds"] is None


def test_more_budget_plans_more_epochs_on_the_same_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import torch

    from cifar_cam.tasks.common import load_data
    from cifar_cam.training import distributed
    from cifar_cam.training.budget import probe
    from cifar_cam.training.run import RunState, build_run
    from cifar_cam.training.supervise import Supervisor

    monkeypatch.setattr(probe, "probe", lambda run, state, sizes, sup: (  # a stub machine: 0.1 s a 32-px step
        {s: 0.1 * (s / 32) ** 2 for s in sizes}, budget.Overhead(0.1, 1.0)))
    plans = []
    for seconds in (60, 120):
        cfg = compose_cfg("train", [*BUDGETED, f"trainer.time_budget={seconds}s"], run_dir=tmp_path / str(seconds))
        with Supervisor("train", stall_timeout=None, stop_grace=30) as sup:
            run = build_run(cfg, tmp_path / str(seconds), load_data(cfg), torch.device("cpu"), distributed.World(),
                            None, sup, started=time.monotonic(), plan_mode="budget")
            plans.append(probe.make_plan(run, RunState(), sup))
    assert plans[1].epochs > plans[0].epochs >= 2
    assert plans[0].predicted_seconds <= 60 - budget.reserve_seconds(60)


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.time_budget=0", "trainer.time_budget=0: 0 must be > 0"),
    ("trainer.time_budget=-90", "trainer.time_budget=-90: -90 must be > 0"),
    ("trainer.time_budget=soon", "trainer.time_budget=soon: 'soon' is not a duration"),
])
def test_bad_budgets_are_refused_before_data_loads(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("train", [*BUDGETED, override]), "train")


def test_a_budget_too_small_for_one_epoch_says_what_would_fit(tmp_path: Path) -> None:
    from cifar_cam.tasks.train import train

    with pytest.raises(ConfigError, match=r"trainer.time_budget=1s is too small: .* need trainer.time_budget >= "):
        train(compose_cfg("train", [*BUDGETED, "trainer.time_budget=1s"], run_dir=tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_a_plan_for_another_run_is_refused(tmp_path: Path) -> None:
    facts = RunFacts(train_images=400, batch_size=64, steps_per_epoch=7, model="resnet18", width=8, image_size=32)
    plan = Plan.create(facts, 60.0, 1.0, {16: 0.01, 24: 0.02, 32: 0.03}, [(16, 1), (24, 1), (32, 2)])
    plan.save(tmp_path / "plan.json")
    from cifar_cam.cli.precheck import check_plan_file

    with pytest.raises(ConfigError, match=r"was made for data.batch_size=64, this run has data.batch_size=32"):
        check_plan_file(compose_cfg("train", [*BUDGETED, f"trainer.plan={tmp_path / 'plan.json'}"]))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        check_plan_file(compose_cfg("train", [*BUDGETED, f"trainer.plan={tmp_path / 'bad.json'}"]))


def test_a_resumed_budgeted_run_continues_its_plan_exactly(tmp_path: Path) -> None:
    """SIGINT mid-epoch 1 of a budgeted run, resume: the same metrics as replaying its plan uninterrupted."""
    from conftest import run_cli

    run, marker = tmp_path / "run", tmp_path / "parked"
    proc = start_hooked(run, [*BUDGETED, "trainer.time_budget=18s", f"hydra.run.dir={run}"],
                        {"CIFAR_CAM_TEST_HOLD_STEP": "3", "CIFAR_CAM_TEST_MARKER": str(marker)}, tmp_path / "log")
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT) == 130
    planned = Plan.load(run / "plan.json")
    resumed = run_cli("train", f"ckpt={run}", cwd=tmp_path, env=ENV, timeout=WAIT)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing the run's plan" in resumed.stdout
    assert Plan.load(run / "plan.json").to_dict() == planned.to_dict()  # no re-plan after a resume
    replay = run_cli("train", *BUDGETED, f"trainer.plan={run / 'plan.json'}", f"hydra.run.dir={tmp_path / 'replay'}",
                     cwd=tmp_path, env=ENV, timeout=WAIT)
    assert replay.returncode == 0, replay.stderr
    assert rows(run) == rows(tmp_path / "replay") and len(rows(run)) == planned.epochs


def test_a_planned_runs_epochs_and_sizes_are_not_tracked_as_params() -> None:
    """Re-plans change them as the run goes: as params MLflow would report them as changed by the user."""
    from types import SimpleNamespace

    from cifar_cam.training.loop import tracked_params

    cfg = compose_cfg("train", [*BUDGETED, "trainer.time_budget=60s"])
    run = SimpleNamespace(cfg=cfg)
    planned = tracked_params(run, SimpleNamespace(plan=object()))  # type: ignore[arg-type]
    assert "epochs" not in planned["trainer"] and "progressive_resize" not in planned["trainer"]
    assert planned["trainer"]["time_budget"] == "60s"
    unplanned = tracked_params(run, SimpleNamespace(plan=None))  # type: ignore[arg-type]
    assert unplanned["trainer"]["epochs"] == 4
