"""Reading deployed model files back: the model card and classifier an .onnx / .pt2 carries (`read_card`,
`read_classifier`), refusing in one line (CheckpointError) a file cifar-cam did not make, a truncated or corrupt
one and an unknown suffix; running them (an onnxruntime session, a loaded .pt2) and comparing their logits.
writers.py writes them; the Predictor (predictor.py) is how users load one.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_cam.errors import CheckpointError
from cifar_cam.inference import contract

SUFFIXES = (".onnx", ".pt2")



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
    card_text, fc_text = entries.get(contract.CARD_KEY), entries.get(contract.FC_KEY)
    if not card_text or not fc_text:
        raise CheckpointError(f"{path} was not exported by cifar-cam (no '{contract.CARD_KEY}' model card in it); "
                              "export one with `cifar-cam export ckpt=<run>`")
    try:
        card, fc = json.loads(card_text), json.loads(fc_text)
    except ValueError:
        raise CheckpointError(f"{path}: its cifar-cam model card is not valid JSON (corrupt file)") from None
    if not isinstance(card, dict) or not isinstance(fc, dict):
        raise CheckpointError(f"{path}: its cifar-cam model card is not a JSON object (corrupt file)")
    if card.get("format_version") != contract.FORMAT_VERSION:
        raise CheckpointError(f"{path}: model card format {card.get('format_version')} is not the "
                              f"{contract.FORMAT_VERSION} this cifar-cam reads; export it again")
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
    wanted = {f"{contract.CARD_KEY}.json": contract.CARD_KEY, f"{contract.FC_KEY}.json": contract.FC_KEY}
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
    names = list(contract.OUTPUT_NAMES) if features else [contract.OUTPUT_NAMES[0]]
    outs = [session.run(names, {contract.INPUT_NAME: b}) for b in batches(images, batch_size)]
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
