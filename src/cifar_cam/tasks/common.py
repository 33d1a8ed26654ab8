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
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_cam.config.recipe import choices_of
from cifar_cam.config.validate import image_hw
from cifar_cam.data.arrays import DataSplits
from cifar_cam.data.batches import EvalBatches
from cifar_cam.data.decode import DEFAULT_FILL, Fit
from cifar_cam.data.sources import DataSpec, build_splits, describe
from cifar_cam.errors import CheckpointError, DataError
from cifar_cam.io import cores, write_bytes, write_csv, write_json  # noqa: F401  (write_json: the tasks' writer)
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


def fit_of(cfg: DictConfig) -> Fit:
    """How images become the model's input under `cfg.data`: its size and resize policy (stretch for sources
    without one)."""
    d = cfg.data
    return Fit.of(image_hw(cfg), d.get("resize", "stretch"), d.get("pad_fill", DEFAULT_FILL))


def data_spec(cfg: DictConfig, payload: dict[str, Any] | None = None) -> DataSpec:
    """What load_data loads for `cfg.data`; with a checkpoint's `payload`, the data it was trained on: its seed
    (the val split, a synthetic set), its own split of a file source, its image size and resize policy."""
    d = cfg.data
    stored = (payload or {}).get("data") or {}
    seed = int(payload["config"].get("seed", cfg.seed)) if payload is not None else int(cfg.seed)
    fit = Fit.from_dict(stored["fit"]) if stored.get("fit") else fit_of(cfg)
    workers = d.get("decode_workers", "auto")
    split = stored.get("split") if d.source in ("folder", "csv") and stored.get("source") == d.source else None
    if split is not None and not _split_is_under(split, cfg):
        log.info("data: the checkpoint's split is not under data.root=%s: splitting it anew (data.split, "
                 "data.val_size)", d.root)
        split = None
    return DataSpec(source=d.source, root=None if d.get("root") is None else str(d.root), seed=seed,
                    val_size=d.val_size, subset=d.get("subset"),
                    split=tuple(d.split) if d.get("split") is not None else None, fit=fit,
                    cache=bool(d.get("cache", True)), decode_workers=cores() if workers == "auto" else int(workers),
                    num_classes=d.get("num_classes", 10), train_size=d.get("train_size", 640),
                    test_size=d.get("test_size", 256), stored=split)


def _split_is_under(split: dict[str, Any], cfg: DictConfig) -> bool:
    """Whether a checkpoint's split names images under `cfg.data.root` (it was moved, or another tree is given)."""
    from cifar_cam.data.sources import listing_of

    test = split.get("test") or []
    if not test:
        return False
    try:
        listing = listing_of(DataSpec(cfg.data.source, str(cfg.data.root)))
    except DataError:
        return True  # a missing root is said by the decode pass, with where it came from
    names = {i.name for i in listing.items}
    return str(test[0][0]) in names


def load_data(cfg: DictConfig, payload: dict[str, Any] | None = None, out: Path | None = None) -> DataSplits:
    """The train / val / test arrays that `cfg.data` describes (with `payload`: the checkpoint's own data), logged;
    unreadable images stop it, all named in `out`/bad_images.txt, unless data.skip_bad_images."""
    splits = build_splits(data_spec(cfg, payload))
    describe(splits, cfg.data.source)
    if splits.bad:
        listed = out / "bad_images.txt" if out is not None else None
        if listed is not None:
            write_bytes(listed, "".join(f"{s}\t{name}\t{why}\n" for s, name, why in splits.bad).encode())
        first = "; ".join(f"{name} ({why.split(': ', 1)[-1].split('; ')[0][:60]})" for _, name, why in splits.bad[:10])
        where = f" (all of them in {listed})" if listed is not None else ""
        if not cfg.data.get("skip_bad_images", False):
            many = len(splits.bad) > 1
            raise DataError(f"{len(splits.bad)} image{'s' if many else ''} cannot be read{where}: {first}; remove or "
                            f"replace {'them' if many else 'it'}, or pass data.skip_bad_images=true to train without "
                            f"{'them' if many else 'it'}")
        log.warning("data: %d unreadable images left out (data.skip_bad_images=true)%s: %s", len(splits.bad), where,
                    first)
    return splits


def with_absolute_root(cfg: DictConfig, splits: DataSplits) -> DataSplits | DictConfig:
    """`cfg` with a file source's data.root made absolute (what checkpoints store, so eval from another directory
    finds it); the root as typed goes into the splits' identity beside it."""
    root = splits.identity.get("root")
    if root is None or cfg.data.get("root") is None or str(cfg.data.root) == root:
        return cfg
    splits.identity["root_as_typed"] = str(cfg.data.root)
    resolved = cfg.copy()
    with open_dict(resolved):
        resolved.data.root = root
    return resolved


def write_split_csv(out: Path, splits: DataSplits) -> Path | None:
    """split.csv in the run dir: path, class, split of every image a file source's run uses (None otherwise)."""
    split = splits.identity.get("split")
    if not split:
        return None
    rows = [{"path": name, "class": splits.classes[label], "split": s}
            for s in ("train", "val", "test") for name, label in split.get(s, [])]
    return write_csv(out / "split.csv", rows, ("path", "class", "split"))


def checkpoint_and_config(cfg: DictConfig, command: str) -> tuple[dict[str, Any], DictConfig]:
    """`cfg.ckpt`'s payload and its config merged into `cfg` (command-line overrides win), validated."""
    payload, merged = load_with_config(cfg, command, cli_overrides())
    if payload is None:
        raise CheckpointError(f"{command} needs ckpt=PATH: a train run dir or a .pt file")
    return payload, merged


def checkpoint_model(payload: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The checkpoint's model on `device` (channels_last), in eval mode."""
    return model_from_checkpoint(payload).to(device, memory_format=torch.channels_last).eval()


def eval_precision(cfg: DictConfig) -> str:
    """The precision every reported accuracy is computed at (eval.precision; fp32 unless set)."""
    return str(cfg.eval.get("precision", "fp32"))


def test_logits(model: torch.nn.Module, splits: DataSplits, cfg: DictConfig, device: torch.device,
                tta: bool | str = False) -> SplitLogits:
    """The model's logits for the whole test set, in eval.batch_size batches at eval.precision, normalized as
    the splits say (a checkpoint's: splits.normalized_as)."""
    batches = EvalBatches(splits.test, cfg.eval.batch_size, device, splits.mean, splits.std)
    return collect_logits(model, batches, device=device, amp_dtype=resolve_precision(eval_precision(cfg), device),
                          tta=tta)


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain dict (what checkpoints and JSON files store)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
