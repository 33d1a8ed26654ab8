"""A checkpoint's stored config as the base of a command's config: which sections each command takes from it,
the command line on top, and the names an older cifar-cam wrote brought up to date. Plain configs, no torch:
reading the checkpoint file is `training.checkpoint`'s."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The commands whose config takes a checkpoint's stored values (ckpt= a run dir or a .pt)
CHECKPOINT_CONFIG_COMMANDS = ("train", "lr-find", "eval", "gradcam", "export", "data")

# Sections of a checkpoint's config that define what was trained: eval and gradcam rebuild
# these from the checkpoint unless the command line overrides them.
MODEL_SECTIONS = ("data", "model", "eval")  # eval: a run trained with eval.tta=true is evaluated with it

# lr-find ckpt=RUN: a range test of the run's recipe (fresh weights), so everything that shapes its training,
# but not where it ran: those keys come from this command line (a DDP or cuda:1 run is tested here)
RECIPE_SECTIONS = ("seed", "data", "model", "aug", "optimizer", "scheduler", "trainer", "eval")
MACHINE_KEYS = ("trainer.device", "trainer.strategy", "trainer.num_threads", "trainer.sync_batchnorm")

# Classes an older cifar-cam stored by another path (checkpoints and run dirs written before the package
# layout moved, 2026-12-05): a stored config is read with today's names.
LEGACY_TARGETS = {"cifar_cam.optim.Muon": "cifar_cam.training.optim.Muon"}


def sections_for(command: str) -> tuple[str, ...] | None:
    """The config sections a command takes from the checkpoint: all of them to resume, the recipe's for
    lr-find, the model's otherwise."""
    if command == "data":  # the data it trained on, and how it augmented it
        return ("data", "aug", "model", "eval")
    return None if command == "train" else RECIPE_SECTIONS if command == "lr-find" else MODEL_SECTIONS


def upgrade(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config (a plain dict) with today's names for what an older cifar-cam wrote; a copy."""
    config = copy.deepcopy(stored)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and target in LEGACY_TARGETS:
                node["_target_"] = LEGACY_TARGETS[target]
            for value in node.values():
                walk(value)

    walk(config)
    return config


def merge_with_checkpoint(cfg: DictConfig, ckpt_config: dict[str, Any], overrides: list[str],
                          sections: Iterable[str] | None = None, ckpt_choices: dict[str, str] | None = None
                          ) -> DictConfig:
    """Takes `sections` (all if None) from the checkpoint's config; keys set on the command line win.

    A group choice on the command line (`data=folder`) keeps that whole section from `cfg`, unless
    it is the checkpoint's own choice (`ckpt_choices`); a key override (`data.root=...`) keeps just that key.
    """
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    stored = OmegaConf.create(ckpt_config)
    same = {f"{g}={c}" for g, c in (ckpt_choices or {}).items()}
    keys = [override_key(o) for o in overrides if o not in same]
    names = list(sections) if sections is not None else [k for k in stored.keys() if k != "hydra"]
    for section in names:
        if section not in stored or section in keys:
            continue
        merged[section] = stored[section]
        for key in keys:
            if key.startswith(section + "."):
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    return merged


def override_key(override: str) -> str:
    """'+data.root=x' -> 'data.root'; 'data=folder' -> 'data'; 'aug@x=y' -> 'aug'."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]
