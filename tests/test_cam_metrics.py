"""Faithfulness metrics (cam/metrics.py): deletion / insertion on a model whose answer is known, ROAD against
pytorch-grad-cam's ROADCombined with its noise off, and the baseline maps."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from pytorch_grad_cam.metrics import road as reference_road
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from cifar_cam.explain.faithfulness import (
    Faithfulness,
    centre_blob_map,
    curve_auc,
    deletion_curve,
    faithfulness,
    insertion_curve,
    noisy_linear_impute,
    random_map,
    road_combined,
    road_keep_masks,
    target_probability,
)
from cifar_cam.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # numpy 2 vs the reference

N, SIZE = 4, 32
REGION = (slice(0, 8), slice(0, 8))  # the toy model's evidence: the top-left 8x8 pixels, 1/16 of the image


class RegionModel(nn.Module):
    """Two classes; class 0's logit is 4 x the mean of the top-left 8x8 region, class 1's is 0."""

    def forward(self, x: Tensor) -> Tensor:
        evidence = 4 * x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are small, and on 2 shared cores each of the solver's ~2000 small ops
    otherwise waits for a descheduled OpenMP thread (93 s for this file under load instead of 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    """A width-8 ResNet18 with non-trivial batch norms and a sharpened head, so softmax scores move."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=8)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    model.fc.weight.data *= 4
    return model.eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def region_images() -> Tensor:
    """Random images whose region is 1 everywhere: the toy model says class 0 with p = sigmoid(4)."""
    x = torch.randn(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    x[:, :, REGION[0], REGION[1]] = 1.0
    return x


class NoiselessImputer(reference_road.NoisyLinearImputer):
    """ROADCombined builds NoisyLinearImputer() with its 0.01 noise and no way to change it: this one has none."""

    def __init__(self) -> None:
        super().__init__(noise=0.0)


def region_map(noise: float = 0.0) -> Tensor:
    """1 on the toy model's region, 0 (plus optional seeded noise below 1, to break ties) elsewhere."""
    maps = noise * random_map(N, SIZE, SIZE, seed=3)
    maps[:, REGION[0], REGION[1]] = 1.0
    return maps


def test_curve_auc_is_the_trapezoid_over_fractions() -> None:
    assert torch.allclose(curve_auc(torch.linspace(1, 0, 17)), torch.tensor(0.5))
    # Steps 0, 1/2, 1: (1 + 1) / 2 * 1/2 + (1 + 0) / 2 * 1/2 = 0.75, a rectangle-rule sum would give 1.0 or 0.5.
    assert torch.allclose(curve_auc(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])), torch.tensor([0.75, 0.0]))
    x = torch.linspace(0, 1, 33)
    assert abs(float(curve_auc(x**2)) - 1 / 3) < 1e-3


def test_deletion_and_insertion_on_a_model_with_a_known_answer(region_images: Tensor) -> None:
    model, targets, maps = RegionModel().eval(), [0] * N, region_map()
    full, empty = torch.sigmoid(torch.tensor(4.0)), 0.5  # the region intact / at the fill (0)
    deletion = deletion_curve(model, region_images, maps, targets, steps=16)
    # Step 1 removes 64 pixels, the whole region; after that the model sees the fill.
    expected = torch.tensor([float(full)] + [empty] * 16).expand(N, 17)
    assert deletion.shape == (N, 17) and torch.allclose(deletion, expected, atol=1e-6)
    inverse = deletion_curve(model, region_images, 1 - maps, targets, steps=16)
    assert torch.allclose(inverse[:, :16], full.expand(N, 16), atol=1e-6)  # the region goes last
    assert torch.allclose(inverse[:, 16], torch.tensor(empty))
    assert (curve_auc(deletion) < curve_auc(inverse) - 0.4).all(), "the right map must delete faster"

    insertion = insertion_curve(model, region_images, maps, targets, steps=16, fill="mean")
    assert torch.allclose(insertion, torch.tensor([empty] + [float(full)] * 16).expand(N, 17), atol=1e-6)
    inverse_insertion = insertion_curve(model, region_images, 1 - maps, targets, steps=16, fill="mean")
    assert (curve_auc(insertion) > curve_auc(inverse_insertion) + 0.4).all()


def test_curve_endpoints_are_the_image_and_the_fill(resnet: nn.Module, images: Tensor) -> None:
    targets = torch.tensor([3, 1, 4, 1])
    maps = random_map(N, SIZE, SIZE, seed=5)
    image = target_probability(resnet, images, targets)
    deletion = deletion_curve(resnet, images, maps, targets, steps=8)
    assert deletion.shape == (N, 9)
    assert torch.allclose(deletion[:, 0], image, atol=1e-6)
    assert torch.allclose(deletion[:, -1], target_probability(resnet, torch.zeros_like(images), targets), atol=1e-6)
    insertion = insertion_curve(resnet, images, maps, targets, steps=8, blur_sigma=4.0)
    blurred = gaussian_blur(images, kernel_size=[25, 25], sigma=[4.0, 4.0])  # radius 3 sigma
    assert torch.allclose(insertion[:, 0], target_probability(resnet, blurred, targets), atol=1e-6)
    assert torch.allclose(insertion[:, -1], image, atol=1e-6)
    # A tensor fill, and forward passes of 5 (image, step) pairs, give the same numbers.
    grey = torch.full_like(images, 0.5)
    small = deletion_curve(resnet, images, maps, targets, steps=8, fill=grey, batch_size=5)
    assert torch.allclose(small[:, -1], target_probability(resnet, grey, targets), atol=1e-6)
    assert torch.allclose(small[:, 0], deletion[:, 0], atol=1e-6)
    assert not torch.allclose(small[:, -1], deletion[:, -1])


def test_bad_inputs_are_refused(resnet: nn.Module, images: Tensor) -> None:
    maps = random_map(N, SIZE, SIZE)
    with pytest.raises(ValueError, match="maps must be"):
        deletion_curve(resnet, images, maps[:, :16], [0] * N)
    with pytest.raises(ValueError, match="targets must be"):
        road_combined(resnet, images, maps, [0] * (N - 1))
    with pytest.raises(ValueError, match="fill must be"):
        insertion_curve(resnet, images, maps, [0] * N, fill="black")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ties must be"):
        road_keep_masks(maps, ties="first")  # type: ignore[arg-type]
    resnet.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            deletion_curve(resnet, images, maps, [0] * N)
    finally:
        resnet.eval()


def test_linear_imputation_equals_pytorch_grad_cam(images: Tensor) -> None:
    maps = random_map(N, SIZE, SIZE, seed=6)
    keep = torch.stack([maps[0] < 0.1, maps[1] < 0.9, maps[2] > 0.5, torch.zeros(SIZE, SIZE, dtype=torch.bool)])
    ours = noisy_linear_impute(images, keep, noise=0.0)
    reference = reference_road.NoisyLinearImputer(noise=0.0)
    for i in range(N):
        expected = reference(images[i], keep[i].float())
        assert float((ours[i] - expected).abs().max()) < 1e-5, f"mask {i}"
    assert torch.equal(ours[keep.unsqueeze(1).expand_as(ours)], images[keep.unsqueeze(1).expand_as(images)])
    assert torch.equal(ours[3], torch.zeros_like(ours[3])), "nothing known: the dataset mean, as the reference"

    noisy = noise_a = noisy_linear_impute(images, keep, noise=0.5, seed=1)
    added = (noisy - ours)[~keep.unsqueeze(1).expand_as(ours)]
    assert torch.equal((noisy - ours)[keep.unsqueeze(1).expand_as(ours)].abs().sum(), torch.tensor(0.0))
    assert abs(float(added.std()) - 0.5) < 0.02, "noise of the stated size, on the imputed pixels only"
    assert torch.equal(noise_a, noisy_linear_impute(images, keep, noise=0.5, seed=1))


def test_road_keep_masks_ties(images: Tensor) -> None:
    untied = random_map(N, SIZE, SIZE, seed=7)
    for ours, theirs in zip(road_keep_masks(untied, ties="random"), road_keep_masks(untied), strict=True):
        assert ours.shape == (N, 9, SIZE, SIZE) and torch.equal(ours, theirs)
    kept = [math.ceil(p / 100 * (SIZE * SIZE - 1)) for p in range(10, 100, 10)]
    assert road_keep_masks(untied)[0].sum(dim=(2, 3)).tolist() == [kept] * N
    flat = untied.clone()
    flat[:, :16] = 0  # half the map ties at its minimum, as a Grad-CAM map's ReLU zeros do
    morf, _ = road_keep_masks(flat)
    assert morf[:, :4].sum() == 0, "the reference's threshold removes every pixel at p < 50"
    assert morf[:, 4].sum(dim=(1, 2)).tolist() == [SIZE * SIZE // 2] * N, "p = 50 keeps just the zeros"
    morf_random, _ = road_keep_masks(flat, ties="random")
    assert morf_random.sum(dim=(2, 3)).tolist() == [kept] * N


@pytest.mark.parametrize("kind", ["random", "random-ties-random", "flat-half"])
def test_road_equals_pytorch_grad_cam_without_noise(resnet: nn.Module, images: Tensor, kind: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference_road, "NoisyLinearImputer", NoiselessImputer)
    maps = random_map(N, SIZE, SIZE, seed=8)
    if kind == "flat-half":
        maps[:, :16] = 0
    targets = [3, 1, 4, 1]
    expected = torch.from_numpy(reference_road.ROADCombined()(
        images, maps.numpy(), [ClassifierOutputSoftmaxTarget(c) for c in targets], resnet))
    ours = road_combined(resnet, images, maps, targets, noise=0.0,
                         ties="random" if kind == "random-ties-random" else "reference")
    assert ours.shape == (N,) and float(expected.abs().max()) > 0.01, "scores big enough to compare"
    diff = float((ours - expected).abs().max())
    assert diff < 1e-4, f"max |ours - pytorch-grad-cam ROADCombined| = {diff}"


def test_baseline_maps() -> None:
    noise = random_map(N, SIZE, 24, seed=1)
    assert noise.shape == (N, SIZE, 24) and 0 <= float(noise.min()) and float(noise.max()) < 1
    assert torch.equal(noise, random_map(N, SIZE, 24, seed=1))
    assert not torch.equal(noise, random_map(N, SIZE, 24, seed=2))
    assert not torch.equal(noise[0], noise[1]), "one map per image"

    blob = centre_blob_map(N, SIZE, SIZE)
    assert blob.shape == (N, SIZE, SIZE) and torch.equal(blob[0], blob[-1])
    assert float(blob.max()) == 1.0 and blob[0, 15:17, 15:17].eq(1.0).all(), "peak at the centre"
    # Default sigma: a quarter of the side, 8 px; pixel (15, 31) is (0.5, 15.5) from the centre, (15, 15) (0.5, 0.5).
    assert math.isclose(float(blob[0, 15, 31]), math.exp(-(0.25 + 15.5**2) / 128) / math.exp(-0.5 / 128),
                        rel_tol=1e-5)
    narrow = centre_blob_map(1, SIZE, SIZE, sigma=2.0)
    assert float(narrow[0, 15, 31]) < 1e-12 < float(blob[0, 15, 31])


def test_faithfulness_ranks_the_right_map_first(region_images: Tensor) -> None:
    model = RegionModel().eval()
    maps = {"region": region_map(noise=0.5), "inverse": 1 - region_map(noise=0.5),
            "random": random_map(N, SIZE, SIZE), "centre": centre_blob_map(N, SIZE, SIZE)}
    results = faithfulness(model, region_images, maps, [0] * N, steps=16, deletion_fill="mean",
                           insertion_fill="mean")
    assert list(results) == list(maps)
    for result in results.values():
        assert isinstance(result, Faithfulness)
        assert result.deletion_curve.shape == result.insertion_curve.shape == (N, 17)
        assert result.deletion_auc.shape == result.insertion_auc.shape == result.road.shape == (N,)
        assert torch.allclose(result.deletion_auc, curve_auc(result.deletion_curve))
        assert [sorted(row) for row in result.rows()] == [["deletion_auc", "insertion_auc", "road"]] * N
    region, others = results["region"], [results[name] for name in ("inverse", "random", "centre")]
    for other in others:
        assert (region.deletion_auc < other.deletion_auc).all()
        assert (region.insertion_auc > other.insertion_auc).all()
        assert (region.road > other.road).all()
    assert (region.road > 0.1).all() and (results["inverse"].road < -0.1).all()
