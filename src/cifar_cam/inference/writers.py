"""Writing deployed model files: ONNX (`to_onnx`), torch.export (`to_pt2`), int8 ONNX (`quantize_int8`), each with
its model card.

Every file holds `contract.DeployedModel`'s contract (uint8 NHWC RGB `images` -> `logits`, `features`), the
model card (JSON under `contract.CARD_KEY`) and the classifier (JSON under `contract.FC_KEY`, for CAM without
torch): in an .onnx as `metadata_props`, in a .pt2 as the extra files `cifar_cam.json` / `cifar_cam_fc.json`.
readers.py reads them back.

Each writer writes a temp file beside its target (io.atomic_path) and renames it into place only when
`check(temp_path)` (optional) has passed: an interrupted or failed export leaves no half-written file.

The ONNX file comes from torch 2.14's default exporter (dynamo: `torch.onnx.export(..., dynamo=True)`),
which handles the uint8 -> float cast and a dynamic batch dimension as they are: no TorchScript exporter.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_cam.inference import contract
from cifar_cam.inference.readers import batches, read_card, read_classifier
from cifar_cam.io import atomic_path

# what the int8 model quantizes: the convolutions, the classifier and the residual adds; the normalization
# (Cast, Sub, Mul on raw pixels) stays float, so the pixels reach the first Conv's input quantizer unrounded
INT8_OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "Relu")


CALIBRATION_BATCH = 64


Check = Callable[[Path], None]


def deployed(model: nn.Module, mean: tuple[float, ...] | None = None,
             std: tuple[float, ...] | None = None) -> contract.DeployedModel:
    """`model` wrapped in the deployed contract (its normalization inside: `mean` / `std`, CIFAR-10's by default),
    as exported: a CPU fp32 NCHW copy in eval mode (the caller's model is not moved or changed)."""
    norm = {} if mean is None or std is None else {"mean": tuple(mean), "std": tuple(std)}
    module = model if isinstance(model, contract.DeployedModel) else contract.DeployedModel(model, **norm)
    return copy.deepcopy(module).cpu().float().to(memory_format=torch.contiguous_format).eval()


def example_input(image_size: int | tuple[int, int], batch: int = 2) -> torch.Tensor:
    """A uint8 (batch, H, W, 3) example for tracing (a side or (H, W)); 2, not 1: a size-1 dimension would be
    specialized."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


# Loggers of the converters: their INFO lines (every optimizer pass) would drown the task's own
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "onnxruntime", "torch.onnx", "torch.export", "torch._export",
                 "torch.fx.experimental.symbolic_shapes")


def _from_converters(record: logging.LogRecord) -> bool:
    """False for a converter's INFO line logged on the root logger (onnxruntime.quantization's logging.info)."""
    return record.levelno >= logging.WARNING or not any(f"{n}{os.sep}" in record.pathname
                                                        for n in ("onnxruntime", "onnxscript", "onnx_ir"))


@contextlib.contextmanager
def quiet_converters() -> Iterator[None]:
    """Warnings and errors of torch.onnx / onnxscript / onnxruntime still show; their INFO chatter does not."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    root = logging.getLogger()
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    root.addFilter(_from_converters)
    try:
        yield
    finally:
        root.removeFilter(_from_converters)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1)}


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def to_onnx(model: nn.Module, path: str | Path, image_size: int | tuple[int, int], card: dict[str, Any],
            fc: dict[str, Any] | None = None, opset: int = 18, check: Check | None = None) -> Path:
    """`model` as ONNX at `path`: input `images` uint8 [batch, S, S, 3] (batch dynamic), outputs `logits`,
    `features`; the card and classifier in metadata_props. `check(temp_path)` runs before the rename."""
    import onnx

    module = deployed(model)
    fc = contract.classifier_of(module.model) if fc is None else fc
    with quiet_converters():
        program = torch.onnx.export(
            module, (example_input(image_size),), None, dynamo=True, opset_version=opset, verbose=False,
            input_names=[contract.INPUT_NAME], output_names=list(contract.OUTPUT_NAMES), dynamic_shapes=(_batch_dim(),),
        )
    proto = program.model_proto
    _set_metadata(proto, card, fc)
    proto.doc_string = "cifar-cam: uint8 NHWC RGB images -> logits, layer4 features"
    path = Path(path)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save_model(proto, str(tmp))  # inline weights: ResNet18 is far below protobuf's 2 GB
        if check is not None:
            check(tmp)
    return path


def _set_metadata(proto: Any, card: dict[str, Any], fc: dict[str, Any]) -> None:
    entries = {contract.CARD_KEY: _json(card), contract.FC_KEY: _json(fc)}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def to_pt2(model: nn.Module, path: str | Path, image_size: int | tuple[int, int], card: dict[str, Any],
           fc: dict[str, Any] | None = None, check: Check | None = None) -> Path:
    """`model` as a torch.export program at `path` (batch dynamic); the card and classifier as extra files."""
    module = deployed(model)
    fc = contract.classifier_of(module.model) if fc is None else fc
    with quiet_converters():
        program = torch.export.export(module, (example_input(image_size),), dynamic_shapes=(_batch_dim(),))
    path = Path(path)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp), extra_files={f"{contract.CARD_KEY}.json": _json(card),
                                                           f"{contract.FC_KEY}.json": _json(fc)})
        if check is not None:
            check(tmp)
    return path


def quantize_int8(onnx_path: str | Path, out_path: str | Path, calibration_images: np.ndarray,
                  card: dict[str, Any] | None = None, check: Check | None = None) -> Path:
    """Static int8 quantization of a cifar-cam .onnx: QDQ, per-channel int8 weights, uint8 activations
    (onnxruntime's U8S8, its fast path on x86), MinMax-calibrated on `calibration_images` (uint8, training
    images, never test). The card (default: `onnx_path`'s, plus a `quantization` entry) goes into its metadata.

    The uint8 input and its cast are left alone: only INT8_OP_TYPES are quantized, so the first quantizer
    sits on the normalized float input of the first Conv.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source_card, fc = read_card(onnx_path), read_classifier(onnx_path)
    card = dict(source_card if card is None else card)
    card.setdefault("quantization", {"method": "onnxruntime static, QDQ, per-channel int8 weights, uint8 "
                                               "activations, MinMax", "calibration_images": len(calibration_images)})
    # int8 is not held to the fp32 tolerance: its accuracy beside fp32 is in export.json, not a pass/fail check
    card["checked"] = False
    images = np.asarray(calibration_images, dtype=np.uint8)

    class Calibration(CalibrationDataReader):
        """The calibration images, CALIBRATION_BATCH at a time."""

        def __init__(self) -> None:
            self._batches = batches(images, CALIBRATION_BATCH)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {contract.INPUT_NAME: batch}

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="cifar-cam-int8-") as work, quiet_converters():
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared))  # shape inference + folding: what the quantizer expects
        quantized = Path(work) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(INT8_OP_TYPES))
        proto = onnx.load(str(quantized))
        _set_metadata(proto, card, fc)
        with atomic_path(out_path, suffix=".onnx") as tmp:
            onnx.save_model(proto, str(tmp))
            if check is not None:
                check(tmp)
    return out_path
