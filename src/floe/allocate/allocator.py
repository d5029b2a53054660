"""FIM-LoRA rank allocation: calibration scores -> per-matrix ranks -> a standard PEFT ``LoraConfig``.

``allocate_ranks(model, batches, AllocateConfig(...))`` attaches plain LoRA (PEFT) at the
budget rank, scores every adapted matrix by its LoRA-B gradient statistics (``fim.py``),
spreads ``total = n_matrices * budget_rank`` proportionally to the scores with
water-filling and largest-remainder rounding (``rounding.py``; total kept exactly, each
rank in ``[min_rank, min(max_rank, d_in, d_out)]``), removes the adapter again and returns
an ``Allocation``. ``Allocation.lora_config()`` is a ``peft.LoraConfig`` whose
``rank_pattern`` gives every matrix its rank; ``save_allocation`` writes it as
``adapter_config.json`` next to ``allocation.json`` and ``rank_map.png``.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch.nn as nn

from floe.errors import InputError
from floe.io import atomic_dir

from .fim import REDUCTIONS, SCORE_KINDS, AdaptedMatrix, attached_lora, calibration_scores, lora_matrices
from .rounding import BudgetError, check_budget, largest_remainder, water_fill

DEFAULT_TARGETS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")


@dataclass
class AllocateConfig:
    """How FIM-LoRA scores matrices and spreads the rank budget."""

    budget_rank: int = 8
    """Average rank per matrix; the total budget is (number of adapted matrices) x budget_rank."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Names (PEFT suffix matching) of the linear layers to adapt, e.g. add q_proj, k_proj, v_proj, o_proj."""
    num_passes: int = 8
    """Calibration forward/backward passes, one batch each."""
    score: str = "variance"
    """Per-element LoRA-B gradient statistic over the passes: variance | mean_square (empirical Fisher)."""
    reduction: str = "mean"
    """How a matrix's per-element statistics become one score: mean (size-neutral) | sum (trace)."""
    min_rank: int = 1
    """Smallest rank any matrix gets."""
    max_rank: int | None = None
    """Largest rank any matrix gets (None: 4 x budget_rank); never above min(d_in, d_out) of the matrix."""
    total_rank: int | None = None
    """Total rank to spread (None: number of matrices x budget_rank)."""
    lora_alpha: float | None = None
    """lora_alpha of the emitted config (None: 2 x budget_rank); PEFT scales each matrix by alpha / its rank."""
    lora_dropout: float = 0.05
    """lora_dropout of the emitted config (calibration itself runs without dropout)."""
    seed: int = 0
    """Seed of the LoRA-A initialisation used during calibration (and of a saved adapter)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        self.target_modules = tuple(self.target_modules)
        problems = []
        for name in ("budget_rank", "num_passes", "min_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        for name in ("max_rank", "total_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                problems.append(f"{name} must be None or a positive integer, got {v!r}")
        if not self.target_modules:
            problems.append("target_modules is empty: name at least one module, e.g. gate_proj,up_proj,down_proj")
        if self.score not in SCORE_KINDS:
            problems.append(f"score must be one of {SCORE_KINDS}, got {self.score!r}")
        if self.reduction not in REDUCTIONS:
            problems.append(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.score == "variance" and isinstance(self.num_passes, int) and self.num_passes == 1:
            problems.append("num_passes must be >= 2 to estimate a variance (or use score='mean_square')")
        if isinstance(self.min_rank, int) and isinstance(self.budget_rank, int) and self.total_rank is None \
                and self.min_rank > self.budget_rank:
            problems.append(f"min_rank {self.min_rank} is above budget_rank {self.budget_rank}: the budget "
                            f"(matrices x {self.budget_rank}) cannot give every matrix {self.min_rank}")
        if isinstance(self.max_rank, int) and isinstance(self.min_rank, int) and self.max_rank < self.min_rank:
            problems.append(f"max_rank {self.max_rank} is below min_rank {self.min_rank}")
        if self.lora_alpha is not None and not float(self.lora_alpha) > 0:
            problems.append(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if problems:
            raise BudgetError("invalid AllocateConfig: " + "; ".join(problems))

    @property
    def cap(self) -> int:
        """The configured per-matrix maximum (before the min(d_in, d_out) limit)."""
        return self.max_rank if self.max_rank is not None else 4 * self.budget_rank

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.budget_rank


@dataclass
class Allocation:
    """The result of ``allocate_ranks``: per-matrix scores, shares and ranks."""

    matrices: list[AdaptedMatrix]
    scores: list[float]
    shares: list[float]
    """Continuous water-filled shares (sum = total_rank) before rounding."""
    ranks: list[int]
    caps: list[int]
    total_rank: int
    config: AllocateConfig
    layer_prefix: str | None = None
    """Qualified name of the decoder-layer list (e.g. ``model.layers``), for the rank map."""
    calibration_losses: list[float] = field(default_factory=list)
    calibration_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    base_model_name_or_path: str | None = None

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.matrices]

    @property
    def rank_by_name(self) -> dict[str, int]:
        return dict(zip(self.names, self.ranks))

    @property
    def rank_pattern(self) -> dict[str, int]:
        """PEFT ``rank_pattern``: one key per matrix that matches that matrix only (see ``pattern_keys``)."""
        keys = pattern_keys(self.names)
        return {keys[n]: r for n, r in zip(self.names, self.ranks)}

    def layer_and_module(self, name: str) -> tuple[int | None, str]:
        """``model.layers.3.mlp.down_proj`` -> ``(3, "mlp.down_proj")``; ``(None, name)`` outside the layers."""
        if self.layer_prefix and name.startswith(self.layer_prefix + "."):
            idx, _, rest = name[len(self.layer_prefix) + 1:].partition(".")
            if idx.isdigit():
                return int(idx), rest
        return None, name

    def lora_config(self, **overrides: Any):
        """A standard ``peft.LoraConfig`` giving each matrix its allocated rank (``overrides`` win)."""
        import peft

        kw: dict[str, Any] = dict(
            r=self.config.budget_rank, lora_alpha=self.config.alpha, lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.target_modules), rank_pattern=self.rank_pattern, bias="none",
            task_type="CAUSAL_LM", base_model_name_or_path=self.base_model_name_or_path,
        )
        kw.update(overrides)
        return peft.LoraConfig(**kw)

    def to_dict(self) -> dict[str, Any]:
        keys = pattern_keys(self.names)
        rows = []
        for m, s, x, r, c in zip(self.matrices, self.scores, self.shares, self.ranks, self.caps):
            layer, module = self.layer_and_module(m.name)
            rows.append(dict(name=m.name, rank_pattern_key=keys[m.name], layer=layer, module=module,
                             d_in=m.d_in, d_out=m.d_out, score=s, share=x, rank=r, cap=c))
        return dict(
            method="fim", budget_rank=self.config.budget_rank, total_rank=self.total_rank,
            allocated_rank=sum(self.ranks), num_matrices=len(self.ranks),
            min_rank=self.config.min_rank, max_rank=self.config.cap, config=asdict(self.config),
            base_model_name_or_path=self.base_model_name_or_path,
            lora_parameters=sum(r * (m.d_in + m.d_out) for m, r in zip(self.matrices, self.ranks)),
            uniform_lora_parameters=sum(self.config.budget_rank * (m.d_in + m.d_out) for m in self.matrices),
            calibration_losses=self.calibration_losses, calibration_tokens=self.calibration_tokens,
            seconds=self.seconds, matrices=rows, rank_pattern=self.rank_pattern,
        )


def _peft_matches(key: str, module_name: str) -> bool:
    # PEFT 0.21 ``get_pattern_key``: a rank_pattern key is a regex matched as ``(.*\.)?(key)$``
    # against the full module name (and the first matching key in dict order wins).
    return re.match(rf"(.*\.)?({key})$", module_name) is not None


def pattern_keys(names: list[str]) -> dict[str, str]:
    """A ``rank_pattern`` key per module name that PEFT matches to that module and no other.

    The full name (``model.layers.3.mlp.down_proj``) is used as is when, read as PEFT reads
    it (a regex with optional leading ``anything.``), it matches no other adapted module;
    otherwise it is anchored and escaped (``^model\\.layers\\.3\\.mlp\\.down_proj``), which
    matches that exact name only. (``.`` is a regex wildcard and the leading part is free,
    so a short suffix key could match several modules; full names plus this check cannot.)
    """
    return {n: n if not any(_peft_matches(n, other) for other in names if other != n) else "^" + re.escape(n)
            for n in names}


def allocate_ranks(model: nn.Module, batches: Iterable[dict[str, Any]], config: AllocateConfig | None = None) -> Allocation:
    """FIM-LoRA: score every target matrix on calibration batches and spread the rank budget.

    ``batches``: any iterable of dicts with ``input_ids``, ``attention_mask`` and ``labels``
    (-100 = not predicted); the first ``config.num_passes`` are used, one backward pass
    each. The PEFT adapter used for scoring is removed before returning: the caller's model
    is left as it was (same modules, weights, ``requires_grad`` flags and train/eval mode).
    Raises ``BudgetError`` (a ``ValueError``) when the budget cannot be spread under the
    bounds, ``ValueError`` for unusable data or targets.
    """
    import peft

    from floe.arch import decoder_layers

    cfg = config or AllocateConfig()
    t0 = time.perf_counter()
    probe = peft.LoraConfig(r=cfg.budget_rank, lora_alpha=cfg.budget_rank, lora_dropout=0.0,
                            target_modules=list(cfg.target_modules), bias="none")
    with attached_lora(model, probe, cfg.seed) as peft_model:
        mats = [m for m, _ in lora_matrices(peft_model)]
        caps, total = _check_budget(cfg, mats)  # before spending time on the passes
        res = calibration_scores(peft_model, batches, num_passes=cfg.num_passes, score=cfg.score,
                                 reduction=cfg.reduction)
    shares = water_fill(res.scores, total, cfg.min_rank, caps)  # "proportional redistribution"
    ranks = largest_remainder(shares, total, res.scores)
    try:
        prefix = decoder_layers(model)[0]
    except ValueError:
        prefix = None
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return Allocation(
        matrices=res.matrices, scores=res.scores, shares=[float(x) for x in shares], ranks=ranks, caps=caps,
        total_rank=total, config=cfg, layer_prefix=prefix, calibration_losses=res.losses,
        calibration_tokens=res.tokens, seconds=time.perf_counter() - t0, base_model_name_or_path=name,
    )


def _check_budget(cfg: AllocateConfig, mats: list[AdaptedMatrix]) -> tuple[list[int], int]:
    """Per-matrix caps ``min(cap, d_in, d_out)`` and the total; ``BudgetError`` if they cannot fit."""
    n = len(mats)
    caps = [min(cfg.cap, m.d_in, m.d_out) for m in mats]
    total = cfg.total_rank if cfg.total_rank is not None else n * cfg.budget_rank
    try:
        check_budget(total, [cfg.min_rank] * n, caps)
    except BudgetError as e:
        raise BudgetError(f"{e} (budget rank {cfg.budget_rank}, {n} matrices, min rank {cfg.min_rank}, "
                          f"max rank {cfg.cap}, smallest min(d_in, d_out) {min(min(m.d_in, m.d_out) for m in mats)})"
                          ) from None
    return caps, total


def save_allocation(allocation: Allocation, output_dir: str | Path, model: nn.Module | None = None,
                    save_adapter: bool = False, plot: bool = True) -> Path:
    """Write ``adapter_config.json``, ``allocation.json`` and ``rank_map.png`` into ``output_dir``.

    With ``save_adapter=True`` (needs ``model``, the same base model) also an initialised
    adapter (``adapter_model.safetensors``; LoRA-A Kaiming with ``config.seed``, B = 0) that
    ``PeftModel.from_pretrained`` loads; the model is restored afterwards. Files are written
    into a temporary folder beside ``output_dir`` and moved in only when all succeeded.
    """
    out = Path(output_dir)
    if save_adapter and model is None:
        raise InputError("save_adapter=True needs the base model to initialise the adapter on")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder; choose another --output")

    def write(tmp: Path) -> None:
        if save_adapter:
            _save_initialised_adapter(allocation, model, tmp)
        else:
            allocation.lora_config().save_pretrained(str(tmp))
        (tmp / "allocation.json").write_text(json.dumps(allocation.to_dict(), indent=2) + "\n")
        if plot:
            from .plots import plot_rank_map

            plot_rank_map(allocation, tmp / "rank_map.png")

    return atomic_dir(out, write, existing="merge")  # other files in an existing output folder stay


def _save_initialised_adapter(allocation: Allocation, model: nn.Module, folder: Path) -> None:
    """PEFT's adapter folder for ``allocation`` on ``model`` (A initialised with the config's seed, B = 0)."""
    with attached_lora(model, allocation.lora_config(), allocation.config.seed) as peft_model:
        got = {m.name: int(layer.r["default"]) for m, layer in lora_matrices(peft_model)}
        if got != allocation.rank_by_name:
            raise AssertionError(f"PEFT did not apply the rank pattern: {got} vs {allocation.rank_by_name}")
        peft_model.save_pretrained(str(folder))
