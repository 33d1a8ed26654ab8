"""Data-parallel training across processes: torchrun's ranks, DistributedDataParallel, rank 0 writes.

    torchrun --nproc_per_node=N -m cifar_cam train ...     (one machine; --nnodes/--rdzv-* for several)

torchrun starts N copies of the CLI and tells each who it is through RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each rank trains on its shard of every epoch's
shuffled order (augment.py), DDP averages the gradients (NCCL on CUDA, gloo on CPU), and only rank 0
writes: the run dir, logs, metrics and checkpoints (saved from the unwrapped module, so a single
process loads them). `data.batch_size` is per rank: a step sees N x batch_size images.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cifar_cam.config.choices import STRATEGIES
from cifar_cam.errors import ConfigError
from cifar_cam.training.engine import Agree, EpochTotals

if TYPE_CHECKING:
    from cifar_cam.training.supervise import Supervisor

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process trains."""
        return self.size > 1


def launched() -> bool:
    """Whether torchrun (or a launcher setting the same variables, or a multi-task submitit job) started us."""
    _export_submitit_env()
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _export_submitit_env() -> None:
    """In a SLURM / submitit-local job with several tasks (hydra.launcher.tasks_per_node=N), sets torch's
    env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from submitit's job environment."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def world() -> World:
    """The ranks as torchrun's environment variables describe them."""
    if not launched():
        return World()
    env = os.environ
    return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                 int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def check_strategy(strategy: str, command: str = "train", multirun: bool = False) -> World:
    """The world `trainer.strategy` asks for, or ConfigError when the way the process was started does not fit."""
    w = world()
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "ddp" and not launched():
        raise ConfigError("trainer.strategy=ddp needs the ranks torchrun starts: "
                          "torchrun --nproc_per_node=N -m cifar_cam train ...")
    if not w.distributed:
        return w
    if strategy == "single":
        raise ConfigError(f"trainer.strategy=single, but torchrun started {w.size} processes: each would train "
                          "alone; use trainer.strategy=auto (or ddp), or run without torchrun")
    if command != "train":
        raise ConfigError(f"torchrun started {w.size} processes, but only train runs distributed; "
                          f"run `cifar-cam {command}` as one process")
    if multirun:
        raise ConfigError("-m under torchrun would run the whole sweep on every rank; sweep DDP jobs with "
                          "hydra/launcher=slurm hydra.launcher.tasks_per_node=N instead")
    return w


def init(device_type: str) -> World:
    """Joins torchrun's process group once (NCCL for CUDA tensors, gloo for CPU ones); later calls are no-ops."""
    w = world()
    if w.distributed and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(w.local_rank)
            backend = "cpu:gloo,cuda:nccl"  # gloo too: small CPU messages (the run dir, the stop flag)
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        atexit.register(cleanup)
    return w


def cleanup() -> None:
    """Leaves the process group (at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank0_decides(make: Callable[[], T]) -> T:
    """Rank 0 computes `make()` (e.g. reserves the run dir); every rank gets its result."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]  # type: ignore[return-value]


def quiet_overrides(w: World) -> list[str]:
    """Hydra overrides for ranks other than 0: no .hydra/ and no log file of their own; warnings on screen only."""
    if w.is_main:
        return []
    return ["hydra.output_subdir=null", "~hydra.job_logging.handlers.file",
            "hydra.job_logging.root.handlers=[console]", "hydra.job_logging.root.level=WARNING"]


def setup(strategy: str, device: torch.device) -> tuple[World, torch.device]:
    """For `train`: checks trainer.strategy, joins the ranks (each its own GPU: cuda:LOCAL_RANK), and quiets
    the log of ranks other than 0. One process: rank 0 of 1, the device unchanged."""
    w = check_strategy(strategy)
    if not w.distributed:
        return w, device
    init(device.type)
    if not w.is_main:  # torchrun's ranks got this from the CLI already; a submitit task did not
        logging.getLogger().setLevel(logging.WARNING)
    return w, torch.device("cuda", w.local_rank) if device.type == "cuda" else device


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (BatchNorm made SyncBatchNorm first if asked; CUDA only)."""
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("trainer.sync_batchnorm=true needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only); "
                              "on CPU each rank keeps its own BatchNorm statistics: set it to false")
        # Swaps the BatchNorm children in place, keeping their parameters: `model` and the optimizer stay valid.
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert converted is model, "the top module is no BatchNorm"
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_totals(totals: EpochTotals, start: EpochTotals | None, w: World) -> EpochTotals:
    """One epoch's loss, correct and image counts summed over the ranks (each rank saw its shard).

    `start` (a resumed epoch's totals, already summed) is the same on every rank and counted once.
    """
    if not w.distributed:
        return totals
    base = start or EpochTotals()
    own = torch.tensor([totals.loss_sum - base.loss_sum, totals.correct - base.correct, totals.count - base.count],
                       dtype=torch.float64)
    dist.all_reduce(own)  # gloo: a CPU tensor of three numbers
    return EpochTotals(step=totals.step, loss_sum=base.loss_sum + float(own[0]), correct=base.correct + float(own[1]),
                       count=base.count + int(own[2]), seconds=totals.seconds, last_lr=totals.last_lr)


def from_rank0(value: float, w: World) -> float:
    """Rank 0's value on every rank: decisions (best epoch, LR plateau, early stop) must not differ by a rounding."""
    if not w.distributed:
        return value
    box = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(box, src=0)
    return float(box[0])


def object_from_rank0(obj: Any, w: World) -> Any:
    """Rank 0's picklable `obj` on every rank (a plan: one decision, made once)."""
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


NO_BAD_STEP = 2**62  # stands for "no non-finite loss" in the agreement: larger than any step


def agreement(w: World, sup: Supervisor) -> Agree | None:
    """train_one_epoch's `agree`: the earliest non-finite-loss step over the ranks, and whether any rank was asked
    to stop, in one all_reduce a metrics read. None for one process (nothing to agree on)."""
    if not w.distributed:
        return None

    def agree(first_bad: int, stop: bool) -> tuple[int, bool]:
        # MAX of each: the earliest bad step is the largest negated one; the signal number names a stop
        box = torch.tensor([-(first_bad if first_bad >= 0 else NO_BAD_STEP), int(stop), sup.signum or 0],
                           dtype=torch.int64)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)  # gloo: a CPU tensor of three numbers, NCCL never involved
        earliest, stop_any, signum = (int(v) for v in box)
        if stop_any and sup.signum is None and signum:
            sup.signum = signum  # a rank no signal reached stops as if it had: the same message, the same exit code
        return (-earliest if -earliest != NO_BAD_STEP else -1), bool(stop_any)

    return agree
