"""Logging that cooperates with rich progress bars."""

from __future__ import annotations

import logging
import os
import sys
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


class Bars:
    """rich progress bars (an outer one and a batch one) on a terminal; nothing when piped.

    Piped output (CI, a log file) gets the per-epoch log lines only.
    """

    def __init__(self, outer_label: str, outer_total: int, enabled: bool | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.enabled = console().is_terminal if enabled is None else enabled
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

    def start_inner(self, label: str, total: int, completed: int = 0) -> None:
        """Restarts the inner (batch) bar."""
        self.progress.reset(self.inner, total=total, completed=completed, description=label, visible=True, info="")

    def update_inner(self, completed: int, info: str = "") -> None:
        self.progress.update(self.inner, completed=completed, info=info)

    def advance_outer(self, completed: int, info: str = "") -> None:
        self.progress.update(self.outer, completed=completed, info=info)
