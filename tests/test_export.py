"""`cifar-cam export`: ONNX / torch.export / int8 files match eager PyTorch, carry their card, keep nothing when a
check fails; read_card refuses what cifar-cam did not make. One small exported model is shared by the tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cifar_cam.data.arrays import CIFAR10_MEAN
from cifar_cam.data.batches import Normalizer
from cifar_cam.errors import CheckpointError, CifarCamError, DataError
from cifar_cam.inference import contract as deploy
from cifar_cam.inference.readers import (
    compare_logits,
    load_pt2,
    onnx_session,
    read_card,
    read_classifier,
    run_onnx,
    run_torch,
)
from cifar_cam.tasks import export as export_task
from cifar_cam.tasks.common import load_data
from cifar_cam.training.checkpoint import load_checkpoint, model_from_checkpoint, normalization_of
from conftest import compose_cfg

CHECK_IMAGES = 48  # of the tiny run's 64 synthetic test images


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the tiny run: model.onnx, model.pt2 and model.int8.onnx, checked on CHECK_IMAGES test images."""
    out = tmp_path_factory.mktemp("export")
    cfg = compose_cfg("export", [f"ckpt={trained_run}", "export.quantize=int8", "export.calibration_images=64",
                                 f"export.check_images={CHECK_IMAGES}"], run_dir=out)
    export_task.export(cfg)
    return out


@pytest.fixture(scope="module")
def test_set(trained_run: Path) -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
    """The checkpoint's own test images and labels, and its eager model (CPU, eval; .mean / .std its data's)."""
    payload = load_checkpoint(trained_run)
    splits = load_data(OmegaConf.create(payload["config"]), payload)
    model = model_from_checkpoint(payload).eval()
    model.mean, model.std = normalization_of(payload)  # the synthetic data's own, stored in the checkpoint
    return splits.test.images, splits.test.labels, model


def test_pt_onnx_and_pt2_give_the_same_top1_through_the_predictor(exported: Path, trained_run: Path,
                                                                   test_set: tuple) -> None:
    from cifar_cam import Predictor

    images, _, _ = test_set
    tops = {}
    for source in (trained_run, exported / "model.onnx", exported / "model.pt2"):
        predictor = Predictor.load(source)
        tops[predictor.kind] = [r.label for r in predictor(images, topk=1)]
        assert predictor.classes == read_card(exported / "model.onnx")["classes"]
    assert tops["torch"] == tops["onnx"] == tops["pt2"] and len(tops["torch"]) == len(images)
    onnx_cam = Predictor.load(exported / "model.onnx").cam(images[:6])
    torch_cam = Predictor.load(trained_run).cam(images[:6], layer="layer4")
    assert np.abs(onnx_cam - torch_cam).max() < 1e-4


def test_onnx_and_pt2_match_eager_pytorch_on_the_test_images(exported: Path, test_set: tuple) -> None:
    images, _, model = test_set
    eager, _ = run_torch(deploy.DeployedModel(model, model.mean, model.std).eval(), images)
    onnx_logits, _ = run_onnx(onnx_session(exported / "model.onnx"), images)
    pt2_logits, _ = run_torch(load_pt2(exported / "model.pt2"), images)
    for logits in (onnx_logits, pt2_logits):
        assert np.abs(logits - eager).max() <= 1e-4
        assert np.array_equal(logits.argmax(1), eager.argmax(1))
    report = json.loads((exported / "export.json").read_text())
    assert report["checked"] is True and report["check_images"] == CHECK_IMAGES
    for fmt in ("onnx", "pt2"):
        check = report["checks"][fmt]
        assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0 and check["images"] == CHECK_IMAGES
        assert check["seconds"] > 0 and report["files"][fmt]["sha256"] == _sha256(exported / f"model.{fmt}")
    assert not [p.name for p in exported.iterdir() if p.name.startswith(".") and p.name not in (".hydra", ".lock")]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_card_is_in_the_onnx_metadata_the_pt2_and_model_card_json(exported: Path, trained_run: Path,
                                                                     test_set: tuple) -> None:
    import onnx

    card = json.loads((exported / "model_card.json").read_text())
    assert read_card(exported / "model.onnx") == read_card(exported / "model.pt2") == card
    payload = load_checkpoint(trained_run)
    assert card["format_version"] == deploy.FORMAT_VERSION and card["classes"] == list(payload["classes"])
    assert card["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "color": "RGB",
                             "shape": [None, 32, 32, 3], "range": [0, 255]}
    assert [o["name"] for o in card["outputs"]] == list(deploy.OUTPUT_NAMES)
    assert card["outputs"][1]["shape"] == [None, 64, 4, 4]  # width 8: layer4 has 8 x 8 channels at 4 x 4
    model = test_set[2]
    assert card["mean"] == list(model.mean) and card["std"] == list(model.std) and card["image_size"] == 32
    assert card["mean"] != list(CIFAR10_MEAN)  # synthetic data: its own statistics, not CIFAR-10's
    assert card["source"]["sha256"] == _sha256(trained_run / "checkpoints" / "best.pt")
    assert card["test_accuracy"] == json.loads((trained_run / "summary.json").read_text())["test_acc"]
    assert card["opset"] == 18 and card["checked"] is True
    assert {"torch", "onnx", "onnxruntime", "cifar_cam"} <= set(card["versions"])
    fc = read_classifier(exported / "model.onnx")
    assert fc == read_classifier(exported / "model.pt2") == deploy.classifier_of(test_set[2])
    model = onnx.load(str(exported / "model.onnx"))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    assert {p.key for p in model.metadata_props} >= {deploy.CARD_KEY, deploy.FC_KEY}


def test_the_batch_is_dynamic(exported: Path, test_set: tuple) -> None:
    images = test_set[0]
    session, program = onnx_session(exported / "model.onnx"), load_pt2(exported / "model.pt2")
    for n in (1, 7):
        for logits, features in (run_onnx(session, images[:n]), run_torch(program, images[:n])):
            assert logits.shape == (n, 10) and features.shape == (n, 64, 4, 4)


def test_cam_from_onnx_features_and_the_card_equals_gradcam_at_layer4(exported: Path, test_set: tuple) -> None:
    from cifar_cam.explain.cam import GradCAM

    images, _, model = test_set
    logits, features = run_onnx(onnx_session(exported / "model.onnx"), images[:16])
    classes = logits.argmax(1)
    cam = deploy.cam_from_features(features, read_classifier(exported / "model.onnx")["weight"], classes, (32, 32))
    with GradCAM(model, ["layer4"]) as gradcam:
        x = Normalizer(torch.device("cpu"), model.mean, model.std)(torch.from_numpy(images[:16]))
        expected = gradcam(x, targets=classes)["layer4"]
    assert cam.shape == (16, 32, 32) and np.abs(cam - expected.numpy()).max() <= 1e-5


def test_int8_calibration_images_are_training_images(trained_run: Path, tmp_path: Path, test_set: tuple,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real = export_task.writers.quantize_int8

    def spy(onnx_path, out_path, calibration_images, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen["images"] = np.asarray(calibration_images).copy()
        return real(onnx_path, out_path, calibration_images, *args, **kwargs)

    monkeypatch.setattr(export_task.writers, "quantize_int8", spy)
    cfg = compose_cfg("export", [f"ckpt={trained_run}", "export.formats=[onnx]", "export.quantize=int8",
                                 "export.calibration_images=16", "export.check_images=8"], run_dir=tmp_path / "run")
    export_task.export(cfg)
    payload = load_checkpoint(trained_run)
    splits = load_data(OmegaConf.create(payload["config"]))
    train = {im.tobytes() for im in splits.train.images}
    test = {im.tobytes() for im in test_set[0]}
    assert len(seen["images"]) == 16
    assert all(im.tobytes() in train and im.tobytes() not in test for im in seen["images"])
    assert read_card(tmp_path / "run" / "model.int8.onnx")["checked"] is False  # int8 has no pass/fail check


def test_int8_is_calibrated_on_train_and_measured_beside_fp32(exported: Path, test_set: tuple) -> None:
    report = json.loads((exported / "export.json").read_text())
    q = report["quantize"]
    assert (exported / "model.int8.onnx").is_file() and report["files"]["int8"]["bytes"] > 0
    assert q["calibration_split"] == "train" and q["calibration_images"] == 64
    assert q["accuracy"]["images"] == CHECK_IMAGES and 0 <= q["accuracy"]["int8"] <= 1
    assert q["accuracy"]["onnx"] == q["accuracy"]["eager"] == report["eager_accuracy"]
    for name in ("torch", "onnx", "int8"):
        s = q["speed"][name]
        assert 0 < s["batch1_p50_ms"] <= s["batch1_p99_ms"] and s["batch256_images_per_second"] > 0
    card = read_card(exported / "model.int8.onnx")
    assert card["quantization"]["calibration_images"] == 64 and card["classes"] == read_card(exported / "model.onnx")[
        "classes"]
    logits, features = run_onnx(onnx_session(exported / "model.int8.onnx"), test_set[0][:3])
    assert logits.shape == (3, 10) and features.shape == (3, 64, 4, 4)


def test_top1_must_agree_even_within_tolerance() -> None:
    reference = np.array([[1.0, 1.00001], [2.0, 0.0]], np.float32)
    tie_broken = np.array([[1.00001, 1.0], [2.0, 0.0]], np.float32)
    found = compare_logits(reference, tie_broken)
    assert found["max_abs_diff"] < 1e-4 and found["top1_same"] == 1 and found["top1_agreement"] == 0.5


def test_a_failed_check_keeps_no_model_file(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """model.onnx passes, model.pt2 then fails: neither is kept, nor any temp file."""
    real = export_task.file_logits
    monkeypatch.setattr(export_task, "file_logits",
                        lambda path, images, bs: real(path, images, bs) + (1e-3 if path.suffix == ".pt2" else 0))
    cfg = compose_cfg("export", [f"ckpt={trained_run}", "export.check_images=8"], run_dir=tmp_path / "run")
    with pytest.raises(CifarCamError) as e:
        export_task.export(cfg)
    message = str(e.value)
    assert e.value.exit_code == 1 and "model.pt2 failed its check" in message and "0.001" in message
    assert "8/8" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def _unreachable(tmp_path: Path) -> list[str]:
    return ["data=folder", f"data.root={tmp_path / 'no-such-data'}", "export.formats=[pt2]"]


def test_unreachable_data_is_one_line_and_exit_2_unless_check_is_off(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_cfg("export", [f"ckpt={trained_run}", *_unreachable(tmp_path)], run_dir=tmp_path / "checked")
    with pytest.raises(DataError) as e:
        export_task.export(cfg)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert "cannot check" in str(e.value) and str(e.value).endswith("export.check=false exports unchecked")
    assert list((tmp_path / "checked").iterdir()) == []

    out = tmp_path / "unchecked"
    cfg = compose_cfg("export", [f"ckpt={trained_run}", *_unreachable(tmp_path), "export.check=false"], run_dir=out)
    report = export_task.export(cfg)
    assert report["checked"] is False and report["checks"] == {} and report["check_images"] is None
    assert json.loads((out / "export.json").read_text())["checked"] is False
    assert json.loads((out / "model_card.json").read_text())["checked"] is False
    assert read_card(out / "model.pt2")["checked"] is False and not (out / "model.onnx").exists()


def test_read_card_refuses_foreign_truncated_and_unknown_files(exported: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    for name, blob in (("cut.onnx", (exported / "model.onnx").read_bytes()),
                       ("cut.pt2", (exported / "model.pt2").read_bytes())):
        (tmp_path / name).write_bytes(blob[: len(blob) // 2])
    (tmp_path / "model.tflite").write_bytes(b"x")
    for name, needle in (("foreign.onnx", "was not exported by cifar-cam"), ("cut.onnx", "not a readable ONNX file"),
                         ("cut.pt2", "not a readable torch.export file"), ("model.tflite", "unknown model format"),
                         ("missing.onnx", "does not exist")):
        with pytest.raises(CheckpointError, match=needle) as e:
            read_card(tmp_path / name)
        assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_export_through_the_cli(trained_run: Path, tmp_path: Path) -> None:
    from cifar_cam.cli.main import main

    out = tmp_path / "run"
    main(["export", f"ckpt={trained_run}", "export.formats=[pt2]", "export.check_images=16", f"hydra.run.dir={out}"])
    log_text = (out / "export.log").read_text()  # Hydra's logging replaced caplog's handler
    assert f"wrote {out / 'model.pt2'}" in log_text and "torch.export vs eager on 16 test images" in log_text
    assert f"wrote {out / 'export.json'}" in log_text and f"wrote {out / 'model_card.json'}" in log_text
    assert "exported " in log_text and "checked against eager PyTorch on 16 test images" in log_text
    assert "onnxscript" not in log_text and "Removed" not in log_text  # the converters' INFO lines stay out
    assert json.loads((out / "export.json").read_text())["checks"]["pt2"]["top1_agreement"] == 1.0
