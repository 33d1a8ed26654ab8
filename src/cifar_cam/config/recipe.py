"""A config as a command line: the overrides under which `cifar-cam <command>` composes it again.

`lr-find` prints the train command that trains what it measured; the config it ran with may come
from a checkpoint (`ckpt=`) and a preset, so the command is derived from the config itself, not
from what was typed: the group choices that differ from the command's defaults, then every key
whose value differs from what those choices compose to.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.io import config_dir

# What Hydra's override grammar reads as an unquoted string (no , [ ] { } ( ) = ' " or space)
_PLAIN = re.compile(r"[A-Za-z_/.\-+:@%][A-Za-z0-9_/.\-+:@%]*")
PRESET_GROUP = "experiment"
_OTHER_TYPES = re.compile(r"(?i)(true|false|null|nan|[+-]?inf|[+-]?(\d[\d_]*\.?\d*|\.\d+)(e[+-]?\d+)?)")


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar: null, true, 0.05, [16,24], {a:1}, or a string (quoted where needed)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and not _OTHER_TYPES.fullmatch(text):
        return text
    # Hydra's quoted strings: a backslash escapes only a quote (or the backslashes before one, or the end)
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's compose API: the running app's (inside a command), or one initialized on the package's configs."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        yield


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container (OmegaConf.to_container); a list is one leaf."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    else:
        yield prefix.rstrip("."), node


def choices_of(runtime_choices: Any, overrides: Iterable[str] | None = None) -> dict[str, str]:
    """The config-group choices (data=folder, ...) of Hydra's `runtime.choices`, without Hydra's own and unset ones.

    A group given a list of options (logger=[tensorboard,csv]), which Hydra leaves out of its choices, is taken
    from `overrides` (default: the running app's task overrides) as the value that composes it again:
    '[tensorboard,csv]'.
    """
    choices = {g: str(c) for g, c in runtime_choices.items() if not g.startswith("hydra") and c is not None}
    choices.update({g: v for g, v in _list_choices(overrides).items() if g not in choices})
    return choices


def _list_choices(overrides: Iterable[str] | None) -> dict[str, str]:
    """{group: '[a,b]'} of the overrides that choose a list of a config group's options (group=[a,b])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    parser, found = OverridesParser.create(), {}
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # not ours to judge here: Hydra has parsed (or refused) it already
            continue
        value = override.value()
        group = override.key_or_group
        if override.package is None and not override.is_delete() and isinstance(value, list) and value and \
                all(isinstance(v, str) for v in value) and (Path(config_dir()) / group).is_dir():
            found[group] = hydra_value(value)
    return found


def _skipped(key: str, skip: Iterable[str]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in skip)


def overrides_for(cfg: DictConfig | dict[str, Any], command: str, choices: dict[str, str],
                  skip: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
    """The overrides under which `cifar-cam <command>` composes `cfg` (keys under `skip` left out), ending
    with `extra` (key=value overrides that replace cfg's values: derived keys then follow them).

    `choices` are the config-group choices `cfg` was composed with (data=folder, experiment=cpu_quick);
    those the command does not have, or has by default, are left out. Keys the command lacks are left out.
    """
    from hydra import compose

    config_name = command.replace("-", "_")  # conf/<command>.yaml: train, lr_find, eval, gradcam
    def composed(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        groups = cfg.hydra.runtime.choices  # a group chosen as null (experiment) is there too, as None
        return cfg, {g: str(c) for g, c in groups.items() if not g.startswith("hydra")}

    with _hydra():
        base, have_choices = composed([])
        picked: list[str] = []
        # a preset first: the choices it makes itself (experiment=cpu_quick -> optimizer=muon) need not be typed
        for group in sorted(choices, key=lambda g: g != PRESET_GROUP):
            choice = str(choices[group])
            if group in have_choices and choices[group] is not None and choice != have_choices[group]:
                picked.append(f"{group}={choice}")
                if group == PRESET_GROUP:
                    base, have_choices = composed(picked)
        base = compose(config_name, overrides=picked)
        plain = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
        wanted, wanted_cfg = dict(leaves(plain)), OmegaConf.create(plain)
        # keys the command's config derives (scheduler.max_lr: ${optimizer.lr}) are compared after the others
        unresolved = leaves(OmegaConf.to_container(base, resolve=False))
        derived = {k: v for k, v in unresolved if isinstance(v, str) and "${" in v}

        def differing(keys: Iterable[str], against: DictConfig) -> list[str]:
            have = dict(leaves(OmegaConf.to_container(against, resolve=True)))
            return [f"{k}={hydra_value(wanted[k])}" for k in keys if k in have and wanted[k] != have[k]]

        extra = list(extra)
        replaced = [o.split("=", 1)[0] for o in extra]
        keys = [k for k in wanted if not _skipped(k, [*skip, *replaced])]
        changed = differing([k for k in keys if k not in derived], base)
        # a derived key that still equals what its interpolation gives in `cfg` follows it: left out
        followed = {k for k in keys if k in derived and _follows(wanted_cfg, k, derived[k])}
        again = compose(config_name, overrides=picked + changed + extra)
        changed += differing([k for k in keys if k in derived and k not in followed], again)
    return picked + changed + extra


def _follows(cfg: DictConfig, key: str, interpolation: str) -> bool:
    """Whether `key` of `cfg` equals `interpolation` (e.g. '${optimizer.lr}') resolved against `cfg`."""
    probe = cfg.copy()
    OmegaConf.update(probe, key, interpolation, force_add=True)
    try:
        return OmegaConf.select(probe, key) == OmegaConf.select(cfg, key)
    except Exception:  # an interpolation that does not resolve here
        return False


def command_line(command: str, overrides: Iterable[str]) -> str:
    """`cifar-cam <command> ...` as a shell would take it."""
    return " ".join(["cifar-cam", command, *map(shlex.quote, overrides)])
