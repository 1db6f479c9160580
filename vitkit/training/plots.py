"""Training plots: loss/accuracy curves from Lightning's metrics.csv, and the confusion matrix."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt
import torch


def _read_series(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(epoch, value), ...]} from a CSVLogger file (one column per metric)."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with Path(metrics_csv).open() as handle:
        for row in csv.DictReader(handle):
            epoch = row.get("epoch")
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                if key.endswith("_step") or "/acc_" in key or key == "img_per_s":
                    continue
                series[key].append((float(epoch) if epoch else 0.0, float(value)))
    return series


def plot_curves(metrics_csv: str | Path, out_dir: str | Path) -> list[Path]:
    """Plot loss and accuracy per epoch; returns the PNG paths written."""
    series = _read_series(Path(metrics_csv))
    out_dir = Path(out_dir)
    written = []
    for kind in ("loss", "acc"):
        keys = sorted(k for k in series if k.split("/")[-1].startswith(kind))
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in keys:
            epochs, values = zip(*series[key], strict=True)
            ax.plot([e + 1 for e in epochs], values, marker="o", label=key.replace("_epoch", ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if kind == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{'accuracy' if kind == 'acc' else 'loss'}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_confusion_matrix(matrix: torch.Tensor, classes: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: prediction) with counts."""
    matrix = matrix.float()
    normalised = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                colour = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8, color=colour)
    accuracy = matrix.diag().sum() / matrix.sum().clamp(min=1)
    ax.set_title(f"confusion matrix (accuracy {accuracy:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
