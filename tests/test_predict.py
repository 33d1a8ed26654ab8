"""`cifar-cam predict` and `Predictor`: the user's own images, any kind, and what comes out."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cifar_cam import Predictor, load_model
from cifar_cam.cli.main import main
from cifar_cam.data.batches import Normalizer
from cifar_cam.data.sources import DataSpec, build_splits
from cifar_cam.errors import CheckpointError, ConfigError, DataError
from cifar_cam.explain.cam import GradCAM
from cifar_cam.inference.inputs import find_inputs
from cifar_cam.tasks.predict import SomeInputsFailed, predict_images
from conftest import compose_cfg


@pytest.fixture(scope="module")
def test_images(trained_run: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The trained run's own synthetic test images (uint8 NHWC), labels and class names."""
    payload = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    d = payload["config"]["data"]
    splits = build_splits(DataSpec("synthetic", None, val_size=d["val_size"], subset=None,
                                   seed=payload["config"]["seed"], num_classes=d["num_classes"],
                                   train_size=d["train_size"], test_size=d["test_size"]))
    return splits.test.images, splits.test.labels, list(splits.classes)


def _folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], n: int) -> Path:
    for i in range(n):
        folder = root / classes[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(images[i], cv2.COLOR_RGB2BGR))
    return root


def test_predictor_matches_the_model_and_its_gradcam(trained_run: Path, test_images: tuple) -> None:
    images, _, classes = test_images
    predictor = Predictor.load(trained_run)
    model = load_model(trained_run)
    assert model.classes == classes == predictor.classes  # load_model hands back the class names
    x = Normalizer(torch.device("cpu"), model.mean, model.std)(torch.from_numpy(images))  # the data's own
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(predictor.logits(images) - expected).max() < 1e-5
    results = predictor(images[:5], topk=3)
    assert [r.label for r in results] == [classes[i] for i in expected[:5].argmax(1)]
    softmax = torch.softmax(torch.from_numpy(expected[:5]).double(), dim=1).numpy()
    for r, p in zip(results, softmax, strict=True):
        assert len(r.classes) == 3 and r.probabilities == sorted(r.probabilities, reverse=True)
        assert np.allclose(r.probabilities, np.sort(p)[::-1][:3], atol=1e-6)
    with GradCAM(model, ["layer3"]) as cam:
        reference = cam(x[:4])["layer3"].numpy()
    assert np.abs(predictor.cam(images[:4], layer="layer3") - reference).max() < 1e-6


def test_predictor_takes_any_size_and_paths(trained_run: Path, test_images: tuple, tmp_path: Path) -> None:
    images, _, _ = test_images
    predictor = Predictor.load(trained_run, batch_size=3)
    big = cv2.resize(images[0], (96, 64), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(tmp_path / "big.png"), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    from_array = predictor.logits([big])
    from_path = predictor.logits([tmp_path / "big.png"])
    assert from_array.shape == (1, 10) and np.array_equal(from_array, from_path)
    assert predictor.logits(np.stack([big, big])).shape == (2, 10)
    with pytest.raises(ValueError, match="uint8 RGB"):
        predictor(np.zeros((2, 32, 32), np.float32))


def test_predict_command_writes_csv_json_and_accuracy(trained_run: Path, test_images: tuple, tmp_path: Path) -> None:
    images, labels, classes = test_images
    root = _folder(tmp_path / "imgs", images, labels, classes, 24)
    (root / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    cfg = compose_cfg("predict", [f"ckpt={trained_run}", f"inputs={root}", "predict.batch_size=10"],
                      run_dir=tmp_path / "run")
    accuracy = predict_images(cfg)
    out = tmp_path / "run"
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert {"top1", "p1", "top3", "p3", "true", "correct"} <= set(rows[0]) and all(r["status"] == "ok" for r in rows)
    predictor = Predictor.load(trained_run)
    order = [int(Path(r["path"]).stem) for r in rows]
    expected = predictor(images[order], topk=1)
    assert [r["top1"] for r in rows] == [e.label for e in expected]
    truth = [classes[labels[i]] for i in order]
    assert accuracy == pytest.approx(np.mean([t == e.label for t, e in zip(truth, expected, strict=True)]))
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["images"] == 24 and summary["failed"] == 0 and summary["judged"] == 24
    assert summary["accuracy"] == round(accuracy, 4) and set(summary["per_class_accuracy"]) <= set(classes)


def test_an_unreadable_image_is_named_and_the_rest_predicted(trained_run: Path, test_images: tuple,
                                                            tmp_path: Path) -> None:
    images, labels, classes = test_images
    root = _folder(tmp_path / "imgs", images, labels, classes, 5)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = compose_cfg("predict", [f"ckpt={trained_run}", f"inputs={root}"], run_dir=tmp_path / "run")
    with pytest.raises(SomeInputsFailed, match=r"1 of 6 inputs could not be read \(first: .*broken.jpg") as e:
        predict_images(cfg)
    assert e.value.exit_code == 1
    with (tmp_path / "run" / "predictions.csv").open() as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["broken.jpg"]["status"].startswith("error: cannot decode image") and rows["broken.jpg"]["top1"] == ""
    assert sum(r["status"] == "ok" for r in rows.values()) == 5


def test_cam_overlays_and_contact_sheet(trained_run: Path, test_images: tuple, tmp_path: Path) -> None:
    images, labels, classes = test_images
    root = _folder(tmp_path / "imgs", images, labels, classes, 6)
    cfg = compose_cfg("predict", [f"ckpt={trained_run}", f"inputs={root}", "predict.cam=true",
                                  "predict.contact_sheet=4", "predict.layer=layer3"], run_dir=tmp_path / "run")
    predict_images(cfg)
    out = tmp_path / "run"
    assert len(list((out / "cam").glob("*.png"))) == 6
    assert cv2.imread(str(out / "contact_sheet.png")) is not None
    with (out / "predictions.csv").open() as f:
        assert all((out / r["cam"]).is_file() for r in csv.DictReader(f))


def test_inputs_lists_globs_archives_and_odd_names(tmp_path: Path, test_images: tuple) -> None:
    images, labels, classes = test_images
    root = _folder(tmp_path / "a, b=c", images, labels, classes, 4)
    with tarfile.open(tmp_path / "more.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="set")
    found = find_inputs([str(root), str(tmp_path / "more.tar.gz")])
    assert len(found) == 8 and found[4].path.startswith(str(tmp_path / "more.tar.gz") + ":set/")
    assert found[4].folder in classes and len(found[4].read()) > 0
    assert len(find_inputs(str(root / "*" / "*.png"))) == 4
    with pytest.raises(DataError, match="does not exist") as e:
        find_inputs(str(tmp_path / "nope"))
    assert e.value.exit_code == 2
    (tmp_path / "empty" / ".ipynb_checkpoints").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "empty" / ".ipynb_checkpoints" / "x.png"), images[0])  # hidden: skipped
    (tmp_path / "empty" / "._y.jpg").write_bytes(b"AppleDouble")
    with pytest.raises(DataError, match="no image found"):
        find_inputs(str(tmp_path / "empty"))
    (tmp_path / "cut.tar.gz").write_bytes((tmp_path / "more.tar.gz").read_bytes()[:200])
    with pytest.raises(DataError, match="is not a readable .tar.gz"):
        find_inputs(str(tmp_path / "cut.tar.gz"))


@pytest.mark.parametrize("args, needle", [
    (["inputs=/does/not/exist"], "inputs=/does/not/exist does not exist"),
    (["ckpt=model.tflite", "inputs=."], "unknown model format '.tflite'"),
    (["predict.topk=0", "inputs=."], "predict.topk must be an integer >= 1"),
    (["ckpt=foreign.onnx", "inputs=."], "was not exported by cifar-cam"),
    (["inputs=empty"], "no image found"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, trained_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    Path("model.tflite").write_bytes(b"x")
    Path("empty").mkdir()
    _foreign_onnx(Path("foreign.onnx"))
    ckpt = [] if any(a.startswith("ckpt=") for a in args) else [f"ckpt={trained_run}"]
    with pytest.raises(SystemExit) as e:
        main(["predict", *ckpt, *args, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def _foreign_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))


def test_a_foreign_or_truncated_model_is_refused(tmp_path: Path, trained_run: Path) -> None:
    _foreign_onnx(tmp_path / "foreign.onnx")
    with pytest.raises(CheckpointError, match="was not exported by cifar-cam"):
        Predictor.load(tmp_path / "foreign.onnx")
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "foreign.onnx").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="not a readable ONNX file"):
        Predictor.load(tmp_path / "cut.onnx")
    (tmp_path / "cut.pt2").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="not a readable torch.export file"):
        Predictor.load(tmp_path / "cut.pt2")
    blob = (trained_run / "checkpoints" / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError):
        Predictor.load(tmp_path / "cut.pt")


def test_cam_layer_other_than_layer4_is_refused_for_exported_models() -> None:
    class Fake:
        layers = ("layer4",)

    predictor = Predictor(Fake(), ["a", "b"], 32, np.zeros((2, 4)), "m.onnx", "onnx")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gives CAM at layer4 only"):
        predictor.cam(np.zeros((1, 32, 32, 3), np.uint8), layer="layer3")


def test_quoted_paths_with_commas_spaces_and_equals_through_the_cli(trained_run: Path, test_images: tuple,
                                                                     tmp_path: Path) -> None:
    """What the README shows: inputs='[x,"a, b=c d/"]' (Hydra quoting inside the value)."""
    images, labels, classes = test_images
    odd = _folder(tmp_path / "a, b=c d", images, labels, classes, 3)
    one = _folder(tmp_path / "plain", images, labels, classes, 2)
    main(["predict", f"ckpt={trained_run}", f'inputs=[{one},"{odd}"]', f"hydra.run.dir={tmp_path / 'run'}"])
    summary = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert summary["images"] == 5 and sum(str(odd) in p["path"] for p in summary["predictions"]) == 3
