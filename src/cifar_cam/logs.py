"""What the user reads on screen: the one rich console, log lines above live progress bars, and how numbers
and durations are shown."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

_console: Console | None = None


def silence_stdout() -> None:
    """Points stdout at /dev/null (its reader left: `| head`), so later writes and the exit flush raise nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _on_broken_pipe() -> None:
    # rich's default raises SystemExit(1): a run whose stdout closed would die; it goes on, logging to its file
    silence_stdout()
    console().quiet = True


def console() -> Console:
    """The one rich console every progress bar and log line goes through."""
    global _console
    if _console is None:
        _console = Console(highlight=False, soft_wrap=True)
        _console.on_broken_pipe = _on_broken_pipe  # type: ignore[method-assign]
    return _console


class ConsoleHandler(logging.Handler):
    """Prints records through the shared rich console so they appear above live progress bars.

    Records logged with ``extra={"file_only": True}`` go to the log file only (the CLI prints
    its own one-line error on stderr).
    """

    def __init__(self, stream: Any = None, level: int = logging.NOTSET) -> None:
        super().__init__(level)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        try:
            console().print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except BrokenPipeError:  # stdout closed (`| head`): the run goes on, its log file keeps every line
            _on_broken_pipe()
        except Exception:  # logging must never take the run down
            self.handleError(record)


def percent(x: float | None) -> str:
    """A fraction as a percentage for the screen: 0.9071 -> '90.71%' (None: '-')."""
    return "-" if x is None else f"{100 * x:.2f}%"


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 42 -> '42s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Bars:
    """rich progress bars (an outer one and a batch one) on a terminal; progress lines when piped.

    Piped output (CI, a log file) gets, besides the per-epoch log lines, one line every `every` seconds
    while the batch bar moves: step, the caller's info, images per second and the ETA of the bar's total.
    `enabled=False` (a DDP rank other than 0) shows neither.
    """

    def __init__(self, outer_label: str, outer_total: int, enabled: bool | None = None, every: float | None = 30.0,
                 clock: Callable[[], float] = time.monotonic, terminal: bool | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        terminal = console().is_terminal if terminal is None else terminal
        self.enabled = terminal if enabled is None else enabled
        self.lines = enabled is None and not self.enabled and every is not None  # piped: lines instead of bars
        self.every, self.clock = every, clock
        self._inner: tuple[str, int, int, float, int | None] = ("", 0, 0, 0.0, None)  # label, total, start, t0, imgs
        self._last_line = 0.0
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console(), transient=True,
            disable=not self.enabled,
        )
        self.outer = self.progress.add_task(outer_label, total=outer_total, info="")
        self.inner = self.progress.add_task("", total=1, info="", visible=False)

    def __enter__(self) -> Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start_inner(self, label: str, total: int, completed: int = 0, images_per_step: int | None = None) -> None:
        """Restarts the inner (batch) bar; `images_per_step` gives the piped lines their img/s."""
        self.progress.reset(self.inner, total=total, completed=completed, description=label, visible=True, info="")
        now = self.clock()
        self._inner, self._last_line = (label, total, completed, now, images_per_step), now

    def update_inner(self, completed: int, info: str = "") -> None:
        self.progress.update(self.inner, completed=completed, info=info)
        if self.lines and self.clock() - self._last_line >= self.every:  # type: ignore[operator]
            self._progress_line(completed, info)

    def _progress_line(self, completed: int, info: str) -> None:
        label, total, start, t0, images = self._inner
        now = self.clock()
        self._last_line = now
        done, elapsed = completed - start, now - t0
        if done <= 0 or elapsed <= 0:
            return
        rate = f"{done * images / elapsed:.1f} img/s" if images else f"{done / elapsed:.2f} steps/s"
        eta = duration((total - completed) * elapsed / done)
        logging.getLogger("cifar_cam").info("%s: step %d/%d%s  %s  ETA %s", label, completed, total,
                                            f"  {info}" if info else "", rate, eta)

    def set_outer_total(self, total: int) -> None:
        """A new number of epochs (a re-planned budgeted run)."""
        self.progress.update(self.outer, total=total)

    def advance_outer(self, completed: int, info: str = "") -> None:
        self.progress.update(self.outer, completed=completed, info=info)
