"""The primitive checks every validator uses: read a key (a missing mandatory one is a ConfigError naming it), test
its value, and say in one line what it must be. Imports the leaves only."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cifar_cam.errors import ConfigError


def get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as e:  # MissingMandatoryValue, interpolation errors
        raise ConfigError(f"{key} is required but not set: pass {key}=... ({type(e).__name__})") from e


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) or OmegaConf.is_list(v)


def positive(v: Any) -> bool:
    return is_number(v) and v > 0


def check(cfg: DictConfig, key: str, ok: Callable[[Any], bool], want: str, optional: bool = False) -> None:
    value = get(cfg, key)
    if value is None and optional:
        return
    if not ok(value):
        raise ConfigError(f"{key} must be {want}, got {value!r}")


def int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and v >= low


def number_in(low: float, high: float, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and low <= v and (v < high if high_open else v <= high)


def image_sizes(v: Any) -> bool:
    return (isinstance(v, (list, tuple)) or OmegaConf.is_list(v)) and all(is_int(s) and s >= 8 for s in v)


def a_path(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def choice(choices: Iterable[str]) -> Callable[[Any], bool]:
    options = tuple(choices)
    return lambda v: v in options
