"""Per-layer rank map of a FIM-LoRA allocation: decoder layers x target modules."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .allocator import Allocation


def rank_grid(allocation: "Allocation") -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """``(layers, modules, ranks, scores)``: two ``layers x modules`` arrays (NaN where not adapted).

    Matrices outside the decoder layers (e.g. ``lm_head``) have no row and are left out.
    """
    cells: dict[tuple[int, str], tuple[int, float]] = {}
    modules: list[str] = []
    for name, r, s in zip(allocation.names, allocation.ranks, allocation.scores):
        layer, module = allocation.layer_and_module(name)
        if layer is None:
            continue
        if module not in modules:
            modules.append(module)
        cells[(layer, module)] = (r, s)
    layers = sorted({layer for layer, _ in cells})
    ranks = np.full((len(layers), len(modules)), np.nan)
    scores = np.full_like(ranks, np.nan)
    for (layer, module), (r, s) in cells.items():
        ranks[layers.index(layer), modules.index(module)] = r
        scores[layers.index(layer), modules.index(module)] = s
    return layers, modules, ranks, scores


def _short(modules: list[str]) -> list[str]:
    leaves = [m.split(".")[-1] for m in modules]
    return leaves if len(set(leaves)) == len(leaves) else modules


def plot_rank_map(allocation: "Allocation", path: str | Path, title: str | None = None) -> Path:
    """Save a heatmap of allocated ranks (annotated) beside one of the scores relative to their mean."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layers, modules, ranks, scores = rank_grid(allocation)
    if not layers:
        raise ValueError("no adapted matrix lies in a decoder layer; nothing to plot")
    cfg = allocation.config
    rel = scores / np.nanmean(scores) if np.nanmean(scores) > 0 else scores
    height = max(3.0, 0.28 * len(layers) + 1.6)
    width = max(6.0, 1.5 * len(modules) * 2 + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(width, height), constrained_layout=True)
    panels = [
        (ranks, f"rank (budget {cfg.budget_rank}, total {allocation.total_rank})", "viridis", None),
        (np.log2(np.where(rel > 0, rel, np.nan)), f"log2 {cfg.score} score / mean", "coolwarm", 0.0),
    ]
    for ax, (data, label, cmap, center) in zip(axes, panels):
        kw = {}
        if center is not None and np.isfinite(data).any():
            lim = float(np.nanmax(np.abs(data))) or 1.0
            kw = dict(vmin=-lim, vmax=lim)
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
        ax.set_xticks(range(len(modules)), _short(modules), rotation=30, ha="right")
        step = max(1, math.ceil(len(layers) / 32))
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_ylabel("decoder layer")
        fig.colorbar(im, ax=ax, label=label, shrink=0.9)
        if data is ranks and len(layers) * len(modules) <= 400:
            mid = (np.nanmin(ranks) + np.nanmax(ranks)) / 2
            for i in range(len(layers)):
                for j in range(len(modules)):
                    if np.isfinite(ranks[i, j]):
                        ax.text(j, i, str(int(ranks[i, j])), ha="center", va="center", fontsize=7,
                                color="black" if ranks[i, j] > mid else "white")
    axes[0].set_title("FIM-LoRA ranks")
    axes[1].set_title("gradient score")
    fig.suptitle(title or f"FIM-LoRA rank map ({allocation.base_model_name_or_path or 'model'}, "
                           f"{cfg.score}, {cfg.num_passes} passes)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
