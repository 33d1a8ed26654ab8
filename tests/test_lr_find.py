"""The LR range test: state restored bit for bit, files written, divergence, optimizer.lr=auto."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shlex
from pathlib import Path
from unittest import mock

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch_lr_finder import LRFinder

import cifar_cam.tasks.lr_find as lr_find_module
from cifar_cam.data.augment import build_train_batches
from cifar_cam.data.sources import DataSpec, build_splits
from cifar_cam.models import build_model
from cifar_cam.tasks.lr_find import lr_find
from cifar_cam.training.checkpoint import load_checkpoint
from cifar_cam.training.lr_finder import MIN_POINTS, run_range_test, steepest_gradient_lr, train_command
from conftest import TINY, compose_cfg, run_cli

CPU = torch.device("cpu")


def _tiny_batches(cfg):  # noqa: ANN001, ANN202
    splits = build_splits(DataSpec("synthetic", None, val_size=0, subset=None, seed=0, train_size=96, test_size=8))
    return build_train_batches(splits.train, cfg.aug, batch_size=32, num_workers=0, seed=0, device=CPU)


def test_range_test_restores_model_and_optimizer_bit_for_bit() -> None:
    cfg = compose_cfg("lr-find", TINY)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=8).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    batches = _tiny_batches(cfg)
    for x, y in batches:  # one real step first: momentum buffers and BN statistics that must survive
        criterion(model(x), y).backward()
        optimizer.step()
        break
    model.eval()
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    rng_before = torch.get_rng_state()
    seen = {}

    def on_step(step: int, lr: float, loss: float) -> None:
        if step == 8:
            seen["fc"] = model.fc.weight.detach().clone()

    result = run_range_test(model, optimizer, criterion, batches, device=CPU, start_lr=1e-4, end_lr=1.0, num_iter=12,
                            on_step=on_step)

    assert result.steps == 12 and not result.stopped_early
    assert not torch.equal(seen["fc"], model_before["fc.weight"]), "the test did train the model"
    after = model.state_dict()
    assert list(after) == list(model_before)
    for key, value in model_before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    optimizer_after = optimizer.state_dict()
    assert optimizer_after["param_groups"] == optimizer_before["param_groups"]  # lr 0.05 back, no initial_lr
    for index, state in optimizer_before["state"].items():
        assert torch.equal(optimizer_after["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert not model.training, "eval mode comes back"
    assert torch.equal(torch.get_rng_state(), rng_before)
    # exponential steps from start_lr to end_lr
    assert result.lrs[0] == pytest.approx(1e-4) and result.lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log(result.lrs)), math.log(1e4) / 11)


def test_suggestion_is_torch_lr_finders_steepest_gradient() -> None:
    lrs = list(np.logspace(-5, 1, 60))
    losses = list(2.3 - 1.2 / (1 + np.exp(-3 * (np.log10(lrs) + 2))) + 0.01 * np.sin(np.arange(60)))
    finder = LRFinder(torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0),
                      torch.nn.MSELoss())
    finder.history = {"lr": lrs, "loss": losses}
    fig, ax = plt.subplots()
    _, expected = finder.plot(ax=ax)  # its default skip_start=10, skip_end=5
    plt.close(fig)
    assert steepest_gradient_lr(lrs, losses) == pytest.approx(expected, rel=0, abs=0)
    assert steepest_gradient_lr(lrs[:MIN_POINTS - 1], losses[:MIN_POINTS - 1]) is None


def test_lr_find_writes_plot_json_and_command(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg("lr-find", [*TINY, "lr_find.num_iter=18", "optimizer=adam"], run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        suggested = lr_find(cfg)
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["suggested_lr"] == suggested and 1e-6 <= suggested <= 10
    assert len(result["lr"]) == len(result["loss"]) == result["steps"] == 18
    assert all(math.isfinite(v) for v in result["loss"]) and result["optimizer"] == "Adam"
    assert "steepest negative gradient" in result["suggestion"]
    assert result["stopped_early"] is False and result["note"] is None
    image = cv2.imread(str(tmp_path / "lr_find.png"))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 500
    lines = [r.getMessage() for r in caplog.records if "to train with it:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(f"optimizer.lr={suggested:.3g}")
    assert "optimizer=adam" in shlex.split(lines[0])


def test_early_divergence_still_writes_plot_and_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_cfg("lr-find", [*TINY, "lr_find.num_iter=30", "lr_find.start_lr=1", "lr_find.end_lr=1e5"],
                      run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        assert math.isnan(lr_find(cfg))
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["suggested_lr"] is None and result["stopped_early"] is True
    assert 1 <= result["steps"] < MIN_POINTS and len(result["loss"]) == result["steps"]
    assert "too few points" in result["note"]
    assert cv2.imread(str(tmp_path / "lr_find.png")) is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "diverged after" in warnings[0] and "\n" not in warnings[0]
    assert not any("to train with it" in r.getMessage() for r in caplog.records)


def test_nan_loss_stops_the_test_and_stays_out_of_the_json(tmp_path: Path) -> None:
    # diverge_th so high that torch-lr-finder never stops by itself: only our NaN/inf check does
    cfg = compose_cfg("lr-find", [*TINY, "lr_find.num_iter=40", "lr_find.start_lr=10", "lr_find.end_lr=1e8",
                                  "lr_find.diverge_th=1e30"], run_dir=tmp_path)
    lr_find(cfg)
    result = json.loads((tmp_path / "lr_find.json").read_text())  # strict JSON: a NaN would not parse as null
    assert result["non_finite_loss"] is True and result["steps"] < 40
    assert all(math.isfinite(v) for v in result["loss"])


def test_a_checkpoint_gives_its_recipe_on_fresh_weights(trained_run: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # model.width=64 by default: the architecture (width 8) must come from the checkpoint, the weights must not
    torch.manual_seed(0)
    fresh = build_model("resnet18", num_classes=10, width=8)
    cfg = compose_cfg("lr-find", [f"ckpt={trained_run}", "lr_find.num_iter=6"], run_dir=tmp_path)
    built = {}
    real_build = lr_find_module.model_from_config

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built["model"] = real_build(*args, **kwargs)
        return built["model"]

    with caplog.at_level(logging.INFO, logger="cifar_cam"), mock.patch.object(lr_find_module, "model_from_config", spy):
        lr_find(cfg)
    assert json.loads((tmp_path / "lr_find.json").read_text())["steps"] == 6
    assert any("with fresh weights" in r.getMessage() for r in caplog.records)
    trained = load_checkpoint(trained_run / "checkpoints" / "best.pt")["model"]
    tested = built["model"].state_dict()
    assert tested["fc.weight"].shape == trained["fc.weight"].shape == fresh.state_dict()["fc.weight"].shape
    # the range test restores the weights it began with: those of a fresh model (seed 42), not the trained ones
    assert not torch.equal(tested["conv1.weight"], trained["conv1.weight"])
    torch.manual_seed(42)
    assert torch.equal(tested["conv1.weight"], build_model("resnet18", num_classes=10, width=8).conv1.weight)


def test_a_checkpoint_gives_its_recipe_but_not_its_machine(trained_run: Path, tmp_path: Path) -> None:
    from cifar_cam.training.checkpoint import load_with_config

    payload = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    payload["config"]["trainer"].update(strategy="ddp", device="cuda:1", num_threads=16, label_smoothing=0.1)
    torch.save(payload, tmp_path / "ddp.pt")
    cfg = compose_cfg("lr-find", [f"ckpt={tmp_path / 'ddp.pt'}"])
    _, merged = load_with_config(cfg, "lr-find", [f"ckpt={tmp_path / 'ddp.pt'}"])
    assert (merged.trainer.strategy, merged.trainer.device, merged.trainer.num_threads) == ("auto", "auto", "auto")
    assert merged.trainer.label_smoothing == 0.1 and merged.model.width == 8  # the recipe is the run's


def test_printed_command_from_a_checkpoint_trains_what_was_measured(trained_run: Path, tmp_path: Path) -> None:
    """lr-find ckpt=RUN prints a train command that runs as printed, with the run's data, model and recipe."""
    from cifar_cam.cli.main import main

    main(["lr-find", f"ckpt={trained_run}", "lr_find.num_iter=18", "lr_find.end_lr=1", "optimizer=adam",
          f"hydra.run.dir={tmp_path / 'lrf'}"])
    log_text = (tmp_path / "lrf" / "lr-find.log").read_text()  # Hydra's logging replaced caplog's handler
    line = next(x for x in log_text.splitlines() if "to train with it:" in x)
    command = shlex.split(line.split("to train with it: ", 1)[1])
    assert command[:2] == ["cifar-cam", "train"] and "ckpt" not in line and "lr_find" not in line
    assert {"data=synthetic", "model.width=8", "data.train_size=128", "data.val_size=32", "optimizer=adam",
            "trainer.epochs=2"} <= set(command)
    # run as printed (one epoch of it, to keep the test short): it composes, validates and trains
    GlobalHydra.instance().clear()
    main([*command[1:], "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'train'}"])
    config = load_checkpoint(tmp_path / "train" / "checkpoints" / "last.pt")["config"]
    stored = load_checkpoint(trained_run / "checkpoints" / "last.pt")["config"]
    for section in ("data", "model", "aug"):
        assert config[section] == stored[section], section
    assert config["optimizer"]["_target_"] == "torch.optim.Adam"
    assert config["optimizer"]["lr"] == float(line.rsplit("optimizer.lr=", 1)[1])


def test_train_command_from_a_preset_quotes_what_hydra_would_split() -> None:
    cfg = compose_cfg("lr-find", ["experiment=cpu_budget", "data=folder", "data.root='/my data, v2/x.tar.gz'",
                                  "model.width=24", "lr_find.num_iter=50", "optimizer.lr=1",
                                  "trainer.progressive_resize=[16,24]"])
    command = train_command(cfg, 0.0123456, {"experiment": "cpu_budget", "data": "folder", "optimizer": "muon",
                                             "aug": "crop_flip", "scheduler": "onecycle", "model": "resnet18"})
    words = shlex.split(command)
    assert words[:2] == ["cifar-cam", "train"] and words[-1] == "optimizer.lr=0.0123"
    # the preset and the choice it does not imply; not the groups the preset itself sets
    assert "experiment=cpu_budget" in words and "data=folder" in words and "optimizer=muon" not in words
    assert "data.root='/my data, v2/x.tar.gz'" in words and "model.width=24" in words
    assert "trainer.progressive_resize=[16,24]" in words and not any("lr_find" in w for w in words)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[2:])}
    assert parsed["data.root"] == "/my data, v2/x.tar.gz" and parsed["trainer.progressive_resize"] == [16, 24]


def test_on_device_augmentation_backend(tmp_path: Path) -> None:
    cfg = compose_cfg("lr-find", [*TINY, "aug.backend=torch", "lr_find.num_iter=8"], run_dir=tmp_path)
    lr_find(cfg)
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["steps"] == 8 and result["suggested_lr"] is None  # 8 points: too few to suggest
    assert "lr_find.num_iter=8 gives only 8 points" in result["note"]


def test_train_with_lr_auto(tmp_path: Path) -> None:
    from cifar_cam.tasks.train import train

    cfg = compose_cfg("train", [*TINY, "trainer.epochs=1", "optimizer.lr=auto", "lr_find.num_iter=18",
                                "scheduler=none"], run_dir=tmp_path)
    train(cfg)
    found = json.loads((tmp_path / "lr_find.json").read_text())
    assert cv2.imread(str(tmp_path / "lr_find.png")) is not None
    lr = float(f"{found['suggested_lr']:.3g}")
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["config"]["optimizer"]["lr"] == lr
    with (tmp_path / "metrics.csv").open() as f:
        auto_rows = list(csv.DictReader(f))
    assert float(auto_rows[0]["lr"]) == lr  # the optimizer trained with it
    # and the range test left no trace: training exactly as if that LR had been typed in
    typed = tmp_path / "typed"
    train(compose_cfg("train", [*TINY, "trainer.epochs=1", f"optimizer.lr={lr}", "scheduler=none"], run_dir=typed))
    with (typed / "metrics.csv").open() as f:
        typed_rows = list(csv.DictReader(f))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [r[key] for r in auto_rows] == [r[key] for r in typed_rows], key


def test_cli_prints_the_train_command(tmp_path: Path) -> None:
    result = run_cli("lr-find", *TINY, "lr_find.num_iter=18", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "to train with it: cifar-cam train data=synthetic" in output and "optimizer.lr=" in output
    assert "See the graph" not in output  # torch-lr-finder's own prints are silenced
    run = next((tmp_path / "outputs" / "lr-find").iterdir())
    assert {p.name for p in run.iterdir()} >= {"lr_find.png", "lr_find.json", "lr-find.log", ".hydra"}


def test_lr_find_sweeps_muon_and_names_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The range test drives both of Muon's groups through one lr (the rest at lr * aux_lr_scale)."""
    cfg = compose_cfg("lr-find", [*TINY, "lr_find.num_iter=18", "optimizer=muon"], run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        suggested = lr_find(cfg)
    result = json.loads((tmp_path / "lr_find.json").read_text())
    assert result["optimizer"] == "Muon" and len(result["lr"]) == 18
    assert all(math.isfinite(v) for v in result["loss"][:5])
    lines = [r.getMessage() for r in caplog.records if "to train with it:" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith(f"optimizer.lr={suggested:.3g}")
    assert "optimizer=muon" in shlex.split(lines[0])
