"""A `+key` that nothing reads is refused in one line (exit 2); the user's own labels go under `+tags.`, are recorded
in the run and shown by `report`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cifar_cam.cli.main import main
from cifar_cam.config.keys import check_added_keys, declared_keys
from cifar_cam.errors import ConfigError
from conftest import TINY, compose_cfg


@pytest.mark.parametrize(("override", "why"), [
    ("+model.weights=weights.pth", "model.weights is not a cifar-cam setting (in any config file)"),
    ("+scheduler.span=T_max", "scheduler.span is not a cifar-cam setting (nor an argument of "
                              "torch.optim.lr_scheduler.ReduceLROnPlateau)"),
    ("++trainer.epoch=3", "trainer.epoch is not a cifar-cam setting"),
])
def test_an_added_key_nothing_reads_is_one_line_and_exit_2(override: str, why: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", override, "--cfg", "job"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"cifar-cam train: error: {why}") and "nothing would read it" in err
    assert "+tags.<name>=<value>" in err


def test_added_keys_that_code_reads_are_taken() -> None:
    cfg = compose_cfg("train", ["data=cifar10"])
    check_added_keys(["+optimizer.dampening=0.1",  # an argument of torch.optim.SGD
                      "+data.image_size=48",        # data=folder's key
                      "+tags.owner=ana", "+hydra.job.env_set.X=1", "data.batch_size=64", "~trainer.grad_clip"], cfg)
    assert {"data.image_size", "trainer.ema.decay", "logger.mlflow.store", "experiment"} <= declared_keys()
    with pytest.raises(ConfigError, match=r"^optimizer\.momentm is not a cifar-cam setting \(nor an argument of "
                                          r"torch\.optim\.SGD\)"):
        check_added_keys(["+optimizer.momentm=0.9"], cfg)


def test_a_tag_must_be_a_label(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "+tags.who=[a,b]", "--cfg", "job"])
    assert e.value.code == 2 and "tags.who must be a word or a number" in capsys.readouterr().err


def test_tags_are_recorded_in_the_run_and_shown_by_report(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_cam.tasks.report import report
    from cifar_cam.tasks.train import train

    run = tmp_path / "run"
    cfg = compose_cfg("train", [*TINY, "trainer.epochs=1", "+tags.owner=ana", "+tags.note=baseline"], run_dir=run)
    train(cfg)
    (run / ".hydra").mkdir()  # what Hydra writes beside every run: report reads the config and overrides there
    (run / ".hydra" / "config.yaml").write_text("command: train\nseed: 42\ntags:\n  owner: ana\n  note: baseline\n")
    (run / ".hydra" / "overrides.yaml").write_text("- +tags.owner=ana\n- +tags.note=baseline\n")
    assert json.loads((run / "summary.json").read_text())["tags"] == {"owner": "ana", "note": "baseline"}
    out = report([run], out=tmp_path / "report")
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["tags"] == "owner=ana note=baseline"
    assert "owner=ana" in capsys.readouterr().out
