"""Calibration: ECE / NLL / temperature scaling (calibration.py), `eval.calibrate`, and the temperature applied by
predict, serve and export through the one Predictor."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_cam import Predictor
from cifar_cam.cli.main import main
from cifar_cam.data.sources import DataSpec, build_splits
from cifar_cam.errors import ConfigError
from cifar_cam.explain import calibration as cal
from conftest import compose_cfg


def probs_to_logits(probs: list[list[float]]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64))


def test_ece_nll_and_reliability_equal_a_hand_computation() -> None:
    # top-label confidences 0.9 (right), 0.9 (wrong), 0.5 (right), 0.95, 0.95 (right) in bins 13, 13, 7, 14, 14 of 15
    logits = probs_to_logits([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.025, 0.95, 0.025],
                              [0.025, 0.025, 0.95]])
    labels = [0, 1, 0, 1, 2]
    hand = 2 / 5 * abs(0.5 - 0.9) + 1 / 5 * abs(1.0 - 0.5) + 2 / 5 * abs(1.0 - 0.95)  # = 0.28
    assert cal.expected_calibration_error(logits, labels) == pytest.approx(hand, abs=1e-12)
    r = cal.reliability(logits, labels)
    assert len(r.count) == 15 and r.bin_edges[0] == 0 and r.bin_edges[-1] == 1
    assert {i: c for i, c in enumerate(r.count) if c} == {7: 1, 13: 2, 14: 2}
    assert r.accuracy[13] == 0.5 and r.confidence[13] == pytest.approx(0.9) and r.accuracy[7] == 1.0
    assert r.accuracy[0] is None and r.confidence[0] is None
    hand_nll = -np.mean(np.log([0.9, 0.05, 0.5, 0.95, 0.95]))
    assert cal.nll(logits, labels) == pytest.approx(hand_nll, abs=1e-12)
    # T = 2 flattens every row: 0.9 / 0.05 / 0.05 -> sqrt(.9) / (sqrt(.9) + 2 sqrt(.05)), and so on
    flat = np.sqrt([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])
    flat /= flat.sum(1, keepdims=True)
    assert np.allclose(cal.softmax(logits[[0, 2]], 2.0), flat, atol=1e-12)


def test_fit_temperature_recovers_a_known_temperature_and_lowers_nll() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 3, (3000, 10))  # calibrated by construction: labels drawn from softmax(clean)
    labels = (cal.softmax(clean).cumsum(1) > rng.random((3000, 1))).argmax(1)
    for t_true in (0.5, 2.5):  # under- and over-confident
        logits = clean * t_true
        t = cal.fit_temperature(logits, labels)
        assert t == pytest.approx(t_true, rel=0.04)
        assert cal.nll(logits, labels, t) < cal.nll(logits, labels) - 0.05
        assert cal.nll(logits, labels, t) <= min(cal.nll(logits, labels, t * 1.02), cal.nll(logits, labels, t / 1.02))
        assert cal.expected_calibration_error(logits, labels, t) < 0.5 * cal.expected_calibration_error(logits, labels)


@pytest.fixture(scope="module")
def splits(trained_run: Path):
    """The tiny run's own splits (synthetic: val 32, test 64 images)."""
    c = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)["config"]
    d = c["data"]
    return build_splits(DataSpec("synthetic", None, val_size=d["val_size"], subset=None, seed=c["seed"],
                        num_classes=d["num_classes"], train_size=d["train_size"], test_size=d["test_size"]))


def eval_logits(trained_run: Path, arrays) -> np.ndarray:
    """The logits `eval ... trainer.precision=fp32` computes for a split (its model and eval.batch_size, CPU)."""
    from cifar_cam.data.batches import EvalBatches
    from cifar_cam.tasks.common import checkpoint_model
    from cifar_cam.training.checkpoint import load_checkpoint, normalization_of
    from cifar_cam.training.engine import collect_logits

    payload = load_checkpoint(trained_run)
    cpu = torch.device("cpu")
    mean, std = normalization_of(payload)  # the data's own statistics
    batches = EvalBatches(arrays, payload["config"]["eval"]["batch_size"], cpu, mean, std)
    return collect_logits(checkpoint_model(payload, cpu), batches, device=cpu).logits.numpy()


@pytest.fixture(scope="module")
def calibrated(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An eval run dir of the tiny run with eval.calibrate=true."""
    from cifar_cam.tasks.eval import eval_

    out = tmp_path_factory.mktemp("calibrated")
    eval_(compose_cfg("eval", [f"ckpt={trained_run}", "eval.calibrate=true", "trainer.device=cpu",
                               "trainer.precision=fp32"], run_dir=out))
    return out


def test_eval_calibrate_fits_on_val_and_writes_calibration_json(calibrated: Path, trained_run: Path,
                                                                splits) -> None:
    fitted = json.loads((calibrated / "calibration.json").read_text())
    metrics = json.loads((calibrated / "metrics.json").read_text())
    t = fitted["temperature"]
    assert fitted["fitted_on"] == {"split": "val", "size": 32, "seed": 42, "data": "synthetic", "tta": False}
    assert fitted["ece_bins"] == 15 and fitted["classes"] == splits.classes
    best = trained_run / "checkpoints" / "best.pt"
    assert fitted["checkpoint"]["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    val_logits, test_logits = eval_logits(trained_run, splits.val), eval_logits(trained_run, splits.test)
    assert t == pytest.approx(cal.fit_temperature(val_logits, splits.val.labels), rel=1e-3)  # val, not test
    assert abs(t - cal.fit_temperature(test_logits, splits.test.labels)) > 1e-3
    for split, logits, labels in (("val", val_logits, splits.val.labels), ("test", test_logits, splits.test.labels)):
        s = fitted[split]
        assert s["n"] == len(labels)
        assert s["ece_before"] == pytest.approx(cal.expected_calibration_error(logits, labels), abs=1e-5)
        assert s["ece_after"] == pytest.approx(cal.expected_calibration_error(logits, labels, t), abs=1e-5)
        assert s["nll_before"] == pytest.approx(cal.nll(logits, labels), abs=1e-5)
        assert s["nll_after"] == pytest.approx(cal.nll(logits, labels, t), abs=1e-5)
    assert fitted["val"]["nll_after"] < fitted["val"]["nll_before"]  # the fit lowers the NLL it minimizes
    assert metrics["temperature"] == t and metrics["ece"] == fitted["test"]["ece_before"]
    assert metrics["ece_calibrated"] == fitted["test"]["ece_after"]
    assert metrics["nll"] == fitted["test"]["nll_before"] and metrics["nll_calibrated"] == fitted["test"]["nll_after"]
    assert metrics["nll"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert sum(metrics["reliability_calibrated"]["count"]) == 64
    assert (calibrated / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reports_ece_and_reliability_without_calibrate(trained_run: Path, tmp_path: Path, splits) -> None:
    from cifar_cam.tasks.eval import eval_

    eval_(compose_cfg("eval", [f"ckpt={trained_run}", "trainer.device=cpu", "trainer.precision=fp32"],
                      run_dir=tmp_path / "run"))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    logits = eval_logits(trained_run, splits.test)
    assert metrics["ece"] == pytest.approx(cal.expected_calibration_error(logits, splits.test.labels), abs=1e-5)
    assert metrics["ece_bins"] == 15 and sum(metrics["reliability"]["count"]) == 64
    assert "temperature" not in metrics and not (tmp_path / "run" / "calibration.json").exists()
    assert (tmp_path / "run" / "reliability.png").stat().st_size > 1000


@pytest.mark.parametrize(("override", "words"), [
    ("data.val_size=0", "data.val_size=0"),   # refused by the config check, before any model or data loads
    ("data.val_size=64", "data.val_size=64 differs from the run's data.val_size=32"),  # another split
])
def test_calibrate_without_the_runs_val_split_is_one_line_exit_2(trained_run: Path, tmp_path: Path, override: str,
                                                                  words: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", f"ckpt={trained_run}", "eval.calibrate=true", override, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "calibration.json").exists()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def test_predict_with_calibration_reports_softmax_of_logits_over_t(calibrated: Path, trained_run: Path,
                                                                    tmp_path: Path, splits) -> None:
    from cifar_cam.tasks.predict import predict_images

    t = json.loads((calibrated / "calibration.json").read_text())["temperature"]
    images = splits.test.images[:6]
    for i, image in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(image))
    cfg = compose_cfg("predict", [f"ckpt={trained_run}", f"inputs={tmp_path}", f"predict.calibration={calibrated}",
                                  "trainer.device=cpu", "trainer.precision=fp32"], run_dir=tmp_path / "run")
    predict_images(cfg)
    written = json.loads((tmp_path / "run" / "predictions.json").read_text())
    logits = Predictor.load(trained_run).logits(images)
    expected = cal.softmax(logits, t)
    assert written["temperature"] == t and written["calibration"] == str((calibrated / "calibration.json").resolve())
    for row, p in zip(sorted(written["predictions"], key=lambda r: r["path"]), expected, strict=True):
        assert np.allclose(row["probabilities"], np.sort(p)[::-1][:3], atol=1e-6)
    calibrated_predictor = Predictor.load(trained_run, calibration=calibrated / "calibration.json")
    assert calibrated_predictor.temperature == t
    assert np.allclose(calibrated_predictor.probabilities(logits), expected, atol=1e-12)
    assert not np.allclose(expected, cal.softmax(logits), atol=1e-3)  # T is not ~1: the test can tell


def test_a_temperature_fitted_on_another_checkpoint_is_warned_about(calibrated: Path, trained_run: Path,
                                                                    tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                    ) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        Predictor.load(trained_run, calibration=calibrated)  # fitted on this checkpoint: nothing to say
    assert "another checkpoint" not in caplog.text
    info = json.loads((calibrated / "calibration.json").read_text())
    info["checkpoint"]["sha256"] = "0" * 64  # as if fitted on another run
    (tmp_path / "calibration.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        Predictor.load(trained_run, calibration=tmp_path / "calibration.json")
    assert "was fitted on another checkpoint" in caplog.text


@pytest.mark.parametrize("what", ["missing", "no temperature"])
def test_a_bad_calibration_file_is_one_line_exit_2(trained_run: Path, tmp_path: Path, what: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "calibration.json"
    if what == "no temperature":
        path.write_text(json.dumps({"temperature": -1}))
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(np.zeros((32, 32, 3), np.uint8)))
    with pytest.raises(SystemExit) as e:
        main(["predict", f"ckpt={trained_run}", f"inputs={image}", f"predict.calibration={path}",
              f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"predict.calibration={path}" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConfigError, match="calibration"):
        Predictor.load(trained_run, calibration=path)


def test_serve_answers_with_calibrated_probabilities(calibrated: Path, trained_run: Path, splits) -> None:
    import httpx

    from cifar_cam.serve.app import create_app, load_predictor, spec_json
    from cifar_cam.serve.server import running
    from cifar_cam.serve.settings import Settings

    t = json.loads((calibrated / "calibration.json").read_text())["temperature"]
    settings = Settings(calibration=str(calibrated), max_wait_ms=0)
    predictor = load_predictor(json.loads(spec_json(str(trained_run), "cpu", "fp32", None, settings)))
    assert predictor.temperature == t
    with running(create_app(predictor, settings)) as (url, _), httpx.Client(base_url=url, timeout=30) as client:
        card = client.get("/v1/model").json()
        assert card["calibration"]["temperature"] == t and card["probabilities"] == f"softmax(logits / {t:.6g})"
        answer = client.post("/v1/predict", content=png_bytes(splits.test.images[0])).json()
    expected = cal.softmax(Predictor.load(trained_run).logits(splits.test.images[:1]), t)[0]
    assert np.allclose(answer["probabilities"], np.sort(expected)[::-1][:3], atol=1e-6)


def test_export_writes_the_temperature_into_the_model_card(calibrated: Path, trained_run: Path,
                                                           tmp_path: Path) -> None:
    from cifar_cam.inference.readers import read_card
    from cifar_cam.tasks.export import export

    t = json.loads((calibrated / "calibration.json").read_text())["temperature"]
    cfg = compose_cfg("export", [f"ckpt={trained_run}", "export.formats=[pt2]", "export.check=false",
                                 f"export.calibration={calibrated / 'calibration.json'}"], run_dir=tmp_path)
    export(cfg)
    assert json.loads((tmp_path / "model_card.json").read_text())["calibration"]["temperature"] == t
    assert read_card(tmp_path / "model.pt2")["calibration"]["temperature"] == t  # the card inside the file
    assert Predictor.load(tmp_path / "model.pt2").temperature == t  # and what loading it applies
