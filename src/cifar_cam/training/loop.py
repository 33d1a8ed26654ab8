"""The training loop: the epochs of a `Run` (run.py) until its plan or trainer.epochs ends, early stopping or a stop
signal; then the best checkpoint on the test set, once.

Read top to bottom: train_epochs -> run_epoch (the steps, engine.train_one_epoch) + end_of_epoch (validation,
the scheduler, early stopping, a re-plan, metrics.csv, checkpoints), then final_test (summary.json).
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from typing import Any

import torch
from omegaconf import OmegaConf

from cifar_cam import viz
from cifar_cam.data.batches import EvalBatches, ResizedBatches
from cifar_cam.data.mix import MixedBatches
from cifar_cam.errors import DivergenceError, TrainingInterrupted
from cifar_cam.io import write_csv, write_json
from cifar_cam.logs import Bars, percent
from cifar_cam.models import describe_model
from cifar_cam.training import distributed
from cifar_cam.training.budget.lr_schedules import in_scheduler_steps
from cifar_cam.training.budget.probe import replan_after, sizes_text
from cifar_cam.training.checkpoint import detached_copy, load_checkpoint, remove_stale_temp_files
from cifar_cam.training.device import precision_name
from cifar_cam.training.engine import EpochTotals, evaluate, train_one_epoch, tta_suffix
from cifar_cam.training.run import (
    METRIC_FIELDS,
    Run,
    RunState,
    adopt_plan,
    already_stopped_early,
    checkpoint_payload,
    compiled_graphs,
    epoch_size,
    epochs_to_run,
    write_checkpoints,
)
from cifar_cam.training.supervise import Supervisor

log = logging.getLogger("cifar_cam.train")


def train_epochs(run: Run, state: RunState, sup: Supervisor) -> bool:
    """The epochs still to run (all of them, or the rest after a resume); returns whether it stopped early."""
    cfg, t = run.cfg, run.cfg.trainer
    for stale in remove_stale_temp_files(run.ckpt_dir) if run.ckpt_dir.is_dir() and run.world.is_main else []:
        log.info("removed %s, the remains of a checkpoint write that was killed", stale.name)
    if t.early_stopping.patience is not None and run.val_batches is None:
        log.info("early stopping is off: it needs a val split (data.val_size > 0); best.pt is the last epoch")
    log.info("model: %s, %s parameters, on %s%s%s", describe_model(cfg.model), f"{run.num_params:,}",
             run.device, "" if run.amp_dtype is None else f", {precision_name(run.amp_dtype)} autocast",
             ", compiled" if t.compile else "")
    log.info("run dir: %s", run.out)
    if already_stopped_early(run, state):
        log.info("the run already stopped early after %d epochs (no val improvement for %d): evaluating its best "
                 "checkpoint on test again", state.epoch, state.bad_epochs)
        return True
    if state.epoch >= epochs_to_run(run, state):
        log.info("the run already finished %d of %d epochs: evaluating its best checkpoint on test again "
                 "(trainer.epochs=N on the command line trains it further)", state.epoch, epochs_to_run(run, state))
    with Bars("epochs", epochs_to_run(run, state), enabled=None if run.world.is_main else False,
              every=t.get("progress_every", 30)) as bars:
        bars.advance_outer(state.epoch)
        sup.armed = True
        epoch = state.epoch + 1
        while epoch <= epochs_to_run(run, state):  # a budgeted run's plan may change after each epoch
            totals, size = run_epoch(run, state, epoch, bars, sup)
            if end_of_epoch(run, state, epoch, totals, size, bars, sup):
                return True
            bars.set_outer_total(epochs_to_run(run, state))
            epoch += 1
    return False


def run_epoch(run: Run, state: RunState, epoch: int, bars: Bars, sup: Supervisor) -> tuple[EpochTotals, int]:
    """One epoch's training steps (from a saved partial epoch after a resume); the totals over all ranks."""
    t = run.cfg.trainer
    partial = EpochTotals(**state.partial) if state.partial else None
    state.partial = None
    done = partial.step if partial else 0
    run.batches.set_epoch(epoch, start_batch=done)
    size = epoch_size(run, state, epoch)  # progressive resizing: cheap early epochs
    epoch_batches = run.batches if size == run.full_size else ResizedBatches(run.batches, size)
    if run.cfg.aug.get("mix"):  # MixUp / CutMix on the device, after any resizing; soft targets
        epoch_batches = MixedBatches(epoch_batches, run.cfg.aug, num_classes=run.splits.num_classes,
                                     seed=run.cfg.seed, epoch=epoch, start_batch=done, rank=run.world.rank,
                                     world_size=run.world.size)
    bars.start_inner(f"epoch {epoch}/{epochs_to_run(run, state)}", len(run.batches) + done, done,
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
        kept = (f"{run.ckpt_dir / 'last.pt'} (epoch {state.saved_epoch}) is intact: resume with a lower rate: "
                f"cifar-cam train ckpt={shlex.quote(str(run.out))} optimizer.lr=..."
                if (run.ckpt_dir / "last.pt").is_file() else "nothing was saved")
        raise DivergenceError(f"{e}; {kept}") from None
    totals = distributed.all_reduce_totals(result.totals, partial, run.world)  # [ddp] over all ranks' shards
    # A stop asked during the epoch's last step: the epoch is whole, so end_of_epoch validates, saves and stops
    # (a "partial" checkpoint of a whole epoch would log that epoch's end twice on resume)
    if result.interrupted and totals.step < run.steps_per_epoch:
        if run.world.is_main:
            write_checkpoints(run, state, sup, checkpoint_payload(run, state, partial=totals))
        name = signal.Signals(sup.signum).name  # type: ignore[arg-type]
        raise TrainingInterrupted(f"{name}: stopped at epoch {epoch}, step {totals.step}; saved "
                                  f"{run.ckpt_dir / 'last.pt'}; {run.resume_hint}", sup.signum)  # type: ignore[arg-type]
    state.train_images += totals.count  # totals include the part of the epoch done before a resume
    state.train_seconds += totals.seconds
    return totals, size


def replan(run: Run, state: RunState, epoch: int, totals: EpochTotals) -> str | None:
    """A budgeted run's re-plan after `epoch`: the new plan adopted and the LR schedule revised to it; the log line
    of a change (None: the plan stands)."""
    new = replan_after(run, state, epoch, totals.step, totals.seconds)
    if new is None:
        return None
    if run.scheduler is not None and hasattr(run.scheduler, "revise"):  # OneCycle / cosine (not plateau, none)
        run.scheduler.revise(*in_scheduler_steps(new.revisions[-1:], run.interval, run.steps_per_epoch)[0])
    adopt_plan(run, state, new)
    last = new.replans[-1] if new.replans else {}
    return f"re-planned after epoch {epoch}: {last.get('reason', 'speed')} ({sizes_text(new.sizes)})"


def end_of_epoch(run: Run, state: RunState, epoch: int, totals: EpochTotals, size: int, bars: Bars,
                 sup: Supervisor) -> bool:
    """Validation, the scheduler, early stopping, metrics.csv, checkpoints and curves (every
    trainer.checkpoint_every epochs and at the end); True to stop early."""
    t = run.cfg.trainer
    val_started = time.perf_counter()
    val = (evaluate(run.eval_model, run.val_batches, run.splits.num_classes, device=run.device,
                    amp_dtype=run.eval_dtype, heartbeat=lambda: sup.beat(f"epoch {epoch}, validation"))
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
    # before the checkpoint: it holds the plan in force, which a resume continues
    replanned = replan(run, state, epoch, totals) if run.plan_mode == "budget" else None
    patience = run.patience
    stop_early = patience is not None and state.bad_epochs >= patience
    # a signal during the epoch's last steps or validation, on any rank [ddp]: saved below, then the run stops
    agree = distributed.agreement(run.world, sup)
    requested = agree(-1, sup.requested())[1] if agree is not None else sup.requested()
    last_epoch = epoch == epochs_to_run(run, state)
    write_now = epoch % t.get("checkpoint_every", 1) == 0 or last_epoch or stop_early or requested
    if run.world.is_main:  # [ddp] only rank 0 writes
        write_csv(run.out / "metrics.csv", state.history, METRIC_FIELDS)  # all rows: never torn or doubled
        if improved and val is not None:  # written now, or copied to wait in memory for the next write
            payload = checkpoint_payload(run, state)
            state.pending_best = payload if write_now else detached_copy(payload)
        if write_now:
            write_checkpoints(run, state, sup, checkpoint_payload(run, state))
            viz.plot_curves(state.history, run.out / "curves.png")
    row = state.history[-1]
    log.info("epoch %d/%d  train loss %.4f acc %s  val loss %s acc %s  lr %.3g  %.1fs%s%s",
             epoch, epochs_to_run(run, state), row["train_loss"], percent(row["train_acc"]),
             "-" if val is None else f"{val.loss:.4f}", percent(row["val_acc"]), row["lr"], row["seconds"],
             "" if size == run.full_size else f"  ({size}px)",
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


def tracked_params(run: Run, state: RunState) -> dict[str, Any]:
    """The config as the trackers' hyperparameters. A planned run's epochs and sizes are the plan's, which
    re-plans change (plan.json, and planned_epochs among the final metrics): left out, not a changed param."""
    params = OmegaConf.to_container(run.cfg, resolve=True)
    if state.plan is not None:
        for key in ("epochs", "progressive_resize"):
            params["trainer"].pop(key, None)  # type: ignore[index]
    return params  # type: ignore[return-value]


def track_final(run: Run, state: RunState, test: Any, summary: dict[str, Any]) -> None:
    """The trackers' end of the run: the test confusion matrix and the curves as images, the flattened config
    with the final metrics as hyperparameters (confusion_matrix.png is written for them)."""
    assert run.trackers is not None
    confusion = viz.plot_confusion_matrix(test.confusion.numpy(), run.splits.classes,
                                          run.out / "confusion_matrix.png")
    run.trackers.log_image("confusion_matrix", confusion)  # no step: at the end, replaced by a later evaluation
    if (run.out / "curves.png").is_file():
        run.trackers.log_image("curves", run.out / "curves.png")
    finals = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.trackers.log_final(tracked_params(run, state), finals)


def final_test(run: Run, state: RunState, stopped_early: bool, sup: Supervisor) -> None:
    """The test set, touched once, with the best checkpoint; summary.json (wall_seconds from run.started)."""
    cfg = run.cfg
    sup.armed = False
    sup.unarmed_message = (f"during the final test evaluation; the checkpoints are complete: "
                           f"cifar-cam train ckpt={shlex.quote(str(run.out))} evaluates again")
    run.model.load_state_dict(load_checkpoint(run.ckpt_dir / "best.pt")["model"])
    test_batches = EvalBatches(run.splits.test, cfg.eval.batch_size, run.device, run.splits.mean, run.splits.std)
    test = evaluate(run.model, test_batches, run.splits.num_classes, device=run.device, amp_dtype=run.eval_dtype,
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
        "compile_seconds": None if state.compile_seconds is None else round(state.compile_seconds, 3),
        # graphs compiled after the warm-up: each is a shape the compiled step had not seen (0 is the goal)
        "recompiles": None if state.compile_seconds is None else compiled_graphs() - state.graphs_after_warm_up,
        "tta": cfg.eval.tta,
        "num_params": run.num_params,
        "device": str(run.device),
        "precision": precision_name(run.amp_dtype),  # what trainer.precision (auto: by the hardware) resolved to
        "eval_precision": precision_name(run.eval_dtype),  # what best_val_acc and test_acc were computed at
        "world_size": run.world.size,  # [ddp] processes that trained; a step saw world_size x data.batch_size images
        "per_class_test_acc": dict(zip(run.splits.classes, test.per_class_acc, strict=True)),
        "tags": OmegaConf.to_container(cfg.tags) if cfg.get("tags") else {},  # +tags.<name>=...: the user's labels
    }
    if state.plan is not None:  # trainer.time_budget / trainer.plan: plan.json holds the whole schedule
        summary.update(time_budget_seconds=state.plan.budget_seconds if run.plan_mode != "replay" else None,
                       planned_epochs=state.plan.epochs, replans=len(state.plan.replans))
    summary["wall_seconds"] = round(time.monotonic() - run.started, 3)
    write_json(run.out / "summary.json", summary)
    if run.trackers is not None and run.trackers.names:
        track_final(run, state, test, summary)
    log.info("test accuracy %s (loss %.4f) with the best checkpoint (epoch %d, val %s)%s", percent(test.acc),
             test.loss, state.best_epoch, percent(summary["best_val_acc"]), tta_suffix(cfg.eval.tta))
    log.info("wrote %s", run.out)
