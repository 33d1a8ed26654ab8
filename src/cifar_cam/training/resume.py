"""The rules of `train ckpt=RUN`: what may change when a run is resumed, checked before any work
(`check_resume`, called by the CLI's pre-check and by train), and the changes applied to the restored state.

What defines a run (RUN_KEYS) may not change. A changed optimizer or scheduler hyperparameter is applied
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

from omegaconf import DictConfig, OmegaConf

from cifar_cam.errors import CheckpointError, ConfigError
from cifar_cam.training.checkpoint import cached_checkpoint, model_from_checkpoint, run_dir_of
from cifar_cam.training.schedulers import facts, scheduler_name

log = logging.getLogger("cifar_cam")

# What defines a run: resuming with another value would not load, or would silently change the data
# (another seed reshuffles the val split into train). Everything else may change on resume.
RUN_KEYS = ("seed", "model.source", "model.name", "model.width", "model.depth", "model.widen", "model.widths",
            "model.small_input", "model.freeze", "data.source", "data.num_classes", "data.train_size",
            "data.val_size", "data.subset", "data.image_size", "data.batch_size", "optimizer._target_",
            "optimizer.backbone_lr_scale", "optimizer.bias_lr_scale", "scheduler._target_", "scheduler.interval")
# what a key meant in checkpoints written before it existed
BEFORE_THE_KEY = {"model.freeze": "none", "optimizer.backbone_lr_scale": 1.0, "optimizer.bias_lr_scale": 1.0}

OPTIMIZER_GROUP_KEYS = ("momentum", "betas", "nesterov", "weight_decay", "eps", "dampening", "ns_steps")


def check_resume(cfg: DictConfig, payload: dict[str, Any]) -> None:
    """Refuses a resume that cannot continue the run in `payload`: changed RUN_KEYS, a refused hyperparameter,
    fewer epochs, a stretched schedule, an older file."""
    stored = OmegaConf.create(payload["config"])
    for key in RUN_KEYS:
        old, new = (OmegaConf.select(c, key, default=BEFORE_THE_KEY.get(key)) for c in (stored, cfg))
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
    if epochs != old_epochs and facts(cfg.scheduler).span:
        name = scheduler_name(cfg.scheduler)
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
    attribute: str | None = None  # a scheduler key: the restored scheduler's attribute that holds it


def _cycles_momentum(cfg: DictConfig) -> bool:
    return facts(cfg.scheduler).cycles_momentum and bool(OmegaConf.select(cfg, "scheduler.cycle_momentum",
                                                                           default=True))


def _refusal(change: Change, cfg: DictConfig) -> str | None:
    """Why `change` cannot be applied to the restored state (None: it can)."""
    section, name = change.key.split(".", 1)
    if section == "optimizer":
        if name in ("momentum", "betas") and _cycles_momentum(cfg):
            return "scheduler=onecycle cycles momentum (scheduler.base_momentum / max_momentum own it)"
        if name in ("lr", "aux_lr_scale", *OPTIMIZER_GROUP_KEYS):
            return None
        return "the optimizer cannot change it mid-run"
    if name in facts(cfg.scheduler).resumable:
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
            change = Change(f"{section}.{name}", old, new,
                            facts(cfg.scheduler).resumable.get(name) if section == "scheduler" else None)
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
        elif c.attribute is not None:
            per_group = isinstance(getattr(scheduler, c.attribute, None), list)  # plateau's min_lrs
            setattr(scheduler, c.attribute, [c.new] * len(optimizer.param_groups) if per_group else c.new)
        else:
            continue  # max_lr: it follows optimizer.lr, rescaled above
        log.info("%s %s -> %s: applied to the resumed %s", c.key, c.old, c.new,
                 "optimizer" if section == "optimizer" else "scheduler")
