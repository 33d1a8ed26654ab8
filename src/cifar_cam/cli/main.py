"""`cifar-cam <command> [overrides] [-m]`: argv[1] picks the command, the rest goes to Hydra.

Before Hydra starts, the CLI composes the config once to refuse bad input in one line (exit 2, precheck.py)
and reserves a fresh run directory (rundirs.py), so runs started in the same second never share one. The task
("module:function" in commands.COMMANDS) is imported only when it runs, inside `task_entry`, which turns its
errors into one line and an exit code.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_cam.cli.commands import (
    COMMANDS,
    INFO_FLAGS,
    REPORT_HELP,
    USAGE,
    UTILITIES,
    PipeSafe,
    fail,
    split_args,
    stopped,
)
from cifar_cam.cli.completion import answer_completion_query, completion_script
from cifar_cam.cli.precheck import inherit_choices, precheck, print_help, sweep_without_multirun
from cifar_cam.cli.rundirs import join_ranks, run_dir_overrides
from cifar_cam.errors import CifarCamError, TrainingInterrupted
from cifar_cam.io import config_dir
from cifar_cam.logs import silence_stdout

log = logging.getLogger("cifar_cam")


# Jobs of this process's sweep that failed: (job number, its run dir, message, exit code).
FAILED_JOBS: list[tuple[int, str, str, int]] = []


def failed_jobs_in_logs(sweep_dir: Path, command: str) -> list[tuple[int, str, str, int]]:
    """Failed jobs of a sweep whose jobs ran in other processes (joblib, submitit), from task_entry's log line."""
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


def _main(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<9} {text}" for name, (_, _, text) in COMMANDS.items())
    listing += f"\n  {'report':<9} {REPORT_HELP}"
    from cifar_cam.tasks.cache import CACHE_HELP

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
        from cifar_cam.tasks.cache import cache_main

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
        from cifar_cam.training.distributed import quiet_overrides

        extra += quiet_overrides(world)  # [ddp] ranks other than 0 write no files

    import hydra

    if flags & INFO_FLAGS:  # Hydra prints --help / --cfg itself and reports a closed pipe as a traceback
        sys.stdout = PipeSafe(sys.stdout)  # type: ignore[assignment]
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
