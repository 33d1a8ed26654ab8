"""The commands: their main configs, tasks and one-line help, the flags Hydra takes, and how the CLI fails (one line on
stderr, then an exit code). No torch, no Hydra here."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from cifar_cam.logs import silence_stdout

# command -> (main config name, "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "lr-find": ("lr_find", "cifar_cam.tasks.lr_find:lr_find", "LR range test (torch-lr-finder): plot + suggested LR"),
    "train": ("train", "cifar_cam.tasks.train:train", "train; checkpoint every epoch; test the best model"),
    "eval": ("eval", "cifar_cam.tasks.eval:eval_", "evaluate ckpt=PATH: accuracy, per class, confusion matrix"),
    "gradcam": ("gradcam", "cifar_cam.tasks.gradcam:gradcam", "Grad-CAM heatmaps of misclassified test images"),
    "predict": ("predict", "cifar_cam.tasks.predict:predict_images",
                "top-k classes (and CAM) of your own images: inputs=..."),
    "serve": ("serve", "cifar_cam.tasks.serve:serve", "HTTP API + web page over a model (FastAPI): ckpt=..."),
    "export": ("export", "cifar_cam.tasks.export:export", "ONNX / torch.export (and int8) files, checked vs PyTorch"),
    "data": ("data_info", "cifar_cam.tasks.data:inspect_data",
             "a look at a data set: counts, sizes, bad files, duplicates, mean/std, samples.png"),
}


# Commands that are not Hydra apps (their arguments are paths and flags, not overrides)
UTILITIES = ("report", "cache")


# `report` is not a Hydra app: its arguments are run dirs, not overrides (see report_main).
REPORT_HELP = "one table / CSV / plot over sweep jobs or run dirs: report DIR..."


# Hydra flags that take a value (the value is not an override).
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}


INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
              "--resolve"}


INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


USAGE = """usage: cifar-cam <command> [key=value ...] [-m|--multirun] [--cfg job] [--help]

commands:
{commands}

examples:
  cifar-cam train                                   ResNet18 on CIFAR-10 with the defaults
  cifar-cam train data=synthetic trainer.epochs=2   a one-minute smoke run on CPU
  cifar-cam train -m optimizer.lr=0.01,0.05 seed=1,2   a sweep (multirun/train/<time>/<job>/)
  cifar-cam eval ckpt=outputs/train/<run>           test accuracy of a run's best checkpoint
  cifar-cam train --help                            every config group and key of a command

Runs write to outputs/<command>/<YYYY-MM-DD_HH-MM-SS>/; configs live in {conf}."""


def fail(command: str | None, message: str, code: int = 2, label: str = "error") -> NoReturn:
    """One line on stderr (`cifar-cam <command>: <label>: <message>`), then exit."""
    prefix = f"cifar-cam {command}" if command else "cifar-cam"
    print(f"{prefix}: {label}: {message}", file=sys.stderr)
    sys.exit(code)


def stopped(command: str | None, message: str, code: int) -> NoReturn:
    """A stop the user asked for (Ctrl-C, SIGTERM): said as one, not as an error; the exit code stays 128 + n."""
    fail(command, message, code, label="stopped")


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Separates overrides (key=value) from Hydra's flags (with their values)."""
    overrides, flags = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(args)
                                                 and args[i + 1] in INFO_VALUES)
            if "=" not in arg and takes_value and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides, flags


class PipeSafe:
    """A text stream whose reader may leave (`| head`): the output stops, quietly, and the exit code stays 0."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            silence_stdout()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            silence_stdout()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
