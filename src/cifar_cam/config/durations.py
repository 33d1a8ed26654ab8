"""Durations as the config writes them (`trainer.time_budget=15min`): parsed and formatted without torch, so a
bad value is refused before anything heavy loads."""

from __future__ import annotations

import math
import re
from typing import Any

from cifar_cam.errors import ConfigError

DURATION_FORMS = "seconds (900, 90s), minutes (15min, 15m, 2.5min), hours (1h) or a sum (1h30min)"
_UNITS = {  # unit -> (seconds, rank): a sum names each rank once, largest first (1h30min, not 30min1h)
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), (3600.0, 0)),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), (60.0, 1)),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), (1.0, 2)),
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_TERM = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)")


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or a string: "90", "90s", "15min", "15m", "1h", "1h30min", "2.5min".

    ValueError, saying the accepted forms, for anything else; also for 0, a negative duration, nan and inf.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration: give {DURATION_FORMS}")
    if isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a duration: give {DURATION_FORMS}")
    if seconds <= 0:
        raise ValueError(f"{value!r} must be > 0: give {DURATION_FORMS}")
    return seconds


def _parse_duration_text(value: str) -> float:
    text = value.strip().lower()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:].strip() if text[:1] in "+-" and text else text
    if re.fullmatch(_NUMBER, body):
        return sign * float(body)
    total, pos, last_rank = 0.0, 0, -1
    for m in _TERM.finditer(body):
        unit = _UNITS.get(m.group(2))
        if m.start() != pos or unit is None or unit[1] <= last_rank:
            break
        total, pos, last_rank = total + float(m.group(1)) * unit[0], m.end(), unit[1]
    if pos == 0 or body[pos:].strip():
        raise ValueError(f"{value!r} is not a duration: give {DURATION_FORMS}")
    return sign * total


def format_duration(seconds: float) -> str:
    """A duration as parse_duration reads it, rounded up to whole seconds: 75 -> "1min15s", 5400 -> "1h30min"."""
    left = max(0, math.ceil(seconds - 1e-9))
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}min" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def time_budget_seconds(value: Any) -> float | None:
    """`trainer.time_budget` in seconds (None: off); ConfigError (one line, exit 2) for a bad value."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"trainer.time_budget={value}: {e}; or null for no budget") from None


