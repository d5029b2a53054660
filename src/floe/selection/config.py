"""What :func:`~floe.selection.api.select_layers` reads and returns: :class:`SelectionConfig`
(validated on construction) and :class:`Selection` (scores, ranking, chosen layers, diagnostics,
timings, input fingerprints), which reads and writes ``selection.json``.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from floe.io import atomic_file, atomic_write_text
from floe.selection.determination import RULES
from floe.selection.importance import SelectionError
from floe.selection.scorer_table import SCORERS

FORMAT = "floe-selection/1"
REFINE_METHODS = ("paper", "block", "none")
TAYLOR_FORMS = ("weights", "mask")
FISHER_FORMS = ("example", "batch")


@dataclass
class SelectionConfig:
    """How :func:`select_layers` scores and chooses layers."""

    budget: float = 0.5
    """Taylor budget gamma in (0, 1): C = gamma × the total Taylor cost of all heads and neurons."""
    top_k: int | float = 0.25
    """Layers to choose: a count (int in 1..L) or a fraction of the layers (float in (0, 1])."""
    mask_rule: str = "fisher_top"
    """Reading of Alg. 1: fisher_top (mask the largest Fisher, which on SmolLM2 picks low layers, 0-10; the
    default, by docs/results.md's rule), paper (mask the smallest: picks the top layers), kwon (keep the largest)."""
    scorer: str = "floe"
    """floe (full pipeline), an ablation scorer (fisher, taylor, grad_norm, random, fim_variance) or one from a
    published anchor (lora_drop, ablation, ablation_greedy, spectrum, cka, alpha; docs/selection.md)."""
    cost_weight: float = 0.0
    """Trade the score against backward-pass depth: rank by rank-normalised score − cost_weight·(L−l)/L (0: off)."""
    refine: str = "paper"
    """Refinement: paper (Alg. 2: within-layer head-neuron swaps, diagonal Fisher), block (block-correlated J), none."""
    refine_iters: int | None = None
    """Cap on refinement swaps (None: until no improving swap is left)."""
    refine_candidates: int = 64
    """refine: block only: K weakest members and strongest non-members of each type tried per step."""
    taylor: str = "weights"
    """Taylor cost: weights (Eq. 4, sum of |theta * grad| over each unit's weights) or mask (|dL/dm| per batch)."""
    fisher: str = "example"
    """Fisher: example (Eq. 8, squared per-example mask gradients) or batch (squared batch-mean gradients)."""
    heldout_batches: int = 2
    """Batches split off the end of the data (at most half) for the held-out masked-loss check only; 0: none."""
    loss_check: bool = True
    """Measure each stage's true masked-loss increase by forward passes (selection and held-out batches)."""
    tune: bool = True
    """Run the least-squares tuning stage (continuous masks); False scores the binary masks."""
    damping: float = 1e-3
    """Ridge damping of the tuning solve, relative to the mean diagonal of the normal equations."""
    max_abs_mask: float = 10.0
    """A sublayer whose tuned mask has |m| above this keeps its binary mask."""
    num_batches: int | None = None
    """Use the first N batches of the data (None: all); fewer available is an error."""
    seed: int = 0
    """Seed of the random scorer and of the stability subsamples."""
    stability: bool = False
    """Also rank the layers on subsamples of the batches (paper Fig. 7); reruns the scorer per fraction."""
    stability_fractions: list[float] = field(default_factory=lambda: [1.0, 0.7, 0.3])
    """Subsample fractions of the batches for the stability analysis (the first is the reference)."""
    progress: bool = False
    """Show progress bars (on the first process only)."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) \
                or not math.isfinite(self.budget) or not 0.0 < self.budget < 1.0:
            problems.append(f"budget must be a fraction in (0, 1) of the total Taylor cost, got {self.budget!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or \
                (isinstance(k, int) and k < 1) or (isinstance(k, float) and not (0.0 < k <= 1.0)):
            problems.append(f"top_k must be a layer count (int >= 1) or a fraction of the layers "
                            f"(float in (0, 1]), got {k!r}")
        if self.mask_rule not in RULES:
            problems.append(f"mask_rule must be one of {list(RULES)}, got {self.mask_rule!r}")
        if self.scorer not in SCORERS:
            problems.append(f"scorer must be one of {list(SCORERS)}, got {self.scorer!r}")
        if isinstance(self.cost_weight, bool) or not isinstance(self.cost_weight, (int, float)) \
                or not math.isfinite(self.cost_weight) or self.cost_weight < 0:
            problems.append(f"cost_weight must be a number >= 0 (0: off), got {self.cost_weight!r}")
        if isinstance(self.refine, bool):  # older configs: refine: true / false
            self.refine = "paper" if self.refine else "none"
        if self.refine not in REFINE_METHODS:
            problems.append(f"refine must be one of {list(REFINE_METHODS)}, got {self.refine!r}")
        if self.taylor not in TAYLOR_FORMS:
            problems.append(f"taylor must be one of {list(TAYLOR_FORMS)}, got {self.taylor!r}")
        if self.fisher not in FISHER_FORMS:
            problems.append(f"fisher must be one of {list(FISHER_FORMS)}, got {self.fisher!r}")
        if isinstance(self.heldout_batches, bool) or not isinstance(self.heldout_batches, int) \
                or self.heldout_batches < 0:
            problems.append(f"heldout_batches must be an int >= 0, got {self.heldout_batches!r}")
        if self.refine_iters is not None and (isinstance(self.refine_iters, bool)
                                              or not isinstance(self.refine_iters, int) or self.refine_iters < 0):
            problems.append(f"refine_iters must be None (no cap) or an int >= 0, got {self.refine_iters!r}")
        if not isinstance(self.refine_candidates, int) or self.refine_candidates < 1:
            problems.append(f"refine_candidates must be an int >= 1, got {self.refine_candidates!r}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            problems.append(f"damping must be a number >= 0, got {self.damping!r}")
        if not (isinstance(self.max_abs_mask, (int, float)) and self.max_abs_mask > 1):
            problems.append(f"max_abs_mask must be > 1, got {self.max_abs_mask!r}")
        if self.num_batches is not None and (not isinstance(self.num_batches, int) or self.num_batches < 1):
            problems.append(f"num_batches must be None (all) or an int >= 1, got {self.num_batches!r}")
        self.stability_fractions = [float(f) for f in self.stability_fractions]
        if not self.stability_fractions or any(not 0.0 < f <= 1.0 for f in self.stability_fractions):
            problems.append(f"stability_fractions must be fractions in (0, 1], got {self.stability_fractions!r}")
        if problems:
            raise SelectionError("invalid SelectionConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Selection:
    """The result of :func:`select_layers` (everything JSON-serialisable except the mask tensors)."""

    scorer: str
    num_layers: int
    scores: list[float]
    """Per-layer importance score (higher = more important)."""
    ranking: list[int]
    """Layer indices, most important first."""
    chosen: list[int]
    """The top-k layers, in rank order."""
    untuned_scores: list[float] | None = None
    """The score of the binary (untuned) masks (floe scorer)."""
    fisher_share: list[float] | None = None
    """Each layer's share of the total Fisher of the adapted model."""
    head_importance: list[float] | None = None
    """Per layer: the head part of the score (1 − mean tuned head mask; masked heads count 0)."""
    neuron_importance: list[float] | None = None
    """Per layer: the neuron part of the score."""
    heads_masked: list[int] | None = None
    neurons_masked: list[int] | None = None
    geometry: dict[str, int] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    """Per stage: determination, refinement, tuning (per sublayer), losses, data."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: taylor (Eq. 4), fisher (Eq. 8), adapter_gradients (grad_norm, fim_variance),
    adapter_outputs (lora_drop), hidden_states (cka), ablation, ablation_greedy, spectrum, alpha,
    mask_search (Alg. 1 and the budget repair), refinement (Alg. 2), tuning, scorer (all of the
    scorer's stages), stability, total."""
    fingerprints: dict[str, Any] = field(default_factory=dict)
    """Hashes of the inputs: model config, adapter weights, data, configuration, versions."""
    config: dict[str, Any] = field(default_factory=dict)
    stability: dict[str, Any] | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """``masked_head``/``masked_neuron`` (bool) and ``tuned_head``/``tuned_neuron`` (float); not in JSON."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "masks"}
        return {"format": FORMAT, **jsonable(out)}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``selection.json`` atomically (temp file in the same folder, then rename)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(Path(path), text)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "Selection":
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != FORMAT:
            raise SelectionError(f"{path} is not a FLoE selection file (format {FORMAT!r} expected)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_masks(self, path: str | os.PathLike) -> Path | None:
        """Write the mask tensors as safetensors (atomically); None when there are none."""
        if not self.masks:
            return None
        from safetensors.torch import save_file

        return atomic_file(path, lambda tmp: save_file({k: v.contiguous() for k, v in self.masks.items()}, tmp))


def jsonable(x: Any) -> Any:
    """``x`` with tensors as lists, non-finite floats as ``None`` and other objects as strings."""
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)
