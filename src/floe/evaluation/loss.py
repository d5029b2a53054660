"""Held-out loss and perplexity on response tokens, as training computes it."""
from __future__ import annotations

import math
from typing import Any

from floe.data import TokenizedDataset

from .logprobs import sequence_logprobs
from .metrics import macro_average


def evaluate_loss(model, tokenizer, dataset: TokenizedDataset, batch_size: int = 8, progress=None) -> dict[str, Any]:
    """Token-level cross-entropy over the response tokens of ``dataset`` (from :func:`floe.data.load_data`).

    ``loss`` = (sum over every response token of -log p(token | everything before it)) /
    (number of response tokens), over the whole set; ``perplexity`` = exp(loss). The tokens and
    labels are those training sees (same tokenisation, chat template and response-only mask),
    and the per-token loss is the causal LM's shifted cross-entropy. Aggregating by tokens
    makes the value independent of the batch size (a ``Trainer``'s ``eval_loss`` averages
    per-batch means instead, which differs slightly when batches hold different numbers of
    response tokens). Also per task, and ``macro_loss`` (mean of the per-task losses).
    """
    scored = sequence_logprobs(model, tokenizer, dataset.features, batch_size, progress)
    tasks: dict[str, list[float]] = {}
    total, count = 0.0, 0
    for (logp, n), record in zip(scored, dataset.examples):
        t = tasks.setdefault(record.meta.get("task", ""), [0.0, 0, 0])
        t[0] -= logp
        t[1] += n
        t[2] += 1
        total -= logp
        count += n
    per_task = {task: {"loss": s / n, "perplexity": _exp(s / n), "tokens": n, "examples": e}
                for task, (s, n, e) in sorted(tasks.items())}
    loss = total / count
    return {"loss": loss, "perplexity": _exp(loss), "tokens": count, "examples": len(dataset),
            "macro_loss": macro_average({t: v["loss"] for t, v in per_task.items()}), "per_task": per_task}


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
