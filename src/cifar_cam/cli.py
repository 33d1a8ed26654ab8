"""`cifar-cam <command> [overrides] [-m]`: argv[1] picks the command, the rest goes to Hydra.

Before Hydra starts, the CLI composes the config once to refuse bad input in one line
(exit 2) and reserves a fresh run directory, so runs started in the same second never share one.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from cifar_cam.checkpoint_config import CHECKPOINT_CONFIG_COMMANDS
from cifar_cam.errors import CifarCamError, TrainingInterrupted
from cifar_cam.io import config_dir, lock_run_dir, reserve_dir
from cifar_cam.logs import silence_stdout

log = logging.getLogger("cifar_cam")

# command -> (main config name, "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "lr-find": ("lr_find", "cifar_cam.tasks.lr_find:lr_find", "LR range test (torch-lr-finder): plot + suggested LR"),
    "train": ("train", "cifar_cam.tasks.train:train", "train; checkpoint every epoch; test the best model"),
    "eval": ("eval", "cifar_cam.tasks.eval:eval_", "evaluate ckpt=PATH: accuracy, per class, confusion matrix"),
    "gradcam": ("gradcam", "cifar_cam.tasks.gradcam:gradcam", "Grad-CAM heatmaps of misclassified test images"),
    "predict": ("predict", "cifar_cam.tasks.predict:predict", "top-k classes (and CAM) of your own images: inputs=..."),
    "serve": ("serve", "cifar_cam.tasks.serve:serve", "HTTP API + web page over a model (FastAPI): ckpt=..."),
    "export": ("export", "cifar_cam.tasks.export:export", "ONNX / torch.export (and int8) files, checked vs PyTorch"),
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


def _sweep_variants(overrides: list[str], limit: int = 100) -> list[list[str]]:
    """Jobs that together use every value of every swept key once (not the whole product), for the pre-check.

    The first holds the first value of each swept key; each further one changes one key to another value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    first: list[str] = []
    swept: list[tuple[int, str, list[str]]] = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval() sweeps (Optuna) cannot be enumerated: check the rest
                continue
            if not values:
                continue
            swept.append((len(first), o.get_key_element(), values))
            first.append(f"{o.get_key_element()}={values[0]}")
        else:
            first.append(o.input_line)
    variants = [first]
    for position, key, values in swept:
        for value in values[1:]:
            variant = list(first)
            variant[position] = f"{key}={value}"
            variants.append(variant)
    return variants[:limit]


def sweep_without_multirun(overrides: list[str]) -> str | None:
    """The first override that lists several values (a=1,2: a sweep), for a command line without -m; else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # bad grammar: the pre-check says so in its own words
        return None
    return next((o.input_line for o in parsed if o.is_sweep_override()), None)


def explain_hydra_error(e: Exception, config_name: str, overrides: list[str]) -> str:
    """Turns Hydra's multi-line composition errors into one actionable line."""
    import re

    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if m:
        key = m.group(1)
        hint = ""
        try:
            from hydra import compose, initialize_config_dir

            from cifar_cam.helptext import did_you_mean, known_keys

            groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0] and o[0] not in "+~"]
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
                try:
                    cfg = compose(config_name, overrides=groups)  # data=folder: the keys of folder
                except Exception:
                    cfg = compose(config_name)
            close = did_you_mean(key, known_keys(cfg))
            hint = f"; did you mean {', '.join(close)}?" if close else ""
        except Exception:  # a hint is a courtesy: the error line stands without it
            pass
        return f"unknown config key '{key}'{hint} (to add a new key on purpose: +{key}=...)"
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, choice = m.group(1), m.group(2)
        options = sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))
        if options:
            return f"unknown choice {group}={choice}; choose one of: {', '.join(options)}"
        return f"unknown config group '{group}' (in {group}={choice})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return f"bad override ({first})"


def precheck(command: str, overrides: list[str], machine: bool = True) -> Any:
    """Composes the config as Hydra will and validates it; one line and exit 2 on any problem.

    `machine`: also check what needs torch or the disk (the device, data.root); --cfg checks the config only.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cifar_cam.config import validate

    config_name = COMMANDS[command][0]
    checked: set[tuple[str, str]] = set()  # (what, path): data roots and checkpoints are checked once
    first_cfg = None
    try:
        variants = _sweep_variants(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(command, explain_hydra_error(e, config_name, overrides))
    for single in variants:
        try:
            with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=command):
                cfg = compose(config_name, overrides=single)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            fail(command, explain_hydra_error(e, config_name, overrides))
        try:
            cfg = with_checkpoint_config(command, cfg, single)  # validated as merged (checkpoint_config)
            first_cfg = cfg if first_cfg is None else first_cfg
            validate(cfg, command)  # torch is imported only past this line: bad keys are refused in ~1 s
            if not machine:
                continue
            if command == "predict":  # before torch loads: the model file and the inputs exist
                from cifar_cam.inputs import check_inputs, check_model_file

                check_model_file(cfg.ckpt, cfg.predict.layer if cfg.predict.cam else None)
                check_inputs(cfg.inputs)
            from cifar_cam.data import check_root
            from cifar_cam.engine import resolve_device

            resolve_device(cfg.trainer.device)
            if command != "export" and cfg.data.source == "folder" and ("root", str(cfg.data.root)) not in checked:
                # (export reports unreachable data itself: export.check=false exports without it)
                check_root(cfg.data.root)
                checked.add(("root", str(cfg.data.root)))
        except CifarCamError as e:
            fail(command, str(e), e.exit_code)
    return first_cfg


def print_help(command: str, overrides: list[str]) -> None:
    """`cifar-cam <command> [overrides] --help`: the groups and keys in effect with those overrides, described."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from cifar_cam.helptext import render

    config_name, _, summary = COMMANDS[command]
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name=command):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        fail(command, explain_hydra_error(e, config_name, overrides))
    from cifar_cam.recipe import choices_of

    choices = choices_of(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    sys.stdout = PipeSafe(sys.stdout)
    print(render(command, summary, cfg, choices))


def with_checkpoint_config(command: str, cfg: Any, overrides: list[str]) -> Any:
    """With `ckpt=`: the config the task will run with, the checkpoint's stored values merged in, checked
    (checkpoint_config.load_with_config, which the task calls again: the file is read once per process)."""
    from cifar_cam.checkpoint_config import load_with_config

    payload, merged = load_with_config(cfg, command, overrides)
    if payload is not None and command not in ("train", "lr-find"):  # train's resume check builds the model
        # itself; lr-find starts from fresh weights
        from cifar_cam.checkpoint import model_from_checkpoint

        model_from_checkpoint(payload)  # weights that do not fit: one line now, not after the data loads
    return merged


def inherit_choices(command: str, overrides: list[str]) -> list[str]:
    """Prepends the config-group choices stored in `ckpt=`'s checkpoint (data=..., model=...).

    `cifar-cam eval ckpt=RUN data.test_size=100` then composes against the data group the run
    was trained with; a group named on the command line still wins.
    """
    ckpt = next((o.split("=", 1)[1] for o in overrides if o.startswith("ckpt=")), None)
    if command not in CHECKPOINT_CONFIG_COMMANDS or not ckpt:
        return overrides
    from cifar_cam.checkpoint_config import cached_checkpoint, sections_for

    try:
        payload = cached_checkpoint(ckpt, "last" if command == "train" else "best")
    except CifarCamError as e:
        fail(command, str(e), e.exit_code)
    sections = sections_for(command)
    groups = set(payload.get("choices", {})) if sections is None else {*sections, "experiment"} - {"eval"}
    if command not in ("train", "lr-find"):
        groups.discard("experiment")
    named = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    inherited = [f"{g}={c}" for g, c in payload.get("choices", {}).items() if g in groups and g not in named]
    return inherited + overrides


def _quote(path: Path | str) -> str:
    """A path as a Hydra override value (quoted where Hydra would split or retype it)."""
    from cifar_cam.recipe import hydra_value

    return hydra_value(str(path))


# Jobs of this process's sweep that failed: (job number, its run dir, message, exit code).
FAILED_JOBS: list[tuple[int, str, str, int]] = []


def failed_jobs_in_logs(sweep_dir: Path, command: str) -> list[tuple[int, str, str, int]]:
    """Failed jobs of a sweep whose jobs ran in other processes (joblib, submitit), from task_entry's log line."""
    import re

    found = []
    for log_file in sweep_dir.glob(f"*/{command}.log"):
        for line in log_file.read_text(errors="replace").splitlines():
            m = re.search(r"\[WARNING\] job #(\d+) failed: (.*)", line)
            if m:  # the exit code stays in that process: 1 (a failure at run time)
                found.append((int(m.group(1)), str(log_file.parent), m.group(2), 1))
    return sorted(found)


def task_entry(command: str, target: str) -> Callable[[Any], Any]:
    """Wraps a task ("module:function"): errors become one line + exit code; in a sweep, a failed job is
    noted and the rest run. The task's module (torch and all) is imported only when a task runs, not
    for --help, --cfg or input the precheck refuses."""

    def task(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            module_name, fn_name = target.split(":")
            module = importlib.import_module(module_name)  # torch too: the hardware record names its devices
            if os.environ.get("RANK", "0") == "0":  # [ddp] rank 0 writes the run dir
                from cifar_cam.provenance import record

                record(Path(HydraConfig.get().runtime.output_dir), command, sys.argv[1:])
            return getattr(module, fn_name)(cfg)
        except TrainingInterrupted as e:  # a requested, clean stop: warning level, "stopped:", 130 / 143
            log.warning("%s", e, extra={"file_only": True})
            stopped(command, str(e), e.exit_code)
        except CifarCamError as e:
            log.error("%s", e, extra={"file_only": True})
            if multirun and e.exit_code < 128:  # a signal (exit 128 + n) stops the whole sweep
                job = HydraConfig.get().job
                FAILED_JOBS.append((job.num, HydraConfig.get().runtime.output_dir, str(e), e.exit_code))
                log.warning("job #%d failed: %s", job.num, e)
                return float("nan")  # what a sweeper (Optuna) records for a failed trial
            fail(command, str(e), e.exit_code)
        except KeyboardInterrupt:
            log.warning("interrupted (Ctrl-C)", extra={"file_only": True})
            stopped(command, "interrupted (Ctrl-C)", 130)
        except Exception as e:  # a bug or an OS error: the traceback goes on, the log keeps why (for `report`)
            log.error("%s: %s", type(e).__name__, e, exc_info=True, extra={"file_only": True})
            raise

    return task


def join_ranks(command: str, cfg: Any, multirun: bool) -> Any:
    """[ddp] Under torchrun: checks that the command fits and joins the process group, before Hydra starts."""
    from cifar_cam import distributed
    from cifar_cam.engine import resolve_device

    try:
        world = distributed.check_strategy(cfg.trainer.get("strategy", "auto"), command, multirun)
        return distributed.init(resolve_device(cfg.trainer.device).type) if world.distributed else world
    except CifarCamError as e:
        fail(command, str(e), e.exit_code)


def take_lock(command: str, run_dir: Path, world: Any) -> None:
    """One writer per run dir, taken before Hydra writes .hydra/ there (rank 0 only under DDP); else one line, exit 2.

    A sweep's dir is always new (reserve_dir) and its jobs each get their own: those are not locked.
    """
    if not world.is_main:
        return
    try:
        lock_run_dir(run_dir)
    except CifarCamError as e:
        fail(command, str(e), e.exit_code)


COMPLETION_SCRIPT = """# cifar-cam completion ({shell}): eval "$(cifar-cam --completion {shell})"
{prelude}_cifar_cam_complete() {{
    local IFS=$'\\n' cur="${{COMP_LINE:0:$COMP_POINT}}"
    COMPREPLY=($(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" cifar-cam --complete 2>/dev/null))
    # bash also splits words at '=' and ':' (COMP_WORDBREAKS; zsh does not) and replaces only what follows them
    cur="${{cur##* }}"
    local breaks="${{COMP_WORDBREAKS//[^=:]}}"
    if [[ -n "$breaks" ]]; then
        local head="${{cur%"${{cur##*[$breaks]}}"}}"
        [[ -n "$head" ]] && COMPREPLY=("${{COMPREPLY[@]#"$head"}}")
    fi
    return 0
}}
complete -o nospace -o default -F _cifar_cam_complete cifar-cam
"""
ZSH_PRELUDE = "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"


def completion_script(shell: str) -> str:
    """The shell function that asks `cifar-cam --complete` for candidates (bash; zsh through bashcompinit)."""
    if shell not in ("bash", "zsh"):
        fail(None, f"shell completion is for bash or zsh, not '{shell}'")
    return COMPLETION_SCRIPT.format(shell=shell, prelude=ZSH_PRELUDE if shell == "zsh" else "")


def complete(line: str) -> list[str]:
    """Candidates for the last word of `line` (a shell's COMP_LINE up to the cursor): commands, then overrides."""
    words = line.split() + ([""] if not line or line[-1].isspace() else [])  # words[-1]: the word being completed
    if len(words) <= 2:
        prefix = words[-1] if len(words) == 2 else ""
        return [f"{c} " for c in [*COMMANDS, *UTILITIES] if c.startswith(prefix)]  # a command is a whole word
    command, word = words[1], words[-1]
    if command == "report":  # its arguments are run and sweep dirs
        return [f"{o} " for o in ("--out", "--help") if o.startswith(word)] if word.startswith("-") else _paths(word)
    if command == "cache":
        return [f"{o} " for o in ("--clear", "--help") if o.startswith(word)]
    if command not in COMMANDS:
        return []
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra._internal.utils import create_config_search_path

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(config_dir()))
    found = BashCompletion(loader)._query(COMMANDS[command][0], " ".join(words[2:]))
    key, eq, value = word.partition("=")
    if not found and eq:  # no config value matches: a path (ckpt=outputs/train/..., data.root=...)
        return [f"{key}={p}" for p in _paths(value)]
    return found


def _paths(prefix: str) -> list[str]:
    """Files and folders whose path starts with `prefix`, folders with a trailing '/'."""
    start = prefix.rpartition("/")[2]
    folder = prefix[: len(prefix) - len(start)]
    try:
        entries = sorted(Path(folder or ".").expanduser().iterdir())
    except OSError:
        return []
    return [f"{folder}{p.name}" + ("/" if p.is_dir() else "") for p in entries
            if p.name.startswith(start) and (start.startswith(".") or not p.name.startswith("."))]


def answer_completion_query() -> None:
    """Prints the candidates for COMP_LINE up to COMP_POINT, as bash sets them for a completion function."""
    line = os.environ.get("COMP_LINE", "")
    print("\n".join(complete(line[: int(os.environ.get("COMP_POINT", len(line)))])))


def run_dir_overrides(command: str, cfg: Any, overrides: list[str], multirun: bool, world: Any) -> list[str]:
    """The run (or sweep) dir this invocation writes, reserved and locked before Hydra writes there."""
    keys = {o.split("=", 1)[0] for o in overrides}
    if multirun:  # a sweep's dir is new, each job its own: nothing to lock
        if "hydra.sweep.dir" in keys:
            return []
        return [f"hydra.sweep.dir={_quote(reserve_dir(Path('multirun') / command))}"]
    if "hydra.run.dir" in keys:
        given = next(o for o in overrides if o.startswith("hydra.run.dir=")).split("=", 1)[1].strip("'\"")
        take_lock(command, Path(given), world)
        return []
    if command == "train" and cfg.get("ckpt"):
        from cifar_cam.checkpoint import resolve_checkpoint, run_dir_of

        # Resume continues in the run dir it came from; its original .hydra/ stays untouched.
        run_dir = run_dir_of(resolve_checkpoint(cfg.ckpt, prefer="last"))
        take_lock(command, run_dir, world)
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        return [f"hydra.run.dir={_quote(run_dir)}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
    from cifar_cam.distributed import rank0_decides

    run_dir = rank0_decides(lambda: reserve_dir(Path("outputs") / command))
    take_lock(command, run_dir, world)
    return [f"hydra.run.dir={_quote(run_dir)}"]


def report_main(args: list[str]) -> None:
    """`cifar-cam report DIR... [--out DIR]`: plain argparse, since its inputs are directories."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="cifar-cam report",
        description="Collects the train jobs of sweeps or run dirs (overrides + summary.json) into one table, "
                    "report.csv (a row a job), report_groups.csv (jobs differing only in seed: mean ± std, n) "
                    "and report.png. Failed and unfinished jobs are listed with the reason from their log.",
        epilog="Output: into the sweep dir when given exactly one (it holds multirun.yaml), else into "
               "outputs/report/<YYYY-MM-DD_HH-MM-SS>/; --out DIR to choose.\n"
               "examples:\n  cifar-cam report multirun/train/2026-01-01_12-00-00\n"
               "  cifar-cam report outputs/train/run_a outputs/train/run_b --out my_report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="a sweep dir (multirun/train/<time>), run dirs, or folders holding either")
    parser.add_argument("--out", metavar="DIR", help="where to write report.csv, report_groups.csv, report.png")
    ns = parser.parse_args(args)
    from cifar_cam.tasks.report import report

    try:
        report(ns.dirs, out=ns.out)
    except CifarCamError as e:
        fail("report", str(e), e.exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `cifar-cam` console script."""
    from cifar_cam.provenance import mark_command_start

    mark_command_start()
    try:
        _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a task started (or after it ended): nothing to save
        stopped(None, "interrupted (Ctrl-C)", 130)
    except BrokenPipeError:  # `cifar-cam train --help | head -1`: the reader left; nothing is wrong
        silence_stdout()
        sys.exit(0)


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


def _main(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<9} {text}" for name, (_, _, text) in COMMANDS.items())
    listing += f"\n  {'report':<9} {REPORT_HELP}"
    from cifar_cam.cache import CACHE_HELP

    listing += f"\n  {'cache':<9} {CACHE_HELP}"
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands=listing, conf=config_dir()))
        sys.exit(0 if args else 2)
    if args[0] == "--completion":  # `eval "$(cifar-cam --completion bash)"`
        print(completion_script(args[1] if len(args) > 1 else "bash"), end="")
        return
    if args[0] == "--complete":  # the shell function's query
        answer_completion_query()
        return
    command, rest = args[0], args[1:]
    if command == "report":
        report_main(rest)
        return
    if command == "cache":  # like report, not a Hydra app: it lists or clears files, it runs nothing
        from cifar_cam.cache import cache_main

        sys.exit(cache_main(rest))
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, [*COMMANDS, *UTILITIES], n=1)
        fail(None, f"unknown command '{command}'" + (f" (did you mean {close[0]}?)" if close else "")
             + f"; commands: {', '.join([*COMMANDS, *UTILITIES])}")
    config_name, target, _ = COMMANDS[command]

    overrides, flag_args = split_args(rest)
    flags = {f.split("=", 1)[0] for f in flag_args if f.startswith("-")}
    if flags & {"-sc", "--shell-completion"}:  # Hydra's own would call `cifar-cam -sc query=...`, which can't work
        value = " ".join(flag_args)
        if "query=" in value:
            answer_completion_query()
        else:
            print(completion_script("zsh" if "zsh" in value else "bash"), end="")
        return
    if flags & {"--help", "-h"}:  # ours: every key this command uses, with its description (Hydra's: --hydra-help)
        print_help(command, overrides)
        return
    extra: list[str] = []
    # --cfg prints the config a run would get: checked the same way (one line, exit 2), nothing reserved
    swept = None if flags & {"-m", "--multirun"} else sweep_without_multirun(overrides)
    if swept is not None:
        key = swept.split("=", 1)[0]
        fail(command, f"{swept} lists several values: add -m to run one job each (a sweep), or write "
                      f"'{key}=[a,b]' for one run with a list")
    if not flags & INFO_FLAGS or flags & {"--cfg", "-c"}:
        overrides = inherit_choices(command, overrides)  # ckpt= is read once for these checks and the task
        cfg = precheck(command, overrides, machine=not flags & INFO_FLAGS)
    if not flags & INFO_FLAGS:
        multirun = bool(flags & {"-m", "--multirun"})
        world = join_ranks(command, cfg, multirun)  # [ddp] torchrun's ranks: one run dir, chosen by rank 0
        extra += run_dir_overrides(command, cfg, overrides, multirun, world)
        from cifar_cam.distributed import quiet_overrides

        extra += quiet_overrides(world)  # [ddp] ranks other than 0 write no files

    import hydra

    if flags & INFO_FLAGS:  # Hydra prints --help / --cfg itself and reports a closed pipe as a traceback
        sys.stdout = PipeSafe(sys.stdout)
    # Flags first: Hydra's argparse refuses overrides on both sides of a flag (`a=1 -m b=2`).
    sys.argv = [f"cifar-cam {command}", *flag_args, *overrides, *extra]
    hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(task_entry(command, target))()
    sweep_dir = next((a.split("=", 1)[1].strip("'") for a in [*overrides, *extra] if a.startswith("hydra.sweep.dir=")),
                     None)
    if not FAILED_JOBS and sweep_dir and flags & {"-m", "--multirun"}:
        FAILED_JOBS.extend(failed_jobs_in_logs(Path(sweep_dir), command))  # joblib / submitit: jobs in other processes
    if FAILED_JOBS:
        num, job_dir, message, _ = FAILED_JOBS[0]
        more = f" (and {len(FAILED_JOBS) - 1} more, see their {command}.log)" if len(FAILED_JOBS) > 1 else ""
        fail(command, f"{len(FAILED_JOBS)} job(s) of the sweep failed, the others ran; job #{num} "
             f"({job_dir}): {message}{more}", max(code for *_, code in FAILED_JOBS))


if __name__ == "__main__":
    main()
