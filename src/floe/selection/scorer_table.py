"""Every ``scorer`` of :class:`~floe.selection.config.SelectionConfig` by name: what it reads and
the function that scores the layers from it.

:func:`~floe.selection.api.select_layers` computes what the configured scorer ``needs`` into an
:class:`Evidence` (``taylor``: Eq. 4 rows on the base model, ``fisher``: Eq. 8 rows on the
adapted model, ``adapter``: adapter-parameter gradients, ``loss_check``: the true masked loss
of every stage) and calls its function; the stability analysis (paper Fig. 7) calls the same
function on :meth:`Evidence.subset` of the batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from floe.selection.ablation_scorers import (
    AdapterGradientStats,
    adapter_gradient_stats,
    fisher_layer_scores,
    random_layer_scores,
    taylor_layer_scores,
)
from floe.selection.importance import MaskGradients
from floe.selection.stages import Measure, run_stages

if TYPE_CHECKING:
    from floe.selection.config import SelectionConfig


@dataclass
class Evidence:
    """What a scorer reads: the adapted model, the selection batches and what was computed on them."""

    cfg: SelectionConfig
    adapted: nn.Module
    batches: list[dict]
    num_layers: int
    taylor: MaskGradients | None = None
    """Taylor-cost rows of the base model (Eq. 4, or ``taylor: mask``)."""
    fisher: MaskGradients | None = None
    """Mask-gradient rows of the adapted model (Eq. 8 per example, or ``fisher: batch``)."""
    adapter: AdapterGradientStats | None = None
    measure: Measure | None = None
    """The true masked-loss check of every stage (full data only)."""

    def subset(self, index: list[int]) -> "Evidence":
        """The same evidence on the batches in ``index`` only (no loss check)."""
        return Evidence(self.cfg, self.adapted, [self.batches[i] for i in index], self.num_layers,
                        None if self.taylor is None else self.taylor.subset(index),
                        None if self.fisher is None else self.fisher.subset(index),
                        None if self.adapter is None else self.adapter.subset(index))


@dataclass
class Scored:
    """A scorer's per-layer scores and what else it reports."""

    scores: torch.Tensor
    """``(L,)``, higher = more important."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Optional :class:`~floe.selection.config.Selection` fields it fills (head_importance, ...)."""
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _floe(ev: Evidence) -> Scored:
    """The paper's pipeline: Alg. 1 → Alg. 2 → tuning → layer score (:func:`.stages.run_stages`)."""
    out = run_stages(ev.adapted, ev.batches, ev.fisher, ev.taylor, ev.cfg, ev.measure)
    heads_masked, neurons_masked = out.masks.counts_per_layer()
    masks = {"masked_head": out.masks.masked_head, "masked_neuron": out.masks.masked_neuron}
    if out.tuned_head is not None:
        masks.update(tuned_head=out.tuned_head, tuned_neuron=out.tuned_neuron)
    fields = dict(untuned_scores=out.untuned.tolist(), head_importance=out.head_part.tolist(),
                  neuron_importance=out.neuron_part.tolist(), heads_masked=heads_masked,
                  neurons_masked=neurons_masked)
    return Scored(out.scores, fields, masks, out.diagnostics, out.timings)


def _per_unit(scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], head: torch.Tensor,
              neuron: torch.Tensor) -> Scored:
    """A layer score summed from per-unit values, with the head and neuron sums reported."""
    return Scored(scores(head, neuron), dict(head_importance=head.double().sum(1).tolist(),
                                             neuron_importance=neuron.double().sum(1).tolist()))


def _fim_variance(ev: Evidence) -> Scored:
    stats = ev.adapter
    if stats.fim_variance is None:  # a subset: the variance needs the gradients, which are not kept
        stats = adapter_gradient_stats(ev.adapted, ev.batches)
    return Scored(stats.fim_variance)


@dataclass(frozen=True)
class Scorer:
    """One scorer: what :class:`Evidence` it needs and its function."""

    needs: tuple[str, ...]
    """Of ``"taylor"``, ``"fisher"``, ``"adapter"``, ``"loss_check"``."""
    score: Callable[[Evidence], Scored]


SCORERS: dict[str, Scorer] = {
    "floe": Scorer(("taylor", "fisher", "loss_check"), _floe),
    "fisher": Scorer(("fisher",), lambda ev: _per_unit(fisher_layer_scores, *ev.fisher.fisher())),
    "taylor": Scorer(("taylor",), lambda ev: _per_unit(taylor_layer_scores, *ev.taylor.taylor())),
    "grad_norm": Scorer(("adapter",), lambda ev: Scored(ev.adapter.grad_norm)),
    "random": Scorer((), lambda ev: Scored(random_layer_scores(ev.num_layers, ev.cfg.seed))),
    "fim_variance": Scorer(("adapter",), _fim_variance),
}
"""Scorer name → :class:`Scorer`; ``floe`` is the paper's, the others the ablation's (:mod:`.ablation_scorers`)."""
