"""Progress when stdout is not a terminal: a line every trainer.progress_every seconds, none on a terminal."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cifar_cam.logs import Bars, duration
from conftest import TINY, compose_cfg


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if ": step " in r.getMessage()]


def test_piped_progress_line_every_interval_with_rate_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="cifar_cam"), Bars("epochs", 3, every=30, clock=clock,
                                                                      terminal=False) as bars:
        assert bars.lines and not bars.enabled
        bars.start_inner("epoch 1/3", total=400, images_per_step=128)
        for step in range(1, 101):  # 1 s a step: a line at 30, 60, 90 s
            clock.now += 1.0
            bars.update_inner(step, "loss 1.234")
    lines = _lines(caplog)
    assert lines == [
        "epoch 1/3: step 30/400  loss 1.234  128.0 img/s  ETA 6m10s",
        "epoch 1/3: step 60/400  loss 1.234  128.0 img/s  ETA 5m40s",
        "epoch 1/3: step 90/400  loss 1.234  128.0 img/s  ETA 5m10s",
    ]


def test_resumed_epoch_counts_its_rate_from_where_it_started(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="cifar_cam"), Bars("epochs", 3, every=10, clock=clock,
                                                                      terminal=False) as bars:
        bars.start_inner("epoch 2/3", total=100, completed=50)
        clock.now += 10.0
        bars.update_inner(55)
    assert _lines(caplog) == ["epoch 2/3: step 55/100  0.50 steps/s  ETA 1m30s"]


@pytest.mark.parametrize("kwargs", [{"enabled": False, "terminal": False}, {"every": None, "terminal": False},
                                    {"terminal": True}])
def test_no_lines_on_other_ranks_when_off_or_on_a_terminal(kwargs: dict, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="cifar_cam"), Bars("epochs", 1, clock=clock, **kwargs) as bars:
        bars.start_inner("epoch 1/1", total=10)
        clock.now += 100
        bars.update_inner(5)
    assert _lines(caplog) == []


def test_duration() -> None:
    assert [duration(s) for s in (0, 42, 125, 3725, 90000)] == ["0s", "42s", "2m05s", "1h02m", "25h00m"]


def test_training_piped_writes_progress_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cam.logs import console
    from cifar_cam.tasks.train import train

    monkeypatch.setattr(console(), "_force_terminal", False)  # piped, also under `pytest -s` on a terminal

    cfg = compose_cfg("train", [*TINY, "trainer.epochs=1", "trainer.progress_every=1e-9"], run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        train(cfg)
    lines = _lines(caplog)
    assert len(lines) == 3  # 96 training images, batch 32: a line after each step
    assert all(re.fullmatch(r"epoch 1/1: step [123]/3  loss \S+ acc \S+%  [\d.]+ img/s  ETA \d+s", x) for x in lines)


def test_progress_every_is_validated(tmp_path: Path) -> None:
    from cifar_cam.config.validate import validate
    from cifar_cam.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.progress_every must be null \(off\) or seconds > 0"):
        validate(compose_cfg("train", [*TINY, "trainer.progress_every=0"]), "train")


@pytest.mark.parametrize("train_images, val_images, said", [(2000, 5000, True), (45000, 5000, False), (2000, 0, False)])
def test_a_val_split_that_dominates_the_epoch_is_said(train_images: int, val_images: int, said: bool,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from cifar_cam.training.run import note_validation_cost

    splits = SimpleNamespace(train=[0] * train_images, val=[0] * val_images if val_images else None)
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        note_validation_cost(splits)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "data.val_size=" in r.getMessage()]
    assert len(lines) == said
    if said:
        assert lines[0].startswith("validation on 5000 images takes about 45% of each epoch (2000 training images): "
                                   "data.val_size=200 would make it ~3%")
