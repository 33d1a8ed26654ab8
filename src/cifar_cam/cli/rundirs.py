"""Where a command writes: a fresh run dir (or sweep dir) reserved before Hydra starts and locked to this process,
chosen by rank 0 under torchrun; a resume continues in the run dir it came from."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from cifar_cam.cli.commands import fail
from cifar_cam.errors import CifarCamError
from cifar_cam.io import lock_run_dir, reserve_dir


def _quote(path: Path | str) -> str:
    """A path as a Hydra override value (quoted where Hydra would split or retype it)."""
    from cifar_cam.config.recipe import hydra_value

    return hydra_value(str(path))


def join_ranks(command: str, cfg: Any, multirun: bool) -> Any:
    """[ddp] Under torchrun: checks that the command fits and joins the process group, before Hydra starts."""
    from cifar_cam.training import distributed
    from cifar_cam.training.device import resolve_device

    try:
        world = distributed.check_strategy(cfg.trainer.get("strategy", "auto"), command, multirun)
        return distributed.init(resolve_device(cfg.trainer.device).type) if world.distributed else world
    except CifarCamError as e:
        fail(command, str(e), e.exit_code)


def take_lock(command: str, run_dir: Path, world: Any) -> None:
    """One writer per run dir, taken before Hydra writes .hydra/ there (rank 0 only under DDP); else one line, exit 2.

    A sweep's dir is always new (reserve_dir) and its jobs each get their own: those are not locked.
    """
    if not world.is_main:
        return
    try:
        lock_run_dir(run_dir)
    except CifarCamError as e:
        fail(command, str(e), e.exit_code)


def run_dir_overrides(command: str, cfg: Any, overrides: list[str], multirun: bool, world: Any) -> list[str]:
    """The run (or sweep) dir this invocation writes, reserved and locked before Hydra writes there."""
    keys = {o.split("=", 1)[0] for o in overrides}
    if multirun:  # a sweep's dir is new, each job its own: nothing to lock
        if "hydra.sweep.dir" in keys:
            return []
        return [f"hydra.sweep.dir={_quote(reserve_dir(Path('multirun') / command))}"]
    if "hydra.run.dir" in keys:
        given = next(o for o in overrides if o.startswith("hydra.run.dir=")).split("=", 1)[1].strip("'\"")
        take_lock(command, Path(given), world)
        return []
    if command == "train" and cfg.get("ckpt"):
        from cifar_cam.training.checkpoint import resolve_checkpoint, run_dir_of

        # Resume continues in the run dir it came from; its original .hydra/ stays untouched.
        run_dir = run_dir_of(resolve_checkpoint(cfg.ckpt, prefer="last"))
        take_lock(command, run_dir, world)
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        return [f"hydra.run.dir={_quote(run_dir)}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
    from cifar_cam.training.distributed import rank0_decides

    run_dir = rank0_decides(lambda: reserve_dir(Path("outputs") / command))
    take_lock(command, run_dir, world)
    return [f"hydra.run.dir={_quote(run_dir)}"]
