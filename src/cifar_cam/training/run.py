"""One training run as two things you can read apart: `Run`, what is fixed for the run (data, model, optimizer,
scheduler, batches: built once by `build_run`, complete before the first epoch), and `RunState`, what changes
from epoch to epoch (the counters a checkpoint saves, the plan the run follows, the pending best checkpoint).

Read top to bottom: RunState, Run, build_run, with_plan (a planned run's LR schedule), restore (a resume),
checkpoint_payload / write_checkpoints, warm_up (trainer.compile). The epochs themselves are loop.py's.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from cifar_cam.data.arrays import DataSplits
from cifar_cam.data.augment import build_train_batches
from cifar_cam.data.batches import EvalBatches, epoch_image_size, resolve_num_workers
from cifar_cam.errors import CheckpointError, ConfigError
from cifar_cam.io import write_csv
from cifar_cam.models import model_from_config
from cifar_cam.training import distributed
from cifar_cam.training.budget.planner import Plan
from cifar_cam.training.checkpoint import check_classes, copy_checkpoint, rng_state, save_checkpoint, set_rng_state
from cifar_cam.training.device import autocast, input_memory_format, resolve_precision, training_memory_format
from cifar_cam.training.ema import WeightEma
from cifar_cam.training.engine import EpochTotals
from cifar_cam.training.optim import build_optimizer
from cifar_cam.training.resume import apply_resume_changes, resume_changes
from cifar_cam.training.schedulers import build_scheduler
from cifar_cam.training.supervise import Supervisor
from cifar_cam.training.trackers import Trackers
from cifar_cam.training.weights import freeze, start_weights

log = logging.getLogger("cifar_cam.train")

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


@dataclass
class RunState:
    """What changes during a run. The first group is what a checkpoint saves besides the weights (a resume
    continues exactly from it); the rest belongs to this process's sitting."""

    epoch: int = 0                      # completed epochs
    best_val_acc: float = -1.0          # of the monitored metric (val_acc, or train_acc without val)
    best_epoch: int = 0
    bad_epochs: int = 0                 # epochs since the last improvement (early stopping)
    history: list[dict[str, float]] = field(default_factory=list)
    partial: dict[str, Any] | None = None   # EpochTotals of an epoch a signal cut short
    train_images: int = 0               # over every session of the run (summary's images_per_second)
    train_seconds: float = 0.0
    plan: Plan | None = None            # the epochs and sizes a planned run follows; a re-plan replaces it

    saved_epoch: int = 0                # the epoch last.pt holds
    pending_best: dict[str, Any] | None = None  # best.pt's payload, kept until the next checkpoint write
    compile_seconds: float | None = None    # warm_up's, this sitting
    graphs_after_warm_up: int = 0       # compiled_graphs() after warm_up: more at the end are recompiles
    write_seconds: float = 0.0          # a budgeted run's probe: checkpoint writes + curves.png, per epoch

    def load_checkpoint(self, payload: dict[str, Any]) -> None:
        """The counters a checkpoint saved (its plan is set by the caller, who checks it first)."""
        self.epoch, self.best_val_acc = payload["epoch"], payload["best_val_acc"]
        self.best_epoch, self.bad_epochs = payload["best_epoch"], payload["bad_epochs"]
        self.history, self.partial = list(payload["history"]), payload.get("partial")
        self.train_images, self.train_seconds = payload.get("train_images", 0), payload.get("train_seconds", 0.0)
        self.saved_epoch = self.epoch


@dataclass(frozen=True)
class Run:
    """What is fixed for one training run: built once (build_run), given its LR schedule by a plan (with_plan)
    and its trackers before the first epoch; the epochs only read it."""

    cfg: DictConfig                  # as resolved for this run (optimizer.lr=auto: the rate the range test chose)
    out: Path
    device: torch.device
    world: distributed.World
    splits: DataSplits
    model: nn.Module                 # the plain module: checkpoints, evaluation (no _orig_mod. prefix)
    train_model: nn.Module           # what the steps call: compiled and/or DDP-wrapped `model`
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    interval: str                    # the scheduler steps per 'epoch' or per 'step'
    scaler: torch.amp.GradScaler | None
    batches: Any
    val_batches: EvalBatches | None
    criterion: nn.Module
    amp_dtype: torch.dtype | None    # the training steps' autocast (trainer.precision)
    eval_dtype: torch.dtype | None   # validation's and the test's (eval.precision: what accuracies are reported at)
    num_params: int
    steps_per_epoch: int             # a whole epoch's batches (compile drops a partial last one)
    ema: WeightEma | None = None     # trainer.ema.decay: the weights' EMA (what is validated and saved)
    trackers: Trackers | None = None  # logger=: TensorBoard / MLflow / steps.csv (rank 0; others: none)
    plan_mode: str | None = None     # budget (a budgeted run's first sitting) | replay | resume | None
    started: float = 0.0             # time.monotonic() at the command's start (the time budget's clock)
    overrides: tuple[str, ...] = ()  # the command line's overrides and group choices, kept in every checkpoint
    choices: dict[str, str] = field(default_factory=dict)  # (a resume composes the same config groups again)

    def global_step(self, epoch: int, step: int) -> int:
        """Optimizer steps done after `step` steps of `epoch` (1-based): the trackers' x axis."""
        return (epoch - 1) * self.steps_per_epoch + step

    @property
    def eval_model(self) -> nn.Module:
        """What validation, the test and the checkpoint's `model` use: the EMA when there is one, else `model`."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def full_size(self) -> int:
        """The training images' height (a square image's side): the size validation, the test and the last epochs
        use; trainer.progressive_resize and a plan measure epochs' sizes in it (the width follows in proportion)."""
        return self.splits.image_size[0]

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def resume_hint(self) -> str:
        return f"resume with: cifar-cam train ckpt={shlex.quote(str(self.out))}"

    @property
    def patience(self) -> int | None:
        """Early stopping's patience; None (off) without a val split, where nothing is selected."""
        return self.cfg.trainer.early_stopping.patience if self.val_batches is not None else None


def epochs_to_run(run: Run, state: RunState) -> int:
    """How many epochs the run has in all: its plan's, else trainer.epochs."""
    return state.plan.epochs if state.plan is not None else int(run.cfg.trainer.epochs)


def epoch_size(run: Run, state: RunState, epoch: int) -> int:
    """The training image size of `epoch`: its plan's, else trainer.progressive_resize's (full size after it)."""
    if state.plan is not None:
        return state.plan.size_of(epoch)
    return epoch_image_size(list(run.cfg.trainer.get("progressive_resize") or []), epoch, run.full_size)


def already_stopped_early(run: Run, state: RunState) -> bool:
    """Whether the restored run had already stopped early (a resume then only tests again)."""
    return run.patience is not None and state.epoch > 0 and state.bad_epochs >= run.patience


# -- building ------------------------------------------------------------------------------------------------------

def note_validation_cost(splits: DataSplits) -> None:
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


def memory_format_for(model: nn.Module, device: torch.device, channels_last: bool) -> torch.memory_format:
    """trainer.channels_last, unless this model would hit the oneDNN fault in it (then NCHW, with a log line)."""
    memory_format, reason = training_memory_format(model, device, channels_last)
    if reason is not None:
        log.info("training in NCHW, not channels_last: %s (model.width >= 8 avoids it)", reason)
    return memory_format


def build_run(cfg: DictConfig, out: Path, splits: DataSplits, device: torch.device, world: distributed.World,
              resume: dict[str, Any] | None, sup: Supervisor, **fixed: Any) -> Run:
    """Model, batches, optimizer and scheduler as the config says, for `splits` on `device` (fresh weights, or a
    resume's: restore() loads the rest of its state); `fixed`: Run's other fields (started, overrides, choices)."""
    t = cfg.trainer
    if world.distributed and cfg.optimizer.lr == "auto":
        raise ConfigError("optimizer.lr=auto runs the LR range test, which is single-process: run "
                          "`cifar-cam lr-find` first and pass its optimizer.lr=... to the DDP run")
    note_validation_cost(splits)
    if resume is not None:
        check_classes(resume, splits)
    model = model_from_config(cfg.model, splits.num_classes, splits.image_size)
    if resume is not None:  # with an EMA, `model` holds the average and `model_raw` the trained weights
        model.load_state_dict(resume.get("model_raw", resume["model"]))
        freeze(model, cfg.model.get("freeze"))
    else:
        start_weights(model, cfg, splits, out if world.is_main else None)
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
                                  drop_last=t.compile, mean=splits.mean, std=splits.std,
                                  sampler=cfg.data.get("sampler"))
    if t.compile:
        note_dropped_batch(len(splits.train), cfg.data.batch_size, world.size)
    if resume is not None and resume.get("steps_per_epoch") not in (None, len(batches)):
        raise ConfigError(f"trainer.compile={str(t.compile).lower()} makes {len(batches)} steps an epoch, but the run "
                          f"being resumed took {resume['steps_per_epoch']} (a compiled run drops each epoch's last "
                          f"partial batch); resume with trainer.compile={str(not t.compile).lower()}")
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    if cfg.optimizer.lr == "auto":  # the range test's rate is this run's, in its config and its checkpoints
        from cifar_cam.training.lr_finder import suggest_lr_for_training

        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.optimizer.lr = suggest_lr_for_training(cfg, model, batches, criterion, device, out, sup)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler, interval = build_scheduler(cfg, optimizer, t.epochs, len(batches))
    amp_dtype = resolve_precision(t.precision, device)
    # Evaluation uses the plain `model` (eager): a compiled one would recompile for eval mode and other batch sizes;
    # checkpoints save it too (no _orig_mod. prefix).
    train_model = distributed.wrap(model, device, sync_batchnorm=t.get("sync_batchnorm", False)) \
        if world.distributed else model  # [ddp] gradients all-reduced through DDP
    if t.compile:  # static shapes: a shape it has not seen is a recompile, counted in summary.json
        train_model = torch.compile(train_model, dynamic=False)
    return Run(cfg=cfg, out=out, device=device, world=world, splits=splits, model=model, train_model=train_model,
               optimizer=optimizer, scheduler=scheduler, interval=interval,
               scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None, batches=batches,
               val_batches=(EvalBatches(splits.val, cfg.eval.batch_size, device, splits.mean, splits.std)
                            if splits.val is not None else None),
               criterion=criterion, amp_dtype=amp_dtype,
               eval_dtype=resolve_precision(str(cfg.eval.get("precision", "fp32")), device),
               num_params=sum(p.numel() for p in model.parameters()),
               steps_per_epoch=len(batches), ema=ema, **fixed)


def adopt_plan(run: Run, state: RunState, plan: Plan) -> None:
    """`plan` is the one the run follows from now on: in the state (and so in the next checkpoint) and in
    plan.json (rank 0)."""
    state.plan = plan
    if run.world.is_main:
        plan.save(run.out / "plan.json")


def with_plan(run: Run, state: RunState, plan: Plan) -> Run:
    """The run following `plan` from its start: adopted, and its LR schedule laid over the plan's steps."""
    adopt_plan(run, state, plan)
    scheduler, interval = build_scheduler(run.cfg, run.optimizer, plan.epochs, run.steps_per_epoch,
                                          revisions=plan.revisions)
    return dataclasses.replace(run, scheduler=scheduler, interval=interval)


def restore(run: Run, state: RunState, resume: dict[str, Any]) -> None:
    """Optimizer, scheduler, scaler, RNG and loop state from the checkpoint; changed hyperparameters applied."""
    try:
        run.optimizer.load_state_dict(resume["optimizer"])
    except ValueError as e:  # torch: the saved parameter groups are not this optimizer's
        raise CheckpointError(f"{resume['path']}: its optimizer state does not fit this run's optimizer ({e}): it "
                              f"was grouped by another version of cifar-cam; start a new run from its weights with "
                              f"model.pretrained={resume['path']}") from None
    if run.scheduler is not None and resume.get("scheduler") is not None:
        run.scheduler.load_state_dict(resume["scheduler"])
    if run.scaler is not None and resume.get("scaler") is not None:
        run.scaler.load_state_dict(resume["scaler"])
    set_rng_state(resume["rng"], run.device)
    state.load_checkpoint(resume)
    if run.world.is_main:  # epochs after the last checkpoint write (trainer.checkpoint_every) are redone
        write_csv(run.out / "metrics.csv", state.history, METRIC_FIELDS)
    # load_state_dict brought back the run's hyperparameters: the command line's changes go on top
    apply_resume_changes(resume_changes(resume["config"], run.cfg), run.optimizer, run.scheduler)
    where = f"at epoch {state.epoch + 1}, step {state.partial['step'] + 1}" if state.partial else \
        f"after epoch {state.epoch}"
    log.info("resuming %s %s", resume["path"], where)
    if resume.get("num_threads", torch.get_num_threads()) != torch.get_num_threads() and run.device.type == "cpu":
        log.warning("the run used %d CPU threads, this process %d: results will differ in the last digits "
                    "from an uninterrupted run (trainer.num_threads=%d for bit-identical ones)",
                    resume["num_threads"], torch.get_num_threads(), resume["num_threads"])


# -- checkpoints ---------------------------------------------------------------------------------------------------

def checkpoint_payload(run: Run, state: RunState, partial: EpochTotals | None = None) -> dict[str, Any]:
    """The checkpoint of the run as it stands (with `partial`: an epoch a signal cut short)."""
    weights = {"model": run.eval_model.state_dict()}  # what eval, gradcam, predict and export load
    if run.ema is not None:  # the trained weights and the average's progress: a resume continues both
        weights.update(model_raw=run.model.state_dict(), ema_updates=run.ema.updates)
    return {
        **weights, "optimizer": run.optimizer.state_dict(),
        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "epoch": state.epoch, "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs, "history": state.history,
        "partial": None if partial is None else partial.to_dict(),
        "rng": rng_state(run.device), "classes": run.splits.classes,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "overrides": list(run.overrides), "choices": dict(run.choices), "num_params": run.num_params,
        "train_images": state.train_images, "train_seconds": state.train_seconds,
        "num_threads": torch.get_num_threads(), "steps_per_epoch": run.steps_per_epoch,
        # the trackers' run ids and the records not yet written to them: committed after this checkpoint is
        # written, and again (skipping what they hold) by a resume from it, so each step is logged once
        "logger": None if run.trackers is None else run.trackers.state(),
        "plan": None if state.plan is None else state.plan.to_dict(),  # a resume continues it (plan.json too)
        # the data it trained on, to find it again: its split (file sources), seed, size and resize policy, and the
        # normalization the model expects (eval, gradcam, predict, export and serve use these, not recomputed ones)
        "data": {**run.splits.identity, "mean": list(run.splits.mean), "std": list(run.splits.std)},
    }


def save(run: Run, state: RunState, name: str, sup: Supervisor, payload: dict[str, Any]) -> None:
    """checkpoints/<name>.pt, atomically; the watchdog counts the write as progress."""
    sup.beat(f"epoch {state.epoch}, writing {name}.pt")
    save_checkpoint(payload, run.ckpt_dir / f"{name}.pt")
    sup.beat(f"epoch {state.epoch}, {name}.pt written")


def write_checkpoints(run: Run, state: RunState, sup: Supervisor, payload: dict[str, Any]) -> None:
    """last.pt (`payload`: the run as it stands, maybe with a partial epoch), and best.pt when a better epoch came
    since the last write (trainer.checkpoint_every: it waits in memory until then)."""
    if state.pending_best is not None:
        save(run, state, "best", sup, state.pending_best)
        state.pending_best = None
    save(run, state, "last", sup, payload)
    state.saved_epoch = state.epoch
    if run.val_batches is None and payload.get("partial") is None:  # no val split: best.pt is the last epoch
        copy_checkpoint(run.ckpt_dir / "last.pt", run.ckpt_dir / "best.pt")
    if run.trackers is not None:  # only what a checkpoint holds reaches the trackers
        run.trackers.commit()
    sup.last_checkpoint = f"{run.ckpt_dir / 'last.pt'} (epoch {state.epoch})"


# -- trainer.compile -----------------------------------------------------------------------------------------------

def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(run: Run, state: RunState, sup: Supervisor) -> float | None:
    """Compiles the training step before epoch 1, one forward + backward per training image size on zeros, and
    puts the weights back: compile time stays out of the epochs' seconds. Returns its seconds (None: no compile)."""
    t = run.cfg.trainer
    epochs = epochs_to_run(run, state)
    if not t.compile or state.epoch >= epochs or already_stopped_early(run, state):  # nothing left to train
        return None
    sizes = sorted({epoch_size(run, state, e) for e in range(state.epoch + 1, epochs + 1)}
                   | ({run.full_size} if run.plan_mode == "budget" else set()))  # a budget may plan full-size epochs
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
    state.graphs_after_warm_up = compiled_graphs()
    log.info("compiled the training step in %.1fs (%s px; summary.json: compile_seconds)", seconds,
             ", ".join(map(str, sizes)))
    return seconds
