"""Step cost paths on CPU: bf16 / fp16 autocast, GradScaler, channels_last, torch.compile's wrapper."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cifar_cam.data.augment import build_train_batches
from cifar_cam.data.sources import make_synthetic
from cifar_cam.models import build_model
from cifar_cam.training.device import autocast, input_memory_format, resolve_precision
from cifar_cam.training.engine import collect_logits, train_one_epoch, tta_views
from conftest import TINY, compose_cfg

CPU = torch.device("cpu")
CROP = {"preset": "crop_flip", "backend": "torch", "pad": 4, "hflip_p": 0.5, "cutout_size": 8, "cutout_p": 0.5}


def autocast_works(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == dtype
    except (RuntimeError, AssertionError):
        return False


def setup(width: int = 8, channels_last: bool = True, n: int = 96, seed: int = 0):
    torch.manual_seed(seed)
    train, _, _ = make_synthetic(10, n, 1, 32, seed=seed)
    batches = build_train_batches(train, CROP, batch_size=32, num_workers=0, seed=seed, device=CPU)
    model = build_model("resnet18", num_classes=10, width=width)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, batches, optimizer


class Recorder:
    """Forward hooks that note the dtype of conv outputs and the layout of the model's input."""

    def __init__(self, model: nn.Module) -> None:
        self.conv_dtypes: set[torch.dtype] = set()
        self.input_channels_last: list[bool] = []
        model.conv1.register_forward_hook(self._conv)
        model.layer4[-1].conv2.register_forward_hook(self._conv)
        model.register_forward_pre_hook(self._input)

    def _conv(self, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        self.conv_dtypes.add(out.dtype)

    def _input(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        self.input_channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cam.training import device

    monkeypatch.setattr(device, "cpu_has_amx", lambda: False)
    assert resolve_precision("auto", CPU) is None  # fp32 on CPUs without AMX: bf16 is slower there
    monkeypatch.setattr(device, "cpu_has_amx", lambda: True)
    assert resolve_precision("auto", CPU) is torch.bfloat16  # AMX: bf16 trains 1.6-1.8x faster than fp32
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("fp16", CPU) is torch.float16
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) is torch.float16  # pre-Ampere: fp16 + GradScaler
    assert resolve_precision("fp32", cuda) is None


def test_cpu_has_amx_reads_torch_and_survives_its_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cam.training.device import cpu_has_amx

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_has_amx() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_has_amx() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)  # an older torch: no such check
    assert cpu_has_amx() is False

    def broken() -> bool:
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert cpu_has_amx() is False


@pytest.mark.skipif(not autocast_works(torch.bfloat16), reason="this torch has no bf16 autocast on CPU")
def test_bf16_autocast_trains_on_cpu() -> None:
    model, batches, optimizer = setup()
    rec = Recorder(model)
    before = [p.detach().clone() for p in model.parameters()]
    batches.set_epoch(1)
    result = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=CPU, amp_dtype=torch.bfloat16)
    totals = result.totals
    assert rec.conv_dtypes == {torch.bfloat16}  # the convolutions ran in bf16...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ...the weights stayed fp32
    assert totals.count == 96 and totals.step == 3 and torch.isfinite(torch.tensor(totals.loss))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True) if a.dim() == 4)
    # bf16 and fp32 give the same loss to bf16's ~3 significant digits, not bit for bit
    x, y = next(iter(batches))
    model.eval()
    with torch.no_grad():
        fp32 = nn.functional.cross_entropy(model(x), y)
        with autocast(CPU, torch.bfloat16):
            bf16 = nn.functional.cross_entropy(model(x), y)
    assert bf16.dtype == torch.float32  # cross-entropy autocasts to fp32
    assert abs(bf16.item() - fp32.item()) < 0.05 * fp32.item() and bf16.item() != fp32.item()


@pytest.mark.skipif(not autocast_works(torch.float16), reason="this torch has no fp16 autocast on CPU")
def test_fp16_autocast_with_grad_scaler_on_cpu() -> None:
    model, batches, optimizer = setup()
    rec = Recorder(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    batches.set_epoch(1)
    totals = train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=CPU,
                             amp_dtype=torch.float16, scaler=scaler).totals
    assert rec.conv_dtypes == {torch.float16}
    assert totals.count == 96 and torch.isfinite(torch.tensor(totals.loss))
    assert 0 < scaler.get_scale() <= 2.0**10
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True) if a.dim() == 4)


@pytest.mark.skipif(not autocast_works(torch.bfloat16), reason="this torch has no bf16 autocast on CPU")
def test_predict_in_bf16_with_tta_returns_float32_logits() -> None:
    model, batches, _ = setup()
    batches.set_epoch(0)
    fp32 = collect_logits(model, batches, device=CPU)
    bf16 = collect_logits(model, batches, device=CPU, amp_dtype=torch.bfloat16, tta=True)
    assert bf16.logits.dtype == torch.float32 and bf16.logits.shape == fp32.logits.shape == (96, 10)
    assert torch.equal(bf16.labels, fp32.labels)
    assert (bf16.logits - fp32.logits).abs().max() < 0.5  # bf16 and mirror TTA: close, not equal
    assert not torch.equal(bf16.logits, fp32.logits)


def test_translate_tta_is_airbench94s_level_2() -> None:
    """eval.tta=translate: half the flip mean of the image, half the flip means of its reflect-padded 1-px shifts
    up-left and down-right; 6 forward passes a batch (the budget planner's count)."""
    model, batches, _ = setup(n=32)
    batches.set_epoch(0)
    images = next(iter(batches))[0]
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    got = collect_logits(model, [(images, torch.zeros(32, dtype=torch.long))], device=CPU, tta="translate").logits
    assert len(calls) == tta_views("translate") == 6 and tta_views(True) == 2 and tta_views(False) == 1
    with torch.inference_mode():
        def mirrored(x: Tensor) -> Tensor:
            return (model(x) + model(x.flip(3))) / 2

        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        want = mirrored(images) / 2 + (mirrored(padded[:, :, :32, :32]) + mirrored(padded[:, :, 2:, 2:])) / 4
        flip_only = mirrored(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - flip_only).abs().max() > 1e-3  # the shifts count


@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_follow_the_models_memory_format(channels_last: bool) -> None:
    """trainer.channels_last=false really runs NCHW: the batches (channels_last) are laid out like the model."""
    model, batches, optimizer = setup(channels_last=channels_last, n=64)
    assert input_memory_format(model) == (torch.channels_last if channels_last else torch.contiguous_format)
    rec = Recorder(model)
    batches.set_epoch(0)
    train_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), device=CPU)
    collect_logits(model, batches, device=CPU)
    assert rec.input_channels_last == [channels_last] * 4


def test_cli_trains_in_bf16_with_the_torch_backend(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cifar_cam.tasks.train import train

    run = tmp_path / "run"
    cfg = compose_cfg("train", [*TINY, "trainer.precision=bf16", "aug.backend=torch", "aug=crop_flip"], run_dir=run)
    with caplog.at_level("INFO", logger="cifar_cam"):
        train(cfg)
    assert "on cpu, bf16 autocast" in caplog.text  # the model line names the precision as the config does
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and 0 <= summary["test_acc"] <= 1 and summary["precision"] == "bf16"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["trainer"]["precision"] == "bf16"


def test_compiled_training_saves_the_plain_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile=true wraps the model; checkpoints must hold the unwrapped keys (no `_orig_mod.`).

    Dynamo's 'eager' backend keeps the wrapper and the tracing but skips the C++ build (a minute on
    this CPU); the inductor run is test_compiled_training_with_inductor (slow).
    """
    from cifar_cam.tasks.train import train

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = tmp_path / "run"
    train(compose_cfg("train", [*TINY, "trainer.compile=true", "aug.backend=torch"], run_dir=run))
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    fresh = build_model("resnet18", num_classes=10, width=8)
    fresh.load_state_dict(ckpt["model"])  # strict: every key of the plain module
    assert 0 <= json.loads((run / "summary.json").read_text())["test_acc"] <= 1


@pytest.mark.slow
def test_compiled_training_with_inductor(tmp_path: Path) -> None:
    """The real torch.compile (inductor, C++ on CPU) through train: about a minute here."""
    from cifar_cam.tasks.train import train

    run = tmp_path / "run"
    train(compose_cfg("train", [*TINY, "trainer.compile=true", "aug.backend=torch", "trainer.epochs=1"],
                      run_dir=run))
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert 0 <= json.loads((run / "summary.json").read_text())["test_acc"] <= 1


# ----------------------------------------------------------------------------- the speed presets


@pytest.mark.parametrize("preset", ["fast", "cpu_quick"])
def test_speed_presets_compose_validate_and_use_whole_batches(preset: str) -> None:
    from cifar_cam.config.validate import validate

    cfg = compose_cfg("train", [f"experiment={preset}", "data=folder", "data.root=/nowhere.tar.gz"])
    validate(cfg, "train")
    assert cfg.aug.preset == "crop_flip" and cfg.aug.backend == "torch"
    assert cfg.scheduler._target_.endswith("OneCycleLR") and cfg.scheduler.interval == "step"
    assert cfg.trainer.compile == (preset == "fast") and cfg.trainer.channels_last and cfg.eval.tta
    # fast: the published ResNet18 recipe has none; cpu_quick: airbench94's 0.2
    assert cfg.trainer.label_smoothing == {"fast": 0.0, "cpu_quick": 0.2}[preset]
    assert cfg.trainer.early_stopping.patience is None
    # all 50,000 CIFAR-10 training images in whole batches: no partial batch, so no second compiled graph
    assert cfg.data.val_size == 0 and 50_000 % cfg.data.batch_size == 0
    assert cfg.model.name == {"fast": "resnet18", "cpu_quick": "airbench"}[preset]
    assert cfg.trainer.precision == "auto"  # bf16 on CUDA and on AMX CPUs, fp32 on CPUs where bf16 is slower
    # cpu_quick: airbench's flip and 2-px translation, no Cutout
    assert (cfg.aug.pad, cfg.aug.cutout_p) == {"fast": (4, 1.0), "cpu_quick": (2, 0.0)}[preset]
    assert cfg.optimizer._target_ == "torch.optim.SGD"  # nesterov SGD in both published recipes
    sizes = list(cfg.trainer.progressive_resize or [])  # shrunk early epochs; the last ones at the test's 32 px
    assert len(sizes) <= cfg.trainer.epochs - 2 and all(s < 32 for s in sizes) and sizes == sorted(sizes)
