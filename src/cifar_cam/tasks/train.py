"""`cifar-cam train`: data, model, optimizer, scheduler -> engine epochs -> checkpoints, metrics, curves."""

from __future__ import annotations

import csv
import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from cifar_cam import distributed, viz
from cifar_cam.augment import ResizedBatches, build_train_batches, epoch_image_size
from cifar_cam.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    remove_stale_temp_files,
    rng_state,
    run_dir_of,
    save_checkpoint,
    set_rng_state,
)
from cifar_cam.config import merge_with_checkpoint, validate
from cifar_cam.data import EvalBatches, resolve_num_workers
from cifar_cam.engine import EpochTotals, evaluate, precision_name, resolve_precision, train_one_epoch
from cifar_cam.errors import CheckpointError, CifarCamError, ConfigError, DivergenceError
from cifar_cam.logs import Bars
from cifar_cam.models import build_model
from cifar_cam.tasks.common import (
    check_classes,
    cli_overrides,
    group_choices,
    load_data,
    percent,
    plain,
    run_dir,
    setup_runtime,
    write_json,
)

log = logging.getLogger("cifar_cam.train")

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class TrainingInterrupted(CifarCamError):
    """SIGINT / SIGTERM stopped training after a step; last.pt holds the state. Exit 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """SIGINT/SIGTERM while `armed` (the training loop): finish the current step, then stop cleanly.

    Unarmed (setup, the final test evaluation), or a second signal: stop at once with `unarmed_message`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self.unarmed_message = "before training started; nothing was saved"
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def requested(self) -> bool:
        """Whether a signal asked training to stop."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker (Ctrl-C reaches the whole group): main decides
            return
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise TrainingInterrupted(f"{name} again: stopped at once {self.unarmed_message}", signum)
        if not self.armed:
            raise TrainingInterrupted(f"{name}: stopped {self.unarmed_message}", signum)
        self.signum = signum
        log.warning("%s received: stopping after this step (again to abort)", name)

    def __enter__(self) -> StopOnSignal:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
                    ) -> tuple[Any | None, str]:
    """The configured LR scheduler (or None) and whether it steps per 'epoch' or per 'step'."""
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    interval = sched_cfg.pop("interval", "epoch")
    if sched_cfg.get("_target_") is None:
        return None, interval
    name = sched_cfg["_target_"].rsplit(".", 1)[-1]
    if name == "OneCycleLR":
        sched_cfg["total_steps"] = total = epochs * steps_per_epoch
        warmup = sched_cfg.get("pct_start", 0.3) * total
        if warmup < 2 or total - warmup < 2:  # torch divides by a phase's length
            raise ConfigError(f"scheduler=onecycle needs >= 2 steps in each phase, but trainer.epochs={epochs} x "
                              f"{steps_per_epoch} batches = {total} steps with pct_start={sched_cfg.get('pct_start')}; "
                              "train longer, lower data.batch_size, or use scheduler=cosine")
    elif name == "CosineAnnealingLR":
        sched_cfg["T_max"] = epochs * (steps_per_epoch if interval == "step" else 1)
    return instantiate(sched_cfg)(optimizer), interval


def write_metrics_csv(history: list[dict[str, float]], path: Path) -> None:
    """metrics.csv from the full history (rewritten atomically: never a duplicate or torn row)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    tmp.replace(path)


# What defines a run: resuming with another value would not load, or would silently change the data
# (another seed reshuffles the val split into train). Everything else may change on resume.
RUN_KEYS = ("seed", "model.name", "model.width", "data.source", "data.num_classes", "data.train_size",
            "data.val_size", "data.subset", "data.image_size", "data.batch_size", "optimizer._target_",
            "scheduler._target_", "scheduler.interval")
EPOCH_SCHEDULERS = ("OneCycleLR", "CosineAnnealingLR")  # their shape is fixed by trainer.epochs


def resume_config(cfg: DictConfig, overrides: list[str], choices: dict[str, str] | None = None
                  ) -> tuple[dict[str, Any] | None, DictConfig]:
    """For `ckpt=`: the checkpoint and its config with the command-line overrides on top, checked.

    Raises CheckpointError / ConfigError when the checkpoint cannot continue as asked (check_resume).
    """
    if not cfg.get("ckpt"):
        return None, cfg
    payload = load_checkpoint(cfg.ckpt, prefer="last")
    merged = merge_with_checkpoint(cfg, payload["config"], overrides, None, choices or payload.get("choices"))
    with open_dict(merged):
        merged.ckpt = cfg.ckpt
    validate(merged, "train")
    check_resume(merged, payload)
    return payload, merged


def check_resume(cfg: DictConfig, payload: dict[str, Any]) -> None:
    """Refuses a resume that cannot continue the run in `payload`: changed RUN_KEYS, fewer epochs, an older file."""
    stored = OmegaConf.create(payload["config"])
    for key in RUN_KEYS:
        old, new = OmegaConf.select(stored, key, default=None), OmegaConf.select(cfg, key, default=None)
        if old != new:
            raise ConfigError(f"{key}={new} differs from the run being resumed ({key}={old}); resume with the "
                              "run's own value, or start a new run without ckpt=")
    model_from_checkpoint(payload)  # the weights fit the architecture the config names
    done, epochs = payload["epoch"], cfg.trainer.epochs
    if epochs < done:
        raise ConfigError(f"trainer.epochs={epochs} is less than the {done} epochs the run has done; "
                          f"pass trainer.epochs>={done}")
    scheduler = str(OmegaConf.select(cfg, "scheduler._target_", default=None)).rsplit(".", 1)[-1]
    old_epochs = OmegaConf.select(stored, "trainer.epochs", default=epochs)
    if epochs != old_epochs and scheduler in EPOCH_SCHEDULERS:
        raise ConfigError(f"trainer.epochs={epochs}: the run's {scheduler} schedule spans its {old_epochs} epochs "
                          "and cannot be stretched on resume; start a new run for a longer schedule")
    path = Path(payload["path"])
    last = run_dir_of(path) / "checkpoints" / "last.pt"
    if path.resolve() != last.resolve() and last.is_file():
        last_epoch = load_checkpoint(last)["epoch"]
        if last_epoch > done:
            raise CheckpointError(f"ckpt={path} is epoch {done} but its run went on to epoch {last_epoch}; resuming "
                                  f"from it would overwrite epochs {done + 1}-{last_epoch}: pass the run dir "
                                  f"{run_dir_of(path)} to resume from last.pt")


def rescale_lr(optimizer: torch.optim.Optimizer, scheduler: Any | None, old: float, new: float) -> None:
    """Scales every learning rate the optimizer and scheduler hold by new / old (the schedule keeps its shape).

    A rate equal to `old` becomes `new` exactly (0.05 * (0.01 / 0.05) would be 0.010000000000000002).
    """
    def scale(v: float) -> float:
        return new if v == old else v * new / old

    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] = scale(group[key])
    for attr in ("base_lrs", "_last_lr", "min_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            setattr(scheduler, attr, [scale(v) for v in values])
    if isinstance(getattr(scheduler, "eta_min", None), float):
        scheduler.eta_min = scale(scheduler.eta_min)


def train(cfg: DictConfig) -> float:
    """Trains, checkpointing every epoch; evaluates the best checkpoint on test. Returns best val acc.

    SIGINT / SIGTERM stop it cleanly (StopOnSignal); `ckpt=` resumes a run exactly where it stopped.
    """
    with StopOnSignal() as stop:
        return _train(cfg, stop)


def _train(cfg: DictConfig, stop: StopOnSignal) -> float:
    out = run_dir()
    resume, cfg = resume_config(cfg, cli_overrides())
    device = setup_runtime(cfg)
    t = cfg.trainer
    # [ddp] under torchrun or in a multi-task SLURM job: join the ranks, each on its own GPU; alone: rank 0 of 1
    world, device = distributed.setup(t.get("strategy", "auto"), device)
    if world.distributed and cfg.optimizer.lr == "auto":
        raise ConfigError("optimizer.lr=auto runs the LR range test, which is single-process: run "
                          "`cifar-cam lr-find` first and pass its optimizer.lr=... to the DDP run")
    splits = load_data(cfg)
    if resume is not None:
        check_classes(resume, splits)
    amp_dtype = resolve_precision(t.precision, device)

    model = build_model(cfg.model.name, num_classes=splits.num_classes, width=cfg.model.width)
    num_params = sum(p.numel() for p in model.parameters())
    if resume is not None:
        model.load_state_dict(resume["model"])
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    batches = build_train_batches(splits.train, cfg.aug, batch_size=cfg.data.batch_size,
                                  num_workers=resolve_num_workers(cfg.data.num_workers), seed=cfg.seed, device=device,
                                  rank=world.rank, world_size=world.size)  # [ddp] this rank's shard
    full_size = splits.train.images.shape[1]
    resize_schedule = list(t.get("progressive_resize") or [])  # sizes checked against data.image_size by validate
    val_batches = EvalBatches(splits.val, cfg.eval.batch_size, device) if splits.val is not None else None
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    if cfg.optimizer.lr == "auto":
        from cifar_cam.tasks.lr_find import suggest_lr_for_training

        with open_dict(cfg):
            cfg.optimizer.lr = suggest_lr_for_training(cfg, model, batches, criterion, device, out)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    scheduler, interval = build_scheduler(cfg, optimizer, t.epochs, len(batches))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step_model = torch.compile(model) if t.compile else model  # save `model`: no _orig_mod. prefix
    train_model = step_model  # [ddp] gradients all-reduced through DDP; evaluation uses the plain module
    if world.distributed:
        ddp_model = distributed.wrap(model, device, sync_batchnorm=t.get("sync_batchnorm", False))
        train_model = torch.compile(ddp_model) if t.compile else ddp_model

    state = TrainState()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        state = TrainState.from_checkpoint(resume)
        old_lr = resume["config"]["optimizer"]["lr"]
        if isinstance(old_lr, (int, float)) and cfg.optimizer.lr != old_lr:
            rescale_lr(optimizer, scheduler, old_lr, cfg.optimizer.lr)
            log.info("optimizer.lr %g -> %g: learning rates rescaled by %g", old_lr, cfg.optimizer.lr,
                     cfg.optimizer.lr / old_lr)
        where = (f"at epoch {state.epoch + 1}, step {state.partial['step'] + 1}" if state.partial
                 else f"after epoch {state.epoch}")
        log.info("resuming %s %s", resume["path"], where)
        if resume.get("num_threads", torch.get_num_threads()) != torch.get_num_threads() and device.type == "cpu":
            log.warning("the run used %d CPU threads, this process %d: results will differ in the last digits "
                        "from an uninterrupted run (trainer.num_threads=%d for bit-identical ones)",
                        resume["num_threads"], torch.get_num_threads(), resume["num_threads"])

    ckpt_dir = out / "checkpoints"
    for stale in remove_stale_temp_files(ckpt_dir) if ckpt_dir.is_dir() and world.is_main else []:
        log.info("removed %s, the remains of a checkpoint write that was killed", stale.name)
    config_dict = plain(cfg)
    log_every = (1 if device.type == "cpu" else 50) if t.log_every == "auto" else t.log_every
    patience, min_delta = t.early_stopping.patience, t.early_stopping.min_delta
    log.info("model: %s width %d, %s parameters, on %s%s%s", cfg.model.name, cfg.model.width, f"{num_params:,}",
             device, "" if amp_dtype is None else f", {precision_name(amp_dtype)} autocast",
             ", compiled" if t.compile else "")
    log.info("run dir: %s", out)

    def payload(partial: EpochTotals | None = None) -> dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "epoch": state.epoch, "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs, "history": state.history,
            "partial": None if partial is None else partial.to_dict(),
            "rng": rng_state(), "classes": splits.classes, "config": config_dict,
            "overrides": cli_overrides(), "choices": group_choices(), "num_params": num_params,
            "train_images": state.train_images, "train_seconds": state.train_seconds,
            "num_threads": torch.get_num_threads(),
        }

    stopped_early = False
    resume_hint = f"resume with: cifar-cam train ckpt={shlex.quote(str(out))}"
    last_epoch = t.epochs
    if patience is not None and state.epoch and state.bad_epochs >= patience:
        stopped_early, last_epoch = True, state.epoch
        log.info("the run already stopped early after %d epochs (no val improvement for %d): evaluating its best "
                 "checkpoint on test again", state.epoch, state.bad_epochs)
    elif state.epoch >= t.epochs:
        log.info("the run already finished %d of %d epochs: evaluating its best checkpoint on test again "
                 "(trainer.epochs=N on the command line trains it further)", state.epoch, t.epochs)
    with Bars("epochs", t.epochs, enabled=None if world.is_main else False) as bars:
        bars.advance_outer(state.epoch)
        stop.armed = True
        for epoch in range(state.epoch + 1, last_epoch + 1):
            partial = EpochTotals(**state.partial) if state.partial else None
            state.partial = None
            batches.set_epoch(epoch, start_batch=partial.step if partial else 0)
            size = epoch_image_size(resize_schedule, epoch, full_size)  # progressive resizing: cheap early epochs
            epoch_batches = batches if size == full_size else ResizedBatches(batches, size)
            bars.start_inner(f"epoch {epoch}", len(batches) + (partial.step if partial else 0),
                             partial.step if partial else 0)
            stop.unarmed_message = (f"in epoch {epoch}; {ckpt_dir / 'last.pt'} keeps what it last saved; "
                                    f"{resume_hint}")
            try:
                result = train_one_epoch(
                    train_model, epoch_batches, optimizer, criterion, device=device, amp_dtype=amp_dtype, scaler=scaler,
                    step_scheduler=scheduler if interval == "step" else None, log_every=log_every, start=partial,
                    on_progress=lambda tot, n: bars.update_inner(tot.step,
                                                                 f"loss {tot.loss:.3f} acc {percent(tot.acc)}"),
                    should_stop=distributed.any_rank(stop.requested, world), epoch=epoch,  # [ddp] all stop together
                )
            except DivergenceError as e:  # nothing of this epoch is saved: last.pt and best.pt stay as they were
                kept = (f"{ckpt_dir / 'last.pt'} (epoch {state.epoch}) is intact: resume with a lower rate: "
                        f"cifar-cam train ckpt={shlex.quote(str(out))} optimizer.lr=..."
                        if (ckpt_dir / "last.pt").is_file() else "nothing was saved")
                raise DivergenceError(f"{e}; {kept}") from None
            totals = distributed.all_reduce_totals(result.totals, partial, world)  # [ddp] over all ranks' shards
            if result.interrupted:
                if world.is_main:
                    save_checkpoint(payload(partial=totals), ckpt_dir / "last.pt")
                name = signal.Signals(stop.signum).name  # type: ignore[arg-type]
                raise TrainingInterrupted(
                    f"{name}: stopped at epoch {epoch}, step {totals.step}; saved {ckpt_dir / 'last.pt'}; "
                    f"{resume_hint}", stop.signum)  # type: ignore[arg-type]
            state.train_images += totals.count  # totals include the part of the epoch done before a resume
            state.train_seconds += totals.seconds

            val_started = time.perf_counter()
            val = (evaluate(step_model, val_batches, splits.num_classes, device=device, amp_dtype=amp_dtype)
                   if val_batches is not None else None)
            monitored = distributed.from_rank0(val.acc if val is not None else totals.acc, world)  # [ddp] one decision
            if scheduler is not None and interval == "epoch":
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(monitored)
                else:
                    scheduler.step()
            improved = monitored > state.best_val_acc + min_delta
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
            if world.is_main:  # [ddp] only rank 0 writes
                write_metrics_csv(state.history, out / "metrics.csv")
                if improved:
                    save_checkpoint(payload(), ckpt_dir / "best.pt")
                save_checkpoint(payload(), ckpt_dir / "last.pt")
                viz.plot_curves(state.history, out / "curves.png")
            row = state.history[-1]
            log.info("epoch %d/%d  train loss %.4f acc %s  val loss %s acc %s  lr %.3g  %.1fs%s%s",
                     epoch, t.epochs, row["train_loss"], percent(row["train_acc"]),
                     "-" if val is None else f"{val.loss:.4f}", percent(row["val_acc"]), row["lr"],
                     row["seconds"], "" if size == full_size else f"  ({size}px)", "  *best*" if improved else "")
            bars.advance_outer(epoch, f"best {percent(state.best_val_acc)}")
            if stop.requested():  # the signal came during validation or the checkpoint writes
                name = signal.Signals(stop.signum).name  # type: ignore[arg-type]
                raise TrainingInterrupted(f"{name}: stopped after epoch {epoch}; saved {ckpt_dir / 'last.pt'}; "
                                          f"{resume_hint}", stop.signum)  # type: ignore[arg-type]
            if patience is not None and state.bad_epochs >= patience:
                stopped_early = True
                log.info("early stopping: no val improvement > %g for %d epochs", min_delta, patience)
                break

    if not world.is_main:  # [ddp] rank 0 alone tests the best checkpoint and writes summary.json
        return float(state.best_val_acc)
    stop.armed = False
    stop.unarmed_message = (f"during the final test evaluation; the checkpoints are complete: "
                            f"cifar-cam train ckpt={shlex.quote(str(out))} evaluates again")
    # The test set is touched once, with the best checkpoint.
    best = load_checkpoint(ckpt_dir / "best.pt")
    model.load_state_dict(best["model"])
    test_batches = EvalBatches(splits.test, cfg.eval.batch_size, device)
    test = evaluate(model, test_batches, splits.num_classes, device=device, amp_dtype=amp_dtype, tta=cfg.eval.tta)
    has_val = val_batches is not None
    summary = {
        "best_epoch": state.best_epoch,
        "best_val_acc": state.best_val_acc if has_val else None,
        "test_acc": test.acc,
        "test_loss": test.loss,
        "epochs_run": len(state.history),
        "stopped_early": stopped_early,
        "train_seconds": round(sum(r["seconds"] for r in state.history), 3),
        "images_per_second": (round(state.train_images / state.train_seconds, 1) if state.train_seconds > 0
                              else None),
        "tta": cfg.eval.tta,
        "num_params": num_params,
        "device": str(device),
        "precision": precision_name(amp_dtype),  # what trainer.precision (auto: by the hardware) resolved to
        "world_size": world.size,  # [ddp] processes that trained; a step saw world_size x data.batch_size images
        "per_class_test_acc": dict(zip(splits.classes, test.per_class_acc, strict=True)),
    }
    write_json(out / "summary.json", summary)
    log.info("test accuracy %s (loss %.4f) with the best checkpoint (epoch %d, val %s)%s", percent(test.acc),
             test.loss, state.best_epoch, percent(summary["best_val_acc"]), ", flip TTA" if cfg.eval.tta else "")
    log.info("wrote %s", out)
    return float(state.best_val_acc)
