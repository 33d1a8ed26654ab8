"""`Predictor`: the one way to load a trained model (a checkpoint, ONNX or torch.export) and turn images
into predictions; `cifar-cam predict`, export's checks and `serve` all use it.

    from cifar_cam import Predictor
    predictor = Predictor.load("outputs/train/<run>")        # a run dir, .pt, .onnx or .pt2
    results = predictor(["cat.jpg", "dog.png"], topk=3)       # or uint8 RGB arrays (N, H, W, 3), any size
    results[0].label, results[0].probability                  # 'cat', 0.91
    maps = predictor.cam(images)                              # (N, H, W) in [0, 1], at the feature layer
    Predictor.load(run, calibration="outputs/eval/<run>")      # probabilities softmax(logits / T)

Every format runs `contract.DeployedModel`'s contract (uint8 NHWC RGB in; logits and the feature map
out), so the three agree to ~1e-5 on the same pixels. Images of any size are made model-ready by
`data.decode` (the card's size and resize policy), the way `data=folder` makes its training images.

Probabilities are softmax(logits / temperature): T = 1 unless a calibration is given (the calibration.json of
`cifar-cam eval eval.calibrate=true`) or an exported file's card carries one; logits stay the model's own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_cam.data.arrays import CIFAR10_MEAN, CIFAR10_STD
from cifar_cam.data.decode import Fit
from cifar_cam.errors import CheckpointError, ConfigError
from cifar_cam.explain.calibration import Calibration, read_calibration, softmax
from cifar_cam.inference import contract
from cifar_cam.inference.inputs import MODEL_SUFFIXES

log = logging.getLogger("cifar_cam")

SUFFIXES = MODEL_SUFFIXES
MAX_PIXELS = 40_000_000  # predict.max_pixels' default: a larger image file is refused from its header


@dataclass(frozen=True)
class TopK:
    """One image's top-k classes: their names and probabilities, most probable first."""

    classes: list[str]
    probabilities: list[float]
    indices: list[int] = field(repr=False)

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.classes[0]

    @property
    def probability(self) -> float:
        """Its probability."""
        return self.probabilities[0]


class _Backend:
    """Runs the deployed contract on uint8 (N, S, S, 3) batches; `layers`: its CAM layers, the feature layer last."""

    layers: tuple[str, ...] = ("layer4",)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # logits, features
        raise NotImplementedError

    def cam(self, images: np.ndarray, layer: str, classes: np.ndarray, fc_weight: np.ndarray) -> np.ndarray:
        """Maps at the input size: CAM from the exported features (= Grad-CAM there where the head averages)."""
        _, features = self.run(images)
        return contract.cam_from_features(features, fc_weight, classes, images.shape[1:3])


def torch_cam_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """The CAM layers a .pt model offers: its stages (top-level layer* / block* modules) and declared CAM layers,
    the feature layer last."""
    declared = list(getattr(model, "cam_layers", None) or ("layer4",))
    feature = getattr(model, "feature_layer", None) or declared[-1]
    stages = [n for n, _ in model.named_children() if n.startswith(("layer", "block"))]
    return (*[n for n in dict.fromkeys([*stages, *declared]) if n != feature], feature)


class _TorchBackend(_Backend):
    """Any module of the model is a CAM layer here; `layers` are the ones the architecture declares."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.model, self.device, self.amp_dtype, self.mean, self.std = model, device, amp_dtype, mean, std
        self.layers = torch_cam_layers(model)
        self.deployed = contract.DeployedModel(model, mean, std).to(device).eval()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                                    enabled=self.amp_dtype is not None):
            logits, features = self.deployed(x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()

    def cam(self, images: np.ndarray, layer: str, classes: np.ndarray, fc_weight: np.ndarray) -> np.ndarray:
        from cifar_cam.data.batches import Normalizer
        from cifar_cam.explain.cam import GradCAM

        x = Normalizer(self.device, self.mean, self.std)(torch.from_numpy(np.ascontiguousarray(images)))
        with GradCAM(self.model, [layer]) as cam:
            return cam(x, targets=torch.as_tensor(classes))[layer].numpy()


class _OnnxBackend(_Backend):
    def __init__(self, path: Path, threads: int | None, layers: tuple[str, ...]) -> None:
        self.layers = layers
        from cifar_cam.inference.readers import onnx_session

        try:
            self.session = onnx_session(path, threads)
        except Exception as e:  # onnxruntime raises its own exception types
            raise CheckpointError(f"ckpt={path} is not a loadable ONNX model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from None

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(list(contract.OUTPUT_NAMES), {contract.INPUT_NAME: images})
        return logits, features


class _ExportedBackend(_Backend):
    def __init__(self, module: torch.nn.Module, layers: tuple[str, ...]) -> None:
        self.module, self.layers = module, layers

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, features = self.module(torch.from_numpy(np.ascontiguousarray(images)))
        return logits.numpy(), features.numpy()


def _card_calibration(card: dict[str, Any], path: Path) -> Calibration | None:
    """The temperature `cifar-cam export export.calibration=...` wrote into an exported file's card, if any."""
    entry = card.get("calibration")
    t = entry.get("temperature") if isinstance(entry, dict) else None
    if not (isinstance(t, int | float) and not isinstance(t, bool) and np.isfinite(t) and t > 0):
        return None
    return Calibration(float(t), str(entry.get("source") or path), list(card["classes"]), dict(entry))


class Predictor:
    """A trained model behind one call: images (uint8 RGB arrays of any size, or file paths) -> top-k.

    `Predictor.load(path)` takes a train run dir or a `.pt` checkpoint (PyTorch, every CAM layer), or an
    exported `model.onnx` (onnxruntime) / `model.pt2` (torch.export) (CAM at the feature layer only). `calibration` (a
    `Calibration`, or None for T = 1) sets the temperature of the probabilities.
    """

    def __init__(self, backend: _Backend, classes: Sequence[str], fit: Fit, fc_weight: np.ndarray,
                 source: str, kind: str, batch_size: int = 256, card: dict[str, Any] | None = None,
                 max_pixels: int | None = MAX_PIXELS, calibration: Calibration | None = None) -> None:
        self.backend, self.classes, self.fit = backend, list(classes), Fit.of(fit)
        self.image_size = self.fit.size  # (height, width) of the model's input
        self.fc_weight, self.source, self.kind, self.batch_size = fc_weight, source, kind, int(batch_size)
        self.card, self.max_pixels = card or {}, max_pixels
        if calibration is not None and calibration.classes is not None and calibration.classes != self.classes:
            raise ConfigError(f"calibration={calibration.source} was fitted for the classes "
                              f"{calibration.classes[:4]}..., but the model has {self.classes[:4]}...; "
                              "calibrate this model (cifar-cam eval ckpt=... eval.calibrate=true)")
        fitted = ((calibration.info.get("checkpoint") or {}).get("sha256") if calibration is not None else None)
        model_sha = (self.card.get("source") or {}).get("sha256")  # the checkpoint this model came from
        if fitted and model_sha and fitted != model_sha:
            log.warning("calibration=%s was fitted on another checkpoint (%s) than this model's: its temperature "
                        "may not fit", calibration.source, (calibration.info.get("checkpoint") or {}).get("path"))
        tta = (calibration.info.get("fitted_on") or {}).get("tta") if calibration is not None else None
        if tta:
            log.warning("calibration=%s was fitted on TTA logits (eval.tta=%s); these predictions have no TTA, so "
                        "its temperature may be off", calibration.source, str(tta).lower())
        self.calibration = calibration

    @property
    def temperature(self) -> float:
        """T of the probabilities softmax(logits / T); 1.0 uncalibrated."""
        return 1.0 if self.calibration is None else self.calibration.temperature

    @classmethod
    def from_model(cls, model: torch.nn.Module, classes: Sequence[str], image_size: Any = 32,
                   batch_size: int = 256, calibration: Calibration | None = None,
                   mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> Predictor:
        """A Predictor around an eager model already in memory (CPU, fp32): notebooks, benchmarks; `image_size` a
        side, [H, W] or a Fit, `mean` / `std` the normalization it was trained with."""
        backend = _TorchBackend(model.eval(), torch.device("cpu"), None, tuple(mean), tuple(std))
        return cls(backend, classes, Fit.of(image_size), contract.classifier_of(model)["weight"], "in memory",
                   "torch", batch_size, calibration=calibration)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 256,
             precision: str = "fp32", threads: int | None = None, max_pixels: int | None = MAX_PIXELS,
             calibration: str | Path | Calibration | None = None) -> Predictor:
        """The model at `path` (run dir, .pt, .onnx, .pt2); `device` and `precision` apply to PyTorch (.pt);
        image files over `max_pixels` are refused from their header; raises CheckpointError (one line) for
        anything else. `calibration`: a calibration.json or the eval run dir holding it (ConfigError if it
        is not one); without it, an exported file's card may carry a temperature (`export.calibration`)."""
        if calibration is not None and not isinstance(calibration, Calibration):
            calibration = read_calibration(calibration)  # a bad file: one line before the model loads
        p = Path(path).expanduser()
        if not p.exists():
            raise CheckpointError(f"ckpt={p} does not exist; pass a train run dir, a .pt, .onnx or .pt2 file")
        if p.is_dir() or p.suffix == ".pt":
            from cifar_cam.training.checkpoint import cached_checkpoint, fit_of, model_from_checkpoint, normalization_of
            from cifar_cam.training.device import resolve_device, resolve_precision

            payload = cached_checkpoint(p, "best")
            dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
            model = model_from_checkpoint(payload).to(dev, memory_format=torch.channels_last).eval()  # as eval
            fit, (mean, std) = fit_of(payload), normalization_of(payload)
            backend = _TorchBackend(model, dev, resolve_precision(precision, dev), mean, std)
            card = {"classes": list(payload["classes"]), "image_size": list(fit.size), "resize": fit.to_dict(),
                    "mean": list(mean), "std": list(std)}
            if calibration is not None:  # to tell whether the temperature was fitted on this very checkpoint
                from cifar_cam.io import sha256

                card["source"] = {"checkpoint": str(payload["path"]), "sha256": sha256(payload["path"])}
            return cls(backend, payload["classes"], fit, contract.classifier_of(model)["weight"],
                       str(payload["path"]), "torch", batch_size, card, max_pixels, calibration)
        if p.suffix not in (".onnx", ".pt2"):
            raise CheckpointError(f"ckpt={p}: unknown model format '{p.suffix}'; cifar-cam reads a train run dir, "
                                  f"{', '.join(SUFFIXES)}")
        from cifar_cam.inference.readers import load_pt2, read_card, read_classifier

        card, fc = read_card(p), read_classifier(p)  # one line for a foreign, truncated or old file
        # cards before the zoo: ResNet18's layer4; "cam": null: a head that is more than a linear layer, no CAM
        layers = (str(card.get("feature_layer") or "layer4"),) if card.get("cam", "") is not None else ()
        if p.suffix == ".onnx":
            backend: _Backend = _OnnxBackend(p, threads, layers)
        else:
            try:
                backend = _ExportedBackend(load_pt2(p), layers)
            except Exception as e:
                raise CheckpointError(f"ckpt={p} is not a loadable torch.export file ({type(e).__name__})") from None
        if calibration is None:
            calibration = _card_calibration(card, p)
        fit = Fit.from_dict(card.get("resize"), card["image_size"])  # older cards: stretch to image_size
        return cls(backend, card["classes"], fit, np.asarray(fc["weight"]), str(p), p.suffix[1:], batch_size, card,
                   max_pixels, calibration)

    # -- images ------------------------------------------------------------------------------------
    def prepare(self, images: np.ndarray | Sequence[np.ndarray | str | Path]) -> np.ndarray:
        """uint8 (N, H, W, 3) at the model's size from uint8 RGB arrays (N, h, w, 3) / a list of (h, w, 3)
        arrays of any size, or file paths: made to fit as the model's training images were (its card's size and
        resize policy; files decoded as `data=folder` decodes them)."""
        from cifar_cam.data.decode import decode_rgb, fit_image

        h, w = self.fit.size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype != np.uint8 or images.shape[-1] != 3:
                raise ValueError(f"images must be uint8 RGB (N, H, W, 3), got {images.dtype} {images.shape}")
            if images.shape[1:3] == (h, w):
                return images
            return np.stack([fit_image(im, self.fit)[0] for im in images]) if len(images) else images[:, :h, :w]
        out = np.empty((len(images), h, w, 3), np.uint8)
        for i, item in enumerate(images):
            if isinstance(item, str | Path):
                out[i] = decode_rgb(Path(item).read_bytes(), str(item), self.fit, max_pixels=self.max_pixels)
            else:
                array = np.asarray(item)
                if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                    raise ValueError(f"image {i} must be uint8 RGB (H, W, 3), got {array.dtype} {array.shape}")
                out[i] = fit_image(array, self.fit)[0]
        return out

    # -- predictions -------------------------------------------------------------------------------
    def logits(self, images: np.ndarray | Sequence[np.ndarray | str | Path]) -> np.ndarray:
        """float32 logits (N, num_classes), in batches of `batch_size`."""
        batch = self.prepare(images)
        parts = [self.backend.run(batch[i:i + self.batch_size])[0] for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """softmax(logits / temperature) in float64 (N, num_classes): rows sum to 1."""
        return softmax(logits, self.temperature)

    def top(self, logits: np.ndarray, topk: int = 3) -> list[TopK]:
        """Logits -> one TopK per row, probabilities at the Predictor's temperature."""
        k = max(1, min(int(topk), len(self.classes)))
        probs = self.probabilities(logits)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [TopK([self.classes[j] for j in row], [float(probs[i, j]) for j in row], [int(j) for j in row])
                for i, row in enumerate(order)]

    def __call__(self, images: np.ndarray | Sequence[np.ndarray | str | Path], topk: int = 3) -> list[TopK]:
        """The top-k classes and probabilities of each image."""
        return self.top(self.logits(images), topk)

    @property
    def cam_layers(self) -> tuple[str, ...]:
        """The model's CAM layers, the feature layer (the default, and an exported file's only one) last."""
        return self.backend.layers

    def cam(self, images: np.ndarray | Sequence[np.ndarray | str | Path], layer: str | None = None,
            targets: Sequence[int] | None = None) -> np.ndarray:
        """Grad-CAM maps (N, H, W) in [0, 1] of the predicted class (or `targets`) at `layer` (None: the feature
        layer; a .pt model takes any of its modules)."""
        if not self.cam_layers:
            raise ConfigError(f"this {self.kind} model has no CAM: its head is more than one linear layer over the "
                              "pooled features; use the .pt checkpoint for Grad-CAM")
        layer = self.cam_layers[-1] if layer is None else layer
        if self.kind != "torch" and layer not in self.backend.layers:
            raise ConfigError(f"layer={layer}: a {self.kind} model gives CAM at {', '.join(self.backend.layers)} only"
                              + ("; use the .pt checkpoint for other layers" if self.kind != "torch" else ""))
        batch = self.prepare(images)
        out = []
        for i in range(0, len(batch), self.batch_size):
            part = batch[i:i + self.batch_size]
            classes = (np.asarray(targets[i:i + len(part)]) if targets is not None
                       else self.backend.run(part)[0].argmax(axis=1))
            out.append(self.backend.cam(part, layer, classes, self.fc_weight))
        return np.concatenate(out) if out else np.zeros((0, *self.fit.size), np.float32)
