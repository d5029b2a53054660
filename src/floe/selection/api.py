"""``select_layers``: the FLoE layer-selection pipeline behind one call (docs/method.md).

Taylor cost on the base model (Eq. 4) → Fisher on the adapted model (Eq. 8, per example) →
determination (Alg. 1, then the budget repair with per-unit costs) → refinement (Alg. 2) →
tuning (least squares) → per-layer score → ranking → top-k. After each of determination,
refinement and tuning, ``diagnostics.<stage>`` records the ranking, its rank correlation with
the previous stage's, the cost against the budget and the true masked-loss increase on the
selection and held-out batches. The ``scorer`` option swaps the whole pipeline for one of the ablation scorers (:mod:`.scorers`).
One model object can play both roles: the base model is the adapted one under
:func:`floe.adapters.adapters_disabled`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from floe.adapters import adapters_disabled, load_adapter, moe_lora_modules
from floe.adapters.moe_lora import ADAPTER_WEIGHTS_NAME, adapter_state_dict
from floe.io import atomic_file, atomic_write_text
from floe.selection import score as score_mod
from floe.selection.determination import (
    RULES,
    MaskSet,
    constrained_cost,
    determine,
    mean_costs,
    repair_budget,
)
from floe.selection.importance import (
    MaskGradients,
    SelectionError,
    dist_info,
    mask_gradients,
    masked_losses,
    weight_taylor,
)
from floe.selection.masks import unit_geometry
from floe.selection.refinement import refine_block, refine_paper
from floe.selection.scorers import (
    SCORERS,
    adapter_gradient_stats,
    fisher_layer_scores,
    random_layer_scores,
    taylor_layer_scores,
)
from floe.selection.stability import stability_analysis
from floe.selection.tuning import tune_masks

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
    mask_rule: str = "paper"
    """Reading of Alg. 1: paper (mask the smallest Fisher), kwon (keep the largest), fisher_top (mask the largest)."""
    scorer: str = "floe"
    """floe (full pipeline) or an ablation scorer: fisher, taylor, grad_norm, random, fim_variance."""
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
    """Seconds per stage: taylor, fisher, search, refinement, tuning, scorer, stability, total."""
    fingerprints: dict[str, Any] = field(default_factory=dict)
    """Hashes of the inputs: model config, adapter weights, data, configuration, versions."""
    config: dict[str, Any] = field(default_factory=dict)
    stability: dict[str, Any] | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """``masked_head``/``masked_neuron`` (bool) and ``tuned_head``/``tuned_neuron`` (float); not in JSON."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "masks"}
        return {"format": FORMAT, **_jsonable(out)}

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



def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


# ----------------------------------------------------------------------------- inputs

def _sha256_tensors(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_models(model: nn.Module, adapted: nn.Module | str | os.PathLike | None) -> tuple[nn.Module, nn.Module, dict]:
    """``(base, adapted, adapter fingerprint)``; loads an adapter folder into ``model``."""
    if adapted is None:
        if not moe_lora_modules(model):
            raise SelectionError("select_layers needs the warm-up (full-layer MoE-LoRA) adapter: pass its "
                                 "folder as the second argument, or a model that carries it")
        return model, model, {"source": "attached", "sha256": _sha256_tensors(adapter_state_dict(model).values())}
    if isinstance(adapted, (str, os.PathLike)):
        directory = Path(adapted)
        if not directory.is_dir():
            raise SelectionError(f"adapter folder {directory} does not exist; pass the warm-up adapter "
                                 "folder written by `floe train` (<output_dir>/adapter)")
        load_adapter(model, directory)  # AdapterError (a ValueError) when it does not fit the model
        weights = directory / ADAPTER_WEIGHTS_NAME
        return model, model, {"source": str(directory), "sha256": _sha256_file(weights)}
    if not isinstance(adapted, nn.Module):
        raise SelectionError(f"adapted must be a model, an adapter folder or None, got {type(adapted).__name__}")
    if not moe_lora_modules(adapted):
        raise SelectionError("the adapted model has no MoE-LoRA layers; pass the warm-up adapter or its folder")
    if adapted is not model:
        a, b = unit_geometry(model), unit_geometry(adapted)
        if a != b or getattr(model.config, "vocab_size", None) != getattr(adapted.config, "vocab_size", None):
            raise SelectionError(f"the adapted model does not match the base model: base {a}, adapted {b}; "
                                 "the adapter must have been trained on this base model")
    return model, adapted, {"source": "module", "sha256": _sha256_tensors(adapter_state_dict(adapted).values())}


def _materialise(data: Iterable[dict], num_batches: int | None, held: int = 0) -> list[dict]:
    """The first ``num_batches + held`` batches (all when ``num_batches`` is None) as a list, validated."""
    if isinstance(data, Mapping):
        raise SelectionError("data must be an iterable of batches (dicts), got a single dict; wrap it in a list")
    batches: list[dict] = []
    for i, batch in enumerate(data):
        if num_batches is not None and i >= num_batches + held:
            break
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise SelectionError(f"batch {i} is not a dict with 'input_ids' (got {type(batch).__name__}); "
                                 "pass batches from floe.data.iter_batches(dataset, batch_size, DataCollator(tokenizer))")
        ids = batch["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise SelectionError(f"batch {i}: input_ids must be a 2-D (batch, seq) tensor, got "
                                 f"{tuple(getattr(ids, 'shape', ()))}; single examples need collating into batches")
        labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
            raise SelectionError(f"batch {i}: needs 'labels' shaped like input_ids (response tokens, -100 "
                                 "elsewhere); build batches with floe.data.DataCollator")
        if int((labels[:, 1:] != -100).sum()) == 0:
            raise SelectionError(f"batch {i} has no response tokens (every label is -100 after the shift), "
                                 "so its loss is undefined; check the data's prompt/response split")
        batches.append(dict(batch))
    if not batches:
        raise SelectionError("select_layers got no batches; give it at least one batch of selection data")
    if num_batches is not None and len(batches) < num_batches + held:
        raise SelectionError(f"the data gives only {len(batches)} batches but num_batches={num_batches}"
                             + (f" plus heldout_batches={held} held-out batches are needed" if held else "")
                             + "; lower them or use more data / a smaller batch size")
    return batches


def _split_heldout(data: Iterable[dict], heldout: Iterable[dict] | None,
                   cfg: SelectionConfig) -> tuple[list[dict], list[dict]]:
    """``(selection batches, held-out batches)``: the given held-out batches, or the last
    ``cfg.heldout_batches`` of the data — never more than half of them, so small data still
    leaves the selection most of it (the number used is in ``diagnostics.data``)."""
    if heldout is not None:
        held = list(heldout)
        return _materialise(data, cfg.num_batches), (_materialise(held, None) if held else [])
    batches = _materialise(data, cfg.num_batches, cfg.heldout_batches)
    n_held = min(cfg.heldout_batches, len(batches) // 2)
    if cfg.num_batches is not None:
        n_held = len(batches) - cfg.num_batches
    if n_held == 0:
        return batches, []
    return batches[:-n_held], batches[-n_held:]


def _model_fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    text = cfg.to_json_string(use_diff=False) if cfg is not None else ""
    return {
        "name_or_path": getattr(cfg, "_name_or_path", None),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
    }


def _data_fingerprint(batches: list[dict]) -> dict[str, Any]:
    keys = ("input_ids", "attention_mask", "labels")
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    return {
        "sha256": _sha256_tensors(b[k] for b in batches for k in keys if k in b),
        "num_batches": len(batches),
        "examples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "tokens": tokens,
        "response_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
    }


def _versions() -> dict[str, str]:
    import transformers

    try:
        from importlib.metadata import version

        floe_version = version("floe")
    except Exception:  # pragma: no cover - not installed
        floe_version = "unknown"
    return {"floe": floe_version, "torch": torch.__version__, "transformers": transformers.__version__}


def _progress(cfg: SelectionConfig, desc: str):
    if not cfg.progress or dist_info()[0] != 0:
        return None
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False)


# ----------------------------------------------------------------------------- pipeline

@dataclass
class _FloeOutcome:
    masks: MaskSet
    tuned_head: torch.Tensor | None
    tuned_neuron: torch.Tensor | None
    scores: torch.Tensor
    untuned: torch.Tensor
    head_part: torch.Tensor
    neuron_part: torch.Tensor
    diagnostics: dict[str, Any]
    timings: dict[str, float]


def _type_parts(masks: MaskSet, tuned_head: torch.Tensor | None, tuned_neuron: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer ``1 − mean m̃`` over heads and over neurons (masked units count 0)."""
    parts = []
    for masked, tuned in ((masks.masked_head, tuned_head), (masks.masked_neuron, tuned_neuron)):
        values = torch.ones(masked.shape, dtype=torch.float64) if tuned is None else tuned.double().clamp_min(0.0)
        parts.append((1.0 - torch.where(masked, 0.0, values).mean(1)).float())
    return parts[0], parts[1]


def _rank_correlation(a: torch.Tensor, b: torch.Tensor | None) -> float | None:
    """Spearman correlation of two per-layer score vectors (None without a previous stage)."""
    if b is None or a.numel() < 2 or bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return None  # undefined for a constant score vector
    from scipy import stats

    value = float(stats.spearmanr(a.double().numpy(), b.double().numpy())[0])
    return value if math.isfinite(value) else 1.0


@dataclass
class _Measure:
    """What the stage reports need for the true masked loss: the adapted model and its data."""

    model: nn.Module
    batches: list[dict]
    heldout: list[dict]
    base_selection: float
    base_heldout: float | None


def _stage_report(masks: MaskSet, scores: torch.Tensor, previous: torch.Tensor | None, cost_head: torch.Tensor,
                  cost_neuron: torch.Tensor, cfg: SelectionConfig, measure: _Measure | None,
                  head_values: torch.Tensor | None = None, neuron_values: torch.Tensor | None = None) -> dict[str, Any]:
    """Ranking after a stage, its correlation with the previous stage's, the budget and the true masked loss."""
    budget_c = cfg.budget * float(cost_head.double().sum() + cost_neuron.double().sum())
    cost = constrained_cost(masks.masked_head, masks.masked_neuron, cost_head, cost_neuron, cfg.mask_rule)
    report: dict[str, Any] = dict(
        ranking=score_mod.rank_layers(scores), scores=scores.tolist(),
        rank_correlation=_rank_correlation(scores, previous),
        constrained="kept" if cfg.mask_rule == "kwon" else "masked", cost=cost, budget=budget_c,
        fits_budget=bool(cost <= budget_c * (1 + 1e-9)),
        heads_masked=int(masks.masked_head.sum()), neurons_masked=int(masks.masked_neuron.sum()))
    if measure is not None:
        head = masks.head_mask() if head_values is None else head_values
        neuron = masks.neuron_mask() if neuron_values is None else neuron_values
        increase = {"selection": float(masked_losses(measure.model, measure.batches, head, neuron).mean())
                    - measure.base_selection}
        if measure.heldout:
            increase["heldout"] = float(masked_losses(measure.model, measure.heldout, head, neuron).mean()) \
                - measure.base_heldout
        report["loss_increase"] = increase
    return report


def _floe_pipeline(adapted: nn.Module, batches: list[dict], fisher_grads: MaskGradients,
                   taylor_grads: MaskGradients, cfg: SelectionConfig, measure: _Measure | None = None) -> _FloeOutcome:
    """Determination → repair → refinement → tuning → layer scores, each stage reported.

    ``measure``: when given, every stage's true masked-loss increase is measured on its batches.
    """
    timings: dict[str, float] = {}
    diagnostics: dict[str, Any] = {}
    fh, fn = fisher_grads.fisher()
    ch, cn = taylor_grads.taylor()
    t_h, t_f = mean_costs(ch, cn)
    t = time.perf_counter()
    masks = determine(fh, fn, ch, cn, cfg.budget, cfg.mask_rule)           # Alg. 1 (mean costs)
    masks = repair_budget(masks, fh, fn, ch, cn, cfg.budget, cfg.mask_rule)  # fit C with per-unit costs
    timings["search"] = time.perf_counter() - t
    untuned = score_mod.layer_scores(masks, None, None, t_h, t_f)
    diagnostics["determination"] = {**masks.diagnostics, **_stage_report(masks, untuned, None, ch, cn, cfg, measure)}
    t = time.perf_counter()
    if cfg.refine == "paper":
        masks, diag = refine_paper(masks, fh, fn, ch, cn, cfg.budget, cfg.mask_rule, max_swaps=cfg.refine_iters)
    elif cfg.refine == "block":
        masks, diag = refine_block(masks, fisher_grads.head, fisher_grads.neuron, ch, cn, cfg.budget,
                                   cfg.mask_rule, k_candidates=cfg.refine_candidates, max_iters=cfg.refine_iters)
    timings["refinement"] = time.perf_counter() - t
    if cfg.refine != "none":
        previous, untuned = untuned, score_mod.layer_scores(masks, None, None, t_h, t_f)
        diagnostics["refinement"] = {**diag, **_stage_report(masks, untuned, previous, ch, cn, cfg, measure)}
    tuned_head = tuned_neuron = None
    scores = untuned
    t = time.perf_counter()
    if cfg.tune:
        tuning = tune_masks(adapted, batches, masks, damping=cfg.damping, max_abs=cfg.max_abs_mask,
                            progress=_progress(cfg, "tuning"))
        tuned_head, tuned_neuron = tuning.head, tuning.neuron
        scores = score_mod.layer_scores(masks, tuned_head, tuned_neuron, t_h, t_f)
        negative = int((tuned_head[~masks.masked_head] < 0).sum() + (tuned_neuron[~masks.masked_neuron] < 0).sum())
        diagnostics["tuning"] = {
            "sublayers": tuning.diagnostics, "negative_masks_clamped": negative,
            **_stage_report(masks, scores, untuned, ch, cn, cfg, measure, tuned_head, tuned_neuron)}
        diagnostics["tuning_fallbacks"] = [f"layer {d['layer']} {d['kind']}: {d['reason']}"
                                           for d in tuning.diagnostics if d["status"] == "fallback_binary"]
    timings["tuning"] = time.perf_counter() - t
    head_part, neuron_part = _type_parts(masks, tuned_head, tuned_neuron)
    return _FloeOutcome(masks, tuned_head, tuned_neuron, scores, untuned, head_part, neuron_part,
                        diagnostics, timings)


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
    cfg = config or SelectionConfig()
    if not isinstance(cfg, SelectionConfig):
        raise SelectionError(f"config must be a SelectionConfig, got {type(cfg).__name__}")
    t_start = time.perf_counter()
    base, adapted_model, adapter_fp = _resolve_models(model, adapted)
    geo = unit_geometry(adapted_model)
    num_layers = geo.num_layers
    if isinstance(cfg.top_k, int) and not 1 <= cfg.top_k <= num_layers:
        raise SelectionError(f"top_k={cfg.top_k} is out of range: the model has {num_layers} layers; "
                             f"choose 1..{num_layers} or a fraction in (0, 1]")
    batches, held = _split_heldout(data, heldout, cfg)
    timings: dict[str, float] = {}
    diagnostics: dict[str, Any] = {"data": {"num_batches": len(batches), "heldout_batches": len(held)}}
    sel = dict(untuned_scores=None, fisher_share=None, head_importance=None, neuron_importance=None,
               heads_masked=None, neurons_masked=None)
    masks_out: dict[str, torch.Tensor] = {}
    fisher_grads = taylor_grads = None
    adapter_stats = None

    if cfg.scorer in ("floe", "taylor"):
        t = time.perf_counter()
        with adapters_disabled(base):
            if cfg.taylor == "weights":
                taylor_grads = weight_taylor(base, batches, stage="Taylor cost, Eq. 4 (base model)",
                                             progress=_progress(cfg, "Taylor (base)"))
            else:
                taylor_grads = mask_gradients(base, batches, stage="Taylor cost (base model)",
                                              progress=_progress(cfg, "Taylor (base)"))
        timings["taylor"] = time.perf_counter() - t
        diagnostics["losses"] = {"base_mean": float(taylor_grads.loss.mean())}
    if cfg.scorer in ("floe", "fisher"):
        t = time.perf_counter()
        fisher_grads = mask_gradients(adapted_model, batches, stage="Fisher (adapted model)",
                                      per_example=cfg.fisher == "example", progress=_progress(cfg, "Fisher (adapted)"))
        timings["fisher"] = time.perf_counter() - t
        diagnostics.setdefault("losses", {})["adapted_mean"] = float(fisher_grads.loss.mean())
        sel["fisher_share"] = score_mod.fisher_share(*fisher_grads.fisher()).tolist()

    t = time.perf_counter()
    if cfg.scorer == "floe":
        measure = None
        if cfg.loss_check:
            base_held = float(masked_losses(adapted_model, held).mean()) if held else None
            measure = _Measure(adapted_model, batches, held, float(fisher_grads.loss.mean()), base_held)
            if base_held is not None:
                diagnostics["losses"]["adapted_heldout_mean"] = base_held
        outcome = _floe_pipeline(adapted_model, batches, fisher_grads, taylor_grads, cfg, measure)
        timings.update(outcome.timings)
        diagnostics.update(outcome.diagnostics)
        scores = outcome.scores
        heads_masked, neurons_masked = outcome.masks.counts_per_layer()
        sel.update(untuned_scores=outcome.untuned.tolist(), head_importance=outcome.head_part.tolist(),
                   neuron_importance=outcome.neuron_part.tolist(), heads_masked=heads_masked,
                   neurons_masked=neurons_masked)
        masks_out = {"masked_head": outcome.masks.masked_head, "masked_neuron": outcome.masks.masked_neuron}
        if outcome.tuned_head is not None:
            masks_out.update(tuned_head=outcome.tuned_head, tuned_neuron=outcome.tuned_neuron)
    elif cfg.scorer == "fisher":
        fh, fn = fisher_grads.fisher()
        scores = fisher_layer_scores(fh, fn)
        sel.update(head_importance=fh.double().sum(1).tolist(), neuron_importance=fn.double().sum(1).tolist())
    elif cfg.scorer == "taylor":
        ch, cn = taylor_grads.taylor()
        scores = taylor_layer_scores(ch, cn)
        sel.update(head_importance=ch.double().sum(1).tolist(), neuron_importance=cn.double().sum(1).tolist())
    elif cfg.scorer in ("grad_norm", "fim_variance"):
        adapter_stats = adapter_gradient_stats(adapted_model, batches, progress=_progress(cfg, "adapter gradients"))
        scores = adapter_stats.grad_norm if cfg.scorer == "grad_norm" else adapter_stats.fim_variance
    else:  # random
        scores = random_layer_scores(num_layers, cfg.seed)
    timings["scorer"] = time.perf_counter() - t
    ranking = score_mod.rank_layers(scores)
    chosen = score_mod.top_k(ranking, cfg.top_k, num_layers)

    stability = None
    if cfg.stability:
        t = time.perf_counter()
        rank_fn = _stability_rank_fn(cfg, adapted_model, batches, ranking, fisher_grads, taylor_grads, adapter_stats)
        stability = stability_analysis(rank_fn, len(batches), cfg.stability_fractions, cfg.seed,
                                       top_k=len(chosen)).to_dict()
        timings["stability"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    _, world = dist_info()
    fingerprints = {
        "model": _model_fingerprint(base),
        "adapter": adapter_fp,
        "data": _data_fingerprint(batches),
        "config_sha256": hashlib.sha256(json.dumps(_jsonable(cfg.to_dict()), sort_keys=True).encode()).hexdigest(),
        "versions": _versions(),
        "world_size": world,
    }
    return Selection(
        scorer=cfg.scorer, num_layers=num_layers, scores=[float(s) for s in scores], ranking=ranking,
        chosen=chosen, geometry=dict(num_layers=geo.num_layers, num_heads=geo.num_heads, head_dim=geo.head_dim,
                                     num_neurons=geo.num_neurons),
        diagnostics=_jsonable(diagnostics), timings=timings, fingerprints=fingerprints, config=cfg.to_dict(),
        stability=stability, masks=masks_out, **sel)


def _stability_rank_fn(cfg: SelectionConfig, adapted: nn.Module, batches: list[dict], full_ranking: list[int],
                       fisher_grads: MaskGradients | None, taylor_grads: MaskGradients | None, adapter_stats):
    """``rank_fn(batch indices) -> ranking`` recomputing the configured scorer on a subset."""
    n = len(batches)

    def rank_fn(index: list[int]) -> list[int]:
        if list(index) == list(range(n)):
            return list(full_ranking)
        sub = [batches[i] for i in index]
        if cfg.scorer == "floe":
            out = _floe_pipeline(adapted, sub, fisher_grads.subset(index), taylor_grads.subset(index), cfg)
            scores = out.scores
        elif cfg.scorer == "fisher":
            scores = fisher_layer_scores(*fisher_grads.subset(index).fisher())
        elif cfg.scorer == "taylor":
            scores = taylor_layer_scores(*taylor_grads.subset(index).taylor())
        elif cfg.scorer == "grad_norm":
            scores = adapter_stats.per_batch_sq_norm[torch.as_tensor(index)].double().sqrt().mean(0)
        elif cfg.scorer == "fim_variance":
            scores = adapter_gradient_stats(adapted, sub).fim_variance
        else:
            return list(full_ranking)
        return score_mod.rank_layers(scores)

    return rank_fn
