"""The errors users can act on. The CLI turns each into one line on stderr and an exit code."""

from __future__ import annotations


class CifarCamError(Exception):
    """A failure the user can fix; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(CifarCamError):
    """A bad command line or config value (exit 2)."""

    exit_code = 2


class DataError(CifarCamError):
    """Data that is missing, empty or unreadable (exit 2: found before any work starts)."""

    exit_code = 2


class CheckpointError(CifarCamError):
    """A checkpoint that is missing, truncated, not ours, or does not fit (exit 2)."""

    exit_code = 2


class DivergenceError(CifarCamError):
    """The loss became NaN or inf during training (exit 1)."""

    exit_code = 1


class TrainingInterrupted(CifarCamError):
    """SIGINT / SIGTERM stopped the command, as asked: not a failure (the CLI says 'stopped', at warning
    level); exit 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
