"""FIM-LoRA scoring: statistics of LoRA-B gradients over a few calibration passes.

FIM-LoRA (docs/fim-lora.md) attaches plain LoRA, runs N (default 8)
calibration backward passes and uses the spread of each LoRA-B gradient as the matrix's
informativeness. LoRA initialises ``B = 0``, so ``dL/dA = B^T (...) = 0`` at the start:
only B carries signal, and only B is scored (A is frozen during calibration).

Definitions, for one adapted matrix with LoRA-B gradient ``g_p`` (shape ``d_out x r``) on
calibration pass ``p = 1..N`` (one batch each, causal-LM loss):

- per element ``e``: mean ``m_e = (1/N) sum_p g_pe``, variance
  ``v_e = (1/N) sum_p (g_pe - m_e)^2`` (population variance; a ``N/(N-1)`` factor would
  scale every matrix alike and change no allocation), mean square
  ``q_e = (1/N) sum_p g_pe^2 = v_e + m_e^2`` — the diagonal of the empirical Fisher
  restricted to B (one sample = one batch);
- matrix score = the **mean** over elements of ``v_e`` (``score="variance"``) or of ``q_e``
  (``score="mean_square"``), or the **sum** with ``reduction="sum"`` (the trace of that
  diagonal block). The mean is the default: the budget is counted in rank per matrix, and the
  mean keeps a wide ``up_proj`` B (``d_out = intermediate``) from outscoring a narrow
  ``down_proj`` B (``d_out = hidden``) by its size alone.

Running statistics use Welford's update in float32 so that the variance does not come from
the cancellation in ``E[g^2] - E[g]^2``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.nn as nn

from floe.adapters.naming import attach
from floe.arch import model_device, model_inputs
from floe.errors import InputError

ScoreKind = Literal["variance", "mean_square"]
Reduction = Literal["mean", "sum"]
SCORE_KINDS: tuple[str, ...] = ("variance", "mean_square")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


@dataclass
class AdaptedMatrix:
    """One LoRA-adapted linear layer, named as PEFT names it (relative to the base model)."""

    name: str
    """Module name in the base model, e.g. ``model.layers.3.mlp.down_proj``."""
    d_in: int
    d_out: int


class Welford:
    """Per-element running mean and sum of squared deviations (Welford 1962)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, g: torch.Tensor) -> None:
        g = g.detach().float()
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = g.clone(), torch.zeros_like(g)
            return
        delta = g - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (g - self.mean)

    def per_element(self, kind: str) -> torch.Tensor:
        """``v_e`` (variance) or ``q_e`` (mean square) over the updates seen, as defined above."""
        if self.mean is None or self.m2 is None:
            raise InputError("no gradients recorded")
        var = self.m2 / self.count
        return var if kind == "variance" else var + self.mean.square()


def reduce_score(per_element: torch.Tensor, reduction: str) -> float:
    """Mean or sum over the matrix's elements, in float64."""
    t = per_element.double()
    return float(t.mean() if reduction == "mean" else t.sum())


@contextlib.contextmanager
def attached_lora(model: nn.Module, lora_config: Any, seed: int) -> Iterator[Any]:
    """Attach PEFT LoRA (``lora_config``) to ``model`` in place; restore the model on exit.

    PEFT injects ``LoraLayer`` wrappers into the caller's module tree and freezes every base
    parameter; on exit ``unload()`` puts the original ``nn.Linear`` objects back (no merge,
    the adapter is discarded) and we restore each parameter's ``requires_grad`` flag, the
    train/eval mode and any attribute PEFT set, so the model is left as it was. Working in
    place instead of on a deep copy avoids holding the base weights twice.
    """
    import peft

    if isinstance(model, peft.PeftModel) or hasattr(model, "peft_config"):
        raise InputError(
            "the model already carries PEFT adapters; pass the base model (a freshly loaded one, or "
            "peft_model.unload()) to allocate ranks for a new LoRA."
        )
    target_modules = lora_config.target_modules
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attrs = set(vars(model))
    was_training = model.training
    torch.manual_seed(seed)  # LoRA-A's Kaiming init draws from the global generator
    peft_model = None
    try:
        try:
            peft_model = attach(model, lora_config)  # get_peft_model, keeping the base model's name
        except ValueError as e:
            if "not found" in str(e) or "match" in str(e).lower():
                names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
                raise InputError(
                    f"target modules {target_modules!r} match no linear layer of {type(model).__name__}; its linear "
                    f"layers are named {names}. Pass target modules with some of these (CLI: --target-modules)."
                ) from e
            raise
        yield peft_model
    finally:
        if peft_model is not None:
            peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)
        for attr in set(vars(model)) - attrs:  # anything PEFT may have set on the base model
            delattr(model, attr)


def lora_matrices(peft_model: Any) -> list[tuple[AdaptedMatrix, nn.Module]]:
    """The adapted modules of a PEFT LoRA model, in module order, with their ``LoraLayer``."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out.append((AdaptedMatrix(name=name, d_in=int(module.in_features), d_out=int(module.out_features)), module))
    return out


def _calibration_inputs(batch: dict[str, Any], device: torch.device, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise InputError(f"{where}: expected a dict with input_ids (and attention_mask, labels), got "
                         f"{type(batch).__name__}{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}")
    out = model_inputs(batch, device)
    if "labels" not in out:  # plain language modelling on every non-padding token
        labels = out["input_ids"].clone()
        if "attention_mask" in out:
            labels[out["attention_mask"] == 0] = -100
        out["labels"] = labels
    if not bool((out["labels"][..., 1:] != -100).any()):
        raise InputError(f"{where}: every label is -100 (no token to predict), so the loss is undefined; "
                         "check the collator's prompt masking or drop such examples.")
    return out


@dataclass
class CalibrationResult:
    """Per-matrix scores and the calibration losses."""

    matrices: list[AdaptedMatrix]
    scores: list[float]
    losses: list[float]
    tokens: list[int]
    """Number of predicted (label != -100) tokens per pass."""


def calibration_scores(peft_model: Any, batches: Iterable[dict[str, Any]], num_passes: int = 8,
                       score: str = "variance", reduction: str = "mean") -> CalibrationResult:
    """Run ``num_passes`` forward/backward passes (one batch each) and score every LoRA-B.

    The model is run in eval mode (no dropout) with only the LoRA-B weights requiring
    gradients; see the module docstring for the score definitions.
    """
    if score not in SCORE_KINDS:
        raise InputError(f"score must be one of {SCORE_KINDS}, got {score!r}")
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_passes < 2 and score == "variance":
        raise InputError(f"num_passes must be >= 2 to estimate a variance, got {num_passes}")
    if num_passes < 1:
        raise InputError(f"num_passes must be >= 1, got {num_passes}")
    mats = lora_matrices(peft_model)
    if not mats:
        raise InputError("no LoRA layers found on the model")
    b_weights = []
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for _, layer in mats:
        (w,) = [m.weight for m in layer.lora_B.values()]  # one adapter: "default"
        w.requires_grad_(True)
        b_weights.append(w)
    stats = [Welford() for _ in mats]
    device = model_device(peft_model)
    peft_model.eval()
    losses: list[float] = []
    tokens: list[int] = []
    it = iter(batches)
    for p in range(num_passes):
        try:
            batch = next(it)
        except StopIteration:
            raise InputError(
                f"the calibration data gave only {p} batches but num_passes={num_passes}; give more examples "
                f"(or a smaller batch size) or lower the number of passes."
            ) from None
        inputs = _calibration_inputs(batch, device, f"calibration batch {p}")
        for w in b_weights:
            w.grad = None
        loss = peft_model(**inputs).loss
        if not torch.isfinite(loss):
            raise InputError(f"calibration batch {p}: the loss is {loss.item()}; check the data and the model dtype "
                             "(float16 can overflow: try float32 or bfloat16).")
        loss.backward()
        for w, st in zip(b_weights, stats):
            st.update(w.grad if w.grad is not None else torch.zeros_like(w))
        losses.append(float(loss.item()))
        tokens.append(int((inputs["labels"][..., 1:] != -100).sum()))
    for w in b_weights:
        w.grad = None
    scores = [reduce_score(st.per_element(score), reduction) for st in stats]
    bad = [m.name for (m, _), s in zip(mats, scores) if not math.isfinite(s)]
    if bad:
        raise InputError(f"non-finite gradient statistics for {bad[:5]}; check the model dtype and data")
    return CalibrationResult(matrices=[m for m, _ in mats], scores=scores, losses=losses, tokens=tokens)
