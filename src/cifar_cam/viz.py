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

def plot_report(labels: Sequence[str], val_accs: Sequence[Sequence[float | None]],
                test_accs: Sequence[Sequence[float | None]], path: str | Path, title: str = "") -> Path:
    """Val and test accuracy per config: each seed a point, the mean a bar with ± std (sample) whiskers."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * n + 2), 4.8))
    for offset, series, name, color in ((-0.17, val_accs, "val (best epoch)", "tab:blue"),
                                        (0.17, test_accs, "test", "tab:orange")):
        labeled = False
        for i, values in enumerate(series):
            points = np.array([100 * v for v in values if v is not None], dtype=float)
            if len(points) == 0:
                continue
            x = i + offset
            jitter = np.linspace(-0.05, 0.05, len(points)) if len(points) > 1 else np.zeros(1)
            ax.scatter(x + jitter, points, s=22, color=color, alpha=0.75, zorder=3, label=None if labeled else name)
            labeled = True
            std = points.std(ddof=1) if len(points) > 1 else 0.0
            ax.errorbar(x, points.mean(), yerr=std, fmt="_", color=color, markersize=22, capsize=5, zorder=4)
    ax.set_xticks(range(n), [_wrap(label) for label in labels], rotation=30 if n > 4 else 0,
                  ha="right" if n > 4 else "center", fontsize=8)
    ax.set(ylabel="accuracy (%)", title=title, xlim=(-0.6, n - 0.4))
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _wrap(label: str, width: int = 28) -> str:
    """Breaks a long 'key=value key=value' label into lines at spaces."""
    lines, line = [], ""
    for word in label.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])

