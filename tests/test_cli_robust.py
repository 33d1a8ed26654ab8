"""The CLI as processes see it: a closed stdout, and one writer per run dir."""

from __future__ import annotations

import json
import os
import shutil
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


def test_a_run_dir_in_use_is_refused_naming_the_pid_and_a_dead_holder_is_taken_over(trained_run: Path,
                                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from cifar_cam.io import lock_run_dir; lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _listing(run)
        for how in (f"ckpt={run}", f"hydra.run.dir={run}"):  # a resume, and a run dir named outright
            result = subprocess.run([*CLI, "train", *TINY, how], cwd=tmp_path, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 2
            assert result.stderr.strip().splitlines() == [
                f"cifar-cam train: error: {run} is in use by pid {holder.pid} (another cifar-cam process writes "
                "it); wait for it to end, or stop it first"]
            assert _listing(run) == before  # no .hydra/resume-*, no log line, no checkpoint touched
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    from cifar_cam.io import lock_run_dir

    lock_run_dir(run)  # the dead holder's flock went with it
    assert (run / ".lock").read_text().strip() == str(os.getpid()) and time.monotonic() - started < 1


def _listing(folder: Path) -> dict[str, int]:
    """Every path below `folder` with its mtime (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


COMPLETIONS = [
    ("cifar-cam ", ["cache ", "data ", "eval ", "export ", "gradcam ", "lr-find ", "predict ", "report ", "serve ",
                    "train "]),
    ("cifar-cam train optim", ["optimizer.", "optimizer="]),
    ("cifar-cam train optimizer=", ["optimizer=adam", "optimizer=adamw", "optimizer=muon", "optimizer=sgd"]),
    ("cifar-cam train seed=1 ckpt=outputs/tr", ["ckpt=outputs/train/"]),
    ("cifar-cam report out", ["outputs/"]),
    ("cifar-cam cache --c", ["--clear "]),
]


@pytest.mark.parametrize("line, expected", COMPLETIONS)
def test_bash_completion_as_the_shell_drives_it(line: str, expected: list[str], tmp_path: Path) -> None:
    (tmp_path / "outputs" / "train").mkdir(parents=True)
    script = ('eval "$(cifar-cam --completion bash)"; COMP_LINE="$LINE"; COMP_POINT=${#COMP_LINE}; '
              '_cifar_cam_complete; printf "%s\\n" "${COMPREPLY[@]}"')
    result = _shell("bash", script, line, tmp_path)
    # bash replaces only the part of the word after its last '=' or ':' (COMP_WORDBREAKS), so the
    # function answers that part; put together, the word becomes the candidate
    word = line.rsplit(" ", 1)[1]
    kept = word[: max(word.rfind("="), word.rfind(":")) + 1]
    assert sorted(kept + reply for reply in result.stdout.split("\n")[:-1]) == expected


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
@pytest.mark.parametrize("line, expected", COMPLETIONS[1:3])
def test_zsh_completion_through_bashcompinit(line: str, expected: list[str], tmp_path: Path) -> None:
    script = ('eval "$(cifar-cam --completion zsh)"; COMP_LINE="$LINE"; COMP_POINT=${#COMP_LINE}; '
              '_cifar_cam_complete; print -l -- $COMPREPLY')
    assert sorted(_shell("zsh", script, line, tmp_path).stdout.split()) == expected


def _shell(shell: str, script: str, line: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LINE": line}
    result = subprocess.run([shell, "-f" if shell == "zsh" else "--norc", "-c", script], capture_output=True,
                            text=True, env=env, cwd=cwd, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result


def test_hydra_install_flag_gives_the_working_script() -> None:
    result = subprocess.run([*CLI, "train", "-sc", "install=zsh"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "bashcompinit" in result.stdout and "cifar-cam --complete" in result.stdout


def test_cache_command_through_the_cli(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "folder-0123456789abcdef-32.npz").write_bytes(b"x" * 2_000_000)
    env = {**os.environ, "CIFAR_CAM_CACHE": str(cache)}
    listed = subprocess.run([*CLI, "cache"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and "folder-0123456789abcdef-32.npz" in listed.stdout and "2.0 MB" in listed.stdout
    cleared = subprocess.run([*CLI, "cache", "--clear"], capture_output=True, text=True, env=env, timeout=60)
    assert cleared.returncode == 0 and "removed" in cleared.stdout and not any(cache.iterdir())
