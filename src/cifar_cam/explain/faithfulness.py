"""Faithfulness of saliency maps: deletion / insertion curves and AUCs, ROAD, and two baseline maps
(numbers only; the tasks write the table, viz.py draws it).

Every metric takes a model in eval mode, normalized images (N, C, H, W), maps (N, H, W) (higher = more
salient; only the order of the values matters, except where ROAD's LeRF uses `1 - map` as the reference
does) and target classes (N,), and scores the softmax probability of each image's target class.

- Deletion (lower is better) / insertion (higher is better), as RISE (Petsiuk et al. 2018) defines them:
  pixels are removed / restored most-salient first in `steps` equal fractions of the pixels (after step k,
  floor(k / steps * H * W) pixels, ties broken in a seeded random order), giving `steps + 1` probabilities
  from fraction 0 to 1 and their trapezoid area. A removed pixel takes the `fill`: "mean" is 0 in
  normalized space, the dataset's mean colour, so deletion ends at a grey image rather than black (which
  is far outside CIFAR's statistics); insertion starts from "blur", a Gaussian blur of the image (sigma
  `blur_sigma` pixels), because a grey canvas with sharp restored pixels scatters high-frequency edges the
  model never saw, while a blurred canvas keeps the colours and drops the shape.
- ROAD combined (RemOve And Debias, Rong et al. 2022) as pytorch-grad-cam 1.5.7's `ROADCombined` defines
  it, our code and no scipy: at each percentile p, MoRF keeps the pixels whose map value is below the
  p-th percentile of the map and LeRF those whose `1 - map` is; the rest are filled by noisy linear
  imputation; combined = (mean_p LeRF change - mean_p MoRF change) / 2, a change being the target's
  softmax probability after imputation minus before (ClassifierOutputSoftmaxTarget). Higher is better.
  tests/test_cam_metrics.py checks it against the library with the noise off. The reference removes a
  tie at the threshold whole, so a map that is 0 on 30 % of the image (Grad-CAM's ReLU) has every pixel
  imputed at p = 10 and 20; `ties="random"` instead keeps the count an untied map would (the same
  numbers on untied maps), ties in a seeded random order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

Fill = Literal["mean", "blur"] | Tensor
Ties = Literal["reference", "random"]

DEFAULT_STEPS = 16
DEFAULT_BLUR_SIGMA = 4.0  # pixels: an eighth of a CIFAR image, enough to erase shapes, not colours
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # pytorch-grad-cam's default
ROAD_NOISE = 0.01  # pytorch-grad-cam's NoisyLinearImputer default (absolute, in the input's units)
DEFAULT_BATCH_SIZE = 256  # images per forward pass


# --- checks and small helpers ---------------------------------------------------------------------

def _check_inputs(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor) -> None:
    """Raises ValueError unless the model is in eval mode and the shapes agree."""
    if model.training:
        raise ValueError("the model must be in eval mode (call model.eval()): batch-norm statistics would "
                         "otherwise change with every perturbed batch")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if tuple(maps.shape) != (n, h, w):
        raise ValueError(f"maps must be (N, H, W) = {(n, h, w)} to match the images, got {tuple(maps.shape)}")
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be (N,) = ({n},), got {tuple(targets.shape)}")


def _as_targets(targets: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """Target classes as a long tensor on the images' device."""
    return torch.as_tensor(targets, dtype=torch.long, device=device)


@torch.no_grad()
def target_probability(model: nn.Module, images: Tensor, targets: Tensor,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Softmax probability of each image's target class, (N,), in forward passes of batch_size images."""
    probs = [F.softmax(model(chunk).float(), dim=1).gather(1, t[:, None]).squeeze(1)
             for chunk, t in zip(images.split(batch_size), targets.split(batch_size), strict=True)]
    return torch.cat(probs)


def _ranks(maps: Tensor, descending: bool, seed: int) -> Tensor:
    """Each pixel's position (N, H*W) when the pixels are sorted by map value, ties in a seeded random order."""
    n, hw = maps.shape[0], maps[0].numel()
    generator = torch.Generator().manual_seed(seed)
    # Shuffle, then a stable sort: tied pixels keep the shuffled order instead of the raster order
    # (which would delete the top rows of a flat region first).
    shuffle = torch.rand(n, hw, generator=generator).argsort(dim=1).to(maps.device)
    shuffled_order = maps.reshape(n, hw).gather(1, shuffle).argsort(dim=1, descending=descending, stable=True)
    order = shuffle.gather(1, shuffled_order)  # pixel indices, most salient first when descending
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(hw, device=maps.device).expand(n, hw))
    return ranks


def fill_images(images: Tensor, fill: Fill, blur_sigma: float = DEFAULT_BLUR_SIGMA) -> Tensor:
    """The image a pixel takes when removed: "mean" (0, the dataset mean once normalized), "blur", or a tensor."""
    if isinstance(fill, Tensor):
        return fill.to(images).expand_as(images)
    if fill == "mean":
        return torch.zeros_like(images)
    if fill == "blur":
        # torchvision pads by reflection, which needs the radius below the image side.
        radius = min(math.ceil(3 * blur_sigma), min(images.shape[-2:]) - 1)
        return gaussian_blur(images, kernel_size=[2 * radius + 1] * 2, sigma=[blur_sigma] * 2)
    raise ValueError(f"fill must be 'mean', 'blur' or a tensor, got {fill!r}")


# --- deletion and insertion -----------------------------------------------------------------------

def curve_fractions(steps: int, device: torch.device | None = None) -> Tensor:
    """The x axis of a deletion / insertion curve: fractions 0, 1/steps, ..., 1 of the pixels."""
    return torch.linspace(0, 1, steps + 1, device=device)


def curve_auc(curve: Tensor) -> Tensor:
    """Area under (..., steps + 1) curves sampled at equal fractions of [0, 1], by the trapezoid rule."""
    return torch.trapezoid(curve, curve_fractions(curve.shape[-1] - 1, curve.device), dim=-1)


@torch.no_grad()
def _reveal_curve(model: nn.Module, base: Tensor, reveal: Tensor, ranks: Tensor, targets: Tensor, steps: int,
                  batch_size: int) -> Tensor:
    """Target probability (N, steps + 1) as pixels move from base to reveal in rank order."""
    n, _, h, w = base.shape
    counts = torch.arange(steps + 1, device=base.device) * (h * w) // steps  # pixels revealed after step k
    # All (image, step) pairs in one flat list, so a forward pass mixes steps and images up to batch_size.
    pairs = torch.cartesian_prod(torch.arange(n, device=base.device), torch.arange(steps + 1, device=base.device))
    probs = []
    for chunk in pairs.split(batch_size):
        image, step = chunk[:, 0], chunk[:, 1]
        revealed = (ranks[image] < counts[step, None]).view(-1, 1, h, w)
        probs.append(target_probability(model, torch.where(revealed, reveal[image], base[image]), targets[image],
                                        batch_size))
    return torch.cat(probs).view(n, steps + 1)


def deletion_curve(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor | Sequence[int], *,
                   steps: int = DEFAULT_STEPS, fill: Fill = "mean", blur_sigma: float = DEFAULT_BLUR_SIGMA,
                   batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Tensor:
    """Target probability (N, steps + 1) as the most salient pixels are replaced by the fill, 0 to all of them."""
    targets = _as_targets(targets, images.device)
    _check_inputs(model, images, maps, targets)
    return _reveal_curve(model, images, fill_images(images, fill, blur_sigma), _ranks(maps, True, seed), targets,
                         steps, batch_size)


def insertion_curve(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor | Sequence[int], *,
                    steps: int = DEFAULT_STEPS, fill: Fill = "blur", blur_sigma: float = DEFAULT_BLUR_SIGMA,
                    batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Tensor:
    """Target probability (N, steps + 1) as the most salient pixels are restored onto the fill, 0 to all of them."""
    targets = _as_targets(targets, images.device)
    _check_inputs(model, images, maps, targets)
    return _reveal_curve(model, fill_images(images, fill, blur_sigma), images, _ranks(maps, True, seed), targets,
                         steps, batch_size)


# --- ROAD -----------------------------------------------------------------------------------------

def _neighbour_sum(x: Tensor) -> Tensor:
    """Weighted sum of each pixel's 8 neighbours inside the image, per channel: ROAD's weights (pytorch-grad-cam's
    road.py, from Rong et al.), 1/6 for the 4 edge neighbours and 1/12 for the 4 corners."""
    return _three_by_three(x) - x / 3


def _three_by_three(x: Tensor) -> Tensor:
    """ROAD's weights plus 1/3 at the centre, i.e. ([1, 2, 1] outer [1, 2, 1]) / 12, over a zero-padded image."""
    # Two 3-tap passes over shifted slices: ~4x faster than a depthwise conv2d in float64 on the CPU,
    # and the solver calls this once per iteration. Zero padding: outside pixels add nothing.
    padded = F.pad(x, (1, 1, 1, 1))
    rows = padded[..., :, :-2] + 2 * padded[..., :, 1:-1] + padded[..., :, 2:]
    return (rows[..., :-2, :] + 2 * rows[..., 1:-1, :] + rows[..., 2:, :]) / 12


@contextlib.contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """torch on one CPU thread for a while: the conjugate-gradient solve is many small products, where waking a
    second thread costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def noisy_linear_impute(images: Tensor, keep: Tensor, *, noise: float = ROAD_NOISE, seed: int = 0,
                        tol: float = 1e-8) -> Tensor:
    """ROAD's noisy linear imputation: each pixel where keep (N, H, W) is False becomes the weighted mean
    of its in-image neighbours (a linear system, solved by conjugate gradients), plus Gaussian noise."""
    x = images.double()
    known = keep.to(x).unsqueeze(1)
    # The equation at an unknown pixel i: weight_i * x_i - sum_j w_ij x_j = sum_k w_ik v_k, over its unknown
    # neighbours j and known neighbours k (values v), weight_i being the total weight of its in-image
    # neighbours (pytorch-grad-cam's sum_neighbors: 1 minus the weights that fall outside).
    weight = _neighbour_sum(torch.ones_like(x[:1, :1]))
    diagonal = weight + 1 / 3  # _three_by_three counts the pixel itself with 1/3
    # One system per (image, channel); the channels share a mask.
    b = ((1 - known) * _neighbour_sum(known * x)).flatten(0, 1).unsqueeze(1)
    unknown = (1 - known).expand_as(x).flatten(0, 1).unsqueeze(1)

    # The system is symmetric (the kernel is) and positive definite on every region that touches a
    # known pixel, so conjugate gradients (Jacobi-preconditioned) solve it without scipy, all systems at
    # once. Float64 to a 1e-8 relative residual: within ~1e-7 of the reference's direct solve. Where no
    # pixel is known (a flat map removes everything) the right-hand side is 0 and so is the answer, the
    # dataset mean: what the reference's spsolve returns there too.
    solution = torch.zeros_like(b)
    active = torch.arange(b.shape[0], device=b.device)  # the systems still iterating
    estimate = torch.zeros_like(b)
    residual = b
    direction = z = residual / weight
    rz = (residual * z).sum(dim=(2, 3), keepdim=True)
    threshold = tol * b.flatten(1).norm(dim=1)
    for _ in range(4 * x[0, 0].numel()):  # CG ends in at most H*W steps in exact arithmetic; 4x for rounding
        done = residual.flatten(1).norm(dim=1) <= threshold
        # Systems need 10 to 100+ iterations (more for larger holes): drop the finished ones once an eighth
        # of them are, which halves the work (a finished one left in stays put: its residual is ~0).
        if 8 * int(done.sum()) >= len(active):
            solution[active[done]] = estimate[done]
            left = ~done
            if not left.any():
                break
            active, estimate, residual, direction, rz, threshold, unknown = (
                t[left] for t in (active, estimate, residual, direction, rz, threshold, unknown))
        step = unknown * (diagonal * direction - _three_by_three(direction))
        curvature = (direction * step).sum(dim=(2, 3), keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-300), 0)
        estimate = estimate + alpha * direction
        residual = residual - alpha * step
        z = residual / weight
        rz_next = (residual * z).sum(dim=(2, 3), keepdim=True)
        direction = z + torch.where(rz > 0, rz_next / rz.clamp_min(1e-300), 0) * direction
        rz = rz_next
    else:
        raise RuntimeError("ROAD imputation: conjugate gradients did not converge")
    solution = solution.view_as(x)
    imputed = solution.to(images.dtype)
    if noise:
        generator = torch.Generator().manual_seed(seed)
        imputed = imputed + noise * torch.randn(images.shape, generator=generator).to(imputed)
    return torch.where(keep.unsqueeze(1), images, imputed)


def road_keep_masks(maps: Tensor, percentiles: Sequence[float] = ROAD_PERCENTILES, ties: Ties = "reference",
                    seed: int = 0) -> tuple[Tensor, Tensor]:
    """Pixels ROAD keeps, (N, P, H, W) each for MoRF and LeRF: those below the p-th percentile of the map
    (MoRF) or of 1 - map (LeRF)."""
    n, h, w = maps.shape
    if ties == "reference":
        # pytorch-grad-cam: `cam < np.percentile(cam, p)` in float32, and LeRF ranks 1 - cam (in float32,
        # so values within float32 rounding of each other tie). A tie at the threshold is removed whole:
        # a map that is 0 on more than p % of the image removes every pixel at that percentile.
        q = torch.tensor([p / 100 for p in percentiles], dtype=torch.float32, device=maps.device)
        masks = []
        for scores in (maps.float(), 1 - maps.float()):
            threshold = torch.quantile(scores.reshape(n, -1), q, dim=1).T  # (N, P), linear like numpy
            masks.append(scores[:, None] < threshold[:, :, None, None])
        return masks[0], masks[1]
    if ties == "random":
        # Keep exactly as many pixels as the reference keeps for a map without ties, ties in a seeded
        # random order: ceil(p / 100 * (H*W - 1)) pixels, numpy's linear percentile position rounded up.
        keep = torch.tensor([math.ceil(p / 100 * (h * w - 1)) for p in percentiles], device=maps.device)
        ascending = _ranks(maps, False, seed)
        morf = ascending[:, None] < keep[None, :, None]
        lerf = (h * w - 1 - ascending)[:, None] < keep[None, :, None]
        return morf.view(n, -1, h, w), lerf.view(n, -1, h, w)
    raise ValueError(f"ties must be 'reference' or 'random', got {ties!r}")


def road_combined(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor | Sequence[int], *,
                  percentiles: Sequence[float] = ROAD_PERCENTILES, noise: float = ROAD_NOISE,
                  ties: Ties = "reference", batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Tensor:
    """ROAD combined score (N,): (mean LeRF change - mean MoRF change) / 2 of the target's softmax probability."""
    targets = _as_targets(targets, images.device)
    _check_inputs(model, images, maps, targets)
    morf, lerf = road_keep_masks(maps, percentiles, ties, seed)
    keep = torch.cat([morf, lerf], dim=1)  # (N, 2P, H, W)
    before = target_probability(model, images, targets, batch_size)
    per_chunk = max(1, batch_size // keep.shape[1])  # images whose 2P imputations fill one forward pass
    after = []
    for start in range(0, images.shape[0], per_chunk):
        chunk = slice(start, start + per_chunk)
        copies = keep.shape[1]
        with _one_cpu_thread():
            imputed = noisy_linear_impute(images[chunk].repeat_interleave(copies, dim=0),
                                          keep[chunk].flatten(0, 1), noise=noise, seed=seed + start)
        after.append(target_probability(model, imputed, targets[chunk].repeat_interleave(copies), batch_size)
                     .view(-1, copies))
    change = torch.cat(after) - before[:, None]
    p = len(percentiles)
    return (change[:, p:].mean(dim=1) - change[:, :p].mean(dim=1)) / 2


# --- baselines ------------------------------------------------------------------------------------

def random_map(n: int, height: int, width: int, *, seed: int = 0) -> Tensor:
    """Uniform noise maps (N, H, W) in [0, 1), one per image, from a seeded generator."""
    return torch.rand(n, height, width, generator=torch.Generator().manual_seed(seed))


def centre_blob_map(n: int, height: int, width: int, *, sigma: float | None = None) -> Tensor:
    """The same Gaussian map (N, H, W) for every image: peak 1 at the image centre, sigma pixels
    (default a quarter of the shorter side, 8 px at 32x32), a "the object is in the middle" prior."""
    sigma = min(height, width) / 4 if sigma is None else sigma
    y = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    x = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    blob = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return (blob / blob.max()).expand(n, height, width).clone()


# --- all of them ----------------------------------------------------------------------------------

@dataclass
class Faithfulness:
    """Per-image faithfulness of one set of maps: row i of every tensor is image i."""

    deletion_auc: Tensor  # (N,), lower is better
    insertion_auc: Tensor  # (N,), higher is better
    road: Tensor  # (N,), ROAD combined, higher is better
    deletion_curve: Tensor  # (N, steps + 1), target probability at curve_fractions(steps)
    insertion_curve: Tensor  # (N, steps + 1)

    def rows(self) -> list[dict[str, float]]:
        """One dict of the three scores per image, for a table."""
        return [{"deletion_auc": float(d), "insertion_auc": float(i), "road": float(r)}
                for d, i, r in zip(self.deletion_auc, self.insertion_auc, self.road, strict=True)]


def faithfulness(model: nn.Module, images: Tensor, maps: Mapping[str, Tensor], targets: Tensor | Sequence[int], *,
                 steps: int = DEFAULT_STEPS, deletion_fill: Fill = "mean", insertion_fill: Fill = "blur",
                 blur_sigma: float = DEFAULT_BLUR_SIGMA, percentiles: Sequence[float] = ROAD_PERCENTILES,
                 noise: float = ROAD_NOISE, ties: Ties = "reference", batch_size: int = DEFAULT_BATCH_SIZE,
                 seed: int = 0) -> dict[str, Faithfulness]:
    """Deletion, insertion and ROAD for each {name: maps (N, H, W)} on the same images and targets."""
    results = {}
    for name, saliency in maps.items():
        deletion = deletion_curve(model, images, saliency, targets, steps=steps, fill=deletion_fill,
                                  blur_sigma=blur_sigma, batch_size=batch_size, seed=seed)
        insertion = insertion_curve(model, images, saliency, targets, steps=steps, fill=insertion_fill,
                                    blur_sigma=blur_sigma, batch_size=batch_size, seed=seed)
        road = road_combined(model, images, saliency, targets, percentiles=percentiles, noise=noise, ties=ties,
                             batch_size=batch_size, seed=seed)
        results[name] = Faithfulness(curve_auc(deletion), curve_auc(insertion), road, deletion, insertion)
    return results
