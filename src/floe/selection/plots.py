"""Layer-importance heatmap in the style of the paper's Fig. 3 / Fig. 10.

Three rows over the layers: the head part and the neuron part of the score (how much of the
layer's attention / FFN the masks remove, after tuning) and the layer score itself. Each row is
coloured on its own min-max scale (darker = more important); dots mark the chosen layers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from floe.selection.stability import _save_atomic


def _normalise(row: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(row)), float(np.max(row))
    return np.zeros_like(row) if hi - lo <= 1e-12 else (row - lo) / (hi - lo)


def plot_layer_heatmap(heads: Sequence[float] | None, neurons: Sequence[float] | None, scores: Sequence[float],
                       chosen: Sequence[int], path: str | os.PathLike, title: str = "") -> Path:
    """Write the heatmap PNG atomically; ``heads``/``neurons`` may be ``None`` (scorers without masks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, labels = [], []
    for values, label in ((heads, "heads"), (neurons, "neurons"), (scores, "score")):
        if values is not None:
            rows.append(_normalise(np.asarray(values, dtype=float)))
            labels.append(label)
    data = np.stack(rows)
    num_layers = data.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * num_layers + 2), 0.55 * len(rows) + 1.4))
    im = ax.imshow(data, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xticks(range(num_layers) if num_layers <= 40 else range(0, num_layers, 2))
    ax.set_xlabel("layer")
    score_row = len(rows) - 1
    ax.scatter(list(chosen), [score_row] * len(chosen), s=18, c="black", zorder=3, label="chosen")
    cbar = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cbar.set_label("importance (row min-max)", fontsize=7)
    ax.set_title(title or "layer importance", fontsize=9)
    fig.tight_layout()
    return _save_atomic(fig, Path(path))
