"""Crash safety through the real CLI: SIGKILL / SIGINT / SIGTERM, exact resume, divergence, determinism.

Every run here is a subprocess on CPU with one thread (results are bit-identical for a fixed thread
count; the CPU is shared, and one thread is also the fastest there). A resumed run must end with the
same metrics.csv as an uninterrupted one, bit for bit, apart from the `seconds` column.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli

# 128 training images in batches of 32: 4 steps an epoch, 3 epochs.
STEPS_PER_EPOCH = 4
EPOCHS = 3
ARGS = [a for a in TINY if not a.startswith(("trainer.epochs=", "data.train_size="))] + [
    "data.train_size=160", f"trainer.epochs={EPOCHS}"]
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
HOOKS = REPO / "tests" / "train_hooks.py"
WAIT = 300  # seconds: only a guard against a hung test, never a threshold a result depends on


def metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the timing column."""
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def load(path: Path) -> dict:
    """A checkpoint as torch.load(weights_only=True) reads it: it must never be torn."""
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load(a)["model"], load(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def train(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cifar-cam train` (a fresh run into `run`, or a resume when `extra` holds ckpt=)."""
    where = [] if any(a.startswith("ckpt=") for a in extra) else [*ARGS, f"hydra.run.dir={run}"]
    return run_cli("train", *where, *extra, cwd=run.parent, env={**ENV, **(env or {})}, timeout=WAIT)


def start_hooked(run: Path, args: list[str], hooks: dict[str, str], log: Path) -> subprocess.Popen:
    """tests/train_hooks.py in the background; stdout+stderr to `log`."""
    env = {**os.environ, **ENV, **hooks}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, str(HOOKS), "train", *args], cwd=run.parent, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists (the process parked); fails if the process ends first."""
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode} before {path.name}"
        assert time.monotonic() < deadline, f"no {path} after {WAIT}s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = train(run)
    assert result.returncode == 0, result.stderr
    assert [int(r["epoch"]) for r in metrics(run)] == [1, 2, 3]
    return run


def test_same_seed_gives_identical_metrics_and_weights(reference: Path, tmp_path: Path) -> None:
    result = train(tmp_path / "again")
    assert result.returncode == 0, result.stderr
    assert metrics(tmp_path / "again") == metrics(reference)
    assert same_weights(tmp_path / "again/checkpoints/last.pt", reference / "checkpoints/last.pt")


@pytest.mark.slow
def test_other_seed_gives_other_metrics(reference: Path, tmp_path: Path) -> None:
    result = train(tmp_path / "seed1", "seed=1")
    assert result.returncode == 0, result.stderr
    assert metrics(tmp_path / "seed1") != metrics(reference)


def test_sigkill_mid_checkpoint_write_then_resume(reference: Path, tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "parked"
    # Saves: epoch 1 best + last, then epoch 2's best.pt: the 3rd write hangs half-way.
    proc = start_hooked(run, [*ARGS, f"hydra.run.dir={run}"],
                        {"CIFAR_CAM_TEST_HANG_SAVE": "3", "CIFAR_CAM_TEST_MARKER": str(marker)}, tmp_path / "log")
    wait_for(marker, proc)
    proc.kill()
    proc.wait(WAIT)
    ckpts = run / "checkpoints"
    torn = [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]
    assert len(torn) == 1 and torn[0].name.startswith(".best.pt.")  # the half-written file is a temp file
    with pytest.raises(Exception):  # noqa: B017 (whatever torch.load raises on half a file)
        load(torn[0])
    assert load(ckpts / "last.pt")["epoch"] == 1 and load(ckpts / "best.pt")["epoch"] == 1
    assert len(metrics(run)) - load(ckpts / "last.pt")["epoch"] <= 1  # at most one epoch is redone

    result = train(run, f"ckpt={run}")
    assert result.returncode == 0, result.stderr
    assert metrics(run) == metrics(reference)
    assert same_weights(ckpts / "best.pt", reference / "checkpoints/best.pt")
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # the torn temp file is cleaned up


@pytest.mark.slow
def test_sigkill_at_seeded_random_instants_then_resume(reference: Path, tmp_path: Path) -> None:
    """Kills the same run again and again at random instants; each time it resumes from what was saved."""
    rng = random.Random(5)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    for attempt in range(4):
        resume = (ckpts / "last.pt").exists()
        args = [f"ckpt={run}"] if resume else [*ARGS, f"hydra.run.dir={run}"]
        proc = start_hooked(run, args, {}, tmp_path / f"log{attempt}")
        # A random instant between startup and the end of training: mid-step, mid-validation,
        # mid-checkpoint-write, or before anything was saved.
        time.sleep(rng.uniform(1.0, 8.0))
        if proc.poll() is not None:
            assert proc.returncode == 0, (tmp_path / f"log{attempt}").read_text()[-2000:]
            break
        proc.kill()
        proc.wait(WAIT)
        if (ckpts / "last.pt").exists():
            done = load(ckpts / "last.pt")["epoch"]
            assert len(metrics(run)) - done <= 1, "more than one epoch would be redone"
            if (ckpts / "best.pt").exists():
                load(ckpts / "best.pt")
    else:
        result = train(run, f"ckpt={run}") if (ckpts / "last.pt").exists() else train(run)
        assert result.returncode == 0, result.stderr
    assert metrics(run) == metrics(reference)
    assert same_weights(ckpts / "last.pt", reference / "checkpoints/last.pt")


@pytest.mark.parametrize(("signum", "step", "extra"), [
    (signal.SIGINT, STEPS_PER_EPOCH + 2, []),   # mid-epoch 2: the partial epoch is saved and continued
    # during the last step of epoch 1: the epoch is validated, saved, stopped (a tracker logs its end once)
    (signal.SIGTERM, STEPS_PER_EPOCH, ["logger=csv"]),
])
def test_signal_saves_last_and_resume_is_exact(signum: int, step: int, extra: list[str], reference: Path,
                                               tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "parked"
    proc = start_hooked(run, [*ARGS, *extra, f"hydra.run.dir={run}"],
                        {"CIFAR_CAM_TEST_HOLD_STEP": str(step), "CIFAR_CAM_TEST_MARKER": str(marker)},
                        tmp_path / "log")
    wait_for(marker, proc)
    proc.send_signal(signum)
    assert proc.wait(WAIT) == 128 + signum
    output = (tmp_path / "log").read_text()
    assert "Traceback" not in output
    assert "error" not in output.lower()  # a requested stop is not an error (nor [ERROR] in the log)
    errors = [line for line in output.splitlines() if "cifar-cam train: stopped: " in line]
    assert len(errors) == 1, output
    assert f"[WARNING] {signal.Signals(signum).name}: stopped" in (run / "train.log").read_text()
    name = signal.Signals(signum).name
    epoch, at = divmod(step - 1, STEPS_PER_EPOCH)
    last = load(run / "checkpoints/last.pt")
    if at + 1 == STEPS_PER_EPOCH:  # the epoch was whole: it ends as epochs do, then the run stops
        assert f"{name}: stopped after epoch {epoch + 1}" in errors[0]
        assert last["epoch"] == epoch + 1 and last["partial"] is None and len(metrics(run)) == epoch + 1
    else:
        assert f"{name}: stopped at epoch {epoch + 1}, step {at + 1}" in errors[0]
        assert last["epoch"] == epoch and last["partial"]["step"] == at + 1
        assert (len(metrics(run)) if epoch else (run / "metrics.csv").exists()) == epoch
    assert f"resume with: cifar-cam train ckpt={run}" in errors[0]

    result = train(run, f"ckpt={run}")
    assert result.returncode == 0, result.stderr
    assert metrics(run) == metrics(reference)
    assert same_weights(run / "checkpoints/last.pt", reference / "checkpoints/last.pt")
    if extra:  # logger=csv: every step's loss once
        logged = [int(line.split(",")[0]) for line in (run / "logs/steps.csv").read_text().splitlines()[1:]]
        assert logged == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))


def test_nan_loss_stops_in_one_line_and_keeps_best(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    best, last = run / "checkpoints/best.pt", run / "checkpoints/last.pt"
    before = {p: p.read_bytes() for p in (best, last, run / "metrics.csv")}

    # One more epoch with a huge learning rate (an override on resume rescales the restored one): it diverges.
    result = train(run, f"ckpt={run}", f"trainer.epochs={EPOCHS + 1}", "optimizer.lr=1e6")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(rf"loss became NaN/inf at epoch {EPOCHS + 1}, step \d+ \(lr 1e\+06\)", lines[0]), lines[0]
    assert "lower optimizer.lr" in lines[0] and f"last.pt (epoch {EPOCHS}) is intact" in lines[0]
    assert all(p.read_bytes() == data for p, data in before.items())  # best.pt, last.pt, metrics intact

    # The way out the message names: resume with a lower rate; a finished run takes more epochs.
    result = train(run, f"ckpt={run}", f"trainer.epochs={EPOCHS + 1}", "optimizer.lr=0.01")
    assert result.returncode == 0, result.stderr
    rows = metrics(run)
    assert rows[:EPOCHS] == metrics(reference) and rows[EPOCHS]["epoch"] == str(EPOCHS + 1)
    assert rows[EPOCHS]["lr"] == "0.01" and float(rows[EPOCHS]["train_loss"]) < 3


def test_resume_a_finished_run_says_so_and_evaluates_again(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    before = {p: p.read_bytes() for p in (run / "metrics.csv", run / "checkpoints/last.pt")}

    result = train(run, f"ckpt={run}")
    assert result.returncode == 0, result.stderr
    assert f"already finished {EPOCHS} of {EPOCHS} epochs" in result.stdout
    assert all(p.read_bytes() == data for p, data in before.items())
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    for key in ("test_acc", "test_loss", "best_epoch", "epochs_run", "images_per_second"):
        assert summary[key] == expected[key], key


def test_resume_with_other_optimizer_groups_is_one_line_and_changes_nothing(reference: Path,
                                                                           tmp_path: Path) -> None:
    """A checkpoint whose optimizer groups its parameters otherwise (an older bias_lr_scale) is refused in one
    line that names the way on, not a traceback from torch's load_state_dict."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    payload = load(run / "checkpoints/last.pt")
    groups = payload["optimizer"]["param_groups"]
    groups.append({**groups[0], "params": groups[0]["params"][-1:]})
    groups[0]["params"] = groups[0]["params"][:-1]
    torch.save(payload, run / "checkpoints/last.pt")
    before = {p: p.read_bytes() for p in (run / "metrics.csv", run / "checkpoints/last.pt")}

    result = train(run, f"ckpt={run}", f"trainer.epochs={EPOCHS + 1}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "its optimizer state does not fit this run's optimizer" in result.stderr
    assert "model.pretrained=" in result.stderr and "Traceback" not in result.stderr
    assert all(p.read_bytes() == data for p, data in before.items())


def hooked_run(tmp_path: Path, block_step: int, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    """A fresh run whose training step `block_step` blocks forever in native code; returns when it blocked."""
    run, marker, log = tmp_path / "run", tmp_path / "blocked", tmp_path / "out.log"
    proc = start_hooked(run, [*ARGS, f"hydra.run.dir={run}", *extra],
                        {"CIFAR_CAM_TEST_BLOCK_STEP": str(block_step), "CIFAR_CAM_TEST_MARKER": str(marker)}, log)
    wait_for(marker, proc)
    return proc, run, log


def test_stall_ends_with_stacks_exit_3_and_resumes_exactly(reference: Path, tmp_path: Path) -> None:
    proc, run, log = hooked_run(tmp_path, STEPS_PER_EPOCH + 1, "trainer.stall_timeout=3")
    assert proc.wait(timeout=WAIT) == 3
    lines = [line for line in log.read_text().splitlines() if "error:" in line]
    assert len(lines) == 1 and "stalled: nothing finished for" in lines[0], log.read_text()[-2000:]
    assert "epoch 2, step 1" in lines[0] and "last.pt (epoch 1)" in lines[0] and "cifar-cam train ckpt=" in lines[0]
    train_log = (run / "train.log").read_text()
    assert "[stall]" in train_log and "blocking_heartbeat" in train_log  # the stuck thread's Python stack
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 1  # intact
    resumed = train(run, f"ckpt={run}")
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(run) == metrics(reference)


@pytest.mark.parametrize("signals, code, within", [((signal.SIGTERM,), 143, 2.0), ((signal.SIGINT,) * 2, 130, 0.0)])
def test_signal_ends_a_step_stuck_in_native_code(signals: tuple[int, ...], code: int, within: float,
                                                 tmp_path: Path) -> None:
    """One signal: the step gets trainer.stop_grace seconds; two: at once. The main thread never returns."""
    proc, run, log = hooked_run(tmp_path, 2, "trainer.stop_grace=2", "trainer.stall_timeout=null")
    started = time.monotonic()
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.2)
    assert proc.wait(timeout=30) == code
    took = time.monotonic() - started
    assert within <= took < within + 5, took
    lines = [line for line in log.read_text().splitlines() if "cifar-cam train: stopped: " in line]
    assert len(lines) == 1 and "stopped at once" in lines[0], log.read_text()[-2000:]
    assert "error" not in log.read_text().lower()
    assert ("stop_grace=2" in lines[0]) == (len(signals) == 1)


# -- everything of issue 20 at once: EMA, MixUp/CutMix, gradient clipping, every tracker ---------------------
ALL_ON = ["trainer.ema.decay=0.8", "aug.mix=both", "trainer.grad_clip=0.5", "logger=many", "trainer.log_every=2"]


def tracked_losses(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The step losses each tracker holds: TensorBoard (its reader applies purge_step), MLflow, steps.csv."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cifar_cam.training.tracker_backends import STEP_LOSS, local_mlflow_uri

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    client = MlflowClient(local_mlflow_uri(run, "sqlite"))
    (mlrun,) = client.search_runs([client.get_experiment_by_name("cifar-cam").experiment_id])
    rows = (run / "logs" / "steps.csv").read_text().splitlines()[1:]
    return {
        "tensorboard": sorted((e.step, round(e.value, 5)) for e in acc.Scalars(STEP_LOSS)),
        "mlflow": sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(mlrun.info.run_id, STEP_LOSS)),
        "csv": sorted((int(r.split(",")[0]), round(float(r.split(",")[2]), 5)) for r in rows),
        "tb_val_acc_steps": sorted(e.step for e in acc.Scalars("val_acc")),
    }


def test_resume_with_ema_mix_clip_and_trackers_is_exact_and_logs_each_step_once(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert train(reference, *ALL_ON).returncode == 0
    run, marker = tmp_path / "run", tmp_path / "parked"
    # SIGINT mid-epoch 2: the partial epoch is saved (the EMA, the mixing position, the trackers' buffer) ...
    proc = start_hooked(run, [*ARGS, *ALL_ON, f"hydra.run.dir={run}"],
                        {"CIFAR_CAM_TEST_HOLD_STEP": str(STEPS_PER_EPOCH + 2), "CIFAR_CAM_TEST_MARKER": str(marker)},
                        tmp_path / "log1")
    wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT) == 130
    # ... then the resume is SIGKILLed half-way through its 2nd checkpoint write (epoch 2's last.pt): epoch 2's
    # records were never committed to the trackers, and the killed process may have left events behind
    marker.unlink()
    proc = start_hooked(run, [f"ckpt={run}"], {"CIFAR_CAM_TEST_HANG_SAVE": "2", "CIFAR_CAM_TEST_MARKER": str(marker)},
                        tmp_path / "log2")
    wait_for(marker, proc)
    proc.kill()
    proc.wait(WAIT)
    result = train(run, f"ckpt={run}")
    assert result.returncode == 0, result.stderr
    assert metrics(run) == metrics(reference)
    for name in ("best.pt", "last.pt"):
        a, b = load(run / "checkpoints" / name), load(reference / "checkpoints" / name)
        for key in ("model", "model_raw"):  # the EMA and the trained weights, bit for bit
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)
        assert a["ema_updates"] == b["ema_updates"]
    steps = list(range(2, EPOCHS * STEPS_PER_EPOCH + 1, 2))  # trainer.log_every=2
    got, expected = tracked_losses(run), tracked_losses(reference)
    for tracker in ("tensorboard", "mlflow", "csv"):
        assert [s for s, _ in got[tracker]] == steps, tracker  # each step once, none missing
        assert got[tracker] == expected[tracker], tracker  # and the values of the uninterrupted run
    assert got["tb_val_acc_steps"] == [e * STEPS_PER_EPOCH for e in range(1, EPOCHS + 1)]
