"""`cifar-cam train` and `eval` end to end through the real CLI: files, checkpoint, sweeps, run dirs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_cam.training.device import precision_name, resolve_precision
from conftest import SHARED_ARCHIVE, TINY, only_run_dir, run_cli

SUMMARY_KEYS = {"best_epoch", "best_val_acc", "test_acc", "test_loss", "epochs_run", "stopped_early",
                "train_seconds", "images_per_second"}


def test_train_writes_every_spec_file(trained_run: Path) -> None:
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "curves.png", "summary.json",
                 "train.log", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (trained_run / name).is_file(), name
    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0 <= float(r["val_acc"]) <= 1 and 0 <= float(r["train_acc"]) <= 1 for r in rows)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["epochs_run"] == 2 and summary["stopped_early"] is False
    assert 0 <= summary["test_acc"] <= 1 and summary["images_per_second"] > 0
    assert summary["precision"] == precision_name(resolve_precision("auto", torch.device("cpu")))  # by the CPU
    assert summary["best_val_acc"] == max(float(r["val_acc"]) for r in rows)
    with Image.open(trained_run / "curves.png") as im:
        assert im.size[0] > 800 and im.size[1] > 250


def test_checkpoint_loads_with_weights_only(trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "best_val_acc", "config"):
        assert key in ckpt, key
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["model"]["width"] == 8
    assert ckpt["epoch"] == 2 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_eval_reproduces_train_test_accuracy(trained_run: Path, tmp_path: Path) -> None:
    result = run_cli("eval", f"ckpt={trained_run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = only_run_dir(tmp_path / "outputs" / "eval")
    metrics = json.loads((run / "metrics.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert metrics["accuracy"] == summary["test_acc"] and metrics["n"] == 64
    assert metrics["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert set(metrics["per_class_accuracy"]) == {f"class{i}" for i in range(10)}
    for name in ("confusion_matrix.png", "misclassified.png", "eval.log"):
        assert (run / name).is_file()
    assert "most confused with" in result.stdout  # the per-class table


def test_eval_accepts_a_pt_file_and_overrides_win(trained_run: Path, tmp_path: Path) -> None:
    result = run_cli("eval", f"ckpt={trained_run / 'checkpoints' / 'last.pt'}", "data.test_size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((only_run_dir(tmp_path / "outputs" / "eval") / "metrics.json").read_text())
    assert metrics["n"] == 32


def test_eight_concurrent_runs_get_eight_directories(tmp_path: Path) -> None:
    # --cfg would skip the run; an invalid value fails after... so use the real reservation via a tiny helper
    code = ("import sys; from pathlib import Path; from cifar_cam.io import reserve_dir; "
            "print(reserve_dir(Path('outputs/train')))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    dirs = {p.communicate()[0].strip() for p in procs}
    assert len(dirs) == 8
    assert len(list((tmp_path / "outputs" / "train").iterdir())) == 8


def test_concurrent_cli_runs_never_share_a_directory(tmp_path: Path) -> None:
    args = [*TINY, "data.train_size=40", "data.val_size=0", "data.test_size=10", "trainer.epochs=1"]
    procs = [subprocess.Popen([sys.executable, "-m", "cifar_cam", "train", *args], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 3 and all((r / "summary.json").is_file() for r in runs)


def test_multirun_sweep_gives_one_job_per_value(tmp_path: Path) -> None:
    args = [*TINY, "data.train_size=40", "data.val_size=0", "data.test_size=10", "trainer.epochs=1"]
    result = run_cli("train", *args, "-m", "optimizer.lr=0.01,0.02", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = only_run_dir(tmp_path / "multirun" / "train")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = [json.loads(json.dumps(torch.load(j / "checkpoints" / "last.pt", weights_only=True)["config"]))
           ["optimizer"]["lr"] for j in jobs]
    assert lrs == [0.01, 0.02]


def test_help_and_cfg_behave_like_hydra(tmp_path: Path) -> None:
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and all(c in top.stdout for c in ("lr-find", "train", "eval", "gradcam"))
    cfg = run_cli("train", "--cfg", "job", "trainer.epochs=3", cwd=tmp_path)
    assert cfg.returncode == 0 and "epochs: 3" in cfg.stdout
    helptext = run_cli("train", "--help", cwd=tmp_path)
    assert helptext.returncode == 0 and "scheduler       cosine none onecycle plateau*" in helptext.stdout
    assert not (tmp_path / "outputs").exists()  # informational flags create no run dir


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "nosuchkey=1"], "unknown config key 'nosuchkey'"),
        (["train", "trainer.epochs=-1"], "trainer.epochs must be an integer >= 1, got -1"),
        (["train", "data=nope"], "unknown choice data=nope; choose one of: cifar10, cifar100, csv, folder, synthetic"),
        (["trian"], "unknown command 'trian' (did you mean train?)"),
    ],
)
def test_bad_overrides_give_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_smoke_command_from_readme_reaches_090(tmp_path: Path) -> None:
    """The README's smoke run: full-width ResNet18, 2 synthetic epochs, > 90% test accuracy."""
    result = run_cli("train", "data=synthetic", "trainer.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((only_run_dir(tmp_path / "outputs" / "train") / "summary.json").read_text())
    assert summary["test_acc"] > 0.9


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="real CIFAR-10 JPEG archive not in ../shared/data")
def test_real_images_beat_chance_after_one_short_epoch(tmp_path: Path) -> None:
    # 10,000 images in batches of 64 (156 steps, ~17 s here): 36.6% test on 2026-11-24
    result = run_cli("train", "data=folder", f"data.root={SHARED_ARCHIVE}", "data.subset=10000", "data.val_size=1000",
                     "data.batch_size=64", "model.width=16", "trainer.epochs=1", "aug=none", "scheduler=onecycle",
                     "optimizer.lr=0.1", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads((only_run_dir(tmp_path / "outputs" / "train") / "summary.json").read_text())
    assert summary["test_acc"] > 0.30, summary


def test_commands_on_a_folder_run_need_no_data_root_again(tmp_path: Path) -> None:
    """eval / gradcam / resume take data.root from the checkpoint (folder.yaml's root is required)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 255, (32, 32, 3), np.uint8)
                cv2.imwrite(str(tmp_path / "imgs" / split / c / f"{i}.png"), image)
    first = run_cli("train", "data=folder", "data.root=imgs", "data.val_size=4", "data.batch_size=8", "model.width=8",
                    "trainer.epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = only_run_dir(tmp_path / "outputs" / "train")
    evaluated = run_cli("eval", f"ckpt={run}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((only_run_dir(tmp_path / "outputs" / "eval") / "metrics.json").read_text())
    assert metrics["n"] == 8 and set(metrics["per_class_accuracy"]) == {"a", "b"}
    resumed = run_cli("train", f"ckpt={run}", "trainer.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in csv.DictReader((run / "metrics.csv").open())] == ["1", "2"]


def test_cli_module_starts_without_torch() -> None:
    """`import cifar_cam.cli` stays light: torch loads only when a command runs (fast --help, clean Ctrl-C)."""
    code = "import sys, cifar_cam.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("args", [["train", "nosuchkey=1"], ["train", "model.name=vgg"], ["eval", "aug.backend=jax"],
                                  ["train", "--cfg", "job"], ["gradcam", "--help"]])
def test_refused_input_and_info_flags_never_import_torch(args: list[str]) -> None:
    """The precheck and Hydra's --help / --cfg need no torch: a typo is refused in about a second."""
    code = ("import sys\nfrom cifar_cam.cli import main\ncode = 0\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as e:\n    code = e.code\nprint(code, 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    expected = "0" if "--cfg" in args or "--help" in args else "2"
    assert done.stderr.strip().splitlines()[-1] == f"{expected} False", done.stderr
