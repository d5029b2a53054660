"""FLoE layer selection (paper §3.1-3.3; docs/method.md, "Mask variables" to "Layer score").

>>> sel = select_layers(model, "runs/warmup/adapter", batches, SelectionConfig(budget=0.5, top_k=8))
>>> sel.chosen, sel.to_json("selection.json")

Modules: :mod:`.masks` (mask hooks), :mod:`.importance` (Fisher / Taylor),
:mod:`.determination` (Alg. 1), :mod:`.refinement` (Alg. 2), :mod:`.lstsq` and :mod:`.tuning`
(least-squares tuning), :mod:`.score` (layer score, ranking, top-k), :mod:`.scorers` (ablation
scorers), :mod:`.stability` (Fig. 7), :mod:`.plots` (Fig. 3/10 heatmap), :mod:`.api`, :mod:`.cli`.
"""
from floe.selection.api import Selection, SelectionConfig, select_layers
from floe.selection.determination import MaskSet, determine, repair_budget
from floe.selection.importance import (
    MaskGradients,
    SelectionError,
    mask_gradients,
    masked_losses,
    weight_taylor,
)
from floe.selection.masks import MaskHooks, mask_hooks, unit_geometry
from floe.selection.refinement import refine_block, refine_paper
from floe.selection.scorers import SCORERS
from floe.selection.tuning import TuningResult, tune_masks

__all__ = [
    "MaskGradients", "MaskHooks", "MaskSet", "SCORERS", "Selection", "SelectionConfig", "SelectionError",
    "TuningResult", "determine", "mask_gradients", "mask_hooks", "masked_losses", "refine_block", "refine_paper",
    "repair_budget", "select_layers", "tune_masks", "unit_geometry", "weight_taylor",
]
