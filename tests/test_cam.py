"""Our Grad-CAM (cam/) against pytorch-grad-cam, plus the hook bookkeeping and the public API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as ReferenceGradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cifar_cam import GradCAM, load_model
from cifar_cam.errors import ConfigError
from cifar_cam.explain.cam import GradCAMPlusPlus
from cifar_cam.explain.hooks import LayerHooks, hook_count
from cifar_cam.models import build_model
from conftest import cam_test_model

LAYERS = ["layer2", "layer3", "layer4", "layer4.0"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A width-8 ResNet18 whose blocks are not identities (the init zeroes each block's last BN)."""
    return cam_test_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method, reference", [("gradcam", ReferenceGradCAM),
                                               ("gradcam++", ReferenceGradCAMPlusPlus)])
@pytest.mark.parametrize("targets", [None, [3, 1, 4, 1, 5, 9]], ids=["predicted", "given"])
def test_maps_equal_pytorch_grad_cam(model: torch.nn.Module, images: torch.Tensor, method: str, reference: type,
                                     targets: list[int] | None) -> None:
    with GradCAM(model, target_layers=LAYERS, method=method) as cam:
        maps = cam(images, targets=targets)
    assert list(maps) == LAYERS
    ref_targets = None if targets is None else [ClassifierOutputTarget(c) for c in targets]
    for name in LAYERS:
        with reference(model=model, target_layers=[model.get_submodule(name)]) as ref:
            expected = torch.from_numpy(ref(input_tensor=images, targets=ref_targets))
        ours = maps[name]
        assert ours.shape == (6, 32, 32) and ours.dtype == torch.float32 and ours.device.type == "cpu"
        assert float(ours.min()) >= 0 and float(ours.max()) <= 1
        assert torch.allclose(ours.amax(dim=(1, 2)), torch.ones(6), atol=1e-5), "each map spans [0, 1]"
        diff = float((ours - expected).abs().max())
        assert diff < 1e-4, f"{method} {name}: max |ours - pytorch-grad-cam| = {diff}"


def test_methods_differ_and_dispatch(model: torch.nn.Module, images: torch.Tensor) -> None:
    plain, plus = GradCAM(model, ["layer3"]), GradCAM(model, ["layer3"], method="gradcam++")
    assert type(plain) is GradCAM and type(plus) is GradCAMPlusPlus
    assert float((plain(images)["layer3"] - plus(images)["layer3"]).abs().max()) > 1e-2
    with pytest.raises(ConfigError, match="gradcam, gradcam\\+\\+|'gradcam', 'gradcam\\+\\+'"):
        GradCAM(model, ["layer3"], method="ablationcam")


def test_one_forward_one_backward_no_weight_gradients(model: torch.nn.Module, images: torch.Tensor,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's loss.backward() in other tests fills .grad
    forwards, grads, deep = [], [], []
    real_grad = torch.autograd.grad

    def counting_grad(*args: object, **kwargs: object) -> object:
        grads.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("full backward() called"))
    handles = [model.register_forward_hook(lambda *a: forwards.append(1)),
               # layer2 lies below the earliest target (layer3): a backward pass must not reach it
               model.layer2.register_full_backward_hook(lambda *a: deep.append("layer2")),
               model.layer4.register_full_backward_hook(lambda *a: deep.append("layer4"))]
    try:
        with GradCAM(model, ["layer3", "layer4"]) as cam:
            cam(images)
    finally:
        for h in handles:
            h.remove()
    assert len(forwards) == 1 and len(grads) == 1
    assert deep == ["layer4"], "the backward stops at the earliest target layer"
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_after_calls_and_errors(model: torch.nn.Module, images: torch.Tensor) -> None:
    before = hook_count(model)
    cam = GradCAM(model, ["layer3", "layer4"])
    assert hook_count(model) == before        # hooks live only inside a call
    cam(images)
    assert hook_count(model) == before
    with pytest.raises(ValueError, match="class indices"):
        cam(images, targets=[99] * 6)          # fails after the forward pass, hooks in place
    assert hook_count(model) == before
    with pytest.raises(RuntimeError):
        cam(torch.randn(2, 1, 32, 32))         # fails inside the model's forward
    assert hook_count(model) == before
    # __exit__ never swallows (pytorch-grad-cam's swallows IndexError)
    with pytest.raises(IndexError, match="mine"):
        with GradCAM(model, ["layer4"]) as cam:
            cam(images)
            raise IndexError("mine")
    assert hook_count(model) == before


def test_layer_hooks_unit(model: torch.nn.Module, images: torch.Tensor) -> None:
    before = hook_count(model)
    with LayerHooks(model, ["layer3", "layer4.1"]) as hooks:
        assert hook_count(model) == before + 2 and hooks.active == 2
        with torch.no_grad():
            model(images)
        outputs = hooks.checked_outputs()
        assert outputs["layer3"].shape == (6, 32, 8, 8) and outputs["layer4.1"].shape == (6, 64, 4, 4)
        hooks.release()
        hooks.release()  # twice is fine
        assert hook_count(model) == before and hooks.outputs == {}
    assert hook_count(model) == before


def test_bad_layers_are_config_errors(model: torch.nn.Module, images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="'layer9'.*layer1, layer2, layer3, layer4"):
        GradCAM(model, ["layer3", "layer9"])
    with pytest.raises(ConfigError, match="no target layers"):
        GradCAM(model, [])
    with pytest.raises(ConfigError, match="'fc' outputs \\(6, 10\\), not a feature map"):
        GradCAM(model, ["fc"])(images)
    with pytest.raises(ConfigError, match="runs 2 times"):  # a block's ReLU module is called twice
        GradCAM(model, ["layer4.1.relu"])(images)
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="one class per image"):
        GradCAM(model, ["layer4"])(images, targets=[1, 2])


def test_model_mode_and_state_untouched(images: torch.Tensor) -> None:
    m = build_model("resnet18", num_classes=10, width=8).train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.inference_mode():  # works inside inference mode too (notebooks often are)
        maps = GradCAM(m, ["layer4"])(images)
    assert maps["layer4"].shape == (6, 32, 32)
    assert m.training, "the caller's train/eval mode comes back"
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items()), "BatchNorm statistics untouched"


def test_public_api_on_a_trained_run(trained_run: Path) -> None:
    model = load_model(trained_run)
    x = torch.randn(3, 3, 32, 32)
    with GradCAM(model, target_layers=["layer3", "layer4"], method="gradcam++") as cam:
        maps = cam(x)
        labels = cam(x, targets=torch.tensor([0, 1, 2]))
    assert set(maps) == {"layer3", "layer4"} and maps["layer4"].shape == (3, 32, 32)
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in (*maps.values(), *labels.values()))
    assert not model.training
