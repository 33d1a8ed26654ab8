"""Files written before the package layout moved (tests/fixtures/legacy, made by commit 00e341a) still work with
every command: the run dir (its config stores `_target_: cifar_cam.optim.Muon`) evaluates, explains, predicts,
exports, serves and resumes; its model.onnx predicts and serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, compose_cfg, run_cli

LEGACY = REPO / "tests" / "fixtures" / "legacy"
TEST_ACC = 0.8203125  # the run's own summary.json: 210 of 256 synthetic test images


@pytest.fixture()
def legacy_run(tmp_path: Path) -> Path:
    """A copy of the old run dir (commands write into a resumed run's dir; the fixture stays as committed)."""
    run = tmp_path / "legacy_run"
    shutil.copytree(LEGACY / "run", run, symlinks=True)
    return run


def test_the_fixtures_are_what_the_old_code_wrote() -> None:
    stored = (LEGACY / "run" / ".hydra" / "config.yaml").read_text()
    assert "_target_: cifar_cam.optim.Muon" in stored  # the name a migration must translate
    assert json.loads((LEGACY / "run" / "summary.json").read_text())["test_acc"] == TEST_ACC


def test_an_old_checkpoint_loads_with_todays_names(legacy_run: Path) -> None:
    from cifar_cam import load_model
    from cifar_cam.training.checkpoint import load_checkpoint

    payload = load_checkpoint(legacy_run)
    assert payload["config"]["optimizer"]["_target_"] == "cifar_cam.training.optim.Muon"
    model = load_model(legacy_run)
    assert model.classes == [f"class{i}" for i in range(10)]


def test_eval_and_gradcam_of_an_old_run(legacy_run: Path, tmp_path: Path) -> None:
    from cifar_cam.tasks.eval import eval_
    from cifar_cam.tasks.gradcam import gradcam

    accuracy = eval_(compose_cfg("eval", [f"ckpt={legacy_run}", "trainer.precision=fp32"], run_dir=tmp_path / "eval"))
    assert accuracy == pytest.approx(TEST_ACC, abs=0.02)  # the old run tested at its machine's precision (bf16)
    gradcam(compose_cfg("gradcam", [f"ckpt={legacy_run}", "gradcam.num_images=2"], run_dir=tmp_path / "cam"))
    assert (tmp_path / "cam" / "gradcam_grid.png").is_file()


def test_predict_export_and_serve_an_old_run_and_its_old_onnx(legacy_run: Path, tmp_path: Path) -> None:
    from cifar_cam import Predictor
    from cifar_cam.data.sources import make_synthetic
    from cifar_cam.serve.app import create_app
    from cifar_cam.serve.server import running
    from cifar_cam.serve.settings import Settings
    from cifar_cam.tasks.export import export

    _, test, _ = make_synthetic(10, 640, 256, 32, 42)
    images = test.images[:16]
    from_pt = Predictor.load(legacy_run).logits(images)
    from_old_onnx = Predictor.load(LEGACY / "export" / "model.onnx").logits(images)
    np.testing.assert_allclose(from_old_onnx, from_pt, atol=1e-4)
    report = export(compose_cfg("export", [f"ckpt={legacy_run}", "export.formats=[onnx]", "export.check_images=64"],
                                run_dir=tmp_path / "export"))
    assert report["checks"]["onnx"]["max_abs_diff"] <= 1e-4
    new_onnx = Predictor.load(tmp_path / "export" / "model.onnx").logits(images)
    np.testing.assert_allclose(new_onnx, from_old_onnx, atol=1e-4)
    predictor = Predictor.load(LEGACY / "export" / "model.onnx")
    with running(create_app(predictor, Settings(max_wait_ms=0)), log_level="warning") as (url, _):
        import cv2

        ok, png = cv2.imencode(".png", images[0][..., ::-1])
        answer = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", png.tobytes(), "image/png")}).json()
    assert answer["classes"][0] == predictor.classes[int(from_old_onnx[0].argmax())]


def test_the_cli_predicts_with_an_old_run_and_resumes_it(legacy_run: Path, tmp_path: Path) -> None:
    import cv2

    from cifar_cam.data.sources import make_synthetic

    _, test, _ = make_synthetic(10, 640, 256, 32, 42)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(4):
        cv2.imwrite(str(inputs / f"{i}.png"), test.images[i][..., ::-1])
    done = run_cli("predict", f"ckpt={legacy_run}", f"inputs={inputs}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    resumed = run_cli("train", f"ckpt={legacy_run}", "trainer.epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((legacy_run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and "resuming" in (legacy_run / "train.log").read_text()
