"""An exponential moving average of a model's weights (trainer.ema.decay), as timm's ModelEmaV3.

After every optimizer step each floating-point entry of the state dict (weights and the BatchNorm running
statistics alike) moves towards the trained model's: ema = decay * ema + (1 - decay) * raw, through
torch.optim.swa_utils' EMA update (one fused lerp per dtype). BatchNorm's running mean and variance are
averaged with the weights (not copied from the raw model, not recomputed): statistics from raw weights
would not fit the averaged ones, and recomputing them (swa_utils.update_bn) costs a pass over the training
set. Integer buffers (BatchNorm's num_batches_tracked) are copied. With `warmup`, the decay of update t is
min(decay, (1 + t) / (10 + t)), so early epochs are not dominated by the random initial weights.

The EMA is what the run validates, tests and selects best.pt by, and the checkpoint's `model` (what eval,
gradcam, predict and export load); the trained weights are `model_raw`, the update count `ema_updates`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightEma:
    """The EMA copy of `model` (same device, eval mode, no gradients), updated by update()."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0

    def current_decay(self) -> float:
        """The decay of the next update (warmup: smaller for the first few hundred updates)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step towards `model`'s current weights and buffers."""
        ema_float, raw_float = [], []
        raw_state = model.state_dict()
        for name, ema in self.module.state_dict().items():
            raw = raw_state[name].detach()
            if ema.is_floating_point():
                ema_float.append(ema)
                raw_float.append(raw)
            else:
                ema.copy_(raw)
        get_ema_multi_avg_fn(self.current_decay())(ema_float, raw_float, None)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """The EMA weights and update count a checkpoint saved (a resume continues the same average)."""
        self.module.load_state_dict(weights)
        self.updates = int(updates)
