"""A config as a command line: values that survive Hydra's override parser, and a diff that composes back."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from cifar_cam.config.recipe import hydra_value, overrides_for
from cifar_cam.io import config_dir

VALUES = ["outputs/train/2026-12-02_13-22-22", "my runs/x", "it's", "a,b", "/tmp/x=1", "~/data", "true", "1e-3",
          "null", "[x]", "back\\slash'", 0.05, 1e-06, 3, True, None, [16, 24], ["layer3", "layer4"], "auto"]


@pytest.mark.parametrize("value", VALUES)
def test_a_value_survives_hydras_parser(value: object) -> None:
    parsed = OverridesParser.create().parse_overrides([f"k={hydra_value(value)}"])[0].value()
    assert parsed == value


def test_overrides_compose_back_to_the_config() -> None:
    typed = ["experiment=cpu_budget", "data=synthetic", "data.train_size=128", "model.width=24",
             "trainer.progressive_resize=[12,16]", "aug.pad=3", "optimizer.lr=0.1"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=typed)
        derived = overrides_for(cfg, "train", {"experiment": "cpu_budget", "data": "synthetic", "optimizer": "muon"})
        again = compose("train", overrides=derived)
    assert "optimizer=muon" not in derived  # the preset chooses it itself
    assert OmegaConf.to_container(again, resolve=True) == OmegaConf.to_container(cfg, resolve=True)
    assert sorted(derived) == sorted(typed)


def test_a_derived_key_follows_the_new_lr() -> None:
    """OneCycle's max_lr is ${optimizer.lr}: the printed command must not freeze it at the run's old lr."""
    from cifar_cam.training.lr_finder import NOT_FOR_TRAINING

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("lr_find", overrides=["scheduler=onecycle", "optimizer.lr=0.1"])
        derived = overrides_for(OmegaConf.to_container(cfg, resolve=True), "train", {"scheduler": "onecycle"},
                                skip=NOT_FOR_TRAINING, extra=["optimizer.lr=0.0035"])
        trained = compose("train", overrides=derived)
    assert derived == ["scheduler=onecycle", "optimizer.lr=0.0035"]
    assert trained.scheduler.max_lr == trained.optimizer.lr == 0.0035
