"""EMA of the weights, MixUp / CutMix and gradient clipping: the pieces, then a training run with each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cifar_cam.data.mix import MixedBatches, cutmix_box, mix_batch, mix_rng
from cifar_cam.errors import ConfigError
from cifar_cam.training.ema import WeightEma
from cifar_cam.training.engine import backward_and_step, hit_rate, train_one_epoch
from conftest import TINY, compose_cfg

MIX = {"mix": "both", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_p": 1.0}


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


# -- EMA ---------------------------------------------------------------------------------------------------

def test_ema_update_is_decay_times_ema_plus_rest_times_raw_for_weights_and_bn_statistics() -> None:
    model = small_net()
    ema = WeightEma(model, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(7)
    ema.update(model)
    raw = model.state_dict()
    for name, value in ema.state_dict().items():
        if value.is_floating_point():  # weights and BatchNorm running statistics are averaged
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * raw[name])
        else:  # num_batches_tracked is copied
            assert torch.equal(value, raw[name])
    assert ema.updates == 1
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_starts_with_small_decay_and_reaches_the_set_one() -> None:
    ema = WeightEma(small_net(), decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    assert WeightEma(small_net(), decay=0.999, warmup=False).current_decay() == 0.999


# -- MixUp / CutMix ----------------------------------------------------------------------------------------

def batch(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 4


def test_mixup_blends_images_and_targets_with_one_lambda() -> None:
    images, labels = batch()
    mixed, targets = mix_batch(images, labels, 4, {**MIX, "mix": "mixup"}, mix_rng(0, 1, 0))
    assert targets.shape == (8, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    # replay the draws: p-draw, permutation, lambda
    rng = mix_rng(0, 1, 0)
    rng.random()
    perm = torch.from_numpy(rng.permutation(8))
    lam = rng.beta(0.8, 0.8)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[perm])
    onehot = nn.functional.one_hot(labels, 4).float()
    torch.testing.assert_close(targets, lam * onehot + (1 - lam) * onehot[perm])


def test_cutmix_pastes_a_box_and_its_target_weight_is_the_pasted_area() -> None:
    images, labels = batch(size=32)
    mixed, targets = mix_batch(images, labels, 4, {**MIX, "mix": "cutmix"}, mix_rng(3, 2, 5))
    changed = (mixed != images).any(1)  # (N, H, W): where another image's pixels came in
    rows = changed.any(0).any(1).nonzero().flatten()
    cols = changed.any(0).any(0).nonzero().flatten()
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) / 32**2
    # an image paired with itself (or with its own class) keeps its label: check an image that changed
    i = int(changed.flatten(1).any(1).nonzero()[0])
    assert targets[i, labels[i]] <= 1 - float(area) + 1e-6
    assert 0 < float(area) < 1


def test_cutmix_box_is_clipped_inside_the_image() -> None:
    rng = np.random.default_rng(0)
    for lam in (0.01, 0.3, 0.9):
        for _ in range(50):
            top, bottom, left, right = cutmix_box(24, lam, rng)
            assert 0 <= top <= bottom <= 24 and 0 <= left <= right <= 24


def test_mix_p_zero_leaves_the_batch_and_gives_one_hot_targets() -> None:
    images, labels = batch()
    mixed, targets = mix_batch(images, labels, 4, {**MIX, "mix_p": 0.0}, mix_rng(0, 1, 0))
    assert torch.equal(mixed, images)
    assert torch.equal(targets, nn.functional.one_hot(labels, 4).float())


def test_mixed_batches_draw_per_epoch_and_batch_so_a_resumed_epoch_mixes_alike() -> None:
    batches = [batch() for _ in range(4)]
    whole = list(MixedBatches(batches, MIX, num_classes=4, seed=7, epoch=3))
    resumed = list(MixedBatches(batches[2:], MIX, num_classes=4, seed=7, epoch=3, start_batch=2))
    for (a, ta), (b, tb) in zip(whole[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    other_epoch = list(MixedBatches(batches, MIX, num_classes=4, seed=7, epoch=4))
    assert not torch.equal(whole[0][1], other_epoch[0][1])


def test_hit_rate_counts_the_target_weight_of_the_prediction() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    assert hit_rate(logits, torch.tensor([0, 2])).item() == 1.0
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.25, 0.75]])  # predicted 0 and 1: 0.7 + 0.25
    assert hit_rate(logits, soft).item() == pytest.approx(0.95)


def test_train_one_epoch_takes_soft_targets() -> None:
    model = small_net()
    images, labels = batch(n=6)
    mixed = list(MixedBatches([(images, labels % 3)], {**MIX, "mix": "mixup"}, num_classes=3, seed=0, epoch=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = train_one_epoch(model, mixed, optimizer, nn.CrossEntropyLoss(label_smoothing=0.1),
                             device=torch.device("cpu"))
    assert result.totals.count == 6 and 0 <= result.totals.acc <= 1 and np.isfinite(result.totals.loss)


# -- gradient clipping -------------------------------------------------------------------------------------

def grads_after_step(grad_clip: float | None, scaler: torch.amp.GradScaler | None) -> list[torch.Tensor]:
    model = small_net()
    images, labels = batch(n=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights; grads stay
    loss = nn.functional.cross_entropy(model(images) * 50, labels % 3)  # steep: a large gradient
    backward_and_step(loss, optimizer, scaler, grad_clip)
    return [p.grad.clone() for p in model.parameters()]


def test_grad_clip_bounds_the_global_norm() -> None:
    free = grads_after_step(None, None)
    clipped = grads_after_step(0.5, None)
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in free])) > 0.5
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped])) == pytest.approx(0.5, rel=1e-4)


def test_grad_clip_under_a_grad_scaler_clips_the_unscaled_gradients() -> None:
    plain = grads_after_step(0.5, None)
    scaled = grads_after_step(0.5, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- config and a training run -----------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("trainer.ema.decay=1.0", "trainer.ema.decay must be null (off) or a number in [0, 1)"),
    ("trainer.grad_clip=0", "trainer.grad_clip must be null (off) or a number > 0"),
    ("aug.mix=mixer", "aug.mix must be null (off) or one of ['mixup', 'cutmix', 'both']"),
    ("aug.mixup_alpha=-1", "aug.mixup_alpha must be a number > 0"),
    ("aug.mix_p=2", "aug.mix_p must be a probability in [0, 1]"),
])
def test_bad_values_are_refused_by_name(override: str, message: str) -> None:
    from cifar_cam.config.validate import validate

    cfg = compose_cfg("train", [*TINY, override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, "train")


@pytest.mark.parametrize("preset", ["seed", "crop_flip", "none"])
def test_every_aug_preset_has_the_mix_keys(preset: str) -> None:
    cfg = compose_cfg("train", [f"aug={preset}"])
    assert {"mix", "mixup_alpha", "cutmix_alpha", "mix_p"} <= set(cfg.aug)


def test_a_run_with_ema_saves_the_average_as_model_and_the_trained_weights_as_model_raw(tmp_path: Path) -> None:
    from cifar_cam.tasks.train import train

    cfg = compose_cfg("train", [*TINY, "trainer.ema.decay=0.5", "aug.mix=mixup", "trainer.grad_clip=1.0",
                                "trainer.num_threads=1"], run_dir=tmp_path)
    train(cfg)
    last = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)
    assert last["ema_updates"] == 2 * 3  # every step: 2 epochs of 3 batches (96 training images, batch 32)
    assert any(not torch.equal(last["model"][k], last["model_raw"][k]) for k in last["model"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1
    # validation used the EMA: evaluating `model` reproduces the recorded val accuracy of the last epoch
    from cifar_cam.data.batches import EvalBatches
    from cifar_cam.tasks.common import load_data
    from cifar_cam.training.checkpoint import model_from_checkpoint
    from cifar_cam.training.engine import evaluate

    splits = load_data(cfg)
    model = model_from_checkpoint(last)
    assert summary["eval_precision"] == "fp32"  # validation at eval.precision, with the data's own mean / std
    val = evaluate(model, EvalBatches(splits.val, 64, torch.device("cpu"), splits.mean, splits.std),
                   splits.num_classes, device=torch.device("cpu"), amp_dtype=None)
    assert val.loss == pytest.approx(last["history"][-1]["val_loss"], rel=1e-6)  # a loss: raw weights differ
    model.load_state_dict(last["model_raw"])
    raw = evaluate(model, EvalBatches(splits.val, 64, torch.device("cpu"), splits.mean, splits.std),
                   splits.num_classes, device=torch.device("cpu"), amp_dtype=None)
    assert raw.loss != pytest.approx(val.loss, rel=1e-6)


def _clip_rank(rank: int, world_size: int, out: str) -> None:
    """One DDP rank: a step on its half of the batch with grad_clip; saves its weights. The ranks meet in a file
    store: with a TCP store rank 0 hosts it, and when rank 0 left first rank 1's teardown aborted (SIGABRT)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = small_net()
    images, labels = batch(n=8)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    half = slice(rank * 4, rank * 4 + 4)
    loss = nn.functional.cross_entropy(ddp(images[half]) * 50, labels[half] % 3)
    backward_and_step(loss, optimizer, None, grad_clip=0.5)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")
    dist.barrier()  # neither rank tears its connections down while the other may still be talking
    dist.destroy_process_group()
    os._exit(0)  # past this point gloo's threads aborted 1 run in ~30 at interpreter exit (SIGABRT, "terminate
    # called without an active exception"); 0 in 40 with the exit skipped


def test_grad_clip_under_ddp_clips_the_all_reduced_gradients_alike_on_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_clip_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # one process on the whole batch (BatchNorm in train mode sees each rank's half: run it per half and average
    # the losses, which is what DDP's mean of the ranks' gradients is)
    model = small_net()
    images, labels = batch(n=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = sum(nn.functional.cross_entropy(model(images[h]) * 50, labels[h] % 3)
               for h in (slice(0, 4), slice(4, 8))) / 2
    backward_and_step(loss, optimizer, None, grad_clip=0.5)
    for name, value in model.state_dict().items():
        if value.is_floating_point() and "running" not in name:  # BatchNorm statistics stay per rank
            torch.testing.assert_close(ranks[0][name], ranks[1][name])
            torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)
