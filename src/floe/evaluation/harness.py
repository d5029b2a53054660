"""Optional bridge to lm-evaluation-harness: any harness task on the in-memory (adapted) model."""
from __future__ import annotations

from typing import Any, Sequence

from .metrics import MissingDependencyError

INSTALL_HINT = "pip install lm-eval"


def _import_harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise MissingDependencyError(
            f"lm-evaluation-harness tasks were requested (harness_tasks / --harness-tasks) but the 'lm_eval' "
            f"package is not installed ({err}). Fix: {INSTALL_HINT}, or drop the harness tasks.") from err
    return lm_eval, HFLM


def run_harness(model, tokenizer, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: int | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` over ``HFLM(pretrained=model, tokenizer=tokenizer)``: the model as it is
    in memory, MoE-LoRA adapters included. Returns the harness's ``results`` (metrics per task),
    ``versions`` and ``n-shot``. The harness downloads its task data sets itself (network needed)."""
    if not tasks:
        raise ValueError("no harness tasks given")
    lm_eval, HFLM = _import_harness()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    if out is None:  # non-zero ranks under distributed harness runs
        return {}
    return {k: out.get(k) for k in ("results", "versions", "n-shot") if k in out}
