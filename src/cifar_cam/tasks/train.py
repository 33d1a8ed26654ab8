"""`cifar-cam train`: data, model, optimizer, scheduler -> engine epochs -> checkpoints, metrics, curves."""

from __future__ import annotations

import csv
import logging
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

from cifar_cam import viz
from cifar_cam.augment import build_train_batches
from cifar_cam.checkpoint import load_checkpoint, rng_state, run_dir_of, save_checkpoint, set_rng_state
from cifar_cam.config import merge_with_checkpoint, validate
from cifar_cam.data import EvalBatches, resolve_num_workers
from cifar_cam.engine import EpochTotals, evaluate, resolve_precision, train_one_epoch
from cifar_cam.errors import CifarCamError
from cifar_cam.logs import Bars
from cifar_cam.models import build_model
from cifar_cam.tasks.common import (
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
    """First SIGINT/SIGTERM: finish the current step, then stop cleanly. A second one: stop now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step (again to abort)", signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
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

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any]) -> "TrainState":
        return cls(payload["epoch"], payload["best_val_acc"], payload["best_epoch"], payload["bad_epochs"],
                   list(payload["history"]), payload.get("partial"))


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int
                    ) -> tuple[Any | None, str]:
    """The configured LR scheduler (or None) and whether it steps per 'epoch' or per 'step'."""
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
    interval = sched_cfg.pop("interval", "epoch")
    if sched_cfg.get("_target_") is None:
        return None, interval
    name = sched_cfg["_target_"].rsplit(".", 1)[-1]
    if name == "OneCycleLR":
        sched_cfg["total_steps"] = epochs * steps_per_epoch
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


def _resume_config(cfg: DictConfig) -> tuple[dict[str, Any] | None, DictConfig]:
    if not cfg.ckpt:
        return None, cfg
    payload = load_checkpoint(cfg.ckpt, prefer="last")
    merged = merge_with_checkpoint(cfg, payload["config"], cli_overrides(), None, payload.get("choices"))
    with open_dict(merged):
        merged.ckpt = cfg.ckpt
    validate(merged, "train")
    return payload, merged


def train(cfg: DictConfig) -> float:
    """Trains, checkpointing every epoch; evaluates the best checkpoint on test. Returns best val acc."""
    out = run_dir()
    resume, cfg = _resume_config(cfg)
    device = setup_runtime(cfg)
    t = cfg.trainer
    splits = load_data(cfg)
    amp_dtype = resolve_precision(t.precision, device)

    model = build_model(cfg.model.name, num_classes=splits.num_classes, width=cfg.model.width)
    num_params = sum(p.numel() for p in model.parameters())
    if resume is not None:
        model.load_state_dict(resume["model"])
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    batches = build_train_batches(splits.train, cfg.aug, batch_size=cfg.data.batch_size,
                                  num_workers=resolve_num_workers(cfg.data.num_workers), seed=cfg.seed, device=device)
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

    state = TrainState()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler") is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        set_rng_state(resume["rng"])
        state = TrainState.from_checkpoint(resume)
        where = f"epoch {state.epoch + 1}" + (f", step {state.partial['step'] + 1}" if state.partial else "")
        log.info("resuming %s at %s", resume["path"], where)

    ckpt_dir = out / "checkpoints"
    config_dict = plain(cfg)
    log_every = (1 if device.type == "cpu" else 50) if t.log_every == "auto" else t.log_every
    patience, min_delta = t.early_stopping.patience, t.early_stopping.min_delta
    log.info("model: %s width %d, %s parameters, on %s%s%s", cfg.model.name, cfg.model.width, f"{num_params:,}",
             device, "" if amp_dtype is None else f", {amp_dtype} autocast", ", compiled" if t.compile else "")
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
        }

    stopped_early = False
    train_images = 0
    train_seconds = 0.0
    with StopOnSignal() as stop, Bars("epochs", t.epochs) as bars:
        bars.advance_outer(state.epoch)
        for epoch in range(state.epoch + 1, t.epochs + 1):
            partial = EpochTotals(**state.partial) if state.partial else None
            state.partial = None
            batches.set_epoch(epoch, start_batch=partial.step if partial else 0)
            bars.start_inner(f"epoch {epoch}", len(batches) + (partial.step if partial else 0),
                             partial.step if partial else 0)
            result = train_one_epoch(
                step_model, batches, optimizer, criterion, device=device, amp_dtype=amp_dtype, scaler=scaler,
                step_scheduler=scheduler if interval == "step" else None, log_every=log_every, start=partial,
                on_progress=lambda tot, n: bars.update_inner(tot.step, f"loss {tot.loss:.3f} acc {percent(tot.acc)}"),
                should_stop=stop.requested, epoch=epoch,
            )
            totals = result.totals
            if result.interrupted:
                save_checkpoint(payload(partial=totals), ckpt_dir / "last.pt")
                name = signal.Signals(stop.signum).name  # type: ignore[arg-type]
                raise TrainingInterrupted(
                    f"{name}: stopped at epoch {epoch}, step {totals.step}; saved {ckpt_dir / 'last.pt'}; "
                    f"resume with: cifar-cam train ckpt={out}", stop.signum)  # type: ignore[arg-type]
            train_images += totals.count - (partial.count if partial else 0)
            train_seconds += totals.seconds - (partial.seconds if partial else 0)

            val_started = time.perf_counter()
            val = (evaluate(step_model, val_batches, splits.num_classes, device=device, amp_dtype=amp_dtype)
                   if val_batches is not None else None)
            monitored = val.acc if val is not None else totals.acc
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
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(totals.seconds + time.perf_counter() - val_started, 3),
            })
            write_metrics_csv(state.history, out / "metrics.csv")
            if improved:
                save_checkpoint(payload(), ckpt_dir / "best.pt")
            save_checkpoint(payload(), ckpt_dir / "last.pt")
            viz.plot_curves(state.history, out / "curves.png")
            row = state.history[-1]
            log.info("epoch %d/%d  train loss %.4f acc %s  val loss %s acc %s  lr %.3g  %.1fs%s",
                     epoch, t.epochs, row["train_loss"], percent(row["train_acc"]),
                     "-" if val is None else f"{val.loss:.4f}", percent(row["val_acc"]), row["lr"],
                     row["seconds"], "  *best*" if improved else "")
            bars.advance_outer(epoch, f"best {percent(state.best_val_acc)}")
            if patience is not None and state.bad_epochs >= patience:
                stopped_early = True
                log.info("early stopping: no val improvement > %g for %d epochs", min_delta, patience)
                break

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
        "images_per_second": round(train_images / train_seconds, 1) if train_seconds > 0 else None,
        "tta": cfg.eval.tta,
        "num_params": num_params,
        "device": str(device),
        "per_class_test_acc": dict(zip(splits.classes, test.per_class_acc)),
    }
    write_json(out / "summary.json", summary)
    log.info("test accuracy %s (loss %.4f) with the best checkpoint (epoch %d, val %s)%s", percent(test.acc),
             test.loss, state.best_epoch, percent(summary["best_val_acc"]), ", flip TTA" if cfg.eval.tta else "")
    log.info("wrote %s", out)
    return float(state.best_val_acc)
