"""Where and how the numbers are computed: the device, the autocast precision and the memory format, for every
command (training, evaluation, prediction, serving)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from cifar_cam.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if present, else cpu; refuses a CUDA device that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name} but CUDA is not available here; use trainer.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.precision -> autocast dtype (fp32: none)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later): oneDNN then runs bf16 convolutions fast."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up; absent: assume none
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def cuda_has_bf16() -> bool:
    """Whether the current CUDA GPU runs bf16 natively (Ampere and later); emulated bf16 does not count."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. 'auto': bf16 on CUDA (fp16 where bf16 is missing) and on CPUs
    with AMX; fp32 on other CPUs, where bf16 is slower than fp32 (measured in docs/benchmarks.md).
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            # including_emulation=False: V100 / T4 only emulate bf16 (slowly); they take fp16 + GradScaler
            return torch.bfloat16 if cuda_has_bf16() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_amx() else None
    return AMP_DTYPES[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """What resolve_precision chose, in trainer.precision's words: 'bf16', 'fp16' or 'fp32'."""
    return next((name for name, amp in AMP_DTYPES.items() if amp == dtype), "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision when `dtype` is set, else a no-op."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_memory_format(model: nn.Module) -> torch.memory_format:
    """The memory format of the model's first conv weight: batches are laid out to match it.

    A conv runs channels_last when either its input or its weight is, so channels_last batches
    would silently override trainer.channels_last=false; matching the model honours the flag.
    """
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous():
            channels_last = p.is_contiguous(memory_format=torch.channels_last)
            return torch.channels_last if channels_last else torch.contiguous_format
        if p.dim() == 4 and p.shape[2:].numel() > 1:  # a contiguous k x k weight (k > 1): NCHW
            return torch.contiguous_format
    return torch.contiguous_format


# oneDNN (torch 2.14.1, AVX2 CPUs) crashes or spins in the weight gradient of a strided 1x1 conv with
# fewer than this many input channels in channels_last (../GOTCHAS.md); NCHW is fine.
ONEDNN_MIN_CHANNELS = 8


def unsafe_channels_last(model: nn.Module, device: torch.device) -> str | None:
    """Why `model` must not train in channels_last on `device` (the oneDNN fault), or None when it may."""
    if device.type != "cpu":
        return None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                and m.in_channels < ONEDNN_MIN_CHANNELS):
            return (f"{name} is a strided 1x1 convolution with {m.in_channels} input channels (< "
                    f"{ONEDNN_MIN_CHANNELS}), whose channels_last backward crashes or hangs in oneDNN on CPUs")
    return None


def training_memory_format(model: nn.Module, device: torch.device, channels_last: bool
                           ) -> tuple[torch.memory_format, str | None]:
    """The memory format to train `model` in: channels_last when asked and safe; with the reason when refused."""
    if not channels_last:
        return torch.contiguous_format, None
    reason = unsafe_channels_last(model, device)
    return (torch.contiguous_format, reason) if reason else (torch.channels_last, None)
