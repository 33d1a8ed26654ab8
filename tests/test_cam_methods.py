"""The CAM methods beyond Grad-CAM / Grad-CAM++ (cam/gradcam.py) and the aug / eigen smoothing, each against
pytorch-grad-cam 1.5.7 on random inputs. EigenCAM is compared with the reference's sign as is, not up to sign."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_grad_cam as reference
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cifar_cam.config import choices
from cifar_cam.explain.cam import METHODS, GradCAM, ScoreCAM, first_principal_component, normalized_maps
from cifar_cam.explain.hooks import hook_count
from conftest import cam_test_model

REFERENCES = {"gradcam": reference.GradCAM, "gradcam++": reference.GradCAMPlusPlus, "hirescam": reference.HiResCAM,
              "xgradcam": reference.XGradCAM, "layercam": reference.LayerCAM, "eigencam": reference.EigenCAM,
              "scorecam": reference.ScoreCAM}
NEW_METHODS = ["hirescam", "xgradcam", "layercam", "eigencam", "scorecam"]
LAYERS = ["layer2", "layer3", "layer4"]
TARGETS = [3, 1, 4, 1]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A width-8 ResNet18 (ScoreCAM runs one forward per channel) whose blocks are not identities."""
    return cam_test_model()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_maps(model: torch.nn.Module, images: torch.Tensor, method: str, layer: str,
                   targets: list[int] | None, aug_smooth: bool = False, eigen_smooth: bool = False) -> torch.Tensor:
    ref_targets = None if targets is None else [ClassifierOutputTarget(c) for c in targets]
    with REFERENCES[method](model=model, target_layers=[model.get_submodule(layer)]) as cam:
        return torch.from_numpy(cam(input_tensor=images, targets=ref_targets,
                                    aug_smooth=aug_smooth, eigen_smooth=eigen_smooth))


def assert_equal_to_reference(ours: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    assert ours.shape == expected.shape and ours.dtype == torch.float32 and ours.device.type == "cpu"
    diff = float((ours - expected).abs().max())
    assert diff < 1e-4, f"{label}: max |ours - pytorch-grad-cam| = {diff}"


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("targets", [None, TARGETS], ids=["predicted", "given"])
def test_maps_equal_pytorch_grad_cam(model: torch.nn.Module, images: torch.Tensor, method: str, layer: str,
                                     targets: list[int] | None) -> None:
    with GradCAM(model, [layer], method=method) as cam:
        assert type(cam) is METHODS[method]
        ours = cam(images, targets=targets)[layer]
    assert float(ours.min()) >= 0 and torch.allclose(ours.amax(dim=(1, 2)), torch.ones(4), atol=1e-5)
    assert_equal_to_reference(ours, reference_maps(model, images, method, layer, targets), f"{method} {layer}")


@pytest.mark.parametrize("method, smoothing", [
    *[(m, s) for m in ["gradcam", "xgradcam", "layercam", "scorecam"] for s in ["aug_smooth", "eigen_smooth"]],
    ("eigencam", "aug_smooth"),  # EigenCAM is its own eigen smoothing
])
def test_smoothing_equals_pytorch_grad_cam(model: torch.nn.Module, images: torch.Tensor, method: str,
                                           smoothing: str) -> None:
    targets = None if smoothing == "aug_smooth" else TARGETS  # aug_smooth: each augmented input's own argmax
    layers = ["layer2", "layer4"]
    with GradCAM(model, layers, method=method, **{smoothing: True}) as cam:
        smoothed = cam(images, targets=targets)
    plain = GradCAM(model, layers, method=method)(images, targets=targets)
    for layer in layers:
        expected = reference_maps(model, images, method, layer, targets, **{smoothing: True})
        assert_equal_to_reference(smoothed[layer], expected, f"{method} {smoothing} {layer}")
        assert float((smoothed[layer] - plain[layer]).abs().max()) > 1e-2, f"{smoothing} changes the {layer} map"


def test_aug_smooth_with_given_targets(model: torch.nn.Module, images: torch.Tensor) -> None:
    with GradCAM(model, ["layer3"], method="hirescam", aug_smooth=True) as cam:
        ours = cam(images, targets=torch.tensor(TARGETS))["layer3"]
        with pytest.raises(ValueError, match="3 entries for 4 images"):
            cam(images, targets=[1, 2, 3])
    expected = reference_maps(model, images, "hirescam", "layer3", TARGETS, aug_smooth=True)
    assert_equal_to_reference(ours, expected, "hirescam aug_smooth given targets")


def test_batched_scorecam(model: torch.nn.Module, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masks batched across images and channels (7 per forward: batches straddle two images) equal the reference."""
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda module, inputs, output: forwards.append(len(inputs[0])))
    monkeypatch.setattr(ScoreCAM, "mask_batch_size", 7)
    try:
        with GradCAM(model, ["layer3"], method="scorecam") as cam:
            ours = cam(images, targets=TARGETS)["layer3"]
    finally:
        handle.remove()
    channels = model.layer3[-1].conv2.out_channels
    assert forwards[0] == 4 and len(forwards) == 1 + math.ceil(4 * channels / 7) and sum(forwards[1:]) == 4 * channels
    assert hook_count(model) == 0
    assert_equal_to_reference(ours, reference_maps(model, images, "scorecam", "layer3", TARGETS), "scorecam batched")


def test_methods_without_gradients_skip_the_backward(model: torch.nn.Module, images: torch.Tensor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("autograd.grad called"))
    monkeypatch.setattr(torch.Tensor, "backward", lambda *a, **k: pytest.fail("backward() called"))
    eigen = GradCAM(model, ["layer4"], method="eigencam")
    assert torch.equal(eigen(images)["layer4"], eigen(images, targets=TARGETS)["layer4"]), "EigenCAM ignores targets"
    GradCAM(model, ["layer4"], method="scorecam")(images)


def test_principal_component_sign_is_numpys() -> None:
    """Our projection is np.linalg.svd's, sign included (the reference's), and the sign decides the map."""
    features = torch.randn(8, 32, 8, 8, generator=torch.Generator().manual_seed(2)).relu()
    projections = first_principal_component(features)
    for activations, ours in zip(features, projections, strict=True):
        centred = activations.flatten(1).T.numpy()
        centred = centred - centred.mean(axis=0)
        expected = centred @ np.linalg.svd(centred, full_matrices=True)[2][0]
        assert np.abs(ours.flatten().numpy() - expected).max() < 1e-5
    flipped = normalized_maps(-projections, (32, 32))
    assert float((normalized_maps(projections, (32, 32)) - flipped).abs().amax(dim=(1, 2)).min()) > 0.1


def test_registry_and_choices_agree() -> None:
    assert list(METHODS) == ["gradcam", "gradcam++", *NEW_METHODS]
    assert choices.CAM_METHODS == tuple(METHODS)
    assert all(cls.method == name for name, cls in METHODS.items())
