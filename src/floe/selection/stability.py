"""Stability of the layer ranking under smaller selection data (paper Fig. 7, App. G).

The ranking is recomputed on seeded random subsets of the selection batches (100 %, 70 %,
30 % by default). Reported per layer: its rank (0 = most important) at each fraction and the
min-max range; per fraction: Spearman's ρ and Kendall's τ between its layer scores' ranking
and the full-data one, and the overlap of the top-k sets.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from scipy import stats

from floe.io import atomic_file


@dataclass
class StabilityResult:
    """Rankings of the layers on subsamples of the selection data."""

    fractions: list[float]
    num_batches: list[int]
    """Batches used at each fraction."""
    rankings: list[list[int]]
    """Per fraction: layer indices, most important first."""
    ranks: list[list[int]]
    """Per fraction: ``ranks[f][layer]`` = position of the layer in that ranking."""
    rank_min: list[int]
    rank_max: list[int]
    spearman: list[float]
    """Spearman ρ of each fraction's ranks against the first fraction's (1.0 for itself)."""
    kendall: list[float]
    top_k_overlap: list[float]
    """Share of the first fraction's top-k found in each fraction's top-k."""

    def to_dict(self) -> dict:
        return asdict(self)


def subsample_indices(num_batches: int, fraction: float, seed: int) -> list[int]:
    """A seeded sorted subset of ``round(fraction · num_batches)`` (≥ 1) batch indices."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subsample fractions must lie in (0, 1], got {fraction}")
    count = max(1, min(num_batches, math.floor(fraction * num_batches + 0.5)))
    if count == num_batches:
        return list(range(num_batches))
    perm = torch.randperm(num_batches, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:count].tolist())


def positions(ranking: Sequence[int]) -> list[int]:
    """Inverse permutation: ``positions(ranking)[layer]`` = rank of the layer."""
    out = [0] * len(ranking)
    for r, layer in enumerate(ranking):
        out[int(layer)] = r
    return out


def _corr(fn, a: list[int], b: list[int]) -> float:
    if len(a) < 2:
        return 1.0
    value = float(fn(a, b)[0])
    return value if math.isfinite(value) else 1.0


def stability_analysis(rank_fn: Callable[[list[int]], list[int]], num_batches: int,
                       fractions: Sequence[float] = (1.0, 0.7, 0.3), seed: int = 0,
                       top_k: int = 1) -> StabilityResult:
    """Rank the layers on subsets of the batches and compare the rankings.

    ``rank_fn(batch_indices)`` returns a ranking (layer indices, most important first) computed
    from those batches only. The first fraction is the reference (normally 1.0). Each fraction
    ``f`` uses subset seed ``seed + i`` (i = its position), so results are reproducible.
    """
    if not fractions:
        raise ValueError("stability analysis needs at least one fraction")
    rankings, counts = [], []
    for i, f in enumerate(fractions):
        idx = subsample_indices(num_batches, float(f), seed + i)
        counts.append(len(idx))
        rankings.append([int(x) for x in rank_fn(idx)])
    ranks = [positions(r) for r in rankings]
    ref = ranks[0]
    per_layer = list(zip(*ranks))
    k = max(1, min(top_k, len(ref)))
    ref_top = set(rankings[0][:k])
    return StabilityResult(
        fractions=[float(f) for f in fractions],
        num_batches=counts,
        rankings=rankings,
        ranks=ranks,
        rank_min=[min(v) for v in per_layer],
        rank_max=[max(v) for v in per_layer],
        spearman=[_corr(stats.spearmanr, ref, r) for r in ranks],
        kendall=[_corr(stats.kendalltau, ref, r) for r in ranks],
        top_k_overlap=[len(ref_top & set(r[:k])) / k for r in rankings],
    )


def plot_stability(result: StabilityResult, path: str | os.PathLike, title: str = "") -> Path:
    """Fig. 7-style figure: rank per layer at each fraction with the min-max band, and ρ/τ bars.

    Written atomically (temp file in the same folder, then renamed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(result.ranks[0])))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(8.0, 0.28 * len(layers) + 5), 3.8),
                                 gridspec_kw=dict(width_ratios=[3, 1]))
    ax.fill_between(layers, result.rank_min, result.rank_max, color="tab:blue", alpha=0.18,
                    label="min-max range")
    for f, r, n in zip(result.fractions, result.ranks, result.num_batches):
        ax.plot(layers, r, marker="o", markersize=3, linewidth=1, label=f"{100 * f:.0f}% ({n} batches)")
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (0 = most important)")
    ax.invert_yaxis()
    ax.set_xticks(layers if len(layers) <= 40 else layers[::2])
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "layer-ranking stability")
    x = range(len(result.fractions))
    bx.bar([i - 0.2 for i in x], result.spearman, width=0.4, label="Spearman ρ")
    bx.bar([i + 0.2 for i in x], result.kendall, width=0.4, label="Kendall τ")
    bx.set_xticks(list(x), [f"{100 * f:.0f}%" for f in result.fractions])
    bx.set_ylim(min(0.0, min(result.kendall + result.spearman)) - 0.05, 1.05)
    bx.set_title("vs first fraction", fontsize=9)
    bx.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save_atomic(fig, Path(path))


def _save_atomic(fig, path: Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    finally:
        plt.close(fig)
