"""Real data (`make test-full`): predict on the JPEG test folder equals eval, through .pt and .onnx."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from cifar_cam.cli.main import main
from conftest import SHARED_ARCHIVE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason=f"{SHARED_ARCHIVE} is not here")]


def test_predict_on_the_test_jpegs_equals_eval_through_pt_and_onnx(tmp_path: Path) -> None:
    run, root = tmp_path / "train", f"data.root={SHARED_ARCHIVE}"
    main(["train", "data=folder", root, "model.width=8", "data.subset=1000", "data.val_size=200",
          "trainer.epochs=1", "trainer.precision=fp32", f"hydra.run.dir={run}"])
    main(["eval", f"ckpt={run}", "eval.tta=false", "trainer.precision=fp32", f"hydra.run.dir={tmp_path / 'eval'}"])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"]
    with tarfile.open(SHARED_ARCHIVE) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/test/" in f"/{m.name}"]
        tar.extractall(tmp_path / "jpg", members=members, filter="data")
    test_dir = next(p for p in (tmp_path / "jpg").rglob("test") if p.is_dir())
    main(["predict", f"ckpt={run}", f"inputs={test_dir}", "trainer.precision=fp32", f"hydra.run.dir={tmp_path / 'p'}"])
    predicted = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert predicted["images"] == predicted["judged"] == 10000
    assert predicted["accuracy"] == round(evaluated, 4)  # exactly: the same pixels, the same fp32 forward
    main(["export", f"ckpt={run}", "export.formats=[onnx]", "export.check_images=500",
          f"hydra.run.dir={tmp_path / 'x'}"])
    main(["predict", f"ckpt={tmp_path / 'x' / 'model.onnx'}", f"inputs={test_dir}", f"hydra.run.dir={tmp_path / 'o'}"])
    through_onnx = json.loads((tmp_path / "o" / "predictions.json").read_text())["accuracy"]
    assert abs(through_onnx - evaluated) <= 0.0005  # 0.05 points
