"""What the commands share: the run dir and what Hydra knows of this run (overrides, group choices), seeding,
threads and the device, the data, a checkpoint's model and config, the test set's logits."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cifar_cam.config.recipe import choices_of
from cifar_cam.config.validate import image_size
from cifar_cam.data.arrays import DataSplits
from cifar_cam.data.batches import EvalBatches
from cifar_cam.data.sources import build_splits
from cifar_cam.errors import CheckpointError
from cifar_cam.io import cores, write_json  # noqa: F401  (write_json: the tasks' one writer)
from cifar_cam.training import distributed
from cifar_cam.training.checkpoint import load_with_config, model_from_checkpoint
from cifar_cam.training.device import resolve_device, resolve_precision
from cifar_cam.training.engine import SplitLogits, collect_logits

log = logging.getLogger("cifar_cam")


def run_dir() -> Path:
    """This invocation's output directory (Hydra's runtime.output_dir)."""
    return Path(HydraConfig.get().runtime.output_dir)


def cli_overrides() -> list[str]:
    """The overrides typed on the command line (for this job, in a sweep)."""
    return list(HydraConfig.get().overrides.task)


def group_choices() -> dict[str, str]:
    """The config-group choices of this run (data=..., model=..., ...), without Hydra's own."""
    return choices_of(HydraConfig.get().runtime.choices)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def processes_sharing_cores() -> int:
    """How many processes of this run share the machine's cores: joblib sweep jobs, or torchrun ranks on a node."""
    ranks = distributed.world().local_size  # torchrun's LOCAL_WORLD_SIZE, or a multi-task submitit job's tasks per node
    launcher = HydraConfig.get().launcher if HydraConfig.initialized() else {}
    if str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        jobs = int(launcher.get("n_jobs") or 1)
        return max(ranks, cores() if jobs < 0 else jobs)  # joblib: -1 is one job per core
    return ranks


def resolve_num_threads(setting: int | str) -> int | None:
    """torch CPU threads: an integer as given; 'auto' splits the cores among the processes sharing them,
    or None (torch's default) when this process is alone."""
    if setting != "auto":
        return int(setting)
    sharing = processes_sharing_cores()
    return max(1, cores() // sharing) if sharing > 1 else None


def setup_runtime(cfg: DictConfig) -> torch.device:
    """Seeds everything, sets the CPU threads, applies trainer.deterministic, and returns the device."""
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    threads = resolve_num_threads(cfg.trainer.get("num_threads", "auto"))
    if threads is not None:  # parallel jobs each on all cores would oversubscribe them
        torch.set_num_threads(threads)
        log.info("torch threads: %d (trainer.num_threads=%s)", threads, cfg.trainer.get("num_threads", "auto"))
    if cfg.trainer.get("deterministic", False):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False  # autotuning may pick another kernel after a resume
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 rounds differently per kernel choice
        torch.backends.cudnn.allow_tf32 = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def load_data(cfg: DictConfig) -> DataSplits:
    """The train / val / test arrays that `cfg.data` describes."""
    d = cfg.data
    splits = build_splits(
        d.source, d.get("root"), val_size=d.val_size, subset=d.subset, seed=cfg.seed,
        cache=d.get("cache", True), image_size=image_size(cfg),
        num_classes=d.get("num_classes", 10), train_size=d.get("train_size", 640), test_size=d.get("test_size", 256),
    )
    log.info("data: %s, %d classes; train %d, val %d, test %d images", d.source, splits.num_classes,
             len(splits.train), 0 if splits.val is None else len(splits.val), len(splits.test))
    return splits


def checkpoint_and_config(cfg: DictConfig, command: str) -> tuple[dict[str, Any], DictConfig]:
    """`cfg.ckpt`'s payload and its config merged into `cfg` (command-line overrides win), validated."""
    payload, merged = load_with_config(cfg, command, cli_overrides())
    if payload is None:
        raise CheckpointError(f"{command} needs ckpt=PATH: a train run dir or a .pt file")
    return payload, merged


def checkpoint_model(payload: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The checkpoint's model on `device` (channels_last), in eval mode."""
    return model_from_checkpoint(payload).to(device, memory_format=torch.channels_last).eval()


def test_logits(model: torch.nn.Module, splits: DataSplits, cfg: DictConfig, device: torch.device,
                tta: bool = False) -> SplitLogits:
    """The model's logits for the whole test set, in eval.batch_size batches at trainer.precision."""
    return collect_logits(model, EvalBatches(splits.test, cfg.eval.batch_size, device), device=device,
                          amp_dtype=resolve_precision(cfg.trainer.precision, device), tta=tta)


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain dict (what checkpoints and JSON files store)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
