"""LR schedules that a time-budgeted run can lengthen or shorten mid-run: OneCycle and cosine over revised steps.

A budgeted run re-plans its epochs at epoch boundaries (cifar_cam.budget), so the schedule's length changes
after it started. Each scheduler here is stepped once per optimizer step, and its LR (and cycled momentum) is a
pure function of the step and the list of revisions [(at_step, total_steps), ...] (the first at step 0): the
schedule's shape is laid over a progress p(step) in [0, 1], continuous and piecewise linear, and a revision at
step a spreads the progress still to go, 1 - p(a), over the steps a .. new_total - 1, so the LR moves on from
where it was (no jump) and still reaches its floor at the new end (Li et al., "Budgeted Training", ICLR 2020:
decay to ~zero at the budget's end). The revisions are part of state_dict: a resume continues exactly, and
replaying a plan's revisions from step 0 reproduces every LR.

With one revision (no re-plan) `BudgetOneCycleLR` is torch's OneCycleLR (same arguments, same phase boundaries,
the same formulas) and `BudgetCosineLR` is CosineAnnealingLR's closed form, on every step the optimizer takes;
past the end they hold the floor (OneCycleLR raises past total_steps, and extrapolates below its floor at it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def _per_group(name: str, optimizer: Optimizer, value: float | Sequence[float]) -> list[float]:
    """One value per param group (a list must have one per group), as torch's OneCycleLR takes them."""
    if isinstance(value, list | tuple):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"{name} has {len(value)} values for {len(optimizer.param_groups)} param groups")
        return [float(v) for v in value]
    return [float(value)] * len(optimizer.param_groups)


def in_scheduler_steps(revisions: Sequence[Sequence[int]], interval: str, steps_per_epoch: int) -> list[list[int]]:
    """A plan's [at_step, total_steps] revisions (in optimizer steps) in the steps of a scheduler stepped per
    'step' (the same) or per 'epoch' (epochs, the total rounded up)."""
    unit = 1 if interval == "step" else steps_per_epoch
    return [[int(at) // unit, -(-int(total) // unit)] for at, total in revisions]


class RevisedSchedule(LRScheduler):
    """A schedule shape f(v) over a 'virtual step' v in [0, V] (V = the first revision's total_steps - floor_offset),
    with the steps mapped onto v by the revisions; subclasses set floor_offset and implement `_values(v)`.

    floor_offset 1: the floor is the LR of the last step (total_steps - 1), as OneCycleLR; 0: it comes one step
    after it (at total_steps), as CosineAnnealingLR.
    """

    floor_offset = 0
    use_beta1 = False  # cycled momentum goes to Adam's beta1, not `momentum`

    def _init_revisions(self, total_steps: int | None, revisions: Sequence[Sequence[int]] | None) -> None:
        if revisions is None:
            if total_steps is None:
                raise ValueError("give total_steps or revisions")
            revisions = [(0, total_steps)]
        revs = [[int(a), int(t)] for a, t in revisions]
        if total_steps is not None and revs[-1][1] != total_steps:
            raise ValueError(f"total_steps={total_steps} differs from the last revision's {revs[-1][1]}")
        self._check_revisions(revs)
        self.revisions = revs
        self.total_steps = revs[-1][1]
        self._segments = self._build_segments(revs)

    def _check_revisions(self, revs: list[list[int]]) -> None:
        if not revs or revs[0][0] != 0:
            raise ValueError(f"revisions must start at step 0, got {revs}")
        if revs[0][1] - self.floor_offset < 1:
            raise ValueError(f"the first revision needs total_steps >= {1 + self.floor_offset}, got {revs[0][1]}")
        for (a, _), (b, t) in zip(revs, revs[1:], strict=False):
            if b <= a or t < b:
                raise ValueError(f"revisions must have increasing steps, each with total_steps >= its step: {revs}")

    def _build_segments(self, revs: list[list[int]]) -> list[tuple[int, int, float]]:
        """(at_step, total_steps, v at at_step) per revision: each starts where the one before had got to."""
        end = float(revs[0][1] - self.floor_offset)
        segments: list[tuple[int, int, float]] = []
        for a, t in revs:
            va = self._virtual_in(segments[-1], a, end) if segments else 0.0
            segments.append((a, t, va))
        return segments

    def _virtual_in(self, segment: tuple[int, int, float], step: int, end: float) -> float:
        a, t, va = segment
        span = t - self.floor_offset - a  # the steps a .. t - offset carry the progress va -> end
        if span <= 0:
            return va if step <= a else end
        return min(end, va + (end - va) * (step - a) / span)

    def virtual_step(self, step: int) -> float:
        """The step of the first revision's schedule that `step` is at (step itself until a revision)."""
        end = float(self.revisions[0][1] - self.floor_offset)
        segment = self._segments[0]
        for candidate in self._segments[1:]:
            if candidate[0] > step:
                break
            segment = candidate
        return self._virtual_in(segment, max(0, step), end)

    def progress(self, step: int) -> float:
        """p(step) in [0, 1]: how far through its shape the schedule is at `step`."""
        return self.virtual_step(step) / (self.revisions[0][1] - self.floor_offset)

    def revise(self, at_step: int, total_steps: int) -> None:
        """From `at_step` (>= the steps already taken) on, the schedule ends at `total_steps`; a revision at the
        step of the last one replaces it. The LR stays continuous and reaches the floor at the new end."""
        at_step, total_steps = int(at_step), int(total_steps)
        if at_step < self.last_epoch:
            raise ValueError(f"cannot revise at step {at_step}: {self.last_epoch} steps were already taken")
        revs = [list(r) for r in self.revisions if r[0] < at_step] + [[at_step, total_steps]]
        self._check_revisions(revs)
        self.revisions, self.total_steps, self._segments = revs, total_steps, self._build_segments(revs)

    def lr_at(self, step: int) -> list[float]:
        """The LR of each param group at `step` (no side effects)."""
        return [lr for lr, _ in self._values(self.virtual_step(step))]

    def _values(self, v: float) -> list[tuple[float, float | None]]:
        """(lr, momentum or None) per param group at virtual step v."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The LRs of the current step (self.last_epoch); sets the cycled momentum as a side effect, as OneCycleLR."""
        values = self._values(self.virtual_step(self.last_epoch))
        for group, (_, momentum) in zip(self.optimizer.param_groups, values, strict=True):
            if momentum is not None:
                if self.use_beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        return [lr for lr, _ in values]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer and the derived segments; a copy (a later revise leaves it as it was)."""
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_segments")})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = copy.deepcopy(state_dict)
        state.pop("_segments", None)
        self.__dict__.update(state)
        self.revisions = [[int(a), int(t)] for a, t in self.revisions]
        self._check_revisions(self.revisions)
        self._segments = self._build_segments(self.revisions)


class BudgetOneCycleLR(RevisedSchedule):
    """torch's OneCycleLR (two phases) over revisable steps: warm-up from max_lr / div_factor to max_lr over the
    first pct_start of the steps, then anneal ('cos' or 'linear') to max_lr / (div_factor * final_div_factor);
    with cycle_momentum, momentum (or Adam's beta1) runs max_momentum -> base_momentum -> max_momentum.

    max_lr, base_momentum and max_momentum take one value or one per param group; max_lr=None peaks each group
    at its own lr. The phase boundaries are the first revision's (as OneCycleLR's with its total_steps); a
    revision moves the steps, not the shape. Muon's groups keep their ratio through their own `lr_scale`.
    """

    floor_offset = 1

    def __init__(self, optimizer: Optimizer, max_lr: float | Sequence[float] | None = None,
                 total_steps: int | None = None, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum: float | Sequence[float] = 0.85,
                 max_momentum: float | Sequence[float] = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False,
                 revisions: Sequence[Sequence[int]] | None = None, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if three_phase:
            raise ValueError("three_phase=True is not supported: the budgeted OneCycle has two phases")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        if not 0.0 <= float(pct_start) <= 1.0:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
        self.optimizer = optimizer
        self._init_revisions(total_steps, revisions)
        self.pct_start, self.anneal_strategy = float(pct_start), anneal_strategy
        first = self.revisions[0][1]
        # OneCycleLR's phase ends: step pct_start * T - 1 (the peak) and T - 1 (the floor), of the first plan's T
        self._phase_end = float(self.pct_start * first) - 1
        if self._phase_end == 0 or first - 1 == self._phase_end:
            raise ValueError(f"pct_start={pct_start} of {first} steps leaves a phase of no steps")
        if max_lr is None:
            max_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        else:
            max_lrs = _per_group("max_lr", optimizer, max_lr)
        if last_epoch == -1:
            for peak, group in zip(max_lrs, optimizer.param_groups, strict=True):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
            self.use_beta1 = "betas" in optimizer.defaults
            if last_epoch == -1:
                for top, base, group in zip(_per_group("max_momentum", optimizer, max_momentum),
                                            _per_group("base_momentum", optimizer, base_momentum),
                                            optimizer.param_groups, strict=True):
                    if self.use_beta1:
                        group["betas"] = (top, *group["betas"][1:])
                    else:
                        group["momentum"] = top
                    group["max_momentum"], group["base_momentum"] = top, base
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":  # OneCycleLR's formulas, operation for operation
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def _values(self, v: float) -> list[tuple[float, float | None]]:
        peak_step, last_step = self._phase_end, float(self.revisions[0][1] - 1)
        out = []
        for group in self.optimizer.param_groups:
            if v <= peak_step:
                pct = v / peak_step
                lr = self._anneal(group["initial_lr"], group["max_lr"], pct)
                momentum = (self._anneal(group["max_momentum"], group["base_momentum"], pct)
                            if self.cycle_momentum else None)
            else:
                pct = (v - peak_step) / (last_step - peak_step)
                lr = self._anneal(group["max_lr"], group["min_lr"], pct)
                momentum = (self._anneal(group["base_momentum"], group["max_momentum"], pct)
                            if self.cycle_momentum else None)
            out.append((lr, momentum))
        return out


class BudgetCosineLR(RevisedSchedule):
    """Cosine decay from each group's initial lr to eta_min (CosineAnnealingLR's closed form) over revisable steps:
    eta_min is reached at total_steps, one step after the last (as CosineAnnealingLR with T_max = total_steps)."""

    floor_offset = 0

    def __init__(self, optimizer: Optimizer, T_max: int | None = None, eta_min: float = 0.0, *,
                 total_steps: int | None = None, revisions: Sequence[Sequence[int]] | None = None,
                 last_epoch: int = -1) -> None:
        if T_max is not None and total_steps is not None and T_max != total_steps:
            raise ValueError(f"T_max={T_max} and total_steps={total_steps} differ: give one")
        self.optimizer = optimizer
        self._init_revisions(total_steps if total_steps is not None else T_max, revisions)
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def _values(self, v: float) -> list[tuple[float, float | None]]:
        span = float(self.revisions[0][1])
        return [(self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * v / span)) / 2, None)
                for base in self.base_lrs]
