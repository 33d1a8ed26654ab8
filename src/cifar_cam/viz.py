"""Every PNG cifar-cam draws. Pure functions: arrays and numbers in, a file out (Agg, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # a reader never sees a half-written PNG
    return path


def plot_curves(rows: Sequence[dict[str, float]], path: str | Path) -> Path:
    """Training curves from metrics.csv rows: loss, accuracy (train and val) and LR per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", ms=3, label="train")
    if any(r.get("val_loss") is not None for r in rows):
        ax.plot(epochs, [r.get("val_loss") for r in rows], "o-", ms=3, label="val")
    ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [100 * r["train_acc"] for r in rows], "o-", ms=3, label="train")
    val = [r.get("val_acc") for r in rows]
    if any(v is not None for v in val):
        ax.plot(epochs, [None if v is None else 100 * v for v in val], "o-", ms=3, label="val")
        best = int(np.nanargmax([np.nan if v is None else v for v in val]))
        ax.annotate(f"best {100 * val[best]:.2f}% (epoch {epochs[best]})", (epochs[best], 100 * val[best]),
                    textcoords="offset points", xytext=(0, -18), ha="center", fontsize=9)
    ax.set(title="accuracy", xlabel="epoch", ylabel="%")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [r["lr"] for r in rows], "o-", ms=3, color="tab:purple")
    ax.set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Counts in each cell, shading by row-normalized rate (rows: true class)."""
    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    n = len(classes)
    size = max(6.0, 0.65 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return _save(fig, path)


def plot_image_grid(images: np.ndarray, titles: Sequence[str], path: str | Path, cols: int = 5,
                    suptitle: str | None = None, title_colors: Sequence[str] | None = None) -> Path:
    """A grid of HWC uint8 images, each with a title (e.g. true / predicted / confidence)."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="bicubic")
            ax.set_title(titles[i], fontsize=9, color=(title_colors[i] if title_colors else "black"))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return _save(fig, path)
