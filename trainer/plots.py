"""Every figure a run writes (PNG, saved atomically), and the Grad-CAM overlay; matplotlib lives here alone."""
from __future__ import annotations

import hashlib
import math
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from .config import CLASS_NAMES
from .data import NUM_CLASSES, CleaningReport

matplotlib.use("Agg")  # files only, no screen


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure atomically."""
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def removed_sheet(images: np.ndarray, labels: np.ndarray, report: CleaningReport, path: str,
                  per_reason: int = 16) -> None:
    """PNG contact sheet of what cleaning removed: one row of examples per reason (one per distinct image)."""
    rows = []
    for reason, idx in report.removed_indices.items():
        seen, picked = set(), []
        for i in idx:
            h = hashlib.sha1(images[i].tobytes()).digest()
            if h not in seen:
                seen.add(h)
                picked.append(i)
            if len(picked) == per_reason:
                break
        if picked:
            rows.append((reason, len(idx), picked))
    cols = max([len(p) for _, _, p in rows], default=1)
    fig, axes = plt.subplots(max(len(rows), 1), cols, figsize=(1.2 * cols + 1, 1.5 * max(len(rows), 1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, (reason, total, picked) in enumerate(rows):
        for c, i in enumerate(picked):
            axes[r, c].imshow(images[i])
            axes[r, c].set_title(f"#{i} y={labels[i]}", fontsize=6)
        axes[r, 0].text(-0.1, 0.5, f"{reason}\n({total})", transform=axes[r, 0].transAxes, ha="right",
                        va="center", fontsize=8)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "nothing removed", ha="center", va="center")
    fig.suptitle("Removed by cleaning (distinct images; total per reason in brackets)", fontsize=9)
    save_figure(fig, path)


def augmentation_grid(originals: np.ndarray, augmented: np.ndarray, path: str, cols: int = 8) -> None:
    """PNG grid: each original above its augmented version."""
    n = len(augmented)
    rows = 2 * math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(originals[i])
        axes[r + 1, c].imshow(augmented[i])
        if r == 0:
            axes[r, c].set_title("original", fontsize=6)
            axes[r + 1, c].set_title("augmented", fontsize=6)
    fig.suptitle("Training augmentation: original (upper) and augmented (lower)", fontsize=9)
    save_figure(fig, path)


def curves(history: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("accuracy", "loss")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key, [])
            if values:
                ax.plot(range(1, len(values) + 1), values, style, marker="o", markersize=3,
                        label=("val " if prefix else "train ") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def confusion(cm: list, path: str, title: str = "Confusion matrix") -> None:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > cm.max() / 2 else "black")
    short = [n[:12] for n in CLASS_NAMES]
    ax.set_xticks(range(NUM_CLASSES), short, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(NUM_CLASSES), short, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def robustness(per_family: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for family, scores in per_family.items():
        ax.plot(range(len(scores)), scores, marker="o", label=family)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy against corruption severity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def corruption_preview(cell: np.ndarray, rows: list, path: str, severities=(1, 3, 5), per_row: int = 2) -> None:
    """A PNG of corruptions on one cell: each row starts with the clean cell, then per_row corruptions at each
    severity; rows are (name, family, images) as heldout.preview_rows gives them, or (name, family, images,
    accuracies) to print the model's accuracy at each severity under its picture (None: not scored)."""
    lines = max(1, -(-len(rows) // per_row))
    columns = 1 + per_row * len(severities)
    fig, axes = plt.subplots(lines, columns, figsize=(columns * 1.45, lines * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for line in range(lines):
        axes[line, 0].imshow(cell, interpolation="nearest")
        axes[line, 0].set_title("clean", fontsize=7)
    for k, (name, family, images, *scored) in enumerate(rows):
        accuracies = scored[0] if scored else [None] * len(severities)
        for j, (severity, image, accuracy) in enumerate(zip(severities, images, accuracies)):
            ax = axes[k // per_row, 1 + (k % per_row) * len(severities) + j]
            ax.imshow(image, interpolation="nearest")
            title = f"{name} {severity}" if j else f"{family}:\n{name} {severity}"
            ax.set_title(title + ("" if accuracy is None else f"\nacc {accuracy:.2f}"), fontsize=6)
    save_figure(fig, path)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the heatmap blended on in the jet colour map, uint8 RGB."""
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3]
    mixed = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colours
    return np.clip(mixed * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gradcam_sheet(mistakes: list, path: str, columns: int = 4) -> None:
    """A PNG of the mistakes: image and overlay side by side, titled true -> predicted (confidence)."""
    rows = max(1, -(-len(mistakes) // columns))
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2 * columns * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, m in enumerate(mistakes):
        left, right = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        left.imshow(m.image)
        right.imshow(overlay(m.image, m.heatmap))
        left.set_title(f"true {m.true_name[:13]}", fontsize=7)
        right.set_title(f"pred {m.predicted_name[:13]} {m.confidence:.0%}", fontsize=7, color="firebrick")
    if not mistakes:
        axes[0, 0].text(0, 0.5, "no mistakes", fontsize=12)
    save_figure(fig, path)
