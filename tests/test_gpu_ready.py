"""What a GPU run needs, checked on the CPU: compile kept out of the epochs and to one shape, checkpoint writes
every trainer.checkpoint_every epochs, the training GPU's RNG state alone, TF32 off when deterministic, and
best.pt without a val split."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import cifar_cam.tasks.train as train_task
import cifar_cam.training.loop as loop
import cifar_cam.training.run as run_module
from cifar_cam.data.arrays import ImageArrays
from cifar_cam.data.augment import build_train_batches
from cifar_cam.tasks.common import setup_runtime
from cifar_cam.training import checkpoint
from conftest import TINY, compose_cfg


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_the_suite_runs_on_the_cpu_even_where_cuda_exists() -> None:
    # conftest hides the GPUs (cuDNN autotuning would make resumed runs differ); `pytest -m cuda` shows them
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert not torch.cuda.is_available()


# -- compile: one shape, timed apart --------------------------------------------------------------------------------

def test_compiled_training_sees_one_shape_per_size_and_times_the_compile_apart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # dynamo with its 'eager' backend: the same guards and graph count as inductor, without minutes of C++ builds
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    steps: list[int] = []
    real = loop.train_one_epoch

    def counting(model, batches, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps.append(len(batches))
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", counting)
    # 96 training images in batches of 40: two full batches and a partial one of 16; two image sizes; val and
    # test at other batch sizes, in eval mode
    cfg = compose_cfg("train", [*TINY, "data.batch_size=40", "trainer.compile=true",
                                "trainer.progressive_resize=[16]", "aug.backend=torch"], run_dir=tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        train_task.train(cfg)
    s = summary(tmp_path / "run")
    assert steps == [2, 2]  # the partial batch is dropped
    assert s["recompiles"] == 0  # validation and the test ran on the eager module
    assert s["compile_seconds"] > 0
    assert sum(r["seconds"] for r in [*csv_rows(tmp_path / "run")]) == pytest.approx(s["train_seconds"], abs=0.01)
    assert s["wall_seconds"] > s["train_seconds"] + s["compile_seconds"] * 0.99
    assert "last partial batch (16 of 96 images) is dropped" in caplog.text
    assert "compiled the training step" in caplog.text and "(16, 32 px" in caplog.text


def test_the_compile_warm_up_leaves_the_weights_as_they_were(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 96 images in batches of 32: nothing dropped, so the compiled run must train exactly as the eager one
    plain = compose_cfg("train", [*TINY, "trainer.epochs=1"], run_dir=tmp_path / "plain")
    train_task.train(plain)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = compose_cfg("train", [*TINY, "trainer.epochs=1", "trainer.compile=true"], run_dir=tmp_path / "compiled")
    train_task.train(compiled)
    a, b = csv_rows(tmp_path / "plain")[0], csv_rows(tmp_path / "compiled")[0]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert summary(tmp_path / "plain")["test_loss"] == summary(tmp_path / "compiled")["test_loss"]


def test_the_fast_preset_is_the_published_resnet18_recipe() -> None:
    cfg = compose_cfg("train", ["experiment=fast"])
    assert (cfg.data.batch_size, cfg.trainer.epochs, cfg.data.val_size) == (500, 26, 0)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.nesterov, cfg.optimizer.weight_decay) == (
        0.2, 0.9, True, 5e-4)
    s = cfg.scheduler
    assert (s.max_lr, s.pct_start, s.div_factor, s.anneal_strategy) == (0.2, 0.2, 5.0, "linear")
    assert s.cycle_momentum is False
    assert s.max_lr / s.div_factor / s.final_div_factor < 1e-5  # "linearly to 0"
    assert (cfg.aug.pad, cfg.aug.hflip_p, cfg.aug.cutout_size, cfg.aug.cutout_p) == (4, 0.5, 12, 1.0)
    assert cfg.trainer.label_smoothing == 0 and cfg.trainer.compile and cfg.eval.tta
    budget = compose_cfg("train", ["experiment=cpu_budget"])
    assert budget.scheduler.cycle_momentum is True  # the value the CPU recipe was measured with


def csv_rows(run: Path) -> list[dict[str, float]]:
    import csv

    with open(run / "metrics.csv") as f:
        return [{k: float(v) if v else 0.0 for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.parametrize("backend", ["albumentations", "torch"])
def test_drop_last_keeps_full_batches_and_resumes_mid_epoch(backend: str) -> None:
    arrays = ImageArrays(torch.randint(0, 255, (100, 32, 32, 3), dtype=torch.uint8).numpy(),
                         torch.arange(100).remainder(10).numpy(), torch.arange(100).numpy())
    aug = {"preset": "none", "backend": backend}
    batches = build_train_batches(arrays, aug, batch_size=32, num_workers=0, seed=0, device=torch.device("cpu"),
                                  drop_last=True)
    batches.set_epoch(1)
    assert len(batches) == 3 and [len(y) for _, y in batches] == [32, 32, 32]
    batches.set_epoch(1, start_batch=2)
    assert len(batches) == 1 and [len(y) for _, y in batches] == [32]
    keep = build_train_batches(arrays, aug, batch_size=32, num_workers=0, seed=0, device=torch.device("cpu"))
    keep.set_epoch(1)
    assert [len(y) for _, y in keep] == [32, 32, 32, 4]


def test_compile_refuses_data_without_a_full_batch(tmp_path: Path) -> None:
    from cifar_cam.errors import ConfigError

    cfg = compose_cfg("train", [*TINY, "data.batch_size=128", "trainer.compile=true"], run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="no full batch of data.batch_size=128"):
        train_task.train(cfg)


# -- checkpoint_every -----------------------------------------------------------------------------------------------

def test_checkpoints_and_curves_are_written_every_n_epochs_and_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[str, int]] = []
    plots: list[int] = []
    real_save = run_module.save_checkpoint

    def save(payload: dict[str, Any], path: Path) -> None:
        writes.append((Path(path).stem, payload["epoch"]))
        real_save(payload, path)

    monkeypatch.setattr(run_module, "save_checkpoint", save)
    monkeypatch.setattr(loop.viz, "plot_curves", lambda history, path: plots.append(len(history)))
    cfg = compose_cfg("train", [*TINY, "trainer.epochs=3", "trainer.checkpoint_every=2"], run_dir=tmp_path / "run")
    train_task.train(cfg)
    last = [epoch for name, epoch in writes if name == "last"]
    assert last == [2, 3] and plots == [2, 3]
    # best.pt holds the best epoch's weights even when that epoch was not a write epoch
    s = summary(tmp_path / "run")
    best = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] == s["best_epoch"]
    assert [epoch for name, epoch in writes if name == "best"][-1] == s["best_epoch"]
    assert len(csv_rows(tmp_path / "run")) == 3  # metrics.csv still gets every epoch
    assert s["compile_seconds"] is None and s["recompiles"] is None  # not compiled
    assert s["wall_seconds"] >= s["train_seconds"] > 0


def test_a_crash_between_writes_redoes_those_epochs_and_compile_may_not_change_the_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cam.errors import ConfigError

    real = loop.train_one_epoch
    calls: list[int] = []

    def crash_at(n: int):  # noqa: ANN202
        def train_one_epoch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("the machine went down")
            return real(*args, **kwargs)
        return train_one_epoch

    run = tmp_path / "run"
    monkeypatch.setattr(loop, "train_one_epoch", crash_at(4))  # during epoch 4; last.pt holds epoch 2
    with pytest.raises(RuntimeError, match="went down"):
        train_task.train(compose_cfg("train", [*TINY, "data.batch_size=40", "trainer.epochs=4",
                                               "trainer.checkpoint_every=2"], run_dir=run))
    assert len(csv_rows(run)) == 3 and checkpoint.load_checkpoint(run, "last")["epoch"] == 2
    # 96 images in batches of 40: 3 steps an epoch, 2 compiled (the partial batch dropped): not the same run
    with pytest.raises(ConfigError, match="makes 2 steps an epoch, but the run being resumed took 3"):
        train_task.train(compose_cfg("train", [f"ckpt={run}", "trainer.compile=true"], run_dir=run))
    calls.clear()
    monkeypatch.setattr(loop, "train_one_epoch", crash_at(1))
    with pytest.raises(RuntimeError, match="went down"):
        train_task.train(compose_cfg("train", [f"ckpt={run}"], run_dir=run))
    assert [r["epoch"] for r in csv_rows(run)] == [1, 2]  # epoch 3's row went with the epochs it redoes


def test_checkpoint_every_is_validated_before_torch() -> None:
    from conftest import run_cli

    result = run_cli("train", "trainer.checkpoint_every=0")
    assert result.returncode == 2
    assert "trainer.checkpoint_every" in result.stderr and "Traceback" not in result.stderr


def test_without_a_val_split_best_is_the_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # train accuracy that falls in the last epoch: a "best" picked on it would be epoch 2
    accs = iter([0.3, 0.6, 0.2])
    real = loop.train_one_epoch

    def falling(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real(*args, **kwargs)
        result.totals.correct = round(next(accs) * result.totals.count)
        return result

    monkeypatch.setattr(loop, "train_one_epoch", falling)
    cfg = compose_cfg("train", [*TINY, "data.val_size=0", "trainer.epochs=3"], run_dir=tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        train_task.train(cfg)
    s = summary(tmp_path / "run")
    assert s["best_epoch"] == 3 and s["best_val_acc"] is None and s["stopped_early"] is False
    assert checkpoint.load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["epoch"] == 3
    assert "early stopping is off: it needs a val split" in caplog.text


# -- CUDA state, stubbed ---------------------------------------------------------------------------------------------

def test_a_checkpoint_from_two_gpus_resumes_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    restored: list[tuple[torch.Tensor, Any]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))

    def only_one_gpu(states: list[torch.Tensor]) -> None:  # what torch does with more states than GPUs
        if len(states) > 1:
            raise IndexError("list index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", only_one_gpu)
    state = checkpoint.rng_state()
    gpu0, gpu1 = torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)
    # older checkpoints: get_rng_state_all()'s list, one state per visible GPU
    checkpoint.set_rng_state({**state, "cuda": [gpu0, gpu1]}, torch.device("cuda", 0))
    assert len(restored) == 1 and torch.equal(restored[0][0], gpu0)
    # new ones: the training device's state alone
    checkpoint.set_rng_state({**state, "cuda": gpu1}, torch.device("cuda", 0))
    assert torch.equal(restored[1][0], gpu1) and restored[1][1] == torch.device("cuda", 0)
    checkpoint.set_rng_state({**state, "cuda": gpu1}, torch.device("cpu"))  # resumed on the CPU: not touched
    assert len(restored) == 2


def test_the_rng_state_holds_the_training_gpu_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Any] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": asked.append(device) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every GPU's state"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = checkpoint.rng_state(torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)] and state["cuda"].shape == (8,)
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu"))


def test_deterministic_also_turns_tf32_off(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as a default CUDA run sets
        torch.backends.cudnn.benchmark = True
        setup_runtime(compose_cfg("train", [*TINY, "trainer.deterministic=true", "trainer.device=cpu"]))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags
