"""Every ``scorer`` of :class:`~floe.selection.config.SelectionConfig` by name: what it reads and
the function that scores the layers from it.

:func:`~floe.selection.api.select_layers` computes what the configured scorer ``needs`` into an
:class:`Evidence` (``taylor``: Eq. 4 rows on the base model, ``fisher``: Eq. 8 rows on the
adapted model, ``adapter``: adapter-parameter gradients, ``loss_check``: the true masked loss
of every stage, ``adapter_outputs``: the warm-up adapter's output norms, ``hidden``: decoder-layer
input/output CKA on the base model) and calls its function; the stability analysis (paper Fig. 7)
calls the same function on :meth:`Evidence.subset` of the batches. Scorers that need nothing up
front run their own passes (``ablation``, ``ablation_greedy``) or read only the weights
(``spectrum``, ``alpha``) and report their seconds in ``timings`` under their name.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from floe.adapters.moe_lora import adapters_disabled, moe_lora_modules
from floe.selection.ablation_scorers import (
    AdapterGradientStats,
    adapter_gradient_stats,
    fisher_layer_scores,
    random_layer_scores,
    taylor_layer_scores,
)
from floe.selection.algorithm import Measure, run_stages
from floe.selection.anchor_scorers import (
    TokenRows,
    ablation_greedy,
    ablation_scores,
    linear_cka,
    lora_drop_scores,
)
from floe.selection.importance import MaskGradients
from floe.selection.layer_score import top_k
from floe.selection.spectral_scorers import alpha_layer_scores, spectrum_layer_scores

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
    base: nn.Module | None = None
    """The base model (None: ``adapted`` under :func:`floe.adapters.moe_lora.adapters_disabled`)."""
    heldout: list[dict] = field(default_factory=list)
    """The held-out batches (``ablation`` scores on them when there are any)."""
    adapter_outputs: TokenRows | None = None
    """LoRA-drop's per-batch sums of ``||Δ(x)||²`` (``lora_drop``)."""
    cka: torch.Tensor | None = None
    """``(L,)`` linear CKA of each layer's input and output on the base model (full data only)."""
    memo: dict = field(default_factory=dict)
    """Results that a subset of the selection batches cannot change (weights only, or held-out data)."""

    def subset(self, index: list[int]) -> "Evidence":
        """The same evidence on the batches in ``index`` only (no loss check)."""
        return Evidence(self.cfg, self.adapted, [self.batches[i] for i in index], self.num_layers,
                        None if self.taylor is None else self.taylor.subset(index),
                        None if self.fisher is None else self.fisher.subset(index),
                        None if self.adapter is None else self.adapter.subset(index),
                        base=self.base, heldout=self.heldout,
                        adapter_outputs=None if self.adapter_outputs is None else self.adapter_outputs.subset(index),
                        memo=self.memo)

    @property
    def base_model(self) -> nn.Module:
        return self.adapted if self.base is None else self.base


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


def _memo(ev: Evidence, key: tuple, name: str, compute: Callable[[], tuple[torch.Tensor, dict]]) -> Scored:
    """``compute()`` once per ``key`` (timed under ``name``), with its diagnostics under ``name``."""
    if key not in ev.memo:
        t = time.perf_counter()
        scores, diag = compute()
        ev.memo[key] = Scored(scores.float(), diagnostics={name: diag}, timings={name: time.perf_counter() - t})
    return ev.memo[key]


def _lora_drop(ev: Evidence) -> Scored:
    rows = ev.adapter_outputs
    return Scored(lora_drop_scores(rows), diagnostics={"lora_drop": {
        "mean_sq_output": rows.mean().tolist(), "tokens": float(rows.tokens.sum())}})


def _ablation(ev: Evidence, greedy: bool) -> Scored:
    """On the held-out batches, or on the selection batches when there are none. Held-out scores do
    not depend on the selection batches, so a stability subset reuses them (its ranking is the same)."""
    data = ev.heldout or ev.batches
    name = "ablation_greedy" if greedy else "ablation"
    k = len(top_k(list(range(ev.num_layers)), ev.cfg.top_k, ev.num_layers))

    def compute() -> tuple[torch.Tensor, dict]:
        scores, diag = ablation_greedy(ev.adapted, data, k) if greedy else ablation_scores(ev.adapted, data)
        return scores, {**diag, "data": "heldout" if ev.heldout else "selection", "batches": len(data)}

    return _memo(ev, (name, *map(id, data)), name, compute)


def _cka(ev: Evidence) -> Scored:
    timings = {}
    cka = ev.cka
    if cka is None:  # a subset: rerun the forward passes on its batches
        t = time.perf_counter()
        with adapters_disabled(ev.base_model):
            cka = linear_cka(ev.base_model, ev.batches)
        timings["hidden_states"] = time.perf_counter() - t
    return Scored((1.0 - cka).float(), diagnostics={"cka": {"cka": cka.tolist()}}, timings=timings)


def _spectral(ev: Evidence, name: str) -> Scored:
    """Data-free: the base model's target-module weights (the adapter's target modules)."""
    targets = sorted({n.split(".")[-1] for n in moe_lora_modules(ev.adapted)})
    fn = spectrum_layer_scores if name == "spectrum" else alpha_layer_scores
    return _memo(ev, (name,), name, lambda: fn(ev.base_model, targets))


@dataclass(frozen=True)
class Scorer:
    """One scorer: what :class:`Evidence` it needs and its function."""

    needs: tuple[str, ...]
    """Of ``"taylor"``, ``"fisher"``, ``"adapter"``, ``"loss_check"``, ``"adapter_outputs"``, ``"hidden"``."""
    score: Callable[[Evidence], Scored]


SCORERS: dict[str, Scorer] = {
    "floe": Scorer(("taylor", "fisher", "loss_check"), _floe),
    "fisher": Scorer(("fisher",), lambda ev: _per_unit(fisher_layer_scores, *ev.fisher.fisher())),
    "taylor": Scorer(("taylor",), lambda ev: _per_unit(taylor_layer_scores, *ev.taylor.taylor())),
    "grad_norm": Scorer(("adapter",), lambda ev: Scored(ev.adapter.grad_norm)),
    "random": Scorer((), lambda ev: Scored(random_layer_scores(ev.num_layers, ev.cfg.seed))),
    "fim_variance": Scorer(("adapter",), _fim_variance),
    "lora_drop": Scorer(("adapter_outputs",), _lora_drop),
    "ablation": Scorer((), lambda ev: _ablation(ev, greedy=False)),
    "ablation_greedy": Scorer((), lambda ev: _ablation(ev, greedy=True)),
    "spectrum": Scorer((), lambda ev: _spectral(ev, "spectrum")),
    "cka": Scorer(("hidden",), _cka),
    "alpha": Scorer((), lambda ev: _spectral(ev, "alpha")),
}
"""Scorer name → :class:`Scorer`; ``floe`` is the paper's, then the ablation's (:mod:`.ablation_scorers`),
then those from published anchors (:mod:`.anchor_scorers`, :mod:`.spectral_scorers`; docs/selection.md)."""
