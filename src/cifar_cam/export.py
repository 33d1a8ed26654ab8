"""Deployed model files: ONNX (`to_onnx`), torch.export (`to_pt2`), int8 ONNX (`quantize_int8`), their card.

Every file holds `deploy.DeployedModel`'s contract (uint8 NHWC RGB `images` -> `logits`, `features`), the
model card (JSON under `deploy.CARD_KEY`) and the classifier (JSON under `deploy.FC_KEY`, for CAM without
torch): in an .onnx as `metadata_props`, in a .pt2 as the extra files `cifar_cam.json` / `cifar_cam_fc.json`.
`read_card` / `read_classifier` read them back, refusing in one line (CheckpointError) a file cifar-cam did
not make, a truncated or corrupt one and an unknown suffix.

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
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_cam import deploy
from cifar_cam.errors import CheckpointError
from cifar_cam.io import atomic_path

SUFFIXES = (".onnx", ".pt2")
# what the int8 model quantizes: the convolutions, the classifier and the residual adds; the normalization
# (Cast, Sub, Mul on raw pixels) stays float, so the pixels reach the first Conv's input quantizer unrounded
INT8_OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "Relu")
CALIBRATION_BATCH = 64

Check = Callable[[Path], None]


def deployed(model: nn.Module) -> deploy.DeployedModel:
    """`model` wrapped in the deployed contract, as exported: a CPU fp32 NCHW copy in eval mode (the caller's
    model is not moved or changed)."""
    module = model if isinstance(model, deploy.DeployedModel) else deploy.DeployedModel(model)
    return copy.deepcopy(module).cpu().float().to(memory_format=torch.contiguous_format).eval()


def example_input(image_size: int, batch: int = 2) -> torch.Tensor:
    """A uint8 (batch, S, S, 3) example for tracing; 2, not 1: a size-1 dimension would be specialized."""
    return torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8,
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


def to_onnx(model: nn.Module, path: str | Path, image_size: int, card: dict[str, Any],
            fc: dict[str, Any] | None = None, opset: int = 18, check: Check | None = None) -> Path:
    """`model` as ONNX at `path`: input `images` uint8 [batch, S, S, 3] (batch dynamic), outputs `logits`,
    `features`; the card and classifier in metadata_props. `check(temp_path)` runs before the rename."""
    import onnx

    module = deployed(model)
    fc = deploy.classifier_of(module.model) if fc is None else fc
    with quiet_converters():
        program = torch.onnx.export(
            module, (example_input(image_size),), None, dynamo=True, opset_version=opset, verbose=False,
            input_names=[deploy.INPUT_NAME], output_names=list(deploy.OUTPUT_NAMES), dynamic_shapes=(_batch_dim(),),
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
    entries = {deploy.CARD_KEY: _json(card), deploy.FC_KEY: _json(fc)}
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value


def to_pt2(model: nn.Module, path: str | Path, image_size: int, card: dict[str, Any],
           fc: dict[str, Any] | None = None, check: Check | None = None) -> Path:
    """`model` as a torch.export program at `path` (batch dynamic); the card and classifier as extra files."""
    module = deployed(model)
    fc = deploy.classifier_of(module.model) if fc is None else fc
    with quiet_converters():
        program = torch.export.export(module, (example_input(image_size),), dynamic_shapes=(_batch_dim(),))
    path = Path(path)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp), extra_files={f"{deploy.CARD_KEY}.json": _json(card),
                                                           f"{deploy.FC_KEY}.json": _json(fc)})
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
            return None if batch is None else {deploy.INPUT_NAME: batch}

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


# ----------------------------------------------------------------------------- reading back


def read_card(path: str | Path) -> dict[str, Any]:
    """The model card of a cifar-cam .onnx or .pt2; CheckpointError (one line) for anything else."""
    return _read(Path(path))[0]


def read_classifier(path: str | Path) -> dict[str, Any]:
    """The classifier ({"weight", "bias"}) stored beside the card, for CAM from `features`."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (or is not a file); pass an exported .onnx or .pt2")
    if path.suffix == ".onnx":
        entries = _onnx_entries(path)
    elif path.suffix == ".pt2":
        entries = _pt2_entries(path)
    else:
        raise CheckpointError(f"{path}: unknown model format '{path.suffix}'; an exported model is "
                              f"{' or '.join(SUFFIXES)}")
    card_text, fc_text = entries.get(deploy.CARD_KEY), entries.get(deploy.FC_KEY)
    if not card_text or not fc_text:
        raise CheckpointError(f"{path} was not exported by cifar-cam (no '{deploy.CARD_KEY}' model card in it); "
                              "export one with `cifar-cam export ckpt=<run>`")
    try:
        card, fc = json.loads(card_text), json.loads(fc_text)
    except ValueError:
        raise CheckpointError(f"{path}: its cifar-cam model card is not valid JSON (corrupt file)") from None
    if not isinstance(card, dict) or not isinstance(fc, dict):
        raise CheckpointError(f"{path}: its cifar-cam model card is not a JSON object (corrupt file)")
    if card.get("format_version") != deploy.FORMAT_VERSION:
        raise CheckpointError(f"{path}: model card format {card.get('format_version')} is not the "
                              f"{deploy.FORMAT_VERSION} this cifar-cam reads; export it again")
    return card, fc


def _onnx_entries(path: Path) -> dict[str, str]:
    import onnx

    try:  # a full parse: protobuf refuses a file cut short (the weights come before the metadata)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable ONNX file (truncated or not ONNX: "
                              f"{type(e).__name__})") from None
    if not len(model.graph.node):
        raise CheckpointError(f"{path} is not a readable ONNX file (truncated or not ONNX: no graph)")
    return {p.key: p.value for p in model.metadata_props}


def _pt2_entries(path: Path) -> dict[str, str]:
    """The card's extra files, read from the .pt2 zip without deserializing the program; every member's CRC
    is checked, so a truncated or corrupted file is refused here, not when it is first run."""
    wanted = {f"{deploy.CARD_KEY}.json": deploy.CARD_KEY, f"{deploy.FC_KEY}.json": deploy.FC_KEY}
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"bad CRC in {bad}")
            entries = {}
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) >= 2 and parts[-2] == "extra" and parts[-1] in wanted:
                    entries[wanted[parts[-1]]] = archive.read(name).decode()
            return entries
    except (zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch.export file (truncated or not a .pt2: "
                              f"{type(e).__name__})") from None


# ----------------------------------------------------------------------------- running and comparing


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for `path` (`threads` intra-op threads; None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: not its per-session warnings on stderr
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield np.ascontiguousarray(images[start:start + batch_size])


def run_onnx(session: Any, images: np.ndarray, batch_size: int = 256, features: bool = True
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, features) of an onnxruntime session over uint8 images, in batches (features=False: logits,
    None; a test set's layer4 maps are ~33 KB an image at width 64)."""
    names = list(deploy.OUTPUT_NAMES) if features else [deploy.OUTPUT_NAMES[0]]
    outs = [session.run(names, {deploy.INPUT_NAME: b}) for b in batches(images, batch_size)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]) if features else None


def run_torch(module: Callable[[torch.Tensor], Sequence[torch.Tensor]], images: np.ndarray,
              batch_size: int = 256, features: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, features) of a DeployedModel-like module (eager or a loaded .pt2) over uint8 images."""
    logits, maps = [], []
    with torch.inference_mode():
        for b in batches(images, batch_size):
            out = module(torch.from_numpy(b))
            logits.append(out[0].float().numpy())
            if features:
                maps.append(out[1].float().numpy())
    return np.concatenate(logits), np.concatenate(maps) if features else None


def load_pt2(path: str | Path) -> Callable[[torch.Tensor], Sequence[torch.Tensor]]:
    """A saved .pt2's program as a callable module."""
    return torch.export.load(str(path)).module()


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """max abs difference and top-1 agreement of `candidate` logits with `reference` (both (N, K))."""
    if reference.shape != candidate.shape:
        return {"max_abs_diff": float("inf"), "top1_agreement": 0.0, "top1_same": 0, "images": len(reference)}
    same = int((reference.argmax(1) == candidate.argmax(1)).sum())
    diff = float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max()) if reference.size else 0.0
    return {"max_abs_diff": diff, "top1_agreement": same / max(1, len(reference)), "top1_same": same,
            "images": len(reference)}
