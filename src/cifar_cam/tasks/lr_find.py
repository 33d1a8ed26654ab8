"""`cifar-cam lr-find`: the LR range test of torch-lr-finder -> lr_find.png, lr_find.json, a train command.

The test trains for `lr_find.num_iter` steps while the LR grows exponentially from
`lr_find.start_lr` to `lr_find.end_lr`, with the configured model, optimizer, augmentation and
data, and records the (smoothed) loss. Afterwards the model and optimizer are exactly as before.
With `ckpt=RUN` it measures that run's recipe (model, data, augmentation, optimizer, trainer; the
command line on top) on fresh weights: a range test of trained weights says nothing about training.
The printed train command is derived from the config the test ran with (recipe.overrides_for); the test
itself is training/lr_finder.py's, which `cifar-cam train optimizer.lr=auto` runs too.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from cifar_cam.config.validate import validate
from cifar_cam.data.augment import TrainBatches, build_train_batches
from cifar_cam.data.batches import resolve_num_workers
from cifar_cam.models import model_from_config
from cifar_cam.tasks.common import checkpoint_and_config, group_choices, load_data, run_dir, setup_runtime
from cifar_cam.training.lr_finder import range_test_to_files, train_command
from cifar_cam.training.run import memory_format_for
from cifar_cam.training.supervise import Supervisor
from cifar_cam.training.weights import start_weights

log = logging.getLogger("cifar_cam.lr_find")


def _build(cfg: DictConfig) -> tuple[nn.Module, TrainBatches, nn.Module, torch.device, DictConfig]:
    if cfg.get("ckpt"):  # the run's recipe; an LR range test starts from fresh weights
        payload, cfg = checkpoint_and_config(cfg, "lr-find")
        log.info("the model, data and training settings of %s, with fresh weights (a range test starts from "
                 "scratch; its trained weights are not used)", payload["path"])
    else:
        validate(cfg, "lr-find")
    device = setup_runtime(cfg)
    splits = load_data(cfg)
    model = model_from_config(cfg.model, splits.num_classes, splits.image_size)
    start_weights(model, cfg, splits, None)  # model.pretrained / the architecture's data-dependent init; freeze
    model.to(device, memory_format=memory_format_for(model, device, cfg.trainer.channels_last))
    batches = build_train_batches(splits.train, cfg.aug, batch_size=cfg.data.batch_size,
                                  num_workers=resolve_num_workers(cfg.data.num_workers), seed=cfg.seed, device=device,
                                  mean=splits.mean, std=splits.std, sampler=cfg.data.get("sampler"))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    return model, batches, criterion, device, cfg


def lr_find(cfg: DictConfig) -> float:
    """The LR range test: lr_find.png, lr_find.json and the train command; returns the suggested LR (NaN if none)."""
    out = run_dir()
    t = cfg.trainer
    with Supervisor("lr-find", stall_timeout=t.get("stall_timeout", "auto"), stop_grace=t.get("stop_grace", 30),
                    log_file=out / "lr-find.log") as sup:
        model, batches, criterion, device, cfg = _build(cfg)
        sup.armed, sup.unarmed_message = True, "during the LR range test; nothing was written"
        result = range_test_to_files(cfg, model, batches, criterion, device, out, sup)
        sup.armed = False
    if result.suggested_lr is not None:
        log.info("to train with it: %s", train_command(cfg, result.suggested_lr, group_choices()))
    log.info("wrote %s", out)
    return float("nan") if result.suggested_lr is None else result.suggested_lr
