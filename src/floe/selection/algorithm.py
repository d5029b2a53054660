"""FLoE's stages after the gradients, in the paper's order (docs/method.md, "Determination" to
"Layer score and selection"):

    F_u (Eq. 8-9), c_u (Eq. 4)
      → mask search, Alg. 1 (Eq. 11-12; :mod:`.determination`), then the budget repair
      → refinement, Alg. 2 (Eq. 13-15; :mod:`.refinement`, or ``refine: block``)
      → tuning: layer-wise least squares for continuous masks (Eq. 16-21; :mod:`.tuning`)
      → per-layer score ``s_l`` (:mod:`.layer_score`)

After each of determination, refinement and tuning, ``diagnostics.<stage>`` records the
ranking, its rank correlation with the previous stage's, the cost against the budget and (with
a :class:`Measure`) the true masked-loss increase on the selection and held-out batches.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn as nn

from floe.distributed import rank_and_world
from floe.selection.determination import constrained_cost, determine, mean_costs, repair_budget
from floe.selection.importance import MaskGradients, masked_losses
from floe.selection.layer_score import layer_scores, rank_layers, type_parts
from floe.selection.masks import MaskSet
from floe.selection.refine_block import refine_block
from floe.selection.refinement import refine_paper
from floe.selection.tuning import TuningResult, tune_masks

if TYPE_CHECKING:
    from floe.selection.config import SelectionConfig


def progress(cfg: SelectionConfig, desc: str) -> Callable[[Iterable], Iterable] | None:
    """A tqdm wrapper for a pass over the batches when ``cfg.progress`` (first process only)."""
    if not cfg.progress or rank_and_world()[0] != 0:
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False)


@dataclass
class Measure:
    """What the stage reports need for the true masked loss: the adapted model and its data."""

    model: nn.Module
    batches: list[dict]
    heldout: list[dict]
    base_selection: float
    base_heldout: float | None

    @classmethod
    def unmasked(cls, model: nn.Module, batches: list[dict], heldout: list[dict],
                 fisher: MaskGradients) -> "Measure":
        """The unmasked losses: the Fisher pass's on the selection batches, one forward pass on the held-out."""
        base_held = float(masked_losses(model, heldout).mean()) if heldout else None
        return cls(model, batches, heldout, float(fisher.loss.mean()), base_held)

    def increase(self, head: torch.Tensor, neuron: torch.Tensor) -> dict[str, float]:
        """True masked-loss increase with these mask values, on the selection (and held-out) batches."""
        out = {"selection": float(masked_losses(self.model, self.batches, head, neuron).mean()) - self.base_selection}
        if self.heldout:
            out["heldout"] = float(masked_losses(self.model, self.heldout, head, neuron).mean()) - self.base_heldout
        return out


@dataclass
class FloeOutcome:
    """The masks and scores the stages end with, and what each stage reported."""

    masks: MaskSet
    tuned_head: torch.Tensor | None
    tuned_neuron: torch.Tensor | None
    scores: torch.Tensor
    untuned: torch.Tensor
    head_part: torch.Tensor
    neuron_part: torch.Tensor
    diagnostics: dict[str, Any]
    timings: dict[str, float]


def rank_correlation(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    """Spearman correlation of two per-layer score vectors (None without a previous stage)."""
    if b is None or a.numel() < 2 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None  # undefined for a constant score vector
    from scipy import stats

    value = float(stats.spearmanr(a.double().numpy(), b.double().numpy())[0])
    return value if math.isfinite(value) else 1.0


def stage_report(masks: MaskSet, scores: torch.Tensor, previous: torch.Tensor | None, cost_head: torch.Tensor,
                 cost_neuron: torch.Tensor, cfg: SelectionConfig, measure: Measure | None,
                 head_values: torch.Tensor | None = None, neuron_values: torch.Tensor | None = None) -> dict[str, Any]:
    """Ranking after a stage, its correlation with the previous stage's, the budget and the true masked loss."""
    budget_c = cfg.budget * float(cost_head.double().sum() + cost_neuron.double().sum())
    cost = constrained_cost(masks.masked_head, masks.masked_neuron, cost_head, cost_neuron, cfg.mask_rule)
    report: dict[str, Any] = dict(
        ranking=rank_layers(scores), scores=scores.tolist(), rank_correlation=rank_correlation(scores, previous),
        constrained="kept" if cfg.mask_rule == "kwon" else "masked", cost=cost, budget=budget_c,
        fits_budget=bool(cost <= budget_c * (1 + 1e-9)),
        heads_masked=int(masks.masked_head.sum()), neurons_masked=int(masks.masked_neuron.sum()))
    if measure is not None:
        report["loss_increase"] = measure.increase(masks.head_mask() if head_values is None else head_values,
                                                   masks.neuron_mask() if neuron_values is None else neuron_values)
    return report


def _refine(masks: MaskSet, grads: MaskGradients, fh: torch.Tensor, fn: torch.Tensor, ch: torch.Tensor,
            cn: torch.Tensor, cfg: SelectionConfig) -> tuple[MaskSet, dict[str, Any]] | None:
    """Alg. 2 (``refine: paper``), the block-correlated search (``block``), or None (``none``)."""
    if cfg.refine == "paper":
        return refine_paper(masks, fh, fn, ch, cn, cfg.budget, cfg.mask_rule, max_swaps=cfg.refine_iters)
    if cfg.refine == "block":
        return refine_block(masks, grads.head, grads.neuron, ch, cn, cfg.budget, cfg.mask_rule,
                            k_candidates=cfg.refine_candidates, max_iters=cfg.refine_iters)
    return None


def _tuning_diagnostics(tuning: TuningResult, masks: MaskSet, report: dict[str, Any]) -> dict[str, Any]:
    """``diagnostics.tuning`` (per sublayer, clamped negative masks, the stage report) and the fallbacks."""
    negative = int((tuning.head[~masks.masked_head] < 0).sum() + (tuning.neuron[~masks.masked_neuron] < 0).sum())
    return {"tuning": {"sublayers": tuning.diagnostics, "negative_masks_clamped": negative, **report},
            "tuning_fallbacks": [f"layer {d['layer']} {d['kind']}: {d['reason']}"
                                 for d in tuning.diagnostics if d["status"] == "fallback_binary"]}


def run_stages(adapted: nn.Module, batches: list[dict], fisher_grads: MaskGradients, taylor_grads: MaskGradients,
               cfg: SelectionConfig, measure: Measure | None = None) -> FloeOutcome:
    """Alg. 1 → budget repair → Alg. 2 → least-squares tuning → layer scores, each stage reported.

    ``fisher_grads``: Eq. 8 rows of the adapted model; ``taylor_grads``: Eq. 4 rows of the base
    model; ``measure``: when given, every stage's true masked-loss increase is measured.
    """
    timings: dict[str, float] = {}
    diagnostics: dict[str, Any] = {}
    fh, fn = fisher_grads.fisher()  # F_u, Eq. 8-9
    ch, cn = taylor_grads.taylor()  # c_u, Eq. 4
    t_h, t_f = mean_costs(ch, cn)   # Alg. 1 prices every head at t_h and every neuron at t_f

    def report(masks: MaskSet, scores: torch.Tensor, previous: torch.Tensor | None, *values) -> dict[str, Any]:
        return stage_report(masks, scores, previous, ch, cn, cfg, measure, *values)

    t = time.perf_counter()
    masks = determine(fh, fn, ch, cn, cfg.budget, cfg.mask_rule)             # Alg. 1 (mean costs)
    masks = repair_budget(masks, fh, fn, ch, cn, cfg.budget, cfg.mask_rule)  # fit C with per-unit costs
    timings["mask_search"] = time.perf_counter() - t
    untuned = layer_scores(masks, None, None, t_h, t_f)
    diagnostics["determination"] = {**masks.diagnostics, **report(masks, untuned, None)}

    t = time.perf_counter()
    refined = _refine(masks, fisher_grads, fh, fn, ch, cn, cfg)                # Alg. 2 (Eq. 13-15)
    timings["refinement"] = time.perf_counter() - t
    if refined is not None:
        masks, diag = refined
        previous, untuned = untuned, layer_scores(masks, None, None, t_h, t_f)
        diagnostics["refinement"] = {**diag, **report(masks, untuned, previous)}

    tuned_head = tuned_neuron = None
    scores = untuned
    t = time.perf_counter()
    if cfg.tune:                                                              # least squares, Eq. 16-21
        tuning = tune_masks(adapted, batches, masks, damping=cfg.damping, max_abs=cfg.max_abs_mask,
                            progress=progress(cfg, "tuning"))
        tuned_head, tuned_neuron = tuning.head, tuning.neuron
        scores = layer_scores(masks, tuned_head, tuned_neuron, t_h, t_f)      # s_l of the tuned masks
        diagnostics.update(_tuning_diagnostics(tuning, masks, report(masks, scores, untuned, tuned_head, tuned_neuron)))
    timings["tuning"] = time.perf_counter() - t
    return FloeOutcome(masks, tuned_head, tuned_neuron, scores, untuned, *type_parts(masks, tuned_head, tuned_neuron),
                       diagnostics, timings)
