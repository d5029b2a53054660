"""Data-free layer scorers from the singular values of the base model's weights: Spectrum's
signal-to-noise ratio and AlphaLoRA's heavy-tail exponent, each averaged per decoder layer over
the adapter's target modules (e.g. ``gate_proj``, ``up_proj``, ``down_proj``).

* ``spectrum`` (Hartford et al., Spectrum, arXiv 2406.06623): per matrix ``W`` (``d_out × d_in``)
  with singular values ``σ``, the Marchenko–Pastur edge of a noise matrix
  ``σ_mp = σ_est (1 + √q)``, ``q = min(d_out, d_in) / max(d_out, d_in)``, ``σ_est = IQR(σ) / 1.349``
  (the interquartile range of the singular values, as Spectrum's script estimates it), and
  ``SNR = Σ_{σ_i > σ_mp} σ_i / Σ_{σ_i ≤ σ_mp} σ_i``. Spectrum trains the high-SNR layers: score = SNR.
* ``alpha`` (Qing et al., AlphaLoRA, arXiv 2410.10054): the Hill estimate of the power-law tail
  exponent of the eigenvalues ``λ_1 ≤ … ≤ λ_n`` of ``WᵀW`` (``λ = σ²``), PL_Alpha_Hill
  ``α = 1 + k / Σ_{i=1..k} ln(λ_{n−i+1} / λ_{n−k})`` with ``k = n / 2``. A low α (heavy tail) is
  a well-trained layer that needs less adaptation, so high α ranks first: score = α.
  :func:`alpha_expert_pattern` is AlphaLoRA's allocation of experts in proportion to ``α^β``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from floe.arch import decoder_layers, find_child
from floe.selection.importance import SelectionError


def target_weights(model: nn.Module, targets: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, the pre-trained weight of each target module (inside a MoE-LoRA wrapper: its base)."""
    out = []
    for layer in decoder_layers(model)[1]:
        mods = {t: find_child(layer, t)[1] for t in targets}
        out.append({t: (m.get_base_layer() if hasattr(m, "get_base_layer") else m).weight for t, m in mods.items()})
    return out


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Descending singular values, float64 on the CPU (computed in float32, in float64 for float64 weights)."""
    w = weight.detach()
    return torch.linalg.svdvals(w if w.dtype == torch.float64 else w.float()).double().cpu()


def spectrum_snr(weight: torch.Tensor) -> dict[str, float]:
    """Spectrum's SNR of one matrix: ``{"snr", "snr_over_max", "bound", "signal_values"}``.

    ``snr_over_max`` is ``SNR / σ_max``, the value Spectrum's script stores and ranks (within one
    weight type). When no singular value lies below the bound the noise is taken as 1, as there.
    """
    s = singular_values(weight)
    q = min(weight.shape) / max(weight.shape)
    sigma_est = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349  # IQR / 1.349
    bound = sigma_est * (1.0 + math.sqrt(q))                                        # Marchenko–Pastur edge
    signal, noise = s[s > bound].sum(), s[s <= bound].sum()
    snr = float(signal / noise) if bool((s <= bound).any()) else float(signal)
    return {"snr": snr, "snr_over_max": snr / float(s[0]), "bound": bound, "signal_values": int((s > bound).sum())}


def alpha_hill(weight: torch.Tensor, k: int | None = None) -> float:
    """PL_Alpha_Hill ``1 + k / Σ_{i=1..k} ln(λ_{n−i+1} / λ_{n−k})``, ``k = n // 2`` by default.

    ``λ``: the ``n = min(d_out, d_in)`` eigenvalues ``σ²`` of ``WᵀW`` that the singular values give
    (the others are 0), ascending; the threshold ``λ_{n−k}`` is the largest one outside the tail.
    WeightWatcher's and AlphaPruning's ``xmin_mid`` code counts the threshold in the tail as well
    (``1 + (k+1) / Σ …`` over the same logs); this is the paper's formula.
    """
    lam = torch.sort(singular_values(weight) ** 2).values  # λ_1 ≤ … ≤ λ_n
    n = lam.numel()
    k = n // 2 if k is None else k
    if not 1 <= k < n:
        raise SelectionError(f"alpha: the Hill estimator needs 1 <= k < n eigenvalues, got k={k}, n={n}")
    log_ratio = torch.log(lam[n - k:] / lam[n - k - 1]).sum()  # the k largest against λ_{n−k}
    if not (bool(torch.isfinite(log_ratio)) and float(log_ratio) > 0):
        raise SelectionError(f"alpha: the top eigenvalues of a {tuple(weight.shape)} matrix are equal or zero; "
                             "the tail exponent is undefined")
    return 1.0 + k / float(log_ratio)


def _per_layer(model: nn.Module, targets: Sequence[str], fn, key: str | None) -> tuple[torch.Tensor, list]:
    """Mean over each layer's target matrices of ``fn(W)`` (or of ``fn(W)[key]``), and the per-matrix values."""
    values = [{t: fn(w) for t, w in layer.items()} for layer in target_weights(model, targets)]
    scores = torch.tensor([sum(v[key] if key else v for v in layer.values()) / len(layer) for layer in values],
                          dtype=torch.float64)
    return scores, values


def spectrum_layer_scores(model: nn.Module, targets: Sequence[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(L,)`` mean Spectrum SNR over each layer's target matrices; per-matrix values in the diagnostics."""
    scores, values = _per_layer(model, targets, spectrum_snr, "snr")
    over_max = [sum(v["snr_over_max"] for v in layer.values()) / len(layer) for layer in values]
    return scores, {"targets": list(targets), "snr_over_max": over_max, "per_matrix": values}


def alpha_layer_scores(model: nn.Module, targets: Sequence[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(L,)`` mean PL_Alpha_Hill over each layer's target matrices; per-matrix values in the diagnostics."""
    scores, values = _per_layer(model, targets, alpha_hill, None)
    return scores, {"targets": list(targets), "per_matrix": values}


def alpha_expert_pattern(alphas: Sequence[float], total_experts: int, beta: float = 2.5) -> dict[int, int]:
    """AlphaLoRA's expert allocation: ``{layer: experts}`` with ``n_l ∝ α_l^β`` summing to ``total_experts``.

    Rounded by largest remainder (the floors of ``total · α_l^β / Σ_j α_j^β``, then one more for the
    largest remainders), every layer keeping at least one expert (AlphaLoRA's script rounds and
    then moves single experts, without that floor). ``β = 2.5`` is its default.
    """
    num = len(alphas)
    if num == 0 or total_experts < num:
        raise ValueError(f"total_experts must be >= the number of layers ({num}), got {total_experts}")
    weights = torch.tensor([float(a) for a in alphas], dtype=torch.float64) ** beta
    if not bool(torch.isfinite(weights).all()) or not bool((weights > 0).all()):
        raise ValueError(f"alphas must be finite and > 0, got {list(alphas)}")
    ideal = weights / weights.sum() * total_experts
    counts = torch.floor(ideal).long().clamp_min(1)
    while int(counts.sum()) != total_experts:  # add to the largest remainder, take from the smallest (> 1)
        rest = ideal - counts
        if int(counts.sum()) < total_experts:
            counts[int(torch.argmax(rest))] += 1
        else:
            counts[int(torch.argmin(torch.where(counts > 1, rest, torch.inf)))] -= 1
    return {layer: int(c) for layer, c in enumerate(counts)}
