"""Train to a time budget (`trainer.time_budget`): parse it, plan the epochs that fit, re-plan as the machine drifts.

The `train` command, startup, data loading, a short timed probe and the final test included, is to end within
the budget. The probe measures the seconds of one training step at each image size of the progressive-resize
schedule; `plan_epochs` then picks the largest number of epochs whose schedule (the config's progressive-resize
proportions, small sizes first, at least one epoch at full size) fits, and the LR schedule is laid over the
planned steps (Li et al., "Budgeted Training", ICLR 2020: a schedule that decays to ~zero at the budget's end
beats one cut short). At each epoch boundary `replan` re-plans the remaining epochs at the speed just measured:
more when the machine got faster, fewer when it got slower, none ("end now") when one more does not fit. Each
change is a `revision` of the LR schedule (lr_schedules.py), which stays continuous and still ends at
its floor at the new last step. `Plan` is what plan.json holds: the schedule actually run; `trainer.plan=`
replays it (no probe, no re-plan) and a resume continues it.

The margin, precisely. Every plan and re-plan commits to epochs only while

    elapsed + predicted(remaining epochs) + predicted(final test) + reserve <= budget,
    reserve = max(RESERVE_FRACTION x budget, RESERVE_MIN_SECONDS) = max(2% of the budget, 10 s),

where `elapsed` is measured (startup, data loading and the probe count in full) and the predictions use the speed
measured last: the probe's step seconds per size, scaled at a re-plan by the speed factor of the epoch just run
(its mean step seconds over the probe's for its size; epoch overhead and the final test scale alike). So on a
machine whose speed holds, the command ends at least `reserve` before the budget, less the probe's own error
(which the reserve is there to absorb). A re-plan corrects a misprediction at the next epoch boundary; what no
re-plan can correct is a slowdown during the last epoch that was started and during the final test after it.
If the machine's speed drifts by at most a factor `s` (slowest / fastest; SLOWDOWN = 1.5 here), the command
ends by

    budget + max(0, (s - 1) x (e + f) - reserve)     (`overrun_bound`)

where e is the last started epoch's time and f the final test's, both at the fastest speed: the run can overrun
only by the extra time of one epoch and the final test, less the reserve. Example: a 15 min budget (reserve 18 s)
whose full-size epoch takes 58 s and final test 10 s can end at most 0.5 x 68 - 18 = 16 s late, and only when
the machine slows to 1.5x right as the last epoch starts; with no slowdown it ends >= 18 s early. It assumes
the drift scales all image sizes, validation and the test alike (the probe's ratios between sizes hold).

Nothing here imports torch: the CLI reads a plan.json (trainer.plan) before torch loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from cifar_cam.config.durations import format_duration
from cifar_cam.errors import ConfigError
from cifar_cam.io import write_json

RESERVE_FRACTION = 0.02       # the reserve: this share of the budget ...
RESERVE_MIN_SECONDS = 10.0    # ... or this, whichever is more
SLOWDOWN = 1.5                # the speed drift (slowest / fastest) the stated overrun bound is for
MAX_EPOCHS = 100_000          # the planner's search stops here, whatever the budget
FIT_TOLERANCE = 1e-6          # seconds: a plan "fits" to within float rounding (400 x 0.14 s is 56.00000000000001)
PLAN_FORMAT = 1               # plan.json's "format"; a file of another format is refused

# --- the schedule's shape --------------------------------------------------------------------------------------

def template_from(progressive_resize: Sequence[int] | None, epochs: int, full_size: int) -> list[tuple[int, int]]:
    """The progressive-resize template of a config: (size, epochs at it) pairs, sizes ascending.

    `progressive_resize` gives the size of epochs 1..len (as augment.epoch_image_size reads it) and the rest of
    `epochs` train at `full_size`: cpu_quick's [12, 12, 16, 16, 16, 24, 24, 24, 24] over 14 epochs is
    [(12, 2), (16, 3), (24, 4), (32, 5)], i.e. 2/14 of the epochs at 12 px, ..., 5/14 at 32.
    """
    if epochs < 1:
        raise ConfigError(f"trainer.epochs={epochs} must be >= 1")
    schedule = [int(s) for s in (progressive_resize or [])][:epochs]
    bad = [s for s in schedule if not 0 < s <= full_size]
    if bad:
        raise ConfigError(f"trainer.progressive_resize has {bad[0]} px, outside 1..{full_size} (the training images' "
                          "size)")
    counts: dict[int, int] = {}
    for size in schedule + [full_size] * (epochs - len(schedule)):
        counts[size] = counts.get(size, 0) + 1
    return sorted(counts.items())


def epoch_counts(template: Sequence[tuple[int, float]], epochs: int, full_size: int) -> list[tuple[int, int]]:
    """Epochs at each size for a run of `epochs`: the template's shares rounded to whole epochs that sum to `epochs`
    (largest remainder; ties go to the larger size), with at least one epoch at `full_size`. Sizes ascending."""
    return _counts(_integer_shares(template, full_size), epochs, full_size)


def _counts(shares: dict[int, int], epochs: int, full_size: int) -> list[tuple[int, int]]:
    total = sum(shares.values()) or 1
    quotas = {s: divmod(epochs * w, total) for s, w in shares.items()}  # exact: (whole epochs, remainder)
    counts = {s: q for s, (q, _) in quotas.items()}
    if not any(shares.values()):  # an empty template: every epoch at full size
        counts[full_size] = epochs
    left = epochs - sum(counts.values())
    for s in sorted(quotas, key=lambda s: (quotas[s][1], s), reverse=True)[:max(0, left)]:
        counts[s] += 1
    if counts[full_size] == 0 and epochs > 0:  # the test runs at full size: train at it at least once
        donor = max((s for s in counts if s != full_size), key=lambda s: (counts[s], -s))
        counts[donor] -= 1
        counts[full_size] = 1
    return [(s, counts[s]) for s in sorted(counts) if counts[s]]


def _integer_shares(template: Sequence[tuple[int, float]], full_size: int) -> dict[int, int]:
    """The template's weights as integers in the same ratios (exact: floats are binary fractions)."""
    if any(w < 0 for _, w in template) or any(int(s) > full_size for s, _ in template):
        raise ValueError(f"a template is (size <= {full_size}, weight >= 0) pairs, got {list(template)}")
    shares: dict[int, Fraction] = {}
    for size, weight in template:
        if weight:
            shares[int(size)] = shares.get(int(size), Fraction(0)) + Fraction(weight)
    scale = math.lcm(*(w.denominator for w in shares.values())) if shares else 1
    weights = {s: int(w * scale) for s, w in shares.items()}
    weights.setdefault(full_size, 0)
    return weights


def epoch_sizes(template: Sequence[tuple[int, float]], epochs: int, full_size: int) -> list[int]:
    """The training image size of each of `epochs` epochs (epoch_counts spelled out, small sizes first)."""
    return [s for s, n in epoch_counts(template, epochs, full_size) for _ in range(n)]


# --- the planner ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Overhead:
    """Seconds besides the training steps: each epoch's fixed cost (validation, checkpoint writes, curves) and the
    final one (the test pass with TTA, summary.json)."""

    epoch_seconds: float = 0.0
    final_seconds: float = 0.0

    def scaled(self, factor: float) -> Overhead:
        return Overhead(self.epoch_seconds * factor, self.final_seconds * factor)


@dataclass(frozen=True)
class EpochPlan:
    """What plan_epochs found: the epochs, each one's size, and the time they are predicted to take."""

    epochs: int
    sizes: tuple[int, ...]
    predicted_seconds: float   # the planned epochs and the final test
    available_seconds: float   # budget - elapsed - reserve: what predicted_seconds had to fit
    reserve_seconds: float


class BudgetTooSmall(ConfigError):
    """trainer.time_budget does not fit one epoch and the final test; `minimum_seconds` would."""

    def __init__(self, message: str, minimum_seconds: float) -> None:
        super().__init__(message)
        self.minimum_seconds = minimum_seconds


def reserve_seconds(budget_s: float) -> float:
    """The part of the budget no plan uses: max(2% of it, 10 s)."""
    return max(RESERVE_FRACTION * budget_s, RESERVE_MIN_SECONDS)


def overrun_bound(epoch_s: float, final_s: float, reserve_s: float, slowdown: float = SLOWDOWN) -> float:
    """The most the command can end past its budget when the speed drifts by `slowdown` (slowest / fastest):
    the extra time of one epoch (`epoch_s` at the fastest speed) and the final test, less the reserve."""
    return max(0.0, (slowdown - 1.0) * (epoch_s + final_s) - reserve_s)


def _epoch_costs(step_seconds: Mapping[int, float], steps_per_epoch: int, overhead: Overhead,
                 sizes: Sequence[int]) -> dict[int, float]:
    costs = {}
    for size in sizes:
        step = step_seconds.get(size)
        if step is None or not math.isfinite(step) or step <= 0:
            raise ValueError(f"no step time (> 0) for {size} px images; step_seconds={dict(step_seconds)}")
        costs[size] = steps_per_epoch * step + overhead.epoch_seconds
    return costs


def _most_epochs(room: float, costs: Mapping[int, float]) -> int:
    """No more epochs than this fit `room` seconds: each costs at least the cheapest one."""
    return max(0, math.floor((room + FIT_TOLERANCE) / min(costs.values())))


def plan_epochs(budget_s: float, elapsed_s: float, step_seconds: Mapping[int, float], steps_per_epoch: int,
                template: Sequence[tuple[int, float]], full_size: int, overhead: Overhead = Overhead(), *,
                max_epochs: int | None = None) -> EpochPlan:
    """The largest number of epochs whose schedule fits `budget_s - elapsed_s - reserve`, the final test included.

    `step_seconds`: seconds of one training step at each size (the probe's); `template`: (size, share) pairs
    (template_from); each epoch costs steps_per_epoch x its size's step seconds + overhead.epoch_seconds.
    More budget never gives fewer epochs (the epochs that fit a budget fit any larger one), and the plan's
    predicted_seconds <= available_seconds. BudgetTooSmall (a ConfigError) when one epoch at full size does
    not fit, saying the budget that would.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    reserve = reserve_seconds(budget_s)
    sizes = sorted({int(s) for s, w in template if w} | {full_size})
    costs = _epoch_costs(step_seconds, steps_per_epoch, overhead, sizes)
    available = budget_s - elapsed_s - reserve
    room = available - overhead.final_seconds
    shares = _integer_shares(template, full_size)
    cap = min(MAX_EPOCHS, max_epochs or MAX_EPOCHS, _most_epochs(room, costs))
    best: tuple[int, list[tuple[int, int]], float] | None = None
    for epochs in range(1, cap + 1):  # every E: a rounding that makes E+1 cheaper than E cannot hide a fit
        counts = _counts(shares, epochs, full_size)
        cost = sum(n * costs[s] for s, n in counts)
        if cost <= room + FIT_TOLERANCE:
            best = (epochs, counts, cost)
    if best is None:
        one = costs[full_size] + overhead.final_seconds
        need = max(elapsed_s + one + RESERVE_MIN_SECONDS, (elapsed_s + one) / (1 - RESERVE_FRACTION))
        raise BudgetTooSmall(
            f"trainer.time_budget={format_duration(budget_s)} is too small: after {elapsed_s:.0f}s of startup, data "
            f"loading and probe, one epoch at {full_size} px (~{costs[full_size]:.0f}s), the final test "
            f"(~{overhead.final_seconds:.0f}s) and a {reserve_seconds(need):.0f}s reserve need "
            f"trainer.time_budget >= {format_duration(need)}", need)
    epochs, counts, cost = best
    return EpochPlan(epochs, tuple(s for s, n in counts for _ in range(n)), cost + overhead.final_seconds,
                     available, reserve)


# --- plan.json ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunFacts:
    """What a plan was made for; a run that differs in any of these cannot replay it."""

    train_images: int
    batch_size: int
    steps_per_epoch: int      # per process: ceil(train_images / world_size / batch_size), or floor with compile
    model: str
    width: int | None         # model.width (None: an architecture without one)
    image_size: int           # the full training image size (px)
    world_size: int = 1


# field -> (how the message names it, what the user can set to match)
_FACT_HINTS = {
    "train_images": ("training images",
                     "use the same data, data.subset and data.val_size (data.train_size for synthetic data)"),
    "batch_size": ("batch size", "set data.batch_size={planned}"),
    "model": ("model", "set model.name={planned}"),
    "width": ("model width", "set model.width={planned}"),
    "image_size": ("image size", "use data of the same image size"),
    "world_size": ("world size (processes)", "launch {planned} processes"),
    "steps_per_epoch": ("steps an epoch", "set trainer.compile as it was (compile drops the partial batch)"),
}


@dataclass
class Plan:
    """The schedule of a budgeted run, as plan.json holds it: what it fits, each epoch's image size, the LR
    schedule's revisions, and (informational) the budget, probe and re-plans that made it."""

    run: RunFacts
    epochs: int
    sizes: list[int]                         # the training image size of epochs 1..epochs
    total_steps: int                         # epochs x run.steps_per_epoch: the LR schedule's length
    revisions: list[list[int]]               # [at_step, total_steps] of the LR schedule: [[0, T0]] + one per re-plan
    template: list[list[float]]              # [size, share]: the progressive-resize proportions re-plans keep
    budget_seconds: float | None = None
    reserve_seconds: float | None = None
    step_seconds: dict[int, float] = field(default_factory=dict)   # the probe's, per size
    overhead: Overhead = field(default_factory=Overhead)          # the probe's estimate
    predicted_seconds: float | None = None   # of the first plan: its epochs and the final test
    replans: list[dict[str, Any]] = field(default_factory=list)    # {epoch, at_step, elapsed_seconds, ...}
    source: str | None = field(default=None, compare=False, repr=False)  # the file load() read

    # -- making and changing plans --

    @classmethod
    def create(cls, run: RunFacts | Mapping[str, Any], budget_s: float, elapsed_s: float,
               step_seconds: Mapping[int, float], template: Sequence[tuple[int, float]],
               overhead: Overhead = Overhead(), *, max_epochs: int | None = None) -> Plan:
        """The first plan of a budgeted run (plan_epochs over this run's steps per epoch and full image size)."""
        facts = run if isinstance(run, RunFacts) else RunFacts(**run)
        found = plan_epochs(budget_s, elapsed_s, step_seconds, facts.steps_per_epoch, template, facts.image_size,
                            overhead, max_epochs=max_epochs)
        total = found.epochs * facts.steps_per_epoch
        return cls(run=facts, epochs=found.epochs, sizes=list(found.sizes), total_steps=total,
                   revisions=[[0, total]], template=[[int(s), _number(w)] for s, w in template],
                   budget_seconds=float(budget_s), reserve_seconds=found.reserve_seconds,
                   step_seconds={int(s): float(v) for s, v in step_seconds.items()}, overhead=overhead,
                   predicted_seconds=round(found.predicted_seconds, 3))

    def size_of(self, epoch: int) -> int:
        """The training image size of `epoch` (1-based)."""
        return self.sizes[epoch - 1]

    def speed_factor(self) -> float:
        """The latest re-plan's measured step time over the probe's (1.0 before any re-plan)."""
        return float(self.replans[-1]["speed_factor"]) if self.replans else 1.0

    def overrun_bound(self, slowdown: float = SLOWDOWN) -> float:
        """overrun_bound for this plan: its longest epoch and the final test at the probe's speed."""
        if self.reserve_seconds is None or not self.step_seconds:
            return 0.0
        costs = _epoch_costs(self.step_seconds, self.run.steps_per_epoch, self.overhead, sorted(set(self.sizes)))
        return overrun_bound(max(costs.values()), self.overhead.final_seconds, self.reserve_seconds, slowdown)

    # -- plan.json --

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of plan.json."""
        return {
            "format": PLAN_FORMAT, "run": asdict(self.run), "epochs": self.epochs, "sizes": list(self.sizes),
            "total_steps": self.total_steps, "revisions": [list(r) for r in self.revisions],
            "template": [list(t) for t in self.template], "budget_seconds": self.budget_seconds,
            "reserve_seconds": self.reserve_seconds,
            "step_seconds": {str(s): v for s, v in sorted(self.step_seconds.items())},
            "overhead": asdict(self.overhead), "predicted_seconds": self.predicted_seconds,
            "replans": [dict(r) for r in self.replans],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Plan:
        """A plan from its JSON object; ConfigError naming `source` for one that is not a (consistent) plan."""
        where = f"trainer.plan={source}" if source else "the plan"
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ConfigError(f"{where} is not a plan.json of format {PLAN_FORMAT} (one a budgeted `train` wrote)")
        try:
            run = data["run"]
            facts = RunFacts(**{f.name: run[f.name] for f in fields(RunFacts)})
            plan = cls(
                run=facts, epochs=int(data["epochs"]), sizes=[int(s) for s in data["sizes"]],
                total_steps=int(data["total_steps"]), revisions=[[int(a), int(t)] for a, t in data["revisions"]],
                template=[[int(s), _number(w)] for s, w in data["template"]],
                budget_seconds=_optional_float(data.get("budget_seconds")),
                reserve_seconds=_optional_float(data.get("reserve_seconds")),
                step_seconds={int(s): float(v) for s, v in (data.get("step_seconds") or {}).items()},
                overhead=Overhead(**(data.get("overhead") or {})),
                predicted_seconds=_optional_float(data.get("predicted_seconds")),
                replans=[dict(r) for r in data.get("replans") or []], source=source)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where} is damaged: {type(e).__name__}: {e}") from None
        problem = plan._inconsistency()
        if problem:
            raise ConfigError(f"{where} is damaged: {problem}")
        return plan

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> Plan:
        try:
            data = json.loads(text)
        except ValueError as e:
            where = f"trainer.plan={source}" if source else "the plan"
            raise ConfigError(f"{where} is not JSON: {e}") from None
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> Path:
        """Writes plan.json atomically (a reader sees the old file or the new one)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """The plan in `path`; ConfigError for a missing, unreadable or damaged file."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"trainer.plan={path}: no such file (a budgeted run writes <run dir>/plan.json)"
                              ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"trainer.plan={path} cannot be read: {e}") from None
        return cls.from_json(text, str(path))

    def check_matches(self, run_facts: RunFacts | Mapping[str, Any]) -> None:
        """ConfigError naming the first fact of this run that differs from the plan's (batch size, model, ...)."""
        actual = asdict(run_facts) if isinstance(run_facts, RunFacts) else dict(run_facts)
        unknown = set(actual) - set(_FACT_HINTS)
        if unknown:
            raise ValueError(f"not run facts: {sorted(unknown)}")
        planned = asdict(self.run)
        for key, (label, hint) in _FACT_HINTS.items():
            if key in actual and actual[key] != planned[key]:
                raise ConfigError(f"trainer.plan={self.source or 'plan.json'} was made for {label} {planned[key]}, "
                                  f"this run has {actual[key]}; {hint.format(planned=planned[key])}, or drop "
                                  "trainer.plan to plan anew")

    def _inconsistency(self) -> str | None:
        spe = self.run.steps_per_epoch
        if self.epochs < 0 or len(self.sizes) != self.epochs:
            return f"{len(self.sizes)} sizes for {self.epochs} epochs"
        if self.total_steps != self.epochs * spe:
            return f"total_steps {self.total_steps} is not epochs {self.epochs} x steps_per_epoch {spe}"
        if any(b < a for a, b in zip(self.sizes, self.sizes[1:], strict=False)) or \
                any(not 0 < s <= self.run.image_size for s in self.sizes):
            return f"sizes {self.sizes} are not ascending within 1..{self.run.image_size}"
        steps = [a for a, _ in self.revisions]
        if not self.revisions or steps[0] != 0 or steps != sorted(steps) or self.revisions[-1][1] != self.total_steps:
            return f"revisions {self.revisions} do not start at step 0 and end at total_steps {self.total_steps}"
        return None


def _number(value: Any) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else number


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- re-planning ---------------------------------------------------------------------------------------------------

def replan(plan: Plan, epochs_done: int, elapsed_s: float, observed_step_seconds: Mapping[int, float], *,
           overhead: Overhead | None = None, max_epochs: int | None = None) -> Plan:
    """The plan for the epochs after `epochs_done` (>= 1), at the speed just measured; `plan` itself if unchanged.

    `observed_step_seconds`: the mean step seconds measured per size; the last finished epoch's size sets the
    speed factor (observed / probe) that scales the probe's step seconds of every size, and (when `overhead` is
    not given) the probe's overhead. The finished epochs stay; the rest follow the template of the new length,
    never below the last finished epoch's size, ending at full size. It keeps the largest number of epochs
    that fits the budget as plan_epochs does (more time never gives fewer); none fits: it ends now (epochs =
    epochs_done). A change adds a revision [epochs_done x steps_per_epoch, new total_steps] for the LR schedule
    and a `replans` entry.
    """
    if plan.budget_seconds is None or plan.reserve_seconds is None:
        raise ValueError("a plan with no budget (a replay) is not re-planned")
    if not 1 <= epochs_done <= plan.epochs:
        raise ValueError(f"epochs_done={epochs_done} outside 1..{plan.epochs}: re-plans come at epoch boundaries")
    if epochs_done == plan.epochs:
        return plan
    spe, full = plan.run.steps_per_epoch, plan.run.image_size
    last = plan.sizes[epochs_done - 1]
    probe = plan.step_seconds
    factor = observed_step_seconds[last] / probe[last] if last in observed_step_seconds else plan.speed_factor()
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"observed step seconds {dict(observed_step_seconds)} give a speed factor of {factor}")
    cost_overhead = overhead if overhead is not None else plan.overhead.scaled(factor)
    step_seconds = {s: v * factor for s, v in probe.items()}
    costs = _epoch_costs(step_seconds, spe, cost_overhead, sorted({s for s, _ in plan.template} | {full}))
    room = plan.budget_seconds - elapsed_s - plan.reserve_seconds - cost_overhead.final_seconds
    cap = min(MAX_EPOCHS, max_epochs or MAX_EPOCHS, epochs_done + _most_epochs(room, costs))
    shares = _integer_shares(plan.template, full)
    best_sizes: list[int] = []
    for epochs in range(epochs_done + 1, cap + 1):
        sizes = [s for s, n in _counts(shares, epochs, full) for _ in range(n)]
        rest = [max(last, s) for s in sizes[epochs_done:]]
        if sum(costs[s] for s in rest) <= room + FIT_TOLERANCE:
            best_sizes = rest
    epochs = epochs_done + len(best_sizes)
    sizes = plan.sizes[:epochs_done] + best_sizes
    if epochs == plan.epochs and sizes == plan.sizes:
        return plan
    at_step, total = epochs_done * spe, epochs * spe
    revisions = [list(r) for r in plan.revisions if r[0] < at_step] + [[at_step, total]]
    if best_sizes:
        reason = f"steps take {factor:.2f}x the probe's: {plan.epochs} -> {epochs} epochs"
    else:
        one = costs[full]  # the last epoch of any plan is at full size
        reason = (f"end now: one more epoch (~{one:.0f}s) and the final test (~{cost_overhead.final_seconds:.0f}s) "
                  f"do not fit the {max(0.0, room + cost_overhead.final_seconds):.0f}s left before the reserve")
    entry = {"epoch": epochs_done, "at_step": at_step, "elapsed_seconds": round(elapsed_s, 3),
             "speed_factor": round(factor, 6), "old_epochs": plan.epochs, "new_epochs": epochs, "reason": reason}
    return replace(plan, epochs=epochs, sizes=sizes, total_steps=total, revisions=revisions,
                   replans=[*plan.replans, entry])
