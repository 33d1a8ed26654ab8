"""One training epoch and one evaluation pass: objects in, numbers out. No Hydra, no files.

Metrics are accumulated on the device and read back only every `log_every` steps, so a GPU
never waits for the host in the middle of an epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifar_cam.config.choices import TTA_MODES
from cifar_cam.errors import DivergenceError
from cifar_cam.training.device import autocast, input_memory_format

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass
class EpochTotals:
    """Running sums of one training epoch; saved in a checkpoint when a signal stops it mid-way."""

    step: int = 0            # batches done
    loss_sum: float = 0.0    # sum of per-image losses
    correct: float = 0     # hits; a mixed batch counts its target weights (engine.hit_rate)
    count: int = 0
    seconds: float = 0.0
    last_lr: float = 0.0     # learning rate of the last step taken (what metrics.csv reports)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def acc(self) -> float:
        return self.correct / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochResult:
    """What train_one_epoch returns: the totals, and whether a stop request cut it short."""

    totals: EpochTotals
    interrupted: bool = False


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Scales the optimizer's gradients so that their global L2 norm is at most `max_norm`; returns the norm
    before clipping. Under DDP the gradients are already all-reduced, so every rank clips alike."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def backward_and_step(loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                      grad_clip: float | None = None) -> None:
    """One optimizer step from `loss` (through the fp16 GradScaler when there is one).

    `grad_clip`: the gradients' global norm is clipped to it first; with a GradScaler they are unscaled
    before (the norm is of the true gradients) and a step with inf/NaN gradients is still skipped.
    """
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            clip_gradients(optimizer, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            clip_gradients(optimizer, grad_clip)
        optimizer.step()


def hit_rate(logits: Tensor, targets: Tensor) -> Tensor:
    """Correct predictions of a batch: for class-index targets the count of argmax hits; for soft targets (N, C)
    (MixUp / CutMix) the target weight each prediction lands on, summed (lam for hitting the first image's class,
    1 - lam for the second's): the expected accuracy under the mixed labels."""
    predicted = logits.argmax(1)
    if targets.dim() == 1:
        return (predicted == targets).sum().double()
    return targets.gather(1, predicted[:, None]).sum().double()


# (this rank's first non-finite-loss step or -1, stop asked here) -> the same two facts agreed by every rank
Agree = Callable[[int, bool], tuple[int, bool]]


def train_one_epoch(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    step_scheduler: Any | None = None,
    log_every: int = 1,
    start: EpochTotals | None = None,
    on_progress: Callable[[EpochTotals, int], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    agree: Agree | None = None,
    epoch: int = 0,
    heartbeat: Callable[[int], None] | None = None,
    grad_clip: float | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochResult:
    """One pass over `batches` (continuing from `start` after a resume); returns the epoch totals.

    Metrics are read every `log_every` steps and after the last one. Under DDP only there is `should_stop()`
    asked and `agree(first_bad, stop)` called (one collective a read), so every rank stops after the same
    step, or raises the same DivergenceError at the earliest non-finite loss of any rank; one process
    (`agree` None) asks after every step.
    `heartbeat(step)` is called after every optimizer step (the stall watchdog's clock), `after_step()` right after
    the optimizer step (the weights' EMA). Labels are class indices (N,) or soft targets (N, C) (MixUp / CutMix).
    """
    model.train()
    totals = EpochTotals(**(start.to_dict() if start else {}))
    t0 = time.perf_counter() - totals.seconds
    # Device-side accumulators: no host sync per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    lrs: list[float] = []
    total_steps = totals.step + len(batches)  # type: ignore[arg-type]
    memory_format = input_memory_format(model)

    def read() -> bool:
        """Moves the device sums into `totals`; True when a stop was asked (on any rank)."""
        nonlocal count
        bad, stop = int(first_bad), should_stop()  # int(): the host waits for the device here anyway
        if agree is not None:
            bad, stop = agree(bad, stop)
        if bad >= 0:
            lr = lrs[bad - totals.step] if 0 <= bad - totals.step < len(lrs) else optimizer.param_groups[0]["lr"]
            raise DivergenceError(
                f"loss became NaN/inf at epoch {epoch}, step {bad + 1} (lr {lr:.3g}); lower optimizer.lr, "
                "use a warmup scheduler (scheduler=onecycle) or trainer.precision=fp32"
            )
        totals.loss_sum += float(loss_sum)
        totals.correct += float(correct)
        totals.count += count
        totals.step += len(lrs)
        if lrs:
            totals.last_lr = lrs[-1]
        totals.seconds = time.perf_counter() - t0
        loss_sum.zero_(), correct.zero_(), lrs.clear()
        count = 0
        return stop

    interrupted = False
    for images, labels in batches:
        lrs.append(optimizer.param_groups[0]["lr"])
        images = images.contiguous(memory_format=memory_format)  # a no-op when the batch already matches
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, labels)
        backward_and_step(loss, optimizer, scaler, grad_clip)
        if after_step is not None:
            after_step()
        if step_scheduler is not None:
            step_scheduler.step()
        step = totals.step + len(lrs) - 1
        loss = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss.double() * len(labels)
        correct += hit_rate(logits.detach(), labels)
        count += len(labels)
        if heartbeat is not None:
            heartbeat(step)
        # One process asks for a stop after every step (free); ranks only at reads, where they agree anyway.
        if len(lrs) >= log_every or step + 1 == total_steps or (agree is None and should_stop()):
            interrupted = read()
            if on_progress is not None:
                on_progress(totals, total_steps)
            if interrupted:
                break
    if lrs:  # fewer batches than len() said: every rank has as many (padded shards), so all of them read here
        interrupted = read()
    return EpochResult(totals, interrupted)


@dataclass
class SplitLogits:
    """Logits (N, C) float32 and labels (N,) of a whole split, on the CPU."""

    logits: Tensor
    labels: Tensor

    @property
    def predicted(self) -> Tensor:
        return self.logits.argmax(1)

    @property
    def confidence(self) -> Tensor:
        return self.logits.softmax(1).max(1).values


def tta_views(tta: bool | str) -> int:
    """Forward passes an image costs at eval.tta=`tta`: false 1, true (flip) 2, translate 6."""
    return TTA_MODES[tta][0]


def tta_suffix(tta: bool | str) -> str:
    """What a log line of an accuracy adds for eval.tta (nothing when off)."""
    return TTA_MODES[tta][1]


def _mirrored(model: nn.Module, images: Tensor) -> Tensor:
    return (model(images).float() + model(images.flip(3)).float()) / 2


def tta_logits(model: nn.Module, images: Tensor, tta: bool | str = False) -> Tensor:
    """The model's float logits for a batch at eval.tta=`tta`: false, the image's; true, the mean of the image's and
    its mirror's; "translate" (airbench94's level 2), half that mean and half the mean of the same for the image
    shifted by one pixel up-left and down-right (reflect-padded)."""
    if not tta:
        return model(images).float()
    logits = _mirrored(model, images)
    if tta == "translate":
        h, w = images.shape[2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
        shifted = [s.contiguous(memory_format=input_memory_format(model)) for s in shifted]
        logits = (logits + (_mirrored(model, shifted[0]) + _mirrored(model, shifted[1])) / 2) / 2
    return logits


@torch.inference_mode()
def collect_logits(model: nn.Module, batches: Batches, *, device: torch.device, amp_dtype: torch.dtype | None = None,
            tta: bool | str = False, heartbeat: Callable[[], None] | None = None) -> SplitLogits:
    """Logits for every batch, at eval.tta=`tta` (tta_logits).

    `heartbeat()` is called after every batch (the stall watchdog's clock).
    """
    model.eval()
    memory_format = input_memory_format(model)
    all_logits, all_labels = [], []
    for images, labels in batches:
        images = images.contiguous(memory_format=memory_format)
        with autocast(device, amp_dtype):
            logits = tta_logits(model, images, tta)
        all_logits.append(logits)
        all_labels.append(labels)
        if heartbeat is not None:
            heartbeat()
    return SplitLogits(torch.cat(all_logits).float().cpu(), torch.cat(all_labels).cpu())


@dataclass
class EvalResult:
    """Accuracy and loss of a split, with the per-class view."""

    loss: float
    acc: float
    n: int
    confusion: Tensor                      # (C, C): rows true class, columns predicted
    per_class_acc: list[float] = field(default_factory=list)


def metrics_from(predictions: SplitLogits, num_classes: int) -> EvalResult:
    """Cross-entropy, accuracy, confusion matrix and per-class accuracy of predictions."""
    labels, predicted = predictions.labels, predictions.predicted
    n = len(labels)
    loss = F.cross_entropy(predictions.logits, labels).item() if n else float("nan")
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, -1)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    acc = (predicted == labels).double().mean().item() if n else float("nan")
    return EvalResult(loss=loss, acc=acc, n=n, confusion=confusion, per_class_acc=per_class)


def evaluate(model: nn.Module, batches: Batches, num_classes: int, *, device: torch.device,
             amp_dtype: torch.dtype | None = None, tta: bool | str = False,
             heartbeat: Callable[[], None] | None = None) -> EvalResult:
    """collect_logits + metrics_from."""
    logits = collect_logits(model, batches, device=device, amp_dtype=amp_dtype, tta=tta, heartbeat=heartbeat)
    return metrics_from(logits, num_classes)


def misclassified(predictions: SplitLogits, select: str = "most_confident", limit: int | None = None,
                  seed: int = 0, classes: list[int] | None = None) -> torch.Tensor:
    """Row numbers of wrong predictions: most confident first, in dataset order, or a seeded random pick;
    select='correct' gives the most confident right ones instead. `classes`: only images of these true labels."""
    keep = (predictions.predicted == predictions.labels) if select == "correct" else (
        predictions.predicted != predictions.labels)
    if classes is not None:
        keep &= torch.isin(predictions.labels, torch.as_tensor(classes, dtype=predictions.labels.dtype))
    rows = torch.nonzero(keep).flatten()
    if select in ("most_confident", "correct"):
        rows = rows[predictions.confidence[rows].argsort(descending=True, stable=True)]
    elif select == "random":
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return rows if limit is None else rows[:limit]
