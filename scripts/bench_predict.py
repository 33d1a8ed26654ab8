"""How fast `cifar-cam predict` is against the model's forward pass alone, for torch and onnxruntime.

    python scripts/bench_predict.py [--data ../shared/data/cifar10-jpg.tar.gz] [--widths 64,16] [--limit N]

In one run, per model width (random weights: speed does not depend on them) and backend (eager
PyTorch fp32, onnxruntime fp32, onnxruntime int8): img/s of predict's pipeline over the test JPEGs
(read + decode in predict's background thread, one batch ahead, then the forward pass) against the
forward alone on the same images already decoded, at the same batch size. Prints the CPU it ran
on; compare the ratios, which are measured in the same run, not absolute figures across machines.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from cifar_cam.inference import contract as deploy
from cifar_cam.inference.inputs import find_inputs
from cifar_cam.inference.predictor import Predictor
from cifar_cam.inference.writers import quantize_int8, to_onnx
from cifar_cam.models import build_model
from cifar_cam.provenance import cpu_model  # noqa: E402
from cifar_cam.tasks.predict import decoded_batches  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_folder(archive: Path, into: Path, limit: int | None) -> Path:
    """The archive's test/ images as files (what a user points predict at)."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/test/" in f"/{m.name}"]
        tar.extractall(into, members=members[:limit] if limit else members, filter="data")
    return next(p for p in into.rglob("test") if p.is_dir())


def rates(predictor: Predictor, inputs: list, decoded: np.ndarray, batch: int) -> tuple[float, float]:
    """(predict pipeline img/s, forward-only img/s) over the same images."""
    predictor.backend.run(decoded[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(decoded), batch):
        predictor.backend.run(decoded[i:i + batch])
    forward = len(decoded) / (time.perf_counter() - start)
    start = time.perf_counter()
    n = 0
    for b in decoded_batches(inputs, batch, predictor.fit, 40_000_000, threads=4):
        predictor.top(predictor.logits(b.pixels), 3)
        n += len(b.inputs)
    return n / (time.perf_counter() - start), forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    parser.add_argument("--widths", default="64,16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test images")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = test_folder(Path(args.data), Path(tmp), args.limit)
        inputs = find_inputs(str(folder))
        print(f"images: {len(inputs)} JPEGs under {folder.name}/")
        print(f"{'width':>5} {'backend':<16} {'predict img/s':>14} {'forward img/s':>14} {'predict/forward':>16}")
        for width in (int(w) for w in args.widths.split(",")):
            torch.manual_seed(0)
            model = build_model("resnet18", num_classes=10, width=width).eval()
            torch_predictor = Predictor.from_model(model, CLASSES, 32, args.batch)
            decoded = torch_predictor.prepare([i.path for i in inputs])
            card = {"format_version": deploy.FORMAT_VERSION, "classes": CLASSES, "image_size": 32}
            onnx_path = to_onnx(model, Path(tmp) / f"w{width}.onnx", 32, card)
            int8_path = Path(tmp) / f"w{width}.int8.onnx"
            quantize_int8(onnx_path, int8_path, decoded[:256])  # speed only: which images calibrate is moot
            for name, predictor in (("torch fp32", torch_predictor),
                                    ("onnxruntime fp32", Predictor.load(onnx_path, batch_size=args.batch)),
                                    ("onnxruntime int8", Predictor.load(int8_path, batch_size=args.batch))):
                pipeline, forward = rates(predictor, inputs, decoded, args.batch)
                print(f"{width:>5} {name:<16} {pipeline:>14.1f} {forward:>14.1f} {pipeline / forward:>15.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
