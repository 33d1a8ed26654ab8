"""trainer.time_budget / trainer.plan for `cifar-cam train`: where a run's plan comes from, the probe that times
the run's own steps, and the re-plan after each epoch.

Three ways a run gets its plan (planner.Plan, written to plan.json in the run dir):
  - a budget (trainer.time_budget): after the model is built (and compiled), `probe` times a few training steps
    at every image size of the progressive-resize template, one evaluation batch and one checkpoint write; the
    planner fits the most epochs into what is left of the budget (the command's startup and data loading
    included) and the LR schedule is laid over the planned steps (run.with_plan). After each epoch
    `replan_after` returns the plan for the remaining epochs at the speed just measured, which the loop adopts
    (before that epoch's checkpoint is written, so a resume continues the plan in force).
  - a replay (trainer.plan=<plan.json>): that plan's epochs, sizes and LR revisions, no probe, no re-plan; the
    run must be the one the plan was made for (Plan.check_matches).
  - a resume of a planned run (ckpt=): the plan in the checkpoint, continued as recorded (no probe, no re-plan:
    the budget was for one sitting), so the resumed run is the uninterrupted one bit for bit.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cifar_cam.config.durations import format_duration, time_budget_seconds
from cifar_cam.data.arrays import ImageArrays
from cifar_cam.data.batches import EvalBatches, ResizedBatches
from cifar_cam.data.mix import mix_batch, mix_rng
from cifar_cam.errors import ConfigError
from cifar_cam.training import distributed
from cifar_cam.training.budget.planner import Overhead, Plan, RunFacts, replan, template_from
from cifar_cam.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from cifar_cam.training.device import autocast, input_memory_format
from cifar_cam.training.engine import backward_and_step, collect_logits, tta_views
from cifar_cam.training.optim import build_optimizer
from cifar_cam.training.run import Run, RunState, checkpoint_payload
from cifar_cam.training.supervise import Supervisor

log = logging.getLogger("cifar_cam.train")

PROBE_STEPS = 3         # timed training steps per image size (after one untimed step at that size)
PLOT_SECONDS = 0.5      # curves.png per checkpoint write: a matplotlib figure (not worth timing)


def run_facts(run: Run) -> RunFacts:
    """What a plan must have been made for to be replayed by this run."""
    cfg = run.cfg
    return RunFacts(train_images=len(run.splits.train), batch_size=cfg.data.batch_size,
                    steps_per_epoch=run.steps_per_epoch, model=cfg.model.name, width=cfg.model.get("width"),
                    image_size=run.full_size, world_size=run.world.size)


def wants_plan(cfg: DictConfig, resume: dict[str, Any] | None) -> str | None:
    """'resume', 'replay', 'budget' or None: where this run's plan comes from."""
    t = cfg.trainer
    if resume is not None:
        if t.get("time_budget") is not None or t.get("plan"):  # a budget is for a run's first sitting
            log.info("a resumed run continues %s; trainer.time_budget and trainer.plan apply to new runs only",
                     "the plan in its checkpoint" if resume.get("plan") else "as it was trained, without a plan")
        return "resume" if resume.get("plan") else None
    if t.get("plan"):
        return "replay"
    return "budget" if time_budget_seconds(t.get("time_budget")) is not None else None


def fixed_plan(run: Run, resume: dict[str, Any] | None, mode: str) -> Plan:
    """The plan of a resume (the checkpoint's) or a replay (trainer.plan's file, checked against this run)."""
    if mode == "resume":
        plan = Plan.from_dict(resume["plan"], source=str(resume["path"]))  # type: ignore[index]
        stored = resume["config"]["trainer"]["epochs"]  # the template's count (or, written before 2026-12-05, the
        if run.cfg.trainer.epochs != stored:            # plan's): another on the command line asks for more
            raise ConfigError(f"trainer.epochs={run.cfg.trainer.epochs}: the run being resumed follows its plan of "
                              f"{plan.epochs} epochs (plan.json), which a resume continues as recorded; drop "
                              "trainer.epochs, or replay a longer plan in a new run (trainer.plan=)")
        log.info("continuing the run's plan: %d epochs (plan.json; a resumed run does not re-plan)", plan.epochs)
        return plan
    plan = Plan.load(run.cfg.trainer.plan)
    plan.check_matches(run_facts(run))
    log.info("trainer.plan replays %s: %d epochs (%s) and its LR schedule as recorded; trainer.epochs, "
             "trainer.progressive_resize%s are not used", run.cfg.trainer.plan, plan.epochs, sizes_text(plan.sizes),
             " and trainer.time_budget" if run.cfg.trainer.get("time_budget") is not None else "")
    return plan


def _timed(fn: Any, device: torch.device) -> float:
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def probe(run: Run, state: RunState, sizes: list[int], sup: Supervisor) -> tuple[dict[int, float], Overhead]:
    """Seconds of one training step at each size, and the per-epoch / final overheads, measured here.

    Training steps run on the real (compiled, DDP-wrapped) model over real batches of a throw-away epoch 0,
    with a throw-away optimizer, as the epochs take them (MixUp / CutMix, clipping, the EMA update); the
    weights, BatchNorm statistics, EMA and RNG states are put back, so the run trains as if nothing happened.
    Validation and the final test are timed on one evaluation batch, a checkpoint write by writing the run's
    checkpoint to a temporary file. Sets state.write_seconds (a re-plan counts the pending write with it).
    """
    cfg, device = run.cfg, run.device
    saved = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    ema_saved = None if run.ema is None else ({k: v.clone() for k, v in run.ema.state_dict().items()},
                                              run.ema.updates)
    rng = rng_state(device)
    optimizer = build_optimizer(cfg.optimizer, run.model)
    scaler = None if run.scaler is None else torch.amp.GradScaler(device.type)  # the run's keeps its scale
    memory_format = input_memory_format(run.model)
    run.batches.set_epoch(0)
    source = iter(run.batches)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal source
        try:
            return next(source)
        except StopIteration:  # fewer batches than the probe takes: go round again
            source = iter(run.batches)
            return next(source)

    def step(size: int) -> None:
        (images, labels), = ResizedBatches([next_batch()], size)
        if cfg.aug.get("mix"):
            images, labels = mix_batch(images, labels, run.splits.num_classes, cfg.aug, mix_rng(cfg.seed, 0, 0))
        with autocast(device, run.amp_dtype):
            loss = run.criterion(run.train_model(images.contiguous(memory_format=memory_format)), labels)
        backward_and_step(loss, optimizer, scaler, cfg.trainer.get("grad_clip"))
        if run.ema is not None:
            run.ema.update(run.model)

    run.train_model.train()
    seconds: dict[int, float] = {}
    for size in sizes:
        sup.beat(f"timing training steps at {size}px (trainer.time_budget)")
        step(size)  # untimed: first-call costs (allocations, oneDNN primitives)
        seconds[size] = _timed(lambda s=size: [step(s) for _ in range(PROBE_STEPS)], device) / PROBE_STEPS
    # one evaluation batch at full size (validation and test run at full size, test with TTA when set)
    test = run.splits.test
    n = min(len(test), cfg.eval.batch_size)
    one = EvalBatches(ImageArrays(test.images[:n], test.labels[:n], test.index[:n]), cfg.eval.batch_size, device,
                      run.splits.mean, run.splits.std)
    collect_logits(run.model, one, device=device, amp_dtype=run.eval_dtype)  # untimed first call
    per_image = _timed(lambda: collect_logits(run.model, one, device=device, amp_dtype=run.eval_dtype), device) / n
    run.model.load_state_dict(saved)
    if ema_saved is not None:
        run.ema.load(*ema_saved)  # type: ignore[union-attr]
    set_rng_state(rng, device)
    save = 0.0
    if run.world.is_main:  # only rank 0 writes checkpoints
        with tempfile.TemporaryDirectory(dir=run.out) as tmp:
            save = _timed(lambda: save_checkpoint(checkpoint_payload(run, state), Path(tmp) / "probe.pt"), device)
    val_images = 0 if run.splits.val is None else len(run.splits.val)
    every = cfg.trainer.get("checkpoint_every", 1)
    best_too = 2 if run.val_batches is not None else 1  # best.pt: a write of its own, or a copy of last.pt
    state.write_seconds = (best_too * save + PLOT_SECONDS) / every
    overhead = Overhead(epoch_seconds=val_images * per_image + state.write_seconds,
                        final_seconds=len(run.splits.test) * per_image * tta_views(cfg.eval.tta) + save)
    return seconds, overhead


def from_rank0(run: Run, decide: Any) -> Plan:
    """The plan `decide()` makes on rank 0, on every rank; an error there ends every rank with its line (none
    waits for a plan that never comes)."""
    made: Any = None
    if run.world.is_main:
        try:
            made = decide().to_dict()
        except (ConfigError, ValueError) as e:
            made = {"error": str(e)}
    made = distributed.object_from_rank0(made, run.world)
    if "error" in made:
        raise ConfigError(made["error"])
    return Plan.from_dict(made)


def make_plan(run: Run, state: RunState, sup: Supervisor) -> Plan:
    """A budgeted run's first plan: probe, then the most epochs that fit (rank 0's, on every rank)."""
    t = run.cfg.trainer
    budget = time_budget_seconds(t.time_budget)
    assert budget is not None
    full = run.full_size
    template = template_from(list(t.get("progressive_resize") or []), t.epochs, full)
    sizes = sorted({s for s, _ in template} | {full})
    step_seconds, overhead = probe(run, state, sizes, sup)
    plan = from_rank0(run, lambda: Plan.create(run_facts(run), budget, time.monotonic() - run.started, step_seconds,
                                               template, overhead))
    late = plan.overrun_bound()
    log.info("time budget %s: %s; planned %d epochs (%s), %d steps, ~%s of training and test, re-planned "
             "after each epoch (plan.json); %s", format_duration(budget),
             ", ".join(f"{s}px {v * 1000:.0f} ms/step" for s, v in step_seconds.items()), plan.epochs,
             sizes_text(plan.sizes), plan.total_steps, format_duration(plan.predicted_seconds),
             f"a 1.5x slowdown in the last epoch could end it up to {late:.0f}s late" if late > 0 else
             "it ends within the budget even if the machine slows 1.5x in the last epoch")
    return plan


def sizes_text(sizes: list[int]) -> str:
    """[12, 12, 16, 32] -> '2 at 12 px, 1 at 16 px, 1 at 32 px'."""
    return ", ".join(f"{sizes.count(s)} at {s} px" for s in dict.fromkeys(sizes))


GROW_AT_LEAST = 2  # a plan grows only when this many more epochs fit, and then by one less (headroom): timing
                   # noise of a few percent then neither grows it nor, right after, shrinks it back


def replan_after(run: Run, state: RunState, epoch: int, epoch_steps: int, train_seconds: float) -> Plan | None:
    """A budgeted run's re-plan at the end of `epoch`: the plan for the remaining epochs at the speed its steps just
    had, or None when the plan in force stands (the caller adopts a new one: loop.replan).

    Fewer epochs are taken at once (the plan no longer fits); more only when at least GROW_AT_LEAST more fit, and
    then one less than fit, so timing noise does not move the plan back and forth.
    """
    plan = state.plan
    assert plan is not None
    size = plan.size_of(epoch)

    def decide() -> Plan:
        if epoch_steps <= 0 or train_seconds <= 0:
            return plan
        # this epoch's checkpoint write and plot come after the re-plan: counted as spent already
        elapsed = time.monotonic() - run.started + state.write_seconds * plan.speed_factor()
        observed = {size: train_seconds / epoch_steps}
        new = replan(plan, epoch, elapsed, observed)
        if plan.epochs < new.epochs < plan.epochs + GROW_AT_LEAST:
            return plan
        if new.epochs >= plan.epochs + GROW_AT_LEAST:  # grow, keeping one epoch of headroom
            return replan(plan, epoch, elapsed, observed, max_epochs=new.epochs - 1)
        return new

    new = from_rank0(run, decide)
    return None if new.to_dict() == plan.to_dict() else new
