"""The keys a config may have, so that a `+key` nothing would read is refused instead of silently ignored.

A key is read when a YAML file under conf/ declares it (in any option of its group: `+data.image_size` is
data=folder's key), when it is an argument of the class a section's `_target_` names (`+optimizer.dampening=0.1`
reaches torch.optim.SGD), or when it is Hydra's own (`hydra.*`). Under `tags.` the user's own labels are free:
`+tags.owner=ana` is recorded in the run (its config, summary.json) and shown by `cifar-cam report`.
No torch here, unless a `+key` names an argument of a `_target_` class (then that class is imported to ask it).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.errors import ConfigError
from cifar_cam.io import config_dir

TAGS = "tags"  # +tags.<name>=<value>: the user's own labels for a run
NOT_CONFIG = ("hydra", "defaults")


def _leaves(node: Any, prefix: str) -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from _leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"


@functools.cache
def declared_keys(conf: str | None = None) -> frozenset[str]:
    """Every dotted key some YAML file under conf/ declares (group files under their group's name, `# @package
    _global_` presets at the top), with every section above them; Hydra's own files left out."""
    root = Path(conf or config_dir())
    keys: set[str] = set()
    for path in root.rglob("*.yaml"):
        parts = path.relative_to(root).parts
        if parts[0] == "hydra":
            continue
        text = path.read_text()
        body = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
        glob = "# @package _global_" in text
        prefix = "" if glob or len(parts) == 1 else ".".join(parts[:-1]) + "."
        for key in _leaves(body, prefix):
            if key.split(".", 1)[0] in NOT_CONFIG:
                continue
            pieces = key.split(".")
            keys.update(".".join(pieces[:i]) for i in range(1, len(pieces) + 1))
        if len(parts) > 1:
            keys.add(".".join(parts[:-1]))  # the group itself (+experiment=fast)
    return frozenset(keys)


def _target_arguments(cfg: DictConfig, section: str) -> tuple[set[str], bool] | None:
    """The constructor arguments of `section`'s `_target_` class and whether it takes **kwargs; None without one
    (or when the class cannot be imported: instantiating it will say why)."""
    target = OmegaConf.select(cfg, f"{section}._target_", default=None)
    if not isinstance(target, str) or "." not in target:
        return None
    module_name, _, name = target.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module_name), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    return set(parameters), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def added_key(override: str) -> str | None:
    """The key a `+key=value` / `++key=value` override adds, or None for any other override."""
    if not override.startswith("+"):
        return None
    return override.lstrip("+").split("=", 1)[0].split("@", 1)[0]


def check_added_keys(overrides: Iterable[str], cfg: DictConfig) -> None:
    """ConfigError (one line, exit 2) for the first `+key` of `overrides` that nothing would read."""
    known = declared_keys()
    for override in overrides:
        key = added_key(override)
        if key is None or key in known or key.split(".", 1)[0] in ("hydra", TAGS):
            continue
        section, _, argument = key.partition(".")
        takes = _target_arguments(cfg, section) if argument and "." not in argument else None
        if takes is not None and (argument in takes[0] or takes[1]):
            continue
        where = (f"nor an argument of {OmegaConf.select(cfg, f'{section}._target_')}" if takes is not None else
                 "in any config file")
        raise ConfigError(f"{key} is not a cifar-cam setting ({where}); nothing would read it. Your own label "
                          f"for the run: +{TAGS}.<name>=<value>; `cifar-cam <command> --help` lists the settings")
