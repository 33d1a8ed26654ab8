"""Every PNG cifar-cam draws. Pure functions: arrays and numbers in, a file out (Agg, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifar_cam.io import atomic_path

DPI = 100


def _save(fig: plt.Figure, path: str | Path, tight: bool = True, compress_level: int = 6) -> Path:
    # tight=False keeps a layout of exact pixels; a lower compress_level encodes faster for a few more bytes
    try:
        with atomic_path(path, suffix=".png") as tmp:  # a reader never sees a half-written PNG
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight" if tight else None,
                        pil_kwargs={"compress_level": compress_level})
    finally:
        plt.close(fig)
    return Path(path)


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
        # the best epoch in the legend, not as floating text that can cover the curves
        ax.plot([epochs[best]], [100 * val[best]], "o", ms=9, mfc="none", mec="tab:red",
                label=f"best val {100 * val[best]:.2f}% (epoch {epochs[best]})")
    ax.set(title="accuracy", xlabel="epoch", ylabel="%")
    ax.legend()
    ax = axes[2]
    lrs = np.array([r["lr"] for r in rows], dtype=float)
    ax.plot(epochs, lrs, "o-", ms=3, color="tab:purple")
    # log scale shows step decays (plateau); a schedule within one decade (onecycle, cosine) reads better linear
    log_scale = bool(np.all(lrs > 0) and lrs.max() / lrs.min() >= 10)
    ax.set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log" if log_scale else "linear")
    for a in axes:
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(confusion: np.ndarray, classes: Sequence[str], path: str | Path,
                          title: str = "confusion matrix") -> Path:
    """Counts in each cell, shading by row-normalized rate (rows: true class)."""
    confusion = np.asarray(confusion)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(max(6.0, 0.65 * n + 2), 22.0)  # 100 classes: 22 inches, every class still named
    font = 8 if n <= 30 else max(4.5, 8 - (n - 30) / 20)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 30:  # counts in the cells while they fit; beyond, the shading and the per-class accuracies say it
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45 if n <= 30 else 90, ha="right" if n <= 30 else "center",
                  fontsize=font)
    ax.set_yticks(range(n), [f"{name} {100 * rates[i, i]:.1f}%" for i, name in enumerate(classes)], fontsize=font)
    ax.set(xlabel="predicted", ylabel="true (and its accuracy)", title=title)
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
        height = fig.get_size_inches()[1]
        fig.suptitle(suptitle, y=1 - 0.06 / height, va="top")
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.36 / height))  # room for the suptitle above the first titles
    else:
        fig.tight_layout()
    return _save(fig, path)


def plot_report(labels: Sequence[str], val_accs: Sequence[Sequence[float | None]],
                test_accs: Sequence[Sequence[float | None]], path: str | Path, title: str = "",
                failed: Sequence[int] | None = None) -> Path:
    """Val and test accuracy per config: each seed a point, the mean a bar with ± std (sample) whiskers;
    `failed[i]` jobs of config i without results are noted under it."""
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
    for i, count in enumerate(failed or []):
        if count:
            ax.text(i, 0.02, f"{count} without results", transform=ax.get_xaxis_transform(), ha="center",
                    color="tab:red", fontsize=9)
    ax.set(ylabel="accuracy (%): a point a seed, bar = mean ± std", title=title, xlim=(-0.6, n - 0.4))
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


# ----------------------------------------------------------------------------- LR range test, Grad-CAM


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], path: str | Path, suggested_lr: float | None = None,
                 skip_start: int = 10, skip_end: int = 5, title: str = "LR range test", note: str | None = None
                 ) -> Path:
    """Smoothed loss against LR (log axis); the points the suggestion considers in colour, the suggestion marked."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 5))
    if len(lrs):
        ax.plot(lrs, losses, "-", color="0.65", lw=1.2, label="smoothed training loss")
        end = len(lrs) - skip_end
        if end - skip_start >= 2:
            ax.plot(lrs[skip_start:end], losses[skip_start:end], "-", color="tab:blue", lw=2,
                    label=f"points the suggestion uses (first {skip_start}, last {skip_end} left out)")
        best = int(np.argmin(losses))
        ax.scatter([lrs[best]], [losses[best]], s=45, color="tab:green", zorder=4,
                   label=f"lowest loss {losses[best]:.3f} at lr {lrs[best]:.2g}")
        if suggested_lr is not None:
            i = int(np.argmin(np.abs(np.log(lrs) - np.log(suggested_lr))))
            ax.axvline(suggested_lr, color="tab:red", ls="--", lw=1)
            ax.scatter([lrs[i]], [losses[i]], s=80, color="tab:red", zorder=5,
                       label=f"suggested lr {suggested_lr:.3g} (steepest descent)")
        # The divergence tail can reach diverge_th x the lowest loss: clip it to keep the useful part readable.
        low, high = losses.min(), min(losses.max(), 1.5 * max(losses[0], losses.min()))
        margin = 0.05 * (high - low) if high > low else 0.05 * abs(low) + 1e-3
        ax.set_ylim(low - margin, high + margin)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss (exponentially smoothed)", title=title)
    ax.grid(alpha=0.35, which="major")
    ax.grid(alpha=0.1, which="minor")
    if note:
        ax.text(0.0, -0.13, note, transform=ax.transAxes, fontsize=9, color="tab:red", va="top", wrap=True)
    if len(lrs):
        ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


CAM_ALPHA = 0.45   # heatmap weight in an overlay
CAM_CMAP = "jet"


def upscale(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HWC image or a float (H, W) map resized to `size` pixels on its longer side (its aspect kept;
    size x size for a square one), bicubic (maps clipped to [0, 1])."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    resized = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_CUBIC)
    return resized if image.dtype == np.uint8 else np.clip(resized, 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = CAM_ALPHA, cmap: str = CAM_CMAP) -> np.ndarray:
    """An HWC uint8 image blended with a colormapped (H, W) heatmap in [0, 1]: HWC uint8, same size."""
    colors = matplotlib.colormaps[cmap](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colors
    return np.clip(np.round(255 * blended), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CamGridLayout:
    """Pixel layout of gradcam_grid.png: a panel per image, each the image and one overlay per layer."""

    n: int
    num_layers: int
    cols: int = 5
    sub: int = 96          # pixels per image in a panel (32x32 upscaled 3x)
    gap: int = 3           # between the images of a panel
    title_h: int = 34      # two title lines above a panel
    label_h: int = 15      # "image / layer3 / ..." below a panel
    hsep: int = 20         # between panels
    vsep: int = 8
    header_h: int = 62
    pad: int = 12

    @property
    def columns(self) -> int:
        return max(1, min(self.cols, self.n))

    @property
    def rows(self) -> int:
        return max(1, -(-self.n // self.columns))

    @property
    def panel_w(self) -> int:
        k = 1 + self.num_layers
        return k * self.sub + (k - 1) * self.gap

    @property
    def panel_h(self) -> int:
        return self.title_h + self.sub + self.label_h

    def panel_origin(self, i: int) -> tuple[int, int]:
        """(left, top) pixel of panel i (its title band), row by row."""
        r, c = divmod(i, self.columns)
        return self.pad + c * (self.panel_w + self.hsep), self.header_h + r * (self.panel_h + self.vsep)

    def tile_origin(self, i: int, k: int) -> tuple[int, int]:
        """(left, top) pixel of tile k (0: the image, 1..: a layer's overlay) of panel i."""
        left, top = self.panel_origin(i)
        return left + k * (self.sub + self.gap), top + self.title_h

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the PNG in pixels."""
        width = 2 * self.pad + self.columns * self.panel_w + (self.columns - 1) * self.hsep
        height = self.header_h + self.rows * self.panel_h + (self.rows - 1) * self.vsep + self.pad
        return width, height


def colorize(heatmap: np.ndarray, cmap: str = CAM_CMAP) -> np.ndarray:
    """A (H, W) map in [0, 1] as an HWC uint8 colour image."""
    return np.round(255 * matplotlib.colormaps[cmap](np.clip(heatmap, 0.0, 1.0))[..., :3]).astype(np.uint8)


class _Canvas:
    """A white RGB canvas of exact pixel size: tiles are pasted as pixels, text is drawn by matplotlib.

    Pasting pixels (figimage) instead of one imshow axes per tile keeps drawing ~5x faster and
    the PNG size exact (what tests check), with no resampling of the already-upscaled tiles.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = np.full((height, width, 3), 255, np.uint8)
        self.texts: list[tuple[float, float, str, dict]] = []

    def paste(self, tile: np.ndarray, left: int, top: int) -> None:
        h, w = tile.shape[:2]
        self.pixels[top:top + h, left:left + w] = tile

    def text(self, x: float, y: float, text: str, **kwargs: object) -> None:
        """Text anchored at pixel (x, y) from the top-left corner (matplotlib ha/va/fontsize kwargs)."""
        self.texts.append((x, y, text, kwargs))

    def colorbar(self, left: int, top: int, width: int, cmap: str = CAM_CMAP, label: str = "") -> None:
        """A horizontal colour scale, 'low' to 'high', 10 px tall."""
        self.paste(np.repeat(colorize(np.linspace(0, 1, width)[None], cmap), 10, axis=0), left, top)
        self.text(left - 4, top + 5, "low", ha="right", va="center", fontsize=8)
        self.text(left + width + 4, top + 5, "high", ha="left", va="center", fontsize=8)
        if label:
            self.text(left + width / 2, top - 3, label, ha="center", va="bottom", fontsize=8)

    def save(self, path: str | Path) -> Path:
        fig = plt.figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI)
        fig.figimage(self.pixels, 0, 0, origin="upper")
        for x, y, text, kwargs in self.texts:
            fig.text(x / self.width, 1 - y / self.height, text, **kwargs)  # type: ignore[arg-type]
        return _save(fig, path, tight=False, compress_level=3)


def plot_cam_grid(images: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str], path: str | Path,
                  cols: int = 5, suptitle: str | None = None) -> Path:
    """gradcam_grid.png: per image a panel of the image and its overlay for each layer, titled; 5 x 5 for 25."""
    layers = list(maps)
    layout = CamGridLayout(len(images), len(layers), cols)
    canvas = _Canvas(*layout.size)
    if suptitle:
        canvas.text(layout.pad, 8, suptitle, ha="left", va="top", fontsize=11, linespacing=1.4)
    bar = max(40, min(180, canvas.width - 2 * layout.pad - 100))  # a grid of one narrow panel is narrow too
    canvas.colorbar(canvas.width - layout.pad - bar - 40, layout.header_h - 26, bar, label="Grad-CAM weight")
    for i in range(len(images)):
        left, top = layout.panel_origin(i)
        canvas.text(left + layout.panel_w / 2, top + 2, titles[i], ha="center", va="top", fontsize=8.5,
                    linespacing=1.25)
        image = upscale(images[i], layout.sub)
        tiles = [("image", image)] + [(name, overlay(image, upscale(maps[name][i], layout.sub))) for name in layers]
        for k, (label, tile) in enumerate(tiles):
            x, y = layout.tile_origin(i, k)
            canvas.paste(tile, x, y)
            canvas.text(x + layout.sub / 2, y + layout.sub + 1, label, ha="center", va="top", fontsize=7,
                        color="0.35")
    return canvas.save(path)


SINGLE_CAM_PX = 256                                    # pixels per image in gradcam/NNN_<layer>.png
_GAP, _PAD, _TITLE_H, _LABEL_H, _BAR_H = 8, 10, 44, 20, 26
SINGLE_CAM_SIZE = (2 * _PAD + 3 * SINGLE_CAM_PX + 2 * _GAP,  # (width, height) of that PNG
                   _TITLE_H + SINGLE_CAM_PX + _LABEL_H + _BAR_H + _PAD)


def plot_cam_single(image: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str = "",
                    layer: str = "") -> Path:
    """gradcam/NNN_<layer>.png: image, heatmap and overlay side by side at 256 px each, with a colour scale."""
    s, gap, pad, title_h, label_h = SINGLE_CAM_PX, _GAP, _PAD, _TITLE_H, _LABEL_H
    canvas = _Canvas(*SINGLE_CAM_SIZE)
    canvas.text(canvas.width / 2, 6, title, ha="center", va="top", fontsize=10, linespacing=1.35)
    big_image, big_map = upscale(image, s), upscale(heatmap, s)
    tiles = [("image", big_image), (f"Grad-CAM {layer}".strip(), colorize(big_map)),
             ("overlay", overlay(big_image, big_map))]
    for k, (label, tile) in enumerate(tiles):
        x = pad + k * (s + gap)
        canvas.paste(tile, x, title_h)
        canvas.text(x + s / 2, title_h + s + 3, label, ha="center", va="top", fontsize=9)
    canvas.colorbar(pad + s + gap + 40, title_h + s + label_h + 6, s - 80)
    return canvas.save(path)


def plot_activations(images: np.ndarray, activations: Mapping[str, np.ndarray], path: str | Path,
                     row_titles: Sequence[str] | None = None, col_notes: Mapping[str, str] | None = None,
                     suptitle: str | None = None) -> Path:
    """activations.png: per image (row) the image and the channel-mean activation map of each layer (columns)."""
    layers = list(activations)
    rows, cols = len(images), 1 + len(layers)
    fig, axes = plt.subplots(rows, cols, figsize=(1.75 * cols, 1.75 * rows + 0.5), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(upscale(images[r], 128), interpolation="none")
        if row_titles:
            axes[r, 0].set_ylabel(row_titles[r], fontsize=8, rotation=0, ha="right", va="center", labelpad=6)
        for c, name in enumerate(layers, start=1):
            a = activations[name][r].astype(np.float32)
            a = (a - a.min()) / (a.max() - a.min() + 1e-12)
            axes[r, c].imshow(a, cmap="viridis", interpolation="nearest")
    for c, name in enumerate(["image", *layers]):
        note = (col_notes or {}).get(name)
        axes[0, c].set_title(name if not note else f"{name}\n{note}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, Mapping[str, Sequence]], path: str | Path, title: str = "") -> Path:
    """reliability.png: per confidence bin, accuracy against mean confidence (the diagonal is perfect calibration),
    one set of bars per curve ({label: calibration.Reliability.to_dict()}), and below, the images per bin."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for k, (label, curve) in enumerate(curves.items()):
        edges = np.asarray(curve["bin_edges"], dtype=float)
        width = np.diff(edges) / len(curves)  # side by side within each bin
        left = edges[:-1] + k * width
        filled = [i for i, a in enumerate(curve["accuracy"]) if a is not None]
        color = colors[k % len(colors)]
        ax.bar(left[filled], [curve["accuracy"][i] for i in filled], width=width[filled], align="edge",
               color=color, alpha=0.75, edgecolor="black", lw=0.5, label=f"{label}: ECE {100 * curve['ece']:.2f}%")
        ax.plot([left[i] + width[i] / 2 for i in filled], [curve["confidence"][i] for i in filled], "_",
                color="black", ms=10)  # each bin's mean confidence
        hist.bar(left, curve["count"], width=width, align="edge", color=color, alpha=0.75, edgecolor="black", lw=0.5)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title or "reliability (top-label)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    hist.set(xlabel="confidence (top-1 probability); black ticks: mean confidence of the bin", ylabel="images",
             yscale="log" if max(max(c["count"]) for c in curves.values()) > 100 else "linear")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


FAITHFULNESS_METRICS = (("deletion_auc", "deletion AUC (lower: more faithful)", False),
                        ("insertion_auc", "insertion AUC (higher: more faithful)", True),
                        ("road", "ROAD combined (higher: more faithful)", True))


def plot_faithfulness(rows: Sequence[Mapping[str, object]], path: str | Path, title: str = "") -> Path:
    """gradcam_metrics.png: per layer (rows) and metric (columns), each method's mean over the images (dot) and its
    25-75% spread (bar), best at the top; baselines (no layer) appear in every layer's panels, in grey."""
    layers = sorted({str(r["layer"]) for r in rows if r["layer"] != "-"})
    fig, axes = plt.subplots(len(layers), 3, figsize=(15, 0.45 * 10 * len(layers) + 1.2), squeeze=False)
    for i, layer in enumerate(layers):
        subset = [r for r in rows if r["layer"] in (layer, "-")]
        methods = sorted({str(r["method"]) for r in subset})
        for j, (key, label, higher_better) in enumerate(FAITHFULNESS_METRICS):
            ax = axes[i][j]
            values = {m: np.array([float(r[key]) for r in subset if r["method"] == m]) for m in methods}
            order = sorted(methods, key=lambda m: values[m].mean(), reverse=not higher_better)[::-1]  # best on top
            for y, m in enumerate(order):
                v = values[m]
                baseline = all(r["layer"] == "-" for r in subset if r["method"] == m)
                color = "0.55" if baseline else "tab:blue"
                ax.plot(np.percentile(v, [25, 75]), [y, y], color=color, lw=5, alpha=0.4, solid_capstyle="butt")
                ax.plot(v.mean(), y, "o", color=color)
            ax.set_yticks(range(len(order)), order)
            ax.set_title(f"{layer}: {label}" if j else f"{layer}\n{label}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
