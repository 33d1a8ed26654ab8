"""The CLI as processes see it: a closed stdout, and one writer per run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

CLI = [sys.executable, "-m", "cifar_cam"]


def with_closed_stdout(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs the CLI with a stdout whose reader has already gone (as `| head` leaves it)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([*CLI, *args], cwd=cwd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


@pytest.mark.parametrize("args", [["train", "--help"], ["train", "data=synthetic", "--cfg", "job"], ["--help"]])
def test_information_into_a_closed_pipe_exits_0_quietly(args: list[str], tmp_path: Path) -> None:
    result = with_closed_stdout(args, tmp_path)
    assert result.returncode == 0 and result.stderr == ""


def test_train_with_a_closed_stdout_keeps_running_and_logging(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = with_closed_stdout(["train", *TINY, "trainer.epochs=1", f"hydra.run.dir={run}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 1
    assert "test accuracy" in (run / "train.log").read_text()


def test_a_run_dir_in_use_is_refused_naming_the_pid_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from cifar_cam.io import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in run.iterdir())
        result = subprocess.run([*CLI, "train", *TINY, f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"cifar-cam train: error: {run} is in use by pid {holder.pid} (another cifar-cam process writes it); "
            "wait for it to end, or stop it first"]
        assert sorted(p.name for p in run.iterdir()) == before == [".lock"]  # no .hydra/, no log
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    from cifar_cam.io import lock_run_dir

    lock_run_dir(run)  # the dead holder's flock went with it
    assert (run / ".lock").read_text().strip() == str(os.getpid()) and time.monotonic() - started < 1


@pytest.mark.parametrize("line, expected", [
    ("cifar-cam ", ["eval", "gradcam", "lr-find", "report", "train"]),
    ("cifar-cam train optim", ["optimizer.", "optimizer="]),
    ("cifar-cam train optimizer=", ["optimizer=adam", "optimizer=adamw", "optimizer=muon", "optimizer=sgd"]),
])
def test_bash_completion_as_the_shell_drives_it(line: str, expected: list[str], tmp_path: Path) -> None:
    script = ('eval "$(cifar-cam --completion bash)"; COMP_LINE="$LINE"; COMP_POINT=${#COMP_LINE}; '
              '_cifar_cam_complete; printf "%s\\n" "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LINE": line}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == expected


def test_hydra_install_flag_gives_the_working_script() -> None:
    result = subprocess.run([*CLI, "train", "-sc", "install=zsh"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "bashcompinit" in result.stdout and "cifar-cam --complete" in result.stdout
