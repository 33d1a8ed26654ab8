"""Every config group composes for every command; validation refuses bad values in words."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cifar_cam.cli.commands import COMMANDS
from cifar_cam.config.merge import merge_with_checkpoint
from cifar_cam.config.validate import validate
from cifar_cam.errors import ConfigError
from cifar_cam.io import config_dir

GROUPS = ["data", "model", "aug", "optimizer", "scheduler", "trainer", "experiment"]


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_spec_choices_exist() -> None:
    assert {"cifar10", "folder", "synthetic"} <= set(_choices("data"))
    assert {"resnet18"} <= set(_choices("model"))
    assert {"seed", "crop_flip", "none"} <= set(_choices("aug"))
    assert {"sgd", "adam", "adamw", "muon"} <= set(_choices("optimizer"))
    assert {"plateau", "onecycle", "cosine", "none"} <= set(_choices("scheduler"))
    assert {"fast", "cpu_quick"} <= set(_choices("experiment"))


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("group", GROUPS)
def test_every_group_choice_composes_and_validates(command: str, group: str) -> None:
    name = COMMANDS[command][0]
    for choice in _choices(group):
        overrides = [f"{group}={choice}", "data.root=/somewhere"] if group == "data" else [f"{group}={choice}"]
        if command in ("eval", "gradcam", "predict", "export", "serve"):
            overrides.append("ckpt=some/run")
        if command == "predict":
            overrides.append("inputs=my_images/")
        if (group, choice) == ("experiment", "finetune"):
            overrides.append("model.pretrained=some/weights.pth")  # the preset requires the weights
        cfg = _compose(name, overrides)
        assert cfg.command == command
        validate(cfg, command)  # the shipped choices are all valid


def test_defaults_match_spec() -> None:
    cfg = _compose("train", [])
    assert cfg.data.source == "cifar10" and cfg.data.val_size == 5000 and cfg.data.subset is None
    assert cfg.aug.preset == "seed" and cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.9
    assert cfg.scheduler._target_.endswith("ReduceLROnPlateau") and cfg.scheduler.mode == "max"
    assert cfg.trainer.epochs == 50 and cfg.trainer.device == "auto"
    assert cfg.gradcam.num_images == 25 and cfg.gradcam.target_layers is None  # null: the model's own
    assert list(cfg.model.cam_layers) == ["layer3", "layer4"] and cfg.model.name == "resnet18"
    assert cfg.model.width == 64


def test_experiment_presets_override_groups() -> None:
    fast = _compose("train", ["experiment=fast"])
    assert fast.scheduler._target_.endswith("OneCycleLR") and fast.aug.preset == "crop_flip"
    assert fast.scheduler.max_lr == fast.optimizer.lr  # interpolation follows the optimizer
    quick = _compose("train", ["experiment=cpu_quick"])
    assert quick.model.name == "airbench" and quick.optimizer.bias_lr_scale == 64
    assert quick.eval.tta == "translate" and quick.trainer.ema.decay == 0.98


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "muon"])
def test_cpu_budget_builds_with_any_optimizer(optimizer: str) -> None:
    """The preset sets only keys every optimizer has, so swapping its Muon for another still builds."""
    import torch

    from cifar_cam.training.optim import build_optimizer

    cfg = _compose("train", ["experiment=cpu_budget", f"optimizer={optimizer}", "data=synthetic"])
    validate(cfg, "train")
    built = build_optimizer(cfg.optimizer, torch.nn.Conv2d(3, 4, 3))
    assert built.param_groups[0]["lr"] == 0.04
    assert type(built).__name__ == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "muon": "Muon"}[optimizer]


def test_a_key_the_optimizer_class_lacks_is_one_line() -> None:
    """cpu_quick's SGD momentum under optimizer=adam: a ConfigError naming the key, not a TypeError in Adam."""
    import torch

    from cifar_cam.errors import ConfigError
    from cifar_cam.training.optim import build_optimizer

    cfg = _compose("train", ["experiment=cpu_quick", "optimizer=adam", "data=synthetic"])
    with pytest.raises(ConfigError, match=r"optimizer.momentum: Adam does not take it \(it takes lr, betas, eps"):
        build_optimizer(cfg.optimizer, torch.nn.Conv2d(3, 4, 3))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=-1", "trainer.epochs must be an integer >= 1, got -1"),
        ("trainer.epochs=abc", "trainer.epochs must be an integer >= 1, got 'abc'"),
        ("optimizer.lr=-1", "optimizer.lr must be a number > 0"),
        ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
        ("data.val_size=-5", "data.val_size must be a number of images >= 0 (0 = no validation split) or a fraction"),
        ("aug.hflip_p=1.5", "aug.hflip_p must be a probability in [0, 1]"),
        ("trainer.device=gpu", "trainer.device must be auto, cpu, cuda or cuda:N"),
        ("model.width=0", "model.width must be an integer >= 1"),
        ("trainer.early_stopping.patience=0", "trainer.early_stopping.patience must be null (off) or an integer"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
        ("trainer.stall_timeout=0", "trainer.stall_timeout must be 'auto', null (off) or seconds > 0, got 0"),
        ("trainer.stop_grace=null", "trainer.stop_grace must be seconds > 0, got None"),
        ("eval.tta=mirror", "eval.tta must be true (the mean over the image and its mirror), false, or translate"),
    ],
)
def test_validate_names_key_and_value(override: str, message: str) -> None:
    cfg = _compose("train", [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        validate(cfg, "train")


def test_the_scheduler_facts_come_from_one_table_that_build_and_resume_read() -> None:
    """The span of a schedule (the argument bound to the run's length) is the table's, not a config key's."""
    from cifar_cam.training.schedulers import SCHEDULERS, facts

    assert facts({"_target_": "torch.optim.lr_scheduler.OneCycleLR"}).span == "total_steps"
    assert facts({"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR"}).span == "T_max"
    assert facts({"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau"}).span is None
    assert facts({"_target_": None}).span is None and "min_lr" in SCHEDULERS["ReduceLROnPlateau"].resumable
    assert "span" not in _compose("train", ["scheduler=onecycle"]).scheduler  # no key nothing reads


def test_a_checkpoint_older_than_the_newer_keys_still_validates() -> None:
    """A resume takes the checkpoint's sections whole: keys added since it was written are absent, not wrong."""
    cfg = _compose("train", ["ckpt=x", "trainer.stall_timeout=null"])
    validate(cfg, "train")  # null: the watchdog off
    stored = OmegaConf.to_container(cfg)
    for section, key in (("trainer", "stall_timeout"), ("trainer", "stop_grace"), ("scheduler", "span")):
        stored[section].pop(key, None)
    merged = merge_with_checkpoint(cfg, stored, ["ckpt=x"])
    assert "stop_grace" not in merged.trainer
    validate(merged, "train")


def test_eval_requires_ckpt() -> None:
    with pytest.raises(ConfigError, match="eval needs ckpt=PATH"):
        validate(_compose("eval", []), "eval")


def test_merge_with_checkpoint_keeps_architecture_but_lets_overrides_win() -> None:
    cfg = _compose("eval", ["ckpt=x", "data=synthetic", "data.batch_size=7", "model.width=32"])
    stored = OmegaConf.to_container(_compose("train", ["data=synthetic", "model.width=8", "data.test_size=99"]))
    merged = merge_with_checkpoint(cfg, stored, ["ckpt=x", "data.batch_size=7"])
    assert merged.model.width == 8            # from the checkpoint: the command line did not say
    assert merged.data.test_size == 99        # from the checkpoint
    assert merged.data.batch_size == 7        # the command line wins
    merged = merge_with_checkpoint(cfg, stored, ["ckpt=x", "model.width=32"])
    assert merged.model.width == 32


def test_eval_inherits_the_runs_eval_settings() -> None:
    """A run trained with eval.tta=true is evaluated with TTA again, so eval reproduces its test accuracy."""
    from cifar_cam.config.merge import MODEL_SECTIONS

    cfg = _compose("eval", ["ckpt=x"])
    stored = OmegaConf.to_container(_compose("train", ["eval.tta=true"]))
    assert merge_with_checkpoint(cfg, stored, ["ckpt=x"], MODEL_SECTIONS).eval.tta is True
    assert merge_with_checkpoint(cfg, stored, ["ckpt=x", "eval.tta=false"], MODEL_SECTIONS).eval.tta is False


def test_every_validated_choice_is_one_the_code_implements() -> None:
    """config.validate checks names against choices.py (torch-free); the code behind each must have the same."""
    from cifar_cam.config import choices
    from cifar_cam.explain.cam import METHODS
    from cifar_cam.models import MODELS
    from cifar_cam.tasks.gradcam import SELECTED

    assert set(choices.MODEL_NAMES) == set(MODELS)
    assert set(choices.CAM_METHODS) == set(METHODS)
    assert set(choices.CAM_SELECT) == set(SELECTED)
