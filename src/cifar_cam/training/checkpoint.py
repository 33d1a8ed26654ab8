"""Checkpoints: atomic save, validated load (cached per process), the model rebuilt from its own config, RNG state,
and `ckpt=` as a whole: the file's stored config under the command line's (`load_with_config`).

A checkpoint is one plain dict that `torch.load(path, weights_only=True)` reads:
model, optimizer, scheduler, scaler, epoch (completed epochs), best_val_acc, best_epoch,
early-stopping counter, the metrics history, the partial epoch (after a signal), RNG states,
class names, and the config as a plain dict (the architecture is rebuilt from it on load). A config an
older cifar-cam stored is read with today's names (config.merge.upgrade). The rules of a resume are resume.py's.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_cam.config.merge import (
    CHECKPOINT_CONFIG_COMMANDS,
    MACHINE_KEYS,
    merge_with_checkpoint,
    sections_for,
    upgrade,
)
from cifar_cam.config.validate import image_hw, validate
from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD, DataSplits
from cifar_cam.data.decode import Fit
from cifar_cam.errors import CheckpointError
from cifar_cam.io import atomic_path

FORMAT = "cifar-cam/1"
REQUIRED_KEYS = ("format", "model", "config", "epoch", "classes")


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Writes `payload` to `path` atomically (io.atomic_path: temp file, fsync, rename, fsync dir)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)


def copy_checkpoint(source: str | Path, target: str | Path) -> None:
    """Copies a checkpoint file atomically (best.pt from last.pt when they are the same epoch)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def detached_copy(obj: Any) -> Any:
    """`obj` with every tensor cloned (dicts and lists copied): a payload that later training steps do not change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Deletes the temp files of checkpoint writes a kill cut short (`.<name>.pt.*.tmp`); returns them."""
    stale = sorted(Path(directory).glob(".*.pt.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def resolve_checkpoint(ckpt: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file, or a run dir (then its checkpoints/<prefer>.pt). Raises CheckpointError."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / f"{prefer}.pt"
        if candidate.is_file():
            return candidate
        if (path / f"{prefer}.pt").is_file():  # the checkpoints/ folder itself
            return path / f"{prefer}.pt"
        raise CheckpointError(f"ckpt={ckpt} is a directory without checkpoints/{prefer}.pt; "
                              "pass a train run dir or a .pt file")
    if not path.is_file():
        raise CheckpointError(f"ckpt={ckpt} does not exist; pass a train run dir or a .pt file")
    return path


def load_checkpoint(ckpt: str | Path, prefer: str = "best") -> dict[str, Any]:
    """Loads and validates a cifar-cam checkpoint on the CPU (weights_only: no code runs)."""
    path = resolve_checkpoint(ckpt, prefer)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"ckpt={path} is not a readable checkpoint (truncated or not a torch file: "
                              f"{type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"ckpt={path} is not a cifar-cam checkpoint (no '{FORMAT}' format tag)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"ckpt={path} is missing {missing}; it was not written by cifar-cam train")
    payload["path"] = str(path)
    payload["config"] = upgrade(payload["config"])
    return payload


def run_dir_of(checkpoint_path: str | Path) -> Path:
    """The train run dir a checkpoint lives in (<run>/checkpoints/x.pt -> <run>)."""
    path = Path(checkpoint_path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, numpy, torch and (on CUDA) the training GPU's RNG states, as tensors and plain types (weights_only-safe).

    One CUDA state, the training device's: a checkpoint written on an 8-GPU machine resumes on one.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restores what rng_state() captured; the CUDA state goes to `device` (when training there)."""
    random.setstate((state["python_pos"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible when they were written
        if not cuda:
            return
        cuda = cuda[device.index if device.index is not None and device.index < len(cuda) else 0]
    torch.cuda.set_rng_state(cuda, device)


def model_from_checkpoint(payload: dict[str, Any]) -> torch.nn.Module:
    """Rebuilds the architecture from the checkpoint's own config (not the current flags) and loads it."""
    from cifar_cam.models import describe_model, model_from_config

    model_cfg = dict(payload["config"].get("model", {}))
    if model_cfg.get("name", "resnet18") == "resnet18" and not model_cfg.get("source"):
        model_cfg.setdefault("width", 64)  # checkpoints from before the zoo: resnet18 at its width
    num_classes = len(payload["classes"])
    try:
        model = model_from_config(model_cfg, num_classes, fit_of(payload).size)
        model.load_state_dict(payload["model"])
    except (ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"ckpt={payload.get('path')}: weights do not fit {describe_model(model_cfg)} with "
                              f"{num_classes} classes ({first})") from e
    return model


def normalization_of(payload: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the checkpoint's model expects its inputs normalized with: its data's own, or CIFAR-10's
    for checkpoints written before data sets other than CIFAR had theirs."""
    data = payload.get("data") or {}
    if data.get("mean") and data.get("std"):
        return tuple(float(m) for m in data["mean"]), tuple(float(s) for s in data["std"])
    return CIFAR10_MEAN, CIFAR10_STD


def fit_of(payload: dict[str, Any]) -> Fit:
    """How an image becomes the checkpoint's input: its data's size and resize policy (stretch for checkpoints
    written before there were others)."""
    data = payload.get("data") or {}
    if data.get("fit"):
        return Fit.from_dict(data["fit"])
    return Fit.of(image_hw(OmegaConf.create(payload["config"])))


def load_model(ckpt: str | Path) -> torch.nn.Module:
    """A trained model from a run dir or .pt file, in eval mode on the CPU (for notebooks and scripts);
    `model.classes` holds its class names (index i is logit i), `model.mean` / `model.std` the normalization its
    inputs take ((pixels / 255 - mean) / std, per channel). For predictions on images of any size,
    or an exported .onnx / .pt2, use `cifar_cam.Predictor`."""
    payload = load_checkpoint(ckpt)
    model = model_from_checkpoint(payload)
    model.classes = list(payload["classes"])
    model.mean, model.std = normalization_of(payload)  # what its inputs are normalized with
    return model.eval()


_CACHE: dict[tuple[str, str], tuple[tuple[int, int], dict[str, Any]]] = {}


def cached_checkpoint(ckpt: str | Path, prefer: str) -> dict[str, Any]:
    """load_checkpoint, read once per process while the file is unchanged (same size and mtime): the CLI's
    pre-check, the task and the Predictor all ask for it."""
    path = resolve_checkpoint(ckpt, prefer)
    stat = path.stat()
    key, stamp = (str(path.resolve()), prefer), (stat.st_size, stat.st_mtime_ns)
    hit = _CACHE.get(key)
    if hit is None or hit[0] != stamp:
        _CACHE.clear()  # one checkpoint at a time: a payload holds a whole model
        _CACHE[key] = (stamp, load_checkpoint(path))
    return _CACHE[key][1]


def load_with_config(cfg: DictConfig, command: str, overrides: list[str], choices: dict[str, str] | None = None
                     ) -> tuple[dict[str, Any] | None, DictConfig]:
    """`cfg.ckpt`'s payload and the config to run with: the checkpoint's stored values, the command line on top.

    Validated for `command`. Whether a resume can continue the run is resume.check_resume's to say, whether the
    weights fit the architecture is checked where the model is built (the CLI's pre-check, the task).
    Without `ckpt=`: (None, cfg).
    """
    if "ckpt" not in cfg or OmegaConf.is_missing(cfg, "ckpt") or not cfg.ckpt or \
            command not in CHECKPOINT_CONFIG_COMMANDS:  # predict reads its model itself (.pt, .onnx, .pt2)
        return None, cfg
    prefer = "last" if command == "train" else "best"
    payload = cached_checkpoint(cfg.ckpt, prefer)
    merged = merge_with_checkpoint(cfg, payload["config"], overrides, sections_for(command),
                                   choices or payload.get("choices"))
    with open_dict(merged):
        merged.ckpt = cfg.ckpt
        if command == "lr-find":
            for key in MACHINE_KEYS:
                if OmegaConf.select(cfg, key, default=None) is not None:
                    OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    validate(merged, command)
    return payload, merged


def stored_test_accuracy(checkpoint: Path, with_precision: bool = False) -> Any:
    """The test accuracy the run's summary.json records for its best checkpoint (None for another file, or none);
    `with_precision`: (accuracy, the precision it was computed at)."""
    run = run_dir_of(checkpoint)
    summary: dict[str, Any] = {}
    if checkpoint.resolve() == (run / "checkpoints" / "best.pt").resolve():
        try:
            summary = json.loads((run / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
    value = summary.get("test_acc") if isinstance(summary, dict) else None
    accuracy = float(value) if isinstance(value, int | float) else None
    if not with_precision:
        return accuracy
    # older summaries tested at the training precision (their `precision`)
    return accuracy, (summary.get("eval_precision") or summary.get("precision")) if accuracy is not None else None


def check_classes(payload: dict[str, Any], splits: DataSplits) -> None:
    """Refuses data whose classes differ from the checkpoint's."""
    if list(payload["classes"]) != list(splits.classes):
        raise CheckpointError(
            f"ckpt={payload['path']} was trained on {len(payload['classes'])} classes "
            f"{list(payload['classes'])[:4]}..., "
            f"but the data has {splits.num_classes} {splits.classes[:4]}...; use the data it was trained on"
        )
