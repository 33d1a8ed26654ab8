"""The LR range test of torch-lr-finder: the LR grows exponentially for `lr_find.num_iter` steps while the
(smoothed) loss is recorded; lr_find.png, lr_find.json and the train command that trains with the suggestion.

Used by `cifar-cam lr-find` (tasks/lr_find.py) and by `cifar-cam train optimizer.lr=auto`, which runs the same
test in its run dir and trains with the result. Afterwards the model and optimizer are exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch_lr_finder.lr_finder as lr_finder_module
from omegaconf import DictConfig
from torch import Tensor, nn
from torch_lr_finder import LRFinder, TrainDataLoaderIter

from cifar_cam import viz
from cifar_cam.config.recipe import command_line, overrides_for
from cifar_cam.data.augment import TrainBatches
from cifar_cam.errors import DivergenceError, TrainingInterrupted
from cifar_cam.io import write_json
from cifar_cam.logs import Bars
from cifar_cam.models import describe_model
from cifar_cam.training.device import resolve_precision
from cifar_cam.training.optim import build_optimizer
from cifar_cam.training.supervise import Supervisor

log = logging.getLogger("cifar_cam.lr_find")

# torch-lr-finder's plot() ignores the first 10 and last 5 points when it suggests an LR;
# with fewer than 17 points there is nothing to suggest.
SKIP_START, SKIP_END = 10, 5
MIN_POINTS = SKIP_START + SKIP_END + 2
SUGGESTION_NOTE = ("the LR where the smoothed loss falls fastest (steepest negative gradient, torch-lr-finder's "
                   "rule, first 10 and last 5 points ignored): a starting point for training, not an optimum")


@dataclass
class RangeTest:
    """What one LR range test found: the LR and smoothed-loss history, and the suggestion (or None)."""

    lrs: list[float]
    losses: list[float]
    num_iter: int
    start_lr: float
    end_lr: float
    stopped_early: bool        # the loss exceeded diverge_th x its best, or became NaN/inf
    non_finite: bool           # the loss became NaN/inf (those points are left out of the history)
    suggested_lr: float | None
    seconds: float

    @property
    def steps(self) -> int:
        return len(self.lrs)


class _NonFiniteLoss(Exception):
    """Stops torch-lr-finder's loop: it does not stop by itself on NaN (NaN > x is False)."""


class BatchesIter(TrainDataLoaderIter):
    """torch-lr-finder's view of our training batches (normalized, on the device): a new epoch when they run out."""

    def __init__(self, batches: TrainBatches, finder: LRFinder, on_step: Callable[[int], None] | None = None) -> None:
        self.epoch = 0
        batches.set_epoch(self.epoch)
        super().__init__(batches, auto_reset=True)
        self.finder, self.on_step, self.steps = finder, on_step, 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        # Called once per step, before it: the previous step's loss is in the history by now
        # (range_test replaces finder.history, so look it up each time).
        losses = self.finder.history["loss"]
        if losses and not math.isfinite(losses[-1]):
            raise _NonFiniteLoss
        if self.on_step is not None and self.steps:
            self.on_step(self.steps)
        self.steps += 1
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.data_loader.set_epoch(self.epoch)
            self._iterator = iter(self.data_loader)
            return next(self._iterator)


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """Silences torch-lr-finder's tqdm bar and prints ("See the graph with {finder_name}.plot()"): ours replace them."""
    with mock.patch.object(lr_finder_module, "tqdm", lambda iterable, **kwargs: iterable), \
            mock.patch.object(lr_finder_module, "print", lambda *a, **k: log.debug(" ".join(map(str, a))),
                              create=True):
        yield


def steepest_gradient_lr(lrs: Sequence[float], losses: Sequence[float], skip_start: int = SKIP_START,
                         skip_end: int = SKIP_END) -> float | None:
    """torch-lr-finder's suggestion (LRFinder.plot): the LR at the minimum of np.gradient(loss); None if too few."""
    if len(lrs) < skip_start + skip_end + 2:
        return None
    end = len(lrs) - skip_end
    return float(lrs[skip_start:end][int(np.gradient(np.asarray(losses[skip_start:end])).argmin())])


def run_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                   batches: TrainBatches, *, device: torch.device, start_lr: float, end_lr: float,
                   num_iter: int, smooth_f: float = 0.05, diverge_th: float = 5.0,
                   amp_dtype: torch.dtype | None = None,
                   on_step: Callable[[int, float, float], None] | None = None) -> RangeTest:
    """torch-lr-finder's exponential range test; model, optimizer, train/eval mode and torch RNG end as they began."""
    was_training = model.training
    rng = torch.get_rng_state()
    amp: dict[str, Any] = {}
    if amp_dtype is not None:
        amp = {"amp_backend": "torch", "amp_config": {"device_type": device.type, "dtype": amp_dtype},
               "grad_scaler": torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)}
    finder = LRFinder(model, optimizer, criterion, device=device, memory_cache=True, **amp)  # snapshots both

    def step_done(step: int) -> None:
        if on_step is not None and finder.history["loss"]:
            on_step(step, finder.history["lr"][-1], finder.history["loss"][-1])

    batches_iter = BatchesIter(batches, finder, step_done)
    non_finite = False
    started = time.perf_counter()
    try:
        with _quiet_library():
            finder.range_test(batches_iter, start_lr=start_lr, end_lr=end_lr, num_iter=num_iter, step_mode="exp",
                              smooth_f=smooth_f, diverge_th=diverge_th)
    except _NonFiniteLoss:
        non_finite = True
    finally:
        finder.reset()  # the weights and optimizer state of the snapshot (GOTCHAS: otherwise perturbed)
        model.train(was_training)
        torch.set_rng_state(rng)
    lrs, losses = list(finder.history["lr"]), list(finder.history["loss"])
    while losses and not math.isfinite(losses[-1]):  # NaN/inf (also when it happened at the very last step)
        lrs.pop(), losses.pop()
        non_finite = True
    stopped_early = non_finite or len(finder.history["lr"]) < num_iter
    return RangeTest(lrs=[float(x) for x in lrs], losses=[float(x) for x in losses], num_iter=num_iter,
                     start_lr=start_lr, end_lr=end_lr, stopped_early=stopped_early, non_finite=non_finite,
                     suggested_lr=steepest_gradient_lr(lrs, losses), seconds=time.perf_counter() - started)


# Keys of the range test's config that a train command does not take from it
NOT_FOR_TRAINING = ("command", "ckpt", "lr_find", "gradcam", "optimizer.lr")


def train_command(cfg: DictConfig, lr: float, choices: dict[str, str]) -> str:
    """`cifar-cam train ... optimizer.lr=LR` that trains what this range test measured: its model, data,
    augmentation, optimizer and trainer settings (from the command line, a preset or ckpt=), as given by
    `cfg` and its group `choices`."""
    return command_line("train", overrides_for(cfg, "train", choices, skip=NOT_FOR_TRAINING,
                                               extra=[f"optimizer.lr={lr:.3g}"]))


def range_test_to_files(cfg: DictConfig, model: nn.Module, batches: TrainBatches, criterion: nn.Module,
                        device: torch.device, out: Path, sup: Supervisor) -> RangeTest:
    """Runs the configured range test with a throwaway optimizer; writes lr_find.json and lr_find.png to `out`."""
    lf = cfg.lr_find
    # A fresh optimizer of the configured kind: no scheduler may wrap it (GOTCHAS #81), and the one
    # training uses is built after this test, from scratch.
    optimizer = build_optimizer(cfg.optimizer, model, lr=float(lf.start_lr))
    amp_dtype = resolve_precision(cfg.trainer.precision, device)
    report_every = max(1, lf.num_iter // 10)
    log.info("LR range test: %d steps, lr %.3g -> %.3g (exponential), %s, batch %d", lf.num_iter, lf.start_lr,
             lf.end_lr, type(optimizer).__name__, cfg.data.batch_size)

    with Bars("lr-find", lf.num_iter) as bars:
        def on_step(step: int, lr: float, loss: float) -> None:
            sup.beat(f"LR range test step {step}", step=True)
            if sup.requested() and sup.armed:  # a first signal: stop after this step
                name = signal.Signals(sup.signum).name  # type: ignore[arg-type]
                raise TrainingInterrupted(f"{name}: stopped the LR range test after step {step}; nothing was "
                                          "written", sup.signum)  # type: ignore[arg-type]
            bars.advance_outer(step, f"lr {lr:.2e}  loss {loss:.4f}")
            if step % report_every == 0:
                log.info("step %d/%d  lr %.3g  smoothed loss %.4g", step, lf.num_iter, lr, loss)

        result = run_range_test(model, optimizer, criterion, batches, device=device, start_lr=float(lf.start_lr),
                                end_lr=float(lf.end_lr), num_iter=int(lf.num_iter), smooth_f=float(lf.smooth_f),
                                diverge_th=float(lf.diverge_th), amp_dtype=amp_dtype, on_step=on_step)

    best = int(np.argmin(result.losses)) if result.losses else None
    note = None
    if result.suggested_lr is None:
        diverged = "became NaN/inf" if result.non_finite else "diverged"
        why = (f"the loss {diverged} after {result.steps} of {result.num_iter} steps" if result.stopped_early
               else f"lr_find.num_iter={result.num_iter} gives only {result.steps} points")
        note = (f"{why}: too few points (< {MIN_POINTS}) to suggest an LR; lower lr_find.end_lr (or start_lr) "
                "or raise lr_find.num_iter")
    elif result.stopped_early:
        note = f"stopped after {result.steps} of {result.num_iter} steps: the loss diverged at lr {result.lrs[-1]:.3g}"

    write_json(out / "lr_find.json", {
        "suggested_lr": result.suggested_lr,
        "suggestion": SUGGESTION_NOTE,
        "lowest_loss": None if best is None else result.losses[best],
        "lowest_loss_lr": None if best is None else result.lrs[best],
        "steps": result.steps, "num_iter": result.num_iter, "stopped_early": result.stopped_early,
        "non_finite_loss": result.non_finite, "note": note,
        "start_lr": result.start_lr, "end_lr": result.end_lr, "smooth_f": float(lf.smooth_f),
        "diverge_th": float(lf.diverge_th), "optimizer": type(optimizer).__name__,
        "batch_size": cfg.data.batch_size, "seconds": round(result.seconds, 3),
        "lr": result.lrs, "loss": result.losses,
    })
    title = (f"LR range test: {describe_model(cfg.model)}, {type(optimizer).__name__}, "
             f"batch {cfg.data.batch_size}, {result.steps} steps"
             + (f"\nfresh weights, the recipe of {cfg.ckpt}" if cfg.get("ckpt") else ""))
    viz.plot_lr_find(result.lrs, result.losses, out / "lr_find.png", suggested_lr=result.suggested_lr,
                     skip_start=SKIP_START, skip_end=SKIP_END, title=title, note=note)

    if best is not None:
        log.info("LR range test: %d steps in %.1f s; lowest smoothed loss %.4f at lr %.3g", result.steps,
                 result.seconds, result.losses[best], result.lrs[best])
    if note is not None and result.suggested_lr is None:
        log.warning("no suggested LR: %s (plot and history in %s)", note, out / "lr_find.png")
    elif note is not None:
        log.info("%s", note)
    if result.suggested_lr is not None:
        log.info("suggested LR %.3g: %s", result.suggested_lr, SUGGESTION_NOTE)
    return result


def suggest_lr_for_training(cfg: DictConfig, model: nn.Module, batches: TrainBatches, criterion: nn.Module,
                            device: torch.device, out: Path, sup: Supervisor) -> float:
    """optimizer.lr=auto: the range test in the train run dir (lr_find.png/json); returns the suggested LR.

    The model comes back unchanged; the caller builds its optimizer and scheduler afterwards.
    """
    result = range_test_to_files(cfg, model, batches, criterion, device, out, sup)
    if result.suggested_lr is None:
        raise DivergenceError(f"optimizer.lr=auto: no LR to suggest ({result.steps} of {result.num_iter} steps of "
                              f"the range test; see {out / 'lr_find.png'}); pass optimizer.lr=<number> or lower "
                              "lr_find.end_lr / raise lr_find.num_iter")
    log.info("optimizer.lr=auto -> %.3g", result.suggested_lr)
    return float(f"{result.suggested_lr:.3g}")
