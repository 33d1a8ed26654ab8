"""Where a run's weights start, and which of them train: fresh (with the architecture's data-dependent
init), a pretrained file (`model.pretrained`), frozen layers (`model.freeze`).

A pretrained file is read locally, never fetched: a cifar-cam run dir or .pt, a torchvision .pth state dict,
a timm / Hugging Face .safetensors or .bin. Its keys are matched to the model's after dropping DDP's
`module.` and torch.compile's `_orig_mod.` prefixes, directly or below the model's own prefixes (`net.`
for timm, `trunk.` / `head.` for torchvision). The classifier is newly initialized when its shape differs
(another class count); so is a stem that model.small_input replaced. Any other mismatch, or a file that
matches too little of the model, is one line naming the first tensors, before any training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_cam.data.arrays import DataSplits
from cifar_cam.data.batches import EvalBatches
from cifar_cam.errors import CheckpointError, ConfigError
from cifar_cam.io import write_bytes
from cifar_cam.models import Network

log = logging.getLogger("cifar_cam.train")

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MIN_MATCHED = 0.5        # a file must fill at least this share of the model's non-classifier tensors
INIT_IMAGES = 5000       # training images a data-dependent init (airbench's whitening) reads


@dataclass
class LoadReport:
    """What a pretrained file gave the model, by tensor name (pretrained.json)."""

    file: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)            # the model's tensors the file did not fill
    replaced: list[str] = field(default_factory=list)       # in both, another shape: classifier or stem
    skipped: list[str] = field(default_factory=list)        # the file's tensors not loaded (no place, or replaced)

    def line(self) -> str:
        return (f"model.pretrained: {len(self.loaded)} tensors loaded from {self.file} ({self.kind}), {len(self.new)} "
                f"newly initialized{self._some(self.new)}, {len(self.skipped)} of the file's skipped"
                f"{self._some(self.skipped)}")

    @staticmethod
    def _some(names: list[str]) -> str:
        if not names:
            return ""
        return f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def _bad_file(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"model.pretrained={path}: {why}")


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in `path` (a run dir, .pt/.pth/.ckpt/.bin, .safetensors) and what kind of file it was."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        found = [p / "checkpoints" / n for n in ("best.pt", "last.pt") if (p / "checkpoints" / n).is_file()]
        if not found:
            raise _bad_file(path, "a folder without checkpoints/best.pt: pass a cifar-cam train run dir or a file")
        p = found[0]
    if not p.is_file():
        raise _bad_file(path, "no such file; pass a local .pt / .pth / .safetensors / .bin or a train run dir "
                              "(weights are never downloaded)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu"), "safetensors"
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, pickled code: all one line
        raise _bad_file(path, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); a truncated "
                              "or corrupt file?") from None
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict) and "config" in payload:
        return payload["model"], "cifar-cam checkpoint"
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not payload or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise _bad_file(path, "holds no state dict (a dict of tensors)")
    return payload, "state dict"


def _unwrapped(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _under(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def load_pretrained(model: Network, path: str) -> LoadReport:
    """Fills `model` from the file at `path` (see the module docstring) and says what it did."""
    weights, kind = read_weights(path)
    ours = model.state_dict()
    prefixes = ("", *getattr(model, "state_prefixes", ()))
    classifier = model.get_classifier()
    head = [name for name, m in model.named_modules() if m is classifier]
    report = LoadReport(str(path), kind)
    matched: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, tensor in weights.items():
        target = next((p + _unwrapped(key) for p in prefixes if p + _unwrapped(key) in ours), None)
        if target is None:
            report.skipped.append(key)
        elif ours[target].shape == tensor.shape:
            matched[target] = tensor
        elif _under(target, (*head, *model.stem)):
            report.replaced.append(target)
            report.skipped.append(key)
        else:
            mismatched.append(f"{target} is {list(tensor.shape)} in the file, {list(ours[target].shape)} here")
    if mismatched:
        raise _bad_file(path, f"does not fit this model: {'; '.join(mismatched[:3])}"
                              f"{f' (and {len(mismatched) - 3} more)' if len(mismatched) > 3 else ''}")
    body = [k for k in ours if not _under(k, (*head, *model.stem))]
    filled = sum(k in matched for k in body)
    if not body or filled < MIN_MATCHED * len(body):
        raise _bad_file(path, f"fills {filled} of this model's {len(body)} tensors (the file's first: "
                              f"{', '.join(list(weights)[:3])}; the model's: {', '.join(body[:3])}): a file of "
                              "another architecture?")
    model.load_state_dict(matched, strict=False)
    report.loaded = sorted(matched)
    report.new = sorted(k for k in ours if k not in matched)
    report.skipped.sort()
    report.replaced.sort()
    return report


def write_report(report: LoadReport, out: Path) -> None:
    write_bytes(out / "pretrained.json", json.dumps(asdict(report), indent=2).encode())


# -- freezing ------------------------------------------------------------------------------------------------------

_FROZEN_CLASSES: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """`cls` (a BatchNorm class) whose train() keeps it in eval mode: its statistics stay the pretrained ones."""
    if cls not in _FROZEN_CLASSES:
        def train(self: nn.Module, mode: bool = True) -> nn.Module:
            return super(frozen, self).train(False)

        frozen = type(f"Frozen{cls.__name__}", (cls,), {"train": train})
        _FROZEN_CLASSES[cls] = frozen
    return _FROZEN_CLASSES[cls]


def _frozen_parts(model: Network, spec: Any) -> tuple[str, list[nn.Module], set[int]]:
    """(what to say, the modules whose BatchNorms freeze, the ids of the parameters that freeze)."""
    if spec == "backbone":  # a stem model.small_input replaced is new, like the classifier: both train
        stem = tuple(getattr(model, "stem", ()))
        train = [model.get_classifier(), *(model.get_submodule(n) for n in stem)]
        keep = {id(p) for m in train for p in m.parameters()}
        what = "everything but the classifier" + (f" and the adapted stem ({', '.join(stem)})" if stem else "")
        return what, [model], {id(p) for p in model.parameters() if id(p) not in keep}
    names = [str(n) for n in spec]
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        top = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(f"model.freeze: {unknown[0]!r} is not a module of this model; its top-level modules: {top}")
    chosen = [modules[n] for n in names]
    return ", ".join(names), chosen, {id(p) for m in chosen for p in m.parameters()}


def freeze(model: Network, spec: Any) -> bool:
    """model.freeze: no gradients for the frozen parameters, and the BatchNorms among them fixed in eval mode
    (their statistics too stay as loaded); whether anything froze."""
    if spec in (None, "none", False):
        return False
    what, modules, frozen = _frozen_parts(model, spec)
    for p in model.parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in _FROZEN_CLASSES.values():
                m.__class__ = _frozen_class(type(m))
                m.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model.freeze: %s frozen (weights and BatchNorm statistics); %s parameters train", what, f"{trainable:,}")
    return True


# -- the start -----------------------------------------------------------------------------------------------------

def init_from_data(model: Network, splits: DataSplits) -> None:
    """The architecture's data-dependent init (airbench's whitening), from up to INIT_IMAGES training images."""
    if not hasattr(model, "init_from_data"):
        return
    first = splits.train.take(np.arange(min(INIT_IMAGES, len(splits.train))))
    images = torch.cat([x for x, _ in EvalBatches(first, 1000, torch.device("cpu"), splits.mean, splits.std)])
    model.init_from_data(images)


def start_weights(model: Network, cfg: Any, splits: DataSplits, out: Path | None) -> None:
    """A new run's weights: model.pretrained's (pretrained.json in `out`), else the architecture's data-dependent
    init; then model.freeze."""
    pretrained = cfg.model.get("pretrained")
    if pretrained not in (None, "", False):
        if pretrained is True or str(pretrained).lower() == "true":
            raise ConfigError("model.pretrained=true would download weights, which cifar-cam never does; pass a "
                              "local file: model.pretrained=<run dir | .pt | .pth | .safetensors | .bin>")
        report = load_pretrained(model, str(pretrained))
        log.info(report.line())
        if out is not None:
            write_report(report, out)
    else:
        init_from_data(model, splits)
    freeze(model, cfg.model.get("freeze"))
