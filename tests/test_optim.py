"""optimizer=muon: Newton-Schulz orthogonalization, the filter/rest split, and the SGD half matching torch's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_cam.models import build_model
from cifar_cam.optim import Muon, is_filter, ns_dtype, orthogonalize
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
