"""FLoE's per-layer score from the masks, ranking and top-k (docs/method.md, "Layer score and selection").

``s_l = 1 - sum_{u in l} w_u m~_u / sum_{u in l} w_u`` with ``w = t_h`` for heads and ``t_f``
for neurons (the mean Taylor costs Alg. 1 prices units at), ``m~`` the tuned mask value of a
kept unit (1 when untuned) and 0 for a masked unit. A densely masked layer scores high: the
paper reads it as one whose pre-trained weights the adapter must stand in for (Fig. 2). The
scores of the ablation scorers are in :mod:`.ablation_scorers`, those from published anchors in
:mod:`.anchor_scorers` and :mod:`.spectral_scorers`; :func:`cost_adjusted_scores` trades any
score against the backward pass's depth (``cost_weight``).
"""
from __future__ import annotations

import math
import numbers

import torch

from floe.selection.masks import MaskSet


def layer_scores(masks: MaskSet, tuned_head: torch.Tensor | None,
                 tuned_neuron: torch.Tensor | None, t_h: float, t_f: float) -> torch.Tensor:
    """``s_l`` for every layer, ``(L,)`` float32.

    ``tuned_head`` ``(L, H)`` / ``tuned_neuron`` ``(L, F)``: continuous mask values from the
    tuning stage, or ``None`` for the binary (untuned) score; entries of masked units are
    ignored (they count 0). ``t_h``, ``t_f`` >= 0 with ``H t_h + F t_f > 0``.
    """
    for name, w in (("t_h", t_h), ("t_f", t_f)):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) \
                or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")
    parts = []
    for name, masked, tuned in (("tuned_head", masks.masked_head, tuned_head),
                                ("tuned_neuron", masks.masked_neuron, tuned_neuron)):
        if tuned is None:
            values = torch.ones(masked.shape, dtype=torch.float64)
        else:
            if tuple(tuned.shape) != tuple(masked.shape):
                raise ValueError(f"{name} has shape {tuple(tuned.shape)}, expected "
                                 f"{tuple(masked.shape)} to match the masks")
            if not bool(torch.isfinite(tuned[~masked]).all()):
                raise ValueError(f"{name} has NaN or inf values on kept units")
            values = tuned.double().clamp_min(0.0)  # a negative mask would claim more than removal
        parts.append(torch.where(masked, 0.0, values).sum(1))
    n_heads, n_neurons = masks.masked_head.shape[1], masks.masked_neuron.shape[1]
    denominator = t_h * n_heads + t_f * n_neurons
    if not denominator > 0:
        raise ValueError(f"H*t_h + F*t_f must be > 0 (got t_h={t_h}, t_f={t_f}, H={n_heads}, "
                         f"F={n_neurons}); the layer score is undefined")
    kept = t_h * parts[0] + t_f * parts[1]
    return (1.0 - kept / denominator).to(torch.float32)


def type_parts(masks: MaskSet, tuned_head: torch.Tensor | None,
               tuned_neuron: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer ``1 − mean m̃`` over its heads and over its neurons (masked units count 0), ``(L,)`` each."""
    parts = []
    for masked, tuned in ((masks.masked_head, tuned_head), (masks.masked_neuron, tuned_neuron)):
        values = torch.ones(masked.shape, dtype=torch.float64) if tuned is None else tuned.double().clamp_min(0.0)
        parts.append((1.0 - torch.where(masked, 0.0, values).mean(1)).float())
    return parts[0], parts[1]


def rank_layers(scores: torch.Tensor) -> list[int]:
    """Layer indices by descending score; equal scores keep ascending layer index."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (layers,), got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf; cannot rank layers")
    return torch.sort(scores.double(), descending=True, stable=True).indices.tolist()


def top_k(ranking: list[int], k: int | float, num_layers: int) -> list[int]:
    """The first ``k`` layers of ``ranking`` (in rank order).

    ``k`` is a count (an ``int`` in ``[1, num_layers]``) or a fraction of the layers (a
    ``float`` in ``(0, 1]``, rounded to the nearest count, at least 1). ``ranking`` must be a
    permutation of ``range(num_layers)``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) \
            or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if sorted(int(i) for i in ranking) != list(range(num_layers)):
        raise ValueError(f"ranking must be a permutation of range({num_layers}), got "
                         f"{list(ranking)!r}")
    if isinstance(k, bool):
        raise ValueError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, numbers.Integral):
        if not 1 <= k <= num_layers:
            raise ValueError(f"k={k} layers is out of range: choose 1..{num_layers}, or a "
                             "fraction in (0, 1] given as a float")
        count = int(k)
    elif isinstance(k, numbers.Real):
        if not (math.isfinite(k) and 0.0 < k <= 1.0):
            raise ValueError(f"k={k} as a fraction of layers must lie in (0, 1]; for a count "
                             f"pass an int in 1..{num_layers}")
        count = max(1, math.floor(k * num_layers + 0.5))
    else:
        raise ValueError(f"k must be an int count or a float fraction, got {k!r}")
    return [int(i) for i in ranking[:count]]


def fisher_share(fisher_head: torch.Tensor, fisher_neuron: torch.Tensor) -> torch.Tensor:
    """Each layer's share of the total Fisher (heads + neurons), ``(L,)`` float32, sums to 1."""
    if fisher_head.dim() != 2 or fisher_neuron.dim() != 2 \
            or fisher_head.shape[0] != fisher_neuron.shape[0]:
        raise ValueError(f"fisher_head (L, H) and fisher_neuron (L, F) must share L; got "
                         f"{tuple(fisher_head.shape)}, {tuple(fisher_neuron.shape)}")
    per_layer = fisher_head.double().sum(1) + fisher_neuron.double().sum(1)
    total = float(per_layer.sum())
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"total Fisher is {total}; a share needs a positive finite total "
                         "(are the mask gradients all zero?)")
    return (per_layer / total).to(torch.float32)


def cost_adjusted_scores(scores: torch.Tensor, cost_weight: float) -> torch.Tensor:
    """Scores traded against backward-pass depth (``SelectionConfig.cost_weight``), ``(L,)`` float64::

        ŝ_l = (rank(s)_l − 1) / (L − 1) − w · (L − l) / L

    ``rank(s)_l`` is 1 for the lowest score and L for the highest (ties share their mean rank), so
    the first term is the score rank-normalised to [0, 1]; adapting layer l (0-based) makes the
    backward pass run through the L − l layers from l up, so low layers pay the most. ``w = 0``
    ranks exactly as ``s``; a large ``w`` ranks the top layers first.
    """
    if isinstance(cost_weight, bool) or not isinstance(cost_weight, numbers.Real) \
            or not math.isfinite(cost_weight) or cost_weight < 0:
        raise ValueError(f"cost_weight must be a finite number >= 0, got {cost_weight!r}")
    from scipy import stats

    n = scores.numel()
    ranks = torch.as_tensor(stats.rankdata(scores.double().numpy(), method="average"), dtype=torch.float64)
    normalised = (ranks - 1) / (n - 1) if n > 1 else torch.ones(n, dtype=torch.float64)
    depth = (n - torch.arange(n, dtype=torch.float64)) / n
    return normalised - cost_weight * depth
