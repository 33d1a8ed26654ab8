"""Your own images (issue 28): the layouts and the CSV source, defaults that fit the data, any size and shape,
unreadable files named all at once, the decoded-data cache as a memory map, and every command downstream on a
data set that is not CIFAR (3 classes, non-square images in mixed formats, letterboxed to 64 px)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cam.data.decode import Fit
from cifar_cam.data.decode_pool import decode_split
from cifar_cam.data.listing import list_csv, list_folder
from cifar_cam.data.sources import DataSpec, build_splits
from cifar_cam.errors import DataError
from conftest import TINY, compose_cfg, run_cli
from imagefiles import SHAPES, corrupt, digits_tree, save, shape_image, shapes_tree

CPU = torch.device("cpu")


# -- layouts -----------------------------------------------------------------------------------------------------

def test_a_bare_tree_is_split_seeded_and_stratified(tmp_path: Path) -> None:
    root = shapes_tree(tmp_path / "tree", per_class=20)
    spec = DataSpec("folder", str(root), split=(0.7, 0.1, 0.2), fit=Fit.of(16), seed=3)
    splits = build_splits(spec)
    assert splits.classes == list(SHAPES) and (len(splits.train), len(splits.val), len(splits.test)) == (42, 6, 12)
    assert np.bincount(splits.test.labels).tolist() == [4, 4, 4]  # stratified
    again = build_splits(spec)
    assert again.test.names == splits.test.names  # seeded
    other = build_splits(DataSpec("folder", str(root), split=(0.7, 0.1, 0.2), fit=Fit.of(16), seed=4))
    assert other.test.names != splits.test.names
    assert not set(splits.train.names) & set(splits.test.names)


@pytest.mark.parametrize(("layout", "sizes"), [
    ("train/test", {"train": 18, "val": 2, "test": 10}),      # val held out of train (data.val_size=0.1)
    ("train/val/test", {"train": 10, "val": 10, "test": 10}),  # each split as given
    ("train/val", {"train": 14, "val": 1, "test": 15}),        # val/ is the test set; val from train
])
def test_the_given_split_layouts(tmp_path: Path, layout: str, sizes: dict[str, int]) -> None:
    per_class = 10 if layout != "train/val" else 10
    root = shapes_tree(tmp_path / "tree", per_class=per_class * len(layout.split("/")) // 3 * 3 // len(SHAPES) * 1,
                       layout=layout)
    listing = list_folder(str(root))
    assert listing.layout == layout
    splits = build_splits(DataSpec("folder", str(root), fit=Fit.of(16), val_size=0.1))
    got = {"train": len(splits.train), "val": 0 if splits.val is None else len(splits.val), "test": len(splits.test)}
    assert sum(got.values()) == len(listing.items) and got["test"] > 0


def test_a_csv_with_and_without_a_split_column(tmp_path: Path) -> None:
    root = shapes_tree(tmp_path / "imgs", per_class=12)
    rows = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.*"))
    labels = [Path(r).parent.name for r in rows]
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\n" + "".join(f"{r},{lab}\n" for r, lab in zip(rows, labels, strict=True)))
    splits = build_splits(DataSpec("csv", str(plain), fit=Fit.of(16)))
    assert splits.classes == sorted(SHAPES) and len(splits.train) + len(splits.val) + len(splits.test) == 36
    with_split = tmp_path / "split.csv"
    with_split.write_text("".join(f"{r},{lab},{'test' if i % 3 == 0 else 'train'}\n"
                                  for i, (r, lab) in enumerate(zip(rows, labels, strict=True))))
    assert list_csv(str(with_split)).layout == "csv+split"
    given = build_splits(DataSpec("csv", str(with_split), fit=Fit.of(16), val_size=0))
    assert len(given.test) == 12 and len(given.train) == 24
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,split\nimgs/a.png,cat,holdout\n")
    with pytest.raises(DataError, match=r"bad.csv line 2: split 'holdout' is not one of train, val, test"):
        list_csv(str(bad))


# -- bad files, all at once ----------------------------------------------------------------------------------------

def test_three_corrupt_images_are_named_in_one_run(tmp_path: Path) -> None:
    root = shapes_tree(tmp_path / "tree", per_class=8)
    broken = [corrupt(sorted((root / kind).iterdir())[0]) for kind in SHAPES]
    (root / "circle" / "notes.txt").write_text("not an image")
    args = ["train", "data=folder", f"data.root={root}", "data.image_size=16", "model.width=8", "trainer.epochs=1",
            "data.batch_size=8", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert done.stderr.startswith("cifar-cam train: error: 3 images cannot be read (all of them in ")
    assert all(f"{p.parent.name}/{p.name}" in done.stderr for p in broken)
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in listed) == sorted(f"{p.parent.name}/{p.name}" for p in broken)
    assert "1 files that are no image skipped" in (tmp_path / "run" / "train.log").read_text()
    skipped = run_cli(*args[:-1], "data.skip_bad_images=true", f"hydra.run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert len((tmp_path / "run2" / "bad_images.txt").read_text().splitlines()) == 3


@pytest.mark.parametrize("backend", ["albumentations", "torch"])
@pytest.mark.parametrize("preset", ["seed", "crop_flip"])
def test_every_preset_works_at_8_pixels_and_non_square(tmp_path: Path, backend: str, preset: str) -> None:
    from cifar_cam.tasks.train import train

    for size in ("8", "[12,20]"):
        cfg = compose_cfg("train", [*TINY, f"aug={preset}", f"aug.backend={backend}", f"data.image_size={size}",
                                    "trainer.epochs=1", "data.train_size=64", "data.val_size=0"],
                          run_dir=tmp_path / f"run{len(size)}")
        train(cfg)
        assert json.loads((tmp_path / f"run{len(size)}" / "summary.json").read_text())["epochs_run"] == 1


# -- defaults that fit the data ------------------------------------------------------------------------------------

def test_class_counts_are_logged_and_a_strong_imbalance_named(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from cifar_cam.data.batches import balanced_weights, epoch_order
    from cifar_cam.data.sources import describe

    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for kind, n in zip(SHAPES, (40, 40, 3), strict=True):
        for i in range(n):
            save(shape_image(kind, 16, 16, rng), root / kind / f"{i}", 0)
    splits = build_splits(DataSpec("folder", str(root), split=(0.8, 0.0, 0.2), fit=Fit.of(16)))
    with caplog.at_level(logging.INFO, logger="cifar_cam.data"):
        describe(splits, "folder")
    assert "training images per class: circle 32, square 32, stripes 2" in caplog.text
    assert "strong class imbalance: stripes has fewer than a tenth" in caplog.text
    order = epoch_order(len(splits.train), 0, 1, balanced_weights(splits.train.labels))
    counts = np.bincount(splits.train.labels[order.numpy()], minlength=3)
    assert counts.min() > 0.2 * len(order)  # each class about a third, the small one included


def test_exact_copies_across_train_and_test_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = shapes_tree(tmp_path / "tree", per_class=6, layout="train/test")
    source = next((root / "train" / "circle").iterdir())
    (root / "test" / "circle" / f"copy{source.suffix}").write_bytes(source.read_bytes())
    with caplog.at_level(logging.WARNING, logger="cifar_cam.data"):
        splits = build_splits(DataSpec("folder", str(root), fit=Fit.of(16), val_size=0))
    assert splits.duplicates == [(f"train/circle/{source.name}", f"test/circle/copy{source.suffix}")]
    assert "1 test images are exact copies of training images" in caplog.text


def test_the_data_s_own_mean_and_std_normalize_it(tmp_path: Path) -> None:
    root = shapes_tree(tmp_path / "tree", per_class=6)
    splits = build_splits(DataSpec("folder", str(root), fit=Fit.of(16)))
    pixels = np.asarray(splits.train.images, np.float64).reshape(-1, 3) / 255
    assert np.allclose(splits.mean, pixels.mean(0), atol=1e-4) and np.allclose(splits.std, pixels.std(0), atol=1e-4)


def test_decoding_in_processes_gives_the_pixels_of_one_process(tmp_path: Path) -> None:
    root = shapes_tree(tmp_path / "tree", per_class=12)
    listing = list_folder(str(root))
    entries = [(row, i.name, str(listing.path_of(i.name))) for row, i in enumerate(listing.items)]
    fit = Fit.of([20, 28], "crop")
    one = decode_split(tmp_path / "one.npy", (len(entries), 20, 28, 3), fit, iter(entries), workers=1)
    two = decode_split(tmp_path / "two.npy", (len(entries), 20, 28, 3), fit, iter(entries), workers=2,
                       in_process_below=0)
    assert one.ok.all() and np.array_equal(one.hashes, two.hashes)
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))


def test_cifar100_comes_through_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tv

    class FakeCifar100:  # torchvision checks its archive's md5: the class is faked, not the files
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 500 if train else 100
            self.data = np.random.default_rng(int(train)).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 100 for i in range(n)]
            self.classes = [f"c{i}" for i in range(100)]

    monkeypatch.setattr(tv, "CIFAR100", FakeCifar100)
    splits = build_splits(DataSpec("cifar100", "data", val_size=100))
    assert splits.num_classes == 100 and len(splits.val) == 100 and len(splits.test) == 100
    assert splits.mean == (0.5071, 0.4865, 0.4409)  # its published constants, as CIFAR-10 keeps its own


def test_a_confusion_matrix_of_100_classes_stays_readable(tmp_path: Path) -> None:
    from PIL import Image

    from cifar_cam import viz

    rng = np.random.default_rng(0)
    path = viz.plot_confusion_matrix(rng.integers(0, 9, (100, 100)), [f"class{i}" for i in range(100)],
                                     tmp_path / "cm.png")
    width, height = Image.open(path).size
    assert 1500 <= width <= 2400 and height <= 2400


# -- a data set that is not CIFAR, through every command -------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run on 3 classes of non-square RGBA / grayscale / JPEG / WebP images, letterboxed to 64 px."""
    from cifar_cam.tasks.train import train

    base = tmp_path_factory.mktemp("shapes")
    root = shapes_tree(base / "tree", per_class=30)
    run = base / "run"
    train(compose_cfg("train", ["data=folder", f"data.root={root}", "data.image_size=64", "data.resize=pad",
                                "model.width=8", "trainer.epochs=3", "data.batch_size=16", "aug=crop_flip",
                                "scheduler=onecycle", "optimizer.lr=0.1"], run_dir=run))
    return run


def test_own_images_train_eval_predict_export_and_serve_agree_on_every_test_image(
        shapes_run: Path, tmp_path: Path) -> None:
    import cv2
    import httpx

    from cifar_cam import Predictor
    from cifar_cam.serve.app import create_app
    from cifar_cam.serve.server import running
    from cifar_cam.serve.settings import Settings
    from cifar_cam.tasks.eval import eval_
    from cifar_cam.tasks.export import export
    from cifar_cam.tasks.predict import predict_images

    summary = json.loads((shapes_run / "summary.json").read_text())
    accuracy = eval_(compose_cfg("eval", [f"ckpt={shapes_run}"], run_dir=tmp_path / "eval"))
    assert accuracy == summary["test_acc"] and summary["eval_precision"] == "fp32"  # one precision, one number
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["precision"] == "fp32" and metrics["n"] == 9
    with open(shapes_run / "split.csv", newline="") as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    root = Path(json.loads(json.dumps(torch.load(shapes_run / "checkpoints" / "best.pt",
                                                 weights_only=True)["data"]))["root"])

    predict_images(compose_cfg("predict", [f"ckpt={shapes_run}", "predict.split=test"], run_dir=tmp_path / "pred"))
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert predicted["accuracy"] == pytest.approx(accuracy, abs=1e-4) and predicted["images"] == len(test_rows)
    by_path = {p["path"]: p["classes"][0] for p in predicted["predictions"]}

    export(compose_cfg("export", [f"ckpt={shapes_run}", "export.formats=[onnx]"], run_dir=tmp_path / "export"))
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert card["resize"]["policy"] == "pad" and card["image_size"] == 64 and card["num_classes"] == 3
    onnx = Predictor.load(tmp_path / "export" / "model.onnx")
    files = [root / r["path"] for r in test_rows]
    assert [t.label for t in onnx(files)] == [by_path[r["path"]] for r in test_rows]

    with running(create_app(Predictor.load(shapes_run), Settings(max_wait_ms=0)), log_level="warning") as (url, _):
        model = httpx.get(f"{url}/v1/model").json()
        answers = [httpx.post(f"{url}/v1/predict", files={"file": (p.name, p.read_bytes())}).json()["classes"][0]
                   for p in files]
    assert model["input_size"] == [64, 64] and model["num_classes"] == 3 and model["resize"]["policy"] == "pad"
    assert answers == [by_path[r["path"]] for r in test_rows]
    assert cv2 is not None


def test_a_run_keeps_its_data_root_absolute_and_a_moved_root_is_named(shapes_run: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from cifar_cam.cli.main import main

    stored = torch.load(shapes_run / "checkpoints" / "best.pt", weights_only=True)
    assert Path(stored["config"]["data"]["root"]).is_absolute()
    assert stored["data"]["fit"] == {"size": [64, 64], "policy": "pad", "fill": [114, 114, 114]}
    moved = tmp_path / "moved"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(shapes_run, moved)
    original = Path(stored["data"]["root"])
    original.rename(original.with_name("gone"))
    try:
        with pytest.raises(SystemExit) as e:
            main(["eval", f"ckpt={moved}", f"hydra.run.dir={tmp_path / 'ev'}"])
        assert e.value.code == 2
        assert "(from the checkpoint" in capsys.readouterr().err
        main(["eval", f"ckpt={moved}", f"data.root={original.with_name('gone')}", f"hydra.run.dir={tmp_path / 'ev2'}"])
        assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["n"] == 9
    finally:
        original.with_name("gone").rename(original)


def test_a_synthetic_run_is_evaluated_on_the_data_it_was_seeded_with(tmp_path: Path) -> None:
    from cifar_cam.tasks.eval import eval_
    from cifar_cam.tasks.train import train

    train(compose_cfg("train", [*TINY, "seed=7", "trainer.epochs=1"], run_dir=tmp_path / "run"))
    tested = json.loads((tmp_path / "run" / "summary.json").read_text())["test_acc"]
    assert eval_(compose_cfg("eval", [f"ckpt={tmp_path / 'run'}"], run_dir=tmp_path / "eval")) == tested


def test_the_data_command_looks_before_training(tmp_path: Path) -> None:
    from cifar_cam.tasks.data import inspect_data

    root = shapes_tree(tmp_path / "tree", per_class=10)
    corrupt(sorted((root / "square").iterdir())[0])  # square000.jpg
    inspect_data(compose_cfg("data", ["data=folder", f"data.root={root}", "data.image_size=[24,32]",
                                      "data.resize=pad", "look.augmented=8"], run_dir=tmp_path / "look"))
    out = tmp_path / "look"
    report = json.loads((out / "data.json").read_text())
    assert report["classes"]["circle"]["train"] + report["classes"]["circle"]["val"] + \
        report["classes"]["circle"]["test"] == 10
    assert report["unreadable"] == 1 and report["formats"] == {"JPEG": 8, "PNG": 15, "WEBP": 6}
    sizes = [Image.open(p).size for p in root.rglob("*") if p.is_file() and p.name != "square000.jpg"]
    assert report["sizes"]["height"]["min"] == min(h for _, h in sizes)
    median = np.median([h for _, h in sizes]), np.median([w for w, _ in sizes])
    suggested = report["suggested_image_size"]  # the median rounded up to a multiple of 8 (square if near it)
    assert all(s % 8 == 0 for s in np.atleast_1d(suggested))
    assert abs(np.mean(suggested) - np.mean(median)) <= 12, (suggested, median)
    assert report["image_size"] == [24, 32] and len(report["mean"]) == 3
    for name in ("samples.png", "augmented.png", "split.csv", "bad_images.txt"):
        assert (out / name).stat().st_size > 100, name


def test_a_non_square_set_of_own_images_through_lr_find_the_budget_gradcam_and_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cam.cli.main import main
    from cifar_cam.tasks.gradcam import gradcam
    from cifar_cam.tasks.lr_find import lr_find
    from cifar_cam.tasks.report import report
    from cifar_cam.tasks.train import train
    from cifar_cam.training.budget import planner

    root = shapes_tree(tmp_path / "tree", per_class=20)
    data = ["data=folder", f"data.root={root}", "data.image_size=[24,40]", "data.resize=crop", "model.width=8",
            "data.batch_size=16"]
    lr_find(compose_cfg("lr-find", [*data, "lr_find.num_iter=10"], run_dir=tmp_path / "lr"))
    assert json.loads((tmp_path / "lr" / "lr_find.json").read_text())["steps"] == 10

    monkeypatch.setattr(planner, "RESERVE_MIN_SECONDS", 3.0)  # a short budget for a test (the default is 10 s)
    run = tmp_path / "run"
    train(compose_cfg("train", [*data, "trainer.time_budget=8s"], run_dir=run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_budget_seconds"] == 8 and summary["planned_epochs"] >= 1

    gradcam(compose_cfg("gradcam", [f"ckpt={run}", "gradcam.num_images=2", "gradcam.target_layers=[layer4]",
                                  "gradcam.select=correct"],
                        run_dir=tmp_path / "cam"))
    height, width = np.asarray(Image.open(tmp_path / "cam" / "gradcam" / "000_layer4.png")).shape[:2]
    assert width > height  # the 24x40 images keep their shape in the overlays

    monkeypatch.chdir(tmp_path)
    main(["train", *data, "trainer.epochs=1", "hydra.run.dir=cli"])  # in process, as the CLI writes it (.hydra/)
    with open(report([tmp_path / "cli"]) / "report.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    tested = json.loads((tmp_path / "cli" / "summary.json").read_text())["test_acc"]
    assert row["status"] == "done" and float(row["test_acc"]) == pytest.approx(tested)


def test_a_cam_layer_under_2x2_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from cifar_cam.models import build_model
    from cifar_cam.tasks.gradcam import warn_small_layers

    model = build_model("resnet18", num_classes=3, width=8).eval()
    with caplog.at_level(logging.WARNING, logger="cifar_cam"):
        warn_small_layers(model, torch.zeros(1, 3, 16, 16), ["layer3"])
        assert not caplog.records  # 4x4
        warn_small_layers(model, torch.zeros(1, 3, 8, 8), ["layer4"])
    assert "layer4 is 1x1 at 8x8 images" in caplog.text


@pytest.mark.slow
def test_8_pixel_digits_train_to_90_percent_in_2_minutes_with_only_the_size_given(tmp_path: Path) -> None:
    """Issue 28's first user: 1,800 8x8 grayscale digits in bare class folders, no split, no tuning."""
    root = digits_tree(tmp_path / "digits")
    done = run_cli("train", "data=folder", f"data.root={root}", "data.image_size=16", "aug=none",
                   "trainer.time_budget=2min", "hydra.run.dir=run", cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_acc"] >= 0.90, summary
    evaluated = run_cli("eval", "ckpt=run", "hydra.run.dir=eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["accuracy"] == summary["test_acc"] and metrics["n"] == 180  # the same split, the same number
