"""`cifar-cam train`: the config -> a Run (training/run.py) -> its epochs (training/loop.py) -> the run dir's files.

checkpoints/last.pt and best.pt, metrics.csv, curves.png, summary.json (and plan.json for a planned run).
SIGINT / SIGTERM stop it cleanly and a stall ends it (training/supervise.py); `ckpt=` resumes a run exactly
where it stopped (training/resume.py says what may change).
"""

from __future__ import annotations

import dataclasses
import time

from omegaconf import DictConfig

from cifar_cam.errors import TrainingInterrupted
from cifar_cam.provenance import command_started
from cifar_cam.tasks.common import (
    cli_overrides,
    group_choices,
    load_data,
    run_dir,
    setup_runtime,
    with_absolute_root,
    write_split_csv,
)
from cifar_cam.training import distributed
from cifar_cam.training.budget.probe import fixed_plan, make_plan, wants_plan
from cifar_cam.training.checkpoint import load_with_config
from cifar_cam.training.loop import final_test, tracked_params, train_epochs
from cifar_cam.training.resume import check_resume
from cifar_cam.training.run import RunState, build_run, restore, warm_up, with_plan
from cifar_cam.training.supervise import Supervisor
from cifar_cam.training.trackers import Trackers


def train(cfg: DictConfig) -> float:
    """Trains, checkpointing every trainer.checkpoint_every epochs; evaluates the best checkpoint on test.
    Returns the best val accuracy (what a sweeper maximizes)."""
    started = command_started() or time.monotonic()  # the CLI's start (before torch loaded), else now
    out = run_dir()
    t = cfg.trainer
    with Supervisor("train", stall_timeout=t.get("stall_timeout", "auto"), stop_grace=t.get("stop_grace", 30),
                    log_file=out / "train.log") as sup:
        resume, cfg = load_with_config(cfg, "train", cli_overrides())
        if resume is not None:
            check_resume(cfg, resume)
        device = setup_runtime(cfg)
        # [ddp] under torchrun or in a multi-task SLURM job: join the ranks, each on its own GPU; alone: rank 0 of 1
        world, device = distributed.setup(cfg.trainer.get("strategy", "auto"), device)
        mode = wants_plan(cfg, resume)  # trainer.time_budget / trainer.plan / a planned run resumed
        splits = load_data(cfg, resume, out if world.is_main else None)  # a resume: the run's own split
        cfg = with_absolute_root(cfg, splits)
        if world.is_main:
            write_split_csv(out, splits)
        run = build_run(cfg, out, splits, device, world, resume, sup, started=started, plan_mode=mode,
                        overrides=tuple(cli_overrides()), choices=group_choices())
        state = RunState()
        if mode == "budget":  # compiled first, so the probe times the compiled step and the budget counts it
            state.compile_seconds = warm_up(run, state, sup)
            run = with_plan(run, state, make_plan(run, state, sup))
        elif mode is not None:
            run = with_plan(run, state, fixed_plan(run, resume, mode))
        if resume is not None:
            restore(run, state, resume)
            sup.last_checkpoint = f"{run.ckpt_dir / 'last.pt'} (epoch {state.epoch})"
        sup.resume_hint = run.resume_hint
        # [ddp] rank 0 alone tracks; a resume continues the trackers' runs from the checkpoint's state
        trackers = Trackers.open(run.cfg.get("logger") if world.is_main else None, out,
                                 None if resume is None else resume.get("logger"), run_name=out.name)
        run = dataclasses.replace(run, trackers=trackers)
        trackers.log_params(tracked_params(run, state))
        status = "FAILED"
        try:
            if mode != "budget":
                state.compile_seconds = warm_up(run, state, sup)
            stopped_early = train_epochs(run, state, sup)
            if world.is_main:  # [ddp] rank 0 alone tests the best checkpoint and writes summary.json
                final_test(run, state, stopped_early, sup)
            status = "FINISHED"
        except TrainingInterrupted:
            status = "KILLED"
            raise
        finally:
            trackers.close(status)
        return float(state.best_val_acc)
