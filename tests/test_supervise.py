"""The sturdier core, in-process: the oneDNN guard, the stall timeout's rule, resume hyperparameters per key."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cifar_cam.errors import ConfigError
from cifar_cam.models import build_model
from cifar_cam.training.device import training_memory_format, unsafe_channels_last
from cifar_cam.training.optim import build_optimizer
from cifar_cam.training.resume import apply_resume_changes, resume_changes
from cifar_cam.training.schedulers import build_scheduler
from cifar_cam.training.supervise import resolve_stall_timeout
from conftest import TINY, compose_cfg

CPU = torch.device("cpu")


@pytest.mark.parametrize("width", [1, 4, 7, 8, 16])
def test_channels_last_is_refused_only_where_onednn_fails(width: int) -> None:
    model = build_model("resnet18", num_classes=10, width=width)
    memory_format, reason = training_memory_format(model, CPU, channels_last=True)
    if width < 8:
        assert memory_format == torch.contiguous_format and "layer2.0.downsample.0" in reason
    else:
        assert memory_format == torch.channels_last and reason is None
    assert unsafe_channels_last(model, torch.device("cuda")) is None  # a CPU kernel's fault only


def test_width_4_trains_in_nchw_with_channels_last_requested(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    from cifar_cam.tasks.train import train

    cfg = compose_cfg("train", [*TINY, "model.width=4", "trainer.epochs=1", "trainer.channels_last=true"],
                      run_dir=tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="cifar_cam"):
        train(cfg)
    assert (tmp_path / "run" / "summary.json").is_file()
    assert any("training in NCHW, not channels_last" in r.getMessage() for r in caplog.records)


def test_stall_timeout_auto_is_20_median_steps_at_least_300_s() -> None:
    assert resolve_stall_timeout("auto", []) is None  # not armed before steps were timed
    assert resolve_stall_timeout("auto", [0.1, 0.2, 50.0]) == 300.0
    assert resolve_stall_timeout("auto", [20.0, 30.0, 40.0]) == 600.0
    assert resolve_stall_timeout(7, [20.0]) == 7.0
    assert resolve_stall_timeout(None, [1.0]) is None


def built(overrides: list[str]) -> tuple[object, torch.optim.Optimizer, object]:
    """(cfg, optimizer, scheduler) as train builds them, for a width-8 model."""
    cfg = compose_cfg("train", [*TINY, *overrides])
    optimizer = build_optimizer(cfg.optimizer, build_model("resnet18", num_classes=10, width=8))
    scheduler, _ = build_scheduler(cfg, optimizer, cfg.trainer.epochs, 4)
    return cfg, optimizer, scheduler


# (the run's overrides, the resume's extra overrides, a check on (optimizer, scheduler) after applying)
APPLIED = [
    ([], ["optimizer.momentum=0.5"], lambda o, s: all(g["momentum"] == 0.5 for g in o.param_groups)),
    ([], ["optimizer.nesterov=false"], lambda o, s: all(g["nesterov"] is False for g in o.param_groups)),
    ([], ["optimizer.weight_decay=0.001"], lambda o, s: all(g["weight_decay"] == 0.001 for g in o.param_groups)),
    (["optimizer.nesterov=false"], ["+optimizer.dampening=0.1"],
     lambda o, s: all(g["dampening"] == 0.1 for g in o.param_groups)),
    ([], ["optimizer.lr=0.01"], lambda o, s: o.param_groups[0]["lr"] == 0.01 and s.min_lrs[0] == pytest.approx(2e-6)),
    (["optimizer=adam"], ["+optimizer.betas=[0.8,0.9]"], lambda o, s: o.param_groups[0]["betas"] == (0.8, 0.9)),
    (["optimizer=adam"], ["+optimizer.eps=1e-6"], lambda o, s: o.param_groups[0]["eps"] == 1e-6),
    (["optimizer=muon"], ["optimizer.weight_decay=0.001"],
     lambda o, s: [g["weight_decay"] for g in o.param_groups] == [0.0, 0.001]),  # filters: 0 by construction
    (["optimizer=muon"], ["optimizer.aux_lr_scale=2.0"],
     lambda o, s: [g["lr_scale"] for g in o.param_groups] == [1, 2]),
    (["optimizer=muon"], ["optimizer.ns_steps=5"], lambda o, s: all(g["ns_steps"] == 5 for g in o.param_groups)),
    ([], ["scheduler.factor=0.5"], lambda o, s: s.factor == 0.5),
    ([], ["scheduler.patience=1"], lambda o, s: s.patience == 1),
    ([], ["scheduler.min_lr=0.001"], lambda o, s: s.min_lrs == [0.001]),
    ([], ["scheduler.threshold=0.01"], lambda o, s: s.threshold == 0.01),
    (["scheduler=cosine"], ["scheduler.eta_min=0.001"], lambda o, s: s.eta_min == 0.001),
    (["scheduler=onecycle"], ["optimizer.lr=0.1"], lambda o, s: o.param_groups[0]["max_lr"] == 0.1),
]


@pytest.mark.parametrize("run, change, check", APPLIED, ids=[c[1][0] + " " + " ".join(c[0]) for c in APPLIED])
def test_changed_hyperparameter_is_applied_to_the_restored_state(run: list[str], change: list[str], check) -> None:
    stored_cfg, _, _ = built(run)
    cfg, optimizer, scheduler = built([*run, *change])
    _, restored_optimizer, restored_scheduler = built(run)  # what load_state_dict brings back: the old values
    changes = resume_changes(OmegaConf.to_container(stored_cfg, resolve=True), cfg)
    assert changes, "the change was not noticed"
    apply_resume_changes(changes, restored_optimizer, restored_scheduler)
    assert check(restored_optimizer, restored_scheduler)


REFUSED = [
    (["scheduler=onecycle"], ["optimizer.momentum=0.5"], "cycles momentum"),
    (["scheduler=onecycle"], ["scheduler.pct_start=0.5"], "shape of a schedule"),
    (["scheduler=onecycle"], ["scheduler.div_factor=10"], "shape of a schedule"),
    ([], ["scheduler.mode=min"], "shape of a schedule"),
    (["optimizer=adam"], ["+optimizer.amsgrad=true"], "cannot change it mid-run"),
]


@pytest.mark.parametrize("run, change, why", REFUSED, ids=[c[1][0] for c in REFUSED])
def test_changed_hyperparameter_that_cannot_apply_is_refused(run: list[str], change: list[str], why: str) -> None:
    stored_cfg, _, _ = built(run)
    cfg, _, _ = built([*run, *change])
    key = change[0].lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=why) as e:
        resume_changes(OmegaConf.to_container(stored_cfg, resolve=True), cfg)
    assert str(e.value).startswith(key)


def test_resume_with_a_new_momentum_trains_with_it_and_reads_last_pt_once(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cifar_cam.training.checkpoint as checkpoint
    from cifar_cam.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    real_load, loads = checkpoint.load_checkpoint, []

    def counting_load(path: object, prefer: str = "best") -> dict:
        loads.append(Path(str(path)).name)
        return real_load(path, prefer)

    monkeypatch.setattr(checkpoint, "load_checkpoint", counting_load)
    main(["train", f"ckpt={run}", "trainer.epochs=3", "optimizer.momentum=0.5"])  # the CLI's pre-check, then the task
    assert loads.count("last.pt") == 1  # one read for the pre-check, the merge and the resume
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 3
    assert [g["momentum"] for g in last["optimizer"]["param_groups"]] == [0.5]
    assert last["config"]["optimizer"]["momentum"] == 0.5  # the config says what the run did


@pytest.mark.parametrize("override, message", [
    ("trainer.stall_timeout=-1", "trainer.stall_timeout must be 'auto', null (off) or seconds > 0, got -1"),
    ("trainer.stall_timeout=soon", "trainer.stall_timeout must be 'auto', null (off) or seconds > 0, got 'soon'"),
    ("trainer.stop_grace=0", "trainer.stop_grace must be seconds > 0, got 0"),
])
def test_bad_stall_timeout_and_stop_grace_are_refused(override: str, message: str) -> None:
    from cifar_cam.config.validate import validate

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_cfg("train", [*TINY, override]), "train")
