"""FLoE layer selection (paper §3.1-3.3; docs/method.md, "Mask variables" to "Layer score").

>>> sel = select_layers(model, "runs/warmup/adapter", batches, SelectionConfig(budget=0.5, top_k=8))
>>> sel.chosen, sel.to_json("selection.json")

Read in the paper's order: :mod:`.masks` (mask variables, Eq. 2; :class:`MaskSet`),
:mod:`.taylor` (Taylor cost, Eq. 4) and :mod:`.importance` (mask gradients, Fisher, Eq. 8),
:mod:`.determination` (mask search, Alg. 1), :mod:`.refinement` (Alg. 2; :mod:`.refine_block`
the block option), :mod:`.tuning` with :mod:`.lstsq` and :mod:`.replay` (least-squares tuning),
:mod:`.layer_score` (the per-layer score, ranking, top-k), :mod:`.stages` (those stages in
order), :mod:`.api` (``select_layers``). Beside them: :mod:`.config` (configuration, result,
JSON), :mod:`.inputs`, :mod:`.fingerprints`, :mod:`.scorer_table` (scorer name → function),
:mod:`.ablation_scorers`, :mod:`.anchor_scorers` and :mod:`.spectral_scorers` (scorers from published
anchors), :mod:`.stability` (Fig. 7), :mod:`.plots` (Fig. 3/10), :mod:`.cli`.
"""
from floe.selection.api import select_layers
from floe.selection.config import Selection, SelectionConfig
from floe.selection.determination import determine, repair_budget
from floe.selection.importance import MaskGradients, SelectionError, mask_gradients, masked_losses
from floe.selection.masks import MaskHooks, MaskSet, mask_hooks, unit_geometry
from floe.selection.refine_block import refine_block
from floe.selection.refinement import refine_paper
from floe.selection.scorer_table import SCORERS
from floe.selection.taylor import weight_taylor
from floe.selection.tuning import TuningResult, tune_masks

__all__ = [
    "MaskGradients", "MaskHooks", "MaskSet", "SCORERS", "Selection", "SelectionConfig", "SelectionError",
    "TuningResult", "determine", "mask_gradients", "mask_hooks", "masked_losses", "refine_block", "refine_paper",
    "repair_budget", "select_layers", "tune_masks", "unit_geometry", "weight_taylor",
]
