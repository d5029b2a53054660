"""``select_layers``: the FLoE layer-selection pipeline behind one call (docs/method.md).

Taylor cost on the base model (Eq. 4) → Fisher on the adapted model (Eq. 8, per example) →
mask search (Alg. 1, then the budget repair with per-unit costs) → refinement (Alg. 2) →
tuning (least squares) → per-layer score → ranking → top-k. The stages after the gradients are
:func:`.stages.run_stages`; the ``scorer`` option swaps them for an ablation scorer or one from a
published anchor (:mod:`.scorer_table`). One model object can play both roles: the base model is
the adapted one under :func:`floe.adapters.moe_lora.adapters_disabled`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable

import torch
import torch.nn as nn

from floe.adapters.moe_lora import adapters_disabled
from floe.distributed import rank_and_world
from floe.selection.ablation_scorers import adapter_gradient_stats
from floe.selection.algorithm import Measure, progress
from floe.selection.anchor_scorers import linear_cka, lora_output_rows
from floe.selection.config import Selection, SelectionConfig, jsonable
from floe.selection.fingerprints import input_fingerprints
from floe.selection.importance import mask_gradients
from floe.selection.inputs import check_config, check_top_k, resolve_models, split_heldout
from floe.selection.layer_score import cost_adjusted_scores, fisher_share, rank_layers, top_k
from floe.selection.masks import unit_geometry
from floe.selection.scorer_table import SCORERS, Evidence
from floe.selection.stability import stability_analysis
from floe.selection.taylor import weight_taylor

__all__ = ["Selection", "SelectionConfig", "select_layers"]


def select_layers(model: nn.Module, adapted: nn.Module | str | os.PathLike | None = None,
                  data: Iterable[dict] = (), config: SelectionConfig | None = None,
                  heldout: Iterable[dict] | None = None) -> Selection:
    """Score every decoder layer and choose the top-k for sparse MoE-LoRA adaptation.

    ``model``: the base causal LM. ``adapted``: the warm-up adapter's folder (loaded into
    ``model``, which then plays both roles), a separate adapted model, or ``None`` when
    ``model`` already carries the adapter. ``data``: an iterable of batches (dicts with
    ``input_ids``, ``attention_mask``, ``labels``; prompt tokens labelled -100), read once and
    kept as a list; unless ``heldout`` batches are given, the last ``config.heldout_batches`` of
    them are held out: only the true masked-loss check of each stage sees them (``diagnostics.
    <stage>.loss_increase.heldout``). Under ``torch.distributed`` every process must call this with the same data;
    each computes its share of the batches and all return the same :class:`Selection`.

    Raises :class:`SelectionError` (a ``ValueError``) for a bad configuration, top-k out of
    range, a missing/mismatched adapter (``AdapterError``), too few batches, batches without
    response tokens, and NaN/inf losses or gradients.
    """
    cfg = check_config(config)
    t_start = time.perf_counter()
    base, adapted_model, adapter_fp = resolve_models(model, adapted)
    geo = unit_geometry(adapted_model)
    check_top_k(cfg.top_k, geo.num_layers)
    batches, held = split_heldout(data, heldout, cfg)
    timings: dict[str, float] = {}
    diagnostics: dict[str, Any] = {"data": {"num_batches": len(batches), "heldout_batches": len(held)}}
    scorer = SCORERS[cfg.scorer]

    # Eq. 4 Taylor cost (base model), Eq. 8 Fisher (adapted model), or what an ablation scorer reads
    evidence = _evidence(base, adapted_model, batches, held, cfg, geo.num_layers, timings, diagnostics)
    # floe: Alg. 1 mask search → Alg. 2 refinement → least-squares tuning → layer score s_l
    t = time.perf_counter()
    scored = scorer.score(evidence)
    timings.update(scored.timings)
    timings["scorer"] = time.perf_counter() - t
    diagnostics.update(scored.diagnostics)
    # ranking by descending score (with cost_weight > 0: by the depth-adjusted score), then the top-k layers
    ranking, adjusted = _ranking(scored.scores, cfg)
    if adjusted is not None:
        diagnostics["cost_aware"] = {"cost_weight": cfg.cost_weight, "adjusted_scores": adjusted.tolist(),
                                     "ranking_by_score": rank_layers(scored.scores)}
    chosen = top_k(ranking, cfg.top_k, geo.num_layers)

    stability = None
    if cfg.stability:  # Fig. 7: the same scorer on subsamples of the batches
        t = time.perf_counter()
        stability = _stability(evidence, ranking, len(chosen))
        timings["stability"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    fields = {**dict.fromkeys(("untuned_scores", "fisher_share", "head_importance", "neuron_importance",
                               "heads_masked", "neurons_masked")), **scored.fields}
    if evidence.fisher is not None:
        fields["fisher_share"] = fisher_share(*evidence.fisher.fisher()).tolist()
    return Selection(
        scorer=cfg.scorer, num_layers=geo.num_layers, scores=[float(s) for s in scored.scores], ranking=ranking,
        chosen=chosen, geometry=dict(num_layers=geo.num_layers, num_heads=geo.num_heads, head_dim=geo.head_dim,
                                     num_neurons=geo.num_neurons),
        diagnostics=jsonable(diagnostics), timings=timings,
        fingerprints=input_fingerprints(base, adapter_fp, batches, cfg, rank_and_world()[1]),
        config=cfg.to_dict(), stability=stability, masks=scored.masks, **fields)


def _ranking(scores: torch.Tensor, cfg: SelectionConfig) -> tuple[list[int], torch.Tensor | None]:
    """The ranking by the scores, or by :func:`.layer_score.cost_adjusted_scores` when ``cost_weight > 0``."""
    if cfg.cost_weight == 0:
        return rank_layers(scores), None
    adjusted = cost_adjusted_scores(scores, cfg.cost_weight)
    return rank_layers(adjusted), adjusted


def _evidence(base: nn.Module, adapted: nn.Module, batches: list[dict], held: list[dict], cfg: SelectionConfig,
              num_layers: int, timings: dict[str, float], diagnostics: dict[str, Any]) -> Evidence:
    """The gradient passes the configured scorer needs, each timed; their mean losses go to
    ``diagnostics["losses"]``."""
    needs = SCORERS[cfg.scorer].needs
    evidence = Evidence(cfg, adapted, batches, num_layers, base=base, heldout=held)
    losses: dict[str, float] = {}
    if "taylor" in needs:  # Eq. 4 (or |dL/dm| with taylor: mask) on the base model: adapters off
        t = time.perf_counter()
        with adapters_disabled(base):
            if cfg.taylor == "weights":
                evidence.taylor = weight_taylor(base, batches, stage="Taylor cost, Eq. 4 (base model)",
                                                progress=progress(cfg, "Taylor (base)"))
            else:
                evidence.taylor = mask_gradients(base, batches, stage="Taylor cost (base model)",
                                                 progress=progress(cfg, "Taylor (base)"))
        timings["taylor"] = time.perf_counter() - t
        losses["base_mean"] = float(evidence.taylor.loss.mean())
    if "fisher" in needs:  # Eq. 8: squared per-example mask gradients of the adapted model
        t = time.perf_counter()
        evidence.fisher = mask_gradients(adapted, batches, stage="Fisher (adapted model)",
                                         per_example=cfg.fisher == "example",
                                         progress=progress(cfg, "Fisher (adapted)"))
        timings["fisher"] = time.perf_counter() - t
        losses["adapted_mean"] = float(evidence.fisher.loss.mean())
    if "adapter" in needs:  # grad_norm, fim_variance: gradients of the adapter parameters
        t = time.perf_counter()
        evidence.adapter = adapter_gradient_stats(adapted, batches, progress=progress(cfg, "adapter gradients"))
        timings["adapter_gradients"] = time.perf_counter() - t
    if "adapter_outputs" in needs:  # lora_drop: ||Δ(x)||² of the warm-up adapter, by forward hooks
        t = time.perf_counter()
        evidence.adapter_outputs = lora_output_rows(adapted, batches, progress=progress(cfg, "adapter outputs"))
        timings["adapter_outputs"] = time.perf_counter() - t
    if "hidden" in needs:  # cka: decoder-layer inputs and outputs of the base model
        t = time.perf_counter()
        with adapters_disabled(base):
            evidence.cka = linear_cka(base, batches, progress=progress(cfg, "hidden states (base)"))
        timings["hidden_states"] = time.perf_counter() - t
    if "loss_check" in needs and cfg.loss_check:  # the unmasked losses the stage reports compare with
        evidence.measure = Measure.unmasked(adapted, batches, held, evidence.fisher)
        if evidence.measure.base_heldout is not None:
            losses["adapted_heldout_mean"] = evidence.measure.base_heldout
    if losses:
        diagnostics["losses"] = losses
    return evidence


def _stability(evidence: Evidence, ranking: list[int], k: int) -> dict[str, Any]:
    """Rankings by the configured scorer on seeded subsamples of the batches (paper Fig. 7)."""
    n = len(evidence.batches)
    score = SCORERS[evidence.cfg.scorer].score

    def rank_fn(index: list[int]) -> list[int]:
        if list(index) == list(range(n)):
            return list(ranking)
        return _ranking(score(evidence.subset(index)).scores, evidence.cfg)[0]

    cfg = evidence.cfg
    return stability_analysis(rank_fn, n, cfg.stability_fractions, cfg.seed, top_k=k).to_dict()
