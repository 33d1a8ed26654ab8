"""The LR scheduler of a run, built from `cfg.scheduler`, and the one table of what the code knows about each
scheduler class: which constructor argument is the run's length, which twin a time-budgeted run revises, and
which keys a resume may change (training/resume.py). Build and resume both read the table; nothing else guesses
from the `_target_` string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_cam.errors import ConfigError
from cifar_cam.training.budget.lr_schedules import BudgetCosineLR, BudgetOneCycleLR, in_scheduler_steps


@dataclass(frozen=True)
class SchedulerFacts:
    """What the code needs to know about one scheduler class."""

    span: str | None = None           # the constructor argument bound to the run's length: steps, or epochs under
                                      # scheduler.interval=epoch; None: the schedule does not depend on it
    revisable: type | None = None     # the twin a planned run lays over revisable steps (training/budget/)
    resumable: dict[str, str] = field(default_factory=dict)  # scheduler.<key> a resume may change -> the attribute
                                      # of the restored scheduler that holds it
    cycles_momentum: bool = False     # owns the optimizer's momentum while `cycle_momentum` is on


SCHEDULERS: dict[str, SchedulerFacts] = {
    "OneCycleLR": SchedulerFacts(span="total_steps", revisable=BudgetOneCycleLR, cycles_momentum=True),
    "CosineAnnealingLR": SchedulerFacts(span="T_max", revisable=BudgetCosineLR, resumable={"eta_min": "eta_min"}),
    "ReduceLROnPlateau": SchedulerFacts(resumable={"factor": "factor", "patience": "patience",
                                                   "threshold": "threshold", "threshold_mode": "threshold_mode",
                                                   "cooldown": "cooldown", "min_lr": "min_lrs"}),
}
UNKNOWN = SchedulerFacts()


def facts(scheduler_cfg: Any) -> SchedulerFacts:
    """The facts of `scheduler_cfg`'s scheduler class (a config node or dict with `_target_`); none known: UNKNOWN."""
    target = scheduler_cfg.get("_target_") if scheduler_cfg is not None else None
    return SCHEDULERS.get(str(target).rsplit(".", 1)[-1], UNKNOWN) if target else UNKNOWN


def scheduler_name(scheduler_cfg: Any) -> str:
    """The scheduler's class name, for messages ('OneCycleLR')."""
    return str(scheduler_cfg.get("_target_")).rsplit(".", 1)[-1]


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    revisions: list[list[int]] | None = None) -> tuple[Any | None, str]:
    """The configured LR scheduler (or None) and whether it steps per 'epoch' or per 'step'.

    `revisions` (a plan's [at_step, total_steps] pairs): a scheduler with a revisable twin (OneCycle, cosine)
    becomes it, laid over the plan's steps and re-plans; other schedulers are left as they are.
    """
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    interval = sched_cfg.pop("interval", "epoch")
    if sched_cfg.get("_target_") is None:
        return None, interval
    known = facts(sched_cfg)
    if revisions is not None and known.revisable is not None:
        sched_cfg["_target_"] = f"{known.revisable.__module__}.{known.revisable.__qualname__}"
        sched_cfg["revisions"] = in_scheduler_steps(revisions, interval, steps_per_epoch)
    if known.span is not None:  # in the scheduler's own steps: batches, or epochs under interval=epoch
        sched_cfg[known.span] = total = epochs * (steps_per_epoch if interval == "step" else 1)
        if known.span == "total_steps":
            warmup = sched_cfg.get("pct_start", 0.3) * total
            if warmup < 2 or total - warmup < 2:  # torch divides by a phase's length
                raise ConfigError(f"scheduler=onecycle needs >= 2 steps in each phase, but trainer.epochs={epochs} x "
                                  f"{steps_per_epoch} batches = {total} steps with pct_start="
                                  f"{sched_cfg.get('pct_start')}; train longer, lower data.batch_size, or use "
                                  "scheduler=cosine")
    return instantiate(sched_cfg)(optimizer), interval
