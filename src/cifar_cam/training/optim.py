"""Muon for convolution filters, SGD for the rest: `optimizer=muon`.

Muon (Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/) replaces each filter's update
by the nearest semi-orthogonal matrix to its (Nesterov) momentum, found with a few Newton-Schulz
iterations: every direction of the update moves at the same rate, which trains narrow networks in
fewer steps than SGD (airbench's CIFAR-10 speed records use it for their filters). This version
follows airbench94_muon: a 4-d filter is flattened to (out, in*kh*kw), and since a BatchNorm follows
every convolution (the loss does not see the filter's scale), the filter is renormalized to a
fixed norm before each step instead of being decayed; filters of equal shape share one batched
iteration (a launch per shape, not per filter). Everything that is not a conv filter (the
BatchNorm scales and shifts, the classifier) gets Nesterov SGD with weight decay, at
`lr * aux_lr_scale`, so that one `lr` and one scheduler drive both.

Written here rather than taken from `torch.optim.Muon` (torch >= 2.9 only, 2-d parameters only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from cifar_cam.training.device import cuda_has_bf16

# Quintic Newton-Schulz coefficients of Muon: they push singular values towards ~1 in few steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 3, dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for the SVD U S V^T of `g`, a matrix or a (B, m, n) stack of them, computed in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    transposed = x.size(-2) > x.size(-1)  # one answer for a whole stack: its matrices share a shape
    if transposed:
        x = x.mT
    # Each matrix by its own norm: spectral norm <= Frobenius norm <= 1, inside the iteration's basin.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.mT if transposed else x).to(g.dtype)


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA GPUs that run it natively (airbench runs the iteration in bf16: it only needs a direction), fp32
    elsewhere: V100 / T4 only emulate bf16, and on CPUs small filters gain nothing from AMX (docs/benchmarks.md)."""
    return torch.bfloat16 if device.type == "cuda" and cuda_has_bf16() else torch.float32


def is_filter(p: Tensor) -> bool:
    """Parameters that Muon updates: convolution filters (4-d)."""
    return p.ndim == 4


class Muon(torch.optim.Optimizer):
    """Muon on conv filters (`is_filter`), Nesterov SGD with weight decay on all other parameters.

    Two param groups, both scheduled through `lr`: group 0 the filters, group 1 the rest, whose
    step uses `lr * aux_lr_scale` (so schedulers, which rewrite every group's `lr`, keep the ratio). Given
    param groups (build_optimizer's backbone / classifier), each splits the same way.
    3 Newton-Schulz iterations by default, as airbench (Muon's usual 5 cost more per step).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, aux_lr_scale: float = 4.0, ns_steps: int = 3) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        params = list(params)
        incoming = params if params and isinstance(params[0], dict) else [{"params": params}]
        groups = []
        for given in incoming:  # each group splits in two: its filters (Muon) and the rest (SGD)
            extra = {k: v for k, v in given.items() if k not in ("params", "muon")}
            ps = list(given["params"])
            takes = given.get("muon", True)  # False: an architecture's filters it leaves to SGD (Network.no_muon)
            groups += [{**extra, "params": [p for p in ps if takes and is_filter(p)], "muon": True,
                        "weight_decay": 0.0, "lr_scale": 1.0},
                       {**extra, "params": [p for p in ps if not (takes and is_filter(p))], "muon": False,
                        "lr_scale": aux_lr_scale}]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__([g for g in groups if g["params"]], defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns the closure's loss, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr = group["lr"] * group["lr_scale"]
            updates = self._nesterov_momentum(group, params)
            if group["muon"]:
                updates = self._orthogonalized(params, updates, group["ns_steps"], ns_dtype(params[0].device))
            torch._foreach_add_(params, updates, alpha=-lr)
        return loss

    def _nesterov_momentum(self, group: dict, params: list[Tensor]) -> list[Tensor]:
        """Each parameter's (Nesterov) momentum update, with weight decay; updates the `momentum_buffer`s."""
        momentum = group["momentum"]
        grads = [p.grad for p in params]
        if group["weight_decay"]:  # 0 for the filters (set in __init__): their norm is fixed instead
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        for p, g in zip(params, grads, strict=True):
            if "momentum_buffer" not in self.state[p]:  # zeros: the first step's buffer is the gradient itself
                self.state[p]["momentum_buffer"] = torch.zeros_like(g)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs

    @staticmethod
    def _orthogonalized(filters: list[Tensor], updates: list[Tensor], steps: int, dtype: torch.dtype) -> list[Tensor]:
        """Renormalize each filter and orthogonalize its update; one Newton-Schulz run per (out, in*kh*kw) shape."""
        for p in filters:
            # Scale-invariant under the BatchNorm that follows: keep the norm at sqrt(out channels).
            p.mul_(p.size(0) ** 0.5 / (p.norm() + 1e-12))
        # Equal shapes share one batched iteration: ResNet18's 20 filters come in 11 shapes, and on a GPU
        # the cost of an iteration is its kernel launches (torch.stack also needs one dtype and device).
        by_shape: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            by_shape.setdefault((u.size(0), u[0].numel(), u.dtype, u.device), []).append(i)
        result: list[Tensor] = list(updates)
        for indices in by_shape.values():
            stack = torch.stack([updates[i].reshape(updates[i].size(0), -1) for i in indices])
            for i, u in zip(indices, orthogonalize(stack, steps, dtype), strict=True):
                result[i] = u.view_as(filters[i])
        return result


# -- building any optimizer over a model --------------------------------------------------------------------------

def apply_lr_factors(optimizer: torch.optim.Optimizer) -> None:
    """Each group's step runs at lr x its `lr_factor`: schedulers keep setting one lr for every group, and the
    factor is applied around each step (step hooks), so any optimizer and any scheduler keep the ratio."""
    def scale(opt: torch.optim.Optimizer, *_: object) -> None:
        for group in opt.param_groups:
            group["lr"] *= group.get("lr_factor", 1.0)

    def unscale(opt: torch.optim.Optimizer, *_: object) -> None:
        for group in opt.param_groups:
            group["lr"] /= group.get("lr_factor", 1.0)

    optimizer.register_step_pre_hook(scale)
    optimizer.register_step_post_hook(unscale)


NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _norm_shifts(model: nn.Module) -> set[int]:
    """ids of the normalization layers' shifts (BatchNorm, GroupNorm, LayerNorm .bias): what
    optimizer.bias_lr_scale speeds up (airbench's `norm_biases`; a convolution's bias is not one of them)."""
    return {id(m.bias) for m in model.modules() if isinstance(m, NORMS) and isinstance(m.bias, Tensor)}


def _check_keys(spec: dict[str, Any]) -> None:
    """ConfigError (one line) for an optimizer.* key the optimizer class does not take: a preset's momentum under
    optimizer=adam would otherwise be a TypeError inside its constructor."""
    import inspect

    from hydra.utils import get_class

    from cifar_cam.errors import ConfigError

    target = str(spec.get("_target_", ""))
    params = inspect.signature(get_class(target).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    extra = [k for k in spec if not k.startswith("_") and k not in params]
    if extra:
        takes = ", ".join(k for k in params if k not in ("self", "params"))
        raise ConfigError(f"optimizer.{extra[0]}: {target.rsplit('.', 1)[-1]} does not take it (it takes {takes}); "
                          f"drop it, or choose an optimizer that has it")


def build_optimizer(optimizer_cfg: Any, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    """`optimizer.*` over the model's trainable parameters (frozen ones are left out). With
    optimizer.backbone_lr_scale != 1 the classifier steps at lr and everything else at lr x the scale; with
    optimizer.bias_lr_scale != 1 BatchNorm (and other normalization) shifts step at lr x that scale with their decay
    divided by it (the same decay per step, as airbench); Muon leaves the architecture's `no_muon` filters to
    SGD. `overrides`: keys to replace (lr-find's start LR)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(optimizer_cfg, resolve=True) if OmegaConf.is_config(optimizer_cfg) \
        else dict(optimizer_cfg)
    backbone = float(spec.pop("backbone_lr_scale", 1.0))
    biases = float(spec.pop("bias_lr_scale", 1.0))
    spec.update(overrides)
    _check_keys(spec)
    factory = instantiate(spec)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    is_muon = str(spec.get("_target_", "")).endswith(".Muon")
    no_muon = tuple(getattr(model, "no_muon", ())) if is_muon else ()
    if backbone == 1.0 and biases == 1.0 and not no_muon:
        return factory([p for _, p in trainable])
    classifier = model.get_classifier() if backbone != 1.0 else None  # type: ignore[operator]
    head = {id(p) for p in classifier.parameters()} if classifier is not None else set()
    shifts = _norm_shifts(model)
    groups: dict[tuple[float, float, bool], list[Tensor]] = {}
    for name, p in trainable:
        factor = 1.0 if id(p) in head else backbone
        bias = biases if id(p) in shifts else 1.0
        muon = not any(name == m or name.startswith(m + ".") for m in no_muon)
        groups.setdefault((factor * bias, bias, muon), []).append(p)
    decay = float(spec.get("weight_decay", 0.0))
    optimizer = factory([{"params": ps, "lr_factor": factor, **({"weight_decay": decay / bias} if bias != 1.0 else {}),
                          **({} if muon else {"muon": False})} for (factor, bias, muon), ps in groups.items()])
    apply_lr_factors(optimizer)
    return optimizer
