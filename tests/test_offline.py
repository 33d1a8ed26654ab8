"""No command opens a connection the user did not ask for: train, eval, gradcam, predict, export, lr-find and
serve run in one fresh process (tests/offline_guard.py) under a socket guard that refuses anything but loopback,
without NO_ALBUMENTATIONS_UPDATE & co. in the environment (the package sets them itself); where strace is
installed, the same run is traced (`strace -f -e trace=connect`) and no connect may leave the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cifar_cam import OFFLINE_ENV

GUARD = Path(__file__).with_name("offline_guard.py")
# connect(fd, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("151.101.0.223")}, 16)
_INET = re.compile(r'sa_family=AF_INET6?.*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)")')


# --seccomp-bpf: only connect() stops the traced threads (torch's thousands of other syscalls run at full speed)
STRACE = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect"]


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run([*STRACE, "-o", os.devnull, "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def guarded_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("offline")
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and k != "DO_NOT_TRACK"}
    env.update(PYTHONUNBUFFERED="1", CIFAR_CAM_CACHE=str(work / ".cache"))
    trace = work / "connect.trace"
    command = [sys.executable, str(GUARD), str(work), str(trained_run)]
    traced = strace_works()
    if traced:
        command = [*STRACE, "-o", str(trace), *command]
    r = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    report["trace"] = trace.read_text() if traced else None
    return report


def test_no_command_connects_anywhere_but_loopback(guarded_run: dict[str, Any]) -> None:
    assert guarded_run["commands"] == ["train", "lr-find", "eval", "gradcam", "predict", "export", "serve"]
    assert guarded_run["refused"] == [], guarded_run["refused"]
    assert guarded_run["env"]["NO_ALBUMENTATIONS_UPDATE"] == "1"  # set by the package, not by the test


def test_strace_sees_no_connect_off_the_machine(guarded_run: dict[str, Any]) -> None:
    if guarded_run["trace"] is None:
        pytest.skip("strace is missing or not allowed here (apt-get install strace)")
    outside = []
    for line in guarded_run["trace"].splitlines():
        if "connect(" not in line:
            continue
        m = _INET.search(line)
        if m:
            address = m.group(1) or m.group(2)
            if not (address.startswith("127.") or address == "::1"):
                outside.append(line)
    assert outside == [], outside[:5]
    assert "AF_INET" in guarded_run["trace"]  # the serve requests were seen: the trace works
