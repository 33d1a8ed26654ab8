"""`cifar-cam train`: data, model, optimizer, scheduler -> engine epochs -> checkpoints, metrics, curves.

Read top to bottom: build_run, restore (a resume), train_epochs -> run_epoch + end_of_epoch, final_test.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from cifar_cam import distributed, viz
from cifar_cam.augment import MixedBatches, ResizedBatches, build_train_batches, epoch_image_size
from cifar_cam.checkpoint import (
    copy_checkpoint,
    detached_copy,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cifar_cam.checkpoint_config import apply_resume_changes, load_with_config, resume_changes, scheduler_span
from cifar_cam.data import EvalBatches, resolve_num_workers
from cifar_cam.ema import WeightEma
from cifar_cam.engine import (
    EpochTotals,
    autocast,
    evaluate,
    input_memory_format,
    precision_name,
    resolve_precision,
    train_one_epoch,
)
from cifar_cam.errors import ConfigError, DivergenceError
from cifar_cam.io import write_csv
from cifar_cam.loggers import Trackers
from cifar_cam.logs import Bars
from cifar_cam.models import build_model
from cifar_cam.provenance import command_started
from cifar_cam.supervise import Supervisor, TrainingInterrupted
from cifar_cam.tasks.common import (
    check_classes,
    cli_overrides,
    group_choices,
    load_data,
    memory_format_for,
    percent,
    plain,
    run_dir,
    setup_runtime,
    write_json,
)
from cifar_cam.tasks.train_budget import apply_plan, fixed_plan, make_plan, replan_after, wants_plan

log = logging.getLogger("cifar_cam.train")

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


@dataclass
class TrainState:
    """Everything besides the weights that resume needs to continue exactly."""

    epoch: int = 0                      # completed epochs
    best_val_acc: float = -1.0          # of the monitored metric (val_acc, or train_acc without val)
    best_epoch: int = 0
    bad_epochs: int = 0                 # epochs since the last improvement (early stopping)
    history: list[dict[str, float]] = field(default_factory=list)
    partial: dict[str, Any] | None = None   # EpochTotals of an epoch a signal cut short
    train_images: int = 0               # over every session of the run (summary's images_per_second)
    train_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved."""
        return cls(payload["epoch"], payload["best_val_acc"], payload["best_epoch"], payload["bad_epochs"],
                   list(payload["history"]), payload.get("partial"), payload.get("train_images", 0),
                   payload.get("train_seconds", 0.0))


# A planned run's (trainer.time_budget / trainer.plan) schedulers: the same shapes over revisable lengths
REVISABLE = {"OneCycleLR": "cifar_cam.budget_schedule.BudgetOneCycleLR",
             "CosineAnnealingLR": "cifar_cam.budget_schedule.BudgetCosineLR"}


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                    revisions: list[list[int]] | None = None) -> tuple[Any | None, str]:
    """The configured LR scheduler (or None) and whether it steps per 'epoch' or per 'step'.

    `revisions` (a plan's [at_step, total_steps] pairs): OneCycle and cosine become their revisable twins
    (cifar_cam.budget_schedule), laid over the plan's steps and re-plans; other schedulers are left as they are.
    """
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    interval = sched_cfg.pop("interval", "epoch")
    if sched_cfg.get("_target_") is None:
        return None, interval
    span = scheduler_span(sched_cfg)  # the argument bound to the run's length (SCHEDULER_SPAN)
    if revisions is not None and span is not None:
        from cifar_cam.budget_schedule import in_scheduler_steps

        sched_cfg["_target_"] = REVISABLE[str(sched_cfg["_target_"]).rsplit(".", 1)[-1]]
        sched_cfg["revisions"] = in_scheduler_steps(revisions, interval, steps_per_epoch)
    if span == "total_steps":  # in the scheduler's own steps: batches, or epochs under interval=epoch
        sched_cfg["total_steps"] = total = epochs * (steps_per_epoch if interval == "step" else 1)
        warmup = sched_cfg.get("pct_start", 0.3) * total
        if warmup < 2 or total - warmup < 2:  # torch divides by a phase's length
            raise ConfigError(f"scheduler=onecycle needs >= 2 steps in each phase, but trainer.epochs={epochs} x "
                              f"{steps_per_epoch} batches = {total} steps with pct_start={sched_cfg.get('pct_start')}; "
                              "train longer, lower data.batch_size, or use scheduler=cosine")
    elif span is not None:
        sched_cfg[span] = epochs * (steps_per_epoch if interval == "step" else 1)
    return instantiate(sched_cfg)(optimizer), interval


@dataclass
class Run:
    """What one training run holds: built once (build_run), restored on resume, saved in every checkpoint."""

    cfg: DictConfig
    out: Path
    device: torch.device
    world: Any
    splits: Any
    model: nn.Module                 # the plain module: checkpoints, evaluation (no _orig_mod. prefix)
    train_model: nn.Module           # what the steps call: compiled and/or DDP-wrapped `model`
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    interval: str                    # the scheduler steps per 'epoch' or per 'step'
    scaler: torch.amp.GradScaler | None
    batches: Any
    val_batches: EvalBatches | None
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    num_params: int
    state: TrainState = field(default_factory=TrainState)
    compile_seconds: float | None = None    # warm_up's, this session
    graphs_after_warm_up: int = 0           # compiled_graphs() after warm_up: more at the end are recompiles
    saved_epoch: int = 0                    # the epoch last.pt holds
    steps_per_epoch: int = 0                # a whole epoch's batches (compile drops a partial last one)
    pending_best: dict[str, Any] | None = None  # best.pt's payload, kept until the next checkpoint write
    ema: WeightEma | None = None            # trainer.ema.decay: the weights' EMA (what is validated and saved)
    trackers: Trackers | None = None        # logger=: TensorBoard / MLflow / steps.csv (rank 0; others: none)
    plan: Any = None                        # budget.Plan: trainer.time_budget / trainer.plan / a planned run resumed
    plan_mode: str | None = None            # budget (a budgeted run's first sitting) | replay | resume | None
    started: float = 0.0                    # time.monotonic() at the command's start (the time budget's clock)
    write_seconds: float = 0.0              # a budgeted run's probe: checkpoint writes + curves.png, per epoch

    def global_step(self, epoch: int, step: int) -> int:
        """Optimizer steps done after `step` steps of `epoch` (1-based): the trackers' x axis."""
        return (epoch - 1) * self.steps_per_epoch + step

    @property
    def eval_model(self) -> nn.Module:
        """What validation, the test and the checkpoint's `model` use: the EMA when there is one, else `model`."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def resume_hint(self) -> str:
        return f"resume with: cifar-cam train ckpt={shlex.quote(str(self.out))}"

    def payload(self, partial: EpochTotals | None = None) -> dict[str, Any]:
        """The checkpoint of this run as it stands (with `partial`: an epoch a signal cut short)."""
        s = self.state
        weights = {"model": self.eval_model.state_dict()}  # what eval, gradcam, predict and export load
        if self.ema is not None:  # the trained weights and the average's progress: a resume continues both
            weights.update(model_raw=self.model.state_dict(), ema_updates=self.ema.updates)
        return {
            **weights, "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": s.epoch, "best_val_acc": s.best_val_acc, "best_epoch": s.best_epoch,
            "bad_epochs": s.bad_epochs, "history": s.history,
            "partial": None if partial is None else partial.to_dict(),
            "rng": rng_state(self.device), "classes": self.splits.classes, "config": plain(self.cfg),
            "overrides": cli_overrides(), "choices": group_choices(), "num_params": self.num_params,
            "train_images": s.train_images, "train_seconds": s.train_seconds,
            "num_threads": torch.get_num_threads(), "steps_per_epoch": self.steps_per_epoch,
            # the trackers' run ids and the records not yet written to them: committed after this checkpoint is
            # written, and again (skipping what they hold) by a resume from it, so each step is logged once
            "logger": None if self.trackers is None else self.trackers.state(),
            "plan": None if self.plan is None else self.plan.to_dict(),  # a resume continues it (plan.json too)
        }

    def already_stopped_early(self) -> bool:
        """Whether the restored run had already stopped early (a resume then only tests again)."""
        patience, s = self.patience, self.state
        return patience is not None and s.epoch > 0 and s.bad_epochs >= patience

    @property
    def patience(self) -> int | None:
        """Early stopping's patience; None (off) without a val split, where nothing is selected."""
        return self.cfg.trainer.early_stopping.patience if self.val_batches is not None else None

    def save(self, name: str, sup: Supervisor, payload: dict[str, Any]) -> None:
        """checkpoints/<name>.pt, atomically; the watchdog counts the write as progress."""
        sup.beat(f"epoch {self.state.epoch}, writing {name}.pt")
        save_checkpoint(payload, self.ckpt_dir / f"{name}.pt")
        sup.beat(f"epoch {self.state.epoch}, {name}.pt written")

    def write_checkpoints(self, sup: Supervisor, partial: EpochTotals | None = None) -> None:
        """last.pt as the run stands (`partial`: an epoch a signal cut short), and best.pt when a better epoch
        came since the last write (trainer.checkpoint_every: it waits in memory until then)."""
        if self.pending_best is not None:
            self.save("best", sup, self.pending_best)
            self.pending_best = None
        self.save("last", sup, self.payload(partial))
        self.saved_epoch = self.state.epoch
        if self.val_batches is None and partial is None:  # no val split: best.pt is the last epoch
            copy_checkpoint(self.ckpt_dir / "last.pt", self.ckpt_dir / "best.pt")
        if self.trackers is not None:  # only what a checkpoint holds reaches the trackers
            self.trackers.commit()
        sup.last_checkpoint = f"{self.ckpt_dir / 'last.pt'} (epoch {self.state.epoch})"


def note_validation_cost(cfg: DictConfig, splits: Any) -> None:
    """One log line when validation takes a large share of each epoch (data.subset with the default val split)."""
    train_images, val_images = len(splits.train), 0 if splits.val is None else len(splits.val)
    # a validation image costs about a third of a training one (a forward pass, no backward)
    if val_images and val_images / 3 >= train_images / 2:
        suggested = max(100, train_images // 10)
        log.info("validation on %d images takes about %.0f%% of each epoch (%d training images): data.val_size=%d "
                 "would make it ~%.0f%% (data.val_size picks the images held out of train for model selection)",
                 val_images, 100 * (val_images / 3) / (train_images + val_images / 3), train_images, suggested,
                 100 * (suggested / 3) / (train_images + suggested / 3))


def note_dropped_batch(train_images: int, batch_size: int, world_size: int) -> None:
    """One log line when trainer.compile drops each epoch's last partial batch, and refuses data with no full one."""
    per_rank = -(-train_images // world_size)
    if per_rank < batch_size:
        raise ConfigError(f"trainer.compile=true trains on full batches only, but {train_images} training images "
                          f"make no full batch of data.batch_size={batch_size}; lower data.batch_size or compile=false")
    if per_rank % batch_size:
        log.info("trainer.compile: each epoch's last partial batch (%d of %d images%s) is dropped, so that the "
                 "compiled model sees one shape; the epoch order is reshuffled, so those images train in other "
                 "epochs", per_rank % batch_size, per_rank, " per rank" if world_size > 1 else "")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(run: Run, sup: Supervisor) -> float | None:
    """Compiles the training step before epoch 1, one forward + backward per training image size on zeros, and
    puts the weights back: compile time stays out of the epochs' seconds. Returns its seconds (None: no compile)."""
    t = run.cfg.trainer
    if not t.compile or run.state.epoch >= t.epochs or run.already_stopped_early():  # nothing left to train
        return None
    full = run.splits.train.images.shape[1]
    schedule = list(t.get("progressive_resize") or [])
    sizes = sorted({epoch_image_size(schedule, e, full) for e in range(run.state.epoch + 1, t.epochs + 1)}
                   | ({full} if run.plan_mode == "budget" else set()))  # a budget may plan full-size epochs
    saved = {k: v.detach().clone() for k, v in run.model.state_dict().items()}  # BatchNorm statistics move too
    started = time.perf_counter()
    run.train_model.train()
    for size in sizes:
        sup.beat(f"compiling the training step for {size}px images")
        images = torch.zeros(run.cfg.data.batch_size, 3, size, size, device=run.device)
        with autocast(run.device, run.amp_dtype):
            logits = run.train_model(images.contiguous(memory_format=input_memory_format(run.model)))
        logits.float().sum().backward()  # the backward graph compiles at its first call
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - started
    run.model.load_state_dict(saved)
    run.optimizer.zero_grad(set_to_none=True)
    run.graphs_after_warm_up = compiled_graphs()
    log.info("compiled the training step in %.1fs (%s px; summary.json: compile_seconds)", seconds,
             ", ".join(map(str, sizes)))
    return seconds


def build_run(cfg: DictConfig, out: Path, resume: dict[str, Any] | None, sup: Supervisor) -> Run:
    """Data, model, batches, optimizer and scheduler as the config says (fresh: restore() loads a resume)."""
    device = setup_runtime(cfg)
    t = cfg.trainer
    # [ddp] under torchrun or in a multi-task SLURM job: join the ranks, each on its own GPU; alone: rank 0 of 1
    world, device = distributed.setup(t.get("strategy", "auto"), device)
    if world.distributed and cfg.optimizer.lr == "auto":
        raise ConfigError("optimizer.lr=auto runs the LR range test, which is single-process: run "
                          "`cifar-cam lr-find` first and pass its optimizer.lr=... to the DDP run")
    splits = load_data(cfg)
    note_validation_cost(cfg, splits)
    if resume is not None:
        check_classes(resume, splits)
    model = build_model(cfg.model.name, num_classes=splits.num_classes, width=cfg.model.width)
    if resume is not None:  # with an EMA, `model` holds the average and `model_raw` the trained weights
        model.load_state_dict(resume.get("model_raw", resume["model"]))
    model.to(device, memory_format=memory_format_for(model, device, t.channels_last))
    ema = None
    ema_cfg = t.get("ema") or {}  # absent in configs of checkpoints from before the key
    if ema_cfg.get("decay") is not None:
        ema = WeightEma(model, ema_cfg["decay"], warmup=ema_cfg.get("warmup", True))
        if resume is not None and "model_raw" in resume:  # a run that had an EMA: continue its average
            ema.load(resume["model"], resume.get("ema_updates", 0))
    # a compiled model gets full batches only: one shape, one graph (the partial batch's images come in other epochs)
    batches = build_train_batches(splits.train, cfg.aug, batch_size=cfg.data.batch_size,
                                  num_workers=resolve_num_workers(cfg.data.num_workers), seed=cfg.seed, device=device,
                                  rank=world.rank, world_size=world.size,  # [ddp] this rank's shard
                                  drop_last=t.compile)
    if t.compile:
        note_dropped_batch(len(splits.train), cfg.data.batch_size, world.size)
    if resume is not None and resume.get("steps_per_epoch") not in (None, len(batches)):
        raise ConfigError(f"trainer.compile={str(t.compile).lower()} makes {len(batches)} steps an epoch, but the run "
                          f"being resumed took {resume['steps_per_epoch']} (a compiled run drops each epoch's last "
                          f"partial batch); resume with trainer.compile={str(not t.compile).lower()}")
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    if cfg.optimizer.lr == "auto":
        from cifar_cam.tasks.lr_find import suggest_lr_for_training

        with open_dict(cfg):
            cfg.optimizer.lr = suggest_lr_for_training(cfg, model, batches, criterion, device, out, sup)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler, interval = build_scheduler(cfg, optimizer, t.epochs, len(batches))
    amp_dtype = resolve_precision(t.precision, device)
    # Evaluation uses the plain `model` (eager): a compiled one would recompile for eval mode and other batch sizes;
    # checkpoints save it too (no _orig_mod. prefix).
    train_model = distributed.wrap(model, device, sync_batchnorm=t.get("sync_batchnorm", False)) \
        if world.distributed else model  # [ddp] gradients all-reduced through DDP
    if t.compile:  # static shapes: a shape it has not seen is a recompile, counted in summary.json
        train_model = torch.compile(train_model, dynamic=False)
    return Run(cfg=cfg, out=out, device=device, world=world, splits=splits, model=model, train_model=train_model,
               steps_per_epoch=len(batches), ema=ema,
               optimizer=optimizer, scheduler=scheduler, interval=interval,
               scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None, batches=batches,
               val_batches=EvalBatches(splits.val, cfg.eval.batch_size, device) if splits.val is not None else None,
               criterion=criterion, amp_dtype=amp_dtype, num_params=sum(p.numel() for p in model.parameters()))


def restore(run: Run, resume: dict[str, Any]) -> None:
    """Optimizer, scheduler, scaler, RNG and loop state from the checkpoint; changed hyperparameters applied."""
    run.optimizer.load_state_dict(resume["optimizer"])
    if run.scheduler is not None and resume.get("scheduler") is not None:
        run.scheduler.load_state_dict(resume["scheduler"])
    if run.scaler is not None and resume.get("scaler") is not None:
        run.scaler.load_state_dict(resume["scaler"])
    set_rng_state(resume["rng"], run.device)
    run.state = TrainState.from_checkpoint(resume)
    if run.world.is_main:  # epochs after the last checkpoint write (trainer.checkpoint_every) are redone
        write_csv(run.out / "metrics.csv", run.state.history, METRIC_FIELDS)
    # load_state_dict brought back the run's hyperparameters: the command line's changes go on top
    apply_resume_changes(resume_changes(resume["config"], run.cfg), run.optimizer, run.scheduler)
    s = run.state
    where = f"at epoch {s.epoch + 1}, step {s.partial['step'] + 1}" if s.partial else f"after epoch {s.epoch}"
    log.info("resuming %s %s", resume["path"], where)
    if resume.get("num_threads", torch.get_num_threads()) != torch.get_num_threads() and run.device.type == "cpu":
        log.warning("the run used %d CPU threads, this process %d: results will differ in the last digits "
                    "from an uninterrupted run (trainer.num_threads=%d for bit-identical ones)",
                    resume["num_threads"], torch.get_num_threads(), resume["num_threads"])


def train(cfg: DictConfig) -> float:
    """Trains, checkpointing every trainer.checkpoint_every epochs; evaluates the best checkpoint on test.
    Returns best val acc.

    SIGINT / SIGTERM stop it cleanly, a stall ends it (Supervisor); `ckpt=` resumes a run exactly where it stopped.
    """
    started = command_started() or time.monotonic()  # the CLI's start (before torch loaded), else now
    out = run_dir()
    t = cfg.trainer
    with Supervisor("train", stall_timeout=t.get("stall_timeout", "auto"), stop_grace=t.get("stop_grace", 30),
                    log_file=out / "train.log") as sup:
        resume, cfg = load_with_config(cfg, "train", cli_overrides())
        run = build_run(cfg, out, resume, sup)
        run.started = started
        run.plan_mode = mode = wants_plan(run, resume)  # trainer.time_budget / trainer.plan / a planned run resumed
        if mode == "budget":  # compiled first, so the probe times the compiled step and the budget counts it
            run.compile_seconds = warm_up(run, sup)
            apply_plan(run, make_plan(run, sup, started))
        elif mode is not None:
            apply_plan(run, fixed_plan(run, resume, mode))
        if resume is not None:
            restore(run, resume)
            sup.last_checkpoint = f"{run.ckpt_dir / 'last.pt'} (epoch {run.state.epoch})"
            run.saved_epoch = run.state.epoch
        sup.resume_hint = run.resume_hint
        # [ddp] rank 0 alone tracks; a resume continues the trackers' runs from the checkpoint's state
        run.trackers = Trackers.open(cfg.get("logger") if run.world.is_main else None, out,
                                     None if resume is None else resume.get("logger"), run_name=out.name)
        run.trackers.log_params(tracked_params(run))
        status = "FAILED"
        try:
            if mode != "budget":
                run.compile_seconds = warm_up(run, sup)
            stopped_early = train_epochs(run, sup)
            if run.world.is_main:  # [ddp] rank 0 alone tests the best checkpoint and writes summary.json
                final_test(run, stopped_early, sup, started)
            status = "FINISHED"
        except TrainingInterrupted:
            status = "KILLED"
            raise
        finally:
            run.trackers.close(status)
        return float(run.state.best_val_acc)


def train_epochs(run: Run, sup: Supervisor) -> bool:
    """The epochs still to run (all of them, or the rest after a resume); returns whether it stopped early."""
    cfg, t, state = run.cfg, run.cfg.trainer, run.state
    for stale in remove_stale_temp_files(run.ckpt_dir) if run.ckpt_dir.is_dir() and run.world.is_main else []:
        log.info("removed %s, the remains of a checkpoint write that was killed", stale.name)
    if t.early_stopping.patience is not None and run.val_batches is None:
        log.info("early stopping is off: it needs a val split (data.val_size > 0); best.pt is the last epoch")
    log.info("model: %s width %d, %s parameters, on %s%s%s", cfg.model.name, cfg.model.width, f"{run.num_params:,}",
             run.device, "" if run.amp_dtype is None else f", {precision_name(run.amp_dtype)} autocast",
             ", compiled" if t.compile else "")
    log.info("run dir: %s", run.out)
    if run.already_stopped_early():
        log.info("the run already stopped early after %d epochs (no val improvement for %d): evaluating its best "
                 "checkpoint on test again", state.epoch, state.bad_epochs)
        return True
    if state.epoch >= t.epochs:
        log.info("the run already finished %d of %d epochs: evaluating its best checkpoint on test again "
                 "(trainer.epochs=N on the command line trains it further)", state.epoch, t.epochs)
    with Bars("epochs", t.epochs, enabled=None if run.world.is_main else False,
              every=t.get("progress_every", 30)) as bars:
        bars.advance_outer(state.epoch)
        sup.armed = True
        epoch = state.epoch + 1
        while epoch <= t.epochs:  # a budgeted run re-plans t.epochs after each epoch
            totals, size = run_epoch(run, epoch, bars, sup)
            if end_of_epoch(run, epoch, totals, size, bars, sup):
                return True
            bars.set_outer_total(t.epochs)
            epoch += 1
    return False


def run_epoch(run: Run, epoch: int, bars: Bars, sup: Supervisor) -> tuple[EpochTotals, int]:
    """One epoch's training steps (from a saved partial epoch after a resume); the totals over all ranks."""
    t, state = run.cfg.trainer, run.state
    partial = EpochTotals(**state.partial) if state.partial else None
    state.partial = None
    done = partial.step if partial else 0
    run.batches.set_epoch(epoch, start_batch=done)
    full_size = run.splits.train.images.shape[1]
    size = epoch_image_size(list(t.get("progressive_resize") or []), epoch, full_size)  # cheap early epochs
    epoch_batches = run.batches if size == full_size else ResizedBatches(run.batches, size)
    if run.cfg.aug.get("mix"):  # MixUp / CutMix on the device, after any resizing; soft targets
        epoch_batches = MixedBatches(epoch_batches, run.cfg.aug, num_classes=run.splits.num_classes,
                                     seed=run.cfg.seed, epoch=epoch, start_batch=done, rank=run.world.rank,
                                     world_size=run.world.size)
    bars.start_inner(f"epoch {epoch}/{t.epochs}", len(run.batches) + done, done,
                     images_per_step=run.cfg.data.batch_size * run.world.size)
    sup.unarmed_message = f"in epoch {epoch}; {run.ckpt_dir / 'last.pt'} keeps what it last saved; {run.resume_hint}"
    log_every = (1 if run.device.type == "cpu" else 50) if t.log_every == "auto" else t.log_every
    seen = [partial.loss_sum, partial.count] if partial else [0.0, 0]  # the trackers' loss: since the last read

    def progress(tot: EpochTotals, total_steps: int) -> None:
        bars.update_inner(tot.step, f"loss {tot.loss:.3f} acc {percent(tot.acc)}")
        if run.trackers is not None and tot.count > seen[1]:
            run.trackers.add_train_loss(run.global_step(epoch, tot.step), epoch,
                                        (tot.loss_sum - seen[0]) / (tot.count - seen[1]))
            seen[:] = [tot.loss_sum, tot.count]
    try:
        result = train_one_epoch(
            run.train_model, epoch_batches, run.optimizer, run.criterion, device=run.device, amp_dtype=run.amp_dtype,
            scaler=run.scaler, step_scheduler=run.scheduler if run.interval == "step" else None, log_every=log_every,
            start=partial, on_progress=progress,
            should_stop=sup.requested, agree=distributed.agreement(run.world, sup),  # [ddp] all stop together
            epoch=epoch,
            heartbeat=lambda step: sup.beat(f"epoch {epoch}, step {step + 1}", step=True),
            grad_clip=t.get("grad_clip"), after_step=None if run.ema is None else lambda: run.ema.update(run.model),
        )
    except DivergenceError as e:  # nothing of this epoch is saved: last.pt and best.pt stay as they were
        kept = (f"{run.ckpt_dir / 'last.pt'} (epoch {run.saved_epoch}) is intact: resume with a lower rate: "
                f"cifar-cam train ckpt={shlex.quote(str(run.out))} optimizer.lr=..."
                if (run.ckpt_dir / "last.pt").is_file() else "nothing was saved")
        raise DivergenceError(f"{e}; {kept}") from None
    totals = distributed.all_reduce_totals(result.totals, partial, run.world)  # [ddp] over all ranks' shards
    # A stop asked during the epoch's last step: the epoch is whole, so end_of_epoch validates, saves and stops
    # (a "partial" checkpoint of a whole epoch would log that epoch's end twice on resume)
    if result.interrupted and totals.step < run.steps_per_epoch:
        if run.world.is_main:
            run.write_checkpoints(sup, partial=totals)
        name = signal.Signals(sup.signum).name  # type: ignore[arg-type]
        raise TrainingInterrupted(f"{name}: stopped at epoch {epoch}, step {totals.step}; saved "
                                  f"{run.ckpt_dir / 'last.pt'}; {run.resume_hint}", sup.signum)  # type: ignore[arg-type]
    state.train_images += totals.count  # totals include the part of the epoch done before a resume
    state.train_seconds += totals.seconds
    return totals, size


def end_of_epoch(run: Run, epoch: int, totals: EpochTotals, size: int, bars: Bars, sup: Supervisor) -> bool:
    """Validation, the scheduler, early stopping, metrics.csv, checkpoints and curves (every
    trainer.checkpoint_every epochs and at the end); True to stop early."""
    t, state = run.cfg.trainer, run.state
    val_started = time.perf_counter()
    val = (evaluate(run.eval_model, run.val_batches, run.splits.num_classes, device=run.device, amp_dtype=run.amp_dtype,
                    heartbeat=lambda: sup.beat(f"epoch {epoch}, validation"))
           if run.val_batches is not None else None)
    monitored = distributed.from_rank0(val.acc if val is not None else totals.acc, run.world)  # [ddp] one decision
    if run.scheduler is not None and run.interval == "epoch":
        if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            run.scheduler.step(monitored)  # without a val split: on train accuracy (a schedule, not a selection)
        else:
            run.scheduler.step()
    # Without a val split best.pt is the last epoch: a best picked on augmented train accuracy is no selection.
    improved = val is None or monitored > state.best_val_acc + t.early_stopping.min_delta
    if improved:
        state.best_val_acc, state.best_epoch, state.bad_epochs = monitored, epoch, 0
    else:
        state.bad_epochs += 1
    state.epoch = epoch
    state.history.append({
        "epoch": epoch, "train_loss": totals.loss, "train_acc": totals.acc,
        "val_loss": None if val is None else val.loss, "val_acc": None if val is None else val.acc,
        "lr": totals.last_lr,  # the LR of the epoch's last step (a scheduler may since have moved on)
        "seconds": round(totals.seconds + time.perf_counter() - val_started, 3),
    })
    if run.trackers is not None:  # buffered: written with the next checkpoint
        row = state.history[-1]
        run.trackers.add_epoch(epoch, run.global_step(epoch, run.steps_per_epoch), {
            **{k: row[k] for k in METRIC_FIELDS if k not in ("epoch", "seconds")},
            "images_per_second": totals.count / totals.seconds if totals.seconds > 0 else None})
    replanned = None
    if run.plan_mode == "budget":  # before the checkpoint: it holds the plan in force, which a resume continues
        replanned = replan_after(run, epoch, totals.step, totals.seconds, run.started)
    patience = run.patience
    stop_early = patience is not None and state.bad_epochs >= patience
    # a signal during the epoch's last steps or validation, on any rank [ddp]: saved below, then the run stops
    agree = distributed.agreement(run.world, sup)
    requested = agree(-1, sup.requested())[1] if agree is not None else sup.requested()
    write_now = epoch % t.get("checkpoint_every", 1) == 0 or epoch == t.epochs or stop_early or requested
    if run.world.is_main:  # [ddp] only rank 0 writes
        write_csv(run.out / "metrics.csv", state.history, METRIC_FIELDS)  # all rows: never torn or doubled
        if improved and val is not None:  # written now, or copied to wait in memory for the next write
            run.pending_best = run.payload() if write_now else detached_copy(run.payload())
        if write_now:
            run.write_checkpoints(sup)
            viz.plot_curves(state.history, run.out / "curves.png")
    row = state.history[-1]
    log.info("epoch %d/%d  train loss %.4f acc %s  val loss %s acc %s  lr %.3g  %.1fs%s%s",
             epoch, t.epochs, row["train_loss"], percent(row["train_acc"]),
             "-" if val is None else f"{val.loss:.4f}", percent(row["val_acc"]), row["lr"], row["seconds"],
             "" if size == run.splits.train.images.shape[1] else f"  ({size}px)",
             "  *best*" if improved and val is not None else "")
    if replanned:
        log.info("%s", replanned)
    bars.advance_outer(epoch, f"best {percent(state.best_val_acc)}" if val is not None else "")
    if requested:  # the signal came during the last steps or validation (later ones: at the next epoch's read)
        name = signal.Signals(sup.signum).name  # type: ignore[arg-type]
        raise TrainingInterrupted(f"{name}: stopped after epoch {epoch}; saved {run.ckpt_dir / 'last.pt'}; "
                                  f"{run.resume_hint}", sup.signum)  # type: ignore[arg-type]
    if stop_early:
        log.info("early stopping: no val improvement > %g for %d epochs", t.early_stopping.min_delta, patience)
        return True
    return False


def track_final(run: Run, test: Any, summary: dict[str, Any]) -> None:
    """The trackers' end of the run: the test confusion matrix and the curves as images, the flattened config
    with the final metrics as hyperparameters (confusion_matrix.png is written for them)."""
    confusion = viz.plot_confusion_matrix(test.confusion.numpy(), run.splits.classes,
                                          run.out / "confusion_matrix.png")
    run.trackers.log_image("confusion_matrix", confusion)  # no step: at the end, replaced by a later evaluation
    if (run.out / "curves.png").is_file():
        run.trackers.log_image("curves", run.out / "curves.png")
    finals = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.trackers.log_final(tracked_params(run), finals)


def tracked_params(run: Run) -> dict[str, Any]:
    """The config as the trackers' hyperparameters. A planned run's epochs and sizes are the plan's, which
    re-plans change (plan.json, and planned_epochs among the final metrics): left out, not a changed param."""
    params = plain(run.cfg)
    if run.plan is not None:
        for key in ("epochs", "progressive_resize"):
            params["trainer"].pop(key, None)
    return params


def final_test(run: Run, stopped_early: bool, sup: Supervisor, started: float) -> None:
    """The test set, touched once, with the best checkpoint; summary.json (`started`: time.monotonic() at the start)."""
    cfg, state = run.cfg, run.state
    sup.armed = False
    sup.unarmed_message = (f"during the final test evaluation; the checkpoints are complete: "
                           f"cifar-cam train ckpt={shlex.quote(str(run.out))} evaluates again")
    run.model.load_state_dict(load_checkpoint(run.ckpt_dir / "best.pt")["model"])
    test_batches = EvalBatches(run.splits.test, cfg.eval.batch_size, run.device)
    test = evaluate(run.model, test_batches, run.splits.num_classes, device=run.device, amp_dtype=run.amp_dtype,
                    tta=cfg.eval.tta, heartbeat=lambda: sup.beat("the final test"))
    has_val = run.val_batches is not None
    summary = {
        "best_epoch": state.best_epoch,
        "best_val_acc": state.best_val_acc if has_val else None,
        "test_acc": test.acc,
        "test_loss": test.loss,
        "epochs_run": len(state.history),
        "stopped_early": stopped_early,
        "train_seconds": round(sum(r["seconds"] for r in state.history), 3),
        "wall_seconds": None,  # set last: the command's start to summary.json written
        "images_per_second": (round(state.train_images / state.train_seconds, 1) if state.train_seconds > 0
                              else None),
        "compile_seconds": None if run.compile_seconds is None else round(run.compile_seconds, 3),
        # graphs compiled after the warm-up: each is a shape the compiled step had not seen (0 is the goal)
        "recompiles": None if run.compile_seconds is None else compiled_graphs() - run.graphs_after_warm_up,
        "tta": cfg.eval.tta,
        "num_params": run.num_params,
        "device": str(run.device),
        "precision": precision_name(run.amp_dtype),  # what trainer.precision (auto: by the hardware) resolved to
        "world_size": run.world.size,  # [ddp] processes that trained; a step saw world_size x data.batch_size images
        "per_class_test_acc": dict(zip(run.splits.classes, test.per_class_acc, strict=True)),
    }
    if run.plan is not None:  # trainer.time_budget / trainer.plan: plan.json holds the whole schedule
        summary.update(time_budget_seconds=run.plan.budget_seconds if run.plan_mode != "replay" else None,
                       planned_epochs=run.plan.epochs, replans=len(run.plan.replans))
    summary["wall_seconds"] = round(time.monotonic() - started, 3)
    write_json(run.out / "summary.json", summary)
    if run.trackers is not None and run.trackers.names:
        track_final(run, test, summary)
    log.info("test accuracy %s (loss %.4f) with the best checkpoint (epoch %d, val %s)%s", percent(test.acc),
             test.loss, state.best_epoch, percent(summary["best_val_acc"]), ", flip TTA" if cfg.eval.tta else "")
    log.info("wrote %s", run.out)
