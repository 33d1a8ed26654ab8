"""Confidence calibration, numbers only: expected calibration error, NLL, reliability-diagram data, and
temperature scaling (Guo et al., 2017: one scalar T, probabilities softmax(logits / T), fitted by minimizing
the NLL of held-out logits; the argmax, and so the accuracy, does not change).

    ece = expected_calibration_error(logits, labels)          # top-label, 15 equal-width bins
    t = fit_temperature(val_logits, val_labels)                # on the val split, never on test
    ece_after = expected_calibration_error(test_logits, test_labels, temperature=t)

Logits are (N, C) arrays, labels (N,) integers; numpy in float64 throughout, so the numbers do not depend
on the device that made the logits. torch is imported only by `fit_temperature` (LBFGS): `read_calibration`
runs in the CLI's torch-free config check.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifar_cam.errors import ConfigError

ECE_BINS = 15          # equal-width confidence bins of the ECE and the reliability diagram (Guo et al.)
FILE_NAME = "calibration.json"
T_RANGE = (1e-2, 1e2)  # a fitted T is kept inside: on a val split the model gets all right, NLL falls as T -> 0


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Probabilities softmax(logits / temperature), float64 (N, C); rows sum to 1."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class (cross-entropy, nats) at `temperature`."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = np.asarray(labels, dtype=np.int64)
    if not len(y):
        return float("nan")
    top = z.max(axis=1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(y)), y]))


@dataclass(frozen=True)
class Reliability:
    """Per confidence bin (lower, upper]: how many top-1 predictions fall in it, their mean confidence and their
    accuracy (None for an empty bin); `ece` weighs each bin's |accuracy - confidence| by its share of images."""

    bin_edges: list[float]
    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]
    ece: float
    n: int = field(default=0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return {"bins": len(self.count), "bin_edges": self.bin_edges, "count": self.count,
                "confidence": self.confidence, "accuracy": self.accuracy, "ece": self.ece, "n": self.n}


def reliability(logits: Any, labels: Any, temperature: float = 1.0, bins: int = ECE_BINS) -> Reliability:
    """Reliability-diagram data of the top-label confidence in `bins` equal-width bins over [0, 1]."""
    probs = softmax(logits, temperature)
    y = np.asarray(labels, dtype=np.int64)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # bin b holds (edges[b], edges[b+1]]: the count of inner edges strictly below the confidence
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    right_sum = np.bincount(which, weights=correct, minlength=bins)
    n = len(y)
    ece = float(np.abs(right_sum - conf_sum).sum() / n) if n else float("nan")  # sum_b |B|/n |acc_b - conf_b|
    mean_conf = [float(s / c) if c else None for s, c in zip(conf_sum, count, strict=True)]
    accuracy = [float(s / c) if c else None for s, c in zip(right_sum, count, strict=True)]
    return Reliability([float(e) for e in edges], [int(c) for c in count], mean_conf, accuracy, ece, n)


def expected_calibration_error(logits: Any, labels: Any, temperature: float = 1.0, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |B|/N * |accuracy(B) - mean confidence(B)|."""
    return reliability(logits, labels, temperature, bins).ece


def fit_temperature(logits: Any, labels: Any, max_iter: int = 200) -> float:
    """The T minimizing NLL(softmax(logits / T)): LBFGS on log T (T stays positive; the problem is smooth in
    it), from T = 1, in float64; kept inside T_RANGE."""
    import torch
    import torch.nn.functional as F

    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if not len(y):
        raise ValueError("fit_temperature needs at least one labelled example")
    low, high = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(math.exp(min(max(log_t.item(), low), high)))


def scores(logits: Any, labels: Any, temperature: float, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE and NLL of one split before (T = 1) and after `temperature`, and its size and accuracy."""
    y = np.asarray(labels, dtype=np.int64)
    accuracy = float((np.asarray(logits).argmax(axis=1) == y).mean()) if len(y) else float("nan")
    return {"n": int(len(y)), "accuracy": accuracy,
            "ece_before": expected_calibration_error(logits, y, 1.0, bins),
            "ece_after": expected_calibration_error(logits, y, temperature, bins),
            "nll_before": nll(logits, y), "nll_after": nll(logits, y, temperature)}


# ----------------------------------------------------------------------------- calibration.json


@dataclass(frozen=True)
class Calibration:
    """A temperature read from a calibration.json (`cifar-cam eval eval.calibrate=true` writes it)."""

    temperature: float
    source: str                          # the calibration.json it came from
    classes: list[str] | None = None     # the model's classes, when the file says
    info: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole file

    def summary(self) -> dict[str, Any]:
        """What a model card and GET /v1/model say about it."""
        return {"temperature": self.temperature, "probabilities": "softmax(logits / temperature)",
                "source": self.source, "fitted_on": self.info.get("fitted_on"),
                "ece_bins": self.info.get("ece_bins"), "test": self.info.get("test")}


def read_calibration(path: str | Path, key: str = "calibration") -> Calibration:
    """The temperature in `path` (a calibration.json, or an eval run dir holding one); ConfigError in one line
    naming `key` for a missing, unreadable or foreign file."""
    p = Path(str(path)).expanduser()
    how = "pass the calibration.json of `cifar-cam eval eval.calibrate=true`, or that eval run dir"
    if p.is_dir():
        if not (p / FILE_NAME).is_file():
            raise ConfigError(f"{key}={path}: the folder has no {FILE_NAME}; {how}")
        p = p / FILE_NAME
    elif not p.is_file():
        raise ConfigError(f"{key}={path} does not exist; {how}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{key}={path} is not readable JSON ({type(e).__name__}); {how}") from None
    t = data.get("temperature") if isinstance(data, dict) else None
    if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t > 0):
        raise ConfigError(f"{key}={path} holds no temperature > 0 (got {t!r}); {how}")
    classes = data.get("classes")
    classes = [str(c) for c in classes] if isinstance(classes, list) else None
    return Calibration(float(t), str(p.resolve()), classes, data)
