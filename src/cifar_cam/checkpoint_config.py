"""`ckpt=`: a checkpoint together with its stored config merged with the command line, checked.

One function, `load_with_config`, serves the CLI's pre-check and every task (train's resume,
eval, gradcam, lr-find); a checkpoint file is read once per process (cached by path, size and
mtime), however many of them ask.

On resume, a changed optimizer or scheduler hyperparameter is applied to the restored state
(`apply_resume_changes`, with a log line) or refused (`resume_changes`, exit 2), per key:

- applied: `optimizer.lr` (every rate the optimizer and scheduler hold is rescaled, so the schedule
  keeps its shape), `optimizer.momentum` / `betas` (refused when OneCycle cycles momentum: the
  scheduler owns them), `nesterov`, `weight_decay` (not on Muon's filter group, 0 by construction),
  `eps`, `dampening`, Muon's `aux_lr_scale` (its group's `lr_scale`) and `ns_steps`;
  ReduceLROnPlateau's `factor`, `patience`, `min_lr`, `threshold`, `threshold_mode`, `cooldown`;
  cosine's `eta_min`;
- refused: everything else (e.g. OneCycle's `pct_start` / `div_factor`, plateau's `mode`): those fix
  the shape of a schedule the run has partly done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cifar_cam.config import MODEL_SECTIONS, merge_with_checkpoint, validate
from cifar_cam.errors import CheckpointError, ConfigError

log = logging.getLogger("cifar_cam")

# What defines a run: resuming with another value would not load, or would silently change the data
# (another seed reshuffles the val split into train). Everything else may change on resume.
RUN_KEYS = ("seed", "model.name", "model.width", "data.source", "data.num_classes", "data.train_size",
            "data.val_size", "data.subset", "data.image_size", "data.batch_size", "optimizer._target_",
            "scheduler._target_", "scheduler.interval")

# The schedulers whose shape the run's length fixes: the constructor argument bound to it (in steps, or in
# epochs for T_max under interval=epoch). Others (plateau, none) need nothing of the run's length.
SCHEDULER_SPAN = {"OneCycleLR": "total_steps", "CosineAnnealingLR": "T_max"}


def scheduler_span(scheduler_cfg: Any) -> str | None:
    """The argument of `scheduler_cfg`'s scheduler bound to the run's length, or None."""
    target = scheduler_cfg.get("_target_") if scheduler_cfg is not None else None
    return SCHEDULER_SPAN.get(str(target).rsplit(".", 1)[-1]) if target else None

OPTIMIZER_GROUP_KEYS = ("momentum", "betas", "nesterov", "weight_decay", "eps", "dampening", "ns_steps")
PLATEAU_KEYS = {"factor": "factor", "patience": "patience", "threshold": "threshold",
                "threshold_mode": "threshold_mode", "cooldown": "cooldown", "min_lr": "min_lrs"}

_CACHE: dict[tuple[str, str], tuple[tuple[int, int], dict[str, Any]]] = {}


def cached_checkpoint(ckpt: str | Path, prefer: str) -> dict[str, Any]:
    """load_checkpoint, read once per process while the file is unchanged (same size and mtime)."""
    from cifar_cam.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(ckpt, prefer)
    stat = path.stat()
    key, stamp = (str(path.resolve()), prefer), (stat.st_size, stat.st_mtime_ns)
    hit = _CACHE.get(key)
    if hit is None or hit[0] != stamp:
        _CACHE.clear()  # one checkpoint at a time: a payload holds a whole model
        _CACHE[key] = (stamp, load_checkpoint(path))
    return _CACHE[key][1]


# The commands whose config takes a checkpoint's stored values (ckpt= a run dir or a .pt)
CHECKPOINT_CONFIG_COMMANDS = ("train", "lr-find", "eval", "gradcam", "export")

# lr-find ckpt=RUN: a range test of the run's recipe (fresh weights), so everything that shapes its training,
# but not where it ran: those keys come from this command line (a DDP or cuda:1 run is tested here)
RECIPE_SECTIONS = ("seed", "data", "model", "aug", "optimizer", "scheduler", "trainer", "eval")
MACHINE_KEYS = ("trainer.device", "trainer.strategy", "trainer.num_threads", "trainer.sync_batchnorm")


def sections_for(command: str) -> tuple[str, ...] | None:
    """The config sections a command takes from the checkpoint: all of them to resume, the recipe's for
    lr-find, the model's otherwise."""
    return None if command == "train" else RECIPE_SECTIONS if command == "lr-find" else MODEL_SECTIONS


def load_with_config(cfg: DictConfig, command: str, overrides: list[str], choices: dict[str, str] | None = None
                     ) -> tuple[dict[str, Any] | None, DictConfig]:
    """`cfg.ckpt`'s payload and the config to run with: the checkpoint's stored values, the command line on top.

    Validated for `command`; for `train` (a resume), also checked to continue the run (check_resume).
    Whether the other commands' weights fit is checked where the model is built (the CLI's pre-check, the task).
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
    if command == "train":
        check_resume(merged, payload)
    return payload, merged


def check_resume(cfg: DictConfig, payload: dict[str, Any]) -> None:
    """Refuses a resume that cannot continue the run in `payload`: changed RUN_KEYS, a refused hyperparameter,
    fewer epochs, a stretched schedule, an older file."""
    from cifar_cam.checkpoint import model_from_checkpoint, run_dir_of

    stored = OmegaConf.create(payload["config"])
    for key in RUN_KEYS:
        old, new = OmegaConf.select(stored, key, default=None), OmegaConf.select(cfg, key, default=None)
        if old != new:
            raise ConfigError(f"{key}={new} differs from the run being resumed ({key}={old}); resume with the "
                              "run's own value, or start a new run without ckpt=")
    resume_changes(payload["config"], cfg)  # raises for a refused one
    model_from_checkpoint(payload)  # the weights fit the architecture the config names
    done, epochs = payload["epoch"], cfg.trainer.epochs
    if epochs < done:
        raise ConfigError(f"trainer.epochs={epochs} is less than the {done} epochs the run has done; "
                          f"pass trainer.epochs>={done}")
    old_epochs = OmegaConf.select(stored, "trainer.epochs", default=epochs)
    if epochs != old_epochs and scheduler_span(cfg.scheduler):
        name = str(cfg.scheduler._target_).rsplit(".", 1)[-1]
        raise ConfigError(f"trainer.epochs={epochs}: the run's {name} schedule spans its {old_epochs} epochs "
                          "and cannot be stretched on resume; start a new run for a longer schedule")
    path = Path(payload["path"])
    last = run_dir_of(path) / "checkpoints" / "last.pt"
    if path.resolve() != last.resolve() and last.is_file():
        last_epoch = cached_checkpoint(last, "last")["epoch"]
        if last_epoch > done:
            raise CheckpointError(f"ckpt={path} is epoch {done} but its run went on to epoch {last_epoch}; resuming "
                                  f"from it would overwrite epochs {done + 1}-{last_epoch}: pass the run dir "
                                  f"{run_dir_of(path)} to resume from last.pt")


@dataclass
class Change:
    """One optimizer / scheduler key whose value on the command line differs from the resumed run's."""

    key: str      # e.g. "optimizer.momentum"
    old: Any
    new: Any


def _cycles_momentum(cfg: DictConfig) -> bool:
    return str(OmegaConf.select(cfg, "scheduler._target_", default="")).endswith("OneCycleLR") and bool(
        OmegaConf.select(cfg, "scheduler.cycle_momentum", default=True))


def _refusal(change: Change, cfg: DictConfig) -> str | None:
    """Why `change` cannot be applied to the restored state (None: it can)."""
    section, name = change.key.split(".", 1)
    if section == "optimizer":
        if name in ("momentum", "betas") and _cycles_momentum(cfg):
            return "scheduler=onecycle cycles momentum (scheduler.base_momentum / max_momentum own it)"
        if name in ("lr", "aux_lr_scale", *OPTIMIZER_GROUP_KEYS):
            return None
        return "the optimizer cannot change it mid-run"
    if name in PLATEAU_KEYS and str(cfg.scheduler._target_).endswith("ReduceLROnPlateau"):
        return None
    if name == "eta_min" and str(cfg.scheduler._target_).endswith("CosineAnnealingLR"):
        return None
    if name == "max_lr" and change.new == OmegaConf.select(cfg, "optimizer.lr"):
        return None  # ${optimizer.lr}: follows the rescaled rates
    return "it fixes the shape of a schedule the run has partly done"


def resume_changes(stored_config: dict[str, Any], cfg: DictConfig) -> list[Change]:
    """The optimizer / scheduler keys that differ from the resumed run's; ConfigError for one that can't apply."""
    stored = OmegaConf.create(stored_config)
    changes = []
    for section in ("optimizer", "scheduler"):
        old_section = OmegaConf.to_container(stored[section], resolve=True) if section in stored else {}
        new_section = OmegaConf.to_container(cfg[section], resolve=True)
        for name in sorted(set(old_section) | set(new_section)):  # type: ignore[arg-type]
            old, new = old_section.get(name), new_section.get(name)  # type: ignore[union-attr]
            if f"{section}.{name}" in RUN_KEYS or name == "_partial_" or old == new:
                continue
            change = Change(f"{section}.{name}", old, new)
            why = _refusal(change, cfg)
            if why is not None:
                raise ConfigError(f"{change.key}={new} differs from the resumed run's {old}, and {why}: resume with "
                                  f"{change.key}={old}, or start a new run without ckpt=")
            changes.append(change)
    return changes


def rescale_lr(optimizer: Any, scheduler: Any | None, old: float, new: float) -> None:
    """Scales every learning rate the optimizer and scheduler hold by new / old (the schedule keeps its shape).

    A rate equal to `old` becomes `new` exactly (0.05 * (0.01 / 0.05) would be 0.010000000000000002).
    """
    def scale(v: float) -> float:
        return new if v == old else v * new / old

    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] = scale(group[key])
    for attr in ("base_lrs", "_last_lr", "min_lrs"):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list):
            setattr(scheduler, attr, [scale(v) for v in values])
    if isinstance(getattr(scheduler, "eta_min", None), float):
        scheduler.eta_min = scale(scheduler.eta_min)


def apply_resume_changes(changes: list[Change], optimizer: Any, scheduler: Any | None) -> None:
    """Applies what resume_changes accepted to the restored optimizer and scheduler, a log line each."""
    by_key = {c.key: c for c in changes}
    if "optimizer.lr" in by_key:  # first: a changed min_lr / eta_min below is then set as given
        c = by_key.pop("optimizer.lr")
        rescale_lr(optimizer, scheduler, c.old, c.new)
        log.info("optimizer.lr %g -> %g: learning rates rescaled by %g", c.old, c.new, c.new / c.old)
    for c in by_key.values():
        section, name = c.key.split(".", 1)
        if section == "optimizer":
            for group in optimizer.param_groups:
                if name == "aux_lr_scale" and not group.get("muon", True):
                    group["lr_scale"] = c.new
                elif name == "weight_decay" and group.get("muon"):
                    continue  # Muon's filters: fixed norm instead of decay
                elif name in group:
                    group[name] = tuple(c.new) if name == "betas" else c.new
        elif name in PLATEAU_KEYS:
            value = [c.new] * len(optimizer.param_groups) if name == "min_lr" else c.new
            setattr(scheduler, PLATEAU_KEYS[name], value)
        elif name == "eta_min":
            scheduler.eta_min = c.new
        else:
            continue  # max_lr: it follows optimizer.lr, rescaled above
        log.info("%s %s -> %s: applied to the resumed %s", c.key, c.old, c.new,
                 "optimizer" if section == "optimizer" else "scheduler")
