"""DDP: sharding keeps (seed, epoch, batch) determinism; 2-process gloo training on CPU through torchrun."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD, ImageArrays
from cifar_cam.data.augment import EpochSampler
from cifar_cam.data.batches import shard
from cifar_cam.data.device_augment import DeviceBatches
from cifar_cam.errors import ConfigError, DivergenceError
from cifar_cam.training import distributed
from cifar_cam.training.distributed import World, check_strategy, quiet_overrides
from cifar_cam.training.engine import train_one_epoch
from conftest import run_cli

# 390 synthetic images - 64 val = 326 to train: not a multiple of 2 ranks x 16, so the shards need padding; 6 classes
# of 24x32 images: not CIFAR's shape.
DATA = ["data=synthetic", "data.train_size=390", "data.val_size=64", "data.test_size=256", "data.num_classes=6",
        "data.image_size=[24,32]", "model.width=8",
        "trainer.epochs=4", "eval.batch_size=256", "optimizer=adam", "optimizer.lr=0.003", "trainer.num_threads=1"]
RANKS, BATCH = 2, 16


@pytest.mark.parametrize(("n", "world_size"), [(7, 1), (7, 2), (10, 3), (2, 3)])
def test_shards_are_equal_sized_and_cover_the_order(n: int, world_size: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shards = [shard(order, r, world_size) for r in range(world_size)]
    per_rank = -(-n // world_size)
    assert all(len(s) == per_rank for s in shards)
    seen = torch.cat(shards)
    assert set(seen.tolist()) == set(range(n))  # every image, a few twice (the padding)
    assert len(seen) - n == per_rank * world_size - n


def test_ranks_together_see_what_one_process_with_the_global_batch_sees() -> None:
    n, batch, world_size = 50, 4, 2
    single = list(EpochSampler(n, batch * world_size, seed=3))
    ranks = [list(EpochSampler(n, batch, seed=3, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len(ranks[0]) == len(ranks[1]) == 25
    for b in range(7):  # local batch b of both ranks == global batch b of the single process (images, in order)
        together = sorted(i for r in ranks for i, _, _ in r[b * batch:(b + 1) * batch])
        assert together == sorted(i for i, _, _ in single[b * batch * world_size:(b + 1) * batch * world_size])
    # Augmentation keys: global batch numbers, b*W + r, never shared between ranks.
    assert {k for _, _, k in ranks[0]} == {0, 2, 4, 6, 8, 10, 12}
    assert {k for _, _, k in ranks[1]} == {1, 3, 5, 7, 9, 11, 13}
    # Resuming mid-epoch at local batch 3 continues with exactly the same images.
    resumed = EpochSampler(n, batch, seed=3, rank=1, world_size=world_size)
    resumed.start_batch = 3
    assert list(resumed) == ranks[1][3 * batch:]


def test_device_backend_shards_the_same_way() -> None:
    n = 40
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 5, 32 * 32 * 3).reshape(n, 32, 32, 3)
    arrays = ImageArrays(images, np.arange(n) % 10, np.arange(n))
    aug = {"preset": "none"}

    def indices(batches: DeviceBatches) -> list[list[int]]:  # channel 0 of image i is (5 i - 255 mean) / (255 std)
        out = []
        for x, _ in batches:
            value = x[:, 0, 0, 0] * (255 * CIFAR10_STD[0]) + 255 * CIFAR10_MEAN[0]
            out.append(sorted(round(v / 5) for v in value.tolist()))
        return out

    cpu = torch.device("cpu")
    single = DeviceBatches(arrays, aug, batch_size=8, seed=1, device=cpu)
    ranks = [DeviceBatches(arrays, aug, batch_size=4, seed=1, device=cpu, rank=r, world_size=2) for r in range(2)]
    for b in (single, *ranks):
        b.set_epoch(2)
    per_rank = [indices(r) for r in ranks]
    assert len(ranks[0]) == len(single) == 5
    assert [sorted(a + b) for a, b in zip(*per_rank, strict=True)] == indices(single)


def test_strategy_must_fit_how_the_process_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_strategy("auto") == World()
    with pytest.raises(ConfigError, match="trainer.strategy=ddp needs the ranks torchrun starts"):
        check_strategy("ddp")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_strategy("ddp") == check_strategy("auto") == World(rank=1, local_rank=1, size=2, local_size=2)
    with pytest.raises(ConfigError, match="each would train alone"):
        check_strategy("single")
    with pytest.raises(ConfigError, match="only train runs distributed"):
        check_strategy("auto", command="eval")
    with pytest.raises(ConfigError, match="-m under torchrun"):
        check_strategy("auto", multirun=True)
    assert quiet_overrides(World(rank=1, size=2))[0] == "hydra.output_subdir=null"
    assert quiet_overrides(World(rank=0, size=2)) == []


def test_ddp_without_torchrun_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("train", "data=synthetic", "trainer.strategy=ddp", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("cifar-cam train: error: trainer.strategy=ddp needs the ranks torchrun starts: "
                                     "torchrun --nproc_per_node=N -m cifar_cam train ...")
    assert not (tmp_path / "outputs").exists()


# ----------------------------------------------------------------------------- 2 processes, gloo


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """torchrun --nproc_per_node=2 with batch 16 a rank, and one process with batch 32 (the same images a step)."""
    cwd = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
               "-m", "cifar_cam", "train", *DATA, f"data.batch_size={BATCH}"]
    ddp = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = run_cli("train", *DATA, f"data.batch_size={BATCH * RANKS}", "hydra.run.dir=single", cwd=cwd)
    assert single.returncode == 0, single.stderr[-4000:]
    return cwd, cwd / "outputs" / "train", cwd / "single", ddp.stdout + ddp.stderr


def test_ddp_writes_one_run_dir_from_rank_0(ddp_and_single: tuple[Path, Path, Path, str]) -> None:
    _, runs, _, output = ddp_and_single
    (run,) = list(runs.iterdir())  # one run dir for both ranks
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock", "checkpoints", "curves.png", "metrics.csv",
                                                     "provenance.json", "summary.json", "train.log"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    log = (run / "train.log").read_text()
    assert log.count("epoch 4/4") == 1 and log.count("run dir:") == 1  # rank 1 logs nothing
    assert output.count("test accuracy") == 1
    assert json.loads((run / "summary.json").read_text())["world_size"] == RANKS


def test_ddp_steps_per_epoch_follow_the_sharding(ddp_and_single: tuple[Path, Path, Path, str]) -> None:
    _, runs, single_dir, _ = ddp_and_single
    (run,) = list(runs.iterdir())
    train_images = 390 - 64
    per_rank = -(-train_images // RANKS)  # ceil(326 / 2) = 163: the shard, padded
    steps_per_epoch = -(-per_rank // BATCH)  # ceil(163 / 16) = 11
    assert steps_per_epoch == 11
    for run_dir in (run, single_dir):  # Adam counts its own steps
        payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
        assert {int(s["step"]) for s in payload["optimizer"]["state"].values()} == {4 * steps_per_epoch}


def test_ddp_accuracy_is_within_noise_of_one_process(ddp_and_single: tuple[Path, Path, Path, str]) -> None:
    _, runs, single_dir, _ = ddp_and_single
    (run,) = list(runs.iterdir())
    ddp = json.loads((run / "summary.json").read_text())
    single = json.loads((single_dir / "summary.json").read_text())
    assert ddp["test_acc"] > 0.8 and single["test_acc"] > 0.8  # both learned (chance: 1/6)
    # Per-rank BatchNorm statistics (16 vs 32 images) and other augmentation draws: close, not identical.
    assert abs(ddp["test_acc"] - single["test_acc"]) < 0.1
    assert abs(ddp["best_val_acc"] - single["best_val_acc"]) < 0.1
    ddp_rows = (run / "metrics.csv").read_text().splitlines()
    assert len(ddp_rows) == 5  # header + one row an epoch; train loss and accuracy are over both ranks' shards


def test_ddp_lr_column_is_the_single_process_one(ddp_and_single: tuple[Path, Path, Path, str]) -> None:
    _, runs, single_dir, _ = ddp_and_single
    (run,) = list(runs.iterdir())

    def lrs(d: Path) -> list[float]:
        with (d / "metrics.csv").open() as f:
            return [float(row["lr"]) for row in csv.DictReader(f)]

    # was 0.0 every epoch under DDP; later epochs may differ where the plateau scheduler saw other val accuracies
    assert lrs(run)[0] == lrs(single_dir)[0] == 0.003
    assert len(lrs(run)) == 4 and all(lr > 0 for lr in lrs(run))


def test_single_process_eval_loads_the_ddp_checkpoint(ddp_and_single: tuple[Path, Path, Path, str]) -> None:
    cwd, runs, _, _ = ddp_and_single
    (run,) = list(runs.iterdir())
    payload = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["model"])
    result = run_cli("eval", f"ckpt={run}", "hydra.run.dir=eval", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((cwd / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(json.loads((run / "summary.json").read_text())["test_acc"])
    assert metrics["n"] == 256


# ----------------------------------------------------------------------------- agreeing at the metric reads


def tiny_epoch(steps: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], torch.optim.Optimizer]:
    """A linear model, `steps` batches of 4 random 3x2x2 images and its SGD optimizer (lr 0.1)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(steps)]
    return model, batches, torch.optim.SGD(model.parameters(), lr=0.1)


def other_rank(monkeypatch: pytest.MonkeyPatch, first_bad: int = -1, signum: int = 0, from_read: int = 0
               ) -> list[torch.Tensor]:
    """dist.all_reduce(MAX) as if a second rank sent (first_bad from its read `from_read` on, its stop, signum);
    returns the boxes this rank sent."""
    sent: list[torch.Tensor] = []

    def all_reduce(box: torch.Tensor, op: Any = None) -> None:
        assert op == distributed.dist.ReduceOp.MAX and box.dtype == torch.int64
        sent.append(box.clone())
        bad = -(first_bad if first_bad >= 0 and len(sent) > from_read else distributed.NO_BAD_STEP)
        box.copy_(torch.maximum(box, torch.tensor([bad, int(signum > 0), signum])))

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    return sent


def test_one_collective_per_metrics_read_not_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = other_rank(monkeypatch)
    sup = SimpleNamespace(signum=None)
    polls = 0

    def should_stop() -> bool:
        nonlocal polls
        polls += 1
        return False

    model, batches, optimizer = tiny_epoch(10)
    result = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                             log_every=4, should_stop=should_stop,
                             agree=distributed.agreement(World(rank=0, size=2), sup))  # type: ignore[arg-type]
    assert result.totals.step == 10 and not result.interrupted
    assert len(sent) == polls == 3  # reads after steps 4, 8 and 10 (the last): 3 collectives, not 10
    assert distributed.agreement(World(), sup) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(("ranks", "stopped_after"), [(1, 2), (2, 4)])
def test_a_stop_ends_one_process_after_the_step_and_ranks_at_the_next_read(ranks: int, stopped_after: int) -> None:
    asked = False

    def heartbeat(step: int) -> None:
        nonlocal asked
        asked = asked or step == 1  # SIGINT during step 2

    model, batches, optimizer = tiny_epoch(10)
    agree = (lambda bad, stop: (bad, stop)) if ranks > 1 else None  # as agreement() with the others quiet
    result = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                             log_every=4, should_stop=lambda: asked, heartbeat=heartbeat, agree=agree)
    assert result.interrupted and result.totals.step == stopped_after and result.totals.count == 4 * stopped_after


def test_another_ranks_stop_signal_is_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    other_rank(monkeypatch, signum=int(signal.SIGTERM))
    sup = SimpleNamespace(signum=None)
    model, batches, optimizer = tiny_epoch(10)
    result = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=torch.device("cpu"),
                             log_every=4, agree=distributed.agreement(World(rank=1, size=2), sup))  # type: ignore[arg-type]
    assert result.interrupted and result.totals.step == 4
    assert sup.signum == signal.SIGTERM  # this rank's stop message names the signal the other rank got


@pytest.mark.parametrize(("mine", "theirs", "named"), [(-1, 5, 6), (6, 5, 6), (5, 7, 6), (-1, -1, None)])
def test_divergence_names_the_earliest_bad_step_of_any_rank(mine: int, theirs: int, named: int | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    other_rank(monkeypatch, first_bad=theirs, from_read=1)  # its NaN came after step 4
    model, batches, optimizer = tiny_epoch(10)
    poisoned = nn.CrossEntropyLoss()
    calls = 0

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        loss = poisoned(logits, labels)
        calls += 1
        return loss * float("nan") if calls - 1 == mine else loss

    agree = distributed.agreement(World(rank=0, size=2), SimpleNamespace(signum=None))  # type: ignore[arg-type]
    run = lambda: train_one_epoch(model, batches, optimizer, criterion, device=torch.device("cpu"),  # noqa: E731
                                  log_every=4, agree=agree, epoch=3)
    if named is None:
        assert run().totals.step == 10
        return
    with pytest.raises(DivergenceError) as e:
        run()
    assert str(e.value).startswith(f"loss became NaN/inf at epoch 3, step {named} (lr 0.1); lower optimizer.lr")
    assert calls == 8  # found at the read after step 8, by both ranks


# ----------------------------------------------------------------------------- 2 ranks a test steers
# The ranks start as a SLURM job's tasks do (no torchrun agent ending the others when one fails), each
# through this file's hooks: `python tests/test_ddp.py train ...` with RANK, WORLD_SIZE, ... set.
#
# CIFAR_CAM_TEST_NAN=R:N      on rank R, the loss of training step N (counted over the run, from 1) is NaN
# CIFAR_CAM_TEST_SIGTERM=R:N  rank R sends itself SIGTERM during training step N (after its optimizer step)

STEERED = [*(a for a in DATA if not a.startswith("trainer.epochs=")), "trainer.epochs=1", f"data.batch_size={BATCH}",
           "trainer.log_every=4", "trainer.stall_timeout=null"]
WAIT = 120  # seconds: a guard against ranks left waiting in a collective (30 min under SLURM), never a timing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cwd: Path, hooks: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """`cifar-cam train STEERED` as RANKS processes with these hooks; fails if any is still running after WAIT."""
    common = {**os.environ, **hooks, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(RANKS), "LOCAL_WORLD_SIZE": str(RANKS)}
    command = [sys.executable, __file__, "train", *STEERED, f"hydra.run.dir={cwd / 'run'}"]
    procs = [subprocess.Popen(command, cwd=cwd, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(RANKS)]
    deadline, done = time.monotonic() + WAIT, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank {len(done)} still running after {WAIT} s: it waits in a collective the others left")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def test_nan_on_one_rank_stops_every_rank_with_the_same_line(tmp_path: Path) -> None:
    # Step 4 is read at once (trainer.log_every=4): rank 0's loss is still finite there (rank 1's NaN gradients
    # reach it through DDP only in step 5), so rank 0 alone would train on into a collective rank 1 has left.
    ranks = run_ranks(tmp_path, {"CIFAR_CAM_TEST_NAN": "1:4"})
    lines = []
    for r in ranks:
        assert r.returncode == 1, r.stderr[-3000:]
        assert "Traceback" not in r.stdout + r.stderr
        lines += r.stderr.strip().splitlines()
    assert len(lines) == RANKS and len(set(lines)) == 1, lines  # one line a rank, the same on each
    assert re.fullmatch(r"cifar-cam train: error: loss became NaN/inf at epoch 1, step 4 \(lr 0\.003\); "
                        r"lower optimizer\.lr, .*; nothing was saved", lines[0]), lines[0]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    ranks = run_ranks(tmp_path, {"CIFAR_CAM_TEST_SIGTERM": "1:2"})
    lines = []
    for r in ranks:
        assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
        assert "Traceback" not in r.stdout + r.stderr
        lines += [line for line in r.stderr.splitlines() if line.startswith("cifar-cam train: ")]
    assert len(lines) == RANKS and len(set(lines)) == 1, lines
    # The signal came during step 2; the ranks agree at the read after step 4 (trainer.log_every=4).
    assert lines[0].startswith(f"cifar-cam train: stopped: SIGTERM: stopped at epoch 1, step 4; saved {tmp_path}")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["partial"]["step"] == 4
    assert last["partial"]["count"] == 4 * BATCH * RANKS  # both ranks' totals were summed: same steps on each


def _rank_step(variable: str) -> int | None:
    """N of `variable`=R:N when R is this process's rank, else None."""
    rank, _, step = os.environ.get(variable, "").partition(":")
    return int(step) if rank == os.environ.get("RANK", "0") else None


def _steer() -> None:
    """Installs the hooks the environment asks for on this rank (see above)."""
    import cifar_cam.training.loop as loop

    real_train_one_epoch = loop.train_one_epoch
    nan_step, sigterm_step = _rank_step("CIFAR_CAM_TEST_NAN"), _rank_step("CIFAR_CAM_TEST_SIGTERM")
    losses = steps = 0

    def steered(model: nn.Module, batches: Any, optimizer: Any, criterion: nn.Module, *, heartbeat: Any,
                **kwargs: Any) -> Any:
        def poisoned(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            nonlocal losses
            losses += 1
            loss = criterion(logits, labels)
            return loss * float("nan") if losses == nan_step else loss

        def beat(step: int) -> None:
            nonlocal steps
            heartbeat(step)
            steps += 1
            if steps == sigterm_step:
                os.kill(os.getpid(), signal.SIGTERM)

        return real_train_one_epoch(model, batches, optimizer, poisoned, heartbeat=beat, **kwargs)

    loop.train_one_epoch = steered


if __name__ == "__main__":
    from cifar_cam.cli.main import main

    _steer()
    main()
