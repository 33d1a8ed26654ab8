"""optimizer=muon: Newton-Schulz orthogonalization, the filter/rest split, and the SGD half matching torch's.

Nothing here is timed: the batched iteration is checked by its results and its number of calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_cam.models import build_model
from cifar_cam.training import optim
from cifar_cam.training.device import resolve_precision
from cifar_cam.training.optim import Muon, is_filter, ns_dtype, orthogonalize
from conftest import TINY, only_run_dir, run_cli


@pytest.mark.parametrize("shape", [(16, 144), (128, 1152), (64, 32), (10, 10)])
def test_orthogonalize_maps_singular_values_near_one(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    # Singular values spread over four decades: a gradient's usual shape.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    g = u[:, :k] @ torch.diag(torch.logspace(-3, 1, k)) @ v[:, :k].T
    assert torch.linalg.svdvals(g)[0] / torch.linalg.svdvals(g)[k - 1] > 1e3
    assert orthogonalize(g).shape == g.shape
    # Muon's quintic iteration lands singular values in a band around 1, not exactly on it; more steps
    # pull more of the small ones up (3, the default: the top quarter; 5: the top half).
    for steps, top in ((3, k // 4), (5, k // 2)):
        s = torch.linalg.svdvals(orthogonalize(g, steps))
        assert s.max() < 1.25 and s[:top].min() > 0.7, (steps, s)


def test_newton_schulz_in_bf16_on_gpus_fp32_on_cpus() -> None:
    assert ns_dtype(torch.device("cpu")) == torch.float32
    torch.manual_seed(0)
    g = torch.randn(32, 288)
    s = torch.linalg.svdvals(orthogonalize(g, dtype=torch.bfloat16).float())
    assert orthogonalize(g, dtype=torch.bfloat16).dtype == torch.float32  # returned in the gradient's dtype
    assert 0.5 < s.min() and s.max() < 1.3, s


# The flattened (out, in*kh*kw) filter shapes of build_model("resnet18", 10, width=8): 20 filters, 11 shapes.
RESNET18_W8_SHAPES = [(8, 27), (8, 72), (16, 8), (16, 72), (16, 144), (32, 16), (32, 144), (32, 288), (64, 32),
                      (64, 288), (64, 576)]


@pytest.mark.parametrize("shape", [(5, 16, 144), (3, 64, 32), (4, 10, 10), (1, 8, 27)])  # wide, tall, square
def test_orthogonalizing_a_stack_equals_orthogonalizing_each_matrix(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    g = torch.randn(shape) * torch.logspace(-3, 2, shape[0]).view(-1, 1, 1)  # each matrix normalized by its own norm
    stacked = orthogonalize(g)
    assert stacked.shape == g.shape
    torch.testing.assert_close(stacked, torch.stack([orthogonalize(m) for m in g]), rtol=0, atol=1e-5)


def test_bf16_newton_schulz_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    for m, n in RESNET18_W8_SHAPES:
        g = torch.randn(4, m, n)
        full, half = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16)
        # Measured on these shapes (seeds 0-2): max |fp32 - bf16| 0.023 elementwise, 0.028 relative (Frobenius),
        # bf16 singular values in [0.667, 1.206]; the bounds leave ~2x margin.
        assert (full - half).abs().max() < 0.05, (m, n)
        assert ((full - half).norm(dim=(-2, -1)) / full.norm(dim=(-2, -1))).max() < 0.05, (m, n)
        s = torch.linalg.svdvals(half)
        assert 0.6 < s.min() and s.max() < 1.25, (m, n, s)  # the same band as fp32 lands in


@pytest.mark.parametrize("native", [False, True])
def test_newton_schulz_and_autocast_take_bf16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch,
                                                                      native: bool) -> None:
    """V100 / T4 report bf16 support only with emulation counted: both choices must then avoid bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    cuda = torch.device("cuda")
    assert ns_dtype(cuda) == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision("auto", cuda) == (torch.bfloat16 if native else torch.float16)


def _reference_step(params: list[torch.Tensor], bufs: dict[int, torch.Tensor], lr: float, momentum: float,
                    weight_decay: float, aux_lr_scale: float, ns_steps: int) -> None:
    """Muon's step written plainly, one filter at a time (the algorithm before batching)."""
    for i, p in enumerate(params):
        muon = is_filter(p)
        g = p.grad if muon else p.grad + weight_decay * p
        bufs[i] = g.clone() if i not in bufs else bufs[i] * momentum + g
        g = g + momentum * bufs[i]  # Nesterov
        if muon:
            p.mul_(p.size(0) ** 0.5 / (p.norm() + 1e-12))
            g = orthogonalize(g.reshape(g.size(0), -1), ns_steps).view_as(p)
        p.sub_((lr if muon else lr * aux_lr_scale) * g)


def test_batched_muon_steps_equal_the_per_filter_algorithm() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=8)
    ref = build_model("resnet18", 10, width=8)
    ref.load_state_dict(model.state_dict())
    opt = Muon(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, aux_lr_scale=4.0)
    bufs: dict[int, torch.Tensor] = {}
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):  # the second step reads the momentum buffers
        for m in (model, ref):
            m.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        with torch.no_grad():
            _reference_step(list(ref.parameters()), bufs, 0.05, 0.9, 5e-4, 4.0, 3)
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[i], rtol=1e-5, atol=1e-6)


def test_one_newton_schulz_run_per_filter_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("resnet18", 10, width=8)
    shapes = {(p.size(0), p[0].numel()) for p in model.parameters() if is_filter(p)}
    assert sorted(shapes) == RESNET18_W8_SHAPES  # width 64 has 11 shapes too: each 8x wider
    calls: list[tuple[int, ...]] = []

    def counting(g: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(g.shape))
        return orthogonalize(g, *args)

    monkeypatch.setattr(optim, "orthogonalize", counting)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    Muon(model.parameters()).step()
    assert len(calls) == len(RESNET18_W8_SHAPES) == 11
    assert sum(c[0] for c in calls) == 20  # every filter in exactly one stack


def test_filters_take_muon_and_the_rest_take_sgd() -> None:
    model = build_model("resnet18", 10, width=8)
    opt = Muon(model.parameters(), lr=0.1)
    filters, rest = opt.param_groups
    assert filters["muon"] and not rest["muon"]
    assert all(p.ndim == 4 for p in filters["params"]) and not any(is_filter(p) for p in rest["params"])
    assert len(filters["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert filters["weight_decay"] == 0 and rest["weight_decay"] == 5e-4 and rest["lr_scale"] == 4.0


def _filter_step(grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, bias=False)
    before = conv.weight.detach().clone()
    conv.weight.grad = torch.randn_like(conv.weight) * grad_scale
    Muon([conv.weight], lr=0.05).step()
    return before, conv.weight.detach()


def test_filter_step_ignores_gradient_scale_and_keeps_the_norm() -> None:
    before, small = _filter_step(1e-4)
    _, large = _filter_step(1e3)
    torch.testing.assert_close(small, large, atol=1e-5, rtol=1e-4)  # only the gradient's direction counts
    renormed = before * (16 ** 0.5 / before.norm())
    step = (small - renormed).reshape(16, -1)
    # Each of the 16 rows moved by about lr (orthonormal rows), and the norm stays near sqrt(16).
    assert torch.allclose(step.norm(dim=1), torch.full((16,), 0.05), rtol=0.25)
    assert abs(small.norm().item() - 4.0) < 0.1
    assert not torch.allclose(small, before)


def test_other_parameters_step_exactly_as_torch_sgd() -> None:
    torch.manual_seed(0)
    ours, ref = nn.Linear(6, 3), nn.Linear(6, 3)
    ref.load_state_dict(ours.state_dict())
    opt = Muon(ours.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, aux_lr_scale=4.0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-2)
    x = torch.randn(32, 6)
    for _ in range(3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_rest_steps_at_the_scheduled_lr_times_aux_lr_scale() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    opt = Muon(bn.parameters(), lr=0.1, momentum=0.0, weight_decay=0.0, aux_lr_scale=3.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)  # rewrites every group's lr
    for lr in (0.1, 0.05):
        before = bn.bias.detach().clone()
        bn.bias.grad = torch.ones(4)
        opt.step()
        torch.testing.assert_close(bn.bias.detach(), before - lr * 3.0)
        sched.step()


def _two_steps(resume_between: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=8)
    opt = Muon(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for step in range(2):
        if step == 1 and resume_between:  # a new process: fresh model and optimizer, loaded from the checkpoint
            saved = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            model = build_model("resnet18", 10, width=8)
            model.load_state_dict(saved["model"])
            opt = Muon(model.parameters(), lr=0.05)
            opt.load_state_dict(saved["optimizer"])
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def test_a_resumed_step_equals_an_uninterrupted_one() -> None:
    for a, b in zip(_two_steps(False), _two_steps(True), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # momentum buffers included


@pytest.mark.parametrize("kwargs, message", [({"lr": 0}, "lr must be > 0"), ({"momentum": 1.0}, "momentum"),
                                             ({"ns_steps": 0}, "ns_steps")])
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Muon(nn.Linear(2, 2).parameters(), **kwargs)


def test_train_with_muon_learns_and_resumes(tmp_path: Path) -> None:
    """Through the CLI: optimizer=muon trains TINY past chance, and a resumed run restores its two groups."""
    args = [*TINY, "optimizer=muon"]  # plateau: a finished run may be extended
    first = run_cli("train", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = only_run_dir(tmp_path / "outputs" / "train")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] > 0.5, summary  # 10 classes: chance is 0.1
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["optimizer"]
    assert [g["muon"] for g in state["param_groups"]] == [True, False]
    again = run_cli("train", f"ckpt={run}", "trainer.epochs=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 3
