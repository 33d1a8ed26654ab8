"""Bad input through the real CLI: one line on stderr naming the problem, exit 2, no traceback, nothing changed.

Each case runs `python -m cifar_cam ...` in its own folder beside its own copy of a trained run (the
"pre-existing run directory"); the run's files are hashed before and after. The subprocesses run a
few at a time, so the table costs about half the sum of its cases.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY, run_cli


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]   # {name} placeholders are filled from the fixtures below
    needle: str             # must appear in the one line on stderr
    code: int = 2
    slow: bool = False      # one more of a kind already covered: run by `make test-full` only


FOLDER = ("data=folder", "data.image_size=8", "data.val_size=0", "data.cache=false", "model.width=8",
          "trainer.epochs=1")
CASES: dict[str, Case] = {
    # command line and config values
    "unknown_command": Case(("trian",), "unknown command 'trian' (did you mean train?)"),
    "negative_lr": Case(("train", "optimizer.lr=-1"), "optimizer.lr must be a number > 0 or 'auto'"),
    "zero_epochs": Case(("train", "trainer.epochs=0"), "trainer.epochs must be an integer >= 1, got 0", slow=True),
    "sweep_without_m": Case(("train", "seed=1,2"), "seed=1,2 lists several values: add -m to run one job each"),
    "epochs_not_a_number": Case(("train", "trainer.epochs=abc"), "trainer.epochs must be an integer >= 1, got 'abc'"),
    "fractional_batch_size": Case(("train", "data.batch_size=1.5"), "data.batch_size must be an integer >= 1",
                                  slow=True),
    "seed_not_an_integer": Case(("train", "seed=abc"), "seed must be an integer", slow=True),
    "probability_above_one": Case(("train", "aug.hflip_p=1.5"), "aug.hflip_p must be a probability in [0, 1]",
                                  slow=True),
    "momentum_of_one": Case(("train", "optimizer.momentum=1"), "optimizer.momentum must be a number in [0, 1)",
                            slow=True),
    "muon_without_newton_schulz": Case(("train", "optimizer=muon", "optimizer.ns_steps=0"),
                                       "optimizer.ns_steps must be an integer >= 1, got 0"),
    "muon_negative_aux_lr_scale": Case(("train", "optimizer=muon", "optimizer.aux_lr_scale=-2"),
                                       "optimizer.aux_lr_scale must be a number > 0", slow=True),
    "optimizer_target_not_an_optimizer": Case(("train", "optimizer=muon",
                                               "optimizer._target_=cifar_cam.training.optim.orthogonalize"),
                                              "optimizer._target_ must be a torch.optim class or "
                                              "cifar_cam.training.optim.Muon",
                                              slow=True),
    "nesterov_not_a_bool": Case(("train", "optimizer.nesterov=maybe"), "optimizer.nesterov must be true or false",
                                slow=True),
    "unknown_device": Case(("train", "trainer.device=tpu"), "trainer.device must be auto, cpu, cuda or cuda:N",
                           slow=True),
    "cuda_without_gpu": Case(("train", "trainer.device=cuda:7"), "trainer.device=cuda:7 but"),
    "unknown_precision": Case(("train", "trainer.precision=fp8"), "trainer.precision must be one of", slow=True),
    "one_class": Case(("train", "data=synthetic", "data.num_classes=1"), "data.num_classes must be an integer >= 2",
                      slow=True),
    "unknown_key": Case(("train", "foo=1"), "unknown config key 'foo'"),
    "misspelt_key": Case(("train", "trainer.epoch=3"),
                         "unknown config key 'trainer.epoch'; did you mean trainer.epochs"),
    "unknown_optimizer": Case(("train", "optimizer=rmsprop"),
                              "unknown choice optimizer=rmsprop; choose one of: adam, adamw, muon, sgd"),
    "unknown_data": Case(("train", "data=imagenet"),
                         "unknown choice data=imagenet; choose one "
                         "of: cifar10, cifar100, csv, folder, synthetic", slow=True),
    "unknown_experiment": Case(("train", "experiment=huge"), "unknown choice experiment=huge; choose one of:",
                               slow=True),
    "resize_sizes_not_a_list": Case(("train", "trainer.progressive_resize=16"),
                                    "trainer.progressive_resize must be null or a list of image sizes"),
    "resize_longer_than_training": Case(("train", "experiment=cpu_quick", "trainer.epochs=2",
                                         "trainer.progressive_resize=[12,16,24]"),
                                        "trainer.progressive_resize lists 3 epochs but trainer.epochs=2"),
    "resize_above_the_images": Case(("train", "data=synthetic", "data.image_size=16",
                                     "trainer.progressive_resize=[24]"),
                                    "has sizes above the 16-pixel images", slow=True),
    "broken_override_syntax": Case(("train", "optimizer.lr=[1,"), "bad override"),
    "bad_value_inside_a_sweep": Case(("train", "-m", "optimizer.lr=0.1,-1"),
                                     "optimizer.lr must be a number > 0 or 'auto'"),
    "unknown_cam_method": Case(("gradcam", "ckpt={run}", "gradcam.method=lime"), "gradcam.method must be one of",
                               slow=True),
    # data
    "data_root_not_set": Case(("train", "data=folder"), "data.root is required but not set"),
    "data_root_missing": Case(("train", *FOLDER, "data.root={tmp}/nowhere"), "does not exist"),
    "data_root_without_test": Case(("train", *FOLDER, "data.root={no_test}"), "has train/ but no "
                                                                              "test/ or val/ next to it"),
    "empty_class_folder": Case(("train", *FOLDER, "data.root={empty_class}"), "train/dog has no images"),
    "class_sets_differ": Case(("train", *FOLDER, "data.root={other_classes}"),
                              "have different classes (only in train: ['dog'], only in test: ['frog'])"),
    "undecodable_image": Case(("train", *FOLDER, "data.root={bad_image}"),
                              "bad_images.txt): train/cat/broken.png (not an image file or corrupt); remove or "
                              "replace it, or pass data.skip_bad_images=true to train without it"),
    "val_size_too_large": Case(("train", *TINY, "data.val_size=5000"), "data.val_size=5000 leaves no training images",
                               slow=True),
    # checkpoints
    "eval_without_ckpt": Case(("eval",), "eval needs ckpt=PATH"),
    "ckpt_missing": Case(("eval", "ckpt={tmp}/nowhere.pt"), "does not exist"),
    "ckpt_truncated": Case(("eval", "ckpt={truncated}"), "is not a readable checkpoint (truncated"),
    "ckpt_not_a_torch_file": Case(("eval", "ckpt={text_file}"), "is not a readable checkpoint", slow=True),
    "ckpt_of_someone_else": Case(("eval", "ckpt={foreign}"), "is not a cifar-cam checkpoint"),
    "ckpt_with_pickled_code": Case(("eval", "ckpt={pickled_code}"), "is not a readable checkpoint", slow=True),
    "ckpt_of_other_architecture": Case(("eval", "ckpt={other_width}"), "weights do not fit resnet18 width 16"),
    "ckpt_of_other_class_count": Case(("eval", "ckpt={five_classes}"),
                                      "weights do not fit resnet18 width 8 with 5 classes"),
    "data_of_other_class_count": Case(("eval", "ckpt={run}", "data.num_classes=5"), "was trained on 10 classes"),
    "ckpt_dir_without_checkpoints": Case(("eval", "ckpt={tmp}/empty_run"),
                                         "is a directory without checkpoints/best.pt", slow=True),
    "resume_dir_without_checkpoints": Case(("train", "ckpt={tmp}/empty_run"),
                                           "is a directory without checkpoints/last.pt"),
    "resume_with_other_width": Case(("train", "ckpt={run}", "model.width=16"),
                                    "model.width=16 differs from the run being resumed (model.width=8)"),
    "resume_with_other_seed": Case(("train", "ckpt={run}", "seed=7"), "seed=7 differs from the run being resumed",
                                   slow=True),
    "resume_with_other_optimizer": Case(("train", "ckpt={run}", "optimizer=adam"),
                                        "optimizer._target_=torch.optim.Adam differs from the run being resumed",
                                        slow=True),
    "resume_with_fewer_epochs": Case(("train", "ckpt={run}", "trainer.epochs=1"),
                                     "trainer.epochs=1 is less than the 2 epochs the run has done"),
    "resume_from_an_older_best": Case(("train", "ckpt={run}/checkpoints/best.pt"),
                                      "is epoch 1 but its run went on to epoch 2"),
}


def tree_hash(root: Path) -> dict[str, str]:
    """Every file under root (names and bytes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_images(root: Path, split_classes: dict[str, list[str]], n: int = 2) -> Path:
    """root/<split>/<class>/<i>.png, 8x8 random images."""
    rng = np.random.default_rng(0)
    for split, classes in split_classes.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> dict[str, Path]:
    """The bad data folders and checkpoints the cases point at."""
    tmp = tmp_path_factory.mktemp("bad_input")
    both = {"train": ["cat", "dog"], "test": ["cat", "dog"]}
    empty_class = write_images(tmp / "empty_class", both)
    for f in (empty_class / "train" / "dog").iterdir():
        f.unlink()
    bad_image = write_images(tmp / "bad_image", both)
    (bad_image / "train" / "cat" / "broken.png").write_bytes(b"not a png at all")
    (tmp / "empty_run").mkdir()

    last = trained_run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp / "text_file.pt").write_text("epoch,loss\n1,2.3\n")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, tmp / "foreign.pt")
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp / "pickled_code.pt")
    payload = torch.load(last, weights_only=True)
    payload["config"]["model"]["width"] = 16
    torch.save(payload, tmp / "other_width.pt")
    payload = torch.load(last, weights_only=True)
    payload["classes"] = payload["classes"][:5]
    torch.save(payload, tmp / "five_classes.pt")
    return {
        "tmp": tmp, "no_test": write_images(tmp / "no_test", {"train": ["cat", "dog"]}),
        "empty_class": empty_class, "other_classes": write_images(tmp / "other", {"train": ["cat", "dog"],
                                                                                  "test": ["cat", "frog"]}),
        "bad_image": bad_image, "truncated": tmp / "truncated.pt", "text_file": tmp / "text_file.pt",
        "foreign": tmp / "foreign.pt", "pickled_code": tmp / "pickled_code.pt", "other_width": tmp / "other_width.pt",
        "five_classes": tmp / "five_classes.pt",
    }


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    args: list[str]
    before: dict[str, str]
    after: dict[str, str]


def run_case(name: str, case: Case, places: dict[str, Path], trained_run: Path) -> Outcome:
    """One case in <tmp>/cases/<name>/: a copy of the trained run as `run`, the command run from `work`."""
    home = places["tmp"] / "cases" / name
    run, work = home / "run", home / "work"
    shutil.copytree(trained_run, run)
    work.mkdir()
    if name == "resume_from_an_older_best":  # best.pt from an earlier epoch than last.pt
        best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
        best["epoch"] = 1
        torch.save(best, run / "checkpoints" / "best.pt")
    fill = {k: str(v) for k, v in places.items()} | {"run": str(run)}
    args = [a.format(**fill) for a in case.args]
    before = tree_hash(run)
    result = run_cli(*args, cwd=work, timeout=300)
    return Outcome(result, args, before, tree_hash(run))


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, places: dict[str, Path], trained_run: Path) -> dict[str, Outcome]:
    """Runs the selected cases, three subprocesses at a time."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.path == request.path and hasattr(item, "callspec") and "name" in item.callspec.params}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_case, name, CASES[name], places, trained_run) for name in sorted(selected)}
        return {name: f.result() for name, f in futures.items()}


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40 and sum(not c.slow for c in CASES.values()) >= 25


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if CASES[n].slow else n
                                  for n in sorted(CASES)])
def test_bad_input_fails_in_one_line(name: str, outcomes: dict[str, Outcome], places: dict[str, Path]) -> None:
    case, outcome = CASES[name], outcomes[name]
    result = outcome.result
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{outcome.args}: stderr has {len(lines)} lines:\n{result.stderr}"
    assert result.returncode == case.code, f"{outcome.args}: exit {result.returncode}: {lines[0]}"
    needle = case.needle.format(**{k: str(v) for k, v in places.items()})
    assert lines[0].startswith("cifar-cam") and "error: " in lines[0], lines[0]
    assert needle in lines[0], lines[0]
    assert outcome.after == outcome.before, "a file in the pre-existing run directory changed"


def test_a_failing_job_does_not_stop_a_sweep(tmp_path: Path) -> None:
    """Job 1 diverges (a runtime failure, exit 1); job 0 still runs; the sweep ends with one line naming job 1."""
    args = [*TINY, "trainer.epochs=1", "data.val_size=0", "hydra.sweep.dir=sweep"]
    result = run_cli("train", "-m", "optimizer.lr=0.05,1e6", *args, cwd=tmp_path)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "1 job(s) of the sweep failed, the others ran; job #1" in lines[0]
    assert "loss became NaN/inf at epoch 1" in lines[0]
    assert (tmp_path / "sweep" / "0" / "summary.json").is_file()
    assert not (tmp_path / "sweep" / "1" / "summary.json").exists()
    assert "[ERROR] loss became NaN/inf" in (tmp_path / "sweep" / "1" / "train.log").read_text()
