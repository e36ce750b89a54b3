"""Outputs people read: metrics JSON, score CSV, and the paper's figures (ROC as in figure 3, score
distributions as in figure 4, original / reconstruction / residual panels as in figures 5 and 6, the alpha/beta
heat-map of figure 7). Every file is written atomically: a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from .deploy import plain_file_mode  # noqa: E402


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds, with the mode a
    plain ``open`` would have given it (``mkstemp``'s 0600 would make every record private to its writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def as_json(data):
    """``data`` as ``write_json`` stores it and ``json.load`` reads it back (tuples as lists, NaN as None), to
    compare a value with a recorded one."""
    return json.loads(json.dumps(_json_safe(data)))


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(_json_safe(data), f, indent=4)
        f.write("\n")


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())


def _save(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def plot_roc(path, labels, scores_by_name: dict[str, np.ndarray], title: str = "ROC") -> None:
    """One curve per score (the combined score and each term), AUC in the legend."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, scores in scores_by_name.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {100 * roc_auc_score(labels, scores):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (1 - SPE)", ylabel="true positive rate (SEN)", title=title)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_score_distributions(path, labels, scores, threshold: float | None = None, title: str = "Anomaly score"):
    """Density of the anomaly score for normal and abnormal items (paper figure 4)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = np.histogram_bin_edges(scores, bins=40)
    for value, name, colour in ((0, "normal", "tab:blue"), (1, "abnormal", "tab:red")):
        if (labels == value).any():
            ax.hist(scores[labels == value], bins=bins, density=True, alpha=0.5, color=colour, label=name)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set(xlabel="anomaly score", ylabel="density", title=title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_panels(path, samples: Sequence[dict], title: str = "original / reconstruction / residual") -> None:
    """Columns are samples; rows are the original, its reconstruction, the residual |x - x'| and the anomaly map."""
    if not samples:
        return
    rows = (
        ("image", "original", "gray"),
        ("reconstruction", "reconstruction", "gray"),
        ("residual", "residual", "inferno"),
        ("anomaly_map", "anomaly map", "inferno"),
    )
    fig, axes = plt.subplots(len(rows), len(samples), figsize=(1.8 * len(samples), 1.9 * len(rows)), squeeze=False)
    for col, sample in enumerate(samples):
        for row, (key, name, cmap) in enumerate(rows):
            image = np.asarray(sample[key], dtype=float)
            image = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image[0]
            ax = axes[row, col]
            ax.imshow(np.clip(image, 0, 1) if key in ("image", "reconstruction") else image, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[0, col].set_title(
            f"{'abnormal' if sample['label'] else 'normal'}\nscore {sample['score']:.2f}", fontsize=8
        )
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_heatmap(path, values: np.ndarray, rows: Sequence[float], cols: Sequence[float], row_name, col_name, title):
    """The alpha x beta AUC grid of the paper's figure 7."""
    fig, ax = plt.subplots(figsize=(0.55 * len(cols) + 2, 0.45 * len(rows) + 1.5))
    image = ax.imshow(values, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    for i in range(len(rows)):
        for j in range(len(cols)):
            text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}"  # "-": that row's training diverged
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white")
    ax.set(xlabel=col_name, ylabel=row_name, title=title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    _save(fig, path)
