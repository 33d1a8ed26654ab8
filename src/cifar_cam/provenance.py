"""provenance.json: what produced a run dir (versions, the package's git commit, the hardware); a resume appends."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from cifar_cam.io import cores, write_json

_COMMAND_STARTED: list[float] = []  # time.monotonic() at the CLI's entry, until a task takes it


def mark_command_start() -> None:
    """Called first thing by the CLI: summary.json's wall_seconds count from here (torch's import included)."""
    _COMMAND_STARTED[:] = [time.monotonic()]


def command_started() -> float | None:
    """The CLI's start mark, taken once (a later job of a sweep, or an in-process call, gets None)."""
    return _COMMAND_STARTED.pop() if _COMMAND_STARTED else None


PACKAGES = ("cifar-cam", "torch", "torchvision", "albumentations", "hydra-core", "numpy")


@functools.cache
def git_state() -> dict[str, Any] | None:
    """The commit of the checkout this package is imported from and whether it was dirty; None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        # Untracked files count: a new module the run imported is not in the commit either (ignored ones don't show).
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def package_version(name: str) -> str | None:
    """The installed version of a distribution ('cifar-cam', 'torch'), None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """CPU model and cores, torch's CPU capability, GPU names (torch only if already imported by the task)."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": cores(), "machine": platform.machine()}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else [])
    return info


def entry(command: str, argv: list[str]) -> dict[str, Any]:
    """One provenance record: the command, versions, git state and hardware, now."""
    return {
        "command": command, "argv": argv, "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "pid": os.getpid(), "python": platform.python_version(),
        "versions": {name: package_version(name) for name in PACKAGES}, "git": git_state(), "hardware": hardware(),
    }


def record(run_dir: Path, command: str, argv: list[str]) -> Path:
    """Appends this invocation to run_dir/provenance.json (a new file holds one entry)."""
    path = run_dir / "provenance.json"
    entries: list[dict[str, Any]] = []
    if path.is_file():
        try:
            entries = list(json.loads(path.read_text()).get("entries", []))
        except (OSError, ValueError, AttributeError):
            entries = []  # a hand-edited or foreign file: start the record again rather than fail the run
    entries.append(entry(command, argv))
    return write_json(path, {"entries": entries})


def short_commit(run_dir: Path) -> str:
    """The last entry's commit, short, with '-dirty' when the checkout had changes; '' when unknown."""
    try:
        git = json.loads((run_dir / "provenance.json").read_text())["entries"][-1]["git"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""
    return "" if not git else git["commit"][:10] + ("-dirty" if git["dirty"] else "")
